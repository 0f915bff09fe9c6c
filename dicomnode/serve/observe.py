"""What a node reports about its parts, as metrics with a node label (issue 20 item 3):

- object store calls: count, time and failures per operation (`TimedStore` around the
  archive's blob store, whichever store the settings chose);
- the ledger's append lock: how often it was taken and how long appends waited for it
  (PostgreSQL's advisory lock; on SQLite the write lock is the index's busy wait);
- job queue depth: analysis jobs and deliveries per state, read from the database when
  /metrics is scraped (the database is the queue every node shares).
Observers only: a failure here is logged and never stops the work it watches.
"""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import event, func, select

from dicomnode.archive import schema
from dicomnode.config import Settings
from dicomnode.core.metrics import Metrics, Sample

TIMED_OPERATIONS = frozenset(
    {"begin", "write", "open", "exists", "size", "delete", "put_cached", "usage", "check"}
)
PENDING_OPERATIONS = frozenset({"place", "settle", "withdraw"})  # of the blob `begin` returns
_LOCK_STATEMENT = "pg_advisory_xact_lock"


def node_name(settings: Settings) -> str:
    """``[node] name``, else the host's name: the node label of every metric."""
    return settings.node.name or socket.gethostname()


class TimedStore:
    """A blob store (or a pending blob) whose calls in `operations` are counted and timed;
    everything else passes through unchanged."""

    def __init__(self, inner: Any, metrics: Metrics, operations: frozenset[str]) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_metrics", metrics)
        object.__setattr__(self, "_operations", operations)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name not in self._operations or not callable(value):
            return value
        return functools.partial(self._timed, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    def _timed(self, operation: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        metrics = self._metrics
        started = time.perf_counter()
        try:
            result = call(*args, **kwargs)
        except Exception as e:
            metrics.add("dicomnode_object_store_errors_total", operation=operation, error=_kind(e))
            raise
        finally:
            metrics.add("dicomnode_object_store_requests_total", operation=operation)
            metrics.add(
                "dicomnode_object_store_seconds_total",
                time.perf_counter() - started,
                operation=operation,
            )
        if operation == "begin":
            return TimedStore(result, metrics, PENDING_OPERATIONS)
        return result


def _kind(error: Exception) -> str:
    return type(error).__name__[:40]


def time_ledger_lock(engine: Any, metrics: Metrics) -> None:
    """Count the ledger's advisory lock and the time each append waited for it."""

    @event.listens_for(engine, "before_cursor_execute")
    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if _LOCK_STATEMENT in statement:
            conn.info["ledger_lock_started"] = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute")
    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        started = conn.info.pop("ledger_lock_started", None)
        if started is not None:
            metrics.add("dicomnode_ledger_lock_waits_total")
            metrics.add("dicomnode_ledger_lock_wait_seconds_total", time.perf_counter() - started)


def queue_depths(engine: Any) -> Callable[[], list[Sample]]:
    """A collector: analysis jobs and deliveries in the database, per state."""

    def collect() -> list[Sample]:
        samples: list[Sample] = []
        with engine.connect() as conn:
            for kind, table in (
                ("analysis", schema.analysis_jobs),
                ("delivery", schema.deliveries),
            ):
                query = select(table.c.state, func.count()).group_by(table.c.state)
                for state, count in conn.execute(query):
                    samples.append(("dicomnode_jobs", {"kind": kind, "state": state}, count))
        return samples

    return collect


def observe(settings: Settings, archive: Any, metrics: Metrics, main: bool = True) -> None:
    """Label `metrics` with the node's name and watch `archive`'s store and ledger lock; the
    main process (`main`) also reports queue depths (once per node, not per worker)."""
    metrics.node = node_name(settings)
    archive.blobs = TimedStore(archive.blobs, metrics, TIMED_OPERATIONS)
    time_ledger_lock(archive.engine, metrics)
    if main:
        metrics.add_collector(queue_depths(archive.engine))
