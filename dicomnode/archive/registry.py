"""Governance records in the index: published policy versions, consent versions, restrictions,
legal holds, objects in intake's quarantine and deliveries on their way out, each store in its
own module (policies, subjects, quarantine, cancelling, outbox; value types in values).

Every change here that the DPO must be able to account for is written in the same transaction
as its ledger entry. Consent versions are append-only (a database trigger refuses UPDATE and
DELETE); a change of consent is a new version. The registry stores and returns facts; what they
mean is decided by `dicomnode.governance`, never here.
"""

from __future__ import annotations

import threading

from dicomnode.archive import notify
from dicomnode.archive.cancelling import WorkCancelling
from dicomnode.archive.index import Index
from dicomnode.archive.ledger import Ledger
from dicomnode.archive.outbox import DeliveryOutbox
from dicomnode.archive.policies import PolicyRecords
from dicomnode.archive.quarantine import QuarantineRecords
from dicomnode.archive.subjects import SubjectRecords
from dicomnode.archive.values import (  # noqa: F401 (the names callers import from here)
    CANCELLED,
    DENIED,
    DONE,
    FAILED,
    QUEUED,
    SENDING,
    Delivery,
    LegalHold,
    QuarantinedObject,
    Restriction,
)
from dicomnode.core.model import PublishedPolicy


class Registry(PolicyRecords, SubjectRecords, QuarantineRecords, WorkCancelling, DeliveryOutbox):
    """The governance tables of the index."""

    def __init__(self, index: Index, ledger: Ledger) -> None:
        self.index = index
        self.ledger = ledger
        self._lock = threading.Lock()
        self._policies: tuple[float, list[PublishedPolicy]] | None = None
        self._governed: tuple[float, frozenset[str]] | None = None
        self._wakeups = notify.Listener(index.engine, notify.GOVERNANCE, self._drop_cached)
        self._generation = 0  # counts drops: a read begun before one is not cached

    def forget_cached(self) -> None:
        """Drop cached reads (after a write here, or when a test moves the clock), and wake
        the other nodes to drop theirs (PostgreSQL's NOTIFY, `notify.py`)."""
        self._drop_cached()
        notify.announce(self.index.engine, notify.GOVERNANCE)

    def _drop_cached(self, _payload: str = "") -> None:
        with self._lock:
            self._generation += 1
            self._policies = None
            self._governed = None
