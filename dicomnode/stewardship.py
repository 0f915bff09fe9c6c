"""The DPO's and the data subjects' operations: publishing policy versions, recording consent,
restricting processing, signing ledger checkpoints.

Each operation asks governance what it means (which version takes effect when, which queued
work a withdrawal cancels) and has the archive record it with its ledger entry in one
transaction. The CLI and the /governance API both call these, so there is one way to do each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dicomnode import governance
from dicomnode.archive import Archive
from dicomnode.archive.approvals import ApprovalStore
from dicomnode.archive.keys import verify_json
from dicomnode.archive.ledger import Checkpoint
from dicomnode.archive.ledger_views import LedgerViews
from dicomnode.archive.query import identity_keys
from dicomnode.archive.registry import LegalHold, Restriction
from dicomnode.core.errors import InvalidInput, NotFound, NotPermitted
from dicomnode.core.ledger_events import (
    DeletionRefused,
    ErasureDestruction,
    ErasureRequest,
    QuarantineDestroyed,
    RecordsPurged,
    RequestedDestruction,
    RetentionDestruction,
    RetentionSkipped,
)
from dicomnode.core.model import (
    ConsentRecord,
    Level,
    PublishedPolicy,
    Source,
    StudyFacts,
)
from dicomnode.core.times import utc_now
from dicomnode.governance import approvals, audit_events, codes, notice, retention
from dicomnode.governance.retention import RetentionItem

log = logging.getLogger("dicomnode.stewardship")

CONSENT_STATES = ("granted", "refused", "withdrawn")


@dataclass(frozen=True)
class SubjectOutcome:
    """The outcome of a data-subject request: done or refused, why, and what changed."""

    done: bool
    reason: str
    changed: dict[str, Any]


@dataclass(frozen=True)
class SweepReport:
    """What a retention sweep found and did (or, in a dry run, would do)."""

    at: datetime
    dry_run: bool
    items: list[RetentionItem]  # every study and category considered
    destroyed: list[RetentionItem]  # (would be) destroyed
    skipped: list[RetentionItem]  # expired but kept under a legal hold
    records_removed: dict[str, int]  # job and delivery records past the "logs" period

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "dry_run": self.dry_run,
            "destroyed": [i.as_dict() for i in self.destroyed],
            "skipped": [i.as_dict() for i in self.skipped],
            "records_removed": self.records_removed,
            "studies_considered": len({i.study_instance_uid for i in self.items}),
        }


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
        self.approvals = ApprovalStore(archive.index, archive.ledger)  # four-eyes (item 44)

    def _four_eyes(
        self, action: str, params: dict[str, Any], summary: str, change: str = ""
    ) -> None:
        """Stop a change that needs a second person's approval (ApprovalPending, its request
        recorded) unless it is the approved request being carried out."""
        needed = approvals.needs_approval(action, self.approvals.four_eyes_in_force(), change)
        self.approvals.gate(action, params, summary, needed, self.clock())

    # --- policy ---------------------------------------------------------------------------

    def publish_policy(
        self, source: str, by: str, reason: str = ""
    ) -> tuple[PublishedPolicy, bool]:
        """Publish the policy in `source` now. A narrowing of the policy in force takes effect
        at once; the first version replacing the embedded one, published with the reason
        "initial-deployment", at its effective_from (at once when that has passed); any other
        at its effective_from, but not before its notice period (7 days, 30 when material) has
        run. The classification and the reason are ledgered. Returns the published version and
        whether it is new (publishing the same version again changes nothing). Raises
        PolicyError for a policy that cannot be used, ValueError for a misused reason."""
        policy = governance.parse_policy(source)
        now = self.clock()
        self.archive.registry.forget_cached()
        already = self.archive.registry.published_policies()
        same = next((p for p in already if p.version == policy.version), None)
        if same is not None and same.source == source:
            return same, False
        schedule = notice.schedule_publication(already, policy, now, reason)
        self._four_eyes(
            approvals.PUBLISH_POLICY,
            {"source": source, "reason": reason},
            f"publish policy {policy.version} ({schedule.change.kind})",
            schedule.change.kind,
        )
        published = PublishedPolicy(
            version=policy.version,
            source=source,
            sha256=hashlib.sha256(source.encode()).hexdigest(),
            published_at=now,
            effective_at=schedule.effective_at,
            material=policy.material,
            published_by=by,
        )
        detail = {
            "version": policy.version,
            "sha256": published.sha256,
            "material": policy.material,
            "change": schedule.change.kind,
            "widens": list(schedule.change.widens),
            "compared_with": governance.policy_in_force(already, now).version,
            "notice_days": (published.effective_at - now).days,
            "reason": schedule.reason,
            "initial_deployment": schedule.initial_deployment,
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
        since = max(
            (p.effective_at for p in published if p.version in in_force.versions), default=None
        )
        return PolicyStatus(in_force, since, governance.scheduled(published, now), published)

    # --- consent --------------------------------------------------------------------------

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

    # --- retention ------------------------------------------------------------------------

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
        for item in held:
            self.archive.blobs.delete(item.blob_path)

    def retention_sweep(self, by: str, dry_run: bool = False) -> SweepReport:
        """Destroy what expired (images take their study's results with them), record each
        destruction in the ledger with the rule, the method and the recipients that received
        copies, and record each expired study a legal hold keeps. The dry run decides exactly
        the same and changes nothing."""
        now = self.clock()
        policy = governance.policy_in_force(self.archive.registry.published_policies(), now)
        items = [
            item
            for facts in self._retention_facts(policy)
            for item in retention.retention_items(facts, policy, now)
        ] + self._held_items(policy, now)
        destroy = [i for i in items if i.action == retention.DESTROY]
        skipped = [i for i in items if i.action == retention.KEEP_HOLD]
        logs_rules = [r for r in policy.retention if r.category == "logs"]
        records: dict[str, int] = {}
        if dry_run:
            return SweepReport(now, True, items, destroy, skipped, records)
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
            cutoff = now - (rule.period.after(now) - now)
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
        log.info(
            "retention sweep: %d destroyed, %d kept under legal hold",
            len(destroy),
            len(skipped),
            extra={"event": "retention", "destroyed": len(destroy), "skipped": len(skipped)},
        )
        return SweepReport(now, False, items, destroy, skipped, records)

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

    # --- erasure (PIPA 36, GDPR 17) -------------------------------------------------------

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
        mine = {i.study_instance_uid for i in self.archive.instances_of(identity)}
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
            return self._erasure_refused(request, by, "erasure refused: " + "; ".join(reasons))
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

    def verify_ledger(
        self, by: str, signature_ok: Callable[[Checkpoint], bool]
    ) -> tuple[Any, Any]:
        """Recompute the chain against the signed checkpoints and record the result (a
        checkpoint entry: verified or broken, by whom, up to which entry); returns the
        verification and its ledger entry."""
        result = self.archive.ledger.verify(signature_ok=signature_ok)
        detail = {
            "action": "verify",
            "verified_entries": result.entries,
            "head_hash": result.head_hash,
            "checkpoints": result.checkpoints,
            "first_bad": result.first_bad,
            "problem": result.problem,
        }
        outcome = "verified" if result.ok else "broken"
        entry = self.archive.ledger.record("checkpoint", by, outcome, detail)
        return result, entry


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
