"""The four-eyes pages (checklist item 44): pending requests, who asked, who decided; asking
for a change (erasure, hold release, release of held objects, a policy publication) as the
signed-in account; approving or rejecting another person's request; naming deputies.

They join the DPO blueprint (`install_approval_routes`), so its sign-in gate, CSRF check and
security headers apply. Deciding is open to a DPO or a named deputy (an auditor account can be
one); governance refuses a self-approval, and the page says so. Labels in English and Korean
(this module's own catalogue, looked up before the pages' shared one).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, current_app, g, has_request_context, redirect, request, url_for

from dicomnode.core.errors import NotPermitted
from dicomnode.dicomweb.access import services
from dicomnode.dicomweb.dpo import i18n
from dicomnode.dicomweb.dpo.views import page, problem, user
from dicomnode.governance import approvals as rules
from dicomnode.oversight.approvals import ApprovalPending, Approvals, acting_as, identity_sources

EXTENSION_KEY = "dicomnode_approvals"

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "nav_approvals": "Four-eyes approvals",
        "nav_approval": "Four-eyes request",
        "four_eyes_on": "Four-eyes is in force: these changes wait for a second person (a DPO "
        "or a named deputy): {actions}. A narrowing policy publication needs none.",
        "four_eyes_off": "Four-eyes is not in force: name a deputy to switch it on.",
        "pending_requests": "Pending requests",
        "decided_requests": "Decided requests",
        "requested_by": "Requested by",
        "requested_at": "Requested at",
        "decided_by": "Decided by",
        "action": "Action",
        "summary": "What",
        "approve": "Approve and carry out",
        "reject": "Reject",
        "note": "Note",
        "deputies": "Deputies",
        "name_deputy": "Name a deputy",
        "remove_deputy": "Remove",
        "deputy_name": "Account name",
        "ask": "Ask for a change",
        "ask_note": "Without four-eyes the change is made at once; with it, it waits for a "
        "second person.",
        "patient": "Patient ID",
        "issuer": "Issuer of Patient ID",
        "hold_id": "Legal hold number",
        "study": "Study Instance UID",
        "policy_source": "Policy (TOML)",
        "reason": "Reason",
        "outcome": "Outcome",
        "done_now": "Done at once (no second person needed): {what}",
        "own_request": "This is your own request: a second person decides it.",
        "own_request_refused": "Refused: nobody approves or rejects their own request. A second "
        "person (a DPO or a named deputy) must decide it.",
        "state_pending": "pending",
        "state_approved": "approved and carried out",
        "state_rejected": "rejected",
        "state_failed": "approved, but it failed",
        "action_publish-policy": "publish a policy version that widens processing",
        "action_erase": "erase a patient's data",
        "action_delete": "delete (DICOMweb DELETE)",
        "action_release-hold": "release a legal hold",
        "action_release-held": "release objects held at intake",
        "action_remove-deputy": "remove a deputy",
    },
    "ko": {
        "nav_approvals": "이중 승인",
        "nav_approval": "이중 승인 요청",
        "four_eyes_on": "이중 승인이 적용 중입니다. 다음 변경은 두 번째 사람(DPO 또는 지정된 "
        "대리인)의 승인을 기다립니다: {actions}. 처리 범위를 좁히는 정책 공표는 승인이 필요 "
        "없습니다.",
        "four_eyes_off": "이중 승인이 적용되지 않습니다. 대리인을 지정하면 적용됩니다.",
        "pending_requests": "승인 대기 요청",
        "decided_requests": "결정된 요청",
        "requested_by": "요청자",
        "requested_at": "요청 시각",
        "decided_by": "결정자",
        "action": "작업",
        "summary": "내용",
        "approve": "승인하고 실행",
        "reject": "거부",
        "note": "메모",
        "deputies": "대리인",
        "name_deputy": "대리인 지정",
        "remove_deputy": "해제",
        "deputy_name": "계정 이름",
        "ask": "변경 요청",
        "ask_note": "이중 승인이 적용되지 않으면 바로 실행되고, 적용 중이면 두 번째 사람의 승인을 "
        "기다립니다.",
        "patient": "환자 ID",
        "issuer": "환자 ID 발급기관",
        "hold_id": "법적 보존 번호",
        "study": "검사 인스턴스 UID",
        "policy_source": "정책(TOML)",
        "reason": "사유",
        "outcome": "결과",
        "done_now": "바로 실행되었습니다(두 번째 사람 불필요): {what}",
        "own_request": "본인이 한 요청입니다. 두 번째 사람이 결정합니다.",
        "own_request_refused": "거부됨: 누구도 자신의 요청을 승인하거나 거부할 수 없습니다. 두 "
        "번째 사람(DPO 또는 지정된 대리인)이 결정해야 합니다.",
        "state_pending": "대기",
        "state_approved": "승인되어 실행됨",
        "state_rejected": "거부됨",
        "state_failed": "승인되었으나 실패",
        "action_publish-policy": "처리 범위를 넓히는 정책 공표",
        "action_erase": "환자 데이터 삭제(파기)",
        "action_delete": "삭제(DICOMweb DELETE)",
        "action_release-hold": "법적 보존 해제",
        "action_release-held": "접수 보류 객체 반입",
        "action_remove-deputy": "대리인 해제",
    },
}
CATALOGUES: list[dict[str, dict[str, str]]] = [LABELS]  # the oversight pages add theirs
ASKABLE = (rules.ERASE, rules.RELEASE_HOLD, rules.RELEASE_HELD, rules.PUBLISH_POLICY)


def label(lang: str, key: str, **values: Any) -> str:
    """`key` in `lang` from the oversight pages' catalogues, else the pages' shared one."""
    for labels in CATALOGUES:
        text = labels.get(lang, labels["en"]).get(key) or labels["en"].get(key)
        if text is not None:
            return text.format(**values) if values else text
    return i18n.translate(lang, key, **values)


def service() -> Approvals:
    return current_app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]


def who_is_asking() -> str | None:
    """The identity source of the HTTP entry points: the signed-in DPO pages' account, else
    the verified bearer token's subject (None outside a request or when nobody signed in)."""
    if not has_request_context():
        return None
    signed_in = g.get("user")
    if signed_in is not None and getattr(signed_in, "name", ""):
        return f"dpo:{signed_in.name}"
    principal = g.get("principal")
    if principal is not None and getattr(principal, "subject", ""):
        return f"token:{principal.subject}"
    return None


def _actor() -> str:
    return f"dpo:{user().name}"


def _form(name: str) -> str:
    return request.form.get(name, "").strip()


def _ask(action: str) -> str:
    """Do `action` from the form as the signed-in account; what was done (ApprovalPending
    when it waits for a second person)."""
    node, by = services(), _actor()
    if action == rules.ERASE:
        outcome = node.stewardship.erase_subject(
            _form("patient_id"), by, issuer=_form("issuer") or None
        )
        return outcome.reason
    if action == rules.RELEASE_HOLD:
        hold_id = _form("hold_id")
        if not hold_id.isdigit():
            return label(g.get("lang", "en"), "hold_id") + "?"
        return node.stewardship.release_hold(int(hold_id), by).ref
    if action == rules.RELEASE_HELD:
        return f"{len(node.intake.release_held(_form('study'), by))} released"
    published, _ = node.stewardship.publish_policy(
        request.form.get("policy_source", ""), by, _form("reason")
    )
    return f"{published.version} in force from {published.effective_at.isoformat()}"


def install_approval_routes(bp: Blueprint, app: Flask, node: Any) -> None:
    """Add the four-eyes pages to the DPO blueprint of `app`, over `node`'s stewardship and
    intake, and let the gates know who is asking on this app's requests."""
    app.extensions[EXTENSION_KEY] = Approvals(node.stewardship, node.intake)
    if who_is_asking not in identity_sources:
        identity_sources.append(who_is_asking)

    @bp.get("/approvals")
    def approvals() -> Any:
        work = service()
        return page(
            "approvals.html",
            in_force=work.in_force(),
            pending=work.requests("pending"),
            decided=[r for r in work.requests() if r.state != "pending"][:100],
            deputies=work.deputies(),
            askable=ASKABLE,
            gated=[
                label(g.get("lang", "en"), f"action_{a}")
                for a in rules.ACTIONS
                if a != rules.REMOVE_DEPUTY
            ],
            done=request.args.get("done", ""),
        )

    @bp.get("/approvals/<int:request_id>")
    def approval(request_id: int) -> Any:
        found = service().request(request_id)
        own = rules.person(found.requested_by) == rules.person(_actor())
        return page("approval.html", r=found, own=own)

    @bp.post("/approvals/ask")
    def approval_ask() -> Any:
        action = _form("action")
        if action not in ASKABLE:
            return problem(400, "error_detail", detail=f"no action {action!r}")
        try:
            with acting_as(_actor()):
                what = _ask(action)
        except ApprovalPending as pending:
            return redirect(url_for("dpo.approval", request_id=pending.request.id), 303)
        return redirect(url_for("dpo.approvals", done=what), 303)

    @bp.post("/approvals/<int:request_id>/<decision>")
    def approval_decide(request_id: int, decision: str) -> Any:
        work, me = service(), user()
        decide = {"approve": work.approve, "reject": work.reject}.get(decision)
        if decide is None:
            return problem(404, "error_detail", detail=f"no decision {decision!r}")
        try:
            with acting_as(_actor()):
                decide(request_id, _actor(), me.is_dpo, _form("note"))
        except NotPermitted as refused:
            own = rules.person(work.request(request_id).requested_by) == rules.person(_actor())
            lang = g.get("lang", "en")
            message = label(lang, "own_request_refused") if own else str(refused)
            return page("problem.html", 403, message=message)
        return redirect(url_for("dpo.approval", request_id=request_id), 303)

    @bp.post("/approvals/deputies")
    def deputy_name() -> Any:
        service().name_deputy(_form("name"), _actor(), user().is_dpo)
        return redirect(url_for("dpo.approvals"), 303)

    @bp.post("/approvals/deputies/remove")
    def deputy_remove() -> Any:
        try:
            service().remove_deputy(_form("name"), _actor(), user().is_dpo)
        except ApprovalPending as pending:
            return redirect(url_for("dpo.approval", request_id=pending.request.id), 303)
        return redirect(url_for("dpo.approvals"), 303)
