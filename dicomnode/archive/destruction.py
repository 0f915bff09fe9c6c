"""Destruction: `Archive.delete` (rows, ledger entry, then blobs) and the facts retention
decides on (`retention_facts`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, exists, func, or_, select
from sqlalchemy import delete as sql_delete

from dicomnode.archive import query, schema
from dicomnode.archive.base import ArchiveBase
from dicomnode.archive.pseudonymised import mark_study_destroyed
from dicomnode.core.errors import (
    NotFound,
    NotPermitted,
)
from dicomnode.core.model import (
    LedgerKind,
    Level,
    StoredInstance,
    StudyFacts,
)
from dicomnode.core.times import as_utc


def _holds_covering(conn: Connection, doomed: list[StoredInstance]) -> list[int]:
    """The active legal holds that cover any of `doomed`: on one of its studies, or on its
    patient (Patient ID and, when the hold names one, the same issuer)."""
    holds, st, p = schema.legal_holds, schema.studies, schema.patients
    studies = sorted({d.study_instance_uid for d in doomed})
    people = set(
        conn.execute(
            select(p.c.patient_id, p.c.issuer_of_patient_id)
            .join(st, st.c.patient_pk == p.c.id)
            .where(st.c.study_instance_uid.in_(studies))
        ).all()
    )
    of_person = [
        and_(
            holds.c.patient_id == patient_id,
            or_(
                holds.c.issuer_of_patient_id.is_(None),
                holds.c.issuer_of_patient_id == "",
                holds.c.issuer_of_patient_id == issuer,
            ),
        )
        for patient_id, issuer in sorted(people)
    ]
    return list(
        conn.execute(
            select(holds.c.id)
            .where(
                holds.c.released_at.is_(None),
                or_(holds.c.study_instance_uid.in_(studies), *of_person),
            )
            .order_by(holds.c.id)
        ).scalars()
    )


class Destruction(ArchiveBase):
    """Deleting what the index names, with its ledger entry; the facts retention decides on."""

    def delete(
        self,
        level: Level,
        filters: tuple[tuple[str, str], ...],
        actor: str,
        reason: str,
        detail: dict[str, Any] | None = None,
        results_only: bool = False,
        unless_held: bool = False,
        received_before: datetime | None = None,
    ) -> list[StoredInstance]:
        """Remove every instance whose `filters` keys equal the given values exactly (a Patient
        ID with its issuer, or a Study/Series/SOP Instance UID: never a query pattern) at
        `level` (only those the node's analyses produced, with `results_only`), with the
        series, studies and patients left empty. A deletion entry goes into the ledger in the
        same transaction (with `detail` added: the rule, the recipients that hold copies...);
        the blobs go after it is committed, so nothing can retrieve them once the call returns.

        `unless_held`: refuse (NotPermitted) when an active legal hold covers a patient or
        study of what would go, checked in the same transaction as the deletion.
        `received_before`: leave objects received since then (they arrived after the
        decision to delete was taken)."""
        with self.index.write() as conn:
            doomed = query.find_instances_exactly(conn, filters, include_retained=True)
            if received_before is not None and doomed:
                late = _received_since(conn, doomed, received_before)
                doomed = [d for d in doomed if d.sop_instance_uid not in late]
            if unless_held and doomed:
                held = [f"hold:{h}" for h in _holds_covering(conn, doomed)]
                if held:
                    raise NotPermitted(f"under legal hold {', '.join(held)}: nothing deleted")
            if results_only:
                produced = _produced(conn, doomed)
                doomed = [d for d in doomed if d.sop_instance_uid in produced]
            if not doomed:
                raise NotFound(f"nothing matches {dict(filters)} at {level} level")
            uids = [d.sop_instance_uid for d in doomed]
            _delete_rows(conn, uids)
            entry = self.ledger.append(
                conn,
                LedgerKind.DELETION,
                actor,
                "done",
                {
                    "level": str(level),
                    "target": dict(filters),
                    "reason": reason,
                    "method": "blob files unlinked, index rows deleted",
                    "patient_ids": sorted({d.patient_id for d in doomed}),
                    "study_instance_uids": sorted({d.study_instance_uid for d in doomed}),
                    "sop_instance_uids": uids,
                    **(detail or {}),
                },
            )
            _pseudonymised_data_destroyed(conn, doomed, entry.recorded_at)
        self.destroy_study_keys(doomed, actor)  # before the blobs: unreadable even if one stays
        for instance in doomed:
            self.blobs.delete(instance.blob_path)
        return doomed

    def destroy_study_keys(self, destroyed: Sequence[Any], actor: str) -> list[str]:
        """Crypto-shredding (item 31), with a sealing store (``[storage] encrypt_at_rest``): the
        data keys of the studies of `destroyed` (objects with a study_instance_uid and a
        patient_id) that the archive no longer holds any object of, indexed or held, are
        deleted from the key store, each with its backup purge queued there; one ledger
        entry records them. Returns the studies whose keys were destroyed."""
        keys = getattr(self.blobs, "study_keys", None)
        studies = sorted({d.study_instance_uid for d in destroyed})
        if keys is None or not studies:
            return []
        gone = set(studies) - self._studies_held(studies)
        patients: dict[str, set[str]] = {}
        for d in destroyed:
            patients.setdefault(d.study_instance_uid, set()).add(d.patient_id)
        return self._shred(keys, {s: patients[s] for s in gone}, actor)

    def finish_interrupted_shredding(self, actor: str = "recovery") -> list[str]:
        """Destroy the keys a destruction left because its process stopped between the index
        commit and the key store (item 31): the keys of studies the archive holds nothing of,
        made before a ledger deletion entry that names the study. A key made after it (the
        study received again) or of a study still being placed is kept. At start-up."""
        keys = getattr(self.blobs, "study_keys", None)
        if keys is None:
            return []
        made = keys.studies()
        orphans = set(made) - self._studies_held(sorted(made))
        doomed: dict[str, set[str]] = {}
        t = schema.ledger_entries
        with self.index.read() as conn:
            for study in sorted(orphans):
                for recorded_at, text in conn.execute(
                    select(t.c.recorded_at, t.c.detail).where(
                        t.c.kind == LedgerKind.DELETION, t.c.detail.contains(f'"{study}"')
                    )
                ):
                    detail = json.loads(text)
                    named = study in detail.get("study_instance_uids", [])
                    if named and datetime.fromisoformat(recorded_at) > made[study]:
                        doomed.setdefault(study, set()).update(detail.get("patient_ids", []))
        return self._shred(keys, doomed, actor)

    def backup_purge_done(self, purge_id: int, actor: str) -> Any:
        """Record that every backup holding a destroyed study was purged or has expired (the
        queued `BackupPurge` `purge_id`), with a ledger entry; NotFound when no such purge is
        queued, NotPermitted when encryption at rest is off (nothing is queued then)."""
        keys = getattr(self.blobs, "study_keys", None)
        if keys is None:
            raise NotPermitted("encryption at rest is off ([storage] encrypt_at_rest): no purges")
        done = keys.purge_done(purge_id)
        self.ledger.record(
            LedgerKind.DELETION,
            actor,
            "done",
            {
                "operation": "backup-purge",
                "method": "every backup holding the study purged or expired",
                "study_instance_uids": [done.study_instance_uid],
                "backup_purge": done.id,
                "destroyed_at": done.destroyed_at.isoformat(timespec="seconds"),
                "due_at": done.due_at.isoformat(timespec="seconds"),
            },
        )
        return done

    def _studies_held(self, studies: list[str]) -> set[str]:
        """Those of `studies` the archive holds an object of: indexed or held at intake."""
        st, held = schema.studies, schema.held_objects
        found: set[str] = set()
        with self.index.read() as conn:
            for start in range(0, len(studies), 500):
                chunk = studies[start : start + 500]
                for column in (st.c.study_instance_uid, held.c.study_instance_uid):
                    found |= set(conn.execute(select(column).where(column.in_(chunk))).scalars())
        return found

    def _shred(self, keys: Any, patients: dict[str, set[str]], actor: str) -> list[str]:
        """Destroy the keys of the studies `patients` names (with their patients' IDs) and
        record those that had one in one ledger entry."""
        purges = [
            purge for study in sorted(patients) if (purge := keys.destroy(study, actor)) is not None
        ]
        if not purges:
            return []
        shredded = sorted(p.study_instance_uid for p in purges)
        with self.index.write() as conn:
            self.ledger.append(
                conn,
                LedgerKind.DELETION,
                actor,
                "done",
                {
                    "operation": "crypto-shred",
                    "method": "study data keys destroyed (crypto-shredding); backup purge queued",
                    "patient_ids": sorted({p for s in shredded for p in patients[s]}),
                    "study_instance_uids": shredded,
                    "backup_purges": [
                        {
                            "id": p.id,
                            "study_instance_uid": p.study_instance_uid,
                            "due_at": p.due_at.isoformat(timespec="seconds"),
                        }
                        for p in purges
                    ],
                },
            )
        return shredded

    def retention_facts(self) -> list[StudyFacts]:
        """Per study: patient, StudyDate, modalities, and the count and last receipt of its
        received objects and of the objects the node's analyses produced (the parts of the
        facts the index holds; the caller adds analysis, consent and hold facts)."""
        i, se, st, p = schema.instances, schema.series, schema.studies, schema.patients
        produced = i.c.source_protocol == "analysis"
        query = (
            select(
                st.c.study_instance_uid,
                p.c.patient_id,
                st.c.study_date,
                se.c.modality,
                produced.label("produced"),
                func.count(),
                func.max(i.c.received_at),
            )
            .select_from(i.join(se, i.c.series_pk == se.c.id))
            .join(st, se.c.study_pk == st.c.id)
            .join(p, st.c.patient_pk == p.c.id)
            .group_by(
                st.c.study_instance_uid, p.c.patient_id, st.c.study_date, se.c.modality, produced
            )
        )
        studies: dict[str, dict[str, Any]] = {}
        with self.index.read() as conn:
            for uid, patient, study_date, modality, is_result, count, last in conn.execute(query):
                study = studies.setdefault(
                    uid,
                    {
                        "patient": patient,
                        "date": _date(study_date),
                        "modalities": set(),
                        "images": 0,
                        "results": 0,
                        "images_at": None,
                        "results_at": None,
                    },
                )
                kind = "results" if is_result else "images"
                study[kind] += count
                last = as_utc(last)
                if study[f"{kind}_at"] is None or last > study[f"{kind}_at"]:
                    study[f"{kind}_at"] = last
                if modality and not is_result:
                    study["modalities"].add(modality)
        return [
            StudyFacts(
                study_instance_uid=uid,
                patient_id=s["patient"],
                modalities=frozenset(s["modalities"]),
                images=s["images"],
                results=s["results"],
                images_received_at=s["images_at"],
                results_received_at=s["results_at"],
                study_date=s["date"],
                analysis_done_at=None,
                consent_withdrawn_at=None,
            )
            for uid, s in sorted(studies.items())
        ]


def _date(study_date: str | None) -> datetime | None:
    """A StudyDate (YYYYMMDD) as midnight UTC, or None when absent or malformed."""
    try:
        return datetime.strptime(study_date or "", "%Y%m%d").replace(tzinfo=UTC)
    except ValueError:
        return None


def _pseudonymised_data_destroyed(
    conn: Connection, doomed: list[StoredInstance], recorded_at: str
) -> None:
    """The pseudonymised-data register's records of the studies now gone entirely get their
    destruction date: the deletion entry's (item 36)."""
    st = schema.studies
    studies = sorted({d.study_instance_uid for d in doomed})
    left = set(
        conn.execute(
            select(st.c.study_instance_uid).where(st.c.study_instance_uid.in_(studies))
        ).scalars()
    )
    gone = [s for s in studies if s not in left]
    mark_study_destroyed(conn, gone, datetime.fromisoformat(recorded_at))


def _delete_rows(conn: Connection, uids: list[str]) -> None:
    """Delete the instances `uids` and the series, studies and patients they leave empty."""
    i, se, st, p = schema.instances, schema.series, schema.studies, schema.patients
    series_pks: set[int] = set()
    for start in range(0, len(uids), 500):
        chunk = uids[start : start + 500]
        series_pks |= set(
            conn.execute(select(i.c.series_pk).where(i.c.sop_instance_uid.in_(chunk))).scalars()
        )
        conn.execute(sql_delete(i).where(i.c.sop_instance_uid.in_(chunk)))
    study_pks = set(conn.execute(select(se.c.study_pk).where(se.c.id.in_(series_pks))).scalars())
    conn.execute(
        sql_delete(se).where(se.c.id.in_(series_pks), ~exists().where(i.c.series_pk == se.c.id))
    )
    patient_pks = set(conn.execute(select(st.c.patient_pk).where(st.c.id.in_(study_pks))).scalars())
    emptied = select(st.c.study_instance_uid).where(
        st.c.id.in_(study_pks), ~exists().where(se.c.study_pk == st.c.id)
    )
    retained = schema.retained_studies
    conn.execute(sql_delete(retained).where(retained.c.study_instance_uid.in_(emptied)))
    conn.execute(
        sql_delete(st).where(st.c.id.in_(study_pks), ~exists().where(se.c.study_pk == st.c.id))
    )
    conn.execute(
        sql_delete(p).where(p.c.id.in_(patient_pks), ~exists().where(st.c.patient_pk == p.c.id))
    )


def _received_since(conn: Connection, doomed: list[StoredInstance], since: datetime) -> set[str]:
    """The SOP Instance UIDs of `doomed` received at `since` or later."""
    i = schema.instances
    uids = [d.sop_instance_uid for d in doomed]
    late: set[str] = set()
    for start in range(0, len(uids), 500):
        late |= set(
            conn.execute(
                select(i.c.sop_instance_uid).where(
                    i.c.sop_instance_uid.in_(uids[start : start + 500]),
                    i.c.received_at >= since,
                )
            ).scalars()
        )
    return late


def _produced(conn: Connection, doomed: list[StoredInstance]) -> set[str]:
    """The SOP Instance UIDs of `doomed` that the node's analyses produced."""
    i = schema.instances
    return set(
        conn.execute(
            select(i.c.sop_instance_uid).where(
                i.c.sop_instance_uid.in_([d.sop_instance_uid for d in doomed]),
                i.c.source_protocol == "analysis",
            )
        ).scalars()
    )
