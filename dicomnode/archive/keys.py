"""The node's own keys, kept in ``data_dir/keys`` and created on first use.

- ``signing-key.pem``: an RSA key that signs the node's bearer tokens and the ledger's
  checkpoints (compact JWS, RS256);
- ``deid-secret``: 32 random bytes keying the HMAC that remaps UIDs and patient identifiers
  when data is de-identified, so that the same input always gives the same output and no one
  without the secret can confirm a mapping;
- ``session-secret``: 32 random bytes that sign the DPO pages' session cookies.
The files are written 0600, fsynced, and linked into place: two processes starting at once
end up with the same key. Several hosts must share ``data_dir/keys`` (the same signing key
and de-identification secret), or their tokens, checkpoints and pseudonyms differ.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

log = logging.getLogger("dicomnode.keys")


def _create_once(path: Path, content: bytes) -> bool:
    """Write `path` (0600) unless it exists, atomically even against another process doing the
    same: the content is written aside and linked into place; False when another won."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def load_or_create_signing_key(data_dir: Path) -> RSAKey:
    """The node's signing key from ``data_dir/keys/signing-key.pem``, created on first use."""
    path = data_dir / "keys" / "signing-key.pem"
    if not path.exists() and _create_once(
        path, RSAKey.generate_key(2048, private=True).as_pem(private=True)
    ):
        log.info(
            "created the node's signing key", extra={"event": "signing_key", "path": str(path)}
        )
    return RSAKey.import_key(path.read_bytes())


def _load_or_create_secret(path: Path, what: str, event: str, minimum: int) -> bytes:
    """The random secret in `path`, created (32 bytes) by the first process that needs it."""
    if not path.exists() and _create_once(path, secrets.token_bytes(32)):
        log.info(f"created the {what}", extra={"event": event})
    secret = path.read_bytes()
    if len(secret) < minimum:
        raise ValueError(f"{path} holds {len(secret)} bytes; the {what} needs {minimum}")
    return secret


def load_or_create_deid_secret(data_dir: Path) -> bytes:
    """The secret that keys de-identification, from ``data_dir/keys/deid-secret``."""
    path = data_dir / "keys" / "deid-secret"
    return _load_or_create_secret(path, "de-identification secret", "deid_secret", 16)


def load_or_create_session_secret(data_dir: Path) -> bytes:
    """The secret that signs the DPO pages' session cookies, ``data_dir/keys/session-secret``.
    Every process serving one data_dir shares it; deleting it signs everyone out."""
    path = data_dir / "keys" / "session-secret"
    return _load_or_create_secret(path, "session secret", "session_secret", 32)


def sign_json(key: RSAKey, payload: dict[str, Any]) -> str:
    """A compact JWS (RS256) over the canonical JSON of `payload`."""
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return jws.serialize_compact({"alg": "RS256", "kid": key.thumbprint()}, body, key)


def verify_json(key: RSAKey, token: str) -> dict[str, Any]:
    """The payload of a JWS made by `sign_json`; ValueError when the signature is not good."""
    public = RSAKey.import_key(key.as_dict(private=False))
    try:
        return json.loads(jws.deserialize_compact(token, public, algorithms=["RS256"]).payload)
    except (JoseError, ValueError) as e:
        raise ValueError(f"the signature does not verify: {e}") from e
