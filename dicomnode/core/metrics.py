"""Counters and gauges rendered in the Prometheus text format.

Every series carries a ``node`` label (``[node] name``, else the host's name) when `node` is
set, so that one Prometheus sees several nodes behind a balancer apart. Collectors add
values read when /metrics is scraped (e.g. job queue depth from the database).
An observer: a failure here never stops the work that reports to it.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable

log = logging.getLogger("dicomnode")

Sample = tuple[str, dict[str, str], float]  # (name, labels, value)

_HELP = {
    "dicomnode_associations_total": ("counter", "DIMSE association requests, accepted or rejected"),
    "dicomnode_associations_closed_total": (
        "counter",
        "DIMSE associations ended, released or aborted",
    ),
    "dicomnode_associations_active": ("gauge", "DIMSE associations open now"),
    "dicomnode_dimse_requests_total": ("counter", "DIMSE requests answered, by service and status"),
    "dicomnode_instances_received_total": ("counter", "Instances received, by outcome"),
    "dicomnode_bytes_received_total": ("counter", "Bytes of newly stored instances"),
    "dicomnode_store_failures_total": ("counter", "Objects refused at ingest, by reason"),
    "dicomnode_instances_sent_total": ("counter", "Instances sent by C-MOVE and C-GET, by result"),
    "dicomnode_object_store_requests_total": ("counter", "Object store calls, by operation"),
    "dicomnode_object_store_seconds_total": ("counter", "Time in object store calls, by operation"),
    "dicomnode_object_store_errors_total": ("counter", "Object store calls that failed, by error"),
    "dicomnode_ledger_lock_waits_total": ("counter", "Ledger appends that took the append lock"),
    "dicomnode_ledger_lock_wait_seconds_total": ("counter", "Time waited for the ledger's lock"),
    "dicomnode_jobs": ("gauge", "Analysis jobs and deliveries in the database, by kind and state"),
    "dicomnode_draining": ("gauge", "1 while the node drains (answers 503 on /healthz)"),
}


class Metrics:
    """Thread-safe labelled counters and gauges."""

    def __init__(self, node: str = "") -> None:
        self.node = node  # the "node" label of every series ("" leaves it out)
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._collectors: list[Callable[[], Iterable[Sample]]] = []

    def add_collector(self, collect: Callable[[], Iterable[Sample]]) -> None:
        """Call `collect` at each render for samples that replace the stored ones (gauges)."""
        self._collectors.append(collect)

    def _collected(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        for collect in self._collectors:
            try:
                for name, labels, amount in collect():
                    out[name][tuple(sorted(labels.items()))] = amount
            except Exception:  # an observer: a failing collector leaves its samples out
                log.warning("a metrics collector failed", exc_info=True)
        return out

    def add(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0) + amount

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0)

    def render(self) -> str:
        lines: list[str] = []
        collected = self._collected()
        node = (("node", self.node),) if self.node else ()
        with self._lock:
            for name, (kind, text) in _HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                series = {**self._values.get(name, {}), **collected.get(name, {})} or {(): 0}
                for labels, amount in sorted(series.items()):
                    label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in node + labels)
                    number = int(amount) if float(amount).is_integer() else amount
                    lines.append(
                        f"{name}{{{label_text}}} {number}" if label_text else f"{name} {number}"
                    )
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
