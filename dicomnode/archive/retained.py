"""Studies kept only because a law requires it (PIPA 21(3), checklist item 33): stored apart.

When a study's purpose has ended (consent withdrawn, an erasure refused under a statutory
retention, the consented period over) and only a legal retention duty keeps it, `retain` moves
its blobs to a separate area of the blob store, ``retained/<key>`` (a folder of its own on the
filesystem, a prefix of its own in a bucket, which a mount or a bucket policy can restrict
further), marks the study in ``retained_studies`` and writes a ledger entry (kind
``retention``, outcome ``retained-by-law``: what, the legal basis code, the period's end, why).

A marked study is invisible to the query engine (`archive.query`): QIDO-RS, C-FIND, WADO-RS,
C-MOVE, C-GET, forwarding, share links, analysis and patient tokens never see it. Only
`RetainedStore.instances` reads it, for the legal-access way out (`egress.gate.Gate.
retrieve_retained`), and destruction (`Archive.delete`) removes it like any study when the
legal period ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update

from dicomnode.archive import query, schema
from dicomnode.archive.blobstore import RETAINED_PREFIX, read_all
from dicomnode.core.errors import NotFound
from dicomnode.core.model import StoredInstance

RETAINED_KIND = "retention"  # the ledger kind of a study moved to the retained store
RETAINED_OUTCOME = "retained-by-law"
MOVE_METHOD = f"blobs copied to {RETAINED_PREFIX} and the originals deleted; index rows marked"


@dataclass(frozen=True)
class RetainedStudy:
    """A study retained by law: the legal basis, the rule and the end of the legal period."""

    study_instance_uid: str
    patient_id: str
    legal_basis: str
    rule_id: str
    retained_until: datetime
    ground: str
    retained_at: datetime
    retained_by: str

    def as_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["retained_until"] = self.retained_until.isoformat()
        data["retained_at"] = self.retained_at.isoformat()
        return data


class RetainedStore:
    """The retained-by-law area of an archive (see the module docstring)."""

    def __init__(self, archive: Any) -> None:
        self.archive = archive

    def studies(self, study_uid: str | None = None) -> list[RetainedStudy]:
        """The studies retained by law (or the one `study_uid`, when it is)."""
        r = schema.retained_studies
        statement = select(r).order_by(r.c.retained_at, r.c.study_instance_uid)
        if study_uid is not None:
            statement = statement.where(r.c.study_instance_uid == study_uid)
        with self.archive.index.read() as conn:
            return [RetainedStudy(**row._mapping) for row in conn.execute(statement)]

    def stragglers(self) -> list[RetainedStudy]:
        """The retained studies holding objects that arrived after they were moved (their
        blobs are still outside ``retained/``): one query; the sweep moves them."""
        r, i, se, st = schema.retained_studies, schema.instances, schema.series, schema.studies
        outside = (
            select(st.c.study_instance_uid)
            .join(se, se.c.study_pk == st.c.id)
            .join(i, i.c.series_pk == se.c.id)
            .where(~i.c.blob_path.startswith(RETAINED_PREFIX, autoescape=True))
            .distinct()
        )
        with self.archive.index.read() as conn:
            return [
                RetainedStudy(**row._mapping)
                for row in conn.execute(select(r).where(r.c.study_instance_uid.in_(outside)))
            ]

    def get(self, study_uid: str) -> RetainedStudy:
        """The retained study, NotFound when `study_uid` is not retained by law."""
        found = self.studies(study_uid)
        if not found:
            raise NotFound(f"no study {study_uid} is retained by law")
        return found[0]

    def instances(self, study_uid: str, sop_uid: str = "") -> list[StoredInstance]:
        """The instances of a retained study (or its one instance `sop_uid`); NotFound when
        the study is not retained by law. For the legal-access way out only."""
        self.get(study_uid)
        keys = (("StudyInstanceUID", study_uid),)
        if sop_uid:
            keys += (("SOPInstanceUID", sop_uid),)
        with self.archive.index.read() as conn:
            found = query.find_instances_exactly(conn, keys, include_retained=True)
        if not found:
            raise NotFound(f"no instance {sop_uid} in the retained study {study_uid}")
        return found

    def retain(
        self,
        study_uid: str,
        legal_basis: str,
        rule_id: str,
        until: datetime,
        ground: str,
        by: str,
        now: datetime,
        detail: dict[str, Any] | None = None,
    ) -> list[StoredInstance]:
        """Move a study's blobs to ``retained/`` and mark it retained by law, with a ledger
        entry in the same transaction as the mark; returns the instances moved (none when it
        was already retained and every blob already moved). An instance that arrived after
        the study was marked is moved by the next call. NotFound when the study is not held.

        Order: copies written (durable) -> rows re-pointed, mark and ledger entry committed ->
        originals deleted. A failure before the commit removes the copies; a crash leaves at
        worst unindexed blobs (`archive check --repair` removes them), never a row without
        its blob."""
        with self.archive.index.read() as conn:
            found = query.find_instances_exactly(
                conn, (("StudyInstanceUID", study_uid),), include_retained=True
            )
        if not found:
            raise NotFound(f"no study {study_uid}")
        marked = bool(self.studies(study_uid))
        pending = [i for i in found if not i.blob_path.startswith(RETAINED_PREFIX)]
        if marked and not pending:
            return []
        blobs = self.archive.blobs
        copied: list[StoredInstance] = []
        try:
            for instance in pending:
                blobs.write(
                    RETAINED_PREFIX + instance.blob_path, [read_all(blobs, instance.blob_path)]
                )
                copied.append(instance)
            moved = self._commit(
                study_uid, found[0].patient_id, copied, marked,
                (legal_basis, rule_id, until, ground, by, now), detail or {},
            )  # fmt: skip
        except BaseException:
            for instance in copied:
                blobs.delete(RETAINED_PREFIX + instance.blob_path)
            raise
        for instance in copied:
            # a copy whose row went meanwhile (a deletion) is removed; an original always
            blobs.delete(
                instance.blob_path if instance in moved else RETAINED_PREFIX + instance.blob_path
            )
        return moved

    def _commit(
        self,
        study_uid: str,
        patient_id: str,
        copied: list[StoredInstance],
        marked: bool,
        why: tuple[str, str, datetime, str, str, datetime],
        detail: dict[str, Any],
    ) -> list[StoredInstance]:
        """Re-point the rows of `copied` to their copies, mark the study and write the ledger
        entry, in one transaction; returns the instances whose rows were re-pointed."""
        legal_basis, rule_id, until, ground, by, now = why
        i, r = schema.instances, schema.retained_studies
        moved = []
        with self.archive.index.write() as conn:
            for instance in copied:
                changed = conn.execute(
                    update(i)
                    .where(
                        i.c.sop_instance_uid == instance.sop_instance_uid,
                        i.c.blob_path == instance.blob_path,
                    )
                    .values(blob_path=RETAINED_PREFIX + instance.blob_path)
                ).rowcount
                if changed:
                    moved.append(instance)
            if not marked:
                conn.execute(
                    insert(r).values(
                        study_instance_uid=study_uid,
                        patient_id=patient_id,
                        legal_basis=legal_basis,
                        rule_id=rule_id,
                        retained_until=until,
                        ground=ground,
                        retained_at=now,
                        retained_by=by,
                    )
                )
            self.archive.ledger.append(
                conn,
                RETAINED_KIND,
                by,
                RETAINED_OUTCOME,
                {
                    "operation": RETAINED_OUTCOME,
                    "legal_basis": legal_basis,
                    "rule_id": rule_id,
                    "retained_until": until.isoformat(),
                    "ground": ground,
                    "method": MOVE_METHOD,
                    "patient_ids": [patient_id],
                    "study_instance_uids": [study_uid],
                    "moved_instances": [m.sop_instance_uid for m in moved],
                    **detail,
                },
            )
        return moved
