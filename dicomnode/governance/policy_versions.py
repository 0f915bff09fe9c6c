"""Which published policy version is in force when, and how versions compare.

A published version takes effect after its notice period (`effective_at`); a narrowing takes
effect at once. `policy_in_force` gives the policy in force at a moment: the latest published
non-narrowing version in force, narrowed by every narrowing in force published after it
(`narrow`). `diff_policies` lists what changed between two versions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import fields, replace
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from dicomnode.core.model import PublishedPolicy
from dicomnode.governance.embedded import EMBEDDED_POLICY_TOML
from dicomnode.governance.policy import (
    MATERIAL_NOTICE,
    NARROWED_SEPARATOR,
    NOTICE,
    Activity,
    IntakeRules,
    Policy,
    Recipient,
    RetentionRule,
    SharingRule,
)
from dicomnode.governance.policy_parse import parse_policy


def embedded_policy() -> Policy:
    """The policy in force when none was published (the company's policy as it stands)."""
    return parse_policy(EMBEDDED_POLICY_TOML)


def notice_period(material: bool) -> timedelta:
    return MATERIAL_NOTICE if material else NOTICE


def effective_at(policy: Policy, published_at: datetime) -> datetime:
    """When a version published at `published_at` takes effect: its declared effective_from,
    but never before its notice period has run from publication."""
    return max(policy.effective_from, published_at + notice_period(policy.material))


def is_narrowing(published: PublishedPolicy) -> bool:
    """Whether a publication (not the first) was a narrowing: it took effect before a notice
    period could have run (a widening's effective_at is at least a notice period later)."""
    return published.effective_at - published.published_at < NOTICE


def policy_in_force(published: Sequence[PublishedPolicy], now: datetime) -> Policy:
    """The policy in force at `now`. Its base is, of the versions in force that are not
    narrowings, the one published last (a later publication supersedes an earlier one even if
    the earlier, with its longer notice, takes effect after it), else the embedded one; every
    narrowing in force published after the base narrows it (`narrow`). The first publication
    is always a base (it replaces the embedded policy)."""
    ordered = sorted(published, key=lambda p: p.published_at)  # stable: the registry's order
    in_force = [(i, p) for i, p in enumerate(ordered) if p.effective_at <= now]
    bases = [(i, p) for i, p in in_force if i == 0 or not is_narrowing(p)]
    base_index, base = max(
        bases, key=lambda b: (b[1].published_at, b[1].effective_at, b[0]), default=(-1, None)
    )
    narrowings = tuple(
        p.source
        for i, p in in_force
        if i > 0
        and is_narrowing(p)
        and (base is None or (p.published_at, i) > (base.published_at, base_index))
    )
    return _narrowed(base.source if base else EMBEDDED_POLICY_TOML, narrowings)


@lru_cache(maxsize=32)
def _narrowed(base_source: str, narrowing_sources: tuple[str, ...]) -> Policy:
    base = parse_policy(base_source)
    if not narrowing_sources:
        return base
    return narrow(base, [parse_policy(s) for s in narrowing_sources])


_SEVERITY = {"admit": 0, "hold": 1, "refuse": 2}


def narrow(base: Policy, narrowings: Sequence[Policy]) -> Policy:
    """`base` narrowed by `narrowings`: a request is allowed only when each allows it
    (decisions.decide), intake does the most severe of their actions, retention keeps for the
    shortest of their periods; the descriptive fields, activities and recipients are the
    base's. Its version names them all, joined by NARROWED_SEPARATOR."""
    parts = (base, *narrowings)
    intake = IntakeRules(
        **{
            f.name: max((getattr(p.intake, f.name) for p in parts), key=_SEVERITY.__getitem__)
            for f in fields(IntakeRules)
        }
    )
    return replace(
        base,
        version=NARROWED_SEPARATOR.join(p.version for p in parts),
        intake=intake,
        sha256=hashlib.sha256(" ".join(p.sha256 for p in parts).encode()).hexdigest(),
        narrowed_by=tuple(narrowings),
    )


def policy_version(published: Sequence[PublishedPolicy], version: str) -> Policy | None:
    """A published (or the embedded) version by its name; a narrowed policy's name
    ("a ∩ b") gives that narrowed policy."""
    if NARROWED_SEPARATOR in version:
        parts = [policy_version(published, v) for v in version.split(NARROWED_SEPARATOR)]
        if any(p is None for p in parts):
            return None
        return narrow(parts[0], parts[1:])  # type: ignore[arg-type]
    if version == embedded_policy().version:
        return embedded_policy()
    match = next((p for p in published if p.version == version), None)
    return parse_policy(match.source) if match else None


def scheduled(published: Sequence[PublishedPolicy], now: datetime) -> list[PublishedPolicy]:
    """Published versions not yet in force at `now`, soonest first."""
    return sorted((p for p in published if p.effective_at > now), key=lambda p: p.effective_at)


def diff_policies(old: Policy, new: Policy) -> list[str]:
    """What changed from `old` to `new`, one line per added, removed or changed entry."""
    lines = []
    for attribute in ("controller", "operator", "dpo_contact", "home_country", "material"):
        a, b = getattr(old, attribute), getattr(new, attribute)
        if a != b:
            lines.append(f"~ policy.{attribute}: {a!r} -> {b!r}")
    if old.intake != new.intake:
        lines.append(f"~ intake: {old.intake} -> {new.intake}")
    for section in ("activities", "recipients", "rules", "deid_profiles", "retention"):
        before = {e.id: e for e in getattr(old, section)}
        after = {e.id: e for e in getattr(new, section)}
        for entry_id in sorted(set(before) | set(after)):
            if entry_id not in after:
                lines.append(f"- {section}[{entry_id}]")
            elif entry_id not in before:
                lines.append(f"+ {section}[{entry_id}]: {_describe(after[entry_id])}")
            elif before[entry_id] != after[entry_id]:
                changes = [
                    f"{f.name}: {getattr(before[entry_id], f.name)!r} -> "
                    f"{getattr(after[entry_id], f.name)!r}"
                    for f in fields(after[entry_id])
                    if getattr(before[entry_id], f.name) != getattr(after[entry_id], f.name)
                ]
                lines.append(f"~ {section}[{entry_id}]: {'; '.join(changes)}")
    return lines


def _describe(entry: Any) -> str:
    if isinstance(entry, SharingRule):
        return (
            f"{entry.effect} {entry.activity} to {', '.join(entry.recipients)} "
            f"({', '.join(entry.operations)}) on {entry.lawful_basis}"
            + (" with consent" if entry.consent_required else "")
        )
    if isinstance(entry, Recipient):
        return f"{entry.kind} {entry.name} ({entry.country})"
    if isinstance(entry, Activity):
        return f"{', '.join(entry.purposes)} on {entry.lawful_basis}"
    if isinstance(entry, RetentionRule):
        return f"{entry.category} {entry.period.text} from {entry.start}"
    return ", ".join(getattr(entry, "options", ()))
