"""The DPO's casework pages: the breach register (deadlines with their time left, drafted
notices, notifications), the monthly access review (report, JSON/CSV exports, sign-off) and the
data-subject request tickets (deadlines, carrying out, coded refusals).

They join the DPO blueprint (`install_casework_routes`), so its sign-in gate, CSRF check and
security headers apply; changes need the dpo role. What they show and record comes from the
casework room; nothing here decides anything.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from datetime import datetime
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, redirect, request, url_for

from dicomnode.casework import Casework
from dicomnode.core.errors import InvalidInput
from dicomnode.core.times import parse_moment
from dicomnode.dicomweb.dpo import i18n
from dicomnode.dicomweb.dpo.views import page, problem, user
from dicomnode.governance import casework as rules

log = logging.getLogger("dicomnode.dpo")

EXTENSION_KEY = "dicomnode_casework"
SIGNIN_ENDPOINT = "dpo.signin_post"


def casework() -> Casework:
    return current_app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]


def make_casework(services: Any) -> Casework:
    """The node's casework room (built by the wiring over the archive, stewardship and
    egress, on stewardship's clock)."""
    return services.casework  # type: ignore[no-any-return]


def count_failed_authentication(app: Flask) -> None:
    """Count every 401 answered to a request that presented credentials (a bearer token, or
    a DPO sign-in form) per hour, kind and address: what the monthly review reports."""

    @app.after_request
    def counted(response: Response) -> Response:
        if response.status_code != 401:
            return response
        if request.endpoint == SIGNIN_ENDPOINT:
            kind = "dpo-signin"
        elif request.headers.get("Authorization"):
            kind = "bearer-token"
        else:
            return response
        try:
            casework().count_auth_failure(kind, request.remote_addr or "")
        except Exception:  # counting must never turn a 401 into a 500
            log.exception("failed authentication not counted")
        return response


def _lang() -> str:
    return str(g.get("lang", "en"))


def timer(deadline: dict[str, Any]) -> tuple[str, str]:
    """A deadline's time left or overdue as the pages show it, and its CSS class."""
    lang = _lang()
    if deadline["done_at"]:
        key = "met_late" if deadline["status"] == "late" else "met_at"
        at = datetime.fromisoformat(deadline["done_at"]).strftime("%Y-%m-%d %H:%M")
        return i18n.translate(lang, key, at=at), "ok" if key == "met_at" else "warn"
    if deadline["immediately"]:
        return i18n.translate(lang, "due_immediately"), "bad"
    seconds = deadline["seconds_left"]
    hours, minutes = divmod(abs(seconds) // 60, 60)
    if seconds < 0:
        return i18n.translate(lang, "overdue_by", hours=hours, minutes=minutes), "bad"
    return i18n.translate(lang, "time_left", hours=hours, minutes=minutes), (
        "warn" if seconds < 24 * 3600 else "ok"
    )


def _dpo_only() -> Response | None:
    return None if user().is_dpo else problem(403, "dpo_only")


def _actor() -> str:
    return f"dpo:{user().name}"


def _form(name: str) -> str:
    return request.form.get(name, "").strip()


def _moment_field(name: str, required: bool = True) -> datetime | None:
    text = _form(name)
    if not text:
        if required:
            raise InvalidInput(f"{name} is needed")
        return None
    try:
        return parse_moment(text)
    except ValueError:
        raise InvalidInput(f"{name} must be a date-time such as 2026-11-30T09:00") from None


def _month() -> str:
    month = request.args.get("month", "").strip()
    if month:
        return month
    work = casework()
    return work.clock().astimezone(work.review.zone).strftime("%Y-%m")  # the node's month


def _tickets_context() -> dict[str, Any]:
    work = casework()
    return {"overdue": {t.id for t in work.overdue_tickets()}}


def install_casework_routes(bp: Blueprint) -> None:
    """Add the breach, review and ticket pages to the DPO blueprint."""

    @bp.context_processor
    def casework_context() -> dict[str, Any]:
        return {"timer": timer, "exemption_meanings": rules.EXEMPTIONS}

    _breach_routes(bp)
    _review_routes(bp)
    _ticket_routes(bp)


def _breach_routes(bp: Blueprint) -> None:
    """The breach register: recording, notifying and closing a breach."""

    @bp.get("/breaches")
    def breaches() -> Any:
        work = casework()
        views = [work.breach_view(b) for b in work.breaches()]
        return page("breaches.html", views=views, duties=rules.BREACH_STATES)

    @bp.post("/breaches")
    def breach_record() -> Any:
        if (refused := _dpo_only()) is not None:
            return refused
        aware_at = _moment_field("aware_at")
        assert aware_at is not None
        record = casework().record_breach(
            _actor(),
            aware_at,
            _form("what"),
            _moment_field("occurred_at", required=False),
            how=_form("how"),
            subjects=_form("subjects") or 0,
            records=_form("records") or 0,
            patient_ids=_form("patient_ids"),
            study_instance_uids=_form("study_instance_uids"),
            categories=_form("categories"),
            external_access=bool(_form("external_access")),
            emr_linked=bool(_form("emr_linked")),
            gdpr=bool(_form("gdpr")),
            consequences=_form("consequences"),
            measures=_form("measures"),
            subject_actions=_form("subject_actions"),
            remedy=_form("remedy"),
            contact=_form("contact"),
        )
        return redirect(url_for("dpo.breach", breach_id=record.id), 303)

    @bp.get("/breaches/<int:breach_id>")
    def breach(breach_id: int) -> Any:
        view = casework().breach_view(casework().breach(breach_id))
        return page("breach.html", view=view, b=view["record"])

    @bp.post("/breaches/<int:breach_id>/notify")
    def breach_notify(breach_id: int) -> Any:
        if (refused := _dpo_only()) is not None:
            return refused
        casework().notify_breach(
            breach_id, _form("to"), _actor(), _moment_field("at", required=False), _form("note")
        )
        return redirect(url_for("dpo.breach", breach_id=breach_id), 303)

    @bp.post("/breaches/<int:breach_id>/close")
    def breach_close(breach_id: int) -> Any:
        if (refused := _dpo_only()) is not None:
            return refused
        casework().close_breach(breach_id, _actor(), _form("reason"))
        return redirect(url_for("dpo.breach", breach_id=breach_id), 303)


def _review_routes(bp: Blueprint) -> None:
    """The monthly access review: the report, its exports and the sign-off."""

    @bp.get("/review")
    def review() -> Any:
        month = _month()
        report = casework().review_report(month)
        return page(
            "review.html",
            month=month,
            report=report,
            signed=casework().reviews(month),
            signed_now=request.args.get("signed"),
        )

    @bp.get("/review.json")
    def review_json() -> Response:
        report = casework().review_report(_month())
        return Response(
            json.dumps(report, ensure_ascii=False, indent=2),
            mimetype="application/json",
            headers={
                "Content-Disposition": f'attachment; filename="review-{report["month"]}.json"'
            },
        )

    @bp.get("/review.csv")
    def review_csv() -> Response:
        report = casework().review_report(_month())
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=rules.REVIEW_CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rules.review_rows(report))
        return Response(
            out.getvalue(),
            mimetype="text/csv",
            headers={"Content-Disposition": f'attachment; filename="review-{report["month"]}.csv"'},
        )

    @bp.post("/review/sign")
    def review_sign() -> Any:
        if (refused := _dpo_only()) is not None:
            return refused
        month = _form("month")
        entry = casework().sign_review(
            month, _actor(), _form("finding"), _form("follow_up"), _form("sha256") or None
        )
        return redirect(url_for("dpo.review", month=month, signed=entry.seq), 303)


def _ticket_routes(bp: Blueprint) -> None:
    """Data-subject request tickets: opening, carrying out, refusing, extending."""

    @bp.get("/tickets")
    def tickets() -> Any:
        return page(
            "tickets.html",
            tickets=casework().tickets(),
            kinds=rules.TICKET_KINDS,
            **_tickets_context(),
        )

    @bp.post("/tickets")
    def ticket_open() -> Any:
        if (refused := _dpo_only()) is not None:
            return refused
        regimes = tuple(r for r in rules.REGIMES if request.form.get(f"law_{r}"))
        ticket = casework().open_ticket(
            _form("kind"),
            _form("patient_id"),
            _actor(),
            requester=_form("requester"),
            regimes=regimes,
            details=_form("details"),
            issuer=_form("issuer"),
            received_at=_moment_field("received_at", required=False),
            reviewer=_form("reviewer"),
            study_instance_uid=_form("study_instance_uid"),
        )
        return redirect(url_for("dpo.ticket", ticket_id=ticket.id), 303)

    @bp.get("/tickets/<int:ticket_id>")
    def ticket(ticket_id: int) -> Any:
        found = casework().ticket(ticket_id)
        return page(
            "ticket.html",
            ticket=found,
            is_overdue=casework().is_overdue(found),
            exemptions=rules.EXEMPTIONS,
            flag=casework().decision_flag(ticket_id),
        )

    @bp.post("/tickets/<int:ticket_id>/<action>")
    def ticket_action(ticket_id: int, action: str) -> Any:
        if (refused := _dpo_only()) is not None:
            return refused
        work = casework()
        if action == "carry-out":
            work.carry_out(ticket_id, _actor())
        elif action == "done":
            work.complete(ticket_id, _actor(), _form("note"))
        elif action == "refuse":
            work.refuse(ticket_id, _actor(), _form("code"), _form("reason"))
        elif action == "extend":
            until = _moment_field("until")
            assert until is not None
            work.extend(ticket_id, _actor(), until, _form("reason"))
        else:
            return problem(404, "error_detail", detail=f"no action {action!r}")
        return redirect(url_for("dpo.ticket", ticket_id=ticket_id), 303)
