"""The DPO's pages: sign-in, the disclosure views and exports, consent, holds, destruction
records, pending work, the ledger's status and the policy versions.

Every page needs a signed-in user with the dpo or auditor role; anyone else is sent to the
sign-in page (HTML) or gets 401 (exports) and sees no data. POSTs need the session's CSRF token;
verifying the ledger and signing a checkpoint need the dpo role. What the pages show comes
from the records room, stewardship and the policy; nothing here decides anything.

This module holds the blueprint (its sign-in gate, security headers, error pages) and the
helpers every page uses; the pages are grouped in `signin_pages`, `ledger_pages` (disclosures,
ledger entries, the ledger's status), `register_pages` (overview, consent, holds,
restrictions, destruction records, pending work) and `report_pages` (accounting, record of
processing activities, retention, policy).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlencode

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    redirect,
    render_template,
    request,
    session,
    stream_with_context,
    url_for,
)
from werkzeug.exceptions import HTTPException

from dicomnode.core.errors import DicomnodeError, InvalidInput
from dicomnode.core.ledger import DECISION_KINDS, LedgerFilter
from dicomnode.core.model import LedgerKind, Source
from dicomnode.dicomweb.access import audit, services
from dicomnode.dicomweb.dpo import i18n
from dicomnode.dicomweb.dpo.signin import (
    User,
    accounts,
    csrf_ok,
    csrf_token,
    end_session,
    signed_in_user,
)
from dicomnode.dicomweb.errors import http_status_for
from dicomnode.governance import audit_events, codes
from dicomnode.records import Records

log = logging.getLogger("dicomnode.dpo")

PUBLIC = {"dpo.signin", "dpo.signin_post", "dpo.oidc_login", "dpo.oidc_callback", "dpo.static"}
DPO_ONLY = {"dpo.verify", "dpo.checkpoint"}
PER_PAGE = 50
MAX_PER_PAGE = 500
CHECKPOINTS_SHOWN = 100
OUTCOMES = ("allowed", "denied", "complete", "partial", "failed")
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def state() -> Any:
    return current_app.extensions["dicomnode_dpo"]


def now() -> datetime:
    return datetime.now(UTC)


def views() -> Records:
    """The records room: the ledger's views and governance's registers."""
    return services().records


def user() -> User:
    return g.user  # type: ignore[no-any-return]


def _is_export() -> bool:
    return request.path.endswith((".csv", ".json"))


def page(template: str, code: int = 200, **context: Any) -> tuple[str, int]:
    """`template` rendered with `context`, answered with HTTP status `code`."""
    return render_template(f"dpo/{template}", **context), code


def problem(status: int, message_key: str, **extra: Any) -> Response:
    """A page (or for exports, plain text) saying what is wrong, with no data."""
    text = i18n.translate(g.get("lang", "en"), message_key, **extra)
    if _is_export() or request.endpoint is None:
        response = Response(text + "\n", status, mimetype="text/plain")
    else:
        response = Response(render_template("dpo/problem.html", message=text), status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Session realm="dicomnode DPO pages"'
    return response


# --- filters from the query string ----------------------------------------------------------


def day(name: str) -> date | None:
    value = request.args.get(name, "").strip()
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{name} must be a date such as 2026-01-31, got {value!r}") from None


def number(name: str, default: int, low: int, high: int) -> int:
    value = request.args.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise InvalidInput(f"{name} must be a whole number, got {value!r}")
    return min(max(int(value), low), high)


def disclosure_filter() -> LedgerFilter:
    """The filter the query string asks for (the same for the page and its exports)."""
    args = request.args
    outcome = args.get("outcome", "").strip()
    if outcome and outcome not in OUTCOMES:
        raise InvalidInput(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    kinds = DECISION_KINDS + ((LedgerKind.TRANSFER.value,) if args.get("transfers") else ())
    return LedgerFilter(
        kinds=kinds,
        date_from=day("date_from"),
        date_to=day("date_to"),
        recipient=args.get("recipient", "").strip(),
        purpose=args.get("purpose", "").strip(),
        basis=args.get("basis", "").strip(),
        operation=args.get("operation", "").strip(),
        patient_id=args.get("patient_id", "").strip(),
        outcome=outcome,
    )


def query_string(**changes: Any) -> str:
    """This request's query string with `changes` (None removes a key)."""
    args = {k: v for k, v in request.args.items() if v}
    for key, value in changes.items():
        if value is None:
            args.pop(key, None)
        else:
            args[key] = str(value)
    return urlencode(args)


def log_used(what: str) -> None:
    """A DICOM audit message (Audit Log Used, DCM 110101): the DPO read the ledger out."""
    who = Source("dpo-pages", user().name, request.remote_addr or "")
    when, url = now(), f"{request.path}?{request.query_string.decode()}"
    audit(lambda by: audit_events.log_used(who, f"{what}: {url}", when, by))


# --- the blueprint --------------------------------------------------------------------------


def dpo_blueprint() -> Blueprint:
    bp = Blueprint(
        "dpo",
        __name__,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )

    @bp.before_request
    def gate() -> Any:
        g.lang = i18n.choose(request, session)
        if request.endpoint in PUBLIC:
            if request.method == "POST" and not csrf_ok():
                return problem(403, "csrf_failed")
            return None
        signed_in = signed_in_user(state().settings, accounts())
        if signed_in is None:
            if session.get("user"):
                end_session()  # expired, or the account was disabled
            if request.method == "GET" and not _is_export():
                return redirect(url_for("dpo.signin", next=request.full_path.rstrip("?")))
            return problem(401, "sign_in_first")
        g.user = signed_in
        if request.method == "POST":
            if not csrf_ok():
                return problem(403, "csrf_failed")
            if request.endpoint in DPO_ONLY and not signed_in.is_dpo:
                return problem(403, "dpo_only")
        return None

    @bp.after_request
    def headers(response: Response) -> Response:
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @bp.errorhandler(DicomnodeError)
    def known(error: DicomnodeError) -> Response:
        return problem(http_status_for(error), "error_detail", detail=str(error))

    @bp.errorhandler(HTTPException)
    def http(error: HTTPException) -> Response:
        return problem(error.code or 500, "error_detail", detail=error.description or error.name)

    @bp.context_processor
    def context() -> dict[str, Any]:
        lang = g.get("lang", "en")
        return {
            "t": lambda key, **kw: i18n.translate(lang, key, **kw),
            "lang": lang,
            "other_lang": "ko" if lang == "en" else "en",
            "current_user": g.get("user"),
            "csrf_token": csrf_token,
            "when": when,
            "codes": codes,
            "query_string": query_string,
            "oidc": state().oidc is not None,
            "local_accounts": state().settings.local_accounts,
        }

    # the page groups import this module's helpers, so they are imported here, not above
    from dicomnode.dicomweb.dpo import ledger_pages, register_pages, report_pages, signin_pages

    signin_pages.install(bp)
    ledger_pages.install(bp)
    register_pages.install(bp)
    report_pages.install(bp)
    return bp


def when(value: Any) -> str:
    """A moment as the pages show it: UTC, to the second."""
    if value in (None, ""):
        return ""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


# --- downloads ------------------------------------------------------------------------------


def download(chunks: Iterator[str], filename: str, mimetype: str) -> Response:
    response = Response(stream_with_context(chunks), mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def json_array(head: dict[str, Any], key: str, items: Iterator[dict[str, Any]]) -> Iterator[str]:
    """`head` with `key` holding `items`, as JSON text written piece by piece."""
    opening = json.dumps(head, ensure_ascii=False)[:-1]
    yield f'{opening}{", " if head else ""}"{key}": ['
    for i, item in enumerate(items):
        yield ("," if i else "") + "\n" + json.dumps(item, ensure_ascii=False)
    yield "\n]}\n"
