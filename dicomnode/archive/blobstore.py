"""The seam between the archive and where its bytes live: the `BlobStore` protocol.

A blob is an object's bytes (a DICOM Part 10 file) under a string key; keys look like
relative paths, ``<study>/<series>/<sop>.<sha256[:16]>.dcm`` (`blob_key`), and are built only
from validated UIDs. Two stores implement the protocol: the filesystem
(`dicomnode.archive.blobs.FileBlobStore`, the embedded default) and S3-compatible object
storage (`dicomnode.archive.objectstore`). Readers get streams (`BlobStore.open`), never
paths; a reader that needs a local file (an analyzer) stages one (`stage_to_file`).

Writing is two steps so that an arriving object's bytes are written while it is parsed and
judged: `BlobStore.begin` stages the bytes locally, `PendingBlob.place` puts them under their
key durably and create-only (an object already at the key is kept: keys carry a content hash,
so it holds the same bytes).

Every placing is recorded in the store's `Placements` BEFORE the blob is placed, and stays
recorded until the blob's outcome is durable elsewhere: settled (its index row committed),
or withdrawn (the object was refused: the blob removed, so it never comes back). The records
left after a crash or a power loss are how recovery finds blobs placed but not indexed
(`Placements.leftovers`): never a directory walk or a bucket listing.

Key spaces: blobs at the top; intake's quarantine under ``QUARANTINE_PREFIX`` (``held/``, the
name the database already stores); cached, re-derivable data (WADO's metadata) under
``CACHE_PREFIX``, written with `BlobStore.put_cached`, no durability promised; the blobs of
studies kept only because a law requires it under ``RETAINED_PREFIX`` (``retained/<key>``,
indexed like any blob, read only through `archive.retained`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol, runtime_checkable

from dicomnode.core.uids import validate_uid

QUARANTINE_PREFIX = "held/"  # intake's quarantine: objects filed aside, not indexed
CACHE_PREFIX = "cache/"  # re-derivable data about a blob (WADO metadata)
SPECIAL_PREFIXES = (QUARANTINE_PREFIX, CACHE_PREFIX)  # not archive blobs
RETAINED_PREFIX = "retained/"  # archive blobs of studies retained only by law (item 33)
Range = tuple[int, int]  # [start, end) in bytes


def blob_key(study_uid: str, series_uid: str, sop_instance_uid: str, sha256: str = "") -> str:
    """The key of an object's blob: ``<study>/<series>/<sop>[.<sha256[:16]>].dcm``; raises
    InvalidUID for an unsafe UID."""
    sop = validate_uid(sop_instance_uid, "SOPInstanceUID")
    return "/".join(
        (
            validate_uid(study_uid, "StudyInstanceUID"),
            validate_uid(series_uid, "SeriesInstanceUID"),
            sop + (f".{sha256[:16]}" if sha256 else "") + ".dcm",
        )
    )


def cache_key(key: str, kind: str) -> str:
    """The key of cached data of `kind` (e.g. ``metadata.json``) derived from blob `key`."""
    return f"{CACHE_PREFIX}{key}.{kind}"


def key_sop_instance_uid(key: str) -> str:
    """The SOP Instance UID in a blob's key (``.../<uid>.<hash>.dcm``)."""
    return key.rsplit("/", 1)[-1].rsplit(".", 2)[0]


def key_hash(key: str) -> str:
    """The hash part of a blob's key (``.../<uid>.<hash>.dcm``)."""
    return key.rsplit("/", 1)[-1].rsplit(".", 2)[1]


class StoreUsage(NamedTuple):
    """What a store can say about its capacity; None where it cannot know (an S3 bucket has
    no free space to report; the index, not the store, knows the bytes the archive holds)."""

    free_bytes: int | None
    used_bytes: int | None


class Placement(Protocol):
    """One recorded placing: an opaque token of its `Placements`, naming the blob's key."""

    @property
    def key(self) -> str: ...


class Leftover(NamedTuple):
    """A placing whose outcome was not durable when its process stopped."""

    placement: Placement
    key: str
    started_at: float  # Unix time the placing began (or the blob's modification time)
    withdrawn: bool  # the object was refused; its blob may still have to be removed


@runtime_checkable
class Placements(Protocol):
    """The ONE durable record of each placed blob's outcome.

    The order a store follows: `record` (durable before, or together with, the blob's own
    durability), then the blob is placed; later exactly one of `settle` (the index row is
    committed: the archive calls it, in batches, once the row is durable) or `withdraw` +
    blob removed + `forget` (the object was refused). What `leftovers` returns after a crash
    is the whole of what recovery has to judge."""

    def record(self, key: str, staged: Path | None = None) -> Placement:
        """Record that a blob is being placed at `key`; `staged` is the local file holding its
        bytes (the filesystem journal hard-links it, so the blob's own sync makes the record
        durable). Raises OSError (or a database error) when it cannot be recorded."""
        ...

    def settle(self, placements: Iterable[Placement]) -> None:
        """The outcomes are durable elsewhere (index rows committed and durable): drop the
        records. Need not be durable itself: a record that comes back is settled again by
        recovery, which finds the blob indexed."""
        ...

    def withdraw(self, placement: Placement) -> bool:
        """The object was refused: mark the record withdrawn, durably, before its blob is
        removed; returns whether the blob may be removed (no other unsettled placing of the
        same key counts on it)."""
        ...

    def forget(self, placement: Placement) -> None:
        """Drop a withdrawn record, durably, once its blob is removed (or was kept for
        another placing), or a leftover that recovery has handled."""
        ...

    def leftovers(self) -> list[Leftover]:
        """The records of placings whose outcome never became durable: of this node's
        processes no longer running, and of this process. Another node's records (on shared
        storage) are never returned."""
        ...


class PendingBlob(Protocol):
    """Bytes staged by `BlobStore.begin`, not yet under a key."""

    key: str  # where it was placed ("" until then)
    named: bool  # whether this placing created the blob (no blob was at the key)
    placement: Placement | None  # its record, until settled or withdrawn

    @property
    def size(self) -> int: ...

    def sha256(self) -> str:
        """The SHA-256 (hex) of the staged bytes (computed on first call)."""
        ...

    def place(self, key: str) -> None:
        """Record the placing, then put the bytes at `key` durably and create-only (an object
        already there is kept, and made durable if it might not be); raises OSError (or the
        store's StorageUnavailable). Placing twice raises ValueError."""
        ...

    def settle(self) -> None:
        """The outcome is durable: settle its record now (`Placements.settle`)."""
        ...

    def withdraw(self) -> None:
        """The object was refused after it was placed: remove the blob (when this placing
        created it and no other placing counts on it), then forget the record."""
        ...

    def abandon(self) -> None:
        """Drop the staged bytes; a no-op once placed."""
        ...


@runtime_checkable
class BlobStore(Protocol):
    """Where blobs live. Every method may raise OSError for a storage failure; a key that
    holds nothing raises FileNotFoundError on `open`."""

    placements: Placements

    def begin(self, chunks: Sequence[bytes]) -> PendingBlob:
        """Stage `chunks` (e.g. a File Meta group and a data set) locally for a `place`."""
        ...

    def write(self, key: str, chunks: Sequence[bytes]) -> None:
        """`begin`, `place` at `key` and `settle` (a blob whose outcome needs no index row)."""
        ...

    def open(self, key: str, byte_range: Range | None = None) -> BinaryIO:
        """A binary stream of the blob at `key`, or of bytes [start, end) of it; the caller
        closes it. FileNotFoundError when nothing is there."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """The blob's size in bytes (FileNotFoundError when nothing is there)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the blob and its cached data (`cache_key`); nothing there is no error."""
        ...

    def put_cached(self, key: str, data: bytes) -> None:
        """Store re-derivable `data` at `key` (under ``CACHE_PREFIX``), replacing what is
        there; atomic for readers, no durability promised."""
        ...

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every blob key under `prefix` (the top: archive blobs only, no quarantined or
        cached ones). For `archive check` only: recovery reads `Placements.leftovers`."""
        ...

    def usage(self) -> StoreUsage: ...

    def check(self) -> None:
        """Raise unless the store can be written now (start-up, /healthz)."""
        ...

    def recover(self) -> int:
        """Discard what interrupted writes of dead processes left staged locally; returns how
        many. Called by `Archive.recover`, never by construction."""
        ...

    def prepare_spare(self) -> None:
        """Prepare, off the critical path, for the next `begin` (a no-op where nothing helps)."""
        ...

    def close(self) -> None: ...


def withdraw_placed(blob: PendingBlob, store: BlobStore) -> None:
    """`PendingBlob.withdraw` for any store: mark the record withdrawn, remove the blob when
    this placing named it and no other placing counts on it, then forget the record."""
    placement, blob.placement = blob.placement, None
    if placement is None:
        return
    try:
        if store.placements.withdraw(placement) and blob.named:
            store.delete(blob.key)
    finally:
        store.placements.forget(placement)


def stage_to_file(store: BlobStore, key: str, folder: Path, suffix: str = ".dcm") -> Path:
    """Copy the blob at `key` to a new file under `folder` (the node's temporary folder) for a
    reader that needs a local path (an analyzer); the caller deletes it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, store.open(key) as source:
            shutil.copyfileobj(source, out, 1 << 20)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def read_all(store: BlobStore, key: str) -> bytes:
    """The whole blob at `key`."""
    with store.open(key) as stream:
        return stream.read()
