"""The disclosure views and their exports, one ledger entry, and the ledger's status: its
checkpoints, verifying the chain (recorded through stewardship) and signing a checkpoint."""

from __future__ import annotations

import json
import logging
from datetime import date
from typing import Any

from flask import Blueprint, Response, abort, g, redirect, request, url_for

from dicomnode.core.ledger import LedgerEntry, entry_hash
from dicomnode.core.ledger_events import without_linkage
from dicomnode.core.model import LedgerKind
from dicomnode.dicomweb.access import services
from dicomnode.dicomweb.dpo import i18n, records
from dicomnode.dicomweb.dpo.chart import disclosure_chart
from dicomnode.dicomweb.dpo.views import (
    CHECKPOINTS_SHOWN,
    MAX_PER_PAGE,
    OUTCOMES,
    PER_PAGE,
    disclosure_filter,
    download,
    json_array,
    log,
    log_used,
    now,
    number,
    page,
    user,
    views,
)
from dicomnode.stewardship import checkpoint_signed_by

# --- disclosures ----------------------------------------------------------------------------


def _disclosure_routes(bp: Blueprint) -> None:
    @bp.get("/disclosures")
    def disclosures() -> Any:
        f = disclosure_filter()
        shown = number("page", 1, 1, 10**9)
        per_page = number("per_page", PER_PAGE, 1, MAX_PER_PAGE)
        found = views().ledger_page(f, shown, per_page)
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
        return download(
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
        return download(
            json_array(head, "entries", (records.entry_json(e) for e in views().ledger_iter(f))),
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
            raw=_raw(found),
            head=views().head(),
            hash_ok=recomputed == found.hash,
            link_ok=(previous.hash if previous else "0" * 64) == found.prev_hash,
            covering=covering,
        )


def _raw(entry: LedgerEntry) -> str:
    """The detail as hashed, unless it holds the linkage keys: then without them (the page
    still checks the hash over the whole entry)."""
    detail, left_out = without_linkage(entry.data)
    if not left_out:
        return entry.detail
    shown = json.dumps(detail, ensure_ascii=False, sort_keys=True)
    return f"{shown}\n(left out: {', '.join(left_out)}: re-identification linkage, PIPA 28-4)"


def _detail_rows(entry: LedgerEntry) -> list[tuple[str, str]]:
    detail, left_out = without_linkage(entry.data)  # PIPA 28-4(1): no pseudonyms shown
    rows = [(key, "(left out: re-identification linkage, PIPA 28-4)") for key in left_out]
    for key, value in sorted(detail.items()):
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


def install(bp: Blueprint) -> None:
    """Add this group's pages to the DPO blueprint."""
    _disclosure_routes(bp)
    _ledger_routes(bp)
