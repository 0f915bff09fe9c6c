"""The only way data enters the node: parse, ask governance, file, tell subscribers.

C-STORE, STOW-RS and analysis results all come through `Intake`. Governance admits an object
(filed and announced to subscribers such as analysis), holds it (filed aside, invisible to
queries, retrievals and analysis, until someone releases or discards it) or refuses it. A refusal
raises one of the errors in `dicomnode.core.errors` and leaves the archive unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from dicomnode import governance
from dicomnode.archive import Archive, received
from dicomnode.archive.approvals import ApprovalStore
from dicomnode.archive.blobs import PendingBlob
from dicomnode.archive.blobstore import read_all
from dicomnode.core.elements import reader_for
from dicomnode.core.errors import (
    DatasetMismatch,
    DicomnodeError,
    NotPermitted,
    StorageUnavailable,
    storage_failure,
)
from dicomnode.core.ledger_events import AdmissionRefused, QuarantineReleased
from dicomnode.core.metrics import Metrics
from dicomnode.core.model import IngestResult, PatientIdentity, Source
from dicomnode.core.times import utc_now
from dicomnode.core.turns import ANY_TIME, Turn
from dicomnode.core.uids import validate_uid
from dicomnode.governance import approvals, audit_events

log = logging.getLogger("dicomnode.intake")

Subscriber = Callable[[IngestResult, Source], None]


class Intake:
    def __init__(
        self,
        archive: Archive,
        metrics: Metrics,
        clock: Callable[[], datetime] = utc_now,
        audit: Any = None,
    ) -> None:
        self.archive = archive
        self.metrics = metrics
        self.clock = clock
        self.audit = audit  # the node's audit log (DICOM audit messages), or None
        self.max_inflated_bytes = received.MAX_INFLATED_BYTES  # ``[node] max_inflated_bytes``
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call `subscriber` after each object is filed (it may fail without undoing the store)."""
        self._subscribers.append(subscriber)

    def receive_dimse(
        self,
        dataset_bytes: bytes,
        transfer_syntax_uid: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        source: Source,
        later: list[Callable[[], None]] | None = None,
    ) -> IngestResult:
        """File an object received by C-STORE. Its bytes go to disk while they are parsed
        and judged, and are put in place only if it is filed. With `later`, what only reports
        the filing (metrics, the log line, the subscribers) is appended to it instead of done
        here, for the caller to run once the sender has its answer, and so is the creation of
        the temporary file for the next object."""
        started = time.perf_counter()
        blob = None
        try:
            try:
                command = received.DimseCommand.of(
                    transfer_syntax_uid, sop_class_uid, sop_instance_uid
                )
                blob = self.archive.begin_blob([command.file_meta_bytes, dataset_bytes])
                obj = received.from_dimse(command, dataset_bytes, self.max_inflated_bytes)
            except DicomnodeError as e:
                self._refused(e, source, sop_instance_uid)
                raise
            return self._file(obj, source, started, later=later, blob=blob)
        finally:
            if blob is not None:
                blob.abandon()  # unless it was filed
            if later is not None:
                later.append(self.archive.blobs.prepare_spare)
                later.append(self.archive.settle_placements)

    def receive_part10(
        self,
        file_bytes: bytes,
        source: Source,
        expected_study: str | None = None,
        duplicate_policy: str | None = None,
        turn: Turn = ANY_TIME,
    ) -> IngestResult:
        """File an object received as a DICOM Part 10 file (STOW-RS, imports); with
        `expected_study`, refuse an object of another study (STOW-RS to /studies/{study});
        it is indexed after the objects of the turns before `turn`."""
        started = time.perf_counter()
        try:
            obj = received.from_part10(file_bytes, self.max_inflated_bytes)
            if expected_study is not None and obj.study_instance_uid != expected_study:
                raise DatasetMismatch(
                    f"StudyInstanceUID {obj.study_instance_uid} differs from {expected_study}"
                )
        except DicomnodeError as e:
            self._refused(e, source, "")
            raise
        try:
            return self._file(obj, source, started, duplicate_policy, turn=turn)
        finally:
            self.archive.settle_placements()

    def _file(
        self,
        obj: received.ReceivedObject,
        source: Source,
        started: float,
        duplicate_policy: str | None = None,
        later: list[Callable[[], None]] | None = None,
        turn: Turn = ANY_TIME,
        blob: PendingBlob | None = None,
    ) -> IngestResult:
        now = self.clock()
        policy = governance.policy_in_force(self.archive.registry.published_policies(), now)
        request = governance.AdmissionRequest(
            protocol=source.protocol,
            sender=source.caller,
            known_sender=source.protocol != "dimse" or source.peer is not None,
            patient_id=obj.patient_id,
            study_instance_uid=obj.study_instance_uid,
            sop_class_uid=obj.sop_class_uid,
        )
        try:
            person = PatientIdentity(obj.patient_id, _issuer_of(obj))  # this issuer's patient
            facts = self.archive.registry.governed_facts([person])[obj.patient_id]
            admission = governance.admit(request, facts, policy, now)
            if admission.action == "refuse":
                refused = AdmissionRefused(
                    reason=admission.reason,
                    rule_id=admission.rule_id,
                    policy_version=admission.policy_version,
                    protocol=source.protocol,
                    sender=source.caller,
                    address=source.address,
                    patient_ids=(obj.patient_id,),
                    study_instance_uids=(obj.study_instance_uid,),
                    sop_instance_uids=(obj.sop_instance_uid,),
                )
                self.archive.ledger.record(  # a refusal is a decision: it is in the ledger
                    refused.kind, source.caller or source.protocol, "refused", refused.as_details()
                )
                raise NotPermitted(
                    f"governance refused the object: {admission.reason} ({admission.rule_id})"
                )
            if admission.action == "hold":
                result = self.archive.quarantine(
                    obj,
                    source,
                    admission.reason,
                    admission.rule_id,
                    admission.policy_version,
                    blob=blob,
                )
            else:
                result = self.archive.store(obj, source, duplicate_policy, turn, blob=blob)
        except DicomnodeError as e:
            self._refused(e, source, obj.sop_instance_uid)
            raise
        except Exception as e:  # the index failing while governance reads or records
            failure = storage_failure(e)
            if failure is None:
                raise
            log.error("storage failure: %s: %s", type(e).__name__, e, extra={"event": "storage"})
            self._refused(failure, source, obj.sop_instance_uid)
            raise failure from e
        filed_ms = round((time.perf_counter() - started) * 1000, 2)
        if later is None:
            self._report(result, obj, source, filed_ms)
        else:
            later.append(lambda: self._report(result, obj, source, filed_ms))
        return result

    def _report(
        self, result: IngestResult, obj: received.ReceivedObject, source: Source, ms: float
    ) -> None:
        """Count, log and announce a filed object (observers only: nothing here undoes it)."""
        self.metrics.add("dicomnode_instances_received_total", outcome=result.outcome)
        if result.outcome != "duplicate":
            self.metrics.add("dicomnode_bytes_received_total", obj.size)
        log.info(
            "instance %s",
            result.outcome,
            extra={
                "event": "instance",
                "outcome": result.outcome,
                "sop_instance_uid": obj.sop_instance_uid,
                "study_instance_uid": obj.study_instance_uid,
                "bytes": obj.size,
                "transfer_syntax": obj.transfer_syntax_uid,
                "protocol": source.protocol,
                "caller": source.caller,
                "ms": ms,
            },
        )
        if result.outcome != "held":
            self._announce(result, source)

    def _announce(self, result: IngestResult, source: Source) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(result, source)
            except Exception:
                log.exception("a subscriber failed on %s", result.instance.sop_instance_uid)

    def recover_unindexed(self) -> int:
        """File again, through this one way in, the blobs whose index rows a power loss took,
        or whose sender a crash left without an answer (`Archive.unindexed_recent_blobs`, from
        the placement journal: a blob whose sender was refused was withdrawn then); a blob
        whose content does not match its name (left incomplete by a power loss while it was
        placed), that is now refused, held or in conflict with a stored object, or whose
        object was destroyed, leaves the archive's
        folders. One that cannot be filed for want of storage (quota, disk) stays where it
        is, for the next start or `archive check`. Returns how many were filed."""
        filed = 0
        source = Source("recovery", "startup")
        self.archive.recover()  # what interrupted writes left staged
        unindexed = self.archive.unindexed_recent_blobs()
        for relative in unindexed.destroyed:
            self.archive.blobs.delete(relative)
            self.archive.settle_recovered(relative)
        for relative in unindexed.lost_rows:
            try:
                data = read_all(self.archive.blobs, relative)  # any store, no path
                if not self.archive.blob_matches_its_name(relative, data):
                    log.warning("an unindexed blob is incomplete and was removed: %s", relative)
                    self.archive.blobs.delete(relative)
                    self.archive.settle_recovered(relative)
                    continue
                result: IngestResult | None = self.receive_part10(data, source)
            except (StorageUnavailable, OSError) as e:
                log.warning("an unindexed blob is kept, not filed yet: %s (%s)", relative, e)
                continue
            except DicomnodeError as e:
                log.warning("an unindexed blob was not filed again: %s (%s)", relative, e)
                result = None
            if result is not None and result.outcome in ("stored", "replaced"):
                filed += 1
            if result is None or result.instance.blob_path != relative:
                self.archive.blobs.delete(relative)  # refused, held, a duplicate, or renamed
            self.archive.settle_recovered(relative)
        self.archive.finish_interrupted_shredding()  # item 31: keys a crash left
        if filed:
            log.warning(
                "filed again %d blobs whose index rows were lost (power loss?)",
                filed,
                extra={"event": "recovery", "filed": filed},
            )
        return filed

    def release_held(self, study_uid: str, by: str) -> list[IngestResult]:
        """File a study's held objects into the archive (a person decided they may be
        processed), announce them like any arrival, and record the release."""
        study_uid = validate_uid(study_uid, "StudyInstanceUID")
        held = self.archive.registry.quarantined(study_uid=study_uid)
        four_eyes = ApprovalStore(self.archive.index, self.archive.ledger)  # item 44
        four_eyes.gate(
            approvals.RELEASE_HELD,
            {"study": study_uid},
            f"release {len(held)} held objects of study {study_uid}",
            bool(held)
            and approvals.needs_approval(approvals.RELEASE_HELD, four_eyes.four_eyes_in_force()),
            self.clock(),
        )
        results = []
        for item in held:
            obj = received.from_part10(self.archive.read_blob(item))
            source = Source(item.source_protocol, item.source_caller)
            result = self.archive.store(obj, source)
            results.append(result)
            self._announce(result, source)
        self._drop_held(held, by, "released", "filed into the archive by " + by)
        return results

    def discard_held(self, study_uid: str, by: str) -> int:
        """Destroy a study's held objects (never filed), with a ledger entry."""
        held = self.archive.registry.quarantined(
            study_uid=validate_uid(study_uid, "StudyInstanceUID")
        )
        self._drop_held(held, by, "discarded", "held blobs deleted, never filed")
        return len(held)

    def _drop_held(self, held: list[Any], by: str, outcome: str, method: str) -> None:
        if not held:
            return
        record = QuarantineReleased(
            decision=outcome,
            method=method,
            patient_ids=tuple(sorted({h.patient_id for h in held})),
            study_instance_uids=tuple(sorted({h.study_instance_uid for h in held})),
            sop_instance_uids=tuple(h.sop_instance_uid for h in held),
            reasons=tuple(sorted({h.reason for h in held})),
        )
        self.archive.registry.drop_quarantined(
            [h.sop_instance_uid for h in held], by, outcome, record.as_details()
        )
        if outcome == "discarded":
            self.archive.destroy_study_keys(held, by)  # item 31: crypto-shredding, when sealed
        for item in held:
            self.archive.blobs.delete(item.blob_path)

    def _refused(self, error: DicomnodeError, source: Source, sop_instance_uid: str) -> None:
        self.metrics.add("dicomnode_store_failures_total", reason=type(error).__name__)
        log.warning(
            "instance refused: %s",
            error,
            extra={
                "event": "instance",
                "outcome": "refused",
                "reason": type(error).__name__,
                "sop_instance_uid": sop_instance_uid,
                "protocol": source.protocol,
                "caller": source.caller,
            },
        )
        audit_log = self.audit
        if isinstance(error, NotPermitted) and audit_log is not None and audit_log.source:
            # 110113: governance refused an object; one message per sender and minute
            now, reason, by = self.clock(), str(error), audit_log.source
            audit_log.submit_alert(
                ("intake-refused", source.protocol, source.address or source.caller),
                lambda count: audit_events.refused(source, "store", reason, now, by, count=count),
                now,
            )


def _issuer_of(obj: received.ReceivedObject) -> str | None:
    """The arriving object's IssuerOfPatientID ("" without one: its own issuer, as indexed;
    None when unreadable: then the ID under every issuer decides, the safe side)."""
    try:
        return reader_for("IssuerOfPatientID").text(obj.header) or ""
    except Exception:
        return None
