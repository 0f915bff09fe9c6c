"""The DPO's pages at ``/governance`` (server-rendered HTML and CSV/JSON exports; the JSON API
stays at ``/governance/api``): who signs in and how, then what the ledger, the registry and
the policy say, in English and Korean."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flask import Flask

from dicomnode.config import DpoSettings
from dicomnode.dicomweb.dpo.automated_decision_views import install_automated_decision_routes
from dicomnode.dicomweb.dpo.casework_views import EXTENSION_KEY as CASEWORK_KEY
from dicomnode.dicomweb.dpo.casework_views import (
    count_failed_authentication,
    install_casework_routes,
    make_casework,
)
from dicomnode.dicomweb.dpo.oversight import install_oversight
from dicomnode.dicomweb.dpo.signin import (
    COOKIE_NAME,
    COOKIE_PATH,
    DpoSessionInterface,
    register_oidc,
)
from dicomnode.dicomweb.dpo.views import dpo_blueprint

URL_PREFIX = "/governance"


@dataclass(frozen=True)
class DpoPages:
    """What the pages keep per app: their settings, the sign-in lockout, the OIDC client."""

    settings: DpoSettings
    throttle: Any  # the records room's SigninThrottle: failed sign-ins counted on every node
    oidc: Any  # Authlib's client for the hospital's provider, or None


def install_dpo_pages(app: Flask, services: Any) -> None:
    """Mount the pages on `app`: the signed session cookie, the OIDC client, the blueprint."""
    settings: DpoSettings = services.settings.dpo
    app.secret_key = services.records.session_secret(services.settings.node.data_dir)
    app.config.update(
        SESSION_COOKIE_NAME=COOKIE_NAME,
        SESSION_COOKIE_PATH=COOKIE_PATH,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=settings.session_hours),
    )
    app.session_interface = DpoSessionInterface()
    app.extensions["dicomnode_dpo"] = DpoPages(
        settings,
        services.records.signin_throttle(
            settings.max_failed_signins, settings.lockout_minutes * 60
        ),
        register_oidc(app, settings) if settings.oidc_enabled else None,
    )
    blueprint = dpo_blueprint()
    install_casework_routes(blueprint)  # breaches, the monthly review, request tickets
    install_automated_decision_routes(blueprint)  # PIPA 37-2: criteria, flagged AI outputs
    install_oversight(blueprint, app, services)  # four-eyes, break-glass, share links
    app.extensions[CASEWORK_KEY] = make_casework(services)
    count_failed_authentication(app)
    app.register_blueprint(blueprint, url_prefix=URL_PREFIX)
