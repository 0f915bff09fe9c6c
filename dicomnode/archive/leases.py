"""Claiming due work rows (analysis jobs, deliveries) under a lease.

A row is due when it is queued and its `not_before` has passed, or when it is being worked on
but its lease ran out (its worker died). The claim takes the oldest due row: with
``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several processes never take the same
row, and under SQLite's write lock, which serialises claims.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, and_, or_, select, update


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
    `failed` instead of being claimed again forever."""
    c = table.c
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
