"""Recording consent, restricting processing (PIPA 37, GDPR 18) and legal holds."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from dicomnode import governance
from dicomnode.archive.registry import LegalHold, Restriction
from dicomnode.core.errors import InvalidInput
from dicomnode.core.model import (
    ConsentRecord,
)
from dicomnode.governance import approvals, codes
from dicomnode.stewardship.base import StewardshipBase

log = logging.getLogger("dicomnode.stewardship")

CONSENT_STATES = ("granted", "refused", "withdrawn")


class ConsentOps(StewardshipBase):
    """Consent versions, restrictions and legal holds."""

    def record_consent(
        self,
        patient_id: str,
        purpose: str,
        state: str,
        recorded_by: str,
        issuer: str | None = None,
        valid_from: datetime | None = None,
        valid_until: datetime | None = None,
        evidence_ref: str = "",
        note: str = "",
        recipients: tuple[str, ...] | list[str] = (),
    ) -> tuple[ConsentRecord, dict[str, list[int]]]:
        """Record a new consent version for a patient and purpose of use. A refusal or
        withdrawal cancels the patient's queued work for that purpose; a grant releases the
        analysis held for want of it. Returns the stored version and what changed.

        The patient is a Patient ID within `issuer`. Without an issuer ("" or None) the consent
        is recorded under the one issuer the archive holds the ID under; under several it is
        ambiguous and refused (InvalidInput naming them); when the archive does not hold the
        ID yet, it is recorded without an issuer and counts for the ID under any issuer.
        `recipients` (policy recipient ids, PIPA 17(2)1): the only recipients the consent lets
        data go to; empty: any recipient of the purpose."""
        if not patient_id.strip():
            raise InvalidInput("a consent needs the patient's Patient ID")
        if purpose not in codes.PURPOSES:
            raise InvalidInput(
                f"unknown purpose of use {purpose!r}; use an HL7 code such as "
                + ", ".join(list(codes.PURPOSES)[:8])
            )
        if state not in CONSENT_STATES:
            raise InvalidInput(f"consent state must be one of {', '.join(CONSENT_STATES)}")
        if not recorded_by.strip():
            raise InvalidInput("say who records the consent (recorded_by)")
        now = self.clock()
        valid_from = valid_from or now
        if valid_until is not None and valid_until <= valid_from:
            raise InvalidInput("a consent's period must end after it starts")
        identity = self.archive.identify(patient_id, (issuer or "").strip() or None)
        policy = governance.policy_in_force(self.archive.registry.published_policies(), now)
        named = tuple(dict.fromkeys(str(r).strip() for r in recipients if str(r).strip()))
        unknown = [r for r in named if not any(part.recipient(r) for part in policy.parts)]
        if unknown:
            raise InvalidInput(
                f"recipient {unknown[0]!r} is not a recipient of the policy in force "
                f"({policy.version}): {', '.join(r.id for r in policy.recipients) or 'none'}"
            )
        record = ConsentRecord(
            patient_id=identity.patient_id,
            issuer_of_patient_id=identity.issuer or "",
            purpose=purpose,
            version=0,  # the registry numbers it
            state=state,
            valid_from=valid_from,
            valid_until=valid_until,
            evidence_ref=evidence_ref,
            recorded_by=recorded_by,
            recorded_at=now,
            note=note,
            recipients=named,
        )
        cancel = (
            governance.withdrawal_affects(policy, purpose)
            if state in ("refused", "withdrawn")
            else frozenset()
        )
        stored, changed = self.archive.registry.record_consent(
            record,
            cancel,
            {"policy_version": policy.version, "patient_ids": [record.patient_id]},
        )
        log.info(
            "consent %s recorded",
            stored.ref,
            extra={"event": "consent", "consent": stored.ref, "state": state, **changed},
        )
        return stored, changed

    def consent_history(self, patient_id: str, issuer: str | None = None) -> list[ConsentRecord]:
        """Every consent version of the Patient ID (with `issuer`: those that count for that
        issuer's patient: recorded under it or without an issuer)."""
        return self.archive.registry.consents(patient_id, issuer)

    def consent_in_force(
        self, patient_id: str, issuer: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """Per purpose, the patient's current consent version and whether it grants now (with
        `issuer`: for that issuer's patient)."""
        now = self.clock()
        records = tuple(self.archive.registry.consents(patient_id, issuer))
        current = {}
        for purpose in sorted({r.purpose for r in records}):
            record = governance.current_consent(records, purpose, now, issuer)
            current[purpose] = record.as_dict() | {  # type: ignore[union-attr]
                "in_force": governance.consent_in_force(record, now)
            }
        return current

    # --- restriction (PIPA 37, GDPR 18) ---------------------------------------------------

    def restrict(
        self, patient_id: str, by: str, reason: str = "", issuer: str | None = ""
    ) -> Restriction:
        """Stop analysis and every disclosure of the patient's data until lifted: of the
        Patient ID within `issuer`, or, without one, of the ID under every issuer."""
        if not patient_id.strip():
            raise InvalidInput("a restriction needs the patient's Patient ID")
        return self.archive.registry.restrict(
            patient_id.strip(), (issuer or "").strip(), reason, by, self.clock()
        )

    def unrestrict(self, patient_id: str, by: str, issuer: str | None = None) -> Restriction:
        """Lift the restriction recorded under `issuer` (without it: the only active one)."""
        return self.archive.registry.unrestrict(
            patient_id.strip(), by, self.clock(), None if issuer is None else issuer.strip()
        )

    # --- legal holds ----------------------------------------------------------------------

    def place_hold(
        self,
        by: str,
        owner: str,
        reason: str,
        patient_id: str | None = None,
        study_uid: str | None = None,
        case_ref: str = "",
        review_date: datetime | None = None,
        issuer: str | None = None,
    ) -> LegalHold:
        """Hold a patient's or a study's data: retention and erasure skip it until released. A
        hold on a patient with `issuer` holds that issuer's patient only; without one, the
        Patient ID under every issuer."""
        issuer = issuer.strip() if issuer and issuer.strip() else None
        return self.archive.registry.place_hold(
            patient_id, study_uid, owner, reason, case_ref, review_date, by, self.clock(), issuer
        )

    def release_hold(self, hold_id: int, by: str) -> LegalHold:
        self._four_eyes(approvals.RELEASE_HOLD, {"hold_id": hold_id}, f"release hold-{hold_id}")
        return self.archive.registry.release_hold(hold_id, by, self.clock())
