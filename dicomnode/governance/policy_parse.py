"""Reading a policy's TOML into the model (`policy.Policy`), refusing what cannot be used.

`parse_policy` refuses unknown tables and keys, unknown codes, a rule that can never match, a
third-party rule without a basis and a basis whose conditions (codes.BASIS_CONDITIONS) the rule
does not state, naming the entry at fault (PolicyError).
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import fields
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from dicomnode.core.times import as_utc
from dicomnode.governance import codes, deid
from dicomnode.governance.policy import (
    ACTIVITY_OPERATIONS,
    ACTIVITY_RECIPIENT_KINDS,
    INTAKE_ACTIONS,
    NARROWED_SEPARATOR,
    Activity,
    DeidProfileRule,
    IntakeRules,
    Period,
    Policy,
    PolicyError,
    Recipient,
    RetentionRule,
    SharingRule,
)


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
    head, version = _parse_head(data)
    intake = _parse_intake(data)
    activities = _parse_activities(data)
    recipients = _parse_recipients(data, str(head.get("home_country", "KR")))
    profiles = _parse_profiles(data)
    rules = _parse_rules(data, activities, recipients, profiles)
    retention = _parse_retention(data)
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


def _parse_head(data: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The [policy] table and its version, after refusing unknown tables and keys."""
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
    return head, version


def _parse_intake(data: dict[str, Any]) -> IntakeRules:
    intake = _build(IntakeRules, data.get("intake", {}), "intake")
    for key in ("unknown_sender", "restricted_patient", "refused_processing"):
        if getattr(intake, key) not in INTAKE_ACTIONS:
            raise PolicyError(f"intake.{key}: must be one of {', '.join(INTAKE_ACTIONS)}")
    return intake


def _parse_activities(data: dict[str, Any]) -> list[Activity]:
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
    return activities


def _parse_recipients(data: dict[str, Any], home: str) -> list[Recipient]:
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
    return recipients


def _parse_profiles(data: dict[str, Any]) -> list[DeidProfileRule]:
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
    return profiles


def _parse_rules(
    data: dict[str, Any],
    activities: list[Activity],
    recipients: list[Recipient],
    profiles: list[DeidProfileRule],
) -> list[SharingRule]:
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
    return rules


def _parse_retention(data: dict[str, Any]) -> list[RetentionRule]:
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
    return retention


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
