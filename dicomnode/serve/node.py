"""The node: DIMSE and HTTP over the rooms `compose` builds, with housekeeping and (with
``dimse.processes > 1``) DIMSE worker processes; started, stopped, served until a signal."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from dicomnode import __version__
from dicomnode.analysis.criteria import published_criteria
from dicomnode.archive.keys import KeyStore
from dicomnode.archive.leases import LeaderLease, holder_name
from dicomnode.compose import SERVE, compose
from dicomnode.config import Settings
from dicomnode.core.times import utc_now
from dicomnode.dicomweb import WebServices, create_app
from dicomnode.dicomweb.auth import TokenVerifier
from dicomnode.dicomweb.health import Readiness
from dicomnode.dicomweb.server import create_http_server
from dicomnode.governance import audit_events
from dicomnode.scp import DimseContext, DimseServer
from dicomnode.serve.housekeeping import Housekeeping
from dicomnode.serve.observe import node_name, observe
from dicomnode.serve.workers import DimseWorkers

log = logging.getLogger("dicomnode")


class Node:
    """One running dicomnode: DIMSE and HTTP over one archive."""

    def __init__(self, settings: Settings, clock: Callable[[], datetime] = utc_now) -> None:
        self.settings = settings
        self.services = compose(settings, SERVE, clock=clock)
        self.metrics = self.services.metrics
        self.audit = self.services.audit  # the audit log (spool and sender)
        self.archive = self.services.archive
        observe(settings, self.archive, self.metrics)  # node label, store and ledger timing
        self.readiness = Readiness()  # "draining" from SIGTERM on: /healthz answers 503
        self.intake = self.services.intake
        self.egress = self.services.egress
        self.stewardship = self.services.stewardship
        self.casework = self.services.casework
        self.analysis = self.services.analysis
        self.dimse = DimseServer(DimseContext(settings, self.intake, self.egress, self.metrics))
        self.workers = (
            DimseWorkers(settings, self.metrics, self.services.audit)
            if settings.dimse.processes > 1
            else None
        )
        if self.workers is not None:
            self.dimse.hand_off = self.workers.hand_off
        self.signing_key = KeyStore(self.archive.index, settings.node.data_dir).signing_key()
        self.verifier = TokenVerifier(settings.auth, self.signing_key)
        lease = LeaderLease(
            self.archive.index,
            "housekeeping",
            holder_name(settings.node.name),
            settings.node.lease_seconds,
        )
        self.housekeeping = Housekeeping(
            settings, self.egress, self.stewardship, self.signing_key, lease
        )
        self.app = create_app(
            WebServices(
                settings=settings,
                records=self.services.records,
                intake=self.intake,
                egress=self.egress,
                stewardship=self.stewardship,
                casework=self.casework,
                metrics=self.metrics,
                verifier=self.verifier,
                signing_key=self.signing_key,
                status=self.status,
                request_analysis=self.analysis.request if self.analysis else None,
                automated_decisions=published_criteria(settings.analysis),
            )
        )
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def status(self) -> dict[str, object]:
        active = self.dimse.active_associations()
        status: dict[str, object] = {
            "version": __version__,
            "node": node_name(self.settings),
            "state": self.readiness.state,
            "ae_title": self.settings.node.ae_title,
            "dimse_port": self.dimse.port,
            "active_associations": active,
        }
        if self.workers is not None:
            status["active_associations"] = active + self.workers.active_associations()
            status["dimse_processes"] = {
                "configured": self.settings.dimse.processes,
                "running": 1 + self.workers.running(),
            }
        return status

    def start(self) -> None:
        audit_log = self.services.audit
        audit_log.start_writer()
        audit_log.start()
        audit_log.submit(
            lambda: audit_events.application(True, datetime.now(UTC), audit_log.source)
        )
        self.intake.recover_unindexed()  # before anything new arrives or is produced
        if self.analysis is not None:
            self.analysis.start()
        self.housekeeping.start()
        dimse_port = self.dimse.start()  # serves every connection until the workers are ready
        if self.workers is not None:
            self.workers.start(dimse_port)
        http = self.settings.http
        self._http = create_http_server(self.app, http)
        self._http_thread = threading.Thread(target=self._serve_http, name="http", daemon=True)
        self._http_thread.start()
        log.info(
            "dicomnode ready",
            extra={
                "event": "ready",
                "ae_title": self.settings.node.ae_title,
                "dimse_host": self.settings.dimse.host,
                "dimse_port": dimse_port,
                "http_host": http.host,
                "http_port": int(self._http.effective_port),
                "data_dir": str(self.settings.node.data_dir),
                "database": self.settings.database_url.split("@")[-1],
                "tls": self.settings.dimse.tls is not None,
                "dimse_processes": self.settings.dimse.processes,
            },
        )

    def _serve_http(self) -> None:
        try:
            self._http.run()
        except OSError:
            # stop() closes the listening socket under the server's select(): expected then.
            if not self._stopped.is_set():
                raise

    @property
    def http_port(self) -> int:
        return int(self._http.effective_port)

    def stop(self) -> None:
        """Let in-flight associations finish (up to dimse.drain_timeout), then close everything."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("dicomnode stopping", extra={"event": "stopping"})
        if self.workers is not None:
            self.workers.stop_accepting()
        self.dimse.stop(self.settings.dimse.drain_timeout)
        if self.workers is not None:
            self.workers.join(self.settings.dimse.drain_timeout + 15)
        if self._http is not None:
            self._http.close()
        if self.analysis is not None:
            self.analysis.stop()
        self.housekeeping.stop()
        audit_log = self.services.audit
        audit_log.submit(
            lambda: audit_events.application(False, datetime.now(UTC), audit_log.source)
        )
        audit_log.stop_writer()
        audit_log.stop()
        self.archive.close()
        log.info("dicomnode stopped", extra={"event": "stopped"})

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        stop_requested, hurry = threading.Event(), threading.Event()

        def request_stop(signum: int, _frame: Any) -> None:
            log.info("signal %s received", signal.Signals(signum).name)
            (hurry if stop_requested.is_set() else stop_requested).set()  # a second: no wait

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        self.start()
        stop_requested.wait()
        self.drain(hurry.is_set)
        self.stop()

    def drain(self, hurry: Callable[[], bool] = lambda: False) -> None:
        """Answer 503 "draining" on /healthz while still serving, for ``[node] drain_seconds``
        (the balancer's detection window; less if `hurry()`), before `stop` stops accepting."""
        self.metrics.add("dicomnode_draining", 1)
        self.readiness.drain(self.settings.node.drain_seconds, hurry)
