"""The DPO's page of automated decisions (PIPA 37-2): each AI output type with the criteria
and procedure the node discloses for it (the same list as the public ``/automated-decisions``),
and the refusal and explanation requests flagging AI outputs, each with its ticket, its
reviewer and whether it still holds the patient's analysis. Requests are opened and closed as
tickets (the ticket pages); this page only reads."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from dicomnode.dicomweb.access import services
from dicomnode.dicomweb.dpo.casework_views import casework
from dicomnode.dicomweb.dpo.views import page


def install_automated_decision_routes(bp: Blueprint) -> None:
    """Add ``/governance/automated-decisions`` to the DPO blueprint."""

    @bp.get("/automated-decisions")
    def automated_decisions() -> Any:
        return page(
            "automated_decisions.html",
            outputs=services().automated_decisions,
            flags=casework().decision_flags(),
        )
