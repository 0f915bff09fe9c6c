"""Deliveries: the outbox of results forwarded to the hospital's peers and shares to
recipients, sent with retries. Each attempt asks the gate again (consent may have changed since
it was queued), and the outcome of the transfer is a second ledger entry."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from dicomnode import governance
from dicomnode.archive.pseudonymised import PseudonymisedRegister
from dicomnode.archive.registry import DENIED, DONE, Delivery
from dicomnode.core.errors import DicomnodeError, NotFound
from dicomnode.core.ledger_events import DeidPlan, TransferRecord
from dicomnode.core.model import Level, Source, StoredInstance
from dicomnode.egress.gate import Gate
from dicomnode.egress.transport import SendItem, SendReport, Target
from dicomnode.governance import (
    Decision,
    Party,
    Policy,
    audit,
    audit_events,
    deid,
    pseudonymised,
)

log = logging.getLogger("dicomnode.egress")

DELIVERY_LEASE = timedelta(minutes=30)


@dataclass(frozen=True)
class _Plan:
    items: list[SendItem]
    withheld: dict[str, str]  # SOP Instance UID -> why it may not leave
    record: DeidPlan | None  # how it leaves, for the ledger (None: nothing leaves)


class Deliveries(Gate):
    """The delivery worker of the way out: queue, send, retry, record."""

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
        operation, requester, party = self._parties(delivery)
        instances, gone = self._wanted_instances(delivery)
        # every patient whose data is in what leaves (a study UID can carry two Patient IDs)
        patients = {delivery.patient_id} | {i.patient_id for i in instances}
        studies = {delivery.study_instance_uid}
        try:
            decision = self.decide(
                requester, operation, party, patients, studies, len(instances), record=False
            )
            plan = self._plan(delivery, decision, instances)
            plan = self._register_pseudonymised(delivery, decision, plan, patients)
            disclosure_id = self._record(
                requester,
                self._request(requester, operation, party, patients, studies),
                decision,
                len(instances),
                {
                    "delivery": delivery.id,
                    "sop_instance_uids": [i.sop_instance_uid for i in instances],
                    "gone": gone,
                    "plan": plan.record,
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
        target, report = self._send(operation, delivery, decision, plan)
        outcome = {
            "sent": report.sent,
            "failed": report.failed,
            "withheld": plan.withheld,
            "gone": gone,
            "rule_id": decision.rule_id,
        }
        self._record_transfer(
            operation, delivery, decision, patients, disclosure_id, report, plan, gone
        )
        if plan.record is not None and plan.record.pseudonymised_record is not None:
            self._pseudonymised.sent(
                plan.record.pseudonymised_record, len(report.sent), self.clock()
            )
        ref = audit_events.DisclosureRef(disclosure_id, decision.consent_refs)
        self._audit_transfer(
            delivery, operation, target if report.sent else None, instances, report, plan, ref
        )
        self._settle(delivery, report, outcome, backoff, worker)
        return registry.delivery(delivery.id)

    @staticmethod
    def _parties(delivery: Delivery) -> tuple[str, Source, Party]:
        """The delivery's operation, who asked for it and who receives it."""
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
        return operation, requester, party

    def _wanted_instances(self, delivery: Delivery) -> tuple[list[StoredInstance], list[str]]:
        """The delivery's objects still held, and the SOP Instance UIDs of those gone since."""
        wanted = set(delivery.sop_instance_uids)
        instances = [
            i
            for i in self.archive.find_instances(
                Level.STUDY, (("StudyInstanceUID", delivery.study_instance_uid),)
            )
            if i.sop_instance_uid in wanted
        ]
        gone = sorted(wanted - {i.sop_instance_uid for i in instances})
        return instances, gone

    def _send(
        self, operation: str, delivery: Delivery, decision: Decision, plan: _Plan
    ) -> tuple[Target | None, SendReport]:
        """Send the plan's items to the recipient; a failure to send at all fails every item."""
        target = None
        try:
            target = self._target(operation, delivery.recipient, decision)
            report = self.transports[target.transport].send(target, plan.items)
        except Exception as e:  # no connection, unknown target...: every item is retried
            report = SendReport(
                [], {i.sop_instance_uid: f"{type(e).__name__}: {e}" for i in plan.items}
            )
        return target, report

    def _record_transfer(
        self,
        operation: str,
        delivery: Delivery,
        decision: Decision,
        patients: set[str],
        disclosure_id: str,
        report: SendReport,
        plan: _Plan,
        gone: list[str],
    ) -> None:
        """The transfer's outcome, the second ledger entry of a delivery attempt."""
        transfer = TransferRecord(
            operation=operation,
            delivery=delivery.id,
            recipient=decision.recipient or delivery.recipient,
            patient_ids=tuple(sorted(patients)),
            study_instance_uids=(delivery.study_instance_uid,),
            attempt=delivery.attempts,
            disclosure_id=disclosure_id,
            sent=tuple(report.sent),
            failed=report.failed,
            withheld=plan.withheld,
            gone=tuple(gone),
            rule_id=decision.rule_id,
            deid=plan.record.deid if plan.record is not None else None,
        )
        self.archive.ledger.record(
            transfer.kind,
            delivery.requested_by,
            "complete" if report.complete else ("partial" if report.sent else "failed"),
            transfer.as_details(),
        )

    def _settle(
        self,
        delivery: Delivery,
        report: SendReport,
        outcome: dict[str, Any],
        backoff: timedelta,
        worker: str,
    ) -> None:
        """Finish the delivery when every item went, else queue it to be retried later."""
        registry = self.archive.registry
        if report.complete:  # withheld and deleted objects are not retried
            registry.finish_delivery(delivery.id, DONE, self.clock(), outcome, None, worker)
            return
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
        anonymized = plan.record is not None and plan.record.deidentified
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
        profile, minus those withheld."""
        if not decision.allowed:
            return _Plan([], {}, None)
        if not decision.deid_profile:
            items = [
                SendItem(
                    i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, self._loader(i)
                )
                for i in instances
            ]
            return _Plan(items, {}, DeidPlan(deidentified=False))
        rule = self._policy_of(decision).deid_profile(decision.deid_profile)
        if rule is None:  # fail closed: never send originals where a profile was decided
            raise NotFound(
                f"de-identification profile {decision.deid_profile} is not in policy "
                f"{decision.policy_version}"
            )
        profile = deid.DeidProfile(rule.id, frozenset(rule.options))
        scope = f"recipient:{decision.recipient}"
        items, withheld = [], {}
        for instance in instances:
            with self.archive.open_blob(instance) as stream:  # pixel data is not read
                risk = deid.burned_in_risk(pydicom.dcmread(stream, defer_size=1024), profile)
            if risk is not None:
                withheld[instance.sop_instance_uid] = risk
                continue
            items.append(
                SendItem(
                    instance.sop_instance_uid,
                    instance.sop_class_uid,
                    instance.transfer_syntax_uid,
                    self._deidentifying_loader(instance, profile, scope),
                )
            )
        record = DeidPlan(
            deidentified=True,
            deid={
                "profile": profile.name,
                "options": sorted(profile.options),
                "codes": list(profile.codes),
                "table_edition": deid.EDITION,
                "table_sha256": deid.TABLE_SHA256,
                "uid_scope": scope,
            },
            withheld=withheld,
        )
        return _Plan(items, withheld, record)

    @cached_property
    def _pseudonymised(self) -> PseudonymisedRegister:
        return PseudonymisedRegister(self.archive.index)

    def _register_pseudonymised(
        self, delivery: Delivery, decision: Decision, plan: _Plan, patients: set[str]
    ) -> _Plan:
        """Write (before anything leaves) the pseudonymised-data register's record of a
        de-identified delivery (PIPA Decree 29-5(2)); the plan then names it for the ledger.
        The pseudonyms themselves are recorded nowhere (PIPA 28-4(1))."""
        if plan.record is None or not plan.record.deidentified or plan.record.deid is None:
            return plan
        method = plan.record.deid
        recipient = self._policy_of(decision).recipient(decision.recipient)
        promised = recipient.retention if recipient else ""
        now = self.clock()
        record_id = self._pseudonymised.open(
            delivery.id,
            {
                "processed_at": now,
                "processed_by": delivery.requested_by,
                "purpose": decision.purpose or delivery.purpose or "",
                "activity": decision.activity,
                "basis": decision.basis,
                "recipient": decision.recipient,
                "recipient_name": recipient.name if recipient else "",
                "recipient_country": recipient.country if recipient else "",
                "profile": method["profile"],
                "method": method,
                "items": pseudonymised.pseudonymised_items(frozenset(method["options"])),
                "patient_ids": sorted(patients),
                "study_instance_uid": delivery.study_instance_uid,
                "instances": len(plan.items),
                "withheld": len(plan.withheld),
                "period": promised,
                "period_end": pseudonymised.period_end(now, promised),
                "policy_version": decision.policy_version,
            },
        )
        record = dataclasses.replace(plan.record, pseudonymised_record=record_id)
        return _Plan(plan.items, plan.withheld, record)

    def _deidentifying_loader(
        self, instance: StoredInstance, profile: deid.DeidProfile, scope: str
    ) -> Callable[[], Dataset]:
        return lambda: (
            deid.deidentify(self._read(instance), profile, self.deid_secret, scope).dataset
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
        return lambda: self._read(instance)

    def _read(self, instance: StoredInstance) -> Dataset:
        """The stored object, read from its stream."""
        with self.archive.open_blob(instance) as stream:
            return pydicom.dcmread(stream)
