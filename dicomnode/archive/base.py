"""The state and failure handling the parts of `Archive` share."""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

from dicomnode.archive.index import Index
from dicomnode.archive.ledger import Ledger
from dicomnode.archive.registry import Registry
from dicomnode.core.errors import (
    QuotaExceeded,
    StorageUnavailable,
    storage_failure,
)

log = logging.getLogger("dicomnode.archive")


FAILING_SECONDS = 10.0  # how long /healthz reports an index or disk failure this process saw


class ArchiveBase:
    """What every part of `Archive` shares: its stores, and how a storage failure is answered."""

    blobs: Any  # a BlobStore
    index: Index
    ledger: Ledger
    registry: Registry
    _failing: tuple[float, StorageUnavailable] | None

    def _storage_failure(self, error: BaseException) -> BaseException:
        """`error` as the node answers it: a failure of the disk or the index database
        becomes StorageUnavailable in words without internals (logged here in full, and
        remembered for /healthz); any other error is itself."""
        failure = storage_failure(error)
        if failure is None:
            return error
        if failure is not error:
            log.error(
                "storage failure: %s: %s",
                type(error).__name__,
                error,
                extra={"event": "storage", "alert": True, "kind": type(failure).__name__},
            )
        if not isinstance(failure, QuotaExceeded):
            self._failing = (time.monotonic(), failure)
        return failure

    def _raise_as_answered(self, error: BaseException) -> NoReturn:
        """Raise `error` as the node answers it (`_storage_failure`)."""
        failure = self._storage_failure(error)
        if failure is error:
            raise error
        raise failure from error

    def failing(self) -> StorageUnavailable | None:
        """The index or disk failure this process saw last, unless a store succeeded since or
        it is older than `FAILING_SECONDS`."""
        failing = self._failing
        if failing is None or time.monotonic() - failing[0] > FAILING_SECONDS:
            return None
        return failing[1]
