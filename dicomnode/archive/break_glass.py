"""Break-glass grants in the index: opened, ended early, reviewed by the DPO; each change is
written with its ledger entry (kind ``break_glass``) in one transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from dicomnode.archive.index import Index
from dicomnode.archive.ledger import Ledger
from dicomnode.archive.oversight_schema import break_glass_grants
from dicomnode.core.errors import NotFound, NotPermitted
from dicomnode.core.grants import Grant

BREAK_GLASS_KIND = "break_glass"
MAX_TEXT = 4000


def _grant(row: Any) -> Grant:
    return Grant(
        row.id,
        row.requester,
        row.patient_id,
        row.issuer_of_patient_id,
        row.study_instance_uid or "",
        row.reason,
        row.granted_at,
        row.expires_at,
        row.ended_at,
    )


def review_of(row: Any) -> dict[str, Any]:
    return {
        "reviewed_by": row.reviewed_by,
        "reviewed_at": row.reviewed_at,
        "review_note": row.review_note,
    }


class BreakGlassStore:
    """Open, end, review and read break-glass grants."""

    def __init__(self, index: Index, ledger: Ledger) -> None:
        self.index = index
        self.ledger = ledger

    def open(
        self,
        requester: str,
        patient_id: str,
        issuer: str,
        study_uid: str,
        reason: str,
        granted_at: datetime,
        expires_at: datetime,
    ) -> Grant:
        """A new grant, ledgered as ``granted`` with ``review: pending`` (the DPO's queue)."""
        t = break_glass_grants
        with self.index.write() as conn:
            new_id = conn.execute(
                t.insert().values(
                    requester=requester,
                    patient_id=patient_id,
                    issuer_of_patient_id=issuer,
                    study_instance_uid=study_uid or None,
                    reason=reason[:MAX_TEXT],
                    granted_at=granted_at,
                    expires_at=expires_at,
                )
            ).inserted_primary_key[0]
            self.ledger.append(
                conn,
                BREAK_GLASS_KIND,
                requester,
                "granted",
                {
                    "grant": f"break-glass-{new_id}",
                    "requester": requester,
                    "patient_ids": [patient_id],
                    "issuer_of_patient_id": issuer,
                    "study_instance_uids": [study_uid] if study_uid else [],
                    "reason": reason[:MAX_TEXT],
                    "expires_at": expires_at.isoformat(),
                    "review": "pending",
                },
            )
        return self.get(int(new_id))[0]

    def get(self, grant_id: int) -> tuple[Grant, dict[str, Any]]:
        """The grant and its review."""
        t = break_glass_grants
        with self.index.read() as conn:
            row = conn.execute(select(t).where(t.c.id == grant_id)).first()
        if row is None:
            raise NotFound(f"no break-glass grant {grant_id}")
        return _grant(row), review_of(row)

    def active_of(self, requester: str, now: datetime) -> list[Grant]:
        """`requester`'s grants running at `now` (one indexed read)."""
        t = break_glass_grants
        with self.index.read() as conn:
            rows = conn.execute(
                select(t).where(
                    t.c.requester == requester,
                    t.c.expires_at > now,
                    t.c.ended_at.is_(None),
                )
            ).all()
        return [_grant(r) for r in rows]

    def grants(self, limit: int = 500) -> list[tuple[Grant, dict[str, Any]]]:
        t = break_glass_grants
        with self.index.read() as conn:
            rows = conn.execute(select(t).order_by(t.c.id.desc()).limit(limit)).all()
        return [(_grant(r), review_of(r)) for r in rows]

    def end(self, grant_id: int, by: str, now: datetime) -> Grant:
        t = break_glass_grants
        with self.index.write() as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.id == grant_id, t.c.ended_at.is_(None), t.c.expires_at > now)
                .values(ended_at=now)
            ).rowcount
            if not changed:
                raise NotPermitted(f"break-glass grant {grant_id} is not running")
            self.ledger.append(
                conn, BREAK_GLASS_KIND, by, "ended", {"grant": f"break-glass-{grant_id}"}
            )
        return self.get(grant_id)[0]

    def review(self, grant_id: int, by: str, note: str, now: datetime) -> None:
        """The DPO's review of a grant (once), ledgered with its note."""
        t = break_glass_grants
        with self.index.write() as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.id == grant_id, t.c.reviewed_at.is_(None))
                .values(reviewed_by=by, reviewed_at=now, review_note=note[:MAX_TEXT])
            ).rowcount
            if not changed:
                raise NotPermitted(f"break-glass grant {grant_id} is reviewed already (or none)")
            self.ledger.append(
                conn,
                BREAK_GLASS_KIND,
                by,
                "reviewed",
                {"grant": f"break-glass-{grant_id}", "note": note[:MAX_TEXT]},
            )
