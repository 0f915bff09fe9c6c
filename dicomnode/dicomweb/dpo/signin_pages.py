"""The DPO pages' sign-in: the local form, sign-out, and the hospital's OIDC provider."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, redirect, request, session, url_for

from dicomnode.core.roles import ROLES
from dicomnode.dicomweb.access import services
from dicomnode.dicomweb.dpo.signin import (
    User,
    accounts,
    end_session,
    record,
    role_from_claims,
    safe_next,
    signed_in_user,
    start_session,
)
from dicomnode.dicomweb.dpo.views import (
    page,
    problem,
    state,
    user,
)


def _safe_next(target: str | None) -> str:
    """Where to go after sign-in: a path of these pages only (no open redirect)."""
    return target if target and safe_next(target) else url_for("dpo.overview")


# --- sign-in --------------------------------------------------------------------------------


def _signin_routes(bp: Blueprint) -> None:
    @bp.get("/signin")
    def signin() -> Any:
        if signed_in_user(state().settings, accounts()) is not None:
            return redirect(_safe_next(request.args.get("next")))
        return page("signin.html", next=request.args.get("next", ""), error=None)

    @bp.post("/signin")
    def signin_post() -> Any:
        settings = state().settings
        username = request.form.get("username", "").strip()[:64]
        password = request.form.get("password", "")
        target = request.form.get("next", "")
        if not settings.local_accounts:
            return problem(404, "local_accounts_off")
        address = request.remote_addr or ""
        throttle = state().throttle
        if throttle.locked(username, address):
            record("signin", username, "local", "failure", "locked after repeated failures")
            return page("signin.html", 429, next=target, error="locked")
        account, why = accounts().authenticate(username, password)
        if account is None:
            locked = throttle.failed(username, address)
            record("signin", username, "local", "failure", why + ("; now locked" if locked else ""))
            return page("signin.html", 401, next=target, error="bad_credentials")
        throttle.succeeded(username)
        if account.role not in ROLES:
            record("signin", username, "local", "failure", f"role {account.role!r} has no access")
            return problem(403, "no_role")
        start_session(User(account.username, account.role, "local", account.display_name))
        record("signin", account.username, "local", "success", role=account.role)
        return redirect(_safe_next(target), 303)

    @bp.post("/signout")
    def signout() -> Any:
        record("signout", user().name, user().method, "success", role=user().role)
        end_session()
        return redirect(url_for("dpo.signin"), 303)

    @bp.get("/oidc/login")
    def oidc_login() -> Any:
        client = state().oidc
        if client is None:
            abort(404)
        public = services().settings.http.public_url
        callback = (
            public.rstrip("/") + url_for("dpo.oidc_callback")
            if public
            else url_for("dpo.oidc_callback", _external=True)
        )
        session["next"] = _safe_next(request.args.get("next"))
        return client.authorize_redirect(callback)

    @bp.get("/oidc/callback")
    def oidc_callback() -> Any:
        from authlib.integrations.base_client import OAuthError

        client = state().oidc
        if client is None:
            abort(404)
        try:
            token = client.authorize_access_token()
        except OAuthError as e:
            record("signin", "", "oidc", "failure", f"the provider's answer was refused: {e}")
            return problem(401, "oidc_failed")
        claims = dict(token.get("userinfo") or {})
        if state().settings.oidc_role_claim.split(".")[0] not in claims:
            claims |= dict(client.userinfo(token=token))
        name = str(claims.get("preferred_username") or claims.get("email") or claims.get("sub", ""))
        role = role_from_claims(claims, state().settings)
        if not role:
            record("signin", name, "oidc", "failure", "no dpo or auditor role in the claims")
            end_session()
            return problem(403, "no_role")
        target = session.get("next")
        start_session(User(name, role, "oidc", str(claims.get("name", ""))))
        record("signin", name, "oidc", "success", role=role)
        return redirect(_safe_next(target), 303)


def install(bp: Blueprint) -> None:
    """Add this group's pages to the DPO blueprint."""
    _signin_routes(bp)
