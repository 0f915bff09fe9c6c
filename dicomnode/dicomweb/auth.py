"""Bearer-token authentication for DICOMweb (JWT, verified with joserfc, Authlib's JOSE library).

Two sources of keys are trusted:
- the node's own RSA signing key (the nodes' shared key store, handed in by the wiring);
  `issue_token` (and ``dicomnode token create``) signs tokens with it;
- the hospital's OIDC provider, when ``[auth] issuer``, ``jwks_url`` and ``audience`` are set;
  its JWKS is fetched on first use and again when a token names an unknown key id.

Only asymmetric algorithms are accepted (never ``none``, never HMAC). Issuer, audience and
expiry are required claims; scopes come from ``scope`` (space-separated) or ``scp`` (a list).
A token must state its purpose of use (``purpose_of_use``, or IHE IUA's
``extensions.ihe_iua.purpose_of_use``): the services refuse one that states none with 403
(`PurposeError`), as they refuse a missing scope. Tokens the node issues always state one.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey

from dicomnode.config import AuthSettings
from dicomnode.core.model import PatientIdentity
from dicomnode.governance import access_tags, patient_scope

log = logging.getLogger("dicomnode.auth")

SCOPES = (
    "dicomweb.read",
    "dicomweb.write",
    "dicomweb.delete",
    "governance.read",
    "governance.admin",
    "governance.legal",  # reads data retained by law (item 33)
)
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384"]
JWKS_REFRESH_SECONDS = 300  # the provider's key set is re-read this often
JWKS_MIN_REFETCH_SECONDS = 30  # and at most this often when a token names an unknown key
VERIFIED_TOKEN_SECONDS = 60  # a verified token is trusted again for this long (never past exp)
VERIFIED_TOKENS_KEPT = 4096
# The purpose of use a token the node issues states when its caller names none: treatment, the
# hospital's own use (`dicomnode token create` names the one the policy gives the subject).
DEFAULT_PURPOSE = "TREAT"
# What QIDO and WADO need per method: a GET is served to a patient-bound token too (item 40)
READ_OR_PATIENT = f"dicomweb.read|{patient_scope.PATIENT_READ}"
PATIENT_AWARE_SCOPES = {
    "GET": READ_OR_PATIENT,
    "HEAD": READ_OR_PATIENT,
    "POST": "dicomweb.write",
    "DELETE": "dicomweb.delete",
}


class AuthError(Exception):
    """The request carries no usable token (HTTP 401)."""


class ScopeError(Exception):
    """The token is good but lacks the scope the request needs (HTTP 403)."""


class PurposeError(ScopeError):
    """The token is good but states no purpose of use (HTTP 403)."""


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for."""

    subject: str
    issuer: str
    scopes: frozenset[str]
    purpose: str | None = None  # purpose of use the token states (IHE IUA), if any
    patient: PatientIdentity | None = None  # the one patient a patient-bound token reads
    access_tags: frozenset[str] | None = None  # None: not limited by study access tags

    def require(self, scope: str) -> None:
        """ScopeError unless the token has `scope` (``a|b``: either of them)."""
        wanted = scope.split("|")
        if not self.scopes.intersection(wanted):
            raise ScopeError(f"this request needs the {' or '.join(wanted)} scope")

    def require_purpose(self) -> None:
        """PurposeError unless the token states its purpose of use."""
        if not self.purpose:
            raise PurposeError("the bearer token states no purpose_of_use")


def issue_token(
    key: RSAKey,
    settings: AuthSettings,
    subject: str,
    scopes: list[str],
    expires_in: int,
    purpose: str | None = None,
    patient: PatientIdentity | None = None,
) -> str:
    """A token signed by the node's key for `subject` with `scopes`, valid `expires_in` seconds,
    stating `purpose` (DEFAULT_PURPOSE when none is given) as its ``purpose_of_use`` claim;
    bound to `patient`, with the ``patient/*.read`` scope, when one is given."""
    if patient is not None:
        scopes = list(dict.fromkeys([*scopes, patient_scope.PATIENT_READ]))
    allowed = set(SCOPES) | {patient_scope.PATIENT_READ}
    unknown = sorted(set(scopes) - allowed)
    if unknown:
        raise ValueError(f"unknown scopes {unknown}; known: {', '.join(SCOPES)}")
    now = int(time.time())
    claims = {
        "iss": settings.local_issuer,
        "aud": settings.local_audience,
        "sub": subject,
        "scope": " ".join(scopes),
        "iat": now,
        "nbf": now,
        "exp": now + expires_in,
        "jti": uuid.uuid4().hex,
        "purpose_of_use": purpose or DEFAULT_PURPOSE,
    }
    if patient is not None:
        claims["patient"] = {"id": patient.patient_id, "issuer": patient.issuer or ""}
    return jwt.encode({"alg": "RS256", "kid": key.thumbprint()}, claims, key)


class TokenVerifier:
    """Verifies bearer tokens against the node's key and the configured OIDC provider."""

    def __init__(self, settings: AuthSettings, signing_key: RSAKey) -> None:
        self.settings = settings
        self._local = KeySet([RSAKey.import_key(signing_key.as_dict(private=False))])
        self._remote: KeySet | None = None
        self._remote_fetched = 0.0
        self._lock = threading.Lock()
        # token -> (its principal, until when it is trusted without verifying it again): a
        # viewer sends the same token with every request, and its signature check (RSA)
        # costs more than a QIDO search
        self._verified: dict[str, tuple[Principal, float]] = {}

    def _remote_keys(self, refresh: bool) -> KeySet:
        with self._lock:
            age = time.monotonic() - self._remote_fetched
            rotated = refresh and age > JWKS_MIN_REFETCH_SECONDS
            if self._remote is None or rotated or age > JWKS_REFRESH_SECONDS:
                try:
                    with urllib.request.urlopen(self.settings.jwks_url, timeout=10) as response:
                        self._remote = KeySet.import_key_set(json.load(response))
                    self._remote_fetched = time.monotonic()
                except (OSError, ValueError, JoseError) as e:
                    if self._remote is None:
                        raise AuthError(
                            f"the identity provider's keys cannot be fetched: {e}"
                        ) from e
                    log.warning("keeping the cached JWKS: %s", e)
            return self._remote

    def verify(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization: Bearer ...`` header, or AuthError."""
        if not authorization:
            raise AuthError("an Authorization: Bearer token is required")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("the Authorization header must be 'Bearer <token>'")
        token = token.strip()
        known = self._verified.get(token)
        if known is not None and time.time() < known[1]:
            return known[0]
        principal, expires = self._verify_token(token)
        if len(self._verified) >= VERIFIED_TOKENS_KEPT:
            self._verified.clear()
        self._verified[token] = (principal, min(expires, time.time() + VERIFIED_TOKEN_SECONDS))
        return principal

    def _verify_token(self, token: str) -> tuple[Principal, float]:
        """The principal of `token` and when it expires (with the leeway), or AuthError."""
        header, unverified = _unverified_parts(token)
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            raise AuthError(f"token algorithm {_shown(algorithm)} is not accepted")
        issuer = unverified.get("iss")
        if issuer == self.settings.local_issuer:
            keys, audience = self._local, self.settings.local_audience
        elif self.settings.issuer and issuer == self.settings.issuer:
            keys, audience = self._remote_keys(refresh=False), self.settings.audience
        else:
            raise AuthError(f"tokens from issuer {_shown(issuer)} are not accepted")
        try:
            try:
                decoded = jwt.decode(token, keys, algorithms=ALGORITHMS)
            except JoseError:
                if keys is self._local:
                    raise
                decoded = jwt.decode(token, self._remote_keys(refresh=True), algorithms=ALGORITHMS)
            jwt.JWTClaimsRegistry(
                leeway=self.settings.leeway,
                iss={"essential": True, "value": issuer},
                aud={"essential": True, "value": audience},
                exp={"essential": True},
                sub={"essential": True},
            ).validate(decoded.claims)
        except JoseError as e:
            raise AuthError(f"the bearer token is not valid: {e.description or e.error}") from e
        except (ValueError, TypeError, KeyError, RecursionError) as e:  # malformed past the header
            raise AuthError("the bearer token is not a valid JWT") from e
        claims = decoded.claims
        expires = claims["exp"]
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            raise AuthError("the bearer token's exp claim is not a number")
        scopes = frozenset(_scopes(claims))
        try:
            patient = patient_scope.binding(claims, scopes)
            tags = access_tags.from_claims(claims)
        except (patient_scope.PatientClaimError, access_tags.AccessTagError) as e:
            raise AuthError(str(e)) from e
        if patient is not None:  # a patient-bound token reads that patient, and nothing else
            scopes = patient_scope.patient_read_scopes(scopes)
        principal = Principal(
            str(claims["sub"]), issuer, scopes, purpose_of_use(claims), patient, tags
        )
        return principal, float(expires) + self.settings.leeway


def _shown(value: object) -> str:
    """A value from a token as an error message (and the WWW-Authenticate header, latin-1) may
    quote it: its ASCII repr, at most 64 characters."""
    text = ascii(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _unverified_parts(token: str) -> tuple[dict, dict]:
    """The header and claims of a compact JWT before its signature is checked (AuthError unless
    the token has three parts and both are base64url-encoded JSON objects)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("the bearer token is not a JWT")
    try:
        header = json.loads(_b64decode(parts[0]))
        claims = json.loads(_b64decode(parts[1]))
    except (ValueError, RecursionError) as e:  # binascii.Error and UnicodeError are ValueErrors
        raise AuthError("the bearer token is not a JWT") from e
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise AuthError("the bearer token's header and claims must be JSON objects")
    return header, claims


def _scopes(claims: dict) -> list[str]:
    """The scopes a verified token grants: ``scp`` (a list of strings, or one space-separated
    string) or ``scope`` (space-separated); anything else grants none."""
    granted = claims.get("scp") or claims.get("scope") or ""
    if isinstance(granted, str):
        return granted.split()
    if isinstance(granted, list):
        return [scope for scope in granted if isinstance(scope, str)]
    return []


def purpose_of_use(claims: dict) -> str | None:
    """The purpose of use a token states: a plain ``purpose_of_use`` claim ("HRESCH"), or IHE
    IUA's ``extensions.ihe_iua.purpose_of_use`` (a list of codings; the first code counts)."""
    plain = claims.get("purpose_of_use")
    if isinstance(plain, str) and plain:
        return plain
    extensions = claims.get("extensions")
    iua = extensions.get("ihe_iua") if isinstance(extensions, dict) else None
    codings = iua.get("purpose_of_use") if isinstance(iua, dict) else None
    if isinstance(codings, list) and codings and isinstance(codings[0], dict):
        code = codings[0].get("code")
        return str(code) if code else None
    return None


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
