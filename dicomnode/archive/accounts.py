"""Local accounts of the DPO's pages, in the index table ``dpo_accounts``.

Passwords are stored only as scrypt hashes (werkzeug.security); an account is never deleted,
only disabled, so that the names in the logs keep meaning someone. Used when the hospital's
OIDC provider is not configured (or next to it, as the node's own accounts).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from werkzeug.security import check_password_hash, generate_password_hash

from dicomnode.archive import schema
from dicomnode.archive.index import Index
from dicomnode.core.errors import InvalidInput, NotFound

log = logging.getLogger("dicomnode.accounts")

ROLES = ("dpo", "auditor")
MIN_PASSWORD_LENGTH = 12
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@functools.cache
def _unknown_user_hash() -> str:
    """Checked against when the name is unknown: a wrong name costs as long as a wrong password."""
    return generate_password_hash(secrets.token_hex(16), method="scrypt")


@dataclass(frozen=True)
class Account:
    id: int
    username: str
    display_name: str
    role: str
    created_at: datetime
    disabled_at: datetime | None

    @property
    def active(self) -> bool:
        return self.disabled_at is None


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _account(row: Any) -> Account:
    return Account(
        row.id,
        row.username,
        row.display_name,
        row.role,
        _aware(row.created_at) or row.created_at,
        _aware(row.disabled_at),
    )


def check_password(password: str) -> None:
    """Refuse a password too short to be one (InvalidInput)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")


class AccountStore:
    """Create, list, disable and check the DPO pages' local accounts."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def add(
        self,
        username: str,
        password: str,
        role: str,
        display_name: str = "",
        now: datetime | None = None,
    ) -> Account:
        """A new account; InvalidInput for a bad name, role or password, or a name in use."""
        if not _USERNAME.fullmatch(username):
            raise InvalidInput(
                "a user name is 1-64 letters, digits or . _ @ - and starts with a letter or digit"
            )
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        check_password(password)
        t = schema.dpo_accounts
        try:
            with self.index.write() as conn:
                new_id = conn.execute(
                    t.insert().values(
                        username=username,
                        password_hash=generate_password_hash(password, method="scrypt"),
                        display_name=display_name.strip(),
                        role=role,
                        created_at=now or datetime.now(UTC),
                    )
                ).inserted_primary_key[0]
        except IntegrityError:
            raise InvalidInput(f"there is already an account {username!r}") from None
        log.info(
            "DPO account %s added",
            username,
            extra={"event": "dpo_account", "action": "add", "user": username, "role": role},
        )
        return self.get_by_id(int(new_id))

    def get_by_id(self, account_id: int) -> Account:
        t = schema.dpo_accounts
        with self.index.read() as conn:
            row = conn.execute(select(t).where(t.c.id == account_id)).first()
        if row is None:
            raise NotFound(f"no account {account_id}")
        return _account(row)

    def get(self, username: str) -> Account | None:
        t = schema.dpo_accounts
        with self.index.read() as conn:
            row = conn.execute(select(t).where(t.c.username == username)).first()
        return _account(row) if row else None

    def list(self) -> list[Account]:
        t = schema.dpo_accounts
        with self.index.read() as conn:
            return [_account(r) for r in conn.execute(select(t).order_by(t.c.username))]

    def disable(self, username: str, now: datetime | None = None) -> Account:
        """Disable an account: it can no longer sign in, and its open sessions end."""
        t = schema.dpo_accounts
        with self.index.write() as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.username == username, t.c.disabled_at.is_(None))
                .values(disabled_at=now or datetime.now(UTC))
            ).rowcount
        account = self.get(username)
        if account is None:
            raise NotFound(f"no account {username!r}")
        if changed:
            log.info(
                "DPO account %s disabled",
                username,
                extra={"event": "dpo_account", "action": "disable", "user": username},
            )
        return account

    def authenticate(self, username: str, password: str) -> tuple[Account | None, str]:
        """The account if `password` is its own and it is active, else None and why (for the
        log, never for the person signing in)."""
        t = schema.dpo_accounts
        with self.index.read() as conn:
            row = conn.execute(select(t).where(t.c.username == username)).first()
        if row is None:
            check_password_hash(_unknown_user_hash(), password)
            return None, "unknown user"
        if not check_password_hash(row.password_hash, password):
            return None, "wrong password"
        account = _account(row)
        if not account.active:
            return None, "account disabled"
        return account, ""


_SESSION_ID = re.compile(r"[0-9a-f]{64}")


class SessionStore:
    """The DPO pages' open sessions, one file each in `folder` (``data_dir/sessions``, shared by
    every process serving that data_dir, as the cookie's signing secret is). A signed cookie is
    good only while its session's file is there: signing out removes it, so a copied or kept
    cookie reads nothing afterwards. Files older than `max_age` seconds are removed as new
    sessions open."""

    def __init__(self, folder: Path, max_age: float) -> None:
        self.folder = folder
        self.max_age = max_age

    def _path(self, session_id: object) -> Path | None:
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            return None
        return self.folder / session_id

    def open(self, username: str, method: str) -> str:
        """A new session of `username` (signed in by `method`); its id goes in the cookie."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.prune()
        session_id = secrets.token_hex(32)
        record = json.dumps({"user": username, "method": method, "at": time.time()})
        fd = os.open(self.folder / session_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(record)
        return session_id

    def is_open(self, session_id: object) -> bool:
        """True while the session has not ended nor grown older than max_age."""
        path = self._path(session_id)
        try:
            return path is not None and time.time() - path.stat().st_mtime <= self.max_age
        except OSError:
            return False

    def end(self, session_id: object) -> None:
        """End one session (signing out); an unknown or ended one is left as it is."""
        path = self._path(session_id)
        if path is not None:
            path.unlink(missing_ok=True)

    def end_all(self, username: str, method: str = "local") -> int:
        """End every session of `username` (an account disabled); how many were open."""
        ended = 0
        for path in self._files():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if record.get("user") == username and record.get("method") == method:
                path.unlink(missing_ok=True)
                ended += 1
        return ended

    def prune(self) -> None:
        """Remove the sessions older than max_age."""
        cutoff = time.time() - self.max_age
        for path in self._files():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
            except OSError:
                continue

    def _files(self) -> list[Path]:
        try:
            return [p for p in self.folder.iterdir() if _SESSION_ID.fullmatch(p.name)]
        except OSError:
            return []
