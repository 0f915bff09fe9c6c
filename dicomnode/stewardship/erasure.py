"""Erasure on a data subject's request (PIPA 36, GDPR 17), deletion on a client's request
(DICOMweb DELETE) and a patient's export context."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from dicomnode import governance
from dicomnode.archive.query import identity_keys
from dicomnode.core.errors import InvalidInput, NotFound, NotPermitted
from dicomnode.core.ledger_events import (
    DeletionRefused,
    ErasureDestruction,
    ErasureRequest,
    RequestedDestruction,
)
from dicomnode.core.model import (
    Level,
    Source,
    StudyFacts,
)
from dicomnode.governance import approvals, audit_events, retention
from dicomnode.stewardship.base import SubjectOutcome
from dicomnode.stewardship.retention import RetentionOps


class ErasureOps(RetentionOps):
    """Erasure and deletion on request: refused under a legal hold or a legally required
    retention, ledgered either way."""

    def erase_subject(self, patient_id: str, by: str, issuer: str | None = None) -> SubjectOutcome:
        """Destroy everything of a patient the node holds (studies, results, held objects,
        queued work), unless a legal hold or a legally required retention applies: then refuse
        with the reason. The patient is one exact identity (Patient ID and issuer, never a
        pattern: `*` erases the patient whose ID is `*`). Consent records and the ledger stay
        (they are the evidence). Either way the request and its outcome are a ledger entry."""
        if not patient_id.strip():
            raise InvalidInput("an erasure needs the patient's Patient ID")
        identity = self.archive.identify(patient_id, issuer)
        patient_id = identity.patient_id
        self._four_eyes(
            approvals.ERASE,
            {"patient_id": patient_id, "issuer": identity.issuer or ""},
            f"erase patient {patient_id} ({identity.issuer or 'no issuer'})",
        )
        now = self.clock()
        registry = self.archive.registry
        policy = governance.policy_in_force(registry.published_policies(), now)
        mine = {
            i.study_instance_uid for i in self.archive.instances_of(identity, include_retained=True)
        }
        facts = [f for f in self._retention_facts(policy) if f.study_instance_uid in mine]
        held = registry.quarantined(patient_id=patient_id)
        holds = {
            h.ref
            for h in registry.holds(active_only=True)
            if h.holds_patient(patient_id, identity.issuer)
        }
        reasons = self._reasons_to_keep(facts, policy, now, holds)
        studies = sorted(f.study_instance_uid for f in facts)
        request = ErasureRequest(
            patient_ids=(patient_id,),
            issuer_of_patient_id=identity.issuer or "",
            study_instance_uids=tuple(studies),
            policy_version=policy.version,
        )
        if reasons:
            refused = self._erasure_refused(request, by, "erasure refused: " + "; ".join(reasons))
            return self._retain_refused(refused, facts, policy, by, now)
        removed = []
        if studies:
            copies = self._recipients_with_copies(set(studies))
            try:
                removed = self.archive.delete(
                    Level.PATIENT,
                    identity_keys(identity),
                    by,
                    "erasure requested by the data subject",
                    ErasureDestruction(
                        recipients_with_copies=tuple(c for s in studies for c in copies.get(s, [])),
                        policy_version=policy.version,
                    ).as_details(),
                    unless_held=True,  # a hold placed since the check above still wins
                )
            except NotPermitted as e:
                return self._erasure_refused(request, by, f"erasure refused: {e}")
            except NotFound:  # gone meanwhile
                removed = []
        cancelled = registry.cancel_work(studies, "the data subject's data was erased", now)
        cancelled |= {
            "records_removed": registry.purge_patient_records(
                patient_id, self.archive.studies_of_others(identity)
            )
        }
        self._discard_held(held, by, "erase")
        changed = {"instances": len(removed), "held_objects": len(held), **cancelled}
        erased = dataclasses.replace(request, changed=changed)
        self.archive.ledger.record(erased.kind, by, "erased", erased.as_details())
        if removed and self.audit is not None and self.audit.source is not None:
            actor = Source("cli", by)
            self.audit.submit(
                lambda: audit_events.deleted(actor, removed, "erasure", now, self.audit.source)
            )
        return SubjectOutcome(
            True, f"erased {len(removed)} instances of {len(studies)} studies", changed
        )

    def _retain_refused(
        self,
        refused: SubjectOutcome,
        facts: list[StudyFacts],
        policy: governance.Policy,
        by: str,
        now: datetime,
    ) -> SubjectOutcome:
        """After an erasure refused because a law requires the data: the studies only that law
        keeps now (their purpose ended with the request) move to the retained store, with
        restricted access, until the legal period ends (PIPA 21(3), item 33)."""
        ground = f"erasure requested on {now:%Y-%m-%d} and refused under a statutory retention"
        retained = []
        for study in facts:
            items = retention.retention_items(study, policy, now)
            legal = retention.retained_by_law(items, ground, now)
            if legal is not None:
                self._retain(legal, by, policy.version)
                retained.append(legal.study_instance_uid)
        if not retained:
            return refused
        return dataclasses.replace(refused, changed={"retained_by_law": retained})

    def _erasure_refused(self, request: ErasureRequest, by: str, reason: str) -> SubjectOutcome:
        refused = dataclasses.replace(request, reason=reason)
        self.archive.ledger.record(refused.kind, by, "refused", refused.as_details())
        return SubjectOutcome(False, reason, {})

    @staticmethod
    def _reasons_to_keep(
        facts: list[StudyFacts], policy: governance.Policy, now: datetime, holds: set[str]
    ) -> list[str]:
        """Why these studies may not be destroyed on request: legal holds (`holds` plus those
        covering the studies) and retention a law requires that has not run out."""
        holds = holds | {ref for f in facts for ref in f.holds}
        reasons = [f"under legal hold {', '.join(sorted(holds))}"] if holds else []
        for facts_of_study in facts:
            for item in retention.retention_items(facts_of_study, policy, now):
                if item.legal_basis and item.expires_at and item.expires_at > now:
                    reasons.append(
                        f"study {item.study_instance_uid} must be kept until "
                        f"{item.expires_at:%Y-%m-%d} under {item.legal_basis} "
                        f"(rule {item.rule_id})"
                    )
        return reasons

    # --- deletion on request (DICOMweb DELETE) ---------------------------------------------

    def delete_on_request(
        self, level: Level, keys: tuple[tuple[str, str], ...], requester: Source, reason: str
    ) -> SubjectOutcome:
        """Destroy a study, series or instance (selected by exact UIDs) because a client asked.
        Governance decides as for erasure: a legal hold or a retention a law requires refuses
        it. Both outcomes are ledger entries; an allowed deletion writes the destruction record
        the retention sweep writes (with the recipients that hold copies). NotFound when
        nothing matches."""
        now = self.clock()
        policy = governance.policy_in_force(self.archive.registry.published_policies(), now)
        doomed = self.archive.find_instances_exactly(keys)
        if not doomed:
            raise NotFound(f"nothing matches {dict(keys)} at {level} level")
        self._four_eyes(
            approvals.DELETE,
            {"level": str(level), "keys": [list(k) for k in keys], "reason": reason},
            f"delete {dict(keys)} at {level} level ({len(doomed)} instances)",
        )
        studies = {d.study_instance_uid for d in doomed}
        facts = [f for f in self._retention_facts(policy) if f.study_instance_uid in studies]
        holds = {ref for f in facts for ref in f.holds}  # by study and by (Patient ID, issuer)
        reasons = self._reasons_to_keep(facts, policy, now, holds)
        refused = DeletionRefused(
            request=f"{requester.protocol} DELETE",
            level=str(level),
            target=dict(keys),
            patient_ids=tuple(sorted({d.patient_id for d in doomed})),
            study_instance_uids=tuple(sorted(studies)),
            policy_version=policy.version,
            address=requester.address,
            reason="",
        )
        if reasons:
            return self._deletion_refused(
                refused, requester, "deletion refused: " + "; ".join(reasons)
            )
        copies = self._recipients_with_copies(studies)
        holding = [c for s in sorted(studies) for c in copies.get(s, [])]
        try:
            removed = self.archive.delete(
                level,
                keys,
                requester.caller,
                reason,
                RequestedDestruction(
                    request=refused.request,
                    policy_version=policy.version,
                    recipients_with_copies=tuple(holding),
                ).as_details(),
                unless_held=True,  # a hold placed since the check above still wins
            )
        except NotPermitted as e:
            return self._deletion_refused(refused, requester, f"deletion refused: {e}")
        if self.audit is not None and self.audit.source is not None:
            self.audit.submit(
                lambda: audit_events.deleted(requester, removed, reason, now, self.audit.source)
            )
        return SubjectOutcome(True, f"deleted {len(removed)} instances", {"instances": removed})

    def _deletion_refused(
        self, refused: DeletionRefused, requester: Source, reason: str
    ) -> SubjectOutcome:
        record = dataclasses.replace(refused, reason=reason)
        self.archive.ledger.record(record.kind, requester.caller, "refused", record.as_details())
        return SubjectOutcome(False, reason, {})

    def subject_context(self, patient_id: str) -> dict[str, Any]:
        """What a patient's export summary says besides the disclosures: consent history,
        restrictions, legal holds and the retention of each study."""
        registry = self.archive.registry
        return {
            "consents": [c.as_dict() for c in registry.consents(patient_id)],
            "restrictions": [
                {
                    "ref": r.ref,
                    "reason": r.reason,
                    "since": r.created_at.isoformat(),
                    "lifted_at": r.lifted_at.isoformat() if r.lifted_at else None,
                }
                for r in registry.restrictions(patient_id)
            ],
            "legal_holds": [h.as_dict() for h in registry.holds() if h.patient_id == patient_id],
            "retention": [
                i.as_dict() for i in self.retention_status() if i.patient_id == patient_id
            ],
        }
