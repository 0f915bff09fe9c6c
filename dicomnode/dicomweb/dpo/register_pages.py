"""The overview and governance's registers: consent, legal holds, restrictions, destruction
records and pending work."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Blueprint, request

from dicomnode.core.ledger import LedgerFilter
from dicomnode.core.model import LedgerKind
from dicomnode.dicomweb.access import services
from dicomnode.dicomweb.dpo.views import (
    PER_PAGE,
    day,
    now,
    number,
    page,
    views,
)


def _overview_route(bp: Blueprint) -> None:
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
            date_from=day("date_from"),
            date_to=day("date_to"),
            patient_id=request.args.get("patient_id", "").strip(),
        )
        found = views().ledger_page(f, number("page", 1, 1, 10**9), PER_PAGE)
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


def install(bp: Blueprint) -> None:
    """Add this group's pages to the DPO blueprint."""
    _overview_route(bp)
    _register_routes(bp)
