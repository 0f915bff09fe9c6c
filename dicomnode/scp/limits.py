"""Per-sender limits on C-STORE: objects per minute and data set bytes per hour, for each
calling AE title and address (``dimse.sender_objects_per_minute``, ``sender_bytes_per_hour``).

A stranger that may store (``require_known_peers = false``) could otherwise fill the archive's
quota, after which every modality is refused. The defaults are far above what a modality sends
(a CT sends a few thousand objects, a few GB, per study); an object over a limit is answered
0xA700 (Refused: Out of Resources, which modalities retry later) until the window has room
again. The first refusal of a sender in each window is logged and audited (a security alert);
every refusal is counted in ``dicomnode_store_failures_total{reason="sender_limit"}``. The
windows are per process (as ``max_associations`` is): with DIMSE worker processes a sender
whose associations go to several processes may get up to that many times the limit.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_SENDERS = 10_000  # senders tracked at once; the least recently seen are forgotten first


@dataclass
class _Window:
    """Amounts in a sliding window of `buckets` buckets of `width` seconds each."""

    width: float
    buckets: int
    slots: deque[tuple[int, int]] = field(default_factory=deque)  # (bucket number, amount)
    total: int = 0

    def expire(self, now: float) -> None:
        oldest = int(now // self.width) - self.buckets + 1
        while self.slots and self.slots[0][0] < oldest:
            self.total -= self.slots.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        number = int(now // self.width)
        if self.slots and self.slots[-1][0] == number:
            self.slots[-1] = (number, self.slots[-1][1] + amount)
        else:
            self.slots.append((number, amount))
        self.total += amount

    def free_at(self, now: float) -> float:
        """When the oldest amount leaves the window."""
        return (self.slots[0][0] + self.buckets) * self.width if self.slots else now


@dataclass
class _Sender:
    objects: _Window = field(default_factory=lambda: _Window(1.0, 60))  # one minute
    nbytes: _Window = field(default_factory=lambda: _Window(60.0, 60))  # one hour
    seen: float = 0.0
    alerted_until: float = -1.0  # refusals before this are not alerted again


@dataclass(frozen=True)
class Refusal:
    """Why an object is refused; `alert` is true for a sender's first refusal in a window."""

    reason: str
    alert: bool


class SenderLimits:
    """Counts C-STOREs per (calling AE title, address) and refuses those over a limit."""

    def __init__(
        self,
        objects_per_minute: int,
        bytes_per_hour: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.objects_per_minute = objects_per_minute
        self.bytes_per_hour = bytes_per_hour
        self.clock = clock
        self._senders: dict[tuple[str, str], _Sender] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.objects_per_minute or self.bytes_per_hour)

    def admit(self, caller: str, address: str, size: int) -> Refusal | None:
        """Count an object of `size` bytes from the sender and return None, or (counting
        nothing) the Refusal when it would take the sender over a limit."""
        if not self.enabled:
            return None
        now = self.clock()
        with self._lock:
            sender = self._sender((caller, address), now)
            sender.objects.expire(now)
            sender.nbytes.expire(now)
            reason = ""
            if self.objects_per_minute and sender.objects.total + 1 > self.objects_per_minute:
                reason = f"over {self.objects_per_minute} objects per minute"
                until = sender.objects.free_at(now)
            elif self.bytes_per_hour and sender.nbytes.total + size > self.bytes_per_hour:
                reason = f"over {self.bytes_per_hour} bytes per hour"
                until = sender.nbytes.free_at(now)
            if reason:
                alert = now >= sender.alerted_until
                if alert:
                    sender.alerted_until = until
                return Refusal(reason, alert)
            sender.objects.add(now, 1)
            sender.nbytes.add(now, size)
            return None

    def _sender(self, key: tuple[str, str], now: float) -> _Sender:
        sender = self._senders.pop(key, None)  # re-inserted: the dict stays in order of use
        if sender is None:
            sender = _Sender()
            if len(self._senders) >= MAX_SENDERS:
                del self._senders[next(iter(self._senders))]
        sender.seen = now
        self._senders[key] = sender
        return sender
