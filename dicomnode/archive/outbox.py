"""The delivery outbox: forwards of results and shares, queued, claimed, retried, finished
(a part of `Registry`)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from dicomnode.archive import schema
from dicomnode.archive.index import Index
from dicomnode.archive.leases import any_due, claim_due, owned_by, retry_or_fail
from dicomnode.archive.ledger import Ledger
from dicomnode.archive.values import (
    CANCELLED,
    DENIED,
    DONE,
    FAILED,
    QUEUED,
    SENDING,
    Delivery,
    _delivery,
)
from dicomnode.core.errors import NotFound
from dicomnode.core.model import (
    LedgerKind,
)


class DeliveryOutbox:
    """Deliveries on their way out."""

    index: Index
    ledger: Ledger

    # --- deliveries -------------------------------------------------------------------------

    def queue_delivery(
        self,
        kind: str,
        recipient: str,
        purpose: str,
        patient_id: str,
        study_uid: str,
        sop_instance_uids: list[str],
        requested_by: str,
        max_attempts: int,
        now: datetime,
        claimed_by: str | None = None,
        lease: timedelta = timedelta(0),
    ) -> int:
        """Queue a delivery (or, with `claimed_by`, insert it already claimed by that worker,
        its first attempt begun)."""
        d = schema.deliveries
        if kind == "forward" and claimed_by is None:
            already = self.forward_already_queued(recipient, study_uid, sop_instance_uids)
            if already is not None:
                return already
        claimed = (
            {
                "state": SENDING,
                "attempts": 1,
                "claimed_by": claimed_by,
                "lease_until": now + lease,
            }
            if claimed_by
            else {"state": QUEUED, "attempts": 0}
        )
        with self.index.write() as conn:
            return int(
                conn.execute(
                    d.insert().values(
                        kind=kind,
                        recipient=recipient,
                        purpose=purpose,
                        patient_id=patient_id,
                        study_instance_uid=study_uid,
                        sop_instance_uids=json.dumps(sop_instance_uids),
                        requested_by=requested_by,
                        max_attempts=max_attempts,
                        not_before=now,
                        created_at=now,
                        **claimed,
                    )
                ).inserted_primary_key[0]
            )

    def forward_already_queued(
        self, recipient: str, study_uid: str, sop_instance_uids: list[str]
    ) -> int | None:
        """The delivery that already forwards exactly these instances to `recipient` (queued,
        being sent, or done), if any: an analysis job claimed again after its node died files
        its result once, and must not send it twice either."""
        d = schema.deliveries
        with self.index.read() as conn:
            found = conn.execute(
                select(d.c.id)
                .where(
                    d.c.kind == "forward",
                    d.c.recipient == recipient,
                    d.c.study_instance_uid == study_uid,
                    d.c.sop_instance_uids == json.dumps(sop_instance_uids),
                    d.c.state.in_((QUEUED, SENDING, DONE)),
                )
                .order_by(d.c.id)
                .limit(1)
            ).scalar()
        return None if found is None else int(found)

    def claim_delivery(
        self, worker: str, now: datetime, lease: timedelta, delivery_id: int | None = None
    ) -> Delivery | None:
        """Take the oldest due delivery (or exactly `delivery_id`, if it is queued)."""
        d = schema.deliveries
        values = {"claimed_by": worker, "lease_until": now + lease, "error": None}
        if delivery_id is None:
            with self.index.read() as conn:
                if not any_due(conn, d, now, QUEUED, SENDING):
                    return None
        with self.index.write() as conn:
            if delivery_id is None:
                row = claim_due(conn, d, self.index.is_sqlite, now, QUEUED, SENDING, values)
                return _delivery(row) if row is not None else None
            changed = conn.execute(
                update(d)
                .where(d.c.id == delivery_id, d.c.state == QUEUED)
                .values(state=SENDING, attempts=d.c.attempts + 1, **values)
            ).rowcount
            if not changed:
                return None
            return _delivery(conn.execute(select(d).where(d.c.id == delivery_id)).one())

    def finish_delivery(
        self,
        delivery_id: int,
        state: str,
        now: datetime,
        outcome: dict[str, Any],
        error: str | None = None,
        worker: str | None = None,
    ) -> bool:
        """Record how a delivery ended; with `worker`, only if it is still that worker's (a
        worker whose lease ran out must not overwrite the one that took it over)."""
        d = schema.deliveries
        where = [d.c.id == delivery_id]
        if worker is not None:
            where.append(owned_by(d, worker, SENDING))
        with self.index.write() as conn:
            return bool(
                conn.execute(
                    update(d)
                    .where(*where)
                    .values(
                        state=state,
                        finished_at=now,
                        lease_until=None,
                        outcome=json.dumps(outcome, default=str),
                        error=error[:4000] if error else None,
                    )
                ).rowcount
            )

    def retry_delivery_later(
        self,
        delivery_id: int,
        now: datetime,
        error: str,
        backoff: timedelta,
        outcome: dict[str, Any],
        worker: str | None = None,
    ) -> str:
        """A failed attempt: queued again after the backoff, or failed for good once its
        attempts are used (only while it is still `worker`'s, when given); returns the state."""
        d = schema.deliveries
        with self.index.write() as conn:
            return retry_or_fail(
                conn,
                d,
                delivery_id,
                now,
                error,
                backoff,
                QUEUED,
                FAILED,
                owned_by(d, worker, SENDING) if worker is not None else None,
                outcome=json.dumps(outcome, default=str),
            )

    def requeue_delivery(self, delivery_id: int, now: datetime, by: str) -> None:
        """Queue a finished delivery (failed, denied, cancelled, or done: to send it again)
        with fresh attempts, recording who did; it is decided again when it is sent."""
        d = schema.deliveries
        with self.index.write() as conn:
            row = conn.execute(select(d).where(d.c.id == delivery_id)).first()
            changed = conn.execute(
                update(d)
                .where(d.c.id == delivery_id, d.c.state.in_((FAILED, DENIED, CANCELLED, DONE)))
                .values(state=QUEUED, attempts=0, not_before=now, finished_at=None, error=None)
            ).rowcount
            if not changed:
                raise NotFound(f"delivery {delivery_id} is not finished")
            self.ledger.append(
                conn,
                LedgerKind.PROCESSING,
                by,
                "requeued",
                {
                    "operation": row.kind,
                    "delivery": delivery_id,
                    "previous_state": row.state,
                    "recipient": row.recipient,
                    "patient_ids": [row.patient_id],
                    "study_instance_uids": [row.study_instance_uid],
                },
            )

    def delivery(self, delivery_id: int) -> Delivery:
        d = schema.deliveries
        with self.index.read() as conn:
            row = conn.execute(select(d).where(d.c.id == delivery_id)).first()
        if row is None:
            raise NotFound(f"no delivery {delivery_id}")
        return _delivery(row)

    def deliveries(
        self,
        state: str | None = None,
        patient_id: str | None = None,
        study_uid: str | None = None,
        limit: int = 100,
    ) -> list[Delivery]:
        d = schema.deliveries
        query = select(d).order_by(d.c.id.desc()).limit(limit)
        if state:
            query = query.where(d.c.state == state)
        if patient_id:
            query = query.where(d.c.patient_id == patient_id)
        if study_uid:
            query = query.where(d.c.study_instance_uid == study_uid)
        with self.index.read() as conn:
            return [_delivery(row) for row in conn.execute(query)]
