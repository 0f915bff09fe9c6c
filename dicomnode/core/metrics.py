"""Counters and gauges rendered in the Prometheus text format.

An observer: a failure here never stops the work that reports to it.
"""

from __future__ import annotations

import threading
from collections import defaultdict

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
}


class Metrics:
    """Thread-safe labelled counters and gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)

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
        with self._lock:
            for name, (kind, text) in _HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                series = self._values.get(name) or {(): 0}
                for labels, amount in sorted(series.items()):
                    label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    number = int(amount) if float(amount).is_integer() else amount
                    lines.append(
                        f"{name}{{{label_text}}} {number}" if label_text else f"{name} {number}"
                    )
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
