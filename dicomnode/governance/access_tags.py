"""Study access tags (checklist item 41, like dcm4chee's Access Control IDs): pure rules.

A study gets tags at intake from the configured peer that sent it (``[[peers]] intake_tags``)
and from every ``[[access_tag_rules]]`` entry whose conditions the arriving object meets (its
sender, exact values of its attributes; like dcm4chee's storeAccessControlIDRule).
A client with tags (a DIMSE peer's ``access_tags``, or a token's ``access_tags`` claim) sees
only studies carrying at least one of them, on query and retrieve; a study without tags is
invisible to it. A client without tags (the hospital's own) is not restricted by tags.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dicomnode.config.describe import ACCESS_TAG
from dicomnode.config.sections import AccessTagRule
from dicomnode.core.elements import reader_for
from dicomnode.core.enums import Protocol
from dicomnode.core.model import Source


class AccessTagError(ValueError):
    """A tag or a token's tag claim cannot be used."""


def checked(tag: str) -> str:
    """`tag` when it is 1-64 letters, digits, '.', '_' or '-' (starting with a letter or
    digit); AccessTagError otherwise."""
    if not isinstance(tag, str) or not ACCESS_TAG.fullmatch(tag):
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


def rule_tags(rules: Iterable[AccessTagRule], header: Any, source: Source) -> set[str]:
    """The tags of every rule whose conditions the object (its parsed `header`, a pydicom
    Dataset or None) sent by `source` meets: its sender is the rule's (a DIMSE calling AE title,
    or a configured peer's name) and each attribute the rule names has exactly one of its values
    (as text without surrounding spaces; never a pattern)."""
    senders = {source.peer} if source.peer else set()
    if source.protocol is Protocol.DIMSE and source.caller:
        senders.add(source.caller.strip())
    tags = set()
    for rule in rules:
        if rule.sender and rule.sender not in senders:
            continue
        if all(_has_one_of(header, keyword, values) for keyword, values in rule.match):
            tags.add(rule.tag)
    return tags


def _has_one_of(header: Any, keyword: str, values: tuple[str, ...]) -> bool:
    return header is not None and reader_for(keyword).text(header) in values
