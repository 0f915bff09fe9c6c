"""The web face's records: governance's registers and the ledger (`Oversight`), the DPO
pages' accounts and sessions, the analysis job table the jobs API lists, the node's signing of
JSON, the audit log sender, and the health check's ping and storage figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicomnode.archive import Archive
from dicomnode.archive.accounts import AccountStore, SessionStore, SigninThrottle
from dicomnode.archive.jobs import JobStore
from dicomnode.archive.keys import KeyStore, sign_json
from dicomnode.core.model import StoredInstance
from dicomnode.records.oversight import Oversight


class Records(Oversight):
    """What the HTTP blueprints read and keep, over one archive."""

    def __init__(self, archive: Archive, audit: Any = None) -> None:
        super().__init__(archive)
        self._audit = audit
        self.accounts = AccountStore(archive.index)  # the DPO pages' local accounts
        self.jobs = JobStore(archive.index)  # listed by the jobs API (through egress)

    @property
    def audit(self) -> Any:
        """The node's audit log (DICOM audit messages, spooled and sent), or None."""
        return self._audit

    def sessions(self, max_age: float) -> SessionStore:
        """The server-side record of the DPO pages' open sessions (every node's)."""
        return SessionStore(self._store.index, max_age)

    def signin_throttle(self, max_failures: int, lockout: float) -> SigninThrottle:
        """Failed sign-ins to the DPO pages, counted on every node."""
        return SigninThrottle(self._store.index, max_failures, lockout)

    def session_secret(self, data_dir: Path) -> bytes:
        """The key that signs the DPO pages' session cookie (the nodes' shared key store;
        an older data directory's key is imported)."""
        return KeyStore(self._store.index, data_dir).session_secret()

    @staticmethod
    def sign(key: Any, payload: dict[str, Any]) -> str:
        """A compact JWS (RS256) of `payload` with the node's `key` (ledger checkpoints)."""
        return sign_json(key, payload)

    def cached(self, instance: StoredInstance, kind: str) -> bytes | None:
        """Data derived from an instance egress handed out (e.g. its WADO metadata), cached in
        the store beside its blob; None when not cached yet."""
        return self._store.cached(instance, kind)

    def cache(self, instance: StoredInstance, kind: str, data: bytes) -> None:
        """Keep `data` derived from `instance` (re-derivable: no durability promised)."""
        self._store.put_cached(instance, kind, data)

    def ping(self) -> None:
        """Raise when the index cannot be reached (the health check)."""
        self._store.ping()

    def storage(self) -> dict[str, int | bool | None]:
        """Used and free space, the quota, and whether new data is refused."""
        return self._store.storage()
