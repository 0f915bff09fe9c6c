"""The filesystem's `Placements`: the placement journal of `FileBlobStore`."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dicomnode.archive.blobstore import Leftover, Placement
from dicomnode.archive.fsutil import (
    NO_HARD_LINKS,
    OPEN_NEW,
    TEMPORARY_SERIALS,
    fsync_directory,
    running,
)


@dataclass
class JournalPlacement:
    """A placement journal entry: the file `path`, recording the placing of `key`."""

    path: Path
    key: str


_WITHDRAWN = "w"  # marks a withdrawn entry's writer part: ``<pid>-<serial>w+<key>``


class PlacementJournal:
    """The filesystem's `Placements`: one entry per placing,
    ``<pid>-<serial>+<key, '/' as '+'>`` in `folder` (outside the store's root, so nothing
    that reads the store sees it), a hard link of the blob's file made before the blob is
    named, so the blob's own sync makes it durable too (an empty file where hard links cannot
    be made). The outcomes: settled (filed, and durable in the index), withdrawn (refused:
    the entry renamed ``...w+...`` and synced, the blob removed, the entry removed), or left
    for recovery (the process stopped before either: a sender that got no answer, or a power
    loss that took the index row of one that got success). Entries of running processes
    other than this one are another process's business (the folder is per node)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def record(self, key: str, staged: Path | None = None) -> JournalPlacement:
        """A new entry for placing `staged` at `key`; raises OSError."""
        entry = self.folder / f"{os.getpid()}-{next(TEMPORARY_SERIALS)}+{_flat(key)}"
        for _attempt in range(2):
            try:
                if staged is None:
                    raise OSError(errno.ENOSYS, "nothing to link")
                os.link(staged, entry)
            except FileNotFoundError:
                self.folder.mkdir(parents=True, exist_ok=True)
                continue
            except OSError as e:
                if e.errno not in NO_HARD_LINKS and e.errno != errno.EXDEV:
                    raise
                os.close(os.open(entry, OPEN_NEW, 0o600))
            return JournalPlacement(entry, key)
        raise FileNotFoundError(f"cannot record in {self.folder}")

    def settle(self, placements: Iterable[Placement]) -> None:
        for placement in placements:
            assert isinstance(placement, JournalPlacement)
            placement.path.unlink(missing_ok=True)

    def withdraw(self, placement: Placement) -> bool:
        assert isinstance(placement, JournalPlacement)
        writer, _, flat = placement.path.name.partition("+")
        if not writer.endswith(_WITHDRAWN):
            marked = placement.path.with_name(f"{writer}{_WITHDRAWN}+{flat}")
            os.replace(placement.path, marked)
            fsync_directory(self.folder)
            placement.path = marked
        return not self._others(placement)

    def forget(self, placement: Placement) -> None:
        assert isinstance(placement, JournalPlacement)
        placement.path.unlink(missing_ok=True)
        fsync_directory(self.folder)

    def _others(self, placement: JournalPlacement) -> bool:
        """Whether an unsettled entry other than `placement`'s records a placing of its key."""
        suffix = "+" + _flat(placement.key)
        with os.scandir(self.folder) as entries:
            return any(
                e.name.endswith(suffix)
                and e.name != placement.path.name
                and not e.name.partition("+")[0].endswith(_WITHDRAWN)
                for e in entries
            )

    def leftovers(self) -> list[Leftover]:
        """The entries of processes no longer running, and this one's."""
        found = []
        try:
            with os.scandir(self.folder) as entries:
                listed = list(entries)
        except FileNotFoundError:
            return []
        for entry in listed:
            writer, _, flat = entry.name.partition("+")
            pid = writer.split("-", 1)[0]
            if not flat:
                continue
            if pid.isdigit() and int(pid) != os.getpid() and running(int(pid)):
                continue
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue
            key = flat.replace("+", "/")
            placement = JournalPlacement(Path(entry.path), key)
            found.append(Leftover(placement, key, mtime, writer.endswith(_WITHDRAWN)))
        return found


def _flat(key: str) -> str:
    return key.replace("/", "+")
