"""Capacity: the quota, read from the index, and the store's free space (`BlobStore.usage`)."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import func, select

from dicomnode.archive import schema
from dicomnode.archive.base import ArchiveBase
from dicomnode.core.errors import (
    QuotaExceeded,
)

log = logging.getLogger("dicomnode.archive")


USAGE_SECONDS = 10.0  # how stale the stored-bytes total (for the quota) may be


class Capacity(ArchiveBase):
    """The quota (bytes the index holds) and the store's free space."""

    quota_bytes: int
    min_free_bytes: int
    _usage: tuple[float, int] | None
    _usage_lock: threading.Lock
    _last_capacity_alert: float

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
