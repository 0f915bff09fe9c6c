"""The decision gate: every disclosure asks governance here, and the decision, allow or deny,
is committed to the hash-chained ledger (rule, basis, consent references, policy version) before
any data moves; if the ledger cannot be written, nothing leaves. C-FIND and QIDO answers,
retrievals (C-MOVE, C-GET, WADO-RS), analysis job records and processing decisions ask here."""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, BinaryIO

from pydicom.dataset import Dataset

from dicomnode import governance
from dicomnode.archive import Archive, automated_decisions
from dicomnode.archive.access_tags import AccessTagStore
from dicomnode.archive.auditlog import AuditLog
from dicomnode.core.errors import NotPermitted
from dicomnode.core.frames import StoredFrames
from dicomnode.core.ledger_events import DecisionRecord
from dicomnode.core.model import Level, Query, Source, StoredInstance
from dicomnode.core.times import utc_now
from dicomnode.egress import break_glass
from dicomnode.egress.transport import Transport
from dicomnode.governance import (
    Decision,
    DisclosureRequest,
    Party,
    Policy,
    audit,
    audit_events,
)
from dicomnode.governance import access_tags as study_tags

log = logging.getLogger("dicomnode.egress")

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def _party(source: Source) -> Party:
    """The requester as the recipient of its own answer."""
    if source.protocol == "dimse":
        return Party("dimse", peer=source.peer or f"unconfigured:{source.caller}")
    if source.protocol == "dicomweb":
        return Party("dicomweb", token_subject=source.caller)
    return Party(source.protocol, recipient_id=source.caller or None)


class Gate:
    """The decision point of the way out (see the module docstring)."""

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
            # a narrowed policy ("A ∩ B") is several published versions: note each of them
            for match in (p for p in published if p.version in policy.versions):
                self._note_in_force(match, policy.version, now)
            self._in_force_seen = policy.version  # only once the notes are written
        return policy

    def _note_in_force(self, match: Any, in_force: str, now: datetime) -> None:
        """Record once (whichever process sees it first) that a published version is in
        force, with a 110113 Security Configuration message."""
        if not self.archive.registry.note_in_force(
            match.version,
            now,
            {
                "version": match.version,
                "in_force_as": in_force,
                "sha256": match.sha256,
                "published_at": match.published_at.isoformat(),
                "effective_at": match.effective_at.isoformat(),
                "material": match.material,
            },
        ):
            return
        what = f"governance policy {match.version} came into force"
        if in_force != match.version:
            what += f" (the policy in force is {in_force})"
        self._audit(
            lambda: audit_events.configuration_changed(
                match.published_by, what, now, self.audit.source
            )
        )

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
        # the facts of the persons whose objects these are: (Patient ID, issuer) of the studies
        facts = self.archive.registry.governed_facts(patient_ids, study_uids) if patient_ids else {}
        decision = governance.decide(request, facts, policy, now)
        decision = break_glass.override(self.archive, request, decision, facts, now)
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
        fields: dict[str, Any] = {
            "operation": request.operation,
            "protocol": requester.protocol,
            "address": requester.address,
            "peer": requester.peer,
            "recipient": decision.recipient or recipient,
            "recipient_kind": decision.recipient_kind,
            "activity": decision.activity,
            "purpose": decision.purpose,
            "basis": decision.basis,
            "consent_refs": decision.consent_refs,
            "rule_id": decision.rule_id,
            "reason": decision.reason,
            "policy_version": decision.policy_version,
            "deid_profile": decision.deid_profile,
            "patient_ids": request.patient_ids,
            "study_instance_uids": request.study_instance_uids,
            "denied_patients": decision.denied_patients,
            "items": count,
        }
        # what the caller adds (a retrieval's instances, an export's recipient...) wins
        record = DecisionRecord(**fields | extra | {"disclosure_id": disclosure_id})
        kind = DecisionRecord.kind_of(request.operation, decision.allowed)
        entry = self.archive.ledger.record(kind, requester.caller, outcome, record.as_details())
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
                "recipient": record.recipient,
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
        access_tags: frozenset[str] | None = None,
    ) -> list[dict[str, Any]]:
        """The answers to a search that governance allows to leave (answers about patients it
        leaves out are dropped, and studies the requester's access tags do not reach). `asked`
        builds the query as received, for the audit message (called in the audit writer's
        thread, off the request's path)."""
        rows = self.archive.search(query)
        client_tags = self._client_tags(requester, access_tags)
        if client_tags is not None:
            shown = self._reachable({r.get("StudyInstanceUID") or "" for r in rows}, client_tags)
            rows = [r for r in rows if r.get("StudyInstanceUID") in shown]
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

    def _client_tags(
        self, requester: Source, access_tags: frozenset[str] | None
    ) -> frozenset[str] | None:
        """The access tags that limit `requester` (item 41): those given (a token's claim),
        else a DIMSE peer's configured access_tags; None: not limited by tags."""
        if access_tags is not None or requester.protocol != "dimse":
            return access_tags
        granted = getattr(self.peers.get(requester.peer or ""), "access_tags", ())
        return frozenset(granted) if granted else None

    def _reachable(self, study_uids: set[str], client_tags: frozenset[str]) -> set[str]:
        """The studies of `study_uids` carrying one of `client_tags`."""
        tagged = AccessTagStore(self.archive.index).tags_of(study_uids)
        return {s for s in study_uids if study_tags.visible(tagged.get(s, ()), client_tags)}

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
        access_tags: frozenset[str] | None = None,
    ) -> list[StoredInstance]:
        """The instances a retrieve would send to `recipient` (default: the requester), once
        governance allows it, of the studies the requester's access tags reach. `service`
        says which part of them (WADO-RS metadata, frames...)."""
        instances = self.archive.find_instances(level, filters)
        client_tags = self._client_tags(requester, access_tags)
        if client_tags is not None:
            shown = self._reachable({i.study_instance_uid for i in instances}, client_tags)
            instances = [i for i in instances if i.study_instance_uid in shown]
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

    def stored_frames(self, instance: StoredInstance) -> StoredFrames | None:
        """The header and frames of a stored instance that `retrieve` handed out, read by byte
        range (a frame retrieval reads those frames, not the object); None when the object has
        no frame table (read it with `open_blob`)."""
        return self.archive.stored_frames(instance)

    def open_blob(self, instance: StoredInstance) -> BinaryIO:
        """A seekable binary stream of a stored instance that `retrieve` handed out (its
        decision is recorded): what C-MOVE, C-GET and WADO-RS send. A stream that is not a
        local file (an object store's body) is spooled to a temporary file (in memory up to
        8 MiB) first: DICOM readers seek, and pydicom takes a reader's name for a file's.
        The caller closes it."""
        stream = self.archive.open_blob(instance)
        if stream.seekable() and isinstance(getattr(stream, "name", None), str):
            return stream
        copy = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # noqa: SIM115 (the caller closes it)
        with stream:
            shutil.copyfileobj(stream, copy, 1 << 20)
        copy.seek(0)
        return copy  # type: ignore[return-value]

    # --- processing ---------------------------------------------------------------------------

    def permit_processing(
        self, analyzer: str, patient_id: str, study_uid: str, job_id: int
    ) -> Decision:
        """Whether an analysis may run for this patient now; the decision is recorded. A
        patient's open refusal of automated processing (PIPA 37-2) holds it until a person has
        reviewed the request."""
        refusal = automated_decisions.DecisionFlagStore(self.archive.index).open_refusal(patient_id)
        if refusal is not None:
            requester = Source("analysis", analyzer)
            request = self._request(
                requester, "analyze", Party("analysis"), {patient_id}, {study_uid}
            )
            policy_version = self.policy().version
            rule = automated_decisions.REFUSAL_RULE
            held = Decision(False, refusal.hold_reason(), rule, policy_version)
            self._record(requester, request, held, 1, {"job": job_id, "analyzer": analyzer})
            return held
        return self.decide(
            Source("analysis", analyzer),
            "analyze",
            Party("analysis"),
            {patient_id},
            {study_uid},
            1,
            {"job": job_id, "analyzer": analyzer},
        )


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
