"""Break-glass: emergency access for treatment past a patient's restriction or a missing
consent. Pure: decided from the grants and the decision handed in, at `now`.

A grant names one requester (the account or token subject that retrieves), one patient (Patient
ID, and the issuer when known) or one study of theirs, a stated reason, and an expiry (at most
`MAX_MINUTES` after it is opened). While it runs, a query or retrieval by that requester that
governance refused only for that patient's restriction or consent (a rule allowed the activity)
is allowed, with the grant named in the reason; nothing else changes (an unknown recipient, a
denying rule, a de-identification requirement still refuse). Every use is a ledger disclosure
carrying the grant, and every grant waits for the DPO's review.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from dicomnode.core.grants import Grant
from dicomnode.governance.decisions import Decision

DEFAULT_MINUTES = 60
MAX_MINUTES = 12 * 60  # one shift
MIN_REASON = 10  # characters: a reason, not a word
# what a grant lets through: the requester's own queries and retrievals
OPERATIONS = frozenset({"find", "qido", "wado", "get", "move"})


def check_request(reason: str, minutes: int, patient_id: str, requester: str) -> str:
    """What is wrong with a break-glass request ("" when nothing)."""
    if not requester.strip():
        return "break-glass needs a named requester (the account that will retrieve)"
    if not patient_id.strip():
        return "break-glass needs the patient's Patient ID"
    if len(reason.strip()) < MIN_REASON:
        return f"state the emergency: a reason of at least {MIN_REASON} characters"
    if not 1 <= minutes <= MAX_MINUTES:
        return f"a break-glass grant lasts 1 to {MAX_MINUTES} minutes"
    return ""


def expires_at(granted_at: datetime, minutes: int) -> datetime:
    return granted_at + timedelta(minutes=minutes)


def _covers(grant: Grant, patient_id: str, issuers: tuple[str, ...], studies: set[str]) -> bool:
    if grant.patient_id != patient_id:
        return False
    if grant.issuer and issuers and grant.issuer not in issuers:
        return False
    return not grant.study_instance_uid or (bool(studies) and studies <= {grant.study_instance_uid})


def override(
    decision: Decision,
    operation: str,
    requester: str,
    studies: set[str],
    issuers: dict[str, tuple[str, ...]],
    grants: list[Grant],
    now: datetime,
    filterable: bool,
) -> tuple[Decision, tuple[str, ...]]:
    """`decision` with the patients `requester`'s active grants cover let through, and the
    grants used (none: the decision unchanged). Only a refusal for the patients' own reasons
    (restriction, consent: `denied_patients`) is overridden; `filterable` operations (a
    search) may still leave other patients out, a retrieval must then have all covered."""
    if operation not in OPERATIONS or not decision.denied_patients or decision.deid_profile:
        return decision, ()  # not a retrieval, not refused for the patients, or de-identified
    mine = [g for g in grants if g.requester == requester and g.active(now)]
    used: dict[str, Grant] = {}
    for patient_id in decision.denied_patients:
        grant = next(
            (g for g in mine if _covers(g, patient_id, issuers.get(patient_id, ()), studies)),
            None,
        )
        if grant is not None:
            used[patient_id] = grant
    if not used:
        return decision, ()
    left = tuple(p for p in decision.denied_patients if p not in used)
    if left and not filterable:
        return decision, ()
    refs = tuple(dict.fromkeys(g.ref for g in used.values()))
    reasons = "; ".join(dict.fromkeys(g.reason for g in used.values()))
    return (
        dataclasses.replace(
            decision,
            allowed=True,
            reason=f"break-glass ({', '.join(refs)}: {reasons}) past: {decision.reason}",
            denied_patients=left,
        ),
        refs,
    )
