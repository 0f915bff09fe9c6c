"""The DPO's casework in the index database: breaches, data-subject request tickets and the
failed-authentication counts the monthly review reads.

Every change to a breach or a ticket is written with its ledger entry in one transaction (kinds
``breach`` and ``ticket``); the review's sign-off is a ledger entry only (``dpo_review``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError

from dicomnode.archive import schema
from dicomnode.archive.index import Index
from dicomnode.archive.ledger import Ledger, LedgerEntry
from dicomnode.core.errors import InvalidInput, NotFound

BREACH_KIND, TICKET_KIND, REVIEW_KIND = "breach", "ticket", "dpo_review"
# Written in a ticket's transaction with it (an automated-decision flag); returns ledger detail.
TicketStep = Callable[[Connection, "TicketRecord"], dict[str, Any]]
MAX_ADDRESS = 64
MAX_TEXT = 20000  # characters of one free-text field


@dataclass(frozen=True)
class BreachRecord:
    """One incident as recorded."""

    id: int
    aware_at: datetime
    occurred_at: datetime | None
    what: str
    facts: dict[str, Any]
    state: str
    notifications: list[dict[str, Any]]
    recorded_by: str
    recorded_at: datetime
    closed_at: datetime | None
    closed_by: str | None

    @property
    def ref(self) -> str:
        return f"breach-{self.id}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "id": self.id,
            "aware_at": self.aware_at.isoformat(),
            "occurred_at": self.occurred_at.isoformat() if self.occurred_at else None,
            "what": self.what,
            "facts": self.facts,
            "state": self.state,
            "notifications": self.notifications,
            "recorded_by": self.recorded_by,
            "recorded_at": self.recorded_at.isoformat(),
            "closed_at": self.closed_at.isoformat() if self.closed_at else None,
            "closed_by": self.closed_by,
        }


@dataclass(frozen=True)
class TicketRecord:
    """One data-subject request as recorded."""

    id: int
    kind: str
    patient_id: str
    issuer: str
    requester: str
    regimes: tuple[str, ...]
    details: str
    received_at: datetime
    due_at: datetime
    state: str
    exemptions: list[dict[str, str]]
    outcome: str
    recorded_by: str
    updated_at: datetime
    updated_by: str

    @property
    def ref(self) -> str:
        return f"ticket-{self.id}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "id": self.id,
            "kind": self.kind,
            "patient_id": self.patient_id,
            "issuer_of_patient_id": self.issuer,
            "requester": self.requester,
            "regimes": list(self.regimes),
            "details": self.details,
            "received_at": self.received_at.isoformat(),
            "due_at": self.due_at.isoformat(),
            "state": self.state,
            "exemptions": self.exemptions,
            "outcome": self.outcome,
            "recorded_by": self.recorded_by,
            "updated_at": self.updated_at.isoformat(),
            "updated_by": self.updated_by,
        }


def _breach(row: Any) -> BreachRecord:
    return BreachRecord(
        row.id,
        row.aware_at,
        row.occurred_at,
        row.what,
        json.loads(row.facts),
        row.state,
        json.loads(row.notifications),
        row.recorded_by,
        row.recorded_at,
        row.closed_at,
        row.closed_by,
    )


def _ticket(row: Any) -> TicketRecord:
    return TicketRecord(
        row.id,
        row.kind,
        row.patient_id,
        row.issuer_of_patient_id,
        row.requester,
        tuple(row.regimes.split(",")),
        row.details,
        row.received_at,
        row.due_at,
        row.state,
        json.loads(row.exemptions),
        row.outcome,
        row.recorded_by,
        row.updated_at,
        row.updated_by,
    )


def _bounded(name: str, text: str) -> str:
    if len(text) > MAX_TEXT:
        raise InvalidInput(f"{name} is longer than {MAX_TEXT} characters")
    return text


class CaseStore:
    """Breaches, tickets and failed-authentication counts, with their ledger entries."""

    def __init__(self, index: Index, ledger: Ledger) -> None:
        self.index = index
        self.ledger = ledger

    # --- breaches ---------------------------------------------------------------------------

    def add_breach(
        self,
        aware_at: datetime,
        occurred_at: datetime | None,
        what: str,
        facts: dict[str, Any],
        by: str,
        now: datetime,
        ledger_detail: dict[str, Any],
    ) -> BreachRecord:
        """Record an incident (state open) and its ledger entry."""
        t = schema.breaches
        body = _bounded("facts", json.dumps(facts, ensure_ascii=False, sort_keys=True))
        with self.index.write() as conn:
            new_id = conn.execute(
                t.insert().values(
                    aware_at=aware_at,
                    occurred_at=occurred_at,
                    what=_bounded("what", what),
                    facts=body,
                    state="open",
                    notifications="[]",
                    recorded_by=by,
                    recorded_at=now,
                )
            ).inserted_primary_key[0]
            record = self._breach_in(conn, new_id)
            self.ledger.append(
                conn, BREACH_KIND, by, "recorded", {"breach": record.ref} | ledger_detail
            )
        return record

    def _breach_in(self, conn: Connection, breach_id: int) -> BreachRecord:
        t = schema.breaches
        row = conn.execute(select(t).where(t.c.id == breach_id)).one_or_none()
        if row is None:
            raise NotFound(f"no breach {breach_id}")
        return _breach(row)

    def breach(self, breach_id: int) -> BreachRecord:
        with self.index.read() as conn:
            return self._breach_in(conn, breach_id)

    def breaches(self) -> list[BreachRecord]:
        t = schema.breaches
        with self.index.read() as conn:
            return [_breach(r) for r in conn.execute(select(t).order_by(t.c.id.desc()))]

    def change_breach(
        self,
        breach_id: int,
        expect_state: str,
        by: str,
        outcome: str,
        detail: dict[str, Any],
        **values: Any,
    ) -> BreachRecord:
        """Update a breach still in `expect_state` (InvalidInput if it moved meanwhile), with a
        ledger entry. ``notifications`` is given as a list."""
        t = schema.breaches
        if "notifications" in values:
            values["notifications"] = json.dumps(values["notifications"], ensure_ascii=False)
        with self.index.write() as conn:
            changed = conn.execute(
                update(t).where(t.c.id == breach_id, t.c.state == expect_state).values(**values)
            ).rowcount
            if not changed:
                self._breach_in(conn, breach_id)  # NotFound if it does not exist
                raise InvalidInput(f"breach {breach_id} changed meanwhile; reload it")
            record = self._breach_in(conn, breach_id)
            self.ledger.append(conn, BREACH_KIND, by, outcome, {"breach": record.ref} | detail)
        return record

    # --- tickets ----------------------------------------------------------------------------

    def add_ticket(
        self,
        kind: str,
        patient_id: str,
        issuer: str,
        requester: str,
        regimes: tuple[str, ...],
        details: str,
        received_at: datetime,
        due_at: datetime,
        by: str,
        now: datetime,
        then: TicketStep | None = None,
    ) -> TicketRecord:
        """Record a ticket (state open) and its ledger entry; `then` writes what goes with it in
        the same transaction (an automated-decision flag) and returns its ledger detail."""
        t = schema.subject_tickets
        with self.index.write() as conn:
            new_id = conn.execute(
                t.insert().values(
                    kind=kind,
                    patient_id=patient_id,
                    issuer_of_patient_id=issuer,
                    requester=requester,
                    regimes=",".join(regimes),
                    details=_bounded("details", details),
                    received_at=received_at,
                    due_at=due_at,
                    state="open",
                    exemptions="[]",
                    outcome="",
                    recorded_by=by,
                    updated_at=now,
                    updated_by=by,
                )
            ).inserted_primary_key[0]
            record = self._ticket_in(conn, new_id)
            detail = self._ticket_detail(record)
            if then is not None:
                detail |= then(conn, record)
            self.ledger.append(conn, TICKET_KIND, by, "opened", detail)
        return record

    @staticmethod
    def _ticket_detail(record: TicketRecord) -> dict[str, Any]:
        return {
            "ticket": record.ref,
            "request": record.kind,
            "patient_ids": [record.patient_id],
            "issuer_of_patient_id": record.issuer,
            "requester": record.requester,
            "regimes": list(record.regimes),
            "received_at": record.received_at.isoformat(),
            "due_at": record.due_at.isoformat(),
            "state": record.state,
        }

    def _ticket_in(self, conn: Connection, ticket_id: int) -> TicketRecord:
        t = schema.subject_tickets
        row = conn.execute(select(t).where(t.c.id == ticket_id)).one_or_none()
        if row is None:
            raise NotFound(f"no data-subject request ticket {ticket_id}")
        return _ticket(row)

    def ticket(self, ticket_id: int) -> TicketRecord:
        with self.index.read() as conn:
            return self._ticket_in(conn, ticket_id)

    def tickets(self) -> list[TicketRecord]:
        t = schema.subject_tickets
        with self.index.read() as conn:
            return [_ticket(r) for r in conn.execute(select(t).order_by(t.c.id.desc()))]

    def change_ticket(
        self,
        ticket_id: int,
        expect_states: tuple[str, ...],
        by: str,
        now: datetime,
        ledger_outcome: str,
        extra: dict[str, Any],
        then: TicketStep | None = None,
        **values: Any,
    ) -> TicketRecord:
        """Move a ticket still in one of `expect_states` on (InvalidInput otherwise), with its
        ledger entry (and what `then` writes with it). ``exemptions`` is given as a list."""
        t = schema.subject_tickets
        if "exemptions" in values:
            values["exemptions"] = json.dumps(values["exemptions"], ensure_ascii=False)
        if "outcome" in values:
            values["outcome"] = _bounded("outcome", values["outcome"])
        with self.index.write() as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.id == ticket_id, t.c.state.in_(expect_states))
                .values(updated_at=now, updated_by=by, **values)
            ).rowcount
            if not changed:
                current = self._ticket_in(conn, ticket_id)
                raise InvalidInput(f"{current.ref} is {current.state}: it cannot be changed so")
            record = self._ticket_in(conn, ticket_id)
            detail = self._ticket_detail(record) | extra
            if then is not None:
                detail |= then(conn, record)
            self.ledger.append(conn, TICKET_KIND, by, ledger_outcome, detail)
        return record

    # --- failed authentication ----------------------------------------------------------------

    def count_auth_failure(self, kind: str, address: str, now: datetime, count: int = 1) -> None:
        """Add `count` failed authentications to their hour (one row per hour, kind, address)."""
        t = schema.auth_failures
        hour = now.replace(minute=0, second=0, microsecond=0)
        key = (t.c.hour == hour, t.c.kind == kind[:32], t.c.address == address[:MAX_ADDRESS])
        for _ in range(3):
            try:
                with self.index.write() as conn:
                    if conn.execute(update(t).where(*key).values(count=t.c.count + count)).rowcount:
                        return
                    conn.execute(
                        t.insert().values(
                            hour=hour, kind=kind[:32], address=address[:MAX_ADDRESS], count=count
                        )
                    )
                return
            except IntegrityError:  # another process inserted the row meanwhile: count again
                continue

    def auth_failures(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        t = schema.auth_failures
        with self.index.read() as conn:
            rows = conn.execute(select(t).where(t.c.hour >= start, t.c.hour < end)).all()
        return [
            {"at": r.hour.isoformat(), "kind": r.kind, "address": r.address, "count": r.count}
            for r in rows
        ]

    # --- the ledger ---------------------------------------------------------------------------

    def entries_between(
        self, start: datetime, end: datetime, kinds: tuple[str, ...]
    ) -> Iterator[dict[str, Any]]:
        """Ledger entries of `kinds` recorded in [start, end), as plain dicts."""
        t = schema.ledger_entries
        low, high = (m.isoformat(timespec="microseconds") for m in (start, end))
        with self.index.read() as conn:
            rows = conn.execute(
                select(t)
                .where(t.c.kind.in_(kinds), t.c.recorded_at >= low, t.c.recorded_at < high)
                .order_by(t.c.seq)
            ).all()
        for row in rows:
            entry = LedgerEntry.from_row(row)
            yield {
                "seq": entry.seq,
                "recorded_at": entry.recorded_at,
                "kind": entry.kind,
                "actor": entry.actor,
                "outcome": entry.outcome,
                "detail": entry.data,
            }

    def reviews(self, month: str | None = None) -> list[LedgerEntry]:
        """The DPO's sign-offs (ledger entries of kind dpo_review), newest first."""
        t = schema.ledger_entries
        with self.index.read() as conn:
            rows = conn.execute(
                select(t).where(t.c.kind == REVIEW_KIND).order_by(t.c.seq.desc())
            ).all()
        found = [LedgerEntry.from_row(r) for r in rows]
        return [e for e in found if month is None or e.data.get("month") == month]

    def record_review(self, by: str, detail: dict[str, Any]) -> LedgerEntry:
        return self.ledger.record(REVIEW_KIND, by, "signed", detail)
