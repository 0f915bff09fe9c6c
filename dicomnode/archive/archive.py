"""The archive: a blob store, the index, the ledger and the governance records, and the one
ingest path. Its parts live in ingest, capacity, destruction and consistency; this module
opens and closes it and reads it."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import func, select

from dicomnode.archive import (
    access_tags,  # noqa: F401  (its table joins schema.metadata)
    oversight_schema,  # noqa: F401  (its tables join schema.metadata)
    query,
    schema,
)
from dicomnode.archive.blobs import FileBlobStore
from dicomnode.archive.blobstore import BlobStore, Placement, Range, cache_key, stage_to_file
from dicomnode.archive.capacity import Capacity
from dicomnode.archive.consistency import Consistency
from dicomnode.archive.destruction import Destruction
from dicomnode.archive.index import Index, create_index_engine
from dicomnode.archive.ingest import Ingest
from dicomnode.archive.ledger import Ledger
from dicomnode.archive.migrate import check_current
from dicomnode.archive.registry import Registry
from dicomnode.archive.values import QuarantinedObject
from dicomnode.core.enums import DuplicatePolicy, coerce
from dicomnode.core.errors import (
    InvalidInput,
    StorageUnavailable,
)
from dicomnode.core.frames import FrameTable, StoredFrames
from dicomnode.core.model import (
    Level,
    PatientIdentity,
    Query,
    StoredInstance,
)

log = logging.getLogger("dicomnode.archive")


class Archive(Ingest, Capacity, Destruction, Consistency):
    """Blobs in a `BlobStore` (files by default) and an index in SQLite or PostgreSQL."""

    def __init__(
        self,
        data_dir: Path,
        database_url: str,
        duplicate_policy: str = "reject",
        quota_bytes: int = 0,
        min_free_bytes: int = 0,
        blob_store: Callable[[Index], BlobStore] | None = None,
    ) -> None:
        """Open the archive: the index must be at this version's schema (SchemaNotCurrent,
        naming `dicomnode migrate`, otherwise: see `dicomnode.archive.migrate`). Nothing is
        created or removed here: folders are made when first written to, and what a crash
        left is handled by `recover`. `blob_store` builds the store from the index (whose
        database an S3 store's `DatabasePlacements` uses); default: files under
        ``data_dir/blobs``."""
        # anything but "reject" used to mean replace: an unknown policy is an error now
        self.duplicate_policy = coerce(DuplicatePolicy, duplicate_policy, "duplicate_policy")
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
        try:
            check_current(self.engine)
        except BaseException:
            self.engine.dispose()
            raise
        self.index = Index(self.engine)
        self.blobs: Any = (
            blob_store(self.index)
            if blob_store is not None
            else FileBlobStore(data_dir / "blobs", data_dir / "placing")
        )
        self.ledger = Ledger(self.index)
        self.registry = Registry(self.index, self.ledger)
        self.audit: Any = None  # the AuditLog the services report to (set by the app)

    def recover(self) -> int:
        """At start, before anything is written: discard what interrupted writes of dead
        processes left staged (`BlobStore.recover`); returns how many. The blobs placed but
        not indexed are `unindexed_recent_blobs`' (`Intake.recover_unindexed`)."""
        removed = int(self.blobs.recover())
        if removed:
            log.warning("discarded %d partial blob writes left by an interrupted run", removed)
        return removed

    def close(self) -> None:
        self.blobs.discard_spares()
        self.index.close()
        self.engine.dispose()

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

    def find_instances_exactly(
        self, keys: tuple[tuple[str, str], ...], include_retained: bool = False
    ) -> list[StoredInstance]:
        """Every instance whose Patient ID/issuer/UIDs equal `keys` (never a pattern); those of
        studies retained by law only with `include_retained`."""
        with self.index.read() as conn:
            return query.find_instances_exactly(conn, keys, include_retained)

    def instances_of(
        self, identity: PatientIdentity, include_retained: bool = False
    ) -> list[StoredInstance]:
        """Every instance of this one person (exact Patient ID and issuer); those of studies
        retained by law only with `include_retained`."""
        with self.index.read() as conn:
            return query.find_instances_exactly(
                conn, query.identity_keys(identity), include_retained
            )

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
        self, instance: StoredInstance | QuarantinedObject, byte_range: Range | None = None
    ) -> BinaryIO:
        """The stored (or quarantined) object's bytes as a stream, or bytes [start, end) of
        them; the caller closes it. FileNotFoundError when the blob is missing."""
        return self.blobs.open(instance.blob_path, byte_range)

    def stored_frames(self, instance: StoredInstance) -> StoredFrames | None:
        """The object's header and frames read by byte range, with the frame table indexed at
        ingest; None for an object without one (read it whole). StaleFrameTable (here or on
        reading frames) when the blob is not as the table says."""
        with self.index.read() as conn:
            text = conn.execute(
                select(schema.instances.c.frame_table).where(
                    schema.instances.c.blob_path == instance.blob_path
                )
            ).scalar_one_or_none()
        if not text:
            return None

        def read_range(start: int, end: int) -> bytes:
            with self.blobs.open(instance.blob_path, (start, end)) as stream:
                return stream.read()

        return StoredFrames(FrameTable.from_json(text), read_range)

    def read_blob(self, instance: StoredInstance | QuarantinedObject) -> bytes:
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
        """The blob's local path, with the filesystem store only: for tests and tools that
        look at the files; the node's code reads streams (`open_blob`)."""
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
