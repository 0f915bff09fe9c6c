"""The only way data leaves the node: load, ask governance, record, then hand it out.

C-FIND answers and C-MOVE/C-GET sub-operations (and, later, DICOMweb answers, forwarding and
sharing) ask `Egress` first. Each decision is logged with its rule; the governance issue adds
the tamper-evident ledger entry, committed before any data moves.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from dicomnode import governance
from dicomnode.archive import Archive
from dicomnode.core.errors import NotPermitted
from dicomnode.core.model import Level, Query, Source, StoredInstance

log = logging.getLogger("dicomnode.egress")


class Egress:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def _ask(
        self,
        requester: Source,
        operation: str,
        destination: str,
        patient_ids: set[str],
        study_uids: set[str],
        count: int,
    ) -> None:
        request = governance.DisclosureRequest(
            requester=requester,
            operation=operation,
            destination=destination,
            patient_ids=tuple(sorted(patient_ids)),
            study_instance_uids=tuple(sorted(study_uids)),
        )
        decision = governance.decide(request, datetime.now(UTC))
        log.info(
            "disclosure %s",
            "allowed" if decision.allowed else "denied",
            extra={
                "event": "disclosure",
                "operation": operation,
                "requester": requester.caller,
                "protocol": requester.protocol,
                "destination": destination,
                "allowed": decision.allowed,
                "rule_id": decision.rule_id,
                "policy_version": decision.policy_version,
                "items": count,
                "studies": len(study_uids),
            },
        )
        if not decision.allowed:
            raise NotPermitted(f"{decision.reason} ({decision.rule_id})")

    def find(self, query: Query, requester: Source) -> list[dict[str, Any]]:
        """The answers to a search, once governance allows them to leave."""
        rows = self.archive.search(query)
        self._ask(
            requester,
            "find",
            requester.caller,
            {r["PatientID"] for r in rows if r.get("PatientID")},
            {r["StudyInstanceUID"] for r in rows if r.get("StudyInstanceUID")},
            len(rows),
        )
        return rows

    def retrieve(
        self,
        level: Level,
        filters: tuple[tuple[str, str], ...],
        requester: Source,
        operation: str,
        destination: str,
    ) -> list[StoredInstance]:
        """The instances a retrieve would send to `destination`, once governance allows it."""
        instances = self.archive.find_instances(level, filters)
        self._ask(
            requester,
            operation,
            destination,
            {i.patient_id for i in instances},
            {i.study_instance_uid for i in instances},
            len(instances),
        )
        return instances
