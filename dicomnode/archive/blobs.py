"""The blob store: DICOM Part 10 files on the filesystem, written atomically and durably.

A blob is written to ``tmp/`` under the root, fsynced (fdatasync), renamed into place and its
directory fsynced (and the folders above it when they are new), so a crash leaves either the
whole file or nothing at its final path, and a blob whose write returned survives a power
loss. Paths are built only from UIDs that passed `validate_uid`.

Temporary files are named after the process writing them, so that a process starting up
(another `dicomnode serve` worker, a CLI command) discards only what dead processes left.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from dicomnode.core.uids import validate_uid

_sync_data = getattr(os, "fdatasync", os.fsync)  # the data and the size; no timestamps
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


class FileBlobStore:
    """Files under ``root/<study>/<series>/<instance>.dcm``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def relative_path(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        """The blob's path relative to the root; raises InvalidUID for an unsafe UID."""
        return "/".join(
            (
                validate_uid(study_uid, "StudyInstanceUID"),
                validate_uid(series_uid, "SeriesInstanceUID"),
                validate_uid(sop_instance_uid, "SOPInstanceUID") + ".dcm",
            )
        )

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def temporary_path(self, what: str = "") -> Path:
        """A fresh name under ``tmp/`` carrying this process's id."""
        return self.tmp / f"{os.getpid()}-{what or secrets.token_hex(8)}.part"

    def write(self, relative: str, chunks: Sequence[bytes]) -> None:
        """Write `chunks` to `relative` atomically and durably: temp file, fdatasync, rename,
        fsync of the directory (and of the folders above it that this write created)."""
        target = self.absolute(relative)
        tmp = self.temporary_path()
        fd = os.open(tmp, _OPEN_NEW, 0o600)
        try:
            try:
                _write_all(fd, chunks)
                _sync_data(fd)
            finally:
                os.close(fd)
            created = _rename_into(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_directory(target.parent)
        for folder in created:
            fsync_directory(folder.parent)

    def open(self, relative: str) -> BinaryIO:
        return self.absolute(relative).open("rb")

    def exists(self, relative: str) -> bool:
        return self.absolute(relative).is_file()

    def sidecar(self, relative: str, suffix: str) -> Path:
        """The path of a file derived from a blob (e.g. its cached metadata); it goes with it."""
        return self.absolute(relative + suffix)

    def write_sidecar(self, relative: str, suffix: str, data: bytes) -> None:
        """Write a derived file atomically; no fsync, as it can always be derived again."""
        tmp = self.temporary_path()
        fd = os.open(tmp, _OPEN_NEW, 0o600)
        try:
            _write_all(fd, [data])
        finally:
            os.close(fd)
        os.replace(tmp, self.sidecar(relative, suffix))

    def delete(self, relative: str) -> None:
        """Remove a blob, its derived files and the folders it leaves empty."""
        path = self.absolute(relative)
        path.unlink(missing_ok=True)
        for derived in path.parent.glob(path.name + ".*"):
            derived.unlink(missing_ok=True)
        for parent in (path.parent, path.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break

    def discard_partial_writes(self) -> int:
        """Delete leftovers of writes a crash interrupted (those of processes no longer
        running, or of this one); returns how many were removed."""
        count = 0
        for leftover in self.tmp.iterdir():
            writer = leftover.name.split("-", 1)[0]
            if writer.isdigit() and int(writer) != os.getpid() and _running(int(writer)):
                continue  # another process is writing it now
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            count += 1
        return count


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _write_all(fd: int, chunks: Sequence[bytes]) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


def _rename_into(tmp: Path, target: Path) -> list[Path]:
    """Rename `tmp` to `target`, creating the folders it needs (the first blob of a series,
    or one whose folder another process just emptied and removed); returns those created."""
    created: list[Path] = []
    for _attempt in range(3):
        try:
            os.replace(tmp, target)
            return created
        except FileNotFoundError:
            if not tmp.exists():
                raise
        folder = target.parent
        while not folder.exists():
            created.append(folder)
            folder = folder.parent
        target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return created


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
