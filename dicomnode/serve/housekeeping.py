"""The node's periodic governance work: send due deliveries, sweep expired data, sign ledger
checkpoints. Sweeps and checkpoints must run once for all the nodes on one index: only the node
holding the leader lease (`LeaderLease`) runs them; deliveries are claimed row by row (SKIP
LOCKED) on every node."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from dicomnode.archive.keys import sign_json
from dicomnode.config import Settings
from dicomnode.egress import Egress
from dicomnode.stewardship import Stewardship

log = logging.getLogger("dicomnode")

ONCE = {"checkpoint", "retention"}  # tasks only the leader lease's holder runs


class Housekeeping:
    """The node's periodic governance work, each task on its own interval: send due
    deliveries (forwarded results, shares), sweep expired data, sign ledger checkpoints. A task
    that fails is logged and tried again at its next turn."""

    def __init__(
        self,
        settings: Settings,
        egress: Egress,
        stewardship: Stewardship,
        signing_key: Any,
        lease: Any = None,
    ) -> None:
        self.settings = settings
        self.egress = egress
        self.stewardship = stewardship
        self.signing_key = signing_key
        self.lease = lease  # None: this node alone does everything
        governance = settings.governance
        self.worker = f"delivery-{uuid.uuid4().hex[:8]}"
        self.tasks: list[tuple[str, float, Callable[[], object]]] = [
            ("deliveries", governance.delivery_interval, self.send_due_deliveries)
        ]
        if governance.checkpoint_interval > 0:
            self.tasks.append(("checkpoint", governance.checkpoint_interval, self.checkpoint))
        if governance.retention_interval > 0:
            self.tasks.append(("retention", governance.retention_interval, self.retention_sweep))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def send_due_deliveries(self) -> int:
        backoff = timedelta(seconds=self.settings.governance.delivery_backoff)
        sent = 0
        while not self._stop.is_set() and self.egress.deliver_due(self.worker, backoff):
            sent += 1
        return sent

    def retention_sweep(self) -> object:
        return self.stewardship.retention_sweep("dicomnode:retention")

    def checkpoint(self) -> object:
        key = self.signing_key
        return self.stewardship.checkpoint(lambda payload: sign_json(key, payload))

    def start(self) -> None:
        if self.lease is not None and any(name in ONCE for name, _, _ in self.tasks):
            self.lease.start()
        for name, interval, task in self.tasks:
            thread = threading.Thread(
                target=self._loop, args=(name, interval, task), name=name, daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _loop(self, name: str, interval: float, task: Callable[[], object]) -> None:
        while not self._stop.wait(interval):
            if name in ONCE and self.lease is not None and not self.lease.held():
                continue  # another node holds the lease and does it
            try:
                task()
            except Exception:
                log.exception("%s failed; trying again in %g s", name, interval)

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        if self.lease is not None:
            self.lease.stop()
