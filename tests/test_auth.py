"""Bearer tokens on DICOMweb: who gets in, who is refused, and how the refusal reads.

Tokens come from the node's own key (`dicomnode token create`) or from a hospital's OIDC
provider, played here by a JWKS served on loopback.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from tests.conftest import dicomweb_url, token_for
from tests.factory import make_ct

READ = ("dicomweb.read",)


def get(node, path: str, token: str | None = None, **kwargs) -> requests.Response:
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.get(dicomweb_url(node) + path, headers=headers, timeout=30, **kwargs)


def stow(node, token: str) -> requests.Response:
    from io import BytesIO

    buffer = BytesIO()
    make_ct().save_as(buffer, enforce_file_format=True)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + buffer.getvalue() + b"\r\n--b--\r\n"
    return requests.post(
        dicomweb_url(node) + "/studies",
        data=body,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
        },
        timeout=30,
    )


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def assert_refused(response: requests.Response, words: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="dicomnode"')
    assert words in response.json()["detail"]


@pytest.fixture
def node(start_node):
    return start_node()


def test_a_valid_token_reads(node):
    response = get(node, "/studies", token_for(node, READ))
    assert response.status_code == 200
    assert response.json() == []


def test_no_token_is_401_with_a_challenge(node):
    assert_refused(get(node, "/studies"), "Bearer token is required")


def test_not_a_bearer_token(node):
    response = get(node, "/studies", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert_refused(response, "must be 'Bearer <token>'")
    assert_refused(get(node, "/studies", "not-a-jwt"), "not a JWT")


def test_expired_token(node):
    assert_refused(get(node, "/studies", token_for(node, READ, expires_in=-120)), "expired")


def test_alg_none_is_refused(node):
    claims = {"iss": "dicomnode", "aud": "dicomnode", "sub": "x", "exp": int(time.time()) + 60}
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims | {'scope': 'dicomweb.read'})}."
    assert_refused(get(node, "/studies", unsigned), "algorithm 'none'")


def test_hmac_signed_with_the_public_key_is_refused(node):
    header = {"alg": "HS256", "typ": "JWT"}
    forged = f"{_b64(header)}.{_b64({'iss': 'dicomnode', 'sub': 'x'})}.c2ln"
    assert_refused(get(node, "/studies", forged), "algorithm 'HS256'")


def test_token_signed_by_another_key(node):
    stranger = RSAKey.generate_key(2048, private=True)
    claims = {
        "iss": "dicomnode",
        "aud": "dicomnode",
        "sub": "mallory",
        "scope": "dicomweb.read",
        "exp": int(time.time()) + 600,
    }
    forged = jwt.encode({"alg": "RS256", "kid": stranger.thumbprint()}, claims, stranger)
    assert_refused(get(node, "/studies", forged), "not valid")


def _local_claims(**override) -> dict:
    claims = {
        "iss": "dicomnode",
        "aud": "dicomnode",
        "sub": "alice",
        "scope": "dicomweb.read",
        "exp": int(time.time()) + 600,
    }
    return {**claims, **override}


def _sign_with_node_key(node, claims: dict) -> str:
    from dicomnode.archive.keys import shared_signing_key

    key = shared_signing_key(node.settings.database_url)
    return jwt.encode({"alg": "RS256", "kid": key.thumbprint()}, claims, key)


def test_wrong_audience_and_wrong_issuer(node):
    assert_refused(
        get(node, "/studies", _sign_with_node_key(node, _local_claims(aud="elsewhere"))), "aud"
    )
    assert_refused(
        get(node, "/studies", _sign_with_node_key(node, _local_claims(iss="https://evil"))),
        "issuer 'https://evil'",
    )


def test_missing_scope_is_403(node):
    response = get(node, "/studies", token_for(node, ("governance.read",)))
    assert response.status_code == 403
    assert "dicomweb.read" in response.json()["detail"]


def test_a_token_without_a_purpose_of_use_is_403_and_a_security_alert(node):
    """Checklist item 39: every token states why it is used; one that states no purpose (a
    well-signed token, in time, for this audience, with the scope) is refused with 403 and a
    110113 alert, on DICOMweb and on the governance API; an expired or wrong-audience one is
    refused with 401 and a 110114. A token in IHE IUA's form states it too."""
    from tests.test_audit_alerts import event_id, outcome_text, spooled

    before = len(spooled(node))
    both = "dicomweb.read governance.read"
    purposeless = _sign_with_node_key(node, _local_claims(sub="no-purpose", scope=both))
    refused = get(node, "/studies", purposeless)
    assert refused.status_code == 403, refused.text
    assert "purpose_of_use" in refused.json()["detail"]
    governance = requests.get(
        f"http://127.0.0.1:{node.http_port}/governance/api/policy",
        headers={"Authorization": f"Bearer {purposeless}"},
        timeout=30,
    )
    assert governance.status_code == 403
    expired = _local_claims(exp=int(time.time()) - 600, purpose_of_use="TREAT")
    assert get(node, "/studies", _sign_with_node_key(node, expired)).status_code == 401
    elsewhere = _local_claims(aud="elsewhere", purpose_of_use="TREAT")
    assert get(node, "/studies", _sign_with_node_key(node, elsewhere)).status_code == 401

    messages = spooled(node)[before:]
    alerts = [d for d in messages if event_id(d) == "110113"]
    assert alerts and all("token purpose" in outcome_text(d) for d in alerts)
    assert "states no purpose_of_use" in outcome_text(alerts[0])
    assert any(event_id(d) == "110114" and "expired" in outcome_text(d) for d in messages)

    stated = _local_claims(sub="iua", purpose_of_use=None)
    stated["extensions"] = {"ihe_iua": {"purpose_of_use": [{"code": "TREAT"}]}}
    assert get(node, "/studies", _sign_with_node_key(node, stated)).status_code == 200
    assert get(node, "/studies", token_for(node, READ)).status_code == 200  # the node's own


def test_the_node_issues_tokens_that_state_a_purpose(node):
    from dicomnode.archive.keys import shared_signing_key
    from dicomnode.dicomweb.auth import DEFAULT_PURPOSE, issue_token

    key = shared_signing_key(node.settings.database_url)
    for purpose, stated in ((None, DEFAULT_PURPOSE), ("HRESCH", "HRESCH")):
        token = issue_token(key, node.settings.auth, "x", list(READ), 60, purpose)
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        assert claims["purpose_of_use"] == stated


def test_a_read_only_token_cannot_store_or_delete(node):
    reader = token_for(node, READ)
    assert stow(node, reader).status_code == 403
    response = requests.delete(
        dicomweb_url(node) + "/studies/1.2.3",
        headers={"Authorization": f"Bearer {reader}"},
        timeout=30,
    )
    assert response.status_code == 403
    assert node.archive.counts()["instances"] == 0
    writer = token_for(node, ("dicomweb.write",))
    assert stow(node, writer).status_code == 200
    assert node.archive.counts()["instances"] == 1


def test_health_is_open_and_metrics_open_by_default(node):
    base = f"http://127.0.0.1:{node.http_port}"
    assert requests.get(base + "/healthz", timeout=30).json()["status"] == "ok"
    metrics = requests.get(base + "/metrics", timeout=30)
    assert metrics.status_code == 200
    assert "dicomnode_instances_received_total" in metrics.text


def test_metrics_can_be_protected(start_node):
    node = start_node(extra="[auth]\nprotect_metrics = true\n")
    base = f"http://127.0.0.1:{node.http_port}"
    assert requests.get(base + "/metrics", timeout=30).status_code == 401
    token = token_for(node, ())
    response = requests.get(
        base + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code == 200
    assert requests.get(base + "/healthz", timeout=30).status_code == 200


def test_token_create_command(node):
    config = node.settings.source
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomnode.cli",
            "token",
            "create",
            "--config",
            str(config),
            "--scope",
            "dicomweb.read dicomweb.write",
            "--subject",
            "pacs-gateway",
            "--expires",
            "1h",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert get(node, "/studies", token).status_code == 200
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["sub"] == "pacs-gateway"
    assert claims["purpose_of_use"] == "TREAT"  # what the policy in force gives the subject
    assert 3500 <= claims["exp"] - claims["iat"] <= 3600
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomnode.cli",
            "token",
            "create",
            "--config",
            str(config),
            "--scope",
            "dicomweb.fly",
            "--subject",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "unknown scopes" in bad.stderr


# --- the hospital's OIDC provider --------------------------------------------------------


class _Provider:
    """A JWKS endpoint on loopback, as Keycloak would publish it."""

    def __init__(self) -> None:
        self.key = ECKey.generate_key("P-256", private=True)
        self.requests = 0
        jwks = json.dumps(KeySet([self.key]).as_dict(private=False)).encode()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                provider.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(jwks)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.issuer = "https://keycloak.hospital.example/realms/radiology"
        self.jwks_url = f"http://127.0.0.1:{self.server.server_port}/certs"

    def token(self, audience: str = "dicomnode-api", scope: str = "dicomweb.read", **extra) -> str:
        claims = {
            "iss": self.issuer,
            "aud": audience,
            "sub": "dr.kim",
            "scope": scope,
            "exp": int(time.time()) + 600,
            "extensions": {"ihe_iua": {"purpose_of_use": [{"code": "TREAT"}]}},
            **extra,
        }
        return jwt.encode({"alg": "ES256", "kid": self.key.thumbprint()}, claims, self.key)


@pytest.fixture
def provider():
    p = _Provider()
    yield p
    p.server.shutdown()


def test_tokens_from_the_hospital_identity_provider(start_node, provider):
    node = start_node(
        extra=f'[auth]\nissuer = "{provider.issuer}"\njwks_url = "{provider.jwks_url}"\n'
        'audience = "dicomnode-api"\n'
    )
    assert get(node, "/studies", provider.token()).status_code == 200
    assert get(node, "/studies", provider.token()).status_code == 200
    assert provider.requests == 1  # the key set is cached
    assert_refused(get(node, "/studies", provider.token(audience="another-app")), "aud")
    assert get(node, "/studies", provider.token(scope="openid profile")).status_code == 403
    assert get(node, "/studies", provider.token(extensions={})).status_code == 403  # no purpose
    # the node's own tokens still work beside the provider's
    assert get(node, "/studies", token_for(node, READ)).status_code == 200


def test_cors_for_configured_origins_only(start_node):
    node = start_node(http={"cors_origins": ["https://viewer.hospital.example"]})
    preflight = requests.options(
        dicomweb_url(node) + "/studies",
        headers={
            "Origin": "https://viewer.hospital.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "Authorization",
        },
        timeout=30,
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://viewer.hospital.example"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    answer = get(
        node,
        "/studies",
        token_for(node, READ),
        headers={"Origin": "https://viewer.hospital.example"},
    )
    assert answer.headers["Access-Control-Allow-Origin"] == "https://viewer.hospital.example"
    other = get(node, "/studies", token_for(node, READ), headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_a_verified_token_is_trusted_again_only_until_it_expires(monkeypatch):
    """The verifier remembers a token it checked (a viewer sends one token with every request),
    but never past the token's expiry, and a token changed by one character is checked anew."""
    from dicomnode.config import AuthSettings
    from dicomnode.dicomweb.auth import AuthError, TokenVerifier, issue_token

    key = RSAKey.generate_key(2048, private=True)
    settings = AuthSettings(leeway=0)
    verifier = TokenVerifier(settings, key)
    token = issue_token(key, settings, "viewer", list(READ), expires_in=20)
    assert verifier.verify(f"Bearer {token}").scopes == frozenset(READ)
    assert verifier.verify(f"Bearer {token}").subject == "viewer"  # remembered
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    with pytest.raises(AuthError, match="not valid"):
        verifier.verify(f"Bearer {tampered}")
    later = time.time() + 30
    monkeypatch.setattr(time, "time", lambda: later)
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(f"Bearer {token}")
