"""The pseudonymised-data register's end (checklist item 36): a retention sweep removes the
records whose keep-until has come (their pseudonymised data destroyed 3 years before, PIPA Art.
28-4(3)), with a ledger entry; a record whose data are not known to be destroyed stays."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from dicomnode.archive.pseudonymised import PseudonymisedRegister
from dicomnode.core.ledger_events import RecordsPurged
from dicomnode.governance import pseudonymised as rules

PURGE_RULE = "PIPA-28-4-3"  # records kept >= 3 years after the pseudonymised data's destruction


def purge_pseudonymised_records(archive: Any, by: str, policy_version: str, now: datetime) -> int:
    """Remove the register's records past their keep-until at `now`; how many went."""
    register = PseudonymisedRegister(archive.index)
    due = [
        r.id
        for r in register.records()
        if r.destroyed_at is not None and rules.may_purge(rules.keep_until(r.destroyed_at), now)
    ]
    removed = register.remove(due)
    if removed:
        purged = RecordsPurged(
            rule_id=PURGE_RULE,
            method="index rows deleted",
            removed={"pseudonymised_records": removed},
            finished_before=now.isoformat(),  # each one's keep-until had come by then
            policy_version=policy_version,
        )
        archive.ledger.record(purged.kind, by, "done", purged.as_details())
    return removed
