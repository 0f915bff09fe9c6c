"""The only way data leaves the node: load, ask governance, record, then hand it out.

C-FIND answers, C-MOVE/C-GET sub-operations and DICOMweb answers (and, later, forwarding and
sharing) ask `Egress` first. Each decision, allow or deny, is committed to the hash-chained
ledger with its rule before any data moves; if the ledger cannot be written, nothing leaves.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from dicomnode import governance
from dicomnode.archive import Archive
from dicomnode.core.errors import NotPermitted
from dicomnode.core.model import LedgerKind, Level, Query, Source, StoredInstance

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
        """Ask governance; record the decision in the ledger (committed before anything is
        sent); raise NotPermitted on a denial. A ledger that cannot be written stops the data."""
        request = governance.DisclosureRequest(
            requester=requester,
            operation=operation,
            destination=destination,
            patient_ids=tuple(sorted(patient_ids)),
            study_instance_uids=tuple(sorted(study_uids)),
        )
        decision = governance.decide(request, datetime.now(UTC))
        outcome = "allowed" if decision.allowed else "denied"
        detail = {
            "operation": operation,
            "protocol": requester.protocol,
            "address": requester.address,
            "peer": requester.peer,
            "recipient": destination,
            "rule_id": decision.rule_id,
            "reason": decision.reason,
            "policy_version": decision.policy_version,
            "patient_ids": request.patient_ids,
            "study_instance_uids": request.study_instance_uids,
            "items": count,
        }
        kind = LedgerKind.DISCLOSURE if decision.allowed else LedgerKind.DENIAL
        entry = self.archive.ledger.record(kind, requester.caller, outcome, detail)
        log.info(
            "disclosure %s",
            outcome,
            extra={
                "event": "disclosure",
                "ledger_seq": entry.seq,
                "requester": requester.caller,
                **detail,
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

    def account(
        self,
        requester: Source,
        operation: str,
        patient_ids: set[str],
        study_uids: set[str],
        count: int,
    ) -> None:
        """Ask governance before information about patients' data (not the data itself, e.g.
        analysis job records) goes to `requester`; the decision is recorded like any other."""
        self._ask(requester, operation, requester.caller, patient_ids, study_uids, count)

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
