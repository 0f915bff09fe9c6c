"""Wiring: build the archive, intake, egress and the services from the settings; run them."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from waitress.server import create_server

from dicomnode import __version__
from dicomnode.analysis.runner import AnalysisService
from dicomnode.archive import Archive
from dicomnode.config import Settings
from dicomnode.core.metrics import Metrics
from dicomnode.dicomweb import WebServices, create_app
from dicomnode.dicomweb.auth import TokenVerifier, load_or_create_signing_key
from dicomnode.egress import Egress
from dicomnode.intake import Intake
from dicomnode.scp import DimseContext, DimseServer

log = logging.getLogger("dicomnode")


class Node:
    """One running dicomnode: DIMSE and HTTP over one archive."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.archive = Archive(
            settings.node.data_dir, settings.database_url, settings.dimse.duplicate_policy
        )
        self.intake = Intake(self.archive, self.metrics)
        self.egress = Egress(self.archive)
        self.dimse = DimseServer(DimseContext(settings, self.intake, self.egress, self.metrics))
        self.analysis = (
            AnalysisService(settings.analysis, self.archive, self.intake)
            if settings.analysis.enabled
            else None
        )
        if self.analysis is not None:
            self.intake.subscribe(self.analysis.on_stored)
        self.verifier = TokenVerifier(
            settings.auth, load_or_create_signing_key(settings.node.data_dir)
        )
        self.app = create_app(
            WebServices(
                settings=settings,
                archive=self.archive,
                intake=self.intake,
                egress=self.egress,
                metrics=self.metrics,
                verifier=self.verifier,
                status=self.status,
                request_analysis=self.analysis.request if self.analysis else None,
            )
        )
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def status(self) -> dict[str, object]:
        return {
            "version": __version__,
            "ae_title": self.settings.node.ae_title,
            "dimse_port": self.dimse.port,
            "active_associations": self.dimse.active_associations(),
        }

    def start(self) -> None:
        if self.analysis is not None:
            self.analysis.start()
        dimse_port = self.dimse.start()
        http = self.settings.http
        self._http = create_server(
            self.app,
            host=http.host,
            port=http.port,
            threads=http.threads,
            ident="dicomnode",
            max_request_body_size=http.max_request_bytes,
        )
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
        self.dimse.stop(self.settings.dimse.drain_timeout)
        if self._http is not None:
            self._http.close()
        if self.analysis is not None:
            self.analysis.stop()
        self.archive.close()
        log.info("dicomnode stopped", extra={"event": "stopped"})

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        stop_requested = threading.Event()

        def request_stop(signum: int, _frame: Any) -> None:
            log.info("signal %s received", signal.Signals(signum).name)
            stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        self.start()
        stop_requested.wait()
        self.stop()
