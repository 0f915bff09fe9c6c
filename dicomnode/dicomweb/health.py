"""GET /healthz (always open, for load balancers and monitoring) and GET /metrics (Prometheus
text; open unless ``[auth] protect_metrics = true``)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from dicomnode.core.errors import DicomnodeError, storage_failure


def health_blueprint() -> Blueprint:
    bp = Blueprint("health", __name__)

    @bp.get("/healthz")
    def healthz() -> tuple[Response, int]:
        services = current_app.extensions["dicomnode"]
        try:
            services.archive.ping()
            storage = services.archive.storage()
        except Exception as e:  # the point of a health check is to report, not to raise
            failure = storage_failure(e) or e
            error = str(failure) if isinstance(failure, DicomnodeError) else "storage check failed"
            return jsonify({"status": "failing", "error": error}), 503
        if storage["refusing_new_data"]:  # at the quota: an alert, not a silent deletion
            body = {"status": "refusing-new-data", "storage": storage, **services.status()}
            return jsonify(body), 503
        return jsonify({"status": "ok", "storage": storage, **services.status()}), 200

    @bp.get("/metrics")
    def metrics() -> Response:
        services = current_app.extensions["dicomnode"]
        if services.settings.auth.protect_metrics:  # any valid token, whatever its scopes
            services.verifier.verify(request.headers.get("Authorization"))
        return Response(services.metrics.render(), mimetype="text/plain; version=0.0.4")

    return bp
