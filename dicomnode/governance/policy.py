"""The governance policy as data: one TOML document per version, validated at load.

A policy names the controller (the hospital), the processing activities with their purpose and
lawful basis, the recipients data may go to, the rules that allow or deny each disclosure, the
de-identification profiles those rules apply, retention rules and what intake does with objects
it may not process. `parse_policy` refuses a policy with unknown codes, a rule that can never
match or a third-party rule without a basis, naming the rule (PolicyError).

When a published version takes effect depends on the change (`notice.py` classifies it): a
widening waits for its notice period (7 days; 30 when material), a narrowing takes effect at
once, and the first version replacing the embedded one takes effect at once when published for
the initial deployment. `policy_in_force` computes the policy in force at a moment: the latest
published non-narrowing version in force (the base), narrowed by every narrowing in force that
was published after it (`narrow`: a request must be allowed by each, the shortest retention
applies). A narrowing is stored as a publication that took effect when it was published.

This module is the model; `policy_parse` reads and validates the TOML, `policy_versions`
computes the versions in force.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

NOTICE = timedelta(days=7)
MATERIAL_NOTICE = timedelta(days=30)
# Joins the versions of a narrowed policy: "2026-1 ∩ 2026-2-brake" (refused in version names).
NARROWED_SEPARATOR = " ∩ "

# Which operations and recipient kinds each activity can ever be asked about.
ACTIVITY_OPERATIONS: dict[str, frozenset[str]] = {
    "intake": frozenset({"admit"}),
    "analysis": frozenset({"analyze"}),
    "return-results": frozenset({"forward"}),
    "hospital-access": frozenset({"find", "move", "get", "qido", "wado", "job-info", "share"}),
    "research-sharing": frozenset({"find", "move", "get", "qido", "wado", "share"}),
    "third-party-provision": frozenset({"find", "move", "get", "qido", "wado", "share"}),
    "subject-access": frozenset({"export"}),
}
ACTIVITY_RECIPIENT_KINDS: dict[str, frozenset[str]] = {
    "intake": frozenset(),
    "analysis": frozenset(),
    "return-results": frozenset({"controller", "processor"}),
    "hospital-access": frozenset({"controller", "processor"}),
    "research-sharing": frozenset({"third-party"}),
    "third-party-provision": frozenset({"third-party"}),
    "subject-access": frozenset(),
}
INTAKE_ACTIONS = ("admit", "hold", "refuse")


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the entry (rule, recipient...) at fault."""


# --- ISO 8601 durations -------------------------------------------------------------------------

_DURATION = re.compile(
    r"P(?:(?P<years>\d+)Y)?(?:(?P<months>\d+)M)?(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+)S)?)?"
)


@dataclass(frozen=True)
class Period:
    """An ISO 8601 duration such as P5Y, P90D or PT12H; years and months are calendar ones."""

    text: str
    years: int = 0
    months: int = 0
    days: int = 0
    seconds: int = 0

    @classmethod
    def parse(cls, text: str) -> Period:
        match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
        if not match or text.strip() in ("P", "PT") or text.strip().endswith("T"):
            raise ValueError(f"not an ISO 8601 duration: {text!r} (use e.g. P5Y, P90D, PT12H)")
        n = {k: int(v or 0) for k, v in match.groupdict().items()}
        return cls(
            text.strip(),
            n["years"],
            n["months"],
            n["weeks"] * 7 + n["days"],
            n["hours"] * 3600 + n["minutes"] * 60 + n["seconds"],
        )

    def after(self, start: datetime) -> datetime:
        """`start` plus this period (the last day of a shorter month when the day overflows)."""
        month_index = start.month - 1 + self.months + 12 * self.years
        year, month = start.year + month_index // 12, month_index % 12 + 1
        day = min(start.day, calendar.monthrange(year, month)[1])
        return start.replace(year=year, month=month, day=day) + timedelta(
            days=self.days, seconds=self.seconds
        )


# --- the policy model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Activity:
    """A processing activity (GDPR Art. 30 record): what the node does, why, on what basis."""

    id: str
    purposes: tuple[str, ...]
    lawful_basis: str
    additional_bases: tuple[str, ...] = ()
    data_categories: tuple[str, ...] = ()
    data_subjects: str = "patients of the controller"
    description: str = ""


@dataclass(frozen=True)
class Recipient:
    """Someone data may be given to. `peers` and `token_subjects` say which DIMSE peers and
    DICOMweb token subjects act as this recipient ("*": every one not named elsewhere)."""

    id: str
    name: str
    kind: str
    country: str = "KR"
    peers: tuple[str, ...] = ()
    token_subjects: tuple[str, ...] = ()
    dicomweb_url: str = ""
    default_purpose: str = "TREAT"
    cross_border_basis: str = ""
    retention: str = ""  # how long the recipient keeps what it gets (PIPA 17(2)4), ISO 8601
    contact: str = ""
    description: str = ""


@dataclass(frozen=True)
class SharingRule:
    """Allows or denies one activity to some recipients, for some operations and purposes."""

    id: str
    effect: str  # "allow" | "deny"
    activity: str
    recipients: tuple[str, ...] = ("*",)  # recipient ids, "kind:<kind>", or "*"
    operations: tuple[str, ...] = ("*",)
    purposes: tuple[str, ...] = ()  # empty: the activity's purposes
    lawful_basis: str = ""  # empty: the activity's
    consent_required: bool = False
    deid_profile: str = ""
    description: str = ""
    # what the basis needs stated (codes.BASIS_CONDITIONS): the other law and article relied
    # on, the 15(1) ground of collection, the Decree 14-2 compatibility judgement (factor ->
    # text) and where the privacy policy publishes its criteria
    legal_provision: str = ""
    collection_basis: str = ""
    compatibility: tuple[tuple[str, str], ...] = ()
    published_in: str = ""


@dataclass(frozen=True)
class DeidProfileRule:
    """A named de-identification profile: PS3.15 Basic profile plus these options."""

    id: str
    options: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class RetentionRule:
    """Keep a data category for `period` from `start`, then destroy it; the highest priority
    rule that matches an object decides (ties: the longest period)."""

    id: str
    category: str
    period: Period
    start: str
    priority: int = 0
    modalities: tuple[str, ...] = ()  # empty: every modality
    legal_basis: str = ""  # a law requires keeping the data this long: erasure is refused
    description: str = ""


@dataclass(frozen=True)
class IntakeRules:
    """What intake does with an object from an unknown sender, of a restricted patient or of a
    patient who refused or withdrew consent to the intake purpose: admit, hold or refuse."""

    unknown_sender: str = "admit"
    restricted_patient: str = "hold"
    refused_processing: str = "refuse"


@dataclass(frozen=True)
class Policy:
    version: str
    effective_from: datetime
    material: bool
    controller: str
    operator: str
    dpo_contact: str
    home_country: str
    summary: str
    activities: tuple[Activity, ...]
    recipients: tuple[Recipient, ...]
    rules: tuple[SharingRule, ...]
    deid_profiles: tuple[DeidProfileRule, ...] = ()
    retention: tuple[RetentionRule, ...] = ()
    intake: IntakeRules = field(default_factory=IntakeRules)
    sha256: str = ""
    # Narrowings in force on top of this (base) version, oldest first; empty for a plain version.
    narrowed_by: tuple[Policy, ...] = ()

    @property
    def parts(self) -> tuple[Policy, ...]:
        """The versions a request must satisfy: this one, then each narrowing of it."""
        if not self.narrowed_by:
            return (self,)
        return (replace(self, narrowed_by=()), *self.narrowed_by)

    @property
    def versions(self) -> tuple[str, ...]:
        """The published versions that make up this policy (one unless narrowed)."""
        return tuple(self.version.split(NARROWED_SEPARATOR))

    def activity(self, activity_id: str) -> Activity | None:
        return next((a for a in self.activities if a.id == activity_id), None)

    def recipient(self, recipient_id: str) -> Recipient | None:
        return next((r for r in self.recipients if r.id == recipient_id), None)

    def deid_profile(self, profile_id: str) -> DeidProfileRule | None:
        """The profile by its id; in a narrowed policy the latest narrowing's comes first."""
        for part in (*reversed(self.narrowed_by), self):
            found = next((p for p in part.deid_profiles if p.id == profile_id), None)
            if found is not None:
                return found
        return None

    def consent_purposes(self, activity_id: str) -> tuple[str, ...]:
        activity = self.activity(activity_id)
        return activity.purposes if activity else ()
