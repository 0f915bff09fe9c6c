"""Hostile HTTP clients against a running node on loopback: malformed bearer tokens, sign-in
redirect targets with CR/LF, sessions that must end when their user signs out, STOW bodies of
junk parts (memory and CPU), slow-loris connections, and fuzzing of the token parser and the
multipart reader."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import requests

from dicomnode.archive.accounts import AccountStore
from tests.conftest import dicomweb_url
from tests.test_dpo_pages import PASSWORD, Browser

INTERNALS = ("Traceback", "object has no attribute", 'File "', "sqlalchemy", "SELECT ")


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: these tests are about the HTTP side, not the index."""
    return f"sqlite:///{tmp_path / 'index.sqlite'}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _token(header: object, claims: object, signature: bytes = b"sig") -> str:
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature)]
    )


def _assert_no_internals(text: str) -> None:
    for marker in INTERNALS:
        assert marker not in text, f"{marker!r} in the answer: {text[:300]}"


# --- item 9: tokens whose parts are not JSON objects ---------------------------------------


GOOD_CLAIMS = {"iss": "dicomnode", "aud": "dicomnode", "sub": "x", "exp": 4102444800}
BAD_TOKENS = {
    "header is an array": _token([1, 2], GOOD_CLAIMS),
    "header is a number": _token(7, GOOD_CLAIMS),
    "header is a string": _token("RS256", GOOD_CLAIMS),
    "header is null": _token(None, GOOD_CLAIMS),
    "payload is an array": _token({"alg": "RS256"}, ["iss"]),
    "payload is a number": _token({"alg": "RS256"}, 12),
    "alg is a list": _token({"alg": ["RS256"]}, GOOD_CLAIMS),
    "alg is an object": _token({"alg": {"x": 1}}, GOOD_CLAIMS),
    "issuer is an object": _token({"alg": "RS256"}, {"iss": {"a": 1}}),
    "issuer is not latin-1": _token({"alg": "RS256"}, {"iss": "\ud55c\uad6d"}),
    "two parts": "e30.e30",
    "four parts": "e30.e30.e30.e30",
    "not base64": "%%%.***.!!!",
    "not utf-8": ".".join([_b64(b"\xff\xfe"), _b64(b"{}"), "x"]),
    "deep nesting": _token({"alg": "RS256"}, json.loads("[" * 50 + "]" * 50)),
}


@pytest.mark.parametrize("what", sorted(BAD_TOKENS))
def test_a_token_whose_parts_are_not_json_objects_is_refused_with_401(start_node, what):
    node = start_node()
    answer = requests.get(
        f"{dicomweb_url(node)}/studies",
        headers={"Authorization": f"Bearer {BAD_TOKENS[what]}"},
        timeout=30,
    )
    assert answer.status_code == 401, (what, answer.status_code, answer.text[:300])
    _assert_no_internals(answer.text)
    _assert_no_internals(answer.headers.get("WWW-Authenticate", ""))


def test_a_signed_token_with_odd_claim_types_is_refused_or_granted_nothing(start_node):
    """Claims of the wrong type in a token signed by the node's key: exp as a string is
    refused, a scope that is a number or a one-string scp grants no scope made of letters."""
    from joserfc import jwt as joserfc_jwt

    from dicomnode.archive.keys import load_or_create_signing_key

    node = start_node()
    key = load_or_create_signing_key(node.settings.node.data_dir)
    now = int(time.time())
    base = {"iss": "dicomnode", "aud": "dicomnode", "sub": "odd", "iat": now, "exp": now + 600}

    def get(claims: dict) -> requests.Response:
        token = joserfc_jwt.encode({"alg": "RS256", "kid": key.thumbprint()}, claims, key)
        return requests.get(
            f"{dicomweb_url(node)}/studies",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )

    for claims in (
        base | {"exp": "soon", "scope": "dicomweb.read"},
        base | {"scope": 12},
        base | {"scp": "dicomweb.read"},  # a string, not a list: read as a space-separated list
        base | {"scope": "dicomweb.read", "extensions": ["ihe_iua"]},
    ):
        answer = get(claims)
        assert answer.status_code < 500, (claims, answer.status_code, answer.text[:300])
        _assert_no_internals(answer.text)
    assert get(base | {"exp": "soon", "scope": "dicomweb.read"}).status_code == 401
    assert get(base | {"scope": 12}).status_code == 403
    assert get(base | {"scp": "dicomweb.read"}).status_code == 200


# --- item 9: CR/LF in the sign-in's next -----------------------------------------------------


def _browser(node) -> Browser:
    return Browser(f"http://127.0.0.1:{node.http_port}")


@pytest.fixture
def dpo_node(start_node):
    node = start_node()
    AccountStore(node.archive.index).add("dpo1", PASSWORD, "dpo", "Kim")
    return node


@pytest.mark.parametrize(
    "target",
    [
        "/governance/\r\nSet-Cookie: planted=1",
        "/governance/\nLocation: https://evil.example/",
        "/governance/\rx",
        "/governance/\x00",
        "/governance/\x7f",
    ],
)
def test_control_characters_in_the_sign_in_next_are_not_followed(dpo_node, target):
    client = _browser(dpo_node)
    token = client.csrf()
    answer = client.post(
        "/governance/signin",
        data={"username": "dpo1", "password": PASSWORD, "csrf_token": token, "next": target},
        follow=False,
    )
    assert answer.status_code == 303, (answer.status_code, answer.text[:300])
    assert answer.headers["Location"].endswith("/governance/")
    assert "planted" not in answer.headers.get("Set-Cookie", "")
    # signed in, the sign-in page sends the browser on: the same check applies
    again = client.get("/governance/signin", params={"next": target}, follow=False)
    assert again.status_code == 302 and again.headers["Location"].endswith("/governance/")
    # not signed in, the page shows the form; the value is escaped, nothing breaks
    form = _browser(dpo_node).get("/governance/signin", params={"next": target}, follow=False)
    assert form.status_code == 200
    _assert_no_internals(form.text)


# --- item 8: signing out ends the session on the server --------------------------------------


def test_a_cookie_kept_after_sign_out_reads_nothing_and_signs_nothing(dpo_node):
    client = _browser(dpo_node)
    assert client.sign_in("dpo1").url.endswith("/governance/")
    kept_cookies = {c.name: c.value for c in client.cookies}
    csrf = client.csrf("/governance/ledger")
    checkpoints = dpo_node.archive.ledger.count()
    assert client.get("/governance/ledger", follow=False).status_code == 200

    signed_out = client.post("/governance/signout", data={"csrf_token": csrf}, follow=False)
    assert signed_out.status_code == 303

    def thief() -> Browser:
        """Someone who copied the cookie before the sign-out (a fresh jar for each request:
        an answer that clears the cookie must not hide what the kept one can do)."""
        copy = _browser(dpo_node)
        for name, value in kept_cookies.items():
            copy.cookies.set(name, value)
        return copy

    page = thief().get("/governance/ledger", follow=False)
    assert page.status_code == 302 and "/governance/signin" in page.headers["Location"]
    assert thief().get("/governance/disclosures.json", follow=False).status_code == 401
    signed = thief().post("/governance/ledger/checkpoint", data={"csrf_token": csrf}, follow=False)
    assert signed.status_code == 401
    assert dpo_node.archive.ledger.count() == checkpoints  # nothing was signed

    # signing in again opens a new session; the old cookie stays refused
    assert client.sign_in("dpo1").url.endswith("/governance/")
    assert client.get("/governance/ledger", follow=False).status_code == 200
    assert thief().get("/governance/ledger", follow=False).status_code == 302


def test_disabling_an_account_ends_its_open_sessions(dpo_node):
    client = _browser(dpo_node)
    assert client.sign_in("dpo1").url.endswith("/governance/")
    assert client.get("/governance/ledger", follow=False).status_code == 200
    AccountStore(dpo_node.archive.index).disable("dpo1")
    answer = client.get("/governance/ledger", follow=False)
    assert answer.status_code == 302 and "/governance/signin" in answer.headers["Location"]
