"""DIMSE worker processes (``dimse.processes = N > 1``).

The node is then N processes: the main one (DIMSE, HTTP, analysis, housekeeping) and N-1 DIMSE
workers (`DimseWorkers`), each over its own archive of the same data_dir and database (composed
with role ``dimse-worker``), so that concurrent associations use every core. The main process
accepts every connection on the one DIMSE port and serves it itself or hands it (the socket,
over a Unix socket) to the process serving the fewest associations, so four associations
land two and two (the kernel's SO_REUSEPORT hashing would often put three on one process). A
worker sends the main process its load, its metric increments and the audit messages it
builds; the main process owns the audit spool and serves /metrics and /healthz for all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

from dicomnode.compose import DIMSE_WORKER, compose
from dicomnode.config import Settings
from dicomnode.core.logs import configure_logging
from dicomnode.core.metrics import Metrics
from dicomnode.scp import DimseContext, DimseServer
from dicomnode.serve.observe import observe

log = logging.getLogger("dicomnode")

REPORT_INTERVAL = 0.5  # seconds between a worker's reports of its metric increments
RESTART_DELAY = 2.0  # seconds before a worker that died is started again
_GAUGES = {"dicomnode_associations_active"}  # undone when a worker dies


@dataclasses.dataclass
class _Worker:
    index: int
    process: Any
    connection: Connection  # the worker's reports
    handoff: Connection  # connections handed to the worker (a Unix socket: it carries fds)
    ready: bool = False
    handed: int = 0  # connections handed to it
    taken: int = 0  # of those, the ones it reported having taken
    serving: int = 0  # connections it reported serving
    gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = dataclasses.field(
        default_factory=dict
    )

    @property
    def load(self) -> int:
        return self.serving + self.handed - self.taken


class DimseWorkers:
    """Starts, supervises and stops the DIMSE worker processes of the main process, and hands
    them connections.

    Each worker is started (spawned: a fresh interpreter, nothing inherited from this one's
    threads) with the settings and the port the main process listens on; it reports "ready"
    once it can serve. Every connection the main process accepts goes to the process (the main
    one or a ready worker) serving the fewest connections, in turn when they serve as many. A
    worker's metric increments are added to the main process's metrics and its audit messages
    spooled by the main process's audit log. A worker that dies is started again after
    `RESTART_DELAY`; its open associations no longer count as active.
    """

    def __init__(self, settings: Settings, metrics: Metrics, audit: Any) -> None:
        self.settings = settings
        self.metrics = metrics
        self.audit = audit
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker_settings = settings
        self._turn = 0  # who gets a connection among equally loaded processes

    def start(self, port: int, timeout: float = 120) -> None:
        """Start the workers on `port` and wait until every one listens (RuntimeError if one
        does not)."""
        dimse = dataclasses.replace(self.settings.dimse, port=port)
        self._worker_settings = dataclasses.replace(self.settings, dimse=dimse)
        self._workers = [self._spawn(i) for i in range(self.settings.dimse.processes - 1)]
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self._workers):
            if time.monotonic() > deadline:
                raise RuntimeError("a DIMSE worker process did not start listening in time")
            for worker in list(self._workers):
                if not worker.process.is_alive() and not worker.ready:
                    raise RuntimeError(
                        f"DIMSE worker {worker.index} exited with code {worker.process.exitcode}"
                    )
            self._receive(timeout=0.5)
        self._thread = threading.Thread(target=self._supervise, name="dimse-workers", daemon=True)
        self._thread.start()

    def _spawn(self, index: int) -> _Worker:
        receiving, sending = self._context.Pipe(duplex=False)
        handing, taking = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=run_dimse_worker,
            args=(self._worker_settings, index, sending, taking),
            name=f"dimse-worker-{index}",
        )
        process.start()
        sending.close()
        taking.close()
        log.info(
            "DIMSE worker started",
            extra={"event": "dimse_worker", "worker": index, "pid": process.pid},
        )
        return _Worker(index, process, receiving, handing)

    def hand_off(self, connection: socket.socket, address: Any, own_load: int) -> bool:
        """Hand `connection` to the least loaded worker, unless the main process (serving
        `own_load`) is the least loaded; True when it was handed over (and closed here)."""
        if self._stopping.is_set():
            return False
        with self._lock:
            candidates = [(own_load, -1, None)] + [
                (w.load, w.index, w) for w in self._workers if w.ready and w.process.is_alive()
            ]
            count = len(candidates)
            self._turn += 1
            _, _, chosen = min(candidates, key=lambda c: (c[0], (c[1] - self._turn) % count))
            if chosen is None:
                return False
            try:
                send_handle(chosen.handoff, connection.fileno(), chosen.process.pid)
                chosen.handoff.send(address)
            except OSError:
                return False  # the worker is going away: serve it here
            chosen.handed += 1
        connection.close()  # the worker has its own descriptor of the connection now
        return True

    def running(self) -> int:
        with self._lock:
            return sum(1 for w in self._workers if w.ready and w.process.is_alive())

    def active_associations(self) -> int:
        with self._lock:
            return int(
                sum(
                    amount
                    for w in self._workers
                    for (name, _), amount in w.gauges.items()
                    if name == "dicomnode_associations_active"
                )
            )

    def _receive(self, timeout: float) -> None:
        """Handle whatever the workers sent, waiting up to `timeout` for something."""
        by_connection = {w.connection: w for w in self._workers if not w.connection.closed}
        for connection in wait(list(by_connection), timeout):
            worker = by_connection[connection]
            try:
                kind, payload = connection.recv()
            except (EOFError, OSError):
                connection.close()
                continue
            if kind == "ready":
                worker.ready = True
            elif kind == "load":
                with self._lock:
                    worker.serving, worker.taken = payload
            elif kind == "metrics":
                for name, labels, amount in payload:
                    self.metrics.add(name, amount, **dict(labels))
                    if name in _GAUGES:
                        with self._lock:
                            key = (name, labels)
                            worker.gauges[key] = worker.gauges.get(key, 0) + amount
            elif kind == "audit" and self.audit is not None:
                for xml in payload:
                    self.audit.emit(xml)

    def _supervise(self) -> None:
        restart_at: dict[int, float] = {}
        while not self._stopping.is_set() or any(not w.connection.closed for w in self._workers):
            self._receive(timeout=0.5)
            for worker in list(self._workers):
                if worker.process.is_alive() or not worker.connection.closed:
                    continue
                if worker.index not in restart_at:
                    self._forget(worker)
                    if self._stopping.is_set():
                        continue
                    log.error(
                        "DIMSE worker exited unexpectedly; starting it again",
                        extra={
                            "event": "dimse_worker",
                            "worker": worker.index,
                            "exitcode": worker.process.exitcode,
                        },
                    )
                    restart_at[worker.index] = time.monotonic() + RESTART_DELAY
                elif not self._stopping.is_set() and time.monotonic() >= restart_at[worker.index]:
                    del restart_at[worker.index]
                    replacement = self._spawn(worker.index)
                    with self._lock:
                        self._workers[self._workers.index(worker)] = replacement
            if self._stopping.is_set() and all(not w.process.is_alive() for w in self._workers):
                self._receive(timeout=0)
                break

    def _forget(self, worker: _Worker) -> None:
        """A worker is gone: its associations are no longer active."""
        with self._lock:
            gauges, worker.gauges = worker.gauges, {}
        for (name, labels), amount in gauges.items():
            if amount:
                self.metrics.add(name, -amount, **dict(labels))

    def stop_accepting(self) -> None:
        """Ask every worker to stop: it stops accepting and lets its associations finish."""
        self._stopping.set()
        for worker in self._workers:
            if worker.process.is_alive():
                worker.process.terminate()  # SIGTERM: the worker drains, then exits 0

    def join(self, timeout: float) -> None:
        """Wait for the workers to finish (killing any still running after `timeout`)."""
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.warning("DIMSE worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                worker.process.join(5)
        if self._thread is not None:
            self._thread.join(10)
        for worker in self._workers:
            self._forget(worker)
            if worker.process.exitcode not in (0, None):
                log.warning(
                    "DIMSE worker %d exited with code %s", worker.index, worker.process.exitcode
                )


class _ReportedMetrics(Metrics):
    """A worker's metrics: counted as usual, and the increments kept for the main process."""

    def __init__(self) -> None:
        super().__init__()
        self._unsent: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._unsent_lock = threading.Lock()

    def add(self, name: str, amount: float = 1, **labels: str) -> None:
        super().add(name, amount, **labels)
        key = (name, tuple(sorted(labels.items())))
        with self._unsent_lock:
            self._unsent[key] = self._unsent.get(key, 0) + amount

    def take(self) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
        with self._unsent_lock:
            unsent, self._unsent = self._unsent, {}
        return [(name, labels, amount) for (name, labels), amount in unsent.items() if amount]


class _ForwardedAudit:
    """A worker's audit log: messages are built here, off the caller's thread, and spooled by
    the main process (one process owns the spool)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.source: Any = None
        self.builds: queue.Queue[Callable[[], bytes | list[bytes]]] = queue.Queue(maxsize=10000)

    def submit(self, build: Callable[[], bytes | list[bytes]]) -> None:
        if not self.enabled:
            return
        try:
            self.builds.put_nowait(build)
        except queue.Full:
            log.error("audit queue full: a message was dropped", extra={"event": "audit_dropped"})

    def built(self) -> list[bytes]:
        """Build everything submitted so far (a builder that fails is logged and skipped)."""
        out: list[bytes] = []
        while True:
            try:
                build = self.builds.get_nowait()
            except queue.Empty:
                return out
            try:
                made = build()
            except Exception:
                log.exception("audit message not built", extra={"event": "audit_build_failed"})
                continue
            out += made if isinstance(made, list) else [made]


def run_dimse_worker(
    settings: Settings, index: int, connection: Connection, handoff: Connection
) -> None:
    """A DIMSE worker process: the node's DIMSE services over its own archive, serving the
    connections the main process hands it, until SIGTERM (it drains like the main process) or
    the main process goes away."""
    configure_logging(settings.logging.level, settings.logging.format)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    metrics = _ReportedMetrics()
    audit = _ForwardedAudit(settings.audit.enabled)
    services = compose(settings, DIMSE_WORKER, metrics=metrics, audit=audit)
    observe(settings, services.archive, metrics, main=False)  # store and ledger timing
    intake, egress, analysis = services.intake, services.egress, services.analysis
    dimse = DimseServer(DimseContext(settings, intake, egress, metrics), listen=False)
    dimse.start()
    send_lock = threading.Lock()
    counting = threading.Lock()  # a report counts a connection in both numbers or in neither
    taken = 0

    def take_connections() -> None:
        nonlocal taken
        while not stop.is_set():
            try:
                fd = recv_handle(handoff)
                address = handoff.recv()
            except (EOFError, OSError):
                return
            accepted = socket.socket(fileno=fd)
            accepted.settimeout(settings.dimse.network_timeout)
            with counting:
                dimse.take(accepted, address)
                taken += 1

    threading.Thread(target=take_connections, name="dimse-take", daemon=True).start()

    def report() -> None:
        with counting:
            load = (dimse.load(), taken)
        with send_lock:
            connection.send(("load", load))
            connection.send(("metrics", metrics.take()))
            xml = audit.built()
            if xml:
                connection.send(("audit", xml))

    connection.send(("ready", os.getpid()))
    parent = multiprocessing.parent_process()

    def watch_parent() -> None:
        if parent is not None:
            wait([parent.sentinel])
            log.warning("the main process is gone; DIMSE worker %d stops", index)
            stop.set()

    threading.Thread(target=watch_parent, name="watch-parent", daemon=True).start()
    last_flush = time.monotonic()
    while not stop.wait(REPORT_INTERVAL):
        try:
            report()
        except (OSError, EOFError):
            stop.set()
        if (
            analysis is not None
            and time.monotonic() - last_flush >= settings.analysis.sweep_interval
        ):
            last_flush = time.monotonic()
            try:
                analysis.flush()
            except Exception:
                log.exception("analysis counts not written; trying again")
    dimse.stop(settings.dimse.drain_timeout)
    if analysis is not None:
        analysis.flush()
    with contextlib.suppress(OSError, EOFError):
        report()
    connection.close()
    services.close()
