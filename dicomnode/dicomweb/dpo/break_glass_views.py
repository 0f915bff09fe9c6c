"""Break-glass on the web: a clinician opens a grant for themselves with their DICOMweb token
(``POST /dicomweb/break-glass``: the token's subject is the requester, its reason stated); the
DPO sees every grant, the unreviewed ones flagged, and reviews each (``/governance/break-glass``),
or opens one on a clinician's behalf in an emergency call. What a grant lets through is decided
on the way out (egress and governance), not here."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, redirect, request, url_for

from dicomnode.core.errors import InvalidInput
from dicomnode.dicomweb.access import requester, require_token
from dicomnode.dicomweb.dpo.views import page, user
from dicomnode.egress.break_glass import BreakGlass

EXTENSION_KEY = "dicomnode_break_glass"
# a clinician opens a grant for themselves with the token they read images with
SCOPES = {"GET": "dicomweb.read", "POST": "dicomweb.read"}
MAX_BODY = 16 * 1024

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "nav_break_glass": "Break-glass",
        "bg_intro": "Emergency access for treatment past a restriction or a missing consent: "
        "one requester, one patient (or study), a stated reason, until it expires. Every use is "
        "a disclosure in the ledger naming the grant; each grant waits for the DPO's review.",
        "bg_unreviewed": "{n} grants wait for the DPO's review.",
        "bg_requester": "Requester",
        "bg_expires": "Expires",
        "bg_review": "Review",
        "bg_reviewed": "Reviewed",
        "bg_not_reviewed": "not reviewed",
        "bg_open": "Open a grant on a clinician's behalf",
        "bg_minutes": "Minutes",
        "bg_running": "running",
        "bg_over": "over",
    },
    "ko": {
        "nav_break_glass": "긴급 접근(Break-glass)",
        "bg_intro": "진료를 위한 긴급 접근: 처리 정지나 동의 부재를 넘어서는 접근입니다. 요청자 "
        "한 명, 환자(또는 검사) 하나, 명시한 사유, 만료 시각까지. 모든 사용은 원장에 해당 허가를 "
        "명시한 제공 기록으로 남고, 각 허가는 DPO의 검토를 기다립니다.",
        "bg_unreviewed": "DPO 검토를 기다리는 허가 {n}건",
        "bg_requester": "요청자",
        "bg_expires": "만료",
        "bg_review": "검토",
        "bg_reviewed": "검토됨",
        "bg_not_reviewed": "검토 전",
        "bg_open": "의료진을 대신해 허가 열기",
        "bg_minutes": "분",
        "bg_running": "유효",
        "bg_over": "종료",
    },
}


def service() -> BreakGlass:
    return current_app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]


def _grant_json(grant: Any) -> dict[str, Any]:
    return {
        "ref": grant.ref,
        "id": grant.id,
        "requester": grant.requester,
        "patient_id": grant.patient_id,
        "issuer": grant.issuer,
        "study_instance_uid": grant.study_instance_uid,
        "reason": grant.reason,
        "granted_at": grant.granted_at.isoformat(),
        "expires_at": grant.expires_at.isoformat(),
        "ended_at": grant.ended_at.isoformat() if grant.ended_at else None,
    }


def _minutes(value: object) -> int:
    if value in (None, ""):
        return 60
    try:
        return int(str(value))
    except ValueError:
        raise InvalidInput("minutes must be a whole number") from None


def break_glass_api() -> Blueprint:
    """``/dicomweb/break-glass``: a clinician's own grants (their token's subject)."""
    bp = Blueprint("break_glass", __name__)
    require_token(bp, SCOPES)

    @bp.post("")
    def open_grant() -> tuple[Any, int]:
        if (request.content_length or 0) > MAX_BODY:
            raise InvalidInput("the request body is too large")
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise InvalidInput("the request body must be a JSON object")
        text = {k: str(data.get(k) or "") for k in ("patient_id", "reason", "issuer", "study")}
        grant = service().open(
            requester().caller,
            text["patient_id"],
            text["reason"],
            _minutes(data.get("minutes")),
            issuer=text["issuer"],
            study_uid=text["study"],
        )
        return jsonify(_grant_json(grant)), 201

    @bp.get("")
    def my_grants() -> Any:
        me = requester().caller
        return jsonify(
            [_grant_json(grant) for grant, _ in service().grants() if grant.requester == me]
        )

    @bp.post("/<int:grant_id>/end")
    def end_grant(grant_id: int) -> Any:
        grant, _ = service().store.get(grant_id)
        if grant.requester != requester().caller:
            raise InvalidInput("only the grant's requester ends it here")
        return jsonify(_grant_json(service().end(grant_id, requester().caller)))

    return bp


def install_break_glass(bp: Blueprint, app: Flask, node: Any, root: str) -> None:
    """The clinicians' API under `root` (the DICOMweb root) and the DPO's page on `bp`."""
    stewardship = node.stewardship
    app.extensions[EXTENSION_KEY] = BreakGlass(node.egress, lambda: stewardship.clock())
    app.register_blueprint(break_glass_api(), url_prefix=f"{root}/break-glass")

    @bp.get("/break-glass")
    def break_glass() -> Any:
        grants = service().grants()
        now = service().clock()
        return page(
            "break_glass.html",
            grants=grants,
            moment=now,
            unreviewed=sum(1 for _, review in grants if review["reviewed_at"] is None),
        )

    @bp.post("/break-glass")
    def break_glass_open() -> Any:
        if not user().is_dpo:
            return page("problem.html", 403, message=LABELS["en"]["bg_open"] + ": DPO only")
        form = request.form
        service().open(
            form.get("requester", ""),
            form.get("patient_id", ""),
            form.get("reason", "") + f" (opened by dpo:{user().name})",
            _minutes(form.get("minutes")),
            issuer=form.get("issuer", ""),
            study_uid=form.get("study", ""),
        )
        return redirect(url_for("dpo.break_glass"), 303)

    @bp.post("/break-glass/<int:grant_id>/review")
    def break_glass_review(grant_id: int) -> Any:
        service().review(
            grant_id, f"dpo:{user().name}", request.form.get("note", ""), user().is_dpo
        )
        return redirect(url_for("dpo.break_glass"), 303)
