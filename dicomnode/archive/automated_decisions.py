"""Flags on AI outputs: a data subject's refusal of, or request to explain, an automated decision
(PIPA 37-2), in the index database.

A flag belongs to one data-subject request ticket (kinds ``ai-refusal`` and ``ai-explanation``)
and is written in the ticket's own transactions: opened with it (naming the reviewer the
request is routed to) and resolved when the ticket is done or refused. While a refusal is open
the patient's new analysis is held (`Gate.permit_processing` asks `open_refusal`); resolving it
queues again the jobs it held.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, select, update

from dicomnode.archive import schema
from dicomnode.archive.index import Index
from dicomnode.archive.jobs import AWAITING_GOVERNANCE
from dicomnode.archive.jobs import QUEUED as JOB_QUEUED

OPEN, RESOLVED = "open", "resolved"
REFUSAL_RULE = "PIPA-37-2"  # the rule id a held job's reason names


@dataclass(frozen=True)
class DecisionFlag:
    """A request about the AI outputs of a patient (of one study, when it names one)."""

    id: int
    ticket_id: int
    request: str  # refuse | explain
    patient_id: str
    issuer: str
    study_instance_uid: str  # "": every study of the patient
    reviewer: str
    state: str  # open | resolved
    flagged_at: datetime
    resolved_at: datetime | None

    @property
    def ticket_ref(self) -> str:
        return f"ticket-{self.ticket_id}"

    def covers(self, patient_id: str, study_uid: str) -> bool:
        """Whether the outputs of this patient's study are flagged."""
        return patient_id == self.patient_id and self.study_instance_uid in ("", study_uid)

    def hold_reason(self) -> str:
        """Why a job of the patient waits (the job listing shows it)."""
        return (
            f"patient {self.patient_id} refused automated processing ({self.ticket_ref}, "
            f"PIPA 37-2): held until {self.reviewer} has reviewed the request"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ticket": self.ticket_ref,
            "request": self.request,
            "patient_id": self.patient_id,
            "issuer_of_patient_id": self.issuer,
            "study_instance_uid": self.study_instance_uid,
            "reviewer": self.reviewer,
            "state": self.state,
            "flagged_at": self.flagged_at.isoformat(),
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
        }


def _flag(row: Any) -> DecisionFlag:
    return DecisionFlag(
        row.id,
        row.ticket_id,
        row.request,
        row.patient_id,
        row.issuer_of_patient_id,
        row.study_instance_uid,
        row.reviewer,
        row.state,
        row.flagged_at,
        row.resolved_at,
    )


class DecisionFlagStore:
    """The flags (see the module docstring); writes happen inside a ticket's transaction."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def add_in(
        self,
        conn: Connection,
        ticket_id: int,
        request: str,
        patient_id: str,
        issuer: str,
        study_uid: str,
        reviewer: str,
        now: datetime,
    ) -> DecisionFlag:
        t = schema.automated_decision_flags
        new_id = conn.execute(
            t.insert().values(
                ticket_id=ticket_id,
                request=request,
                patient_id=patient_id,
                issuer_of_patient_id=issuer,
                study_instance_uid=study_uid,
                reviewer=reviewer,
                state=OPEN,
                flagged_at=now,
            )
        ).inserted_primary_key[0]
        return _flag(conn.execute(select(t).where(t.c.id == new_id)).one())

    def resolve_in(self, conn: Connection, ticket_id: int, now: datetime) -> dict[str, Any]:
        """Resolve the ticket's flag (if it has one) and queue again the analysis jobs its
        refusal held; returns what changed, for the ticket's ledger entry."""
        t, jobs = schema.automated_decision_flags, schema.analysis_jobs
        row = conn.execute(select(t).where(t.c.ticket_id == ticket_id)).one_or_none()
        if row is None or row.state != OPEN:
            return {}
        flag = _flag(row)
        conn.execute(update(t).where(t.c.id == flag.id).values(state=RESOLVED, resolved_at=now))
        held = and_(
            jobs.c.patient_id == flag.patient_id,
            jobs.c.state == AWAITING_GOVERNANCE,
            jobs.c.error.like(f"%({flag.ticket_ref}, PIPA 37-2)%"),
        )
        released = list(conn.execute(select(jobs.c.id).where(held)).scalars())
        if released:
            conn.execute(
                update(jobs).where(jobs.c.id.in_(released)).values(state=JOB_QUEUED, error=None)
            )
        return {"flag": "resolved", "released_jobs": released}

    def open_refusal(self, patient_id: str) -> DecisionFlag | None:
        """The patient's oldest open refusal of automated processing, if any."""
        t = schema.automated_decision_flags
        with self.index.read() as conn:
            row = conn.execute(
                select(t)
                .where(t.c.patient_id == patient_id, t.c.state == OPEN, t.c.request == "refuse")
                .order_by(t.c.id)
                .limit(1)
            ).one_or_none()
        return _flag(row) if row is not None else None

    def flags(self, patient_ids: Iterable[str] | None = None) -> list[DecisionFlag]:
        """Every flag (of these patients), newest first."""
        t = schema.automated_decision_flags
        query = select(t).order_by(t.c.id.desc())
        if patient_ids is not None:
            query = query.where(t.c.patient_id.in_(sorted(set(patient_ids))))
        with self.index.read() as conn:
            return [_flag(r) for r in conn.execute(query)]

    def of_ticket(self, ticket_id: int) -> DecisionFlag | None:
        t = schema.automated_decision_flags
        with self.index.read() as conn:
            row = conn.execute(select(t).where(t.c.ticket_id == ticket_id)).one_or_none()
        return _flag(row) if row is not None else None
