"""Study access tags (checklist item 41, like dcm4chee's Access Control IDs): pure rules.

A study gets tags at intake from the configured peer that sent it (``[[peers]] intake_tags``).
A client with tags (a DIMSE peer's ``access_tags``, or a token's ``access_tags`` claim) sees
only studies carrying at least one of them, on query and retrieve; a study without tags is
invisible to it. A client without tags (the hospital's own) is not restricted by tags.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AccessTagError(ValueError):
    """A tag or a token's tag claim cannot be used."""


def checked(tag: str) -> str:
    """`tag` when it is 1-64 letters, digits, '.', '_' or '-' (starting with a letter or
    digit); AccessTagError otherwise."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise AccessTagError(f"an access tag is 1-64 letters, digits, . _ -: got {tag!r}")
    return tag


def from_claims(claims: Mapping[str, Any]) -> frozenset[str] | None:
    """A verified token's ``access_tags`` claim (a list, or one space-separated string): None
    when absent (not restricted by tags); AccessTagError when it is not usable."""
    claim = claims.get("access_tags")
    if claim is None:
        return None
    items = claim.split() if isinstance(claim, str) else claim
    if not isinstance(items, list) or not items:
        raise AccessTagError("the token's access_tags claim must name at least one tag")
    return frozenset(checked(t) for t in items)


def visible(study_tags: Iterable[str], client_tags: frozenset[str] | None) -> bool:
    """Whether a study carrying `study_tags` may be shown to a client holding `client_tags`."""
    return client_tags is None or not client_tags.isdisjoint(study_tags)
