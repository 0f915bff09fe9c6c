"""The only way data leaves the node: load, ask governance, record, then hand it out.

C-FIND answers, C-MOVE/C-GET sub-operations, DICOMweb answers, analysis job records, results
forwarded to the hospital's peers and shares to recipients all ask `Egress` first. Each
decision, allow or deny, is committed to the hash-chained ledger with its rule, basis, consent
references and policy version before any data moves; if the ledger cannot be written, nothing
leaves. Processing (an analysis job) asks through the same decision point. Data that is sent
(deliveries) records the outcome of the transfer in a second entry.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.dataset import Dataset

from dicomnode import governance
from dicomnode.archive import Archive
from dicomnode.archive.auditlog import AuditLog
from dicomnode.archive.jobs import JobStore
from dicomnode.archive.registry import DENIED, DONE, Delivery
from dicomnode.core.errors import DicomnodeError, NotFound, NotPermitted
from dicomnode.core.model import LedgerKind, Level, Query, Source, StoredInstance
from dicomnode.core.times import utc_now
from dicomnode.governance import (
    Decision,
    DisclosureRequest,
    Party,
    Policy,
    audit,
    audit_events,
    deid,
)

log = logging.getLogger("dicomnode.egress")

DELIVERY_LEASE = timedelta(minutes=30)
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@dataclass(frozen=True)
class SendReport:
    """What a transport did with the files it was handed."""

    sent: list[str] = field(default_factory=list)  # SOP Instance UIDs the recipient accepted
    failed: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> reason

    @property
    def complete(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class Target:
    """Where a delivery goes: a configured DIMSE peer, or a DICOMweb STOW-RS endpoint."""

    transport: str  # "dimse" | "stow"
    name: str
    peer: Any = None  # config.Peer for "dimse"
    url: str = ""  # for "stow"


@dataclass(frozen=True)
class SendItem:
    """One object to send: what it is (for negotiation) and how to load it when its turn
    comes (so that a large study never sits in memory)."""

    sop_instance_uid: str  # as stored; reports name objects by it
    sop_class_uid: str
    transfer_syntax_uid: str
    load: Callable[[], Dataset]


@dataclass(frozen=True)
class _Plan:
    items: list[SendItem]
    withheld: dict[str, str]  # SOP Instance UID -> why it may not leave
    ledger_detail: dict[str, Any]


class Transport(Protocol):
    def send(self, target: Target, items: Sequence[SendItem]) -> SendReport:
        """Send every item to `target`; report each by its stored SOP Instance UID."""


def _party(source: Source) -> Party:
    """The requester as the recipient of its own answer."""
    if source.protocol == "dimse":
        return Party("dimse", peer=source.peer or f"unconfigured:{source.caller}")
    if source.protocol == "dicomweb":
        return Party("dicomweb", token_subject=source.caller)
    return Party(source.protocol, recipient_id=source.caller or None)


class Egress:
    def __init__(
        self,
        archive: Archive,
        peers: Mapping[str, Any] | None = None,
        transports: Mapping[str, Transport] | None = None,
        clock: Callable[[], datetime] = utc_now,
        delivery_attempts: int = 5,
        deid_secret: bytes = b"",
        audit: AuditLog | None = None,
    ) -> None:
        self.archive = archive
        self.peers = dict(peers or {})
        self.transports = dict(transports or {})
        self.clock = clock
        self.delivery_attempts = delivery_attempts
        self.deid_secret = deid_secret
        self.audit = audit
        self._in_force_seen: str | None = None

    def _audit(self, build: Callable[[], bytes | list[bytes]]) -> None:
        """Hand an audit message to the audit log (built off this thread); never raises."""
        if self.audit is not None and self.audit.source is not None:
            self.audit.submit(build)

    def _alert_refusal(
        self, requester: Source, operation: str, reason: str, ref: audit_events.DisclosureRef
    ) -> None:
        """110113 for a refused request, aggregated per requester and minute."""
        if self.audit is None or self.audit.source is None:
            return
        now, source = self.clock(), self.audit.source
        self.audit.submit_alert(
            ("refused", requester.protocol, requester.address or requester.caller, operation),
            lambda count: audit_events.refused(
                requester, operation, reason, now, source, count=count, ref=ref
            ),
            now,
        )

    # --- the decision point -----------------------------------------------------------------

    def policy(self, now: datetime | None = None) -> Policy:
        """The policy in force now; the first time a published version is seen in force, that
        is recorded in the ledger (once, whichever process sees it first)."""
        now = now or self.clock()
        published = self.archive.registry.published_policies()
        policy = governance.policy_in_force(published, now)
        if policy.version != self._in_force_seen:
            match = next((p for p in published if p.version == policy.version), None)
            if match is not None and self.archive.registry.note_in_force(
                policy.version,
                now,
                {
                    "version": policy.version,
                    "sha256": match.sha256,
                    "published_at": match.published_at.isoformat(),
                    "effective_at": match.effective_at.isoformat(),
                    "material": match.material,
                },
            ):
                what = f"governance policy {policy.version} came into force"
                self._audit(
                    lambda: audit_events.configuration_changed(
                        match.published_by, what, now, self.audit.source
                    )
                )
            self._in_force_seen = policy.version  # only once the note is written
        return policy

    def decide(
        self,
        requester: Source,
        operation: str,
        recipient: Party,
        patient_ids: set[str],
        study_uids: set[str],
        count: int,
        extra: dict[str, Any] | None = None,
        record: bool = True,
    ) -> Decision:
        """Ask governance and record the decision in the ledger (committed before anything is
        sent); with `record=False` the caller records it (`_record`) once it knows more (what
        a share will look like de-identified). A ledger that cannot be written raises
        StorageUnavailable."""
        now = self.clock()
        policy = self.policy(now)
        request = self._request(requester, operation, recipient, patient_ids, study_uids)
        facts = self.archive.registry.governed_facts(patient_ids) if patient_ids else {}
        decision = governance.decide(request, facts, policy, now)
        if record:
            self._record(requester, request, decision, count, extra or {})
        return decision

    def _request(
        self,
        requester: Source,
        operation: str,
        recipient: Party,
        patient_ids: set[str],
        study_uids: set[str],
    ) -> DisclosureRequest:
        return DisclosureRequest(
            operation=operation,
            party=recipient,
            requester=requester.caller,
            patient_ids=tuple(sorted(patient_ids)),
            study_instance_uids=tuple(sorted(study_uids)),
            purpose=requester.purpose,
        )

    def _record(
        self,
        requester: Source,
        request: DisclosureRequest,
        decision: Decision,
        count: int,
        extra: dict[str, Any],
    ) -> str:
        """Write the decision's ledger entry; returns its `disclosure_id`, the identifier the
        audit messages of the same disclosure carry (given in `extra`, or made here)."""
        outcome = "allowed" if decision.allowed else "denied"
        disclosure_id = str(extra.get("disclosure_id") or uuid.uuid4().hex)
        recipient = (
            request.party.recipient_id or request.party.peer or request.party.token_subject or ""
        )
        detail = {
            "operation": request.operation,
            "protocol": requester.protocol,
            "address": requester.address,
            "peer": requester.peer,
            "recipient": decision.recipient or recipient,
            "recipient_kind": decision.recipient_kind,
            "activity": decision.activity,
            "purpose": decision.purpose,
            "basis": decision.basis,
            "consent_refs": list(decision.consent_refs),
            "rule_id": decision.rule_id,
            "reason": decision.reason,
            "policy_version": decision.policy_version,
            "deid_profile": decision.deid_profile,
            "patient_ids": request.patient_ids,
            "study_instance_uids": request.study_instance_uids,
            "denied_patients": list(decision.denied_patients),
            "items": count,
            **extra,
            "disclosure_id": disclosure_id,
        }
        if request.operation in ("analyze", "admit"):
            kind = LedgerKind.PROCESSING
        else:
            kind = LedgerKind.DISCLOSURE if decision.allowed else LedgerKind.DENIAL
        entry = self.archive.ledger.record(kind, requester.caller, outcome, detail)
        if not decision.allowed:
            self._alert_refusal(
                requester,
                request.operation,
                decision.reason,
                audit_events.DisclosureRef(disclosure_id, decision.consent_refs),
            )
        log.info(  # who and what kind, not whose data: that stays in the ledger
            "disclosure %s",
            outcome,
            extra={
                "event": "disclosure",
                "ledger_seq": entry.seq,
                "requester": requester.caller,
                "operation": request.operation,
                "protocol": requester.protocol,
                "recipient": detail["recipient"],
                "activity": decision.activity,
                "rule_id": decision.rule_id,
                "policy_version": decision.policy_version,
                "patients": len(request.patient_ids),
                "items": count,
            },
        )
        return disclosure_id

    @staticmethod
    def _refuse(decision: Decision) -> None:
        """Refuse, telling the caller which rule of which policy refused but nothing about the
        patient (not even that a restriction or a consent exists): the reason in full is in
        the ledger entry, for the DPO."""
        if not decision.allowed:
            raise NotPermitted(refusal_message(decision))

    # --- answers to the hospital's queries and retrievals ------------------------------------

    def find(
        self,
        query: Query,
        requester: Source,
        asked: Callable[[], audit.Query] | None = None,
    ) -> list[dict[str, Any]]:
        """The answers to a search that governance allows to leave (answers about patients it
        leaves out are dropped). `asked` builds the query as received, for the audit message
        (called in the audit writer's thread, off the request's path)."""
        rows = self.archive.search(query)
        decision = self.decide(
            requester,
            "find" if requester.protocol == "dimse" else "qido",
            _party(requester),
            {r["PatientID"] for r in rows if r.get("PatientID")},
            {r["StudyInstanceUID"] for r in rows if r.get("StudyInstanceUID")},
            len(rows),
        )
        self._refuse(decision)
        now = self.clock()
        self._audit(
            lambda: audit_events.queried(
                requester, asked() if asked else _as_dicom_query(query), now, self.audit.source
            )
        )
        if decision.denied_patients:
            left_out = set(decision.denied_patients)
            rows = [r for r in rows if r.get("PatientID") not in left_out]
        return rows

    def account(
        self,
        requester: Source,
        operation: str,
        patient_ids: set[str],
        study_uids: set[str],
        count: int,
    ) -> set[str]:
        """Ask before information about patients' data (not the data itself, e.g. analysis job
        records) goes to `requester`; returns the patients to leave out."""
        decision = self.decide(
            requester, operation, _party(requester), patient_ids, study_uids, count
        )
        self._refuse(decision)
        return set(decision.denied_patients)

    def retrieve(
        self,
        level: Level,
        filters: tuple[tuple[str, str], ...],
        requester: Source,
        operation: str,
        recipient: Party | None = None,
        service: str = "",
    ) -> list[StoredInstance]:
        """The instances a retrieve would send to `recipient` (default: the requester), once
        governance allows it. `service` says which part of them (WADO-RS metadata, frames...)."""
        instances = self.archive.find_instances(level, filters)
        disclosure_id = uuid.uuid4().hex
        decision = self.decide(
            requester,
            operation,
            recipient or _party(requester),
            {i.patient_id for i in instances},
            {i.study_instance_uid for i in instances},
            len(instances),
            {
                "service": service,
                "sop_instance_uids": [i.sop_instance_uid for i in instances],
                "disclosure_id": disclosure_id,
            },
        )
        self._refuse(decision)
        if instances:
            self._audit_retrieval(
                requester, operation, recipient, instances, decision, disclosure_id
            )
        return instances

    def _audit_retrieval(
        self,
        requester: Source,
        operation: str,
        recipient: Party | None,
        instances: list[StoredInstance],
        decision: Decision,
        disclosure_id: str,
    ) -> None:
        """110104/110102 for what a retrieval sends and, when governance counted it as a
        disclosure to a third party, 110106 Export too; each carries the ledger entry's
        DisclosureID and the consent versions the decision rested on."""
        now = self.clock()
        ref = audit_events.DisclosureRef(disclosure_id, decision.consent_refs)
        if recipient is not None and recipient.peer in self.peers:
            peer = self.peers[recipient.peer]
            receiver = audit.dicom_application(peer.ae_title, peer.host)
            destination = f"dicom://{peer.ae_title}@{peer.host}:{peer.port}"
        else:
            receiver = audit_events.participant(requester)
            destination = f"{requester.protocol}://{requester.address or requester.caller}"
        self._audit(
            lambda: audit_events.sent(
                requester,
                receiver,
                instances,
                now,
                self.audit.source,
                begin=operation in ("move", "get"),
                ref=ref,
            )
        )
        if decision.recipient_kind == "third-party":
            recipient_name = decision.recipient or requester.caller or "third party"
            self._audit(
                lambda: audit_events.exported(
                    requester.caller,
                    destination,
                    recipient_name,
                    instances,
                    bool(decision.deid_profile),
                    now,
                    self.audit.source,
                    ref=ref,
                )
            )

    # --- processing ---------------------------------------------------------------------------

    def permit_processing(
        self, analyzer: str, patient_id: str, study_uid: str, job_id: int
    ) -> Decision:
        """Whether an analysis may run for this patient now; the decision is recorded."""
        return self.decide(
            Source("analysis", analyzer),
            "analyze",
            Party("analysis"),
            {patient_id},
            {study_uid},
            1,
            {"job": job_id, "analyzer": analyzer},
        )

    # --- data-subject access (PIPA 35, GDPR 15/20) ------------------------------------------

    def export_subject(
        self,
        patient_id: str,
        requester: Source,
        out_dir: Path,
        context: dict[str, Any],
        issuer: str | None = None,
    ) -> dict[str, Any]:
        """Write every object of a patient (as stored) under `out_dir/DICOM/`, and a summary of
        what was done with the data and every disclosure of it (`summary.json`, and the same as
        readable text in `summary.txt`). `context` adds consents, restrictions and retention.
        The patient is one exact identity (Patient ID and issuer, never a pattern).
        The export is a decision (subject access) recorded like any other; returns the summary."""
        identity = self.archive.identify(patient_id, issuer)
        patient_id = identity.patient_id
        instances = self.archive.instances_of(identity)
        decision = self.decide(
            requester,
            "export",
            Party("cli"),
            {patient_id},
            {i.study_instance_uid for i in instances},
            len(instances),
            {
                "sop_instance_uids": [i.sop_instance_uid for i in instances],
                "recipient": f"data subject {patient_id}, handed over by {requester.caller}",
            },
        )
        self._refuse(decision)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for instance in instances:
            relative = Path("DICOM") / self.archive.blobs.relative_path(
                instance.study_instance_uid,
                instance.series_instance_uid,
                instance.sop_instance_uid,
            )
            (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.archive.blob_file(instance), out_dir / relative)
            files.append(str(relative))
        disclosures, processing = [], []
        for entry in self.archive.ledger.entries():
            data = entry.data
            if patient_id not in (data.get("patient_ids") or ()):
                continue
            row = {
                "seq": entry.seq,
                "at": entry.recorded_at,
                "kind": entry.kind,
                "outcome": entry.outcome,
                "operation": data.get("operation") or data.get("request", ""),
                "recipient": data.get("recipient", ""),
                "purpose": data.get("purpose", ""),
                "basis": data.get("basis", ""),
                "reason": data.get("reason", ""),
            }
            if entry.kind in ("disclosure", "transfer", "denial"):
                disclosures.append(row)
            else:
                processing.append(row)
        others = self.archive.studies_of_others(identity)  # same ID, another issuer
        jobs = [
            job.as_dict()
            for job in JobStore(self.archive.index).list(patient_id=patient_id, limit=None)
            if job.study_instance_uid not in others
        ]
        summary = {
            "patient_id": patient_id,
            "issuer_of_patient_id": identity.issuer or "",
            "exported_at": self.clock().isoformat(),
            "policy_version": decision.policy_version,
            "studies": sorted({i.study_instance_uid for i in instances}),
            "files": files,
            "analyses": [
                {k: j[k] for k in ("id", "analyzer", "analyzer_version", "state", "finished_at")}
                for j in jobs
            ],
            "disclosures": disclosures,
            "processing_records": processing,
            **context,
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        (out_dir / "summary.txt").write_text(_readable_summary(summary), encoding="utf-8")
        self.archive.ledger.record(
            LedgerKind.SUBJECT,
            requester.caller,
            "exported",
            {
                "request": "export",
                "patient_ids": [patient_id],
                "study_instance_uids": summary["studies"],
                "files": len(files),
                "disclosures_listed": len(disclosures),
            },
        )
        return summary

    # --- deliveries: forwarded results and shares --------------------------------------------

    def queue_forward(
        self,
        instances: list[StoredInstance],
        destinations: Sequence[str],
        requested_by: str,
        senders: set[str] = frozenset(),
    ) -> list[int]:
        """Queue `instances` (analysis results) for each destination: a configured peer's name,
        or "sender" for the configured peers whose AE titles sent the study (`senders`)."""
        if not instances:
            return []
        names: list[str] = []
        for name in destinations:
            if name == "sender":
                names += [n for n, p in self.peers.items() if p.ae_title in senders]
            else:
                names.append(name)
        ids = []
        by_study: dict[tuple[str, str], list[str]] = {}
        for item in instances:
            by_study.setdefault((item.patient_id, item.study_instance_uid), []).append(
                item.sop_instance_uid
            )
        for name in dict.fromkeys(names):
            if name not in self.peers:
                log.warning("forward destination %r is not a configured peer", name)
                continue
            for (patient_id, study_uid), uids in by_study.items():
                ids.append(
                    self.archive.registry.queue_delivery(
                        "forward",
                        name,
                        "",  # the recipient's (or the activity's) purpose
                        patient_id,
                        study_uid,
                        uids,
                        requested_by,
                        self.delivery_attempts,
                        self.clock(),
                    )
                )
        return ids

    def queue_share(
        self,
        recipient_id: str,
        study_uid: str,
        requested_by: str,
        purpose: str | None = None,
        claimed_by: str | None = None,
    ) -> int:
        """Queue a share of a whole study to a policy recipient (decided when it is sent);
        with `claimed_by`, it is queued already claimed by that worker."""
        instances = self.archive.find_instances(Level.STUDY, (("StudyInstanceUID", study_uid),))
        if not instances:
            raise NotFound(f"no study {study_uid}")
        if purpose is None:
            recipient = self.policy().recipient(recipient_id)
            purpose = recipient.default_purpose if recipient else ""
        return self.archive.registry.queue_delivery(
            "share",
            recipient_id,
            purpose,
            instances[0].patient_id,
            study_uid,
            [i.sop_instance_uid for i in instances],
            requested_by,
            self.delivery_attempts,
            self.clock(),
            claimed_by=claimed_by,
            lease=DELIVERY_LEASE,
        )

    def deliver_due(self, worker: str, backoff: timedelta) -> Delivery | None:
        """Claim and send one due delivery; returns it as recorded afterwards (None: none due)."""
        delivery = self.archive.registry.claim_delivery(worker, self.clock(), DELIVERY_LEASE)
        if delivery is None:
            return None
        return self._deliver(delivery, backoff, worker)

    def share_now(
        self,
        recipient_id: str,
        study_uid: str,
        requested_by: str,
        backoff: timedelta,
        purpose: str | None = None,
    ) -> Delivery:
        """Queue a share already claimed by this caller, and send it (what `dicomnode share`
        and the share API do: no other worker can take it in between)."""
        worker = f"now-{uuid.uuid4().hex[:8]}"
        delivery_id = self.queue_share(recipient_id, study_uid, requested_by, purpose, worker)
        return self._deliver(self.archive.registry.delivery(delivery_id), backoff, worker)

    def deliver_now(self, delivery_id: int, backoff: timedelta) -> Delivery:
        """Send one queued delivery at once (the CLI and API do this for a share)."""
        worker = f"now-{uuid.uuid4().hex[:8]}"
        delivery = self.archive.registry.claim_delivery(
            worker, self.clock(), DELIVERY_LEASE, delivery_id
        )
        if delivery is None:
            raise NotFound(f"delivery {delivery_id} is not queued")
        return self._deliver(delivery, backoff, worker)

    def _deliver(self, delivery: Delivery, backoff: timedelta, worker: str) -> Delivery:
        """Decide, record, then send one delivery; a share leaves de-identified when its rule
        names a profile, and objects likely to carry burned-in identity are withheld."""
        registry = self.archive.registry
        operation = "forward" if delivery.kind == "forward" else "share"
        requester = Source(
            "cli" if operation == "share" else "analysis",
            delivery.requested_by,
            purpose=delivery.purpose or None,
        )
        party = (
            Party("dimse", peer=delivery.recipient)
            if operation == "forward"
            else Party("cli", recipient_id=delivery.recipient)
        )
        wanted = set(delivery.sop_instance_uids)
        instances = [
            i
            for i in self.archive.find_instances(
                Level.STUDY, (("StudyInstanceUID", delivery.study_instance_uid),)
            )
            if i.sop_instance_uid in wanted
        ]
        gone = sorted(wanted - {i.sop_instance_uid for i in instances})
        # every patient whose data is in what leaves (a study UID can carry two Patient IDs)
        patients = {delivery.patient_id} | {i.patient_id for i in instances}
        studies = {delivery.study_instance_uid}
        try:
            decision = self.decide(
                requester, operation, party, patients, studies, len(instances), record=False
            )
            plan = self._plan(delivery, decision, instances)
            disclosure_id = self._record(
                requester,
                self._request(requester, operation, party, patients, studies),
                decision,
                len(instances),
                {
                    "delivery": delivery.id,
                    "sop_instance_uids": [i.sop_instance_uid for i in instances],
                    "gone": gone,
                    **plan.ledger_detail,
                },
            )
        except DicomnodeError as e:  # the ledger cannot be written: nothing leaves
            registry.retry_delivery_later(delivery.id, self.clock(), str(e), backoff, {}, worker)
            return registry.delivery(delivery.id)
        if not decision.allowed:
            registry.finish_delivery(
                delivery.id,
                DENIED,
                self.clock(),
                {"rule_id": decision.rule_id},
                f"{decision.reason} ({decision.rule_id})",
                worker,
            )
            return registry.delivery(delivery.id)
        target = None
        try:
            target = self._target(operation, delivery.recipient, decision)
            report = self.transports[target.transport].send(target, plan.items)
        except Exception as e:  # no connection, unknown target...: every item is retried
            report = SendReport(
                [], {i.sop_instance_uid: f"{type(e).__name__}: {e}" for i in plan.items}
            )
        outcome = {
            "sent": report.sent,
            "failed": report.failed,
            "withheld": plan.withheld,
            "gone": gone,
            "rule_id": decision.rule_id,
        }
        self.archive.ledger.record(
            LedgerKind.TRANSFER,
            delivery.requested_by,
            "complete" if report.complete else ("partial" if report.sent else "failed"),
            {
                "operation": operation,
                "delivery": delivery.id,
                "recipient": decision.recipient or delivery.recipient,
                "patient_ids": sorted(patients),
                "study_instance_uids": [delivery.study_instance_uid],
                "attempt": delivery.attempts,
                "disclosure_id": disclosure_id,
                **outcome,
            },
        )
        ref = audit_events.DisclosureRef(disclosure_id, decision.consent_refs)
        self._audit_transfer(
            delivery, operation, target if report.sent else None, instances, report, plan, ref
        )
        if report.complete:  # withheld and deleted objects are not retried
            registry.finish_delivery(delivery.id, DONE, self.clock(), outcome, None, worker)
        else:
            state = registry.retry_delivery_later(
                delivery.id,
                self.clock(),
                "; ".join(f"{uid}: {why}" for uid, why in list(report.failed.items())[:5]),
                backoff,
                outcome,
                worker,
            )
            log.warning(
                "delivery %s to %s failed; now %s",
                delivery.id,
                delivery.recipient,
                state,
                extra={"event": "delivery", "delivery": delivery.id, "state": state},
            )
        return registry.delivery(delivery.id)

    def _audit_transfer(
        self,
        delivery: Delivery,
        operation: str,
        target: Target | None,
        instances: list[StoredInstance],
        report: SendReport,
        plan: _Plan,
        ref: audit_events.DisclosureRef,
    ) -> None:
        if target is None:
            return
        sent = [i for i in instances if i.sop_instance_uid in set(report.sent)]
        now = self.clock()
        if operation == "forward":
            peer = target.peer
            receiver = audit.dicom_application(peer.ae_title, peer.host)
            self._audit(
                lambda: audit_events.sent(
                    Source("analysis", delivery.requested_by),
                    receiver,
                    sent,
                    now,
                    self.audit.source,
                    ref=ref,
                )
            )
            return
        destination = target.url or (
            f"dicom://{target.peer.ae_title}@{target.peer.host}:{target.peer.port}"
        )
        anonymized = bool(plan.ledger_detail.get("deidentified"))
        self._audit(
            lambda: audit_events.exported(
                delivery.requested_by,
                destination,
                target.name,
                sent,
                anonymized,
                now,
                self.audit.source,
                ref=ref,
            )
        )

    def _plan(
        self, delivery: Delivery, decision: Decision, instances: list[StoredInstance]
    ) -> _Plan:
        """What leaves and how: each object as stored, or de-identified under the rule's
        profile (UIDs and pseudonym computed up front for the ledger), minus those withheld."""
        if not decision.allowed:
            return _Plan([], {}, {})
        if not decision.deid_profile:
            items = [
                SendItem(
                    i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, self._loader(i)
                )
                for i in instances
            ]
            return _Plan(items, {}, {"deidentified": False})
        rule = self._policy_of(decision).deid_profile(decision.deid_profile)
        if rule is None:  # fail closed: never send originals where a profile was decided
            raise NotFound(
                f"de-identification profile {decision.deid_profile} is not in policy "
                f"{decision.policy_version}"
            )
        profile = deid.DeidProfile(rule.id, frozenset(rule.options))
        scope = f"recipient:{decision.recipient}"
        keep_uids = "retain-uids" in profile.options
        items, withheld, uid_map = [], {}, {}
        for instance in instances:
            path = self.archive.blob_file(instance)
            header = pydicom.dcmread(path, defer_size=1024)  # pixel data is not read
            risk = deid.burned_in_risk(header, profile)
            if risk is not None:
                withheld[instance.sop_instance_uid] = risk
                continue
            if not keep_uids:
                for uid in (
                    instance.study_instance_uid,
                    instance.series_instance_uid,
                    instance.sop_instance_uid,
                ):
                    uid_map[uid] = deid.remap_uid(uid, self.deid_secret, scope)
            items.append(
                SendItem(
                    instance.sop_instance_uid,
                    instance.sop_class_uid,
                    instance.transfer_syntax_uid,
                    self._deidentifying_loader(path, profile, scope),
                )
            )
        detail = {
            "deidentified": True,
            "deid": {
                "profile": profile.name,
                "options": sorted(profile.options),
                "codes": list(profile.codes),
                "table_edition": deid.EDITION,
                "table_sha256": deid.TABLE_SHA256,
                "uid_scope": scope,
            },
            "patient_pseudonyms": {
                patient: deid.patient_pseudonym(patient, self.deid_secret, scope)
                for patient in sorted({i.patient_id for i in instances})
            },
            "uid_map": uid_map,
            "withheld": withheld,
        }
        return _Plan(items, withheld, detail)

    def _deidentifying_loader(
        self, path: Any, profile: deid.DeidProfile, scope: str
    ) -> Callable[[], Dataset]:
        return lambda: (
            deid.deidentify(pydicom.dcmread(path), profile, self.deid_secret, scope).dataset
        )

    def _target(self, operation: str, recipient: str, decision: Decision) -> Target:
        if operation == "forward":
            return Target("dimse", recipient, peer=self.peers[recipient])
        policy_recipient = self._policy_of(decision).recipient(decision.recipient)
        if policy_recipient is None:
            raise NotFound(f"recipient {decision.recipient} is not in the policy")
        for name in policy_recipient.peers:
            if name in self.peers:
                return Target("dimse", policy_recipient.id, peer=self.peers[name])
        if policy_recipient.dicomweb_url:
            return Target("stow", policy_recipient.id, url=policy_recipient.dicomweb_url)
        raise NotFound(
            f"recipient {policy_recipient.id} names no configured peer and no dicomweb_url"
        )

    def _policy_of(self, decision: Decision) -> Policy:
        """The policy version that made `decision` (not whatever is in force a moment later)."""
        policy = governance.policy_version(
            self.archive.registry.published_policies(), decision.policy_version
        )
        if policy is None:
            raise NotFound(f"policy version {decision.policy_version} is not published")
        return policy

    def _loader(self, instance: StoredInstance) -> Callable[[], Dataset]:
        path = self.archive.blob_file(instance)
        return lambda: pydicom.dcmread(path)


def refusal_message(decision: Decision) -> str:
    """What a refused caller is told: the activity, the rule and the policy version."""
    what = decision.activity or "this request"
    to = f" to {decision.recipient}" if decision.recipient else ""
    return (
        f"{what}{to} is not permitted by the governance policy {decision.policy_version} "
        f"(rule {decision.rule_id}); the node's DPO can see why in the ledger"
    )


def _as_dicom_query(query: Query) -> audit.Query:
    """A query as a C-FIND identifier (Study Root), for the audit message of a search that
    came without one."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = str(query.level)
    for keyword, value in query.filters:
        try:
            setattr(identifier, keyword, value)
        except (ValueError, TypeError, AttributeError):
            continue  # a key pydicom cannot encode is left out of the audit copy
    return audit.dicom_query(STUDY_ROOT_FIND, identifier)


def _readable_summary(summary: dict[str, Any]) -> str:
    """The export summary as plain text a patient (or the hospital's staff) can read."""
    lines = [
        f"Data held about patient {summary['patient_id']}, exported {summary['exported_at']}",
        f"Policy in force: {summary['policy_version']}",
        "",
        f"Studies ({len(summary['studies'])}), {len(summary['files'])} DICOM files under DICOM/:",
        *(f"  {uid}" for uid in summary["studies"]),
        "",
        "Analyses run on the data:",
        *(
            f"  {a['finished_at'] or '-'}  {a['analyzer']} {a['analyzer_version']}: {a['state']}"
            for a in summary["analyses"]
        ),
        "",
        "Every disclosure of the data (and every refusal), from the ledger:",
        *(
            f"  {d['at']}  {d['kind']:<10} {d['operation']:<8} to {d['recipient'] or '-'} "
            f"for {d['purpose'] or '-'} on {d['basis'] or '-'}: {d['outcome']}"
            for d in summary["disclosures"]
        ),
        "",
        "Consent records:",
        *(
            f"  {c['recorded_at']}  {c['purpose']}: {c['state']} (v{c['version']})"
            for c in summary.get("consents", [])
        ),
        "",
        "Retention:",
        *(
            f"  {r['study_instance_uid']} {r['category']}: {r['reason']}"
            for r in summary.get("retention", [])
        ),
    ]
    return "\n".join(lines) + "\n"
