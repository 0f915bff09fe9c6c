"""Share links on the web: the holder of a link reads the study's instance list and each
instance (``/share/<token>/studies/<study>``, no account: the link is the capability; governance
still decides each retrieval for the link's recipient); the DPO creates links (the token is
shown once), sees when each was last used, and revokes them (``/governance/share-links``)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request, stream_with_context

from dicomnode.dicomweb.dpo.views import page, user
from dicomnode.egress.share_links import ShareLinks

EXTENSION_KEY = "dicomnode_share_links"
CHUNK = 1 << 16

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "nav_share_links": "Share links",
        "sl_intro": "Links for a second opinion: one study, one recipient of the policy, until "
        "they expire or are revoked. Only a hash of each link is kept; every use is a "
        "disclosure decided by the policy and recorded in the ledger.",
        "sl_new": "New link (shown once, copy it now)",
        "sl_create": "Create a link",
        "sl_recipient": "Recipient",
        "sl_days": "Days",
        "sl_last_used": "Last used",
        "sl_uses": "Uses",
        "sl_revoke": "Revoke",
        "sl_revoked": "revoked",
        "sl_expired": "expired",
    },
    "ko": {
        "nav_share_links": "공유 링크",
        "sl_intro": "2차 소견을 위한 링크: 검사 하나, 정책의 수령자 한 곳, 만료되거나 철회될 "
        "때까지. 링크는 해시만 보관하며, 모든 사용은 정책이 결정하는 제공으로 원장에 기록됩니다.",
        "sl_new": "새 링크(한 번만 표시됩니다. 지금 복사하세요)",
        "sl_create": "링크 만들기",
        "sl_recipient": "수령자",
        "sl_days": "일",
        "sl_last_used": "마지막 사용",
        "sl_uses": "사용 횟수",
        "sl_revoke": "철회",
        "sl_revoked": "철회됨",
        "sl_expired": "만료됨",
    },
}


def service() -> ShareLinks:
    return current_app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]


def share_blueprint() -> Blueprint:
    """``/share``: what a link's holder may read."""
    bp = Blueprint("share", __name__)

    @bp.after_request
    def private(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"  # the token is in the path
        return response

    @bp.get("/<token>/studies/<study>")
    def study(token: str, study: str) -> Any:
        found = service().open(token, study, address=request.remote_addr or "")
        base = f"{request.script_root}/share/{token}/studies/{study}/instances"
        return jsonify(
            [
                {
                    "SOPInstanceUID": i.sop_instance_uid,
                    "SeriesInstanceUID": i.series_instance_uid,
                    "url": f"{base}/{i.sop_instance_uid}",
                }
                for i in found
            ]
        )

    @bp.get("/<token>/studies/<study>/instances/<sop>")
    def instance(token: str, study: str, sop: str) -> Response:
        (item,) = service().open(token, study, sop, request.remote_addr or "") or [None]
        if item is None:
            return Response("no such instance\n", 404, mimetype="text/plain")
        egress = service().egress

        def chunks() -> Any:
            with egress.open_blob(item) as stream:
                while block := stream.read(CHUNK):
                    yield block

        return Response(stream_with_context(chunks()), mimetype="application/dicom")

    return bp


def install_share_links(bp: Blueprint, app: Flask, node: Any) -> None:
    """The holders' ``/share`` and the DPO's page on `bp`."""
    stewardship = node.stewardship
    app.extensions[EXTENSION_KEY] = ShareLinks(node.egress, lambda: stewardship.clock())
    app.register_blueprint(share_blueprint(), url_prefix="/share")

    def listing(new: str = "") -> Any:
        return page("share_links.html", links=service().links(), moment=service().clock(), new=new)

    @bp.get("/share-links")
    def share_links() -> Any:
        return listing()

    @bp.post("/share-links")
    def share_link_create() -> Any:
        if not user().is_dpo:
            return page("problem.html", 403, message="DPO only")
        form = request.form
        days = form.get("days", "7").strip()
        token, link = service().create(
            form.get("study", ""),
            form.get("recipient", ""),
            f"dpo:{user().name}",
            int(days) if days.isdigit() else 0,
        )
        new = f"{request.host_url.rstrip('/')}/share/{token}/studies/{link.study_instance_uid}"
        return listing(new)

    @bp.post("/share-links/<int:link_id>/revoke")
    def share_link_revoke(link_id: int) -> Any:
        if not user().is_dpo:
            return page("problem.html", 403, message="DPO only")
        service().revoke(link_id, f"dpo:{user().name}")
        return listing()
