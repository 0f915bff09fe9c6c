"""Moments in time as the node keeps them: timezone-aware, in UTC.

Every datetime the node stores or compares goes through `as_utc`: SQLite hands back naive
values and keeps no offset, so a moment given as 09:00+09:00 must be stored as 00:00 UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime | None) -> datetime | None:
    """`moment` in UTC; a naive one is taken to be UTC already (as the index stores them)."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_moment(text: str) -> datetime:
    """An ISO 8601 date or date-time as an aware UTC moment (no offset: UTC); ValueError."""
    moment = datetime.fromisoformat(text.strip())
    return as_utc(moment)  # type: ignore[return-value]
