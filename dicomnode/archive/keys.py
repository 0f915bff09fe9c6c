"""The keys and secrets every node shares, in the index (table ``node_secrets``).

- ``signing-key``: an RSA key (PEM) that signs the node's bearer tokens and the ledger's
  checkpoints (compact JWS, RS256);
- ``deid-secret``: 32 random bytes keying the HMAC that remaps UIDs and patient identifiers
  when data is de-identified, so that the same input always gives the same output on every
  node and no one without the secret can confirm a mapping;
- ``session-secret``: 32 random bytes that sign the DPO pages' session cookies.
Each is written once, with INSERT ... ON CONFLICT DO NOTHING, then read back: several nodes
starting together on one database end up with the same secrets. A node upgraded from a version
that kept them in ``data_dir/keys`` (same file names) imports its files on first start, so
tokens, checkpoints and pseudonyms made before stay valid; after that the files are not read.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from dicomnode.archive.schema import node_secrets

log = logging.getLogger("dicomnode.keys")

SIGNING_KEY = "signing-key"
DEID_SECRET = "deid-secret"
SESSION_SECRET = "session-secret"
_LEGACY_FILES = {SIGNING_KEY: "signing-key.pem", DEID_SECRET: "deid-secret"}
_MINIMUM = {DEID_SECRET: 16, SESSION_SECRET: 32}


class KeyStore:
    """The shared secrets of the nodes on one index (`index`: an `Index`); `data_dir` is where
    an earlier version kept them as files (imported once, if the table has none yet)."""

    def __init__(self, index: Any, data_dir: Path | None = None) -> None:
        self.index = index
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._known: dict[str, bytes] = {}

    def signing_key(self) -> RSAKey:
        """The nodes' signing key (RSA 2048, created by the first node that needs it)."""
        pem = self.secret(
            SIGNING_KEY, lambda: RSAKey.generate_key(2048, private=True).as_pem(private=True)
        )
        return RSAKey.import_key(pem)

    def deid_secret(self) -> bytes:
        """The secret that keys de-identification."""
        return self.secret(DEID_SECRET, lambda: secrets.token_bytes(32))

    def session_secret(self) -> bytes:
        """The secret that signs the DPO pages' session cookies (replacing it signs everyone
        out)."""
        return self.secret(SESSION_SECRET, lambda: secrets.token_bytes(32))

    def secret(self, name: str, make: Callable[[], bytes]) -> bytes:
        """The secret `name`: read, or else written once (from ``data_dir/keys`` if an earlier
        version left it there, else made by `make`) and read back, whoever won the write."""
        with self._lock:
            if name in self._known:
                return self._known[name]
        value, legacy = self._read(name), self._legacy(name)
        if value is None:
            origin = "imported" if legacy is not None else "generated"
            if self._insert_once(name, legacy if legacy is not None else make(), origin):
                log.info(
                    "%s the nodes' %s",
                    "imported" if legacy is not None else "created",
                    name,
                    extra={"event": "node_secret", "secret": name, "origin": origin},
                )
            value = self._read(name)
            if value is None:
                raise RuntimeError(f"the secret {name} was written but cannot be read back")
        if legacy is not None and legacy != value:
            log.warning(
                "data_dir/keys holds another %s than the nodes share; the shared one is used",
                name,
                extra={"event": "node_secret", "secret": name, "origin": "ignored-file"},
            )
        minimum = _MINIMUM.get(name, 1)
        if len(value) < minimum:
            raise ValueError(f"the stored {name} holds {len(value)} bytes; it needs {minimum}")
        with self._lock:
            self._known[name] = value
        return value

    def _read(self, name: str) -> bytes | None:
        t = node_secrets
        with self.index.read() as conn:
            value = conn.execute(select(t.c.value).where(t.c.name == name)).scalar()
        return bytes(value) if value is not None else None

    def _legacy(self, name: str) -> bytes | None:
        if self.data_dir is None:
            return None
        path = self.data_dir / "keys" / _LEGACY_FILES.get(name, name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def _insert_once(self, name: str, value: bytes, origin: str) -> bool:
        """INSERT ... ON CONFLICT DO NOTHING; True when this call's row went in."""
        t = node_secrets
        with self.index.write() as conn:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            statement = (
                dialect.insert(t)
                .values(name=name, value=value, origin=origin, created_at=datetime.now(UTC))
                .on_conflict_do_nothing(index_elements=[t.c.name])
            )
            return bool(conn.execute(statement).rowcount)


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


def shared_signing_key(database_url: str, data_dir: Path | None = None) -> RSAKey:
    """The nodes' signing key, read from the (migrated) index at `database_url`: for a command
    or a test outside a running node."""
    from dicomnode.archive.index import Index, create_index_engine

    engine = create_index_engine(database_url)
    index = Index(engine)
    try:
        return KeyStore(index, data_dir).signing_key()
    finally:
        index.close()
        engine.dispose()
