"""The HTTP face of the node: a Flask app factory with one blueprint per concern.

Today it serves health and metrics; the DICOMweb services (QIDO-RS, WADO-RS, STOW-RS) and
the governance pages plug in as further blueprints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask

from dicomnode.archive import Archive
from dicomnode.core.metrics import Metrics
from dicomnode.dicomweb.health import health_blueprint


@dataclass(frozen=True)
class WebServices:
    """What the HTTP blueprints work with."""

    archive: Archive
    metrics: Metrics
    status: Callable[[], dict[str, object]]  # the node's live status for /healthz


def create_app(services: WebServices) -> Flask:
    app = Flask("dicomnode")
    app.extensions["dicomnode"] = services
    app.register_blueprint(health_blueprint())
    return app
