"""The recipients' copies page (item 29): each copy a recipient holds with the retention it
promised and its state (overdue ones flagged), destruction confirmations the DPO records, and
the notices erasures and withdrawals owe to recipients holding copies."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, current_app, redirect, request, url_for

from dicomnode.core.times import parse_moment
from dicomnode.dicomweb.dpo.views import page, user
from dicomnode.oversight.recipients import RecipientCopies

EXTENSION_KEY = "dicomnode_recipient_copies"

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "nav_recipients": "Recipients' copies",
        "rc_overdue": "{n} copies are past the retention their recipient promised, with no "
        "destruction confirmed.",
        "rc_copies": "Copies held by recipients",
        "rc_last": "Last received",
        "rc_promised": "Promised retention",
        "rc_due": "Destroy by",
        "rc_state_confirmed": "destruction confirmed",
        "rc_state_kept": "kept (not due)",
        "rc_state_overdue": "OVERDUE",
        "rc_state_no-promise": "no retention promised",
        "rc_confirm": "Record a destruction confirmation",
        "rc_confirmed_at": "Destroyed at (UTC)",
        "rc_evidence": "Evidence",
        "rc_notices": "Notices owed to recipients (erasure, withdrawal)",
        "rc_sent": "Mark sent",
    },
    "ko": {
        "nav_recipients": "수령자 사본",
        "rc_overdue": "수령자가 약속한 보유 기간이 지났으나 파기 확인이 없는 사본 {n}건",
        "rc_copies": "수령자가 보유한 사본",
        "rc_last": "마지막 수령",
        "rc_promised": "약속한 보유 기간",
        "rc_due": "파기 기한",
        "rc_state_confirmed": "파기 확인됨",
        "rc_state_kept": "보유(기한 전)",
        "rc_state_overdue": "기한 초과",
        "rc_state_no-promise": "보유 기간 약속 없음",
        "rc_confirm": "파기 확인 기록",
        "rc_confirmed_at": "파기 시각(UTC)",
        "rc_evidence": "증빙",
        "rc_notices": "수령자에게 보낼 통지(삭제, 동의 철회)",
        "rc_sent": "발송 처리",
    },
}


def service() -> RecipientCopies:
    return current_app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]


def install_recipients(bp: Blueprint, app: Flask, node: Any) -> None:
    app.extensions[EXTENSION_KEY] = RecipientCopies(node.stewardship)

    @bp.get("/recipients")
    def recipients() -> Any:
        copies = service().status()
        return page(
            "recipients.html",
            copies=copies,
            overdue=sum(1 for c in copies if c.state == "overdue"),
            notices=service().notices(),
        )

    @bp.post("/recipients/confirm")
    def recipients_confirm() -> Any:
        if not user().is_dpo:
            return page("problem.html", 403, message="DPO only")
        at = request.form.get("confirmed_at", "").strip()
        service().confirm(
            request.form.get("recipient", ""),
            request.form.get("study", ""),
            parse_moment(at) if at else None,
            request.form.get("evidence", "").strip()[:2000],
            f"dpo:{user().name}",
        )
        return redirect(url_for("dpo.recipients"), 303)

    @bp.post("/recipients/notices/<int:notice_id>/sent")
    def recipients_notice_sent(notice_id: int) -> Any:
        if not user().is_dpo:
            return page("problem.html", 403, message="DPO only")
        service().notice_sent(notice_id, f"dpo:{user().name}")
        return redirect(url_for("dpo.recipients"), 303)
