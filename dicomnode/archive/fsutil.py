"""Small filesystem helpers the blob store and its placement journal share."""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path

OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
OPEN_EXISTING = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}
TEMPORARY_SERIALS = itertools.count()  # names of this process's temporary files and entries


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
