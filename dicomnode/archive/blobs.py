"""The blob store: DICOM Part 10 files on the filesystem, written atomically and durably.

A blob is written to ``tmp/`` under the root, fsynced, renamed into place and its directory
fsynced, so a crash leaves either the whole file or nothing at its final path. Paths are
built only from UIDs that passed `validate_uid`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from dicomnode.core.uids import validate_uid


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

    def write(self, relative: str, chunks: list[bytes]) -> None:
        """Write `chunks` to `relative` atomically: temp file, fsync, rename, fsync directory."""
        target = self.absolute(relative)
        directory = target.parent
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        fsync_directory(directory)
        if created:
            fsync_directory(directory.parent)
            fsync_directory(directory.parent.parent)

    def open(self, relative: str) -> BinaryIO:
        return self.absolute(relative).open("rb")

    def exists(self, relative: str) -> bool:
        return self.absolute(relative).is_file()

    def sidecar(self, relative: str, suffix: str) -> Path:
        """The path of a file derived from a blob (e.g. its cached metadata); it goes with it."""
        return self.absolute(relative + suffix)

    def write_sidecar(self, relative: str, suffix: str, data: bytes) -> None:
        """Write a derived file atomically; no fsync, as it can always be derived again."""
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp_name, self.sidecar(relative, suffix))

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
        """Delete leftovers of writes a crash interrupted; returns how many were removed."""
        count = 0
        for leftover in self.tmp.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            count += 1
        return count


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
