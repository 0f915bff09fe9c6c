"""Oversight on the DPO pages (issue 21): four-eyes approvals, break-glass grants and share
links, installed on the DPO blueprint with one call, with their labels in English and Korean
looked up before the pages' shared catalogue."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, g

from dicomnode.dicomweb.dpo import (
    approvals_views,
    break_glass_views,
    pseudonymised_views,
    recipient_views,
    share_link_views,
)
from dicomnode.dicomweb.dpo.approvals_views import install_approval_routes, label
from dicomnode.dicomweb.dpo.break_glass_views import install_break_glass
from dicomnode.dicomweb.dpo.pseudonymised_views import install_pseudonymised
from dicomnode.dicomweb.dpo.recipient_views import install_recipients
from dicomnode.dicomweb.dpo.share_link_views import install_share_links

DICOMWEB_ROOT = "/dicomweb"


def install_oversight(bp: Blueprint, app: Flask, node: Any) -> None:
    """Add the oversight pages to the DPO blueprint `bp` of `app` (and the clinicians'
    break-glass API under the DICOMweb root), over `node`'s services."""
    for labels in (
        break_glass_views.LABELS,
        share_link_views.LABELS,
        recipient_views.LABELS,
        pseudonymised_views.LABELS,
    ):
        if labels not in approvals_views.CATALOGUES:
            approvals_views.CATALOGUES.append(labels)

    @bp.context_processor
    def oversight_labels() -> dict[str, Any]:
        lang = g.get("lang", "en")
        return {"t": lambda key, **kw: label(lang, key, **kw)}

    install_approval_routes(bp, app, node)
    install_break_glass(bp, app, node, DICOMWEB_ROOT)
    install_share_links(bp, app, node)
    install_recipients(bp, app, node)
    install_pseudonymised(bp, app, node)
