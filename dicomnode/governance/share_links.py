"""Share links for a second opinion (checklist item 42): what a link is and when it opens.
Pure: decided from the link's record and `now`.

A link is a random token of at least 128 bits (32 bytes here), handed out once; only its
SHA-256 is stored. It opens one study, until it expires (at most `MAX_DAYS`) or is revoked.
Opening it does not decide the disclosure: governance still does, for the link's recipient (a
recipient of the policy), and each use is a ledger entry.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta

TOKEN_BYTES = 32  # 256 bits (item 42 asks for >= 128)
MAX_DAYS = 30
DEFAULT_DAYS = 7
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43,64}")  # urlsafe base64 of TOKEN_BYTES


def token_hash(token: str) -> str:
    """What the index keeps of a token."""
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def well_formed(token: str) -> bool:
    """Whether `token` looks like one the node hands out (checked before any lookup)."""
    return bool(_TOKEN.fullmatch(token))


def expiry(created_at: datetime, days: int) -> datetime:
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"a share link lasts 1 to {MAX_DAYS} days")
    return created_at + timedelta(days=days)


def why_closed(
    expires_at: datetime,
    revoked_at: datetime | None,
    link_study: str,
    asked_study: str,
    now: datetime,
) -> str:
    """Why a link does not open `asked_study` at `now` ("" when it does)."""
    if revoked_at is not None:
        return "the link was revoked"
    if now >= expires_at:
        return "the link has expired"
    if asked_study != link_study:
        return "the link is for another study"
    return ""
