"""Consistency of the index and the blob store: `Archive.check` (which lists the store), and
the placed blobs recovery files again (`unindexed_recent_blobs`, from the Placements record,
never a listing)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

from sqlalchemy import func, select

from dicomnode.archive import schema
from dicomnode.archive.base import ArchiveBase
from dicomnode.archive.blobstore import Placement, key_sop_instance_uid, read_all
from dicomnode.archive.ingest import QUARANTINE_PREFIX
from dicomnode.archive.received import dataset_sha256s
from dicomnode.core.model import (
    LedgerKind,
)
from dicomnode.core.times import as_utc

# How long before the newest indexed receipt a blob whose index commit a power loss took may
# have been written: its commit followed the last one that reached the disk, and an object
# waits at most the index's busy timeout (60 s) between its blob and its commit.
RECOVERY_WINDOW = timedelta(minutes=10)


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


class Consistency(ArchiveBase):
    """The index against the store: `check`, and what recovery at start has to file again."""

    _recovering: dict[str, list[Placement]]

    def check(self, verify_hashes: bool = False, repair: bool = False) -> ArchiveCheck:
        """Compare the index with the blob store: rows whose blob is missing, blobs no row names
        (left by a crash between the blob write and the index commit), and with
        `verify_hashes`, blobs whose data set no longer matches its SHA-256. `repair` deletes
        the unindexed blobs (never a blob a row names)."""
        with self.index.read() as conn:
            rows = dict(
                conn.execute(select(schema.instances.c.blob_path, schema.instances.c.sha256)).all()
            )
        on_disk = set(self.blobs.keys())  # archive blobs only: no quarantined or cached ones
        missing = sorted(set(rows) - on_disk)
        unindexed = sorted(on_disk - set(rows))
        corrupt = []
        if verify_hashes:
            for blob_path in sorted(set(rows) & on_disk):
                data = read_all(self.blobs, blob_path)
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
            if relative.startswith(QUARANTINE_PREFIX) or relative in withdrawn:
                self.blobs.delete(relative)  # refused: it never comes back
                self._settle_entries(by_blob[relative])
                continue
            if since is not None and mtimes[relative] < since.timestamp():
                continue  # no commit is lost that long before the newest: `archive check`'s
            if key_sop_instance_uid(relative) in destroyed_uids:
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
