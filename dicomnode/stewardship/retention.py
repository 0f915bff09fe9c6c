"""Retention: what expires when, and the sweep that destroys it with its ledger entries."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dicomnode import governance
from dicomnode.archive.ledger_views import LedgerViews
from dicomnode.archive.retained import RetainedStore
from dicomnode.core.errors import NotFound, NotPermitted
from dicomnode.core.ledger_events import (
    QuarantineDestroyed,
    RecordsPurged,
    RetentionDestruction,
    RetentionSkipped,
)
from dicomnode.core.model import (
    ConsentRecord,
    Level,
    Source,
    StudyFacts,
)
from dicomnode.governance import audit_events, retention
from dicomnode.governance.retention import LegalRetention, RetentionItem
from dicomnode.stewardship.base import StewardshipBase
from dicomnode.stewardship.pseudonymised import purge_pseudonymised_records

log = logging.getLogger("dicomnode.stewardship")


@dataclass(frozen=True)
class SweepReport:
    """What a retention sweep found and did (or, in a dry run, would do)."""

    at: datetime
    dry_run: bool
    items: list[RetentionItem]  # every study and category considered
    destroyed: list[RetentionItem]  # (would be) destroyed
    skipped: list[RetentionItem]  # expired but kept under a legal hold
    records_removed: dict[str, int]  # job and delivery records past the "logs" period
    # studies whose purpose ended that only a law keeps: (to be) moved to the retained store
    retained: list[LegalRetention] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "dry_run": self.dry_run,
            "destroyed": [i.as_dict() for i in self.destroyed],
            "skipped": [i.as_dict() for i in self.skipped],
            "retained_by_law": [r.as_dict() for r in self.retained],
            "records_removed": self.records_removed,
            "studies_considered": len({i.study_instance_uid for i in self.items}),
        }


class RetentionOps(StewardshipBase):
    """Retention status and sweeps, and discarding objects held at intake."""

    def retention_status(self) -> list[RetentionItem]:
        """Every study's images and results with their expiry and what a sweep now would do."""
        now = self.clock()
        policy = governance.policy_in_force(self.archive.registry.published_policies(), now)
        return [
            item
            for facts in self._retention_facts(policy)
            for item in retention.retention_items(facts, policy, now)
        ]

    def _retention_facts(self, policy: governance.Policy) -> list[StudyFacts]:
        registry = self.archive.registry
        done = registry.analysis_done_at()
        holds = registry.holds(active_only=True)
        intake_purposes = policy.consent_purposes("intake")
        records: dict[str, list[ConsentRecord]] = {}
        for record in registry.consents():
            records.setdefault(record.patient_id, []).append(record)
        withdrawn: dict[str, datetime] = {}
        for patient, history in records.items():
            for purpose in intake_purposes:
                current = governance.current_consent(tuple(history), purpose, self.clock())
                if current is not None and current.state in ("withdrawn", "refused"):
                    withdrawn[patient] = min(
                        withdrawn.get(patient, current.recorded_at), current.recorded_at
                    )
        identities = registry.study_identities() if holds else {}
        facts = []
        for study in self.archive.retention_facts():
            issuer = getattr(identities.get(study.study_instance_uid), "issuer", None)
            on_hold = tuple(
                h.ref for h in holds if h.covers(study.patient_id, study.study_instance_uid, issuer)
            )
            facts.append(
                dataclasses.replace(
                    study,
                    analysis_done_at=done.get(study.study_instance_uid),
                    consent_withdrawn_at=withdrawn.get(study.patient_id),
                    holds=on_hold,
                )
            )
        return facts

    def _consent_ended(self, policy: governance.Policy, now: datetime) -> dict[str, datetime]:
        """Per patient, when the consent to an intake purpose that counts now ran out (granted
        for a period that is over; the earliest such purpose)."""
        ended: dict[str, datetime] = {}
        records: dict[str, list[ConsentRecord]] = {}
        for record in self.archive.registry.consents():
            records.setdefault(record.patient_id, []).append(record)
        for patient, history in records.items():
            for purpose in policy.consent_purposes("intake"):
                current = governance.current_consent(tuple(history), purpose, now)
                until = current.valid_until if current is not None else None
                if current is not None and current.state == "granted" and until and until <= now:
                    ended[patient] = min(ended.get(patient, until), until)
        return ended

    def _retained_by_law(
        self, policy: governance.Policy, now: datetime, facts: list[StudyFacts]
    ) -> list[LegalRetention]:
        """The studies whose purpose has ended (consent withdrawn or its period over) and that
        only a legal retention keeps (item 33)."""
        ended = self._consent_ended(policy, now)
        found = []
        for study in facts:
            ground = retention.purpose_ended(
                study.consent_withdrawn_at, ended.get(study.patient_id), now
            )
            legal = retention.retained_by_law(
                retention.retention_items(study, policy, now), ground, now
            )
            if legal is not None:
                found.append(legal)
        return found

    def _retain(self, legal: LegalRetention, by: str, version: str) -> bool:
        """Move a study to the retained store (PIPA 21(3)); whether anything changed."""
        try:
            moved = RetainedStore(self.archive).retain(
                legal.study_instance_uid,
                legal.legal_basis,
                legal.rule_id,
                legal.until,
                legal.ground,
                by,
                self.clock(),
                {"policy_version": version},
            )
        except NotFound:  # gone meanwhile
            return False
        if moved:
            log.info(
                "study retained by law",
                extra={"event": "retained-by-law", "basis": legal.legal_basis, "moved": len(moved)},
            )
        return bool(moved)

    def _held_items(self, policy: governance.Policy, now: datetime) -> list[RetentionItem]:
        """Objects held at intake are kept no longer than received images: per held study, its
        retention counted from when its last object was held."""
        by_study: dict[str, list[Any]] = {}
        for held in self.archive.registry.quarantined():
            by_study.setdefault(held.study_instance_uid, []).append(held)
        holds = self.archive.registry.holds(active_only=True)
        items = []
        for study, objects in sorted(by_study.items()):
            patient = objects[0].patient_id
            facts = StudyFacts(
                study_instance_uid=study,
                patient_id=patient,
                modalities=frozenset(),
                images=len(objects),
                results=0,
                images_received_at=max(o.held_at for o in objects),
                results_received_at=None,
                study_date=None,
                analysis_done_at=None,
                consent_withdrawn_at=None,
                holds=tuple(h.ref for h in holds if h.covers(patient, study)),
            )
            items += [
                dataclasses.replace(i, held=True, reason=f"held at intake; {i.reason}")
                for i in retention.retention_items(facts, policy, now)
            ]
        return items

    def _discard_held(self, held: list[Any], by: str, operation: str) -> None:
        """Destroy objects held at intake (never filed), with a ledger entry."""
        if not held:
            return
        destroyed = QuarantineDestroyed(
            operation=operation,
            patient_ids=tuple(sorted({h.patient_id for h in held})),
            study_instance_uids=tuple(sorted({h.study_instance_uid for h in held})),
            method="held blobs deleted, never filed",
        )
        self.archive.registry.drop_quarantined(
            [h.sop_instance_uid for h in held], by, "discarded", destroyed.as_details()
        )
        self.archive.destroy_study_keys(held, by)  # item 31: crypto-shredding, when sealed
        for item in held:
            self.archive.blobs.delete(item.blob_path)

    def retention_sweep(self, by: str, dry_run: bool = False) -> SweepReport:
        """Destroy what expired (images take their study's results with them), record each
        destruction in the ledger with the rule, the method and the recipients that received
        copies, and record each expired study a legal hold keeps. The dry run decides exactly
        the same and changes nothing."""
        now = self.clock()
        policy = governance.policy_in_force(self.archive.registry.published_policies(), now)
        facts = self._retention_facts(policy)
        items = [
            item for study in facts for item in retention.retention_items(study, policy, now)
        ] + self._held_items(policy, now)
        destroy = [i for i in items if i.action == retention.DESTROY]
        skipped = [i for i in items if i.action == retention.KEEP_HOLD]
        logs_rules = [r for r in policy.retention if r.category == "logs"]
        records: dict[str, int] = {}
        legal = self._retained_by_law(policy, now, facts)
        marked = {r.study_instance_uid for r in RetainedStore(self.archive).studies()}
        if dry_run:
            retain = [r for r in legal if r.study_instance_uid not in marked]
            return SweepReport(now, True, items, destroy, skipped, records, retain)
        retain = [
            r
            for r in legal
            if r.study_instance_uid not in marked and self._retain(r, by, policy.version)
        ]
        for late in RetainedStore(self.archive).stragglers():  # objects that arrived since
            self._retain(
                LegalRetention(
                    late.study_instance_uid, late.patient_id, late.legal_basis, late.rule_id,
                    late.retained_until, late.ground,
                ),
                by,
                policy.version,
            )  # fmt: skip
        whole = {
            i.study_instance_uid for i in destroy if i.category == "received-images" and not i.held
        }
        copies = self._recipients_with_copies({i.study_instance_uid for i in destroy})
        for item in list(destroy):
            if item.held:
                self._discard_held(
                    self.archive.registry.quarantined(study_uid=item.study_instance_uid),
                    by,
                    "retention",
                )
                continue
            if item.category == "analysis-results" and item.study_instance_uid in whole:
                continue  # goes with its images
            try:
                self._destroy(
                    item, by, policy.version, copies.get(item.study_instance_uid, []), now
                )
            except NotFound:  # gone meanwhile (another sweep, an erasure): nothing left to do
                continue
            except NotPermitted as e:  # a legal hold placed since the decision: it wins
                destroy.remove(item)
                skipped.append(dataclasses.replace(item, action=retention.KEEP_HOLD, reason=str(e)))
        if destroy:
            self.archive.registry.cancel_work(
                sorted({i.study_instance_uid for i in destroy}), "retention: data destroyed", now
            )
        for item in skipped:
            kept = RetentionSkipped(
                reason=item.reason,
                rule_id=item.rule_id,
                category=item.category,
                expired_at=item.expires_at.isoformat() if item.expires_at else None,
                policy_version=policy.version,
                patient_ids=(item.patient_id,),
                study_instance_uids=(item.study_instance_uid,),
            )
            self.archive.ledger.record(kept.kind, by, "skipped", kept.as_details())
        if logs_rules:
            rule = max(logs_rules, key=lambda r: r.priority)
            cutoff = retention.logs_purge_cutoff(rule.period, now)  # two years at least
            records = self.archive.registry.purge_records(cutoff)
            if any(records.values()):
                purged = RecordsPurged(
                    rule_id=rule.id,
                    method="index rows deleted",
                    removed=records,
                    finished_before=cutoff.isoformat(),
                    policy_version=policy.version,
                )
                self.archive.ledger.record(purged.kind, by, "done", purged.as_details())
        pseudonymised = purge_pseudonymised_records(self.archive, by, policy.version, now)
        if pseudonymised:  # item 36: past destruction + 3 years
            records = {**records, "pseudonymised_records": pseudonymised}
        log.info(
            "retention sweep: %d destroyed, %d kept under legal hold",
            len(destroy),
            len(skipped),
            extra={"event": "retention", "destroyed": len(destroy), "skipped": len(skipped)},
        )
        return SweepReport(now, False, items, destroy, skipped, records, retain)

    def _destroy(
        self,
        item: RetentionItem,
        by: str,
        version: str,
        recipients: list[dict[str, str]],
        decided_at: datetime,
    ) -> None:
        results_only = item.category == "analysis-results"
        reason = f"retention: {item.reason}"
        removed = self.archive.delete(
            Level.STUDY,
            (("StudyInstanceUID", item.study_instance_uid),),
            by,
            reason,
            RetentionDestruction(
                category="analysis-results" if results_only else "study",
                rule_id=item.rule_id,
                expired_at=item.expires_at.isoformat() if item.expires_at else None,
                policy_version=version,
                recipients_with_copies=tuple(recipients),
            ).as_details(),
            results_only=results_only,
            unless_held=True,  # a hold placed since the decision still wins
            received_before=decided_at,  # objects that arrived since are not part of it
        )
        if self.audit is not None and self.audit.source is not None:
            now, actor = self.clock(), Source("cli", by)
            self.audit.submit(
                lambda: audit_events.deleted(actor, removed, reason, now, self.audit.source)
            )

    def _recipients_with_copies(self, study_uids: set[str]) -> dict[str, list[dict[str, str]]]:
        """Per study, the recipients the ledger says received copies (one SQL query)."""
        return LedgerViews(self.archive.index).copies_by_study(study_uids)
