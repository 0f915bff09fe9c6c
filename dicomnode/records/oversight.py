"""The DPO's oversight reads: the ledger's views, checkpoints and verification, and
governance's registers (legal holds, restrictions, objects quarantined at intake, the
delivery outbox, policy activations). Reads only, except `requeue_delivery` (the outbox's
own bookkeeping: a failed delivery is tried again, and egress decides again when it is)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from dicomnode.archive import Archive
from dicomnode.archive.ledger_views import LedgerViews
from dicomnode.core.ledger import Checkpoint, LedgerEntry, LedgerFilter, Page, Verification


class Oversight:
    """Governance's records over one archive, as the DPO's pages and the governance API read
    them."""

    def __init__(self, archive: Archive) -> None:
        self._store = archive
        self._views = LedgerViews(archive.index)

    # --- the ledger -------------------------------------------------------------------------

    def ledger_page(self, f: LedgerFilter, page: int = 1, per_page: int = 50) -> Page:
        return self._views.page(f, page, per_page)

    def ledger_iter(self, f: LedgerFilter, newest_first: bool = True) -> Iterator[LedgerEntry]:
        return self._views.iter(f, newest_first)

    def daily_counts(self, f: LedgerFilter) -> list[tuple[str, str, int]]:
        return self._views.daily_counts(f)

    def choices(self, kinds: tuple[str, ...]) -> dict[str, list[str]]:
        return self._views.choices(kinds=kinds)

    def entry(self, seq: int) -> LedgerEntry | None:
        return self._views.entry(seq)

    def head(self) -> int:
        return self._views.head()

    def latest(self, kind: str, outcome: str | None = None) -> LedgerEntry | None:
        return self._views.latest(kind, outcome)

    def patient_studies(self, patient_id: str) -> list[str]:
        return self._views.patient_studies(patient_id)

    def recipients_with_copies(self, study_uids: list[str], before_seq: int) -> list[str]:
        return self._views.recipients_with_copies(study_uids, before_seq)

    def checkpoints(self) -> list[Checkpoint]:
        return self._store.ledger.checkpoints()

    def verify_ledger(self, signature_ok: Callable[[Checkpoint], bool]) -> Verification:
        """Recompute the chain against the signed checkpoints (nothing is recorded: a DPO's
        verification that is recorded goes through stewardship)."""
        return self._store.ledger.verify(signature_ok=signature_ok)

    # --- governance's registers -------------------------------------------------------------

    def holds(self, active_only: bool = False) -> list[Any]:
        return self._store.registry.holds(active_only)

    def restrictions(self) -> list[Any]:
        return self._store.registry.restrictions()

    def quarantined(self, study_uid: str | None = None) -> list[Any]:
        """Objects held at intake (quarantine), optionally of one study."""
        return self._store.registry.quarantined(study_uid=study_uid)

    def deliveries(
        self, state: str | None = None, patient_id: str | None = None, limit: int = 100
    ) -> list[Any]:
        return self._store.registry.deliveries(state=state, patient_id=patient_id, limit=limit)

    def delivery(self, delivery_id: int) -> Any:
        return self._store.registry.delivery(delivery_id)

    def requeue_delivery(self, delivery_id: int, now: datetime, by: str) -> Any:
        """Try a failed delivery again (egress decides again when it runs); returns it."""
        self._store.registry.requeue_delivery(delivery_id, now, by)
        return self._store.registry.delivery(delivery_id)

    def activations(self) -> dict[str, datetime | None]:
        return self._store.registry.activations()
