"""Who is signed in to the DPO's pages: local accounts, the hospital's OIDC provider, the
session cookie, CSRF tokens and the lockout after repeated failed sign-ins.

The session is Flask's signed cookie (the only cookie the pages set): Secure, HttpOnly,
SameSite=Strict, scoped to /governance, no Expires (it ends with the browser) and refused by
the server after ``[dpo] session_hours``. It names a session the server keeps (in the index,
`SessionStore`, so every node knows it): signing out ends that session, so the cookie is refused
from then on even if someone kept a copy. Only while the OIDC provider sends the browser back
(the redirect to the provider and the callback) is it SameSite=Lax, or the provider's
cross-site redirect would arrive without the state the callback checks.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import Flask, has_request_context, request, session
from flask.sessions import SecureCookieSessionInterface

from dicomnode.config import DpoSettings
from dicomnode.core.roles import ROLES
from dicomnode.dicomweb.access import audit, services
from dicomnode.governance import audit as audit_messages

log = logging.getLogger("dicomnode.dpo")

COOKIE_NAME = "dicomnode_dpo"
COOKIE_PATH = "/governance"
OIDC_CLIENT = "hospital"
_LAX_ENDPOINTS = {"dpo.oidc_login"}  # responses that send the browser to the provider


class DpoSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie session, SameSite=Lax only on the way to the OIDC provider."""

    def get_cookie_samesite(self, app: Flask) -> str:
        if has_request_context() and request.endpoint in _LAX_ENDPOINTS:
            return "Lax"
        return "Strict"


@dataclass(frozen=True)
class User:
    name: str
    role: str  # dpo | auditor
    method: str  # local | oidc
    display_name: str = ""

    @property
    def is_dpo(self) -> bool:
        return self.role == "dpo"


# --- the lockout ----------------------------------------------------------------------------


# `SigninThrottle` (archive/accounts.py) counts failed sign-ins in the index, on every node.


# --- the session ----------------------------------------------------------------------------


def csrf_token() -> str:
    """This session's CSRF token (created on first use), for every POST form."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


def csrf_ok() -> bool:
    sent, kept = request.form.get("csrf_token", ""), session.get("csrf", "")
    return bool(sent and kept) and hmac.compare_digest(str(sent), str(kept))


def start_session(user: User) -> None:
    """Sign `user` in: a fresh session (new CSRF token, a new server-side session), keeping
    only the language."""
    end_session()
    session["user"] = {
        "name": user.name,
        "role": user.role,
        "method": user.method,
        "display_name": user.display_name,
        "at": time.time(),
        "sid": sessions().open(user.name, user.method),
    }
    session["csrf"] = secrets.token_urlsafe(32)


def end_session() -> None:
    """End this session on the server (its cookie is refused from now on) and clear the
    cookie, keeping only the language."""
    data = session.get("user")
    if isinstance(data, dict):
        sessions().end(data.get("sid"))
    lang = session.get("lang")
    session.clear()
    if lang:
        session["lang"] = lang


def sessions() -> Any:
    """The server-side record of the pages' open sessions."""
    return services().records.sessions(services().settings.dpo.session_hours * 3600)


def safe_next(target: object) -> bool:
    """True when `target` may be where sign-in sends the browser: a path of these pages, with
    no control characters or spaces (a CR/LF would split the Location header), no backslash
    and not another host (no open redirect)."""
    return (
        isinstance(target, str)
        and len(target) <= 2048
        and (target == "/governance" or target.startswith("/governance/"))
        and not any(ord(c) <= 0x20 or ord(c) == 0x7F or c == "\\" for c in target)
        and not target.startswith(("//", "/governance/signin"))
    )


def signed_in_user(settings: DpoSettings, accounts: Any) -> User | None:
    """The user of this session, if it is still good: not older than session_hours, and for a
    local account, the account still active with the same role."""
    data = session.get("user")
    if not isinstance(data, dict):
        return None
    try:
        if time.time() - float(data.get("at", 0)) > settings.session_hours * 3600:
            return None
    except (TypeError, ValueError):
        return None
    if not sessions().is_open(data.get("sid")):
        return None  # signed out, or a session from before sessions were kept
    user = User(
        str(data.get("name", "")),
        str(data.get("role", "")),
        str(data.get("method", "")),
        str(data.get("display_name", "")),
    )
    if user.role not in ROLES:
        return None
    if user.method == "local":
        if not settings.local_accounts:
            return None
        account = accounts.get(user.name)
        if account is None or not account.active or account.role != user.role:
            return None
    elif user.method != "oidc" or not settings.oidc_enabled:
        return None
    return user


# --- OIDC -----------------------------------------------------------------------------------


def register_oidc(app: Flask, settings: DpoSettings) -> Any:
    """The Authlib client for the hospital's provider (discovered from its issuer)."""
    from authlib.integrations.flask_client import OAuth

    assert settings.oidc_client_secret_file is not None
    oauth = OAuth(app)
    return oauth.register(
        OIDC_CLIENT,
        client_id=settings.oidc_client_id,
        client_secret=settings.oidc_client_secret_file.read_text(encoding="utf-8").strip(),
        server_metadata_url=f"{settings.oidc_issuer}/.well-known/openid-configuration",
        client_kwargs={"scope": "openid profile email"},
    )


def claim(claims: Mapping[str, Any], path: str) -> Any:
    """The claim at a dotted `path` (e.g. realm_access.roles), or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def role_from_claims(claims: Mapping[str, Any], settings: DpoSettings) -> str:
    """dpo, auditor, or "" (no role here) from the configured role claim."""
    value = claim(claims, settings.oidc_role_claim)
    values = {value} if isinstance(value, str) else {str(v) for v in value or () if v}
    if values & set(settings.oidc_dpo_values):
        return "dpo"
    if values & set(settings.oidc_auditor_values):
        return "auditor"
    return ""


# --- what is logged -------------------------------------------------------------------------


def record(
    action: str, user: str, method: str, outcome: str, reason: str = "", role: str = ""
) -> None:
    """Log a sign-in, sign-out or failed sign-in (a JSON line) and send the DICOM audit message
    (User Authentication, DCM 110114: Login / Logout) through the node's audit log."""
    address = request.remote_addr or ""
    log.log(
        logging.INFO if outcome == "success" else logging.WARNING,
        "DPO pages: %s %s for %s",
        action,
        outcome,
        user or "?",
        extra={
            "event": f"dpo_{action}",
            "outcome": outcome,
            "user": user,
            "method": method,
            "role": role,
            "address": address,
            "reason": reason,
        },
    )
    now = datetime.now(UTC)
    failed = outcome != "success"

    def message(by: Any) -> bytes:
        return audit_messages.user_authentication(
            login=action != "signout",
            user=audit_messages.person(user or "unknown", address or "unknown"),
            authenticator=by.node,
            outcome=audit_messages.Outcome.MINOR_FAILURE
            if failed
            else audit_messages.Outcome.SUCCESS,
            outcome_description=f"DPO pages ({method}): {reason}"[:1024] if failed else "",
            time=now,
            source=by.source,
        )

    audit(message)


def accounts() -> Any:
    """The DPO pages' local accounts (the records room's account store)."""
    return services().records.accounts
