"""Intake's quarantine: objects filed aside, not indexed, until released or discarded (a
part of `Registry`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select

from dicomnode.archive import schema
from dicomnode.archive.index import Index
from dicomnode.archive.ledger import Ledger
from dicomnode.archive.values import (
    GOVERNANCE_LOCK,
    QuarantinedObject,
    _chunks,
)
from dicomnode.core.model import (
    LedgerKind,
)
from dicomnode.core.times import as_utc


class QuarantineRecords:
    """The quarantine's rows."""

    index: Index
    ledger: Ledger

    def quarantine(
        self, held: QuarantinedObject, size: int, sha256: str, detail: dict[str, Any]
    ) -> bool:
        """File `held` aside in the quarantine; the first object quarantined for a study and
        reason gets a ledger entry (outcome "held", as before).
        Returns False when that object was already held (an identical re-send)."""
        h = schema.held_objects
        with self.index.write() as conn:
            self.index.serialize(conn, GOVERNANCE_LOCK)
            if conn.execute(
                select(h.c.id).where(h.c.sop_instance_uid == held.sop_instance_uid)
            ).first():
                return False
            first = (
                conn.execute(
                    select(h.c.id).where(
                        h.c.study_instance_uid == held.study_instance_uid,
                        h.c.rule_id == held.rule_id,
                    )
                ).first()
                is None
            )
            conn.execute(
                h.insert().values(
                    **{k: getattr(held, k) for k in QuarantinedObject.__dataclass_fields__},
                    size=size,
                    sha256=sha256,
                )
            )
            if first:
                self.ledger.append(
                    conn, LedgerKind.PROCESSING, held.source_caller or "intake", "held", detail
                )
        return True

    def quarantined(
        self, study_uid: str | None = None, patient_id: str | None = None
    ) -> list[QuarantinedObject]:
        h = schema.held_objects
        query = select(h).order_by(h.c.held_at, h.c.id)
        if study_uid:
            query = query.where(h.c.study_instance_uid == study_uid)
        if patient_id:
            query = query.where(h.c.patient_id == patient_id)
        with self.index.read() as conn:
            return [
                QuarantinedObject(
                    **{
                        k: (as_utc(row._mapping[k]) if k == "held_at" else row._mapping[k])
                        for k in QuarantinedObject.__dataclass_fields__
                    }
                )
                for row in conn.execute(query)
            ]

    def drop_quarantined(
        self, sop_instance_uids: list[str], by: str, outcome: str, detail: dict[str, Any]
    ) -> int:
        """Remove quarantined rows (released into the archive, or discarded) with a ledger
        entry."""
        h = schema.held_objects
        removed = 0
        with self.index.write() as conn:
            for chunk in _chunks(sop_instance_uids):
                removed += conn.execute(delete(h).where(h.c.sop_instance_uid.in_(chunk))).rowcount
            self.ledger.append(conn, LedgerKind.PROCESSING, by, outcome, detail)
        return removed
