"""Health for load balancers and monitoring (always open), and GET /metrics (Prometheus text;
open unless ``[auth] protect_metrics = true``).

- ``/healthz/live``: 200 while the process answers HTTP at all (restart it when this fails);
- ``/healthz/ready``: 200 when the node should get new work: its index and store answer, it
  is under its quota and not draining; else 503 with the reason ("failing",
  "refusing-new-data", "draining");
- ``/healthz``: the same as ``/healthz/ready`` (what HAProxy's ``option httpchk`` asks).

Draining (`Readiness`): on SIGTERM the node first answers 503 "draining" while it still
serves everything, for ``[node] drain_seconds`` (past the balancer's detection window, so the
balancer stops sending it new connections), then stops accepting and lets open associations
and requests finish (``[dimse] drain_timeout``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from flask import Blueprint, Response, current_app, jsonify, request

from dicomnode.core.errors import DicomnodeError, storage_failure

log = logging.getLogger("dicomnode")

READY, DRAINING = "ready", "draining"


class Readiness:
    """Whether the node takes new work: "ready" until `drain` starts, then "draining"."""

    def __init__(self) -> None:
        self._draining = threading.Event()
        self.since = 0.0  # time.monotonic() when draining began

    @property
    def state(self) -> str:
        return DRAINING if self._draining.is_set() else READY

    def drain(self, seconds: float, interrupted: Callable[[], bool] = lambda: False) -> None:
        """Answer 503 from now on and wait `seconds` (less if `interrupted()` turns true,
        e.g. a second signal), so the balancer sees it before the node stops accepting."""
        self.since = time.monotonic()
        self._draining.set()
        log.info(
            "draining: /healthz answers 503 for %g s before the node stops accepting",
            seconds,
            extra={"event": "draining", "drain_seconds": seconds},
        )
        deadline = self.since + seconds
        while not interrupted() and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def health_blueprint() -> Blueprint:
    bp = Blueprint("health", __name__)

    @bp.get("/healthz/live")
    def live() -> tuple[Response, int]:
        services = current_app.extensions["dicomnode"]
        return jsonify({"status": "live", **services.status()}), 200

    @bp.get("/healthz")
    @bp.get("/healthz/ready")
    def ready() -> tuple[Response, int]:
        services = current_app.extensions["dicomnode"]
        status = services.status()
        if status.get("state") == DRAINING:  # before any check: the answer must be quick
            return jsonify({"status": DRAINING, **status}), 503
        try:
            services.records.ping()
            storage = services.records.storage()
        except Exception as e:  # the point of a health check is to report, not to raise
            failure = storage_failure(e) or e
            error = str(failure) if isinstance(failure, DicomnodeError) else "storage check failed"
            return jsonify({"status": "failing", "error": error}), 503
        if storage["refusing_new_data"]:  # at the quota: an alert, not a silent deletion
            body = {"status": "refusing-new-data", "storage": storage, **status}
            return jsonify(body), 503
        return jsonify({"status": "ok", "storage": storage, **status}), 200

    @bp.get("/metrics")
    def metrics() -> Response:
        services = current_app.extensions["dicomnode"]
        if services.settings.auth.protect_metrics:  # any valid token, whatever its scopes
            services.verifier.verify(request.headers.get("Authorization"))
        return Response(services.metrics.render(), mimetype="text/plain; version=0.0.4")

    return bp
