"""Consents as HL7 FHIR R4 Consent resources (checklist items 4 and 5). Pure: JSON in, facts
out, and back.

A node consent version is one patient's decision for one purpose of use. A FHIR Consent is read
as one version per purpose its provision names:

* ``patient.identifier``: the Patient ID (``value``) and its issuer (``system``, kept as is);
* ``status`` with ``provision.type``: active + permit -> granted; active + deny or rejected ->
  refused; inactive -> withdrawn (draft, proposed, entered-in-error are not consents to act on);
* ``provision.purpose`` (v3-ActReason codes such as TREAT, HRESCH): the purposes;
* ``provision.period``: the validity; ``provision.actor`` with role IRCP (information
  recipient): the recipients the consent names (PIPA 17(2)1);
* ``provision.action`` and ``provision.dataPeriod``, and the actors, are kept as they came
  (exported again), not enforced beyond the recipients.

Export writes R4 Consents (scope patient-privacy, or research for research purposes; category
LOINC 59284-0) and names, per activity of the policy, its implicit policy for a patient without
a consent: v3-ActCode OPTIN (consent needed: no consent, no processing) or OPTOUT (processed
unless refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
LOINC = "http://loinc.org"
RECIPIENT_ROLE = "IRCP"
RESEARCH = frozenset({"HRESCH", "CLINTRCH", "BIORCH", "PATRCH"})
MAX_RESOURCES = 10_000  # in one import


@dataclass(frozen=True)
class ImportedConsent:
    """One consent version a FHIR Consent says, and what of its provision is kept as is."""

    patient_id: str
    issuer: str
    purpose: str
    state: str
    valid_from: datetime | None
    valid_until: datetime | None
    evidence_ref: str
    recipients: tuple[str, ...]
    fhir_id: str
    provision: dict[str, Any] = field(default_factory=dict)


class ConsentFormatError(ValueError):
    """A resource that is not a usable FHIR Consent; the message names the field."""


def _moment(value: Any, where: str) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise ConsentFormatError(f"{where}: not a FHIR dateTime: {value!r}") from None
    if moment.tzinfo is None:
        raise ConsentFormatError(f"{where}: a dateTime needs its offset (e.g. Z)")
    return moment


def _codes(concepts: Any, system: str) -> list[str]:
    """The codes of `system` in a list of Codings or CodeableConcepts."""
    found = []
    for item in concepts or []:
        codings = item.get("coding", [item]) if isinstance(item, dict) else []
        found += [c["code"] for c in codings if c.get("system") == system and c.get("code")]
    return found


def _state(status: str, kind: str, where: str) -> str:
    if status == "active":
        return {"permit": "granted", "deny": "refused"}.get(kind) or _bad(
            f"{where}provision.type must be permit or deny, got {kind!r}"
        )
    if status == "rejected":
        return "refused"
    if status == "inactive":
        return "withdrawn"
    return _bad(f"{where}status {status!r} is not a consent to act on (active, rejected, inactive)")


def _bad(message: str) -> str:
    raise ConsentFormatError(message)


def from_fhir(resource: Any, purposes: frozenset[str] | set[str]) -> list[ImportedConsent]:
    """The consent versions one R4 Consent says (one per purpose); ConsentFormatError naming
    the field when it cannot be read, or names a purpose not in `purposes`."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
        raise ConsentFormatError("resourceType must be Consent")
    fhir_id = str(resource.get("id", ""))[:64]
    where = f"Consent/{fhir_id}: " if fhir_id else "Consent: "
    identifier = (resource.get("patient") or {}).get("identifier") or {}
    patient_id = str(identifier.get("value", "")).strip()
    if not patient_id or len(patient_id) > 64:
        raise ConsentFormatError(f"{where}patient.identifier.value (the Patient ID) is needed")
    provision = resource.get("provision") or {}
    if not isinstance(provision, dict):
        raise ConsentFormatError(f"{where}provision must be an object")
    state = _state(str(resource.get("status", "")), str(provision.get("type", "")), where)
    wanted = _codes(provision.get("purpose"), ACT_REASON)
    if not wanted:
        raise ConsentFormatError(f"{where}provision.purpose needs a v3-ActReason code")
    unknown = sorted(set(wanted) - set(purposes))
    if unknown:
        raise ConsentFormatError(f"{where}unknown purpose of use {', '.join(unknown)}")
    period = provision.get("period") or {}
    recipients = tuple(
        str(
            (actor.get("reference") or {}).get("identifier", {}).get("value")
            or (actor.get("reference") or {}).get("display")
            or ""
        ).strip()
        for actor in provision.get("actor") or []
        if RECIPIENT_ROLE in _codes([actor.get("role") or {}], PARTICIPATION)
    )
    source = resource.get("sourceReference") or {}
    evidence = str(
        source.get("reference") or (resource.get("sourceAttachment") or {}).get("url") or ""
    )
    kept = {k: provision[k] for k in ("actor", "action", "dataPeriod") if k in provision}
    return [
        ImportedConsent(
            patient_id=patient_id,
            issuer=str(identifier.get("system", "")).strip(),
            purpose=purpose,
            state=state,
            valid_from=_moment(period.get("start"), f"{where}provision.period.start"),
            valid_until=_moment(period.get("end"), f"{where}provision.period.end"),
            evidence_ref=evidence or (f"fhir:Consent/{fhir_id}" if fhir_id else "fhir:Consent"),
            recipients=tuple(r for r in recipients if r),
            fhir_id=fhir_id,
            provision=kept,
        )
        for purpose in dict.fromkeys(wanted)
    ]


def resources(document: Any) -> list[Any]:
    """The Consents of a bulk file: a Bundle (its entries' resources), one Consent, or a list
    (NDJSON lines parsed by the caller)."""
    if isinstance(document, list):
        found = document
    elif isinstance(document, dict) and document.get("resourceType") == "Bundle":
        found = [e.get("resource") for e in document.get("entry") or [] if isinstance(e, dict)]
    else:
        found = [document]
    if len(found) > MAX_RESOURCES:
        raise ConsentFormatError(f"at most {MAX_RESOURCES} resources in one import")
    return found


_STATUS = {
    "granted": ("active", "permit"),
    "refused": ("rejected", "deny"),
    "withdrawn": ("inactive", "deny"),
}


def to_fhir(consent: Any, provision: dict[str, Any] | None = None) -> dict[str, Any]:
    """One node consent version (a ConsentRecord) as an R4 Consent; `provision`: what an
    import kept (actors, actions, data period), merged back."""
    status, kind = _STATUS[consent.state]
    period = {"start": consent.valid_from.isoformat()}
    if consent.valid_until is not None:
        period["end"] = consent.valid_until.isoformat()
    body: dict[str, Any] = {"type": kind, "period": period}
    body["purpose"] = [{"system": ACT_REASON, "code": consent.purpose}]
    kept = dict(provision or {})
    actors = [
        a
        for a in kept.pop("actor", [])
        if RECIPIENT_ROLE not in _codes([a.get("role") or {}], PARTICIPATION)
    ]
    actors += [
        {
            "role": {"coding": [{"system": PARTICIPATION, "code": RECIPIENT_ROLE}]},
            "reference": {"identifier": {"value": r}, "display": r},
        }
        for r in consent.recipients
    ]
    if actors:
        body["actor"] = actors
    body |= kept
    identifier = {"value": consent.patient_id}
    if consent.issuer_of_patient_id:
        identifier["system"] = consent.issuer_of_patient_id
    scope = "research" if consent.purpose in RESEARCH else "patient-privacy"
    return {
        "resourceType": "Consent",
        "id": f"{consent.patient_id}-{consent.purpose}-v{consent.version}"[:64].replace("^", "-"),
        "meta": {"versionId": str(consent.version)},
        "status": status,
        "scope": {"coding": [{"system": CONSENT_SCOPE, "code": scope}]},
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"identifier": identifier},
        "dateTime": consent.recorded_at.isoformat(),
        "sourceReference": {"reference": consent.evidence_ref} if consent.evidence_ref else None,
        "provision": body,
    }


def implicit_policies(policy: Any) -> dict[str, str]:
    """Per activity of `policy`, its implicit policy for a patient without a consent: OPTIN
    when a rule allowing it needs consent (no consent: refused), OPTOUT when none does."""
    found: dict[str, str] = {}
    for activity in policy.activities:
        rules = [r for r in policy.rules if r.activity == activity.id and r.effect == "allow"]
        needs = any(r.consent_required for r in rules)
        found[activity.id] = "OPTIN" if needs or not rules else "OPTOUT"
    return found


def bundle(entries: list[dict[str, Any]], implicit: dict[str, str]) -> dict[str, Any]:
    """A collection Bundle of Consents, with the implicit policy per activity as an extension
    of the Bundle's meta (v3-ActCode OPTIN / OPTOUT)."""
    clean = [{k: v for k, v in e.items() if v is not None} for e in entries]
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "meta": {
            "tag": [
                {"system": ACT_CODE, "code": code, "display": f"implicit policy of {activity}"}
                for activity, code in sorted(implicit.items())
            ]
        },
        "entry": [{"resource": r} for r in clean],
    }
