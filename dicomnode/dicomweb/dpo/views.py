"""The DPO's pages: sign-in, the disclosure views and exports, consent, holds, destruction
records, pending work, the ledger's status and the policy versions.

Every page needs a signed-in user with the dpo or auditor role; anyone else is sent to the
sign-in page (HTML) or gets 401 (exports) and sees no data. POSTs need the session's CSRF token;
verifying the ledger and signing a checkpoint need the dpo role. What the pages show comes
from the archive, stewardship and the policy; nothing here decides anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from flask import (
    Blueprint,
    Response,
    abort,
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
from dicomnode.core.ledger import DECISION_KINDS, LedgerEntry, LedgerFilter, entry_hash
from dicomnode.core.model import LedgerKind, Source
from dicomnode.core.roles import ROLES
from dicomnode.dicomweb.access import audit, services
from dicomnode.dicomweb.dpo import i18n, records
from dicomnode.dicomweb.dpo.chart import disclosure_chart
from dicomnode.dicomweb.dpo.signin import (
    User,
    accounts,
    csrf_ok,
    csrf_token,
    end_session,
    record,
    role_from_claims,
    safe_next,
    signed_in_user,
    start_session,
)
from dicomnode.dicomweb.errors import http_status_for
from dicomnode.governance import audit_events, codes
from dicomnode.records import Records
from dicomnode.stewardship import checkpoint_signed_by

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


def _day(name: str) -> date | None:
    value = request.args.get(name, "").strip()
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{name} must be a date such as 2026-01-31, got {value!r}") from None


def _number(name: str, default: int, low: int, high: int) -> int:
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
        date_from=_day("date_from"),
        date_to=_day("date_to"),
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


def _safe_next(target: str | None) -> str:
    """Where to go after sign-in: a path of these pages only (no open redirect)."""
    return target if target and safe_next(target) else url_for("dpo.overview")


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

    _signin_routes(bp)
    _disclosure_routes(bp)
    _register_routes(bp)
    _ledger_routes(bp)
    _report_routes(bp)
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

    @bp.get("/")
    def overview() -> Any:
        stewardship, registry = services().stewardship, views()
        status = stewardship.policy_status()
        moment = now()
        return page(
            "overview.html",
            status=status,
            verified=views().latest(LedgerKind.CHECKPOINT.value),
            head=views().head(),
            counts={
                "held": len(registry.quarantined()),
                "holds": len(registry.holds(active_only=True)),
                "overdue_holds": len(_overdue_holds(moment)),
                "restrictions": sum(1 for r in registry.restrictions() if r.lifted_at is None),
                "failed_deliveries": len(registry.deliveries(state="failed", limit=1000)),
                "scheduled": len(status.scheduled),
            },
        )


def _overdue_holds(moment: datetime) -> list[Any]:
    return [
        h
        for h in views().holds(active_only=True)
        if h.review_date is not None and h.review_date < moment
    ]


# --- disclosures ----------------------------------------------------------------------------


def _disclosure_routes(bp: Blueprint) -> None:
    @bp.get("/disclosures")
    def disclosures() -> Any:
        f = disclosure_filter()
        number = _number("page", 1, 1, 10**9)
        per_page = _number("per_page", PER_PAGE, 1, MAX_PER_PAGE)
        found = views().ledger_page(f, number, per_page)
        choices = views().choices(kinds=f.kinds)
        chart = disclosure_chart(
            views().daily_counts(f.with_(kinds=(LedgerKind.DISCLOSURE.value,))),
            i18n.translate(g.lang, "chart_title"),
            i18n.translate(g.lang, "chart_empty"),
        )
        return page(
            "disclosures.html",
            f=f,
            found=found,
            rows=[records.disclosure_row(e) for e in found.entries],
            choices=choices,
            outcomes=OUTCOMES,
            chart=chart,
        )

    @bp.get("/disclosures.csv")
    def disclosures_csv() -> Response:
        f = disclosure_filter()
        log_used("disclosures CSV export")
        rows = (records.disclosure_row(e) for e in views().ledger_iter(f))
        return _download(
            records.csv_lines(records.DISCLOSURE_COLUMNS, rows), "disclosures.csv", "text/csv"
        )

    @bp.get("/disclosures.json")
    def disclosures_json() -> Response:
        f = disclosure_filter()
        log_used("disclosures JSON export")
        head = {
            "generated_at": now().isoformat(timespec="seconds"),
            "filter": {k: (str(v) if isinstance(v, date) else v) for k, v in f.__dict__.items()},
        }
        return _download(
            _json_array(head, "entries", (records.entry_json(e) for e in views().ledger_iter(f))),
            "disclosures.json",
            "application/json",
        )

    @bp.get("/ledger/<int:seq>")
    def entry(seq: int) -> Any:
        found = views().entry(seq)
        if found is None:
            abort(404, f"there is no ledger entry {seq}")
        previous = views().entry(seq - 1) if seq > 1 else None
        covering = next((c for c in views().checkpoints() if c.seq >= seq), None)
        recomputed = entry_hash(
            found.prev_hash,
            found.seq,
            found.recorded_at,
            found.kind,
            found.actor,
            found.outcome,
            found.detail,
        )
        return page(
            "entry.html",
            entry=found,
            detail=_detail_rows(found),
            head=views().head(),
            hash_ok=recomputed == found.hash,
            link_ok=(previous.hash if previous else "0" * 64) == found.prev_hash,
            covering=covering,
        )


def _detail_rows(entry: LedgerEntry) -> list[tuple[str, str]]:
    rows = []
    for key, value in sorted(entry.data.items()):
        if isinstance(value, list):
            text = "\n".join(
                json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else str(v)
                for v in value
            )
        elif isinstance(value, dict):
            text = json.dumps(value, ensure_ascii=False, indent=1, sort_keys=True)
        else:
            text = "" if value is None else str(value)
        rows.append((key, text))
    return rows


def _download(chunks: Iterator[str], filename: str, mimetype: str) -> Response:
    response = Response(stream_with_context(chunks), mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def _json_array(head: dict[str, Any], key: str, items: Iterator[dict[str, Any]]) -> Iterator[str]:
    """`head` with `key` holding `items`, as JSON text written piece by piece."""
    opening = json.dumps(head, ensure_ascii=False)[:-1]
    yield f'{opening}{", " if head else ""}"{key}": ['
    for i, item in enumerate(items):
        yield ("," if i else "") + "\n" + json.dumps(item, ensure_ascii=False)
    yield "\n]}\n"


# --- consent, holds, restrictions, destruction records, pending work -----------------------


def _register_routes(bp: Blueprint) -> None:
    @bp.get("/consents")
    def consents() -> Any:
        patient_id = request.args.get("patient_id", "").strip()
        stewardship = services().stewardship
        history = stewardship.consent_history(patient_id) if patient_id else []
        current = stewardship.consent_in_force(patient_id) if patient_id else {}
        return page("consents.html", patient_id=patient_id, history=history, current=current)

    @bp.get("/holds")
    def holds() -> Any:
        everything = views().holds()
        return page(
            "holds.html",
            active=[h for h in everything if h.active],
            released=[h for h in everything if not h.active],
            moment=now(),
        )

    @bp.get("/restrictions")
    def restrictions() -> Any:
        everything = views().restrictions()
        return page(
            "restrictions.html",
            active=[r for r in everything if r.lifted_at is None],
            lifted=[r for r in everything if r.lifted_at is not None],
        )

    @bp.get("/destructions")
    def destructions() -> Any:
        f = LedgerFilter(
            kinds=(LedgerKind.DELETION.value,),
            date_from=_day("date_from"),
            date_to=_day("date_to"),
            patient_id=request.args.get("patient_id", "").strip(),
        )
        found = views().ledger_page(f, _number("page", 1, 1, 10**9), PER_PAGE)
        rows = []
        for entry in found.entries:
            detail = entry.data
            studies = list(detail.get("study_instance_uids", []))
            recorded = detail.get("recipients_with_copies")
            if isinstance(recorded, list):
                recipients = sorted(
                    {str(c.get("recipient", "")) for c in recorded if isinstance(c, dict)}
                )
            elif entry.outcome == "done" and studies:  # a record that does not name them
                recipients = views().recipients_with_copies(studies, entry.seq)
            else:
                recipients = []
            rows.append(
                {
                    "entry": entry,
                    "detail": detail,
                    "studies": studies,
                    "instances": len(detail.get("sop_instance_uids", [])),
                    "recipients": recipients,
                    "from_ledger": not isinstance(recorded, list),
                }
            )
        return page("destructions.html", found=found, rows=rows, f=f)

    @bp.get("/pending")
    def pending() -> Any:
        records, moment = views(), now()
        held_by_study: dict[str, dict[str, Any]] = {}
        for item in records.quarantined():
            group = held_by_study.setdefault(
                item.study_instance_uid,
                {"item": item, "count": 0, "reasons": set(), "since": item.held_at},
            )
            group["count"] += 1
            group["reasons"].add(item.reason)
            group["since"] = min(group["since"], item.held_at)
        jobs = records.jobs
        retention = services().stewardship.retention_status()
        return page(
            "pending.html",
            held=list(held_by_study.values()),
            jobs=jobs.list(state="held", limit=500) + jobs.list(state="failed", limit=500),
            deliveries=records.deliveries(state="failed", limit=500)
            + records.deliveries(state="denied", limit=500),
            overdue_holds=_overdue_holds(moment),
            scheduled=services().stewardship.policy_status().scheduled,
            due=[i for i in retention if i.action == "destroy"],
            moment=moment,
        )


# --- the ledger's status --------------------------------------------------------------------


def _ledger_routes(bp: Blueprint) -> None:
    @bp.get("/ledger")
    def ledger() -> Any:
        marks = views().checkpoints()
        signed = checkpoint_signed_by(services().signing_key)
        shown = marks[-CHECKPOINTS_SHOWN:][::-1]
        result_seq = request.args.get("result", "")
        result = views().entry(int(result_seq)) if result_seq.isdigit() else None
        if result is not None and result.kind != LedgerKind.CHECKPOINT.value:
            result = None
        return page(
            "ledger.html",
            verified=views().latest(LedgerKind.CHECKPOINT.value, "verified"),
            last=views().latest(LedgerKind.CHECKPOINT.value),
            head=views().head(),
            checkpoints=[(c, signed(c)) for c in shown],
            checkpoint_count=len(marks),
            result=result,
            signed_now=request.args.get("signed"),
        )

    @bp.post("/ledger/verify")
    def verify() -> Any:
        """Recompute the chain against the signed checkpoints; the result is itself recorded
        (a checkpoint entry: verified or broken, by whom, up to which entry)."""
        result, entry = services().stewardship.verify_ledger(
            f"dpo:{user().name}", checkpoint_signed_by(services().signing_key)
        )
        log.log(
            logging.INFO if result.ok else logging.ERROR,
            "ledger verified by %s: %s",
            user().name,
            "OK" if result.ok else result.problem,
            extra={"event": "ledger_verify", "user": user().name, **entry.data},
        )
        return redirect(url_for("dpo.ledger", result=entry.seq), 303)

    @bp.post("/ledger/checkpoint")
    def checkpoint() -> Any:
        key, records = services().signing_key, views()
        made = services().stewardship.checkpoint(lambda payload: records.sign(key, payload))
        return redirect(url_for("dpo.ledger", signed=made.seq if made else "none"), 303)


# --- exports and reports --------------------------------------------------------------------


def _accounting(patient_id: str) -> tuple[list[dict[str, Any]], Any]:
    f = LedgerFilter(
        kinds=(LedgerKind.DISCLOSURE.value,),
        date_from=_day("date_from"),
        date_to=_day("date_to"),
        patient_id=patient_id,
        outcome="allowed",
        disclosed_patient_only=True,
    )
    policy = services().stewardship.policy_status().in_force
    studies = set(views().patient_studies(patient_id))
    rows = [
        records.accounting_row(e, patient_id, policy, studies)
        for e in views().ledger_iter(f, newest_first=False)
    ]
    return rows, f


def _report_routes(bp: Blueprint) -> None:
    @bp.get("/accounting")
    def accounting() -> Any:
        patient_id = request.args.get("patient_id", "").strip()
        rows, f = _accounting(patient_id) if patient_id else ([], None)
        if patient_id:
            log_used("accounting of disclosures")
        return page(
            "accounting.html",
            patient_id=patient_id,
            rows=rows,
            summary=records.accounting_summary(rows),
            f=f,
        )

    @bp.get("/accounting.csv")
    def accounting_csv() -> Response:
        patient_id = request.args.get("patient_id", "").strip()
        if not patient_id:
            raise InvalidInput("name the patient: ?patient_id=...")
        rows, _ = _accounting(patient_id)
        log_used("accounting of disclosures CSV export")
        return _download(
            records.csv_lines(records.ACCOUNTING_COLUMNS, rows),
            f"accounting-{_file_part(patient_id)}.csv",
            "text/csv",
        )

    def _record() -> dict[str, Any]:
        status = services().stewardship.policy_status()
        return records.processing_record(
            status.in_force, status.in_force_since, services().settings, now()
        )

    @bp.get("/processing-record")
    def processing_record() -> Any:
        return page("processing_record.html", record=_record())

    @bp.get("/processing-record.json")
    def processing_record_json() -> Response:
        response = Response(
            json.dumps(_record(), ensure_ascii=False, indent=2) + "\n", mimetype="application/json"
        )
        response.headers["Content-Disposition"] = (
            'attachment; filename="record-of-processing-activities.json"'
        )
        return response

    @bp.get("/retention")
    def retention() -> Any:
        items = services().stewardship.retention_status()
        moment = now()
        soon = moment + timedelta(days=30)
        groups: dict[str, list[Any]] = {"due": [], "held": [], "soon": [], "kept": []}
        for item in items:
            if item.action == "destroy":
                groups["due"].append(item)
            elif item.action == "keep-hold":
                groups["held"].append(item)
            elif item.expires_at is not None and item.expires_at <= soon:
                groups["soon"].append(item)
            else:
                groups["kept"].append(item)
        return page("retention.html", groups=groups, moment=moment)

    @bp.get("/retention.csv")
    def retention_csv() -> Response:
        items = services().stewardship.retention_status()
        log_used("retention compliance CSV export")
        rows = (item.as_dict() for item in items)
        return _download(
            records.csv_lines(records.RETENTION_COLUMNS, rows), "retention.csv", "text/csv"
        )

    @bp.get("/policy")
    def policy() -> Any:
        status = services().stewardship.policy_status()
        activations = views().activations()
        return page(
            "policy.html",
            status=status,
            activations=activations,
            notice_days={
                p.version: (p.effective_at - p.published_at).days for p in status.published
            },
        )


def _file_part(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:64]
