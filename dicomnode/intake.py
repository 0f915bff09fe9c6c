"""The only way data enters the node: parse, ask governance, file, tell subscribers.

C-STORE, STOW-RS and analysis results all come through `Intake`. A refusal raises one of
the errors in `dicomnode.core.errors` and leaves the archive unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from dicomnode import governance
from dicomnode.archive import Archive, received
from dicomnode.core.errors import DatasetMismatch, DicomnodeError, NotPermitted
from dicomnode.core.metrics import Metrics
from dicomnode.core.model import IngestResult, Source

log = logging.getLogger("dicomnode.intake")

Subscriber = Callable[[IngestResult, Source], None]


class Intake:
    def __init__(self, archive: Archive, metrics: Metrics) -> None:
        self.archive = archive
        self.metrics = metrics
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
    ) -> IngestResult:
        """File an object received by C-STORE."""
        started = time.perf_counter()
        try:
            obj = received.from_dimse(
                dataset_bytes, transfer_syntax_uid, sop_class_uid, sop_instance_uid
            )
        except DicomnodeError as e:
            self._refused(e, source, sop_instance_uid)
            raise
        return self._file(obj, source, started)

    def receive_part10(
        self,
        file_bytes: bytes,
        source: Source,
        expected_study: str | None = None,
        duplicate_policy: str | None = None,
    ) -> IngestResult:
        """File an object received as a DICOM Part 10 file (STOW-RS, imports); with
        `expected_study`, refuse an object of another study (STOW-RS to /studies/{study})."""
        started = time.perf_counter()
        try:
            obj = received.from_part10(file_bytes)
            if expected_study is not None and obj.study_instance_uid != expected_study:
                raise DatasetMismatch(
                    f"StudyInstanceUID {obj.study_instance_uid} differs from {expected_study}"
                )
        except DicomnodeError as e:
            self._refused(e, source, "")
            raise
        return self._file(obj, source, started, duplicate_policy)

    def _file(
        self,
        obj: received.ReceivedObject,
        source: Source,
        started: float,
        duplicate_policy: str | None = None,
    ) -> IngestResult:
        request = governance.AdmissionRequest(
            source=source,
            patient_id=obj.patient_id,
            study_instance_uid=obj.study_instance_uid,
            sop_class_uid=obj.sop_class_uid,
        )
        try:
            decision = governance.admit(request, datetime.now(UTC))
            if not decision.allowed:
                raise NotPermitted(
                    f"governance refused the object: {decision.reason} ({decision.rule_id})"
                )
            result = self.archive.store(obj, source, duplicate_policy)
        except DicomnodeError as e:
            self._refused(e, source, obj.sop_instance_uid)
            raise
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
                "ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )
        for subscriber in self._subscribers:
            try:
                subscriber(result, source)
            except Exception:
                log.exception("a subscriber failed on %s", obj.sop_instance_uid)
        return result

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
