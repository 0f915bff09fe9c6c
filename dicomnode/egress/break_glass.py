"""Break-glass on the way out: a clinician opens a time-limited grant for one patient (or one
study) with a stated reason; while it runs, the gate lets that clinician's queries and
retrievals past the patient's restriction or missing consent (governance decides what a grant
covers); every use is a ledger disclosure naming the grant, and the DPO reviews each grant."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from dicomnode.archive.break_glass import BreakGlassStore
from dicomnode.core.errors import InvalidInput, NotPermitted
from dicomnode.core.grants import Grant
from dicomnode.core.model import PatientFacts
from dicomnode.governance import DisclosureRequest
from dicomnode.governance import break_glass as rules
from dicomnode.governance.decisions import FILTERABLE_OPERATIONS, Decision

log = logging.getLogger("dicomnode.egress")


def override(
    archive: Any,
    request: DisclosureRequest,
    decision: Decision,
    facts: Mapping[str, PatientFacts],
    now: datetime,
) -> Decision:
    """The gate's hook: `decision` as the requester's running grants change it (its reason
    then names the grants used: "break-glass (break-glass-N: why) past: ...", so the ledger
    entry of the disclosure does)."""
    if not decision.denied_patients or request.operation not in rules.OPERATIONS:
        return decision  # nothing refused for a patient's own reasons, or not a retrieval
    store = BreakGlassStore(archive.index, archive.ledger)
    grants = store.active_of(request.requester, now)
    if not grants:
        return decision
    changed, used = rules.override(
        decision,
        request.operation,
        request.requester,
        set(request.study_instance_uids),
        {p: f.issuers for p, f in facts.items()},
        grants,
        now,
        request.operation in FILTERABLE_OPERATIONS,
    )
    if not used:
        return decision
    log.warning(
        "break-glass used by %s",
        request.requester,
        extra={"event": "break_glass", "requester": request.requester, "grants": list(used)},
    )
    return changed


class BreakGlass:
    """Open, end and review grants (the DPO pages and the CLI call these)."""

    def __init__(self, egress: Any, clock: Callable[[], datetime]) -> None:
        self.store = BreakGlassStore(egress.archive.index, egress.archive.ledger)
        self.clock = clock

    def open(
        self,
        requester: str,
        patient_id: str,
        reason: str,
        minutes: int = rules.DEFAULT_MINUTES,
        issuer: str = "",
        study_uid: str = "",
    ) -> Grant:
        """A grant for `requester` (who will retrieve) until `minutes` from now."""
        problem = rules.check_request(reason, minutes, patient_id, requester)
        if problem:
            raise InvalidInput(problem)
        now = self.clock()
        grant = self.store.open(
            requester.strip(),
            patient_id.strip(),
            issuer.strip(),
            study_uid.strip(),
            reason.strip(),
            now,
            rules.expires_at(now, minutes),
        )
        log.warning(
            "break-glass grant %s opened for %s",
            grant.ref,
            requester,
            extra={"event": "break_glass", "grant": grant.ref, "requester": requester},
        )
        return grant

    def end(self, grant_id: int, by: str) -> Grant:
        return self.store.end(grant_id, by, self.clock())

    def review(self, grant_id: int, by: str, note: str, by_is_dpo: bool) -> None:
        if not by_is_dpo:
            raise NotPermitted("only a DPO reviews break-glass grants")
        self.store.review(grant_id, by, note, self.clock())

    def grants(self) -> list[tuple[Grant, dict[str, Any]]]:
        return self.store.grants()

    def unreviewed(self) -> list[Grant]:
        return [g for g, review in self.store.grants() if review["reviewed_at"] is None]
