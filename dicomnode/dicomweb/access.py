"""Who is asking: bearer-token checks for the DICOMweb blueprints, and the requester as a Source."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, current_app, g, request

from dicomnode.core.model import Source
from dicomnode.dicomweb.auth import AuthError, PurposeError, ScopeError
from dicomnode.governance import audit_events

SCOPE_BY_METHOD = {
    "GET": "dicomweb.read",
    "HEAD": "dicomweb.read",
    "POST": "dicomweb.write",
    "DELETE": "dicomweb.delete",
}


def services() -> Any:
    """The node's WebServices for this app."""
    return current_app.extensions["dicomnode"]


GOVERNANCE_SCOPE_BY_METHOD = {
    "GET": "governance.read",
    "HEAD": "governance.read",
    "POST": "governance.admin",
    "DELETE": "governance.admin",
}


def require_token(blueprint: Blueprint, scopes: dict[str, str] = SCOPE_BY_METHOD) -> None:
    """Every request to `blueprint` needs a valid token with the scope its method needs and a
    stated purpose of use; a refusal is a 110114 (bad token) or 110113 (scope, purpose) alert."""

    @blueprint.before_request
    def check() -> None:
        if request.method == "OPTIONS":  # CORS preflight carries no credentials
            return
        address, now = request.remote_addr or "", datetime.now(UTC)
        reason = f"{request.method} {request.path}"  # the request ends before the build
        try:
            principal = services().verifier.verify(request.headers.get("Authorization"))
        except AuthError as e:
            why = f"{reason}: {e}"  # `e` is gone when the message is built
            alert(
                ("token-invalid", address),
                lambda by, count: audit_events.authentication_failed(
                    "bearer-token", address, why, now, by, count=count
                ),
            )
            raise
        try:
            principal.require(scopes.get(request.method, scopes["POST"]))  # unknown: as a write
            principal.require_purpose()
        except ScopeError as e:
            who, why = Source("dicomweb", principal.subject, address), f"{reason}: {e}"
            what = "token purpose" if isinstance(e, PurposeError) else "token scope"
            alert(
                ("token-refused", address, principal.subject),
                lambda by, count: audit_events.refused(who, what, why, now, by, count=count),
            )
            raise
        g.principal = principal


def alert(key: tuple[str, ...], build: Callable[[Any, int], bytes | list[bytes]]) -> None:
    """A security-relevant refusal for the audit log, aggregated per `key` and minute (one
    message, with the count, however many arrive); `build` gets the reporter and the count."""
    audit_log = services().records.audit
    if audit_log is not None and audit_log.source is not None:
        audit_log.submit_alert(key, lambda count: build(audit_log.source, count), datetime.now(UTC))


def audit(build: Callable[[Any], bytes | list[bytes]]) -> None:
    """Hand an audit message to the node's audit log; `build` gets the reporter."""
    audit_log = services().records.audit
    if audit_log is not None and audit_log.source is not None:
        audit_log.submit(lambda: build(audit_log.source))


def requester() -> Source:
    principal = g.get("principal")
    return Source(
        "dicomweb",
        principal.subject if principal else "",
        request.remote_addr or "",
        None,
        principal.purpose if principal else None,
    )


def base_url() -> str:
    """The DICOMweb root for URLs in answers: ``[http] public_url`` when set (a node behind a
    proxy), else the address the client used, e.g. http://host:8080/dicomweb. Some clients send
    a Host header without the port; the server's own port is used then."""
    public = services().settings.http.public_url
    if public:
        return public.rstrip("/") + "/dicomweb"
    host = request.host
    port = request.environ.get("SERVER_PORT", "")
    if ":" not in host.rsplit("]", 1)[-1] and port not in ("", "80", "443"):
        host = f"{host}:{port}"
    return f"{request.scheme}://{host}/dicomweb"
