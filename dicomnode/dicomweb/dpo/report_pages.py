"""Reports and exports: the per-patient accounting of disclosures, the record of processing
activities, retention compliance and the policy versions."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, request

from dicomnode.core.errors import InvalidInput
from dicomnode.core.ledger import LedgerFilter
from dicomnode.core.model import LedgerKind
from dicomnode.dicomweb.access import services
from dicomnode.dicomweb.dpo import records
from dicomnode.dicomweb.dpo.views import (
    day,
    download,
    log_used,
    now,
    page,
    views,
)

# --- exports and reports --------------------------------------------------------------------


def _accounting(patient_id: str) -> tuple[list[dict[str, Any]], Any]:
    f = LedgerFilter(
        kinds=(LedgerKind.DISCLOSURE.value,),
        date_from=day("date_from"),
        date_to=day("date_to"),
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
        return download(
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
        return download(
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


def install(bp: Blueprint) -> None:
    """Add this group's pages to the DPO blueprint."""
    _report_routes(bp)
