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
"""

from __future__ import annotations

import calendar
import hashlib
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from dicomnode.core.model import PublishedPolicy
from dicomnode.core.times import as_utc
from dicomnode.governance import codes, deid
from dicomnode.governance.embedded import EMBEDDED_POLICY_TOML

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


# --- parsing and validation ---------------------------------------------------------------------


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where}: must be a string or a list of strings, got {value!r}")
    return tuple(value)


def _build(cls: type, data: Any, where: str, **converted: Any) -> Any:
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: must be a table")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r}")
    values = {k: v for k, v in data.items() if k not in converted} | converted
    for f in fields(cls):
        if f.name in values and f.type in ("str", "bool", "int") and f.name not in converted:
            kind = {"str": str, "bool": bool, "int": int}[f.type]
            value = values[f.name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise PolicyError(f"{where}.{f.name}: must be {f.type}, got {value!r}")
    try:
        return cls(**values)
    except TypeError as e:
        raise PolicyError(f"{where}: {e}") from None


def _check_code(code: str, table: dict[str, str], what: str, where: str) -> None:
    if code not in table:
        raise PolicyError(f"{where}: unknown {what} {code!r}")


def _aware(moment: Any, where: str) -> datetime:
    if isinstance(moment, datetime):
        return as_utc(moment)  # type: ignore[return-value]
    if isinstance(moment, date):
        return datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    raise PolicyError(f"{where}: must be a TOML date or date-time, got {moment!r}")


@lru_cache(maxsize=32)
def parse_policy(source: str) -> Policy:
    """The policy in the TOML text `source`; raises PolicyError naming what is wrong. (Cached:
    the version in force is looked up for every decision.)"""
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"not valid TOML: {e}") from None
    return _parse(data, hashlib.sha256(source.encode()).hexdigest())


def _parse(data: dict[str, Any], sha256: str) -> Policy:
    known = {"policy", "intake", "activities", "recipients", "rules", "deid_profiles", "retention"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PolicyError(f"unknown table {unknown[0]!r}")
    head = data.get("policy")
    if not isinstance(head, dict):
        raise PolicyError("[policy]: the table with version and effective_from is missing")
    head_keys = {
        "version",
        "effective_from",
        "material",
        "controller",
        "operator",
        "dpo_contact",
        "home_country",
        "summary",
    }
    if extra := sorted(set(head) - head_keys):
        raise PolicyError(f"policy: unknown key {extra[0]!r}")
    version = head.get("version")
    if not isinstance(version, str) or not version.strip():
        raise PolicyError("policy.version: a non-empty string is required")
    if NARROWED_SEPARATOR.strip() in version:
        raise PolicyError(f"policy.version: {NARROWED_SEPARATOR.strip()!r} is reserved")
    if "effective_from" not in head:
        raise PolicyError("policy.effective_from: a date or date-time is required")

    intake = _build(IntakeRules, data.get("intake", {}), "intake")
    for key in ("unknown_sender", "restricted_patient", "refused_processing"):
        if getattr(intake, key) not in INTAKE_ACTIONS:
            raise PolicyError(f"intake.{key}: must be one of {', '.join(INTAKE_ACTIONS)}")

    activities = []
    for i, raw in enumerate(_tables(data, "activities")):
        where = f"activities[{raw.get('id', i)}]"
        activity = _build(
            Activity,
            raw,
            where,
            purposes=_strings(raw.get("purposes", []), f"{where}.purposes"),
            additional_bases=_strings(raw.get("additional_bases", []), where),
            data_categories=_strings(raw.get("data_categories", []), where),
        )
        _check_code(activity.id, codes.ACTIVITIES, "activity", where)
        if not activity.purposes:
            raise PolicyError(f"{where}.purposes: name at least one purpose of use")
        for purpose in activity.purposes:
            _check_code(purpose, codes.PURPOSES, "purpose of use", where)
        for basis in (activity.lawful_basis, *activity.additional_bases):
            _check_code(basis, codes.LAWFUL_BASES, "lawful basis", where)
        for category in activity.data_categories:
            _check_code(category, codes.DATA_CATEGORIES, "data category", where)
        activities.append(activity)
    _unique([a.id for a in activities], "activities")

    recipients = []
    for i, raw in enumerate(_tables(data, "recipients")):
        where = f"recipients[{raw.get('id', i)}]"
        recipient = _build(
            Recipient,
            raw,
            where,
            peers=_strings(raw.get("peers", []), f"{where}.peers"),
            token_subjects=_strings(raw.get("token_subjects", []), f"{where}.token_subjects"),
        )
        _check_code(recipient.kind, codes.RECIPIENT_KINDS, "recipient kind", where)
        _check_code(recipient.default_purpose, codes.PURPOSES, "purpose of use", where)
        if recipient.retention:
            _period(recipient.retention, f"{where}.retention")
        if recipient.dicomweb_url and not _secure_url(recipient.dicomweb_url):
            raise PolicyError(
                f"{where}.dicomweb_url: must be an https URL (plain http only to this machine: "
                "127.0.0.1, ::1, localhost); shares carry patient data and a bearer token"
            )
        home = str(head.get("home_country", "KR"))
        # PIPA 28-8(1): provision, entrusted processing and storage abroad alike are transfers
        abroad = recipient.kind != "controller" and recipient.country != home
        if abroad and recipient.cross_border_basis not in codes.CROSS_BORDER_BASES:
            raise PolicyError(
                f"{where}: a {recipient.kind} in {recipient.country} needs a cross_border_basis "
                f"(one of {', '.join(sorted(codes.CROSS_BORDER_BASES))}): PIPA 28-8(1) covers "
                "provision, entrusted processing and storage abroad"
            )
        recipients.append(recipient)
    _unique([r.id for r in recipients], "recipients")
    for attribute in ("peers", "token_subjects"):
        named = [n for r in recipients for n in getattr(r, attribute) if n != "*"]
        _unique(named, f"recipients' {attribute}")

    profiles = []
    for i, raw in enumerate(_tables(data, "deid_profiles")):
        where = f"deid_profiles[{raw.get('id', i)}]"
        profile = _build(
            DeidProfileRule,
            raw,
            where,
            options=_strings(raw.get("options", []), f"{where}.options"),
        )
        for option in profile.options:
            _check_code(option, deid.OPTIONS, "de-identification option", where)
        profiles.append(profile)
    _unique([p.id for p in profiles], "deid_profiles")

    by_activity = {a.id: a for a in activities}
    by_recipient = {r.id: r for r in recipients}
    rules = []
    for i, raw in enumerate(_tables(data, "rules")):
        where = f"rules[{raw.get('id', i)}]"
        consent = raw.get("consent", "auto")
        rule = _build(
            SharingRule,
            {k: v for k, v in raw.items() if k != "consent"},
            where,
            recipients=_strings(raw.get("recipients", ["*"]), f"{where}.recipients"),
            operations=_strings(raw.get("operations", ["*"]), f"{where}.operations"),
            purposes=_strings(raw.get("purposes", []), f"{where}.purposes"),
            compatibility=_judgements(raw.get("compatibility", {}), f"{where}.compatibility"),
        )
        rule = _check_rule(rule, consent, where, by_activity, by_recipient, profiles)
        _check_basis_conditions(rule, where, by_activity)
        rules.append(rule)
    _unique([r.id for r in rules], "rules")

    retention = []
    for i, raw in enumerate(_tables(data, "retention")):
        where = f"retention[{raw.get('id', i)}]"
        rule = _build(
            RetentionRule,
            raw,
            where,
            period=_period(raw.get("period", ""), f"{where}.period"),
            modalities=_strings(raw.get("modalities", []), f"{where}.modalities"),
        )
        _check_code(rule.category, codes.DATA_CATEGORIES, "data category", where)
        _check_code(rule.start, codes.RETENTION_STARTS, "retention start", where)
        if rule.legal_basis:
            _check_code(rule.legal_basis, codes.LAWFUL_BASES, "lawful basis", where)
        retention.append(rule)
    _unique([r.id for r in retention], "retention")

    material = head.get("material", False)
    if not isinstance(material, bool):
        raise PolicyError("policy.material: must be true or false")
    return Policy(
        version=version.strip(),
        effective_from=_aware(head["effective_from"], "policy.effective_from"),
        material=material,
        controller=str(head.get("controller", "")),
        operator=str(head.get("operator", "")),
        dpo_contact=str(head.get("dpo_contact", "")),
        home_country=str(head.get("home_country", "KR")),
        summary=str(head.get("summary", "")),
        activities=tuple(activities),
        recipients=tuple(recipients),
        rules=tuple(rules),
        deid_profiles=tuple(profiles),
        retention=tuple(retention),
        intake=intake,
        sha256=sha256,
    )


def _check_rule(
    rule: SharingRule,
    consent: Any,
    where: str,
    activities: dict[str, Activity],
    recipients: dict[str, Recipient],
    profiles: list[DeidProfileRule],
) -> SharingRule:
    """Refuse a rule that names unknown things, can never match, or gives data to a third
    party without a basis; returns it with its consent requirement resolved."""
    if rule.effect not in ("allow", "deny"):
        raise PolicyError(f"{where}.effect: must be allow or deny, got {rule.effect!r}")
    activity = activities.get(rule.activity)
    if activity is None:
        raise PolicyError(f"{where}.activity: {rule.activity!r} is not an activity of the policy")
    if activity.id == "intake":
        raise PolicyError(f"{where}: what enters is decided by the [intake] table, not by rules")
    possible_ops = ACTIVITY_OPERATIONS[activity.id]
    ops = set(rule.operations)
    unknown_ops = ops - set(codes.OPERATIONS) - {"*"}
    if unknown_ops:
        raise PolicyError(f"{where}.operations: unknown operation {sorted(unknown_ops)[0]!r}")
    if "*" not in ops and not ops & possible_ops:
        raise PolicyError(
            f"{where}: can never match: {activity.id} is never asked about "
            f"{', '.join(sorted(ops))} (only {', '.join(sorted(possible_ops))})"
        )
    kinds = ACTIVITY_RECIPIENT_KINDS[activity.id]
    for name in rule.recipients:
        if name == "*":
            continue
        if name.startswith("kind:"):
            kind = name.removeprefix("kind:")
            _check_code(kind, codes.RECIPIENT_KINDS, "recipient kind", where)
            if kinds and kind not in kinds:
                raise PolicyError(f"{where}: can never match: {activity.id} never goes to {kind}")
            continue
        recipient = recipients.get(name)
        if recipient is None:
            raise PolicyError(f"{where}.recipients: {name!r} is not a recipient of the policy")
        if not kinds:
            raise PolicyError(f"{where}: can never match: {activity.id} has no recipients")
        if recipient.kind not in kinds:
            raise PolicyError(
                f"{where}: can never match: recipient {name} is a {recipient.kind}, and "
                f"{activity.id} only goes to {', '.join(sorted(kinds))}"
            )
    for purpose in rule.purposes:
        _check_code(purpose, codes.PURPOSES, "purpose of use", where)
        if purpose not in activity.purposes:
            raise PolicyError(
                f"{where}: can never match: purpose {purpose} is not one of activity "
                f"{activity.id}'s purposes ({', '.join(activity.purposes)})"
            )
    basis = rule.lawful_basis or activity.lawful_basis
    if rule.lawful_basis:
        _check_code(rule.lawful_basis, codes.LAWFUL_BASES, "lawful basis", where)
    third_party = rule.effect == "allow" and activity.id in codes.THIRD_PARTY_ACTIVITIES
    if third_party and rule.lawful_basis not in codes.THIRD_PARTY_BASES:
        raise PolicyError(
            f"{where}: gives data to a third party without a basis for it: set lawful_basis "
            "to one of "
            f"{', '.join(sorted(b for b in codes.THIRD_PARTY_BASES if 'MSA-21-3' not in b))}"
            " (PIPA 17/18)"
        )
    if rule.deid_profile and not any(p.id == rule.deid_profile for p in profiles):
        raise PolicyError(f"{where}.deid_profile: {rule.deid_profile!r} is not a deid_profile")
    if consent not in ("auto", "required", "not-required"):
        raise PolicyError(f"{where}.consent: must be auto, required or not-required")
    needs_consent = basis in codes.CONSENT_BASES
    if consent == "not-required" and needs_consent:
        raise PolicyError(f"{where}.consent: basis {basis} is consent; it cannot be not-required")
    required = needs_consent or consent == "required"
    return SharingRule(**{**rule.__dict__, "lawful_basis": basis, "consent_required": required})


def _judgements(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """A table of factor = "judgement" texts, as sorted pairs."""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise PolicyError(f'{where}: must be a table of texts (factor = "judgement")')
    return tuple(sorted((str(k), v.strip()) for k, v in value.items()))


def _check_basis_conditions(rule: SharingRule, where: str, activities: dict[str, Activity]) -> None:
    """Refuse an allow rule whose lawful basis does not hold as the law states it
    (codes.BASIS_CONDITIONS): what the basis needs must be stated in the rule."""
    if rule.collection_basis:
        _check_code(rule.collection_basis, codes.LAWFUL_BASES, "lawful basis", where)
    conditions = codes.BASIS_CONDITIONS.get(rule.lawful_basis)
    if rule.effect != "allow" or conditions is None:
        return
    law = conditions["law"]
    activity = activities[rule.activity]
    purposes = rule.purposes or activity.purposes

    def refuse(what: str) -> PolicyError:
        return PolicyError(f"{where}: basis {rule.lawful_basis} {what} ({law})")

    if conditions.get("deid_profile") and not rule.deid_profile:
        raise refuse("gives only pseudonymised data: set deid_profile")
    allowed = conditions.get("purposes")
    if isinstance(allowed, tuple) and set(purposes) - set(allowed):
        outside = sorted(set(purposes) - set(allowed))
        raise refuse(
            f"does not cover purpose {', '.join(outside)} (only {', '.join(allowed)}): "
            "narrow the rule's purposes"
        )
    if conditions.get("legal_provision") and not rule.legal_provision.strip():
        raise refuse("rests on another law: name it and its article in legal_provision")
    grounds = conditions.get("collection_bases")
    if isinstance(grounds, tuple) and rule.collection_basis not in grounds:
        raise refuse(
            "needs the ground the data was collected on: set collection_basis to one of "
            + ", ".join(grounds)
        )
    if conditions.get("within_collection_purposes"):
        intake = activities.get("intake")
        collected = set(intake.purposes) if intake else set()
        if set(purposes) - collected:
            raise refuse(
                f"covers only the purposes of collection ({', '.join(sorted(collected))}), "
                f"not {', '.join(sorted(set(purposes) - collected))}"
            )
    factors = conditions.get("compatibility")
    if isinstance(factors, tuple):
        stated = {k for k, v in rule.compatibility if v}
        missing = [f for f in factors if f not in stated]
        if missing:
            raise refuse(
                "needs the compatibility judgement recorded: set compatibility."
                + ", compatibility.".join(missing)
            )
        unknown = sorted({k for k, _ in rule.compatibility} - set(factors))
        if unknown:
            raise PolicyError(f"{where}.compatibility: unknown factor {unknown[0]!r}")
    if conditions.get("published_in") and not rule.published_in.strip():
        raise refuse("needs its criteria published: say where in published_in")


def _secure_url(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost")


def _tables(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PolicyError(f"{key}: must be an array of tables ([[{key}]])")
    return value


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise PolicyError(f"{what}: {name!r} appears twice")
        seen.add(name)


def _period(text: Any, where: str) -> Period:
    try:
        return Period.parse(text)
    except ValueError as e:
        raise PolicyError(f"{where}: {e}") from None


# --- versions in force --------------------------------------------------------------------------


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
