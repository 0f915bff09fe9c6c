"""Local accounts of the DPO's pages (index table ``dpo_accounts``), their open sessions and
the count of failed sign-ins behind the lockout (shared by every node on the index).

Passwords are stored only as scrypt hashes (werkzeug.security); an account is never deleted,
only disabled, so that the names in the logs keep meaning someone. Used when the hospital's
OIDC provider is not configured (or next to it, as the node's own accounts).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from werkzeug.security import check_password_hash, generate_password_hash

from dicomnode.archive import schema
from dicomnode.archive.index import Index
from dicomnode.archive.leases import db_now
from dicomnode.core.errors import InvalidInput, NotFound
from dicomnode.core.times import as_utc

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


def _digest(session_id: object) -> str | None:
    """What the table keeps of a session id: its SHA-256 (a read of the table opens nothing)."""
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        return None
    return hashlib.sha256(session_id.encode()).hexdigest()


class SessionStore:
    """The DPO pages' open sessions, in the index (table ``dpo_sessions``), so that every node
    behind one balancer knows them. A signed cookie is good only while its session is open:
    signing out ends it on every node, so a copied or kept cookie reads nothing afterwards.
    Sessions older than `max_age` seconds (on the database's clock) are closed, and removed as
    new ones open."""

    def __init__(self, index: Index, max_age: float) -> None:
        self.index = index
        self.max_age = max_age

    def open(self, username: str, method: str) -> str:
        """A new session of `username` (signed in by `method`); its id goes in the cookie."""
        session_id = secrets.token_hex(32)
        t = schema.dpo_sessions
        with self.index.write() as conn:
            now = db_now(conn)
            conn.execute(delete(t).where(t.c.opened_at < now - timedelta(seconds=self.max_age)))
            conn.execute(
                t.insert().values(
                    id_sha256=_digest(session_id), username=username, method=method, opened_at=now
                )
            )
        return session_id

    def is_open(self, session_id: object) -> bool:
        """True while the session has not ended nor grown older than max_age."""
        digest = _digest(session_id)
        if digest is None:
            return False
        t = schema.dpo_sessions
        with self.index.read() as conn:
            opened = conn.execute(select(t.c.opened_at).where(t.c.id_sha256 == digest)).scalar()
            return opened is not None and (db_now(conn) - as_utc(opened)).total_seconds() <= (
                self.max_age
            )

    def end(self, session_id: object) -> None:
        """End one session (signing out); an unknown or ended one is left as it is."""
        digest = _digest(session_id)
        if digest is not None:
            t = schema.dpo_sessions
            with self.index.write() as conn:
                conn.execute(delete(t).where(t.c.id_sha256 == digest))

    def end_all(self, username: str, method: str = "local") -> int:
        """End every session of `username` (an account disabled); how many were open."""
        t = schema.dpo_sessions
        with self.index.write() as conn:
            return int(
                conn.execute(
                    delete(t).where(t.c.username == username, t.c.method == method)
                ).rowcount
            )


class SigninThrottle:
    """Failed sign-ins per user name and per client address, counted in the index (table
    ``signin_failures``) so that every node counts the same attempts: after `max_failures` in a
    row for one name (4x that from one address) sign-in is refused for `lockout` seconds,
    whatever the password and whichever node is asked. Counts untouched for a day are removed."""

    def __init__(self, index: Index, max_failures: int, lockout: float) -> None:
        self.index = index
        self.max_failures = max_failures
        self.lockout = lockout

    def _keys(self, username: str, address: str) -> list[tuple[str, int]]:
        return [
            (f"user:{username.lower()}"[:160], self.max_failures),
            (f"addr:{address}"[:160], 4 * self.max_failures),
        ]

    def locked(self, username: str, address: str) -> bool:
        t = schema.signin_failures
        keys = [k for k, _ in self._keys(username, address)]
        with self.index.read() as conn:
            now = db_now(conn)
            until = conn.execute(select(t.c.locked_until).where(t.c.key.in_(keys))).scalars()
            return any(u is not None and as_utc(u) > now for u in until)

    def failed(self, username: str, address: str) -> bool:
        """Count a failure; True when it locks the name or the address."""
        t, locks = schema.signin_failures, False
        with self.index.write() as conn:
            now = db_now(conn)
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            conn.execute(
                delete(t).where(
                    t.c.updated_at < now - timedelta(days=1),
                    or_(t.c.locked_until.is_(None), t.c.locked_until < now),
                )
            )
            for key, limit in self._keys(username, address):
                conn.execute(
                    dialect.insert(t)
                    .values(key=key, failures=0, locked_until=None, updated_at=now)
                    .on_conflict_do_nothing(index_elements=[t.c.key])
                )
                query = select(t.c.failures, t.c.locked_until).where(t.c.key == key)
                if conn.dialect.name == "postgresql":
                    query = query.with_for_update()
                row = conn.execute(query).one()
                count, until = row.failures, as_utc(row.locked_until)
                if until is not None and until <= now:  # a lock that ran out starts again
                    count, until = 0, None
                count += 1
                if count >= limit:
                    until, locks = now + timedelta(seconds=self.lockout), True
                conn.execute(
                    update(t)
                    .where(t.c.key == key)
                    .values(failures=count, locked_until=until, updated_at=now)
                )
        return locks

    def succeeded(self, username: str) -> None:
        t = schema.signin_failures
        with self.index.write() as conn:
            conn.execute(delete(t).where(t.c.key == f"user:{username.lower()}"[:160]))
