"""Wiring: build the archive, intake, egress and the services from the settings; run them."""

from __future__ import annotations

import logging
import signal
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from waitress.server import create_server

from dicomnode import __version__
from dicomnode.analysis.runner import AnalysisService
from dicomnode.archive import Archive
from dicomnode.archive.auditlog import AuditLog
from dicomnode.archive.keys import (
    load_or_create_deid_secret,
    load_or_create_signing_key,
    sign_json,
)
from dicomnode.config import Settings
from dicomnode.core.errors import ConfigError
from dicomnode.core.metrics import Metrics
from dicomnode.core.times import utc_now
from dicomnode.dicomweb import WebServices, create_app
from dicomnode.dicomweb.auth import TokenVerifier
from dicomnode.dicomweb.stow_client import StowSender
from dicomnode.egress import Egress
from dicomnode.governance import PolicyError, audit_events
from dicomnode.intake import Intake
from dicomnode.scp import DimseContext, DimseServer
from dicomnode.scp.scu import DimseSender
from dicomnode.stewardship import Stewardship

log = logging.getLogger("dicomnode")


def build_services(
    settings: Settings, archive: Archive, metrics: Metrics, clock: Callable[[], datetime] = utc_now
) -> tuple[Intake, Egress, Stewardship]:
    """Intake, egress and stewardship over `archive`, with the node's peers, transports and
    audit log (``archive.audit``)."""
    archive.audit = AuditLog.from_settings(settings)
    archive.audit.source = audit_events.reporter(
        settings.node.ae_title,
        settings.dimse.host,
        settings.audit.audit_source_id,
        settings.audit.enterprise_site_id,
    )
    intake = Intake(archive, metrics, clock)
    egress = Egress(
        archive,
        peers={p.name: p for p in settings.peers},
        transports={
            "dimse": DimseSender(settings),
            "stow": StowSender(dict(settings.governance.stow_token_files)),
        },
        clock=clock,
        delivery_attempts=settings.governance.delivery_attempts,
        deid_secret=load_or_create_deid_secret(settings.node.data_dir),
        audit=archive.audit,
    )
    return intake, egress, Stewardship(archive, clock, archive.audit)


def publish_configured_policy(settings: Settings, stewardship: Stewardship) -> None:
    """Publish ``[governance] policy`` if its version is new (ConfigError if it is unusable)."""
    path = settings.governance.policy
    if path is None:
        return
    try:
        stewardship.publish_policy(path.read_text(encoding="utf-8"), f"config:{path.name}")
    except (PolicyError, OSError, ValueError) as e:
        raise ConfigError("governance.policy", f"{path}: {e}") from None


class Node:
    """One running dicomnode: DIMSE and HTTP over one archive."""

    def __init__(self, settings: Settings, clock: Callable[[], datetime] = utc_now) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.archive = Archive(
            settings.node.data_dir,
            settings.database_url,
            settings.dimse.duplicate_policy,
            settings.node.quota_bytes,
            settings.node.min_free_bytes,
        )
        self.intake, self.egress, self.stewardship = build_services(
            settings, self.archive, self.metrics, clock
        )
        publish_configured_policy(settings, self.stewardship)
        self.dimse = DimseServer(DimseContext(settings, self.intake, self.egress, self.metrics))
        self.analysis = (
            AnalysisService(settings.analysis, self.archive, self.intake, self.egress)
            if settings.analysis.enabled
            else None
        )
        if self.analysis is not None:
            self.intake.subscribe(self.analysis.on_stored)
        self.signing_key = load_or_create_signing_key(settings.node.data_dir)
        self.verifier = TokenVerifier(settings.auth, self.signing_key)
        self.housekeeping = Housekeeping(self)
        self.app = create_app(
            WebServices(
                settings=settings,
                archive=self.archive,
                intake=self.intake,
                egress=self.egress,
                stewardship=self.stewardship,
                metrics=self.metrics,
                verifier=self.verifier,
                signing_key=self.signing_key,
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
        audit_log = self.archive.audit
        audit_log.start_writer()
        audit_log.start()
        audit_log.submit(
            lambda: audit_events.application(True, datetime.now(UTC), audit_log.source)
        )
        if self.analysis is not None:
            self.analysis.start()
        self.housekeeping.start()
        dimse_port = self.dimse.start()
        http = self.settings.http
        self._http = create_server(
            self.app,
            host=http.host,
            port=http.port,
            threads=http.threads,
            ident="dicomnode",
            max_request_body_size=http.max_request_bytes,
            # request bodies up to 8 MiB (a STOW-RS request of ten CT slices) stay in memory
            # instead of going through a temporary file; larger ones are still spooled to disk
            inbuf_overflow=8 * 1024 * 1024,
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
        self.housekeeping.stop()
        audit_log = self.archive.audit
        audit_log.submit(
            lambda: audit_events.application(False, datetime.now(UTC), audit_log.source)
        )
        audit_log.stop_writer()
        audit_log.stop()
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


class Housekeeping:
    """The node's periodic governance work, each task on its own interval: send due
    deliveries (forwarded results, shares), sweep expired data, sign ledger checkpoints. A task
    that fails is logged and tried again at its next turn."""

    def __init__(self, node: Node) -> None:
        self.node = node
        governance = node.settings.governance
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
        backoff = timedelta(seconds=self.node.settings.governance.delivery_backoff)
        sent = 0
        while not self._stop.is_set() and self.node.egress.deliver_due(self.worker, backoff):
            sent += 1
        return sent

    def retention_sweep(self) -> object:
        return self.node.stewardship.retention_sweep("dicomnode:retention")

    def checkpoint(self) -> object:
        key = self.node.signing_key
        return self.node.stewardship.checkpoint(lambda payload: sign_json(key, payload))

    def start(self) -> None:
        for name, interval, task in self.tasks:
            thread = threading.Thread(
                target=self._loop, args=(name, interval, task), name=name, daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _loop(self, name: str, interval: float, task: Callable[[], object]) -> None:
        while not self._stop.wait(interval):
            try:
                task()
            except Exception:
                log.exception("%s failed; trying again in %g s", name, interval)

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
