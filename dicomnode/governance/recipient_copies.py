"""Copies held by recipients (checklist item 29): what each recipient promised to keep them for
(the policy's ``recipients[].retention``, PIPA 17(2)4), whether their destruction was confirmed,
and which are overdue; and the notices an erasure or a consent withdrawal owes to each recipient
holding copies. Pure: decided from the facts handed in, at `now`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from dicomnode.governance.policy import Period

CONFIRMED, KEPT, OVERDUE, NO_PROMISE = "confirmed", "kept", "overdue", "no-promise"


@dataclass(frozen=True)
class CopyStatus:
    """One recipient's copy of one study."""

    recipient: str
    study_instance_uid: str
    last_at: datetime  # when the recipient last received it
    promised: str  # the retention it promised ("" when the policy names none)
    due_at: datetime | None  # when it must be destroyed by
    confirmed_at: datetime | None  # destruction confirmed (after the last copy)
    state: str  # confirmed, kept (not due yet), overdue, no-promise

    def as_dict(self) -> dict[str, object]:
        return {
            "recipient": self.recipient,
            "study_instance_uid": self.study_instance_uid,
            "last_at": self.last_at.isoformat(),
            "promised": self.promised,
            "due_at": self.due_at.isoformat() if self.due_at else None,
            "confirmed_at": self.confirmed_at.isoformat() if self.confirmed_at else None,
            "state": self.state,
        }


def copy_status(
    copies: list[tuple[str, str, datetime]],
    promised: dict[str, str],
    confirmations: dict[tuple[str, str], datetime],
    now: datetime,
) -> list[CopyStatus]:
    """The state of each (recipient, study, last received) copy: a confirmation counts when it
    is later than the last copy; without one, a copy past the recipient's promised retention
    is overdue."""
    found = []
    for recipient, study, last_at in sorted(copies):
        confirmed = confirmations.get((recipient, study))
        if confirmed is not None and confirmed < last_at:
            confirmed = None  # a copy sent after the confirmation needs its own
        period = promised.get(recipient, "")
        due = Period.parse(period).after(last_at) if period else None
        if confirmed is not None:
            state = CONFIRMED
        elif due is None:
            state = NO_PROMISE
        else:
            state = OVERDUE if now >= due else KEPT
        found.append(CopyStatus(recipient, study, last_at, period, due, confirmed, state))
    return found


def notices_owed(
    reason: str, patient_id: str, copies: dict[str, list[str]]
) -> list[dict[str, object]]:
    """The notices an erasure or a withdrawal (`reason`) owes: one per recipient holding
    copies (`copies`: recipient -> studies), naming the patient and the studies."""
    return [
        {"recipient": r, "patient_id": patient_id, "studies": sorted(set(s)), "reason": reason}
        for r, s in sorted(copies.items())
        if r
    ]
