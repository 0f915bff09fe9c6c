"""The DPO's and the data subjects' operations: publishing policy versions, recording consent,
restricting processing, signing ledger checkpoints.

Each operation asks governance what it means (which version takes effect when, which queued
work a withdrawal cancels) and has the archive record it with its ledger entry in one
transaction. The CLI and the /governance API both call these, so there is one way to do each.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dicomnode import governance
from dicomnode.archive import Archive
from dicomnode.archive.keys import verify_json
from dicomnode.archive.ledger import Checkpoint
from dicomnode.archive.registry import LegalHold, Restriction
from dicomnode.core.errors import InvalidInput
from dicomnode.core.model import ConsentRecord, PublishedPolicy
from dicomnode.governance import audit_events, codes

log = logging.getLogger("dicomnode.stewardship")

CONSENT_STATES = ("granted", "refused", "withdrawn")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class PolicyStatus:
    """The version in force and the ones scheduled, as the DPO sees them."""

    in_force: governance.Policy
    in_force_since: datetime | None  # None: the embedded policy
    scheduled: list[PublishedPolicy]
    published: list[PublishedPolicy]


class Stewardship:
    def __init__(
        self, archive: Archive, clock: Callable[[], datetime] = utc_now, audit: Any = None
    ) -> None:
        self.archive = archive
        self.clock = clock
        self.audit = audit  # the AuditLog, when the node keeps one

    # --- policy ---------------------------------------------------------------------------

    def publish_policy(self, source: str, by: str) -> tuple[PublishedPolicy, bool]:
        """Publish the policy in `source` now; it takes effect at its effective_from, but not
        before its notice period (7 days, 30 when material) has run. Returns the published
        version and whether it is new (publishing the same version again changes nothing).
        Raises PolicyError for a policy that cannot be used."""
        policy = governance.parse_policy(source)
        now = self.clock()
        published = PublishedPolicy(
            version=policy.version,
            source=source,
            sha256=hashlib.sha256(source.encode()).hexdigest(),
            published_at=now,
            effective_at=governance.effective_at(policy, now),
            material=policy.material,
            published_by=by,
        )
        detail = {
            "version": policy.version,
            "sha256": published.sha256,
            "material": policy.material,
            "notice_days": governance.notice_period(policy.material).days,
            "effective_from": policy.effective_from.isoformat(),
            "effective_at": published.effective_at.isoformat(),
            "published_at": now.isoformat(),
        }
        new = self.archive.registry.publish_policy(published, detail)
        if not new:
            existing = next(
                p for p in self.archive.registry.published_policies() if p.version == policy.version
            )
            return existing, False
        if self.audit is not None and self.audit.source is not None:
            what = (
                f"governance policy {policy.version} published; in force from "
                f"{published.effective_at.isoformat()}"
            )
            self.audit.submit(
                lambda: audit_events.configuration_changed(by, what, now, self.audit.source)
            )
        log.info(
            "policy %s published; in force from %s",
            policy.version,
            published.effective_at.isoformat(),
            extra={"event": "policy", **detail},
        )
        return published, True

    def policy_status(self) -> PolicyStatus:
        now = self.clock()
        published = self.archive.registry.published_policies()
        in_force = governance.policy_in_force(published, now)
        since = next((p.effective_at for p in published if p.version == in_force.version), None)
        return PolicyStatus(in_force, since, governance.scheduled(published, now), published)

    # --- consent --------------------------------------------------------------------------

    def record_consent(
        self,
        patient_id: str,
        purpose: str,
        state: str,
        recorded_by: str,
        issuer: str = "",
        valid_from: datetime | None = None,
        valid_until: datetime | None = None,
        evidence_ref: str = "",
        note: str = "",
    ) -> tuple[ConsentRecord, dict[str, list[int]]]:
        """Record a new consent version for a patient and purpose of use. A refusal or
        withdrawal cancels the patient's queued work for that purpose; a grant releases the
        analysis held for want of it. Returns the stored version and what changed."""
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
        record = ConsentRecord(
            patient_id=patient_id.strip(),
            issuer_of_patient_id=issuer.strip(),
            purpose=purpose,
            version=0,  # the registry numbers it
            state=state,
            valid_from=valid_from,
            valid_until=valid_until,
            evidence_ref=evidence_ref,
            recorded_by=recorded_by,
            recorded_at=now,
            note=note,
        )
        policy = governance.policy_in_force(self.archive.registry.published_policies(), now)
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

    def consent_history(self, patient_id: str) -> list[ConsentRecord]:
        return self.archive.registry.consents(patient_id)

    def consent_in_force(self, patient_id: str) -> dict[str, dict[str, Any]]:
        """Per purpose, the patient's current consent version and whether it grants now."""
        now = self.clock()
        records = tuple(self.archive.registry.consents(patient_id))
        current = {}
        for purpose in sorted({r.purpose for r in records}):
            record = governance.current_consent(records, purpose)
            current[purpose] = record.as_dict() | {  # type: ignore[union-attr]
                "in_force": governance.consent_in_force(record, now)
            }
        return current

    # --- restriction (PIPA 37, GDPR 18) ---------------------------------------------------

    def restrict(self, patient_id: str, by: str, reason: str = "", issuer: str = "") -> Restriction:
        """Stop analysis and every disclosure of the patient's data until lifted."""
        if not patient_id.strip():
            raise InvalidInput("a restriction needs the patient's Patient ID")
        return self.archive.registry.restrict(patient_id, issuer, reason, by, self.clock())

    def unrestrict(self, patient_id: str, by: str) -> Restriction:
        return self.archive.registry.unrestrict(patient_id, by, self.clock())

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
    ) -> LegalHold:
        """Hold a patient's or a study's data: retention and erasure skip it until released."""
        return self.archive.registry.place_hold(
            patient_id, study_uid, owner, reason, case_ref, review_date, by, self.clock()
        )

    def release_hold(self, hold_id: int, by: str) -> LegalHold:
        return self.archive.registry.release_hold(hold_id, by, self.clock())

    # --- ledger checkpoints ---------------------------------------------------------------
    # (signing is the caller's: the node signs with its key, see checkpoint_signed_by)

    def checkpoint(self, sign: Callable[[dict[str, Any]], str]) -> Checkpoint | None:
        """Sign the ledger's head now (None when nothing new was appended since the last)."""
        checkpoint = self.archive.ledger.checkpoint(sign)
        if checkpoint is not None:
            log.info(
                "ledger checkpoint %d signed",
                checkpoint.seq,
                extra={"event": "checkpoint", **checkpoint.payload()},
            )
        return checkpoint


def checkpoint_signed_by(key: Any) -> Callable[[Checkpoint], bool]:
    """A check that a checkpoint's signature is `key`'s and covers its own seq and hash."""

    def signed(checkpoint: Checkpoint) -> bool:
        try:
            payload = verify_json(key, checkpoint.signature)
        except ValueError:
            return False
        return payload.get("seq") == checkpoint.seq and payload.get("hash") == (
            checkpoint.head_hash
        )

    return signed
