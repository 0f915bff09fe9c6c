"""The archive: blob store, index and the one ingest path.

`Archive.store` is the only way an object becomes part of the archive. It writes the blob
durably first and then commits the index rows in one transaction, so every index row has
its blob. Blob file names carry a prefix of the content hash, so two different objects under
one SOP Instance UID never overwrite each other's file, even from two processes.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, NoReturn

from sqlalchemy import Connection, and_, exists, func, or_, select, update
from sqlalchemy import delete as sql_delete
from sqlalchemy.exc import IntegrityError

from dicomnode.archive import migrations, query, schema
from dicomnode.archive.blobs import FileBlobStore, PendingBlob
from dicomnode.archive.blobstore import BlobStore, Placement, Range, cache_key, stage_to_file
from dicomnode.archive.index import Index, create_index_engine
from dicomnode.archive.ledger import Ledger
from dicomnode.archive.received import ReceivedObject, dataset_sha256s
from dicomnode.archive.registry import HeldObject, Registry
from dicomnode.core.errors import (
    DuplicateConflict,
    InvalidInput,
    NotFound,
    NotPermitted,
    QuotaExceeded,
    StorageUnavailable,
    storage_failure,
)
from dicomnode.core.model import (
    IngestResult,
    LedgerKind,
    Level,
    PatientIdentity,
    Query,
    Source,
    StoredInstance,
    StudyFacts,
)
from dicomnode.core.times import as_utc
from dicomnode.core.turns import ANY_TIME, Turn

log = logging.getLogger("dicomnode.archive")

HELD_FOLDER = "held"  # blobs intake filed aside live under this folder of the blob store
HELD_PREFIX = HELD_FOLDER + "/"
USAGE_SECONDS = 10.0  # how stale the stored-bytes total (for the quota) may be
# How long before the newest indexed receipt a blob whose index commit a power loss took may
# have been written: its commit followed the last one that reached the disk, and an object
# waits at most the index's busy timeout (60 s) between its blob and its commit.
RECOVERY_WINDOW = timedelta(minutes=10)
# How long a filed blob's placement journal entry stays before it is settled (the index synced,
# the entry removed): entries are settled in batches, one sync of the index for many objects.
SETTLE_SECONDS = 60.0
FAILING_SECONDS = 10.0  # how long /healthz reports an index or disk failure this process saw


@dataclass(frozen=True)
class ArchiveCheck:
    """What `Archive.check` found."""

    indexed: int
    blobs: int
    missing_blobs: list[str]
    unindexed_blobs: list[str]
    corrupt_blobs: list[str]
    repaired: bool

    @property
    def ok(self) -> bool:
        """No row lacks its blob and no blob is corrupt (unindexed blobs are leftovers only)."""
        return not self.missing_blobs and not self.corrupt_blobs


class UnindexedBlobs(NamedTuple):
    """What `Archive.unindexed_recent_blobs` found."""

    lost_rows: list[str]  # blobs whose index rows were lost: to be filed again
    destroyed: list[str]  # blobs of objects destroyed since: to be removed


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


class Archive:
    """Blobs on the filesystem and an index in SQLite or PostgreSQL."""

    def __init__(
        self,
        data_dir: Path,
        database_url: str,
        duplicate_policy: str = "reject",
        quota_bytes: int = 0,
        min_free_bytes: int = 0,
        blob_store: Callable[[Index], BlobStore] | None = None,
    ) -> None:
        """`blob_store` builds the store from the index (whose database an S3 store's
        `DatabasePlacements` uses); default: files under ``data_dir/blobs``."""
        data_dir.mkdir(parents=True, exist_ok=True)
        self.quota_bytes = quota_bytes
        self.min_free_bytes = min_free_bytes
        self._usage: tuple[float, int] | None = None  # (when read, stored bytes)
        self._usage_lock = threading.Lock()
        self._last_capacity_alert = 0.0
        self._unsettled: collections.deque[tuple[float, Placement]] = collections.deque()
        self._unsettled_lock = threading.Lock()
        self._failing: tuple[float, StorageUnavailable] | None = None  # the last one seen
        self._recovering: dict[str, list[Placement]] = {}  # blob -> its records left
        self.engine = create_index_engine(database_url)
        migrations.upgrade(self.engine)
        self.index = Index(self.engine)
        self.blobs: Any = (
            blob_store(self.index)
            if blob_store is not None
            else FileBlobStore(data_dir / "blobs", data_dir / "placing")
        )
        self.ledger = Ledger(self.index)
        self.registry = Registry(self.index, self.ledger)
        self.audit: Any = None  # the AuditLog the services report to (set by the app)
        self.duplicate_policy = duplicate_policy
        removed = self.blobs.discard_partial_writes()
        if removed:
            log.warning("discarded %d partial blob writes left by an interrupted run", removed)

    def close(self) -> None:
        self.blobs.discard_spares()
        self.index.close()
        self.engine.dispose()

    def _blob_path(self, received: ReceivedObject) -> str:
        base = self.blobs.relative_path(
            received.study_instance_uid, received.series_instance_uid, received.sop_instance_uid
        )
        return base.removesuffix(".dcm") + f".{received.sha256[:16]}.dcm"

    @staticmethod
    def blob_matches_its_name(relative: str, data: bytes) -> bool:
        """Whether a blob's bytes `data` hold a data set with the SHA-256 its name begins
        (`_blob_path`): not so for one a power loss left incomplete (`PendingBlob.place`)."""
        named = _blob_hash(relative)
        if len(named) != 16 or not set(named) <= set("0123456789abcdef"):
            return True  # a name without a hash: nothing to judge by
        try:
            return any(sha256[:16] == named for sha256 in dataset_sha256s(data))
        except Exception:  # not even a File Meta group: pydicom's errors vary
            return False

    def _stored(self, received: ReceivedObject, blob_path: str) -> StoredInstance:
        return StoredInstance(
            sop_instance_uid=received.sop_instance_uid,
            sop_class_uid=received.sop_class_uid,
            series_instance_uid=received.series_instance_uid,
            study_instance_uid=received.study_instance_uid,
            patient_id=received.patient_id,
            transfer_syntax_uid=received.transfer_syntax_uid,
            blob_path=blob_path,
            size=received.size,
            sha256=received.sha256,
        )

    def store(
        self,
        received: ReceivedObject,
        source: Source,
        duplicate_policy: str | None = None,
        turn: Turn = ANY_TIME,
        blob: PendingBlob | None = None,
    ) -> IngestResult:
        """File `received`: durable blob, then index rows in one transaction.

        An identical re-send stores nothing new ("duplicate"). A different object under a stored
        SOP Instance UID raises DuplicateConflict, or replaces it when the policy says "replace".
        The blob is written before the index is asked: its name carries the content hash, so an
        identical re-send rewrites the same bytes and any other object gets a file of its own.
        `blob` is its write begun earlier (`begin_blob`). The index rows are written after those
        of the turns before `turn`.
        """
        blob = blob or self.begin_blob(received.file_chunks)
        blob_path = self._place(blob, received)
        stored = self._stored(received, blob_path)
        policy = duplicate_policy or self.duplicate_policy
        try:
            outcome, previous_path = self._index(received, stored, source, policy, turn)
        except BaseException as e:
            self._withdraw(blob)
            self._raise_as_answered(e)
        if outcome == "duplicate" and previous_path != blob_path:
            self._withdraw(blob)  # the object is filed under another name: this one goes
        elif outcome == "duplicate":  # the row naming this blob was there before: its own
            blob.settle()  # placing is settled, or is still in the journal
        else:
            self._settle_later(blob)
        self._failing = None
        if outcome == "duplicate":
            return IngestResult(
                self._stored(received, previous_path), outcome, header=received.header
            )
        if outcome == "replaced" and previous_path != blob_path:
            self.blobs.delete(previous_path)
        if outcome == "stored":
            self._count_stored(received.size)
        return IngestResult(stored, outcome, header=received.header)

    def begin_blob(self, chunks: Sequence[bytes]) -> PendingBlob:
        """Start writing an object's file (`chunks`, e.g. its File Meta group and data set,
        parsed or not yet) durably to a temporary file, once the archive's quota and the disk's
        free space allow it (QuotaExceeded)."""
        self.check_capacity(sum(len(chunk) for chunk in chunks))
        try:
            return self.blobs.begin(chunks)
        except OSError as e:
            self._raise_as_answered(e)

    def _place(self, blob: PendingBlob, received: ReceivedObject, prefix: str = "") -> str:
        """The begun write `blob` of `received` at its path (after `prefix`), durably; the
        path. When it fails, the blob is withdrawn (StorageUnavailable)."""
        blob_path = prefix + self._blob_path(received)
        try:
            blob.place(blob_path)
        except OSError as e:
            self._withdraw(blob)
            self._raise_as_answered(e)
        return blob_path

    def _storage_failure(self, error: BaseException) -> BaseException:
        """`error` as the node answers it: a failure of the disk or the index database
        becomes StorageUnavailable in words without internals (logged here in full, and
        remembered for /healthz); any other error is itself."""
        failure = storage_failure(error)
        if failure is None:
            return error
        if failure is not error:
            log.error(
                "storage failure: %s: %s",
                type(error).__name__,
                error,
                extra={"event": "storage", "alert": True, "kind": type(failure).__name__},
            )
        if not isinstance(failure, QuotaExceeded):
            self._failing = (time.monotonic(), failure)
        return failure

    def _raise_as_answered(self, error: BaseException) -> NoReturn:
        """Raise `error` as the node answers it (`_storage_failure`)."""
        failure = self._storage_failure(error)
        if failure is error:
            raise error
        raise failure from error

    def failing(self) -> StorageUnavailable | None:
        """The index or disk failure this process saw last, unless a store succeeded since or
        it is older than `FAILING_SECONDS`."""
        failing = self._failing
        if failing is None or time.monotonic() - failing[0] > FAILING_SECONDS:
            return None
        return failing[1]

    def _withdraw(self, blob: PendingBlob) -> None:
        """Take back a placed blob whose object was refused (`PendingBlob.withdraw`)."""
        try:
            blob.withdraw()
        except OSError as e:  # the blob may stay, unindexed; its entry is gone or not
            log.error(
                "a refused object's blob could not be removed: %s (%s)",
                blob.relative,
                e,
                extra={"event": "storage", "alert": True},
            )

    def _settle_later(self, blob: PendingBlob) -> None:
        entry, blob.placement = blob.placement, None
        if entry is not None:
            with self._unsettled_lock:
                self._unsettled.append((time.monotonic(), entry))

    def settle_placements(self, older_than: float = SETTLE_SECONDS) -> int:
        """Sync the index and drop the placement journal entries of blobs filed at least
        `older_than` seconds ago (their rows are durable now); returns how many."""
        now = time.monotonic()
        with self._unsettled_lock:
            if not self._unsettled or now - self._unsettled[0][0] < older_than:
                return 0
            settled = []
            while self._unsettled and now - self._unsettled[0][0] >= older_than:
                settled.append(self._unsettled.popleft()[1])
        try:
            self.index.make_durable()
        except OSError as e:
            log.error("cannot sync the index: %s", e, extra={"event": "storage", "alert": True})
            with self._unsettled_lock:
                self._unsettled.extendleft(reversed([(now, entry) for entry in settled]))
            return 0
        self.blobs.placements.settle(settled)
        return len(settled)

    def storage(self) -> dict[str, int | bool | None]:
        """Bytes stored, the quota, the disk's free bytes, and whether new data is refused."""
        used = self._stored_bytes()
        free = self.blobs.usage().free_bytes
        refused_lately = time.monotonic() - self._last_capacity_alert < 60
        refusing = (
            bool(self.quota_bytes and used >= self.quota_bytes)
            or (free is not None and free < self.min_free_bytes)
            or (self._last_capacity_alert > 0 and refused_lately)
        )
        return {
            "used_bytes": used,
            "quota_bytes": self.quota_bytes,
            "free_bytes": free,
            "min_free_bytes": self.min_free_bytes,
            "refusing_new_data": refusing,
        }

    def check_capacity(self, size: int) -> None:
        """Refuse an object that would take the archive over its quota, or the disk under its
        minimum free space (QuotaExceeded). Nothing is ever deleted to make room: retention
        decides what goes, not capacity."""
        problem = ""
        if self.quota_bytes:
            used = self._stored_bytes()
            if used + size > self.quota_bytes:
                problem = (
                    f"the archive is at its quota ({used} of {self.quota_bytes} bytes used); "
                    "new objects are refused until retention frees space or the quota is raised"
                )
        if not problem and self.min_free_bytes:
            free = self.blobs.usage().free_bytes
            if free is not None and free - size < self.min_free_bytes:
                problem = (
                    f"the disk has {free} bytes free, under node.min_free_bytes "
                    f"({self.min_free_bytes}); new objects are refused"
                )
        if problem:
            now = time.monotonic()
            if now - self._last_capacity_alert > 60:  # an alert a minute, not one per object
                log.error(problem, extra={"event": "capacity", "alert": True})
            self._last_capacity_alert = now
            raise QuotaExceeded(problem)

    def _stored_bytes(self) -> int:
        """The bytes of every indexed instance (re-read from the index every few seconds, so
        that other processes' writes count too)."""
        with self._usage_lock:
            usage = self._usage
        if usage is None or time.monotonic() - usage[0] > USAGE_SECONDS:
            with self.index.read() as conn:  # objects held at intake take space too
                total = (
                    conn.execute(
                        select(func.coalesce(func.sum(schema.instances.c.size), 0))
                    ).scalar_one()
                    + conn.execute(
                        select(func.coalesce(func.sum(schema.held_objects.c.size), 0))
                    ).scalar_one()
                )
            usage = (time.monotonic(), int(total))
            with self._usage_lock:
                self._usage = usage
        return usage[1]

    def _count_stored(self, size: int) -> None:
        with self._usage_lock:
            if self._usage is not None:
                self._usage = (self._usage[0], self._usage[1] + size)

    def hold(
        self,
        received: ReceivedObject,
        source: Source,
        reason: str,
        rule_id: str,
        version: str,
        blob: PendingBlob | None = None,
    ) -> IngestResult:
        """File `received` aside, not indexed (so nothing can find, send or analyse it) until
        it is released into the archive or discarded; the first object held for a study and
        reason is a ledger entry. The outcome is "held"."""
        blob = blob or self.begin_blob(received.file_chunks)
        blob_path = self._place(blob, received, prefix=HELD_PREFIX)
        held = HeldObject(
            sop_instance_uid=received.sop_instance_uid,
            sop_class_uid=received.sop_class_uid,
            series_instance_uid=received.series_instance_uid,
            study_instance_uid=received.study_instance_uid,
            patient_id=received.patient_id,
            blob_path=blob_path,
            source_protocol=source.protocol,
            source_caller=source.caller,
            reason=reason,
            rule_id=rule_id,
            policy_version=version,
            held_at=datetime.now(UTC),
        )
        detail = {
            "operation": "admit",
            "reason": reason,
            "rule_id": rule_id,
            "policy_version": version,
            "protocol": source.protocol,
            "sender": source.caller,
            "address": source.address,
            "patient_ids": [received.patient_id],
            "study_instance_uids": [received.study_instance_uid],
        }
        try:
            new = self.registry.hold(held, received.size, received.sha256, detail)
        except BaseException as e:
            self._withdraw(blob)
            self._raise_as_answered(e)
        blob.settle()  # the registry's commits are synced
        stored = self._stored(received, blob_path)
        return IngestResult(stored, "held" if new else "duplicate", header=received.header)

    def _index(
        self,
        received: ReceivedObject,
        stored: StoredInstance,
        source: Source,
        policy: str,
        turn: Turn,
    ) -> tuple[str, str]:
        """Index `stored`; returns the outcome and the blob path of the object it found."""
        now = datetime.now(UTC)

        def index_instance(conn: Connection) -> tuple[str, str]:
            existing = self.index.instance_row(conn, received.sop_instance_uid)
            if existing is not None and existing.sha256 == received.sha256:
                return "duplicate", existing.blob_path
            if existing is not None and policy == "reject":
                raise DuplicateConflict(
                    f"SOP Instance {received.sop_instance_uid} is already stored with "
                    "different content; the node's duplicate policy is 'reject'"
                )
            series_pk = self.index.ensure_hierarchy(conn, received.header, now)
            values = self.index.instance_values(received.header, series_pk, stored, source, now)
            if existing is None:
                self.index.insert_instance(conn, values)
                return "stored", stored.blob_path
            row = schema.instances.c.id == existing.id
            conn.execute(update(schema.instances).where(row).values(**values))
            return "replaced", existing.blob_path

        try:
            return self.index.write_grouped(index_instance, turn)
        except IntegrityError:
            # Another writer filed the same SOP Instance UID between our check and our insert.
            with self.index.read() as conn:
                existing = self.index.instance_row(conn, received.sop_instance_uid)
            if existing is not None and existing.sha256 == received.sha256:
                return "duplicate", existing.blob_path
            raise DuplicateConflict(
                f"SOP Instance {received.sop_instance_uid} was stored concurrently with "
                "different content"
            ) from None

    def search(self, q: Query) -> list[dict[str, Any]]:
        """Matching entities at the query's level (see `query.search`)."""
        with self.index.read() as conn:
            return query.search(conn, q)

    def find_instances(
        self, level: Level, filters: tuple[tuple[str, str], ...]
    ) -> list[StoredInstance]:
        """Every instance under the entities matching `filters` at `level`."""
        with self.index.read() as conn:
            return query.find_instances(conn, level, filters)

    def identify(self, patient_id: str, issuer: str | None = None) -> PatientIdentity:
        """The one person a data subject's request names. Without an issuer, the Patient ID
        must be held under at most one issuer; under several, the request is ambiguous
        (InvalidInput naming them) and must name the issuer."""
        identity = PatientIdentity(patient_id, issuer)
        if identity.issuer is not None:
            return identity
        with self.index.read() as conn:
            issuers = query.issuers_of(conn, identity.patient_id)
        if len(issuers) > 1:
            named = ", ".join(repr(i) if i else "(none)" for i in issuers)
            raise InvalidInput(
                f"Patient ID {identity.patient_id!r} is held under several issuers ({named}): "
                "name the IssuerOfPatientID"
            )
        return PatientIdentity(identity.patient_id, issuers[0]) if issuers else identity

    def find_instances_exactly(self, keys: tuple[tuple[str, str], ...]) -> list[StoredInstance]:
        """Every instance whose Patient ID/issuer/UIDs equal `keys` (never a pattern)."""
        with self.index.read() as conn:
            return query.find_instances_exactly(conn, keys)

    def instances_of(self, identity: PatientIdentity) -> list[StoredInstance]:
        """Every instance of this one person (exact Patient ID and issuer)."""
        with self.index.read() as conn:
            return query.find_instances_exactly(conn, query.identity_keys(identity))

    def studies_of_others(self, identity: PatientIdentity) -> set[str]:
        """Studies held under the same Patient ID by another issuer: another person's."""
        p, st = schema.patients, schema.studies
        with self.index.read() as conn:
            return set(
                conn.execute(
                    select(st.c.study_instance_uid)
                    .join(p, st.c.patient_pk == p.c.id)
                    .where(
                        p.c.patient_id == identity.patient_id,
                        p.c.issuer_of_patient_id != (identity.issuer or ""),
                    )
                ).scalars()
            )

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
        i, se, st, p = schema.instances, schema.series, schema.studies, schema.patients
        with self.index.write() as conn:
            doomed = query.find_instances_exactly(conn, filters)
            if received_before is not None and doomed:
                late = set()
                uids = [d.sop_instance_uid for d in doomed]
                for start in range(0, len(uids), 500):
                    late |= set(
                        conn.execute(
                            select(i.c.sop_instance_uid).where(
                                i.c.sop_instance_uid.in_(uids[start : start + 500]),
                                i.c.received_at >= received_before,
                            )
                        ).scalars()
                    )
                doomed = [d for d in doomed if d.sop_instance_uid not in late]
            if unless_held and doomed:
                held = [f"hold:{h}" for h in _holds_covering(conn, doomed)]
                if held:
                    raise NotPermitted(f"under legal hold {', '.join(held)}: nothing deleted")
            if results_only:
                produced = set(
                    conn.execute(
                        select(i.c.sop_instance_uid).where(
                            i.c.sop_instance_uid.in_([d.sop_instance_uid for d in doomed]),
                            i.c.source_protocol == "analysis",
                        )
                    ).scalars()
                )
                doomed = [d for d in doomed if d.sop_instance_uid in produced]
            if not doomed:
                raise NotFound(f"nothing matches {dict(filters)} at {level} level")
            uids = [d.sop_instance_uid for d in doomed]
            series_pks = set()
            for start in range(0, len(uids), 500):
                chunk = uids[start : start + 500]
                series_pks |= set(
                    conn.execute(
                        select(i.c.series_pk).where(i.c.sop_instance_uid.in_(chunk))
                    ).scalars()
                )
                conn.execute(sql_delete(i).where(i.c.sop_instance_uid.in_(chunk)))
            study_pks = set(
                conn.execute(select(se.c.study_pk).where(se.c.id.in_(series_pks))).scalars()
            )
            conn.execute(
                sql_delete(se).where(
                    se.c.id.in_(series_pks), ~exists().where(i.c.series_pk == se.c.id)
                )
            )
            patient_pks = set(
                conn.execute(select(st.c.patient_pk).where(st.c.id.in_(study_pks))).scalars()
            )
            conn.execute(
                sql_delete(st).where(
                    st.c.id.in_(study_pks), ~exists().where(se.c.study_pk == st.c.id)
                )
            )
            conn.execute(
                sql_delete(p).where(
                    p.c.id.in_(patient_pks), ~exists().where(st.c.patient_pk == p.c.id)
                )
            )
            self.ledger.append(
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
        for instance in doomed:
            self.blobs.delete(instance.blob_path)
        return doomed

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

    def check(self, verify_hashes: bool = False, repair: bool = False) -> ArchiveCheck:
        """Compare the index with the blob store: rows whose blob is missing, blobs no row names
        (left by a crash between the blob write and the index commit), and with
        `verify_hashes`, blobs whose data set no longer matches its SHA-256. `repair` deletes
        the unindexed blobs (never a blob a row names)."""
        with self.index.read() as conn:
            rows = dict(
                conn.execute(select(schema.instances.c.blob_path, schema.instances.c.sha256)).all()
            )
        on_disk = set(self.blobs.placed(outside=HELD_FOLDER))
        missing = sorted(set(rows) - on_disk)
        unindexed = sorted(on_disk - set(rows))
        corrupt = []
        if verify_hashes:
            for blob_path in sorted(set(rows) & on_disk):
                data = self.blobs.absolute(blob_path).read_bytes()
                if rows[blob_path] not in dataset_sha256s(data):
                    corrupt.append(blob_path)
        if repair:
            for blob_path in unindexed:
                self.blobs.delete(blob_path)
        return ArchiveCheck(len(rows), len(on_disk), missing, unindexed, corrupt, repair)

    def unindexed_recent_blobs(self, window: timedelta = RECOVERY_WINDOW) -> UnindexedBlobs:
        """The placed blobs whose outcome did not become durable (the placement journal's
        entries left by processes no longer running, and this one's; no folder is walked):
        those that no index row names, written at most `window` before the newest indexed
        receipt (any age when nothing is indexed), are what a crash (the sender got no answer)
        or a power loss (it took the last index commits of received objects, which are not
        synced on their own, see `index`, while their blobs, synced before those commits,
        survive) leaves; and apart, those of objects a deletion recorded since then destroyed
        (their unlinking did not reach the disk). The entries of blobs that are indexed, held
        or gone (refused) are settled here; the others, once handled, by `settle_recovered`.
        A held blob with no held row (its sender was refused or got no answer) is removed."""
        entries = self.blobs.placements.leftovers()
        if not entries:
            return UnindexedBlobs([], [])
        by_blob: dict[str, list[Placement]] = {}
        for entry in entries:
            by_blob.setdefault(entry.key, []).append(entry.placement)
        mtimes = {entry.key: entry.started_at for entry in entries}
        withdrawn = {entry.key for entry in entries if entry.withdrawn}
        i, held, ledger = schema.instances, schema.held_objects, schema.ledger_entries
        filed: set[str] = set()
        blobs = sorted(by_blob)
        with self.index.read() as conn:
            newest = conn.execute(select(func.max(i.c.received_at))).scalar()
            for start in range(0, len(blobs), 500):
                chunk = blobs[start : start + 500]
                filed |= set(
                    conn.execute(select(i.c.blob_path).where(i.c.blob_path.in_(chunk))).scalars()
                )
                filed |= set(
                    conn.execute(
                        select(held.c.blob_path).where(held.c.blob_path.in_(chunk))
                    ).scalars()
                )
            since = None if newest is None else as_utc(newest) - window
            deletions = select(ledger.c.detail).where(ledger.c.kind == LedgerKind.DELETION)
            if since is not None:
                deletions = deletions.where(ledger.c.recorded_at >= since.isoformat())
            destroyed_uids: set[str] = set()
            for detail in conn.execute(deletions).scalars():
                destroyed_uids |= set(json.loads(detail).get("sop_instance_uids", []))
        self.index.make_durable()  # the rows found are durable before their entries go
        found = UnindexedBlobs(lost_rows=[], destroyed=[])
        for relative in blobs:
            if relative in filed or not self.blobs.exists(relative):
                self._settle_entries(by_blob[relative])  # filed, or withdrawn (refused)
                continue
            if relative.startswith(HELD_PREFIX) or relative in withdrawn:
                self.blobs.delete(relative)  # refused: it never comes back
                self._settle_entries(by_blob[relative])
                continue
            if since is not None and mtimes[relative] < since.timestamp():
                continue  # no commit is lost that long before the newest: `archive check`'s
            if _blob_sop_instance_uid(relative) in destroyed_uids:
                found.destroyed.append(relative)
            else:
                found.lost_rows.append(relative)
        self._recovering = by_blob
        return found

    def _settle_entries(self, entries: list[Placement]) -> None:
        self.blobs.placements.settle(entries)

    def settle_recovered(self, relative: str) -> None:
        """Drop the journal entries of a blob `unindexed_recent_blobs` found, once recovery
        filed it or removed it."""
        self._settle_entries(self._recovering.pop(relative, []))

    def senders(self, study_uid: str) -> set[str]:
        """The AE titles that sent objects of a study over DIMSE."""
        i, se, st = schema.instances, schema.series, schema.studies
        with self.index.read() as conn:
            return set(
                conn.execute(
                    select(i.c.source_caller)
                    .distinct()
                    .join(se, i.c.series_pk == se.c.id)
                    .join(st, se.c.study_pk == st.c.id)
                    .where(st.c.study_instance_uid == study_uid, i.c.source_protocol == "dimse")
                ).scalars()
            )

    def open_blob(
        self, instance: StoredInstance | HeldObject, byte_range: Range | None = None
    ) -> BinaryIO:
        """The stored (or quarantined) object's bytes as a stream, or bytes [start, end) of
        them; the caller closes it. FileNotFoundError when the blob is missing."""
        return self.blobs.open(instance.blob_path, byte_range)

    def read_blob(self, instance: StoredInstance | HeldObject) -> bytes:
        """The whole of the stored (or quarantined) object's bytes."""
        with self.open_blob(instance) as stream:
            return stream.read()

    def stage_blob(self, instance: StoredInstance, folder: Path) -> Path:
        """A local copy of the object in a new file under `folder` (the node's temporary
        folder), for a reader that needs a path (an analyzer); the caller deletes it."""
        return stage_to_file(self.blobs, instance.blob_path, folder)

    def cached(self, instance: StoredInstance, kind: str) -> bytes | None:
        """Data of `kind` (e.g. ``metadata.json``) cached for the object, or None."""
        try:
            with self.blobs.open(cache_key(instance.blob_path, kind)) as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def put_cached(self, instance: StoredInstance, kind: str, data: bytes) -> None:
        """Cache re-derivable `data` of `kind` for the object; it goes with the object."""
        self.blobs.put_cached(cache_key(instance.blob_path, kind), data)

    def blob_file(self, instance: StoredInstance) -> Path:
        """The blob's local path: filesystem store only, for callers not yet reading streams
        (`open_blob`); goes once layer 4 reads streams."""
        return self.blobs.absolute(instance.blob_path)

    def counts(self) -> dict[str, int]:
        with self.index.read() as conn:
            return {
                name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for name, table in (
                    ("patients", schema.patients),
                    ("studies", schema.studies),
                    ("series", schema.series),
                    ("instances", schema.instances),
                )
            }

    def ping(self) -> None:
        """Raise unless the index answers and takes a write, the blob store is writable, and
        no index or disk failure was seen lately (`failing`); a failure of the storage is
        raised as StorageUnavailable in words without internals."""
        try:
            with self.index.read() as conn:
                conn.execute(select(1))
            self.index.probe_write()
            self.blobs.check()
        except Exception as e:
            self._raise_as_answered(e)
        failing = self.failing()
        if failing is not None:
            raise failing


__all__ = ["Archive"]


def _blob_sop_instance_uid(relative: str) -> str:
    """The SOP Instance UID in a blob's name (``<study>/<series>/<uid>.<hash>.dcm``)."""
    return relative.rsplit("/", 1)[-1].rsplit(".", 2)[0]


def _blob_hash(relative: str) -> str:
    """The hash part of a blob's name (``<study>/<series>/<uid>.<hash>.dcm``)."""
    return relative.rsplit("/", 1)[-1].rsplit(".", 2)[1]


def _date(study_date: str | None) -> datetime | None:
    """A StudyDate (YYYYMMDD) as midnight UTC, or None when absent or malformed."""
    try:
        return datetime.strptime(study_date or "", "%Y%m%d").replace(tzinfo=UTC)
    except ValueError:
        return None
