"""Claiming due work rows (analysis jobs, deliveries) under a lease, and the leader lease.

A row is due when it is queued and its `not_before` has passed, or when it is being worked on
but its lease ran out (its worker died). The claim takes the oldest due row: with
``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several processes never take the same
row, and under SQLite's write lock, which serialises claims.

The leader lease (`LeaderLease`, table ``leader_leases``) names the one node that runs the
housekeeping that must run once (retention sweeps, ledger checkpoints); its expiry is judged on
the database's clock, never a node's.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, and_, case, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from dicomnode.archive.schema import leader_leases
from dicomnode.core.times import as_utc

log = logging.getLogger("dicomnode.leases")


def claim_due(
    conn: Connection,
    table: Table,
    is_sqlite: bool,
    now: datetime,
    queued: str,
    working: str,
    values: dict[str, Any],
    failed: str = "failed",
) -> Any:
    """Mark the oldest due row of `table` as `working` with `values`; returns it, or None.
    A row whose lease ran out with all its attempts used (its worker died every time) is
    `failed` instead of being claimed again forever. `now` and the moments in `values` (a
    lease's end) are moved onto the database's clock (`on_db_clock`), so that every node
    judges a lease by the same clock."""
    c = table.c
    skew = on_db_clock(conn)
    now = now + skew
    values = {k: v + skew if isinstance(v, datetime) else v for k, v in values.items()}
    lapsed = and_(c.state == working, c.lease_until < now)
    conn.execute(
        update(table)
        .where(lapsed, c.attempts >= c.max_attempts)
        .values(
            state=failed,
            finished_at=now,
            lease_until=None,
            error="its worker stopped before finishing, on every attempt",
        )
    )
    due = or_(and_(c.state == queued, c.not_before <= now), lapsed)
    query = select(c.id).where(due).order_by(c.not_before, c.id).limit(1)
    if not is_sqlite:
        query = query.with_for_update(skip_locked=True)
    row_id = conn.execute(query).scalar()
    if row_id is None:
        return None
    conn.execute(
        update(table).where(c.id == row_id).values(state=working, attempts=c.attempts + 1, **values)
    )
    return conn.execute(select(table).where(c.id == row_id)).one()


def any_due(conn: Connection, table: Table, now: datetime, queued: str, working: str) -> bool:
    """Whether a claim would find anything: a read, so that idle workers polling for work do
    not take the (SQLite) write lock that ingest needs."""
    c = table.c
    now = now + on_db_clock(conn)
    due = or_(
        and_(c.state == queued, c.not_before <= now),
        and_(c.state == working, c.lease_until < now),
    )
    return conn.execute(select(c.id).where(due).limit(1)).first() is not None


def retry_or_fail(
    conn: Connection,
    table: Table,
    row_id: int,
    now: datetime,
    error: str,
    backoff: timedelta,
    queued: str,
    failed: str,
    owner: Any = None,
    **values: Any,
) -> str:
    """Record a failed attempt of a claimed row: queued again after `backoff` x
    2^(attempts-1), or `failed` for good once its attempts are used; returns the new state.
    With `owner` (a condition, see `owned_by`), a row another worker has claimed since is
    left alone and its current state returned."""
    c = table.c
    row = conn.execute(select(c.attempts, c.max_attempts, c.state).where(c.id == row_id)).one()
    if owner is not None and not conn.execute(select(c.id).where(c.id == row_id, owner)).first():
        return str(row.state)
    final = row.attempts >= row.max_attempts
    conn.execute(
        update(table)
        .where(c.id == row_id)
        .values(
            state=failed if final else queued,
            finished_at=now if final else None,
            not_before=now + backoff * (2 ** max(row.attempts - 1, 0)),
            lease_until=None,
            error=error[:4000],
            **values,
        )
    )
    return failed if final else queued


def owned_by(table: Table, worker: str, working: str) -> Any:
    """The condition that a row is still `worker`'s: claimed by it and still being worked on."""
    return and_(table.c.claimed_by == worker, table.c.state == working)


# --- the leader lease -----------------------------------------------------------------------


def on_db_clock(conn: Connection) -> timedelta:
    """How far the database's clock is ahead of this node's: added to a moment the caller
    took from its own clock (or moved ahead of it, as tests do) to judge it on the database's.
    Zero on SQLite, which serves one host."""
    if conn.dialect.name == "sqlite":
        return timedelta(0)
    return db_now(conn) - datetime.now(UTC)


def db_now(conn: Connection) -> datetime:
    """The database's clock (PostgreSQL's ``statement_timestamp()``), so that moments every
    node compares are stamped by one clock; SQLite serves one host, whose clock it is."""
    if conn.dialect.name == "sqlite":
        return datetime.now(UTC)
    return as_utc(conn.execute(select(func.statement_timestamp())).scalar_one())


def acquire(conn: Connection, name: str, holder: str, seconds: float) -> datetime | None:
    """Take or renew the lease `name` for `holder` for `seconds` (on the database's clock):
    granted when nobody holds it, `holder` already does, or the holder let it expire. Returns
    when it expires, or None when another holder has it. One statement (an upsert whose
    update is conditional), so two contenders never both get it."""
    t = leader_leases
    now = db_now(conn)
    expires = now + timedelta(seconds=seconds)
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(t).values(name=name, holder=holder, acquired_at=now, expires_at=expires)
    kept = t.c.holder == insert.excluded.holder
    statement = insert.on_conflict_do_update(
        index_elements=[t.c.name],
        set_={
            "holder": insert.excluded.holder,
            "expires_at": insert.excluded.expires_at,
            "acquired_at": case((kept, t.c.acquired_at), else_=insert.excluded.acquired_at),
        },
        where=or_(kept, t.c.expires_at < now),
    ).returning(t.c.expires_at)
    granted = conn.execute(statement).first()
    return as_utc(granted.expires_at) if granted else None


def release(conn: Connection, name: str, holder: str) -> bool:
    """Give up the lease `name` if `holder` holds it (another contender may take it at once)."""
    t = leader_leases
    gone = conn.execute(delete(t).where(t.c.name == name, t.c.holder == holder)).rowcount
    return bool(gone)


def lease_holder(conn: Connection, name: str) -> str | None:
    """Who holds the lease `name` now (by the database's clock), or None."""
    t = leader_leases
    row = conn.execute(select(t.c.holder, t.c.expires_at).where(t.c.name == name)).first()
    return row.holder if row is not None and as_utc(row.expires_at) > db_now(conn) else None


class LeaderLease:
    """Hold the lease `name` while this process runs: a thread takes it when free and renews
    it every third of `seconds`. `held()` says whether this process may do the work the lease
    guards (with a margin: a renewal late by more than a third of `seconds` counts as lost).
    A holder that stops renewing (its node died or hangs) loses the lease when it expires."""

    def __init__(self, index: Any, name: str, holder: str, seconds: float) -> None:
        self.index = index
        self.name = name
        self.holder = holder
        self.seconds = seconds
        self._held_until = 0.0  # time.monotonic() up to which this process holds the lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def held(self) -> bool:
        return time.monotonic() < self._held_until

    def try_acquire(self) -> bool:
        """Take or renew the lease now; True when this process holds it afterwards."""
        asked = time.monotonic()
        try:
            with self.index.write() as conn:
                granted = acquire(conn, self.name, self.holder, self.seconds)
        except Exception:
            log.exception("the %s lease could not be renewed", self.name)
            granted = None
        was = self.held()
        self._held_until = asked + self.seconds * 2 / 3 if granted else 0.0
        if granted and not was:
            log.info(
                "holding the %s lease",
                self.name,
                extra={"event": "lease", "lease": self.name, "holder": self.holder},
            )
        elif was and not granted:
            log.warning(
                "lost the %s lease",
                self.name,
                extra={"event": "lease", "lease": self.name, "holder": self.holder},
            )
        return granted is not None

    def start(self) -> None:
        self.try_acquire()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            self.try_acquire()

    def stop(self) -> None:
        """Stop renewing and give the lease up, so another node takes it without waiting."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.held():
            self._held_until = 0.0
            try:
                with self.index.write() as conn:
                    release(conn, self.name, self.holder)
            except Exception:
                log.exception("the %s lease could not be released; it expires", self.name)


def holder_name(node_name: str = "") -> str:
    """Who holds a lease: the node's name (its host's name by default), this process and a
    random part, so that two processes (or a restarted one) are never taken for each other."""
    return f"{node_name or socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
