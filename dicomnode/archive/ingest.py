"""The one ingest path: `Archive.store` (and `hold`, filing aside into intake's quarantine).

The blob is written durably first and then the index rows are committed in one transaction,
so every index row has its blob. Blob keys carry a prefix of the content hash, so two
different objects under one SOP Instance UID never overwrite each other's blob."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Connection, update
from sqlalchemy.exc import IntegrityError

from dicomnode.archive import blobstore, schema
from dicomnode.archive.base import ArchiveBase
from dicomnode.archive.blobs import PendingBlob
from dicomnode.archive.blobstore import Placement, key_hash
from dicomnode.archive.received import ReceivedObject, dataset_sha256s
from dicomnode.archive.values import QuarantinedObject
from dicomnode.core.enums import DuplicatePolicy, coerce
from dicomnode.core.errors import (
    DuplicateConflict,
)
from dicomnode.core.frames import frame_table
from dicomnode.core.model import (
    IngestResult,
    Source,
    StoredInstance,
)
from dicomnode.core.turns import ANY_TIME, Turn

log = logging.getLogger("dicomnode.archive")

# Intake's quarantine lives under this folder of the blob store ("held" on disk and in the
# index's blob paths, as before the rename: existing data stays readable).
QUARANTINE_PREFIX = blobstore.QUARANTINE_PREFIX
QUARANTINE_FOLDER = QUARANTINE_PREFIX.rstrip("/")
# How long a filed blob's placement record stays before it is settled (the index synced, the
# record dropped): records are settled in batches, one sync of the index for many objects.
SETTLE_SECONDS = 60.0


class Ingest(ArchiveBase):
    """Filing: the blob placed durably, then the index rows in one transaction."""

    duplicate_policy: str
    _unsettled: collections.deque[tuple[float, Placement]]
    _unsettled_lock: threading.Lock

    def _blob_path(self, received: ReceivedObject) -> str:
        base = self.blobs.relative_path(
            received.study_instance_uid, received.series_instance_uid, received.sop_instance_uid
        )
        return base.removesuffix(".dcm") + f".{received.sha256[:16]}.dcm"

    @staticmethod
    def blob_matches_its_name(relative: str, data: bytes) -> bool:
        """Whether a blob's bytes `data` hold a data set with the SHA-256 its name begins
        (`_blob_path`): not so for one a power loss left incomplete (`PendingBlob.place`)."""
        named = key_hash(relative)
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
        policy = coerce(
            DuplicatePolicy, duplicate_policy or self.duplicate_policy, "duplicate_policy"
        )
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

    def quarantine(
        self,
        received: ReceivedObject,
        source: Source,
        reason: str,
        rule_id: str,
        version: str,
        blob: PendingBlob | None = None,
    ) -> IngestResult:
        """File `received` aside in intake's quarantine, not indexed (so nothing can find, send
        or analyse it) until it is released into the archive or discarded; the first object
        quarantined for a study and reason is a ledger entry. The outcome is "held" (the
        stored word, unchanged)."""
        blob = blob or self.begin_blob(received.file_chunks)
        blob_path = self._place(blob, received, prefix=QUARANTINE_PREFIX)
        held = QuarantinedObject(
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
            new = self.registry.quarantine(held, received.size, received.sha256, detail)
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
        table = _frame_table(received)

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
            values["frame_table"] = table
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


def _frame_table(received: ReceivedObject) -> str | None:
    """Where each frame of `received` lies in its blob, as the index keeps it (None where it
    cannot be found without decoding, or the header does not parse as expected)."""
    try:
        table = frame_table(
            received.header, received.transfer_syntax_uid, len(received.file_meta_bytes)
        )
    except Exception:  # a header pydicom reads differently here: the whole object serves
        log.warning("no frame table for %s", received.sop_instance_uid, exc_info=True)
        return None
    return table.to_json() if table is not None else None
