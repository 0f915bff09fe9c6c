"""The blob store: DICOM Part 10 files on the filesystem, written atomically and durably.

A blob is written to ``tmp/`` under the root, linked at its final path, fsynced (fdatasync)
and its directory fsynced (and the folders above it when they are new), so a blob whose write
returned survives a power loss, and a process crash leaves either the whole file or nothing
at its final path. A power loss during `PendingBlob.place` can leave an incomplete file there,
which nothing indexes and which recovery at start-up removes (see `PendingBlob.place`). Paths
are built only from UIDs that passed `validate_uid`.

Writing and placing are separate steps (`begin`, then `PendingBlob.place`, which links,
syncs the data and the directory), so that an arriving object's bytes are written, and
the kernel starts writing them to disk, before the object is parsed; its final path needs the
parse and the SHA-256.

`FileBlobStore` implements `dicomnode.archive.blobstore.BlobStore`. Each placing is recorded
first in the placement journal (`PlacementJournal`, the filesystem's `Placements`): an entry,
a hard link to the blob's file under a per-node folder beside the store, made durable by the
same sync that makes the blob durable (no sync of its own). The entry stays until the blob's
outcome is durable elsewhere: its index row synced (`PendingBlob.settle`), or the blob
removed because the sender was refused (`PendingBlob.withdraw`, which first marks the entry
withdrawn, durably, so a refused object never comes back). Recovery at start reads the
entries left, not the store's folders (see `Archive.unindexed_recent_blobs`).

Temporary files are named after the process writing them, so that a process starting up
(another `dicomnode serve` worker, a CLI command) discards only what dead processes left.
Creating one (a metadata change the kernel may have to journal first) can be done ahead, off
the path of the object that will use it (`prepare_spare`).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import hashlib
import io
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from dicomnode.archive.blobstore import (
    CACHE_PREFIX,
    RETAINED_PREFIX,
    SPECIAL_PREFIXES,
    Placement,
    Placements,
    Range,
    StoreUsage,
    blob_key,
    withdraw_placed,
)
from dicomnode.archive.fsutil import (
    NO_HARD_LINKS,
    OPEN_EXISTING,
    OPEN_NEW,
    TEMPORARY_SERIALS,
    fsync_directory,
    running,
)
from dicomnode.archive.journal import JournalPlacement, PlacementJournal  # noqa: F401

_sync_data = getattr(os, "fdatasync", os.fsync)  # the data and the size; no timestamps
_SYNC_FILE_RANGE_WRITE = 2  # Linux: start writing dirty pages out, do not wait


def _writeback_starter() -> Callable[[int], None]:
    """A function that asks the kernel to start writing a file's dirty pages to disk without
    waiting (Linux sync_file_range), so that a later fdatasync waits less; elsewhere a no-op.
    Python's os module does not offer sync_file_range."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        sync_file_range = libc.sync_file_range
    except (OSError, AttributeError, TypeError):
        return lambda _fd: None
    sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    sync_file_range.restype = ctypes.c_int

    def start_writeback(fd: int) -> None:
        sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # failing, it only gives no head start

    return start_writeback


_start_writeback = _writeback_starter()
# The host a temporary file's writer runs on: several hosts may share the blob volume, and a
# process id means nothing on another host. Another host's leftover is judged stale by age.
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
FOREIGN_TEMPORARY_SECONDS = 86400.0
SPARES = 4  # empty temporary files kept ready at most


class PendingBlob:
    """A blob written to a temporary file whose writing out has begun: `place` puts it at its
    final path durably, `abandon` removes it (a no-op once placed). Once placed, its journal
    entry is settled (`settle`) when the outcome is durable, or the blob is taken back
    (`withdraw`) when the object was refused."""

    def __init__(self, store: FileBlobStore, tmp: Path, fd: int, size: int) -> None:
        self._store = store
        self._tmp = tmp
        self._fd: int | None = fd  # open until synced
        self._placed = False  # or abandoned
        self._size = size
        self._sha256 = ""
        self.key = ""  # where it was placed
        self.placement: Placement | None = None  # its journal entry, until settled
        self.named = False  # whether this placing gave the blob its name (no file was there)

    @property
    def size(self) -> int:
        return self._size

    def sha256(self) -> str:
        if not self._sha256:
            digest = hashlib.sha256()
            with open(self._store.absolute(self.key) if self._placed else self._tmp, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def place(self, key: str) -> None:
        """Put the temporary file at `key` durably: link it there (never over another
        file), sync its data, then the directory (and the folders above it that this
        created); raises OSError.

        The name is given (and the temporary one removed) before the data is synced so that,
        on a journaling filesystem, one commit makes all durable (syncing first and renaming
        after took two: on a fresh ext4, 1000 CT objects over one association took 3.7 s
        instead of 2.8, bench/RESULTS.md). A power loss before the sync can leave an
        incomplete file at `key`; it has no index row yet (the index is written after
        `place`), and recovery at start-up deletes it, as its content does not match the
        SHA-256 in its name. A file already at `key` has the same content (blob names
        carry it): it is kept, and synced in case its writer has not yet done so. Where the
        filesystem has no hard links, the file is synced and then renamed."""
        if self._placed:
            raise ValueError("the blob was already placed or abandoned")
        self._placed = True
        fd, self._fd = self._fd, None
        assert fd is not None
        target = self._store.absolute(key)
        created: list[Path] = []
        self.key = key
        try:
            self.placement = self._store.placements.record(key, self._tmp)
            self._name(fd, target, created)
        finally:
            os.close(fd)
            self._tmp.unlink(missing_ok=True)
        fsync_directory(target.parent)
        for folder in created:
            fsync_directory(folder.parent)
        # The journal's folder is not synced: its entry was made before the blob's name, and a
        # journaling filesystem (ext4, XFS) commits metadata changes in order, so the commit
        # that makes the name durable holds the entry too (syncing it as well cost a commit
        # of its own: ~5 ms per object on this machine's disk, 12 ms -> 17-20 ms).

    @property
    def relative(self) -> str:
        """The key it was placed at (the name this had before the `BlobStore` protocol)."""
        return self.key

    def settle(self) -> None:
        """The outcome is durable elsewhere (the index row synced): drop the journal entry
        (no sync: an entry a power loss brings back is settled again at the next start)."""
        placement, self.placement = self.placement, None
        if placement is not None:
            self._store.placements.settle([placement])

    def withdraw(self) -> None:
        """The object was refused after it was placed: mark the entry withdrawn (durably),
        remove the blob durably if this placing gave it its name and no other placing of it is
        unsettled (an identical object placed meanwhile counts on it), then drop the entry;
        so it never comes back."""
        withdraw_placed(self, self._store)
        folder = self._store.absolute(self.key).parent
        if folder.exists():
            fsync_directory(folder)

    def _name(self, fd: int, target: Path, created: list[Path]) -> None:
        """Give the file open as `fd` the name `target` and sync its data (see `place`),
        adding the folders made on the way to `created`. A failing sync leaves the name: a
        placer of the same content may have taken the file as its own meanwhile; unindexed,
        it is filed again or removed at the next start (`Intake.recover_unindexed`)."""
        for _attempt in range(3):
            try:
                _put_into(os.link, self._tmp, target, created)
            except FileExistsError:
                try:
                    existing = os.open(target, OPEN_EXISTING)  # same content, perhaps unsynced
                except FileNotFoundError:
                    continue  # deleted meanwhile: this file takes the name after all
                try:
                    _sync_data(existing)
                finally:
                    os.close(existing)
                return
            except OSError as e:
                if e.errno not in NO_HARD_LINKS:
                    raise
                _sync_data(fd)
                _put_into(os.replace, self._tmp, target, created)
                self.named = True
                return
            self.named = True
            self._tmp.unlink()  # before the sync, or syncing the directory takes another commit
            _sync_data(fd)
            return
        raise FileNotFoundError(f"{target} kept appearing and vanishing")

    def abandon(self) -> None:
        if self._placed:
            return
        self._placed = True
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self._tmp.unlink(missing_ok=True)


class FileBlobStore:
    """Files under ``root/<study>/<series>/<instance>.dcm``, with the placement journal in
    `journal_folder` (default: ``placing`` beside the root). Folders are created when first
    written to, not by construction."""

    def __init__(
        self,
        root: Path,
        journal_folder: Path | None = None,
        placements: Placements | None = None,
    ) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.placements: Placements = placements or PlacementJournal(
            journal_folder or root.parent / "placing"
        )
        self._spares: collections.deque[tuple[Path, int]] = collections.deque()

    @property
    def journal(self) -> PlacementJournal:
        """The placement journal (when the placements are recorded in one)."""
        assert isinstance(self.placements, PlacementJournal)
        return self.placements

    @staticmethod
    def relative_path(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        """The blob's path relative to the root; raises InvalidUID for an unsafe UID."""
        return blob_key(study_uid, series_uid, sop_instance_uid)

    def absolute(self, key: str) -> Path:
        return self.root / key

    def temporary_path(self, what: str = "") -> Path:
        """A fresh name under ``tmp/`` carrying this process's id and host:
        ``<pid>@<host>@<serial>.part``."""
        return self.tmp / f"{os.getpid()}@{_HOST}@{what or next(TEMPORARY_SERIALS)}.part"

    def _new_temporary(self, what: str = "") -> tuple[Path, int]:
        tmp = self.temporary_path(what)
        try:
            return tmp, os.open(tmp, OPEN_NEW, 0o600)
        except FileNotFoundError:
            self.tmp.mkdir(parents=True, exist_ok=True)
            return tmp, os.open(tmp, OPEN_NEW, 0o600)

    def write(self, key: str, chunks: Sequence[bytes]) -> None:
        """Write `chunks` to `key` durably (`begin`, `PendingBlob.place`, `settle`)."""
        blob = self.begin(chunks)
        blob.place(key)
        blob.settle()

    def prepare_spare(self) -> None:
        """Create an empty temporary file for a later `begin` (unless `SPARES` wait already)."""
        if len(self._spares) < SPARES:
            self._spares.append(self._new_temporary())

    def discard_spares(self) -> None:
        while self._spares:
            tmp, fd = self._spares.popleft()
            os.close(fd)
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        self.discard_spares()

    def begin(self, chunks: Sequence[bytes]) -> PendingBlob:
        """Write `chunks` to a temporary file (a spare one if one is ready) and start its
        writing out to disk."""
        try:
            tmp, fd = self._spares.popleft()
        except IndexError:
            tmp, fd = self._new_temporary()
        try:
            size = _write_all(fd, chunks)
            _start_writeback(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return PendingBlob(self, tmp, fd, size)

    def placed(self, written_since: float = float("-inf"), outside: str = "") -> list[str]:
        """The blobs (``<study>/<series>/<name>.dcm``, relative) written at `written_since`
        (a Unix time) or later, not under the top folder `outside` nor a special one
        (quarantine, cache); ``tmp/`` holds no blobs. A series folder changed last before
        then is not listed (naming a blob in it changes it)."""
        found: list[str] = []
        skipped = {"tmp", outside, *(prefix.rstrip("/") for prefix in SPECIAL_PREFIXES)}
        retained = RETAINED_PREFIX.rstrip("/")
        for study in _folders(self.root):
            if study.name in skipped:
                continue
            if study.name == retained:  # studies retained by law: blobs one level deeper
                found += [
                    RETAINED_PREFIX + "/".join(path.relative_to(study.path).parts)
                    for path in Path(study.path).glob("*/*/*.dcm")
                    if path.stat().st_mtime >= written_since
                ]
                continue
            for series in _folders(study.path):
                try:
                    if series.stat().st_mtime < written_since:
                        continue
                    with os.scandir(series.path) as entries:
                        found += [
                            f"{study.name}/{series.name}/{entry.name}"
                            for entry in entries
                            if entry.name.endswith(".dcm")
                            and entry.stat().st_mtime >= written_since
                        ]
                except FileNotFoundError:  # emptied and removed meanwhile (a deletion)
                    continue
        return found

    def keys(self, prefix: str = "") -> Iterator[str]:
        """The archive's blob keys (starting with `prefix`); for `archive check` only."""
        return (key for key in self.placed() if key.startswith(prefix))

    def open(self, key: str, byte_range: Range | None = None) -> BinaryIO:
        """The blob's bytes (or bytes [start, end) of it) as a stream."""
        stream = self.absolute(key).open("rb")
        if byte_range is None:
            return stream
        return _RangeReader.around(stream, byte_range)

    def exists(self, key: str) -> bool:
        return self.absolute(key).is_file()

    def size(self, key: str) -> int:
        return self.absolute(key).stat().st_size

    def put_cached(self, key: str, data: bytes) -> None:
        """Write re-derivable data atomically; no fsync, as it can always be derived again."""
        tmp, fd = self._new_temporary()
        try:
            _write_all(fd, [data])
        finally:
            os.close(fd)
        target = self.absolute(key)
        try:
            os.replace(tmp, target)
        except FileNotFoundError:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)

    def delete(self, key: str) -> None:
        """Remove a blob (not synced: a caller that needs that syncs its folder), its cached
        data and the folders it leaves empty."""
        path = self.absolute(key)
        path.unlink(missing_ok=True)
        if not key.startswith(CACHE_PREFIX):
            cached = self.absolute(CACHE_PREFIX + key)
            for derived in cached.parent.glob(glob_escape(cached.name) + ".*"):
                derived.unlink(missing_ok=True)
            _remove_empty(cached.parent, 2)
        for derived in path.parent.glob(glob_escape(path.name) + ".*"):  # before `cache/`
            derived.unlink(missing_ok=True)
        _remove_empty(path.parent, 2)

    def usage(self) -> StoreUsage:
        """The disk's free bytes; the bytes stored are the index's to say."""
        folder = self.root
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return StoreUsage(free_bytes=shutil.disk_usage(folder).free, used_bytes=None)

    def check(self) -> None:
        """Raise OSError unless a file can be written under the root now."""
        tmp, fd = self._new_temporary(f"check{time.monotonic_ns()}")
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            tmp.unlink(missing_ok=True)

    def recover(self) -> int:
        """Delete leftovers of writes a crash interrupted (those of processes no longer
        running, or of this one); returns how many were removed."""
        return self.discard_partial_writes()

    def discard_partial_writes(self) -> int:
        """Delete leftovers of writes a crash interrupted (those of processes no longer
        running, or of this one); returns how many were removed."""
        count = 0
        if not self.tmp.is_dir():
            return 0
        spares = {tmp for tmp, _fd in self._spares}
        for leftover in self.tmp.iterdir():
            if leftover in spares or _being_written(leftover):
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            count += 1
        return count


class _RangeReader(io.RawIOBase):
    """Bytes [start, end) of an open file, as a stream."""

    def __init__(self, stream: BinaryIO, end: int) -> None:
        self._stream = stream
        self._left = max(0, end - stream.tell())

    @classmethod
    def around(cls, stream: BinaryIO, byte_range: Range) -> BinaryIO:
        start, end = byte_range
        if start < 0 or end < start:
            stream.close()
            raise ValueError(f"not a byte range: {byte_range}")
        stream.seek(start)
        return io.BufferedReader(cls(stream, end))  # type: ignore[return-value]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: self._left]
        count = self._stream.readinto(view)  # type: ignore[attr-defined]
        self._left -= count or 0
        return count or 0

    def close(self) -> None:
        self._stream.close()
        super().close()


def glob_escape(name: str) -> str:
    return name.replace("[", "[[]").replace("*", "[*]").replace("?", "[?]")


def _remove_empty(folder: Path, levels: int) -> None:
    for _level in range(levels):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _folders(path: str | Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return [entry for entry in entries if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _being_written(leftover: Path) -> bool:
    """Whether another process may be writing the temporary file `leftover` now: a running
    process of this host (by its id), or any of another host's unless a day old. A name
    without a host (written before hosts were named) counts as this host's."""
    parts = leftover.name.split("@", 2)
    pid, host = (parts[0], parts[1]) if len(parts) == 3 else (leftover.name.split("-")[0], _HOST)
    if host != _HOST:
        try:
            return time.time() - leftover.stat().st_mtime < FOREIGN_TEMPORARY_SECONDS
        except FileNotFoundError:
            return True
    return pid.isdigit() and int(pid) != os.getpid() and running(int(pid))


def _write_all(fd: int, chunks: Sequence[bytes]) -> int:
    total = 0
    for chunk in chunks:
        view = memoryview(chunk)
        total += len(view)
        while view:
            view = view[os.write(fd, view) :]
    return total


def _put_into(
    move: Callable[[Path, Path], None], tmp: Path, target: Path, created: list[Path]
) -> None:
    """Give `tmp` the name `target` with `move` (os.link or os.replace), creating the folders
    it needs (the first blob of a series, or one whose folder another process just emptied
    and removed) and adding them to `created`, also when the move fails after that."""
    for _attempt in range(3):
        try:
            move(tmp, target)
            return
        except FileNotFoundError:
            if not tmp.exists():
                raise
        folder = target.parent
        while not folder.exists():
            created.append(folder)
            folder = folder.parent
        target.parent.mkdir(parents=True, exist_ok=True)
    move(tmp, target)
