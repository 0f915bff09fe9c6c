"""Pure decisions: ``(request, facts, policy, now) -> Decision``.

A disclosure is allowed only when an allow rule of the policy in force matches it and no deny
rule does (deny beats allow; no matching rule means deny), the patient has not restricted
processing, and, where the rule's basis is consent, each patient's consent for the purpose is
granted and in its period at `now`; an explicit refusal or withdrawal of consent to the purpose
is honoured whatever the rule's basis. Every decision carries its reason, the rule that made it, the
policy version, the lawful basis and the consent versions it relied on, so that the ledger can
say why data left or did not.

A person is a Patient ID within its issuer: a consent recorded under an issuer counts only for
objects of that issuer's patient, one recorded without an issuer for the ID under any issuer
(`PatientFacts.issuers` names the issuers of the objects decided on; every one must pass). A
consent naming recipients (PIPA 17(2)1) lets the data go to those recipients only.

A narrowed policy (a version with narrowings in force on top of it, `policy.narrow`) allows a
request only when each of its parts does; the decision names the narrowed policy's version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from dicomnode.core.model import ConsentRecord, PatientFacts
from dicomnode.governance import codes
from dicomnode.governance.policy import Policy, Recipient, SharingRule

# Operations whose answer can leave some patients out instead of being refused whole.
FILTERABLE_OPERATIONS = frozenset({"find", "qido", "job-info"})


@dataclass(frozen=True)
class Party:
    """Who data would go to, as the services know them: a configured DIMSE peer, a DICOMweb
    token subject, or a recipient named explicitly (a share)."""

    protocol: str  # "dimse", "dicomweb", "cli", "analysis"
    peer: str | None = None
    token_subject: str | None = None
    recipient_id: str | None = None


@dataclass(frozen=True)
class DisclosureRequest:
    """Data asking to leave (or to be processed): which operation, to whom, whose data."""

    operation: str  # one of codes.OPERATIONS
    party: Party
    requester: str  # who asked: AE title, token subject, CLI user
    patient_ids: tuple[str, ...] = ()
    study_instance_uids: tuple[str, ...] = ()
    purpose: str | None = None  # asked-for purpose of use; None: the recipient's default


@dataclass(frozen=True)
class Decision:
    """The answer to one request, with everything the ledger needs to say why."""

    allowed: bool
    reason: str
    rule_id: str
    policy_version: str
    activity: str = ""
    purpose: str = ""
    recipient: str = ""
    recipient_kind: str = ""
    basis: str = ""
    consent_refs: tuple[str, ...] = ()
    deid_profile: str = ""
    denied_patients: tuple[str, ...] = ()  # left out of a filterable answer


@dataclass(frozen=True)
class AdmissionRequest:
    """An object asking to enter: who sent it and whose data it is."""

    protocol: str
    sender: str
    known_sender: bool  # a configured peer, an authenticated client, or the node's own analysis
    patient_id: str
    study_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Admission:
    """What intake does with an arriving object: admit, hold (filed aside) or refuse."""

    action: str
    reason: str
    rule_id: str
    policy_version: str

    @property
    def admitted(self) -> bool:
        return self.action == "admit"


# --- consent --------------------------------------------------------------------------------


def current_consent(
    consents: tuple[ConsentRecord, ...],
    purpose: str,
    now: datetime | None = None,
    issuer: str | None = None,
) -> ConsentRecord | None:
    """The consent version for `purpose` that counts at `now` for the person with `issuer`
    (a version recorded under that issuer or without one; `issuer` None: any version): the
    latest one already started (a renewal recorded ahead of its start does not suspend the one
    in force); when none has started, the latest one, so that its start can be named."""
    matching = [
        c
        for c in consents
        if c.purpose == purpose and (issuer is None or c.issuer_of_patient_id in (issuer, ""))
    ]
    started = [c for c in matching if now is None or c.valid_from <= now] or matching
    return max(started, key=lambda c: (c.recorded_at, c.version), default=None)


def consent_in_force(record: ConsentRecord | None, now: datetime) -> bool:
    """Whether `record` grants consent at `now` (granted, and within its period)."""
    return (
        record is not None
        and record.state == "granted"
        and record.valid_from <= now
        and (record.valid_until is None or now < record.valid_until)
    )


def _consent_problem(record: ConsentRecord | None, purpose: str, now: datetime) -> str:
    if record is None:
        return f"no consent to {purpose} is recorded"
    if record.state != "granted":
        return f"consent to {purpose} was {record.state} ({record.ref})"
    if now < record.valid_from:
        return f"consent to {purpose} starts only on {record.valid_from:%Y-%m-%d} ({record.ref})"
    return f"consent to {purpose} expired on {record.valid_until:%Y-%m-%d} ({record.ref})"


# --- who and what ---------------------------------------------------------------------------


def resolve_recipient(policy: Policy, party: Party) -> Recipient | None:
    """The policy's recipient for `party`: named explicitly, or the one listing its peer or
    token subject by name, else the one listing "*" for them."""
    if party.recipient_id is not None:
        return policy.recipient(party.recipient_id)
    for attribute, value in (("peers", party.peer), ("token_subjects", party.token_subject)):
        if value is None:
            continue
        named = next((r for r in policy.recipients if value in getattr(r, attribute)), None)
        if named is not None:
            return named
        return next((r for r in policy.recipients if "*" in getattr(r, attribute)), None)
    return None


_FIXED_ACTIVITY = {
    "admit": "intake",
    "analyze": "analysis",
    "forward": "return-results",
    "export": "subject-access",
}


def activity_for(operation: str, recipient: Recipient | None, purpose: str) -> str:
    """Which of the node's activities a request is: fixed for processing, returns and exports;
    for queries, retrievals and shares it depends on who receives the data and why."""
    if operation in _FIXED_ACTIVITY:
        return _FIXED_ACTIVITY[operation]
    if recipient is None:
        return ""
    if recipient.kind in ("controller", "processor"):
        return "hospital-access"
    return "research-sharing" if purpose in codes.RESEARCH_PURPOSES else "third-party-provision"


def token_purpose(policy: Policy, subject: str) -> str:
    """The purpose of use the policy gives the DICOMweb client `subject` (what a bearer token
    minted for it states when its issuer names none): its recipient's default purpose, else
    the first purpose of the activity its retrievals are; "" when no recipient lists it."""
    recipient = resolve_recipient(policy, Party("dicomweb", token_subject=subject))
    if recipient is None:
        return ""
    if recipient.default_purpose:
        return recipient.default_purpose
    activity = policy.activity(activity_for("wado", recipient, ""))
    return activity.purposes[0] if activity is not None and activity.purposes else ""


def _rule_matches(
    rule: SharingRule, activity: str, recipient: Recipient | None, operation: str, purpose: str
) -> bool:
    if rule.activity != activity:
        return False
    if "*" not in rule.operations and operation not in rule.operations:
        return False
    if rule.purposes and purpose not in rule.purposes:
        return False
    if "*" in rule.recipients:
        return True
    if recipient is None:
        return False
    return recipient.id in rule.recipients or f"kind:{recipient.kind}" in rule.recipients


# --- the decisions --------------------------------------------------------------------------


def decide(
    request: DisclosureRequest,
    facts: Mapping[str, PatientFacts],
    policy: Policy,
    now: datetime,
) -> Decision:
    """Whether the data in `request` may leave (or be processed), by `policy` at `now`."""
    if policy.narrowed_by:
        return _decide_narrowed(request, facts, policy, now)
    recipient = None
    if request.operation not in ("analyze", "export", "admit"):
        recipient = resolve_recipient(policy, request.party)
    purpose = request.purpose or (recipient.default_purpose if recipient else "")
    activity_id = activity_for(request.operation, recipient, purpose)
    activity = policy.activity(activity_id) if activity_id else None
    if not purpose and activity is not None:
        purpose = activity.purposes[0]

    def deny(reason: str, rule_id: str, **more: object) -> Decision:
        return Decision(
            False,
            reason,
            rule_id,
            policy.version,
            activity=activity_id,
            purpose=purpose,
            recipient=recipient.id if recipient else "",
            recipient_kind=recipient.kind if recipient else "",
            **more,  # type: ignore[arg-type]
        )

    if request.operation not in codes.OPERATIONS:
        return deny(f"unknown operation {request.operation!r}", "default-deny")
    if activity_id == "" or (request.operation == "forward" and recipient is None):
        who = request.party.recipient_id or request.party.peer or request.party.token_subject
        return deny(
            f"{who or 'the requester'} is not a recipient of the policy", "unknown-recipient"
        )
    if activity is None:
        return deny(f"the policy declares no {activity_id} activity", "default-deny")
    if purpose not in activity.purposes:
        return deny(
            f"purpose {purpose} is not a purpose of {activity_id} ({', '.join(activity.purposes)})",
            "purpose-mismatch",
        )
    matching = [
        r
        for r in policy.rules
        if _rule_matches(r, activity_id, recipient, request.operation, purpose)
    ]
    denial = next((r for r in matching if r.effect == "deny"), None)
    if denial is not None:
        return deny(
            denial.description or f"rule {denial.id} denies {activity_id}",
            denial.id,
            basis=denial.lawful_basis,
        )
    rule = next((r for r in matching if r.effect == "allow"), None)
    if rule is None:
        to = f" to {recipient.id}" if recipient else ""
        return deny(f"no rule allows {activity_id}{to} for {purpose}", "default-deny")
    return _decide_by_rule(request, facts, policy, now, rule, recipient, activity_id, purpose)


def _decide_by_rule(
    request: DisclosureRequest,
    facts: Mapping[str, PatientFacts],
    policy: Policy,
    now: datetime,
    rule: SharingRule,
    recipient: Recipient | None,
    activity_id: str,
    purpose: str,
) -> Decision:
    """The decision once the allow `rule` matched: each patient's restriction and consent, and
    whether the rule's de-identification can be applied to the operation."""
    refused, consent_refs = _patients_refused(
        request, facts, now, rule, recipient, activity_id, purpose
    )
    allowed_details = {
        "activity": activity_id,
        "purpose": purpose,
        "recipient": recipient.id if recipient else "",
        "recipient_kind": recipient.kind if recipient else "",
        "basis": rule.lawful_basis,
        "deid_profile": rule.deid_profile,
    }
    if refused and request.operation not in FILTERABLE_OPERATIONS:  # a search leaves them out
        first = next(iter(refused.values()))
        more = f" (and {len(refused) - 1} more patients)" if len(refused) > 1 else ""
        return Decision(
            False,
            first + more,
            rule.id,
            policy.version,
            consent_refs=tuple(consent_refs),
            denied_patients=tuple(sorted(refused)),
            **allowed_details,  # type: ignore[arg-type]
        )
    if rule.deid_profile and request.operation != "share":
        # Only a share de-identifies: a query answer or a retrieval would leave identified.
        return Decision(
            False,
            f"rule {rule.id} allows {activity_id} only de-identified ({rule.deid_profile}), "
            "which only a share applies",
            rule.id,
            policy.version,
            consent_refs=tuple(consent_refs),
            **allowed_details,  # type: ignore[arg-type]
        )
    reason = rule.description or f"rule {rule.id} allows {activity_id}"
    if refused:
        kept = len(request.patient_ids) - len(refused)
        reason += f"; {len(refused)} patients left out ({kept} shown): " + "; ".join(
            refused.values()
        )
    return Decision(
        True,
        reason,
        rule.id,
        policy.version,
        consent_refs=tuple(consent_refs),
        denied_patients=tuple(sorted(refused)),
        **allowed_details,  # type: ignore[arg-type]
    )


def _patients_refused(
    request: DisclosureRequest,
    facts: Mapping[str, PatientFacts],
    now: datetime,
    rule: SharingRule,
    recipient: Recipient | None,
    activity_id: str,
    purpose: str,
) -> tuple[dict[str, str], list[str]]:
    """The patients of `request` whose restriction or consent stops the data (patient ID ->
    why), and the consent versions relied on for the others."""
    refused: dict[str, str] = {}
    consent_refs: list[str] = []
    for patient_id in request.patient_ids:
        patient = facts.get(patient_id, PatientFacts(patient_id))
        if patient.restricted and activity_id != "subject-access":
            refused[patient_id] = f"patient {patient_id} restricted processing"
            if patient.restriction_ref:
                refused[patient_id] += f" ({patient.restriction_ref})"
            continue
        problem, refs = _consent_of_each(
            patient, purpose, now, rule, recipient, activity_id == "subject-access"
        )
        if problem:
            refused[patient_id] = problem
            continue
        consent_refs += refs
    return refused, consent_refs


def _consent_of_each(
    patient: PatientFacts,
    purpose: str,
    now: datetime,
    rule: SharingRule,
    recipient: Recipient | None,
    own_data: bool,
) -> tuple[str, list[str]]:
    """Whether the consent of every person the decision is about (one per issuer of the
    Patient ID; one of unknown issuer when none is known) lets the data go: an explicit
    refusal or withdrawal stops it whatever the rule's basis; a consent-based rule needs a
    grant in force that names the recipient, when it names recipients (PIPA 17(2)1). Returns
    the problem ("" when none) and the consent versions relied on."""
    refs: list[str] = []
    several = len(patient.issuers) > 1
    for issuer in patient.issuers or (None,):
        who = patient.patient_id
        if several or issuer:
            who += f" (issuer {issuer or 'none'})"
        record = current_consent(patient.consents, purpose, now, issuer)
        if not own_data and record is not None and record.state in ("refused", "withdrawn"):
            # An explicit "no" is honoured whatever the rule's basis.
            return f"patient {who}: consent to {purpose} was {record.state} ({record.ref})", []
        if not rule.consent_required:
            continue
        if not consent_in_force(record, now):
            return f"patient {who}: {_consent_problem(record, purpose, now)}", []
        assert record is not None
        if recipient is not None and record.recipients and recipient.id not in record.recipients:
            return (
                f"patient {who}: consent to {purpose} ({record.ref}) names its recipients "
                f"({', '.join(record.recipients)}), not {recipient.id}",
                [],
            )
        refs.append(record.ref)
    return "", list(dict.fromkeys(refs))


def _decide_narrowed(
    request: DisclosureRequest,
    facts: Mapping[str, PatientFacts],
    policy: Policy,
    now: datetime,
) -> Decision:
    """A narrowed policy's decision: the first refusal of its parts (base first), else the
    base's allowance with every part's left-out patients and consent versions, and the
    de-identification profile of the latest part that names one."""
    decisions = [decide(request, facts, part, now) for part in policy.parts]
    refusal = next((d for d in decisions if not d.allowed), None)
    if refusal is not None:
        return replace(refusal, policy_version=policy.version)
    base = decisions[0]
    reason = base.reason
    left_out = set(base.denied_patients)
    for part, decision in zip(policy.narrowed_by, decisions[1:], strict=True):
        if set(decision.denied_patients) - left_out:
            reason += f"; narrowed by {part.version}: {decision.reason}"
            left_out |= set(decision.denied_patients)
    return replace(
        base,
        reason=reason,
        policy_version=policy.version,
        denied_patients=tuple(sorted(left_out)),
        consent_refs=tuple(dict.fromkeys(r for d in decisions for r in d.consent_refs)),
        deid_profile=next((d.deid_profile for d in reversed(decisions) if d.deid_profile), ""),
    )


_SEVERITY = {"admit": 0, "hold": 1, "refuse": 2}


def admit(
    request: AdmissionRequest, facts: PatientFacts, policy: Policy, now: datetime
) -> Admission:
    """Whether an arriving object is filed (admit), filed aside until someone decides (hold),
    or refused, by the policy's [intake] rules; the most severe applicable rule wins (in a
    narrowed policy, over all its parts)."""
    if policy.narrowed_by:
        answers = [admit(request, facts, part, now) for part in policy.parts]
        worst = max(answers, key=lambda a: _SEVERITY[a.action])  # the first of equals: base
        return replace(worst, policy_version=policy.version)
    if request.protocol == "analysis":  # the node's own results of admitted data
        return Admission(
            "admit", "a result of the node's own analysis", "intake.own", policy.version
        )
    candidates = [("admit", "admitted on the intake activity's basis", "intake.admit")]
    if not request.known_sender:
        candidates.append(
            (
                policy.intake.unknown_sender,
                f"{request.sender or 'the sender'} is not a known peer",
                "intake.unknown_sender",
            )
        )
    if facts.restricted:
        candidates.append(
            (
                policy.intake.restricted_patient,
                f"patient {request.patient_id} restricted processing",
                "intake.restricted_patient",
            )
        )
    intake = policy.activity("intake")
    for purpose, issuer in (
        (purpose, issuer)
        for purpose in (intake.purposes if intake else ())
        for issuer in facts.issuers or (None,)
    ):
        record = current_consent(facts.consents, purpose, now, issuer)
        if record is not None and record.state in ("refused", "withdrawn"):
            candidates.append(
                (
                    policy.intake.refused_processing,
                    f"patient {request.patient_id}: consent to {purpose} was {record.state} "
                    f"({record.ref})",
                    "intake.refused_processing",
                )
            )
    action, reason, rule_id = max(candidates, key=lambda c: _SEVERITY[c[0]])
    return Admission(action, reason, rule_id, policy.version)


def withdrawal_affects(policy: Policy, purpose: str) -> frozenset[str]:
    """The activities whose queued work a withdrawn or refused consent to `purpose` cancels:
    every activity carried out for that purpose (an explicit "no" is honoured whatever the
    activity's basis)."""
    return frozenset(
        a.id for part in policy.parts for a in part.activities if purpose in a.purposes
    )
