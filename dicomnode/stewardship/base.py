"""What every stewardship operation shares: the archive, the clock, the audit log and
the four-eyes gate; and a data-subject request's outcome."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dicomnode.archive import Archive
from dicomnode.archive.approvals import ApprovalStore
from dicomnode.core.times import utc_now
from dicomnode.governance import approvals


@dataclass(frozen=True)
class SubjectOutcome:
    """The outcome of a data-subject request: done or refused, why, and what changed."""

    done: bool
    reason: str
    changed: dict[str, Any]


class StewardshipBase:
    """The archive, clock and audit log the operations use, and the four-eyes gate."""

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
