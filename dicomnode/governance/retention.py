"""Retention decisions: when each study's data expires, by which rule, and what the sweep does.

For every study and data category (received images, analysis results) the highest-priority
retention rule of the policy that applies decides the expiry (ties: the longest period; a rule
whose start is not known for the study does not apply). Analysis results follow their source:
they never outlive the images they were derived from. A legal hold on the patient or the study
keeps everything, whatever expired. Pure: the caller gathers the facts and passes the time.
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from dicomnode.core.model import StudyFacts
from dicomnode.governance.policy import Period, Policy, RetentionRule

DESTROY, KEEP, KEEP_HOLD = "destroy", "keep", "keep-hold"
# Records of the "logs" category (they record access to patients' data) are kept at least this
# many years, whatever the policy's rule says (PIPA safety standard: access records of
# sensitive data, two years). Not configurable.
LOGS_MINIMUM_YEARS = 2


def logs_purge_cutoff(period: Period, now: datetime) -> datetime:
    """Records finished before this time may be purged at `now` under a "logs" rule of `period`:
    `period` before `now`, and never less than LOGS_MINIMUM_YEARS (calendar years) before."""
    by_rule = now - (period.after(now) - now)
    year = now.year - LOGS_MINIMUM_YEARS
    floor = now.replace(year=year, day=min(now.day, calendar.monthrange(year, now.month)[1]))
    return min(by_rule, floor)


@dataclass(frozen=True)
class RetentionItem:
    """One study's data of one category, and what retention does with it at `now`."""

    study_instance_uid: str
    patient_id: str
    category: str  # received-images | analysis-results
    instances: int
    rule_id: str  # "" when no rule applies
    expires_at: datetime | None
    action: str  # destroy | keep | keep-hold
    reason: str
    legal_basis: str = ""  # set when a law requires keeping the data (erasure is refused)
    held: bool = False  # objects intake filed aside (not in the archive proper)

    def as_dict(self) -> dict[str, object]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["expires_at"] = self.expires_at.isoformat() if self.expires_at else None
        return data


def _start(rule: RetentionRule, facts: StudyFacts, received_at: datetime | None) -> datetime | None:
    return {
        "received": received_at,
        "study-date": facts.study_date or received_at,  # no StudyDate: from receipt
        "analysis-done": facts.analysis_done_at,
        "consent-withdrawn": facts.consent_withdrawn_at,
    }[rule.start]


def _applicable(
    rules: Sequence[RetentionRule], category: str, facts: StudyFacts, received_at: datetime | None
) -> tuple[RetentionRule, datetime] | None:
    """The deciding rule of `category` and its expiry for this study, or None."""
    candidates = []
    for rule in rules:
        if rule.category != category:
            continue
        if rule.modalities and not set(rule.modalities) & facts.modalities:
            continue
        start = _start(rule, facts, received_at)
        if start is None:
            continue
        candidates.append((rule.priority, rule.period.after(start), rule))
    if not candidates:
        return None
    priority, expires, rule = max(candidates, key=lambda c: (c[0], c[1]))
    # A period the law requires is a minimum, whatever rule decides: the longest one applies.
    legal = [c for c in candidates if c[2].legal_basis]
    if legal:
        _, legal_expires, legal_rule = max(legal, key=lambda c: c[1])
        if legal_expires > expires:
            return legal_rule, legal_expires
    return rule, expires


def retention_items(facts: StudyFacts, policy: Policy, now: datetime) -> list[RetentionItem]:
    """What retention does with a study's images and results at `now`; by a narrowed
    policy, each category's earliest expiry of its parts (keeping is never longer)."""
    if policy.narrowed_by:
        per_part = [retention_items(facts, part, now) for part in policy.parts]
        return [
            min(same, key=lambda i: (i.expires_at is None, i.expires_at or now))
            for same in zip(*per_part, strict=True)
        ]
    items = []
    images = _applicable(policy.retention, "received-images", facts, facts.images_received_at)
    results = _applicable(
        policy.retention,
        "analysis-results",
        facts,
        facts.results_received_at or facts.images_received_at,
    )
    if results is None and images is not None:
        results = images  # results follow their source
    elif results is not None and images is not None and images[1] < results[1]:
        results = images  # ...and never outlive it
    for category, count, found in (
        ("received-images", facts.images, images),
        ("analysis-results", facts.results, results),
    ):
        if count == 0:
            continue
        if found is None:
            items.append(
                RetentionItem(
                    facts.study_instance_uid,
                    facts.patient_id,
                    category,
                    count,
                    "",
                    None,
                    KEEP,
                    "no retention rule of the policy applies",
                )
            )
            continue
        rule, expires = found
        basis = rule.legal_basis
        if expires > now:
            action, reason = KEEP, f"kept until {expires:%Y-%m-%d %H:%M} by rule {rule.id}"
        elif facts.holds:
            action = KEEP_HOLD
            reason = (
                f"expired {expires:%Y-%m-%d} by rule {rule.id}, kept under legal hold "
                + ", ".join(facts.holds)
            )
        else:
            action = DESTROY
            reason = (
                f"rule {rule.id}: {rule.period.text} from {rule.start} ran out "
                f"{expires:%Y-%m-%d %H:%M}"
            )
        items.append(
            RetentionItem(
                facts.study_instance_uid,
                facts.patient_id,
                category,
                count,
                rule.id,
                expires,
                action,
                reason,
                basis,
            )
        )
    return items


# --- retained by law (PIPA 21(3), checklist item 33) -----------------------------------------


@dataclass(frozen=True)
class LegalRetention:
    """A study whose purpose has ended and which only a law keeps: it is stored apart, with
    restricted access, until `until`, then destroyed like any study."""

    study_instance_uid: str
    patient_id: str
    legal_basis: str
    rule_id: str
    until: datetime
    ground: str  # why the purpose ended

    def as_dict(self) -> dict[str, object]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["until"] = self.until.isoformat()
        return data


def purpose_ended(
    consent_withdrawn_at: datetime | None, consent_ended_at: datetime | None, now: datetime
) -> str:
    """Why a study's purpose has ended at `now`, from its patient's consent to the intake
    purpose: withdrawn or refused, or its period over; "" while it has not."""
    if consent_withdrawn_at is not None and consent_withdrawn_at <= now:
        return f"consent withdrawn on {consent_withdrawn_at:%Y-%m-%d}"
    if consent_ended_at is not None and consent_ended_at <= now:
        return f"the consented period ended on {consent_ended_at:%Y-%m-%d}"
    return ""


def retained_by_law(
    items: Sequence[RetentionItem], ground: str, now: datetime
) -> LegalRetention | None:
    """When the study's purpose has ended (`ground` says why; "" when it has not), the legal
    retention that alone keeps its received images past `now`: the study is then retained by
    law. None when its purpose has not ended or no law keeps it (it is destroyed as usual)."""
    if not ground:
        return None
    for item in items:
        if (
            item.category == "received-images"
            and not item.held
            and item.legal_basis
            and item.action == KEEP
            and item.expires_at is not None
            and item.expires_at > now
        ):
            return LegalRetention(
                item.study_instance_uid,
                item.patient_id,
                item.legal_basis,
                item.rule_id,
                item.expires_at,
                ground,
            )
    return None
