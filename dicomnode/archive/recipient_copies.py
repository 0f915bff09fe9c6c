"""Recipients' destruction confirmations and the notices owed to them, in the index; each
change with its ledger entry (kind ``recipient_copy``) in one transaction."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from dicomnode.archive.index import Index
from dicomnode.archive.ledger import Ledger
from dicomnode.archive.oversight_schema import destruction_confirmations, recipient_notices
from dicomnode.archive.pseudonymised import mark_recipient_destroyed
from dicomnode.core.errors import NotFound

RECIPIENT_COPY_KIND = "recipient_copy"


class RecipientCopyStore:
    def __init__(self, index: Index, ledger: Ledger) -> None:
        self.index = index
        self.ledger = ledger

    def confirm(
        self,
        recipient: str,
        study_uid: str,
        confirmed_at: datetime,
        evidence: str,
        by: str,
        now: datetime,
    ) -> None:
        with self.index.write() as conn:
            conn.execute(
                destruction_confirmations.insert().values(
                    recipient=recipient,
                    study_instance_uid=study_uid,
                    confirmed_at=confirmed_at,
                    evidence=evidence,
                    recorded_by=by,
                    recorded_at=now,
                )
            )
            self.ledger.append(
                conn,
                RECIPIENT_COPY_KIND,
                by,
                "confirmed",
                {
                    "recipient": recipient,
                    "study_instance_uids": [study_uid],
                    "confirmed_at": confirmed_at.isoformat(),
                    "evidence": evidence,
                },
            )
            mark_recipient_destroyed(conn, recipient, study_uid, confirmed_at)  # item 36

    def confirmations(self) -> dict[tuple[str, str], datetime]:
        """The latest confirmation per (recipient, study)."""
        t = destruction_confirmations
        with self.index.read() as conn:
            rows = conn.execute(
                select(t.c.recipient, t.c.study_instance_uid, func.max(t.c.confirmed_at)).group_by(
                    t.c.recipient, t.c.study_instance_uid
                )
            ).all()
        return {(r[0], r[1]): r[2] for r in rows}

    def last_source(self) -> int:
        with self.index.read() as conn:
            return int(conn.execute(select(func.max(recipient_notices.c.source_seq))).scalar() or 0)

    def queue(self, source_seq: int, notice: dict[str, Any], now: datetime) -> bool:
        """Queue one notice (once per causing entry and recipient); False when queued before."""
        try:
            with self.index.write() as conn:
                conn.execute(
                    recipient_notices.insert().values(
                        source_seq=source_seq,
                        recipient=notice["recipient"],
                        patient_id=notice["patient_id"],
                        studies=json.dumps(notice["studies"]),
                        reason=notice["reason"],
                        state="queued",
                        queued_at=now,
                    )
                )
                self.ledger.append(
                    conn,
                    RECIPIENT_COPY_KIND,
                    "node",
                    "notice-queued",
                    {
                        "recipient": notice["recipient"],
                        "patient_ids": [notice["patient_id"]],
                        "study_instance_uids": notice["studies"],
                        "reason": notice["reason"],
                        "caused_by": source_seq,
                    },
                )
        except IntegrityError:
            return False
        return True

    def notices(self) -> list[dict[str, Any]]:
        t = recipient_notices
        with self.index.read() as conn:
            rows = conn.execute(select(t).order_by(t.c.id)).all()
        return [
            {
                "id": r.id,
                "recipient": r.recipient,
                "patient_id": r.patient_id,
                "studies": json.loads(r.studies),
                "reason": r.reason,
                "state": r.state,
                "queued_at": r.queued_at,
                "sent_at": r.sent_at,
                "sent_by": r.sent_by,
                "caused_by": r.source_seq,
            }
            for r in rows
        ]

    def sent(self, notice_id: int, by: str, now: datetime) -> None:
        t = recipient_notices
        with self.index.write() as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.id == notice_id, t.c.state == "queued")
                .values(state="sent", sent_at=now, sent_by=by)
            ).rowcount
            if not changed:
                raise NotFound(f"no queued notice {notice_id}")
            self.ledger.append(conn, RECIPIENT_COPY_KIND, by, "notice-sent", {"notice": notice_id})
