"""The pseudonymised-data register in the index (table ``pseudonymised_records``, migration
0015): one record per pseudonymised disclosure, kept apart from the ledger auditors read (the
ledger's disclosure entry names the record by its id).

Where the re-identification linkage is (PIPA Art. 28-4(1), Decree Art. 29-5(1)): the
pseudonyms and replacement UIDs are keyed HMACs (governance/deid_keys.py) under the nodes'
``deid-secret``, which only the key store (archive/keys.py, table ``node_secrets``) reads, for
egress's de-identification. No UID map or pseudonym is stored: not here, not in the ledger.

A record gets its destruction date when its pseudonymised data are destroyed: the node
destroyed the source study (`mark_study_destroyed`, in `Archive.delete`'s transaction), or the
recipient confirmed it destroyed its copy (`mark_recipient_destroyed`, in the confirmation's).
How long it is kept after that is governance's rule (governance/pseudonymised.py: + 3 years),
applied by stewardship's sweep, which removes only the records it names (`remove`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, select, update

from dicomnode.archive.index import Index
from dicomnode.archive.schema import pseudonymised_records

# how a record's pseudonymised data came to be destroyed (the register's `destroyed_how`)
STUDY_DESTROYED = "study-destroyed"  # the node destroyed the source study: nothing links back
RECIPIENT_CONFIRMED = "recipient-confirmed"  # the recipient confirmed it destroyed its copy


@dataclass(frozen=True)
class PseudonymisedRecord:
    """One record of the register (see the table's comment in schema.py)."""

    id: int
    delivery_id: int | None
    processed_at: datetime
    processed_by: str
    purpose: str
    activity: str
    basis: str
    recipient: str
    recipient_name: str
    recipient_country: str
    profile: str
    method: dict[str, Any]
    items: list[tuple[str, str]]
    patient_ids: list[str]
    study_instance_uid: str
    instances: int
    instances_sent: int
    withheld: int
    last_sent_at: datetime | None
    period: str
    period_end: datetime | None
    policy_version: str
    destroyed_at: datetime | None
    destroyed_how: str


def _record(row: Any) -> PseudonymisedRecord:
    values = dict(row._mapping)
    values["method"] = json.loads(values["method"])
    values["items"] = [tuple(pair) for pair in json.loads(values["items"])]
    values["patient_ids"] = json.loads(values["patient_ids"])
    return PseudonymisedRecord(**values)


class PseudonymisedRegister:
    """The register's rows in one index."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def open(self, delivery_id: int, facts: dict[str, Any]) -> int:
        """The record of delivery `delivery_id` (written before its data leave; a retry of the
        same delivery updates it): its id. `facts` are the table's columns."""
        t = pseudonymised_records
        values = {
            **facts,
            "method": json.dumps(facts["method"], sort_keys=True),
            "items": json.dumps([list(p) for p in facts["items"]]),
            "patient_ids": json.dumps(sorted(facts["patient_ids"])),
        }
        with self.index.write() as conn:
            found = conn.execute(select(t.c.id).where(t.c.delivery_id == delivery_id)).scalar()
            if found is not None:
                kept = {"processed_at", "instances_sent", "last_sent_at", "destroyed_at"}
                conn.execute(
                    update(t)
                    .where(t.c.id == found)
                    .values({k: v for k, v in values.items() if k not in kept})
                )
                return int(found)
            inserted = conn.execute(
                t.insert().values(
                    delivery_id=delivery_id,
                    instances_sent=0,
                    last_sent_at=None,
                    destroyed_at=None,
                    destroyed_how="",
                    **values,
                )
            )
            return int(inserted.inserted_primary_key[0])

    def sent(self, record_id: int, count: int, at: datetime) -> None:
        """`count` more of the record's objects left (a delivery attempt's outcome)."""
        if not count:
            return
        t = pseudonymised_records
        with self.index.write() as conn:
            conn.execute(
                update(t)
                .where(t.c.id == record_id)
                .values(instances_sent=t.c.instances_sent + count, last_sent_at=at)
            )

    def records(self) -> list[PseudonymisedRecord]:
        """Every record, oldest first."""
        t = pseudonymised_records
        with self.index.read() as conn:
            return [_record(r) for r in conn.execute(select(t).order_by(t.c.id))]

    def remove(self, record_ids: list[int]) -> int:
        """Remove the records `record_ids` (those governance says are past their keep-until;
        never one whose data are not known to be destroyed); how many went."""
        if not record_ids:
            return 0
        t = pseudonymised_records
        with self.index.write() as conn:
            return int(
                conn.execute(
                    delete(t).where(t.c.id.in_(record_ids), t.c.destroyed_at.is_not(None))
                ).rowcount
            )


def _destroyed(conn: Connection, where: list[Any], at: datetime, how: str) -> int:
    t = pseudonymised_records
    return int(
        conn.execute(
            update(t)
            .where(t.c.destroyed_at.is_(None), *where)
            .values(destroyed_at=at, destroyed_how=how)
        ).rowcount
    )


def mark_study_destroyed(conn: Connection, study_uids: list[str], at: datetime) -> int:
    """In the destroying transaction: the records of studies the node no longer holds get
    their destruction date `at` (nothing links their pseudonyms back any more); how many."""
    if not study_uids:
        return 0
    t = pseudonymised_records
    return _destroyed(conn, [t.c.study_instance_uid.in_(study_uids)], at, STUDY_DESTROYED)


def mark_recipient_destroyed(
    conn: Connection, recipient: str, study_uid: str, confirmed_at: datetime
) -> int:
    """In the confirmation's transaction: the records of what `recipient` received of
    `study_uid` up to `confirmed_at` get that destruction date; how many."""
    t = pseudonymised_records
    return _destroyed(
        conn,
        [
            t.c.recipient == recipient,
            t.c.study_instance_uid == study_uid,
            t.c.processed_at <= confirmed_at,
        ],
        confirmed_at,
        RECIPIENT_CONFIRMED,
    )
