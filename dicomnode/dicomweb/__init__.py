"""The HTTP face of the node: a Flask app factory with one blueprint per concern.

- `/healthz`, `/metrics`: health and Prometheus metrics;
- `/dicomweb/...`: QIDO-RS, WADO-RS, STOW-RS and DELETE (PS3.18), bearer-token protected;
- `/analysis/...`: analysis jobs; `/governance/api/...`: the governance API;
- `/automated-decisions`: each AI output type's criteria and procedure (public, PIPA 37-2);
- `/governance/...`: the DPO's pages (signed-in HTML and exports, see `dpo`).
Nothing is created at import time; `create_app(services)` builds a fresh app.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Flask
from flask_cors import CORS

from dicomnode.casework import Casework
from dicomnode.config import Settings
from dicomnode.core.metrics import Metrics
from dicomnode.dicomweb.auth import TokenVerifier
from dicomnode.dicomweb.automated_decisions import automated_decisions_blueprint
from dicomnode.dicomweb.dpo import install_dpo_pages
from dicomnode.dicomweb.errors import register_error_handlers
from dicomnode.dicomweb.governance_api import governance_blueprint
from dicomnode.dicomweb.health import health_blueprint
from dicomnode.dicomweb.jobs import jobs_blueprint
from dicomnode.dicomweb.proxy import install_forwarded_for
from dicomnode.dicomweb.qido import qido_blueprint
from dicomnode.dicomweb.retained_api import retained_blueprint
from dicomnode.dicomweb.stow import stow_blueprint
from dicomnode.dicomweb.wado import wado_blueprint
from dicomnode.egress import Egress
from dicomnode.intake import Intake
from dicomnode.records import Records
from dicomnode.stewardship import Stewardship

DICOMWEB_ROOT = "/dicomweb"


@dataclass(frozen=True)
class WebServices:
    """What the HTTP blueprints work with: the rooms of layer 3, never the archive itself."""

    settings: Settings
    records: Records  # what the pages, the governance and jobs APIs and /healthz read
    intake: Intake
    egress: Egress
    stewardship: Stewardship
    casework: Casework  # the DPO's breach register, monthly review and request tickets
    metrics: Metrics
    verifier: TokenVerifier
    signing_key: Any  # the node's RSA key (tokens, ledger checkpoints)
    status: Callable[[], dict[str, object]]  # the node's live status for /healthz
    request_analysis: Callable[[str], list[int]] | None = None  # queue a study's analyses
    # each AI output type's criteria and procedure (PIPA 37-2(4)), from the analyzers
    automated_decisions: tuple[dict[str, Any], ...] = ()


def create_app(services: WebServices) -> Flask:
    app = Flask("dicomnode")
    app.extensions["dicomnode"] = services
    register_error_handlers(app)
    install_forwarded_for(app, services.settings.http.trusted_proxies)
    app.register_blueprint(health_blueprint())
    app.register_blueprint(automated_decisions_blueprint())  # public, like /healthz
    for blueprint in (qido_blueprint(), wado_blueprint(), stow_blueprint()):
        app.register_blueprint(blueprint, url_prefix=DICOMWEB_ROOT)
    app.register_blueprint(jobs_blueprint(), url_prefix="/analysis")
    app.register_blueprint(governance_blueprint(), url_prefix="/governance/api")
    app.register_blueprint(retained_blueprint(), url_prefix="/governance/api/retained")
    install_dpo_pages(app, services)
    if services.settings.http.cors_origins:
        CORS(
            app,
            resources={
                f"{DICOMWEB_ROOT}/*": {"origins": list(services.settings.http.cors_origins)}
            },
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=["Warning", "Content-Type", "Content-Length"],
            methods=["GET", "POST", "DELETE", "OPTIONS"],
        )
    return app
