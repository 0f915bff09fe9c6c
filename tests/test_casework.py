"""The DPO's casework: the breach register (checklist item 38), the monthly access review (item
24) and data-subject request tickets (item 37). The rules are tested as functions of (facts,
now); the node's records through the `dicomnode breach|review|ticket` commands a DPO runs, with
real DICOMweb clients making the history the review reports."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import requests
from sqlalchemy import func, select

from dicomnode.archive import schema
from dicomnode.archive.accounts import AccountStore
from dicomnode.core.model import Level
from dicomnode.governance import casework as rules
from tests.conftest import WORKSTATION, cli, dicomweb_client, dicomweb_url
from tests.test_dpo_pages import PASSWORD, STUDY_1, STUDY_2, browser, signed_in
from tests.test_dpo_pages import RETENTION as TEN_YEARS
from tests.test_governance_node import (
    as_file,
    c_find,
    policy_text,
    publish_days_ago,
    research_pacs,
    wado,
)
from tests.test_retention import RETENTION, store

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


# --- the rules (pure) ---------------------------------------------------------------------------


def leak(**changes) -> rules.BreachFacts:
    facts = dict(
        aware_at=T0,
        what="a laptop with exported studies was stolen",
        occurred_at=T0 - timedelta(hours=20),
        how="stolen from a car",
        subjects=1200,
        records=5400,
        categories=("images", "demographics"),
        emr_linked=True,
        gdpr=True,
        consequences="identification of patients and their diagnoses",
        measures="the laptop's account was revoked; police informed",
        subject_actions="be wary of calls claiming to be from the hospital",
        remedy="claims through the privacy office",
        contact="Privacy office, 02-123-4567, privacy@hospital.example",
    )
    return rules.BreachFacts(**(facts | changes))


def test_breach_deadlines_start_when_the_hospital_became_aware_and_count_down():
    facts = leak()
    deadlines = {d.duty: d for d in rules.breach_deadlines(facts)}
    assert set(deadlines) == {"subjects", "pipc", "supervisory-authority", "mohw"}
    for duty in ("subjects", "pipc", "supervisory-authority"):
        assert deadlines[duty].due_at == T0 + timedelta(hours=72)
    assert deadlines["supervisory-authority"].law == "GDPR 33(1)"
    assert deadlines["mohw"].immediately and deadlines["mohw"].law == "MSA 23-3"

    ten_hours_in = T0 + timedelta(hours=10)
    gdpr = deadlines["supervisory-authority"]
    assert gdpr.seconds_left(ten_hours_in) == 62 * 3600
    assert gdpr.status(ten_hours_in) == "due"
    assert gdpr.status(T0 + timedelta(hours=73)) == "overdue"
    assert gdpr.as_dict(T0 + timedelta(hours=80))["seconds_left"] == -8 * 3600

    notified = [{"to": "supervisory-authority", "at": (T0 + timedelta(hours=30)).isoformat()}]
    (met,) = [
        d for d in rules.breach_deadlines(facts, notified) if d.duty == "supervisory-authority"
    ]
    assert met.status(T0 + timedelta(hours=100)) == "done"
    late = [{"to": "subjects", "at": (T0 + timedelta(hours=75)).isoformat()}]
    (subjects,) = [d for d in rules.breach_deadlines(facts, late) if d.duty == "subjects"]
    assert subjects.status(T0 + timedelta(hours=100)) == "late"


def test_the_pipc_report_follows_decree_40_and_its_proviso():
    small = leak(subjects=3, categories=("demographics",), external_access=False)
    assert rules.pipc_report_reasons(small) == ()
    assert "pipc" not in {d.duty for d in rules.breach_deadlines(small)}
    many = leak(subjects=1000, categories=("demographics",), external_access=False)
    assert rules.pipc_report_reasons(many) == ("1000 data subjects (1,000 or more: Decree 40(1)1)",)
    hacked = leak(subjects=3, categories=("demographics",), external_access=True)
    assert rules.pipc_report_reasons(hacked) == ("unlawful access from outside (Decree 40(1)3)",)
    images = leak(subjects=3, categories=("images",))
    assert "sensitive" in rules.pipc_report_reasons(images)[0]  # health data: PIPA 23
    assert rules.pipc_report_reasons(leak(harm_contained=True)) == ()
    assert "supervisory-authority" not in {d.duty for d in rules.breach_deadlines(leak(gdpr=False))}
    assert "mohw" not in {d.duty for d in rules.breach_deadlines(leak(emr_linked=False))}


def test_drafts_carry_the_pipa_34_1_items_and_the_gdpr_33_3_items():
    facts = leak()
    drafts = rules.breach_drafts(facts, T0 + timedelta(hours=10))
    assert set(drafts) == {"pipa_notice_ko", "pipa_notice_en", "gdpr_notification", "mohw_report"}
    ko = drafts["pipa_notice_ko"]
    assert ko["items"] == "유출된 개인정보의 항목: images, demographics"
    assert "2026-11-01 13:00 UTC" in ko["when_how"] and "stolen from a car" in ko["when_how"]
    assert facts.subject_actions in ko["subject_actions"]
    assert facts.measures in ko["controller_measures"] and facts.remedy in ko["controller_measures"]
    assert facts.contact in ko["contact"]
    assert all(ko[k] in ko["text"] for k in ("items", "when_how", "subject_actions", "contact"))
    gdpr = drafts["gdpr_notification"]
    assert "1200" in gdpr["nature"] and "5400" in gdpr["nature"] and "images" in gdpr["nature"]
    assert gdpr["contact"].endswith(facts.contact)
    assert facts.consequences in gdpr["consequences"] and facts.measures in gdpr["measures"]
    assert "delay" not in gdpr
    late = rules.breach_drafts(facts, T0 + timedelta(hours=73))["gdpr_notification"]
    assert "Reasons for the delay" in late["delay"]
    assert "의료법 제23조의3" in drafts["mohw_report"]["text"]
    unknown = rules.draft_pipa_notice(leak(subject_actions="", occurred_at=None), "en")
    assert "(to be completed)" in unknown["subject_actions"]
    assert "being established" in unknown["when_how"]


def test_requests_are_due_in_10_days_under_pipa_and_one_month_under_gdpr():
    received = datetime(2027, 1, 31, 10, 0, tzinfo=UTC)
    assert rules.ticket_due(received, ("pipa",)) == received + timedelta(days=10)
    assert rules.ticket_due(received, ("gdpr",)) == datetime(2027, 2, 28, 10, 0, tzinfo=UTC)
    assert rules.ticket_due(received, ("gdpr", "pipa")) == received + timedelta(days=10)
    with pytest.raises(ValueError):
        rules.ticket_due(received, ())
    assert rules.extended_due(received, ("gdpr",), datetime(2027, 4, 30, tzinfo=UTC))
    with pytest.raises(ValueError, match="two further months"):
        rules.extended_due(received, ("gdpr",), datetime(2027, 5, 31, 11, 0, tzinfo=UTC))
    with pytest.raises(ValueError, match="after the current deadline"):
        rules.extended_due(received, ("pipa",), received + timedelta(days=5))
    due = rules.ticket_due(received, ("pipa",))
    assert not rules.ticket_overdue("open", due, due)
    assert rules.ticket_overdue("open", due, due + timedelta(seconds=1))
    assert not rules.ticket_overdue("refused", due, due + timedelta(days=9))


def test_deletion_exemptions_are_coded_by_law():
    now = T0
    kept = [
        rules.KeptItem("1.2.3", "legal-record", "MSA-22-2", now + timedelta(days=900)),
        rules.KeptItem("1.2.4", "images", "", now + timedelta(days=9)),  # no law: may go
        rules.KeptItem("1.2.5", "legal-record", "MSA-22-2", now - timedelta(days=1)),  # over
    ]
    codes = rules.deletion_exemptions(kept, [], ("pipa",), now)
    assert [(e.code, "1.2.3" in e.reason, "MSA-22-2" in e.reason) for e in codes] == [
        ("PIPA-36-1-proviso", True, True)
    ]
    both = rules.deletion_exemptions(kept, ["hold-1"], ("gdpr", "pipa"), now, pseudonymised=True)
    assert [e.code for e in both] == [
        "PIPA-36-1-proviso",
        "GDPR-17-3-b",
        "GDPR-17-3-e",
        "PIPA-28-7",
    ]
    assert rules.deletion_exemptions(kept[1:], [], ("pipa",), now) == []
    notice = rules.refusal_notice("deletion", "P6", codes, "ko")
    assert "삭제 요구를" in notice and "[PIPA-36-1-proviso]" in notice and "182" in notice


def test_the_review_reports_retrievals_bulk_off_hours_failures_and_denials():
    seoul = rules.ReviewSettings(
        zone=ZoneInfo("Asia/Seoul"), day_starts=8, day_ends=19, bulk_instances=100
    )

    def entry(seq, at, kind, actor, operation, items, **detail):
        detail = {"operation": operation, "items": items, "patient_ids": ["P1"]} | detail
        return {
            "seq": seq,
            "recorded_at": at,
            "kind": kind,
            "actor": actor,
            "outcome": "x",
            "detail": detail,
        }

    entries = [
        entry(1, "2026-11-03T01:00:00+00:00", "disclosure", "ohif", "wado", 12),  # 10:00 KST
        entry(2, "2026-11-03T14:30:00+00:00", "disclosure", "ohif", "wado", 300),  # 23:30 KST
        entry(3, "2026-11-04T02:00:00+00:00", "disclosure", "pacs", "find", 0),
        entry(4, "2026-11-05T03:00:00+00:00", "denial", "lab", "wado", 0, reason="no consent"),
        entry(5, "2026-10-31T14:59:59+00:00", "disclosure", "ohif", "wado", 1),  # Oct in Seoul
        entry(6, "2026-11-07T02:00:00+00:00", "disclosure", "ohif", "move", 5),  # Saturday
    ]
    failures = [
        {
            "at": "2026-11-03T05:00:00+00:00",
            "kind": "bearer-token",
            "address": "10.0.0.9",
            "count": 7,
        }
    ]
    report = rules.review_report("2026-11", entries, failures, seoul)
    assert report["from"] == "2026-10-31T15:00:00+00:00"
    assert report["requesters"] == [
        {"requester": "lab", "retrievals": 0, "instances": 0, "queries": 0, "denials": 1},
        {"requester": "ohif", "retrievals": 3, "instances": 317, "queries": 0, "denials": 0},
        {"requester": "pacs", "retrievals": 0, "instances": 0, "queries": 1, "denials": 0},
    ]
    assert [b["seq"] for b in report["bulk"]] == [2]
    assert [o["seq"] for o in report["off_hours"]] == [2, 6]
    assert report["failed_authentication"] == [
        {"kind": "bearer-token", "address": "10.0.0.9", "count": 7}
    ]
    assert [(d["seq"], d["reason"]) for d in report["denials"]] == [(4, "no consent")]
    assert report["sha256"] == rules.report_hash(report)
    again = rules.review_report("2026-11", entries[:-1], failures, seoul)
    assert again["sha256"] != report["sha256"]
    rows = rules.review_rows(report)
    assert {r["section"] for r in rows} == {
        "requester",
        "bulk",
        "off_hours",
        "denials",
        "failed_authentication",
    }
    with pytest.raises(ValueError):
        rules.month_bounds("2026-13")


# --- the node: records, ledger entries and the CLI ---------------------------------------------


@pytest.fixture
def node(start_node):
    node = start_node(peers=[WORKSTATION], extra="[governance]\nretention_interval = 0")
    publish_days_ago(node, policy_text() + RETENTION)
    return node


def ledger(node, kind: str) -> list:
    return [e for e in node.archive.ledger.entries() if e.kind == kind]


def test_item_38_a_simulated_incident_produces_drafts_and_a_timer(node):
    aware = datetime.now(UTC) - timedelta(hours=5)
    recorded = cli(
        node,
        "breach",
        "record",
        "--aware-at",
        aware.isoformat(),
        "--what",
        "PACS export share left open",
        "--how",
        "misconfigured file share",
        "--subjects",
        "40",
        "--category",
        "images",
        "--category",
        "demographics",
        "--patient",
        "P1",
        "--external-access",
        "--emr-linked",
        "--gdpr",
        "--measures",
        "share closed",
        "--contact",
        "privacy@hospital.example",
        "--by",
        "dpo:kim",
    )
    assert recorded.returncode == 0, recorded.stderr
    assert "breach-1 recorded" in recorded.stdout and "subjects: due" in recorded.stdout

    shown = cli(node, "breach", "show", "1")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    deadlines = {d["duty"]: d for d in view["deadlines"]}
    assert set(deadlines) == {"subjects", "pipc", "supervisory-authority", "mohw"}
    left = deadlines["supervisory-authority"]["seconds_left"]
    assert 66 * 3600 <= left <= 67 * 3600  # the timer: 72 h from aware_at, 5 h gone
    assert deadlines["supervisory-authority"]["status"] == "due"
    assert deadlines["mohw"]["immediately"] and view["msa_report"] is True
    assert len(view["pipc_report"]) == 2  # sensitive (images), hacking
    assert (
        "유출된 개인정보의 항목: demographics, images" in view["drafts"]["pipa_notice_ko"]["text"]
    )
    assert "share closed" in view["drafts"]["gdpr_notification"]["measures"]
    (entry,) = ledger(node, "breach")
    assert (entry.actor, entry.outcome) == ("dpo:kim", "recorded")
    assert entry.data["patient_ids"] == ["P1"] and entry.data["emr_linked"] is True
    assert (
        entry.data["deadlines"]["supervisory-authority"]
        == (aware + timedelta(hours=72)).isoformat()
    )

    notified = cli(node, "breach", "notify", "1", "--to", "supervisory-authority", "--note", "form")
    assert notified.returncode == 0 and "state notified" in notified.stdout
    view = json.loads(cli(node, "breach", "show", "1").stdout)
    (gdpr,) = [d for d in view["deadlines"] if d["duty"] == "supervisory-authority"]
    assert gdpr["status"] == "done" and view["record"]["state"] == "notified"
    assert cli(node, "breach", "notify", "1", "--to", "press").returncode == 2
    closed = cli(node, "breach", "close", "1", "--reason", "all notified")
    assert closed.returncode == 0
    again = cli(node, "breach", "notify", "1", "--to", "subjects")
    assert again.returncode == 1 and "closed" in again.stderr
    assert [e.outcome for e in ledger(node, "breach")] == ["recorded", "notified", "closed"]

    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    bad = cli(node, "breach", "record", "--aware-at", future, "--what", "x")
    assert bad.returncode == 1 and "future" in bad.stderr
    assert len(node.casework.breaches()) == 1


def test_an_old_incident_is_overdue_until_notified(node):
    work = node.casework
    record = work.record_breach(
        "dpo:kim",
        datetime.now(UTC) - timedelta(hours=80),
        "misdirected CD",
        gdpr=True,
        categories=["images"],
    )
    view = work.breach_view(record)
    assert view["overdue"] and record.id in {b.id for b in work.overdue_breaches()}
    statuses = {d["duty"]: d["status"] for d in view["deadlines"]}
    assert statuses == {
        "subjects": "overdue",
        "pipc": "overdue",
        "supervisory-authority": "overdue",
    }
    assert "Reasons for the delay" in view["drafts"]["gdpr_notification"]["text"]
    for duty in ("subjects", "pipc", "supervisory-authority"):
        record = work.notify_breach(record.id, duty, "dpo:kim")
    assert not work.breach_view(record)["overdue"]
    assert {d["status"] for d in work.breach_view(record)["deadlines"]} == {"late"}


def test_item_37_a_deletion_under_statutory_retention_is_refused_with_coded_reason_and_notice(
    node,
):
    kept = store(node, "P6", Modality="MG", StudyDate=datetime.now(UTC).strftime("%Y%m%d"))
    opened = cli(
        node,
        "ticket",
        "open",
        "--kind",
        "deletion",
        "--patient-id",
        "P6",
        "--law",
        "pipa",
        "--law",
        "gdpr",
        "--details",
        "delete my mammogram",
        "--by",
        "dpo:kim",
    )
    assert opened.returncode == 0, opened.stderr
    ticket = node.casework.ticket(1)
    assert ticket.due_at == ticket.received_at + timedelta(days=10)  # PIPA's is the earlier

    refused = cli(node, "ticket", "carry-out", "1", "--by", "dpo:kim")
    assert refused.returncode == 1 and "ticket-1 refused" in refused.stdout, refused.stderr
    ticket = node.casework.ticket(1)
    assert ticket.state == "refused"
    assert [e["code"] for e in ticket.exemptions] == ["PIPA-36-1-proviso", "GDPR-17-3-b"]
    assert all(kept in e["reason"] and "MSA-22-2" in e["reason"] for e in ticket.exemptions)
    assert "삭제 요구를 다음 사유로 거절합니다" in ticket.outcome
    assert "[PIPA-36-1-proviso]" in ticket.outcome and "lodge a complaint" in ticket.outcome
    found = node.archive.find_instances_exactly(
        (("StudyInstanceUID", kept),), include_retained=True
    )
    assert len(found) == 2  # nothing was deleted: kept apart, in the retained store (item 33)
    assert all(i.blob_path.startswith("retained/") for i in found)
    # the erasure itself asked stewardship, which refused and recorded it
    assert [(e.outcome, e.actor) for e in ledger(node, "subject")] == [("refused", "dpo:kim")]
    assert [e.outcome for e in ledger(node, "ticket")] == ["opened", "refused"]
    assert ledger(node, "ticket")[-1].data["exemptions"][0]["code"] == "PIPA-36-1-proviso"
    shown = json.loads(cli(node, "ticket", "show", "1").stdout)
    assert shown["state"] == "refused" and shown["overdue"] is False
    assert cli(node, "ticket", "carry-out", "1").returncode == 1  # refused stays refused

    store(node, "P8")  # no law keeps this one
    other = node.casework.open_ticket("deletion", "P8", "dpo:kim")
    done = node.casework.carry_out(other.id, "dpo:kim")
    assert done.state == "done" and "erased 2 instances" in done.outcome
    assert node.archive.find_instances(Level.PATIENT, (("PatientID", "P8"),)) == []


def test_suspension_is_a_restriction_and_late_requests_are_flagged(node, tmp_path):
    store(node, "P9")
    access = node.casework.open_ticket("portability", "P9", "dpo:kim", regimes=("gdpr",))
    needs = cli(node, "ticket", "carry-out", str(access.id))
    assert needs.returncode == 1 and "output folder" in needs.stderr
    exported = cli(node, "ticket", "carry-out", str(access.id), "--output", str(tmp_path / "out"))
    assert exported.returncode == 0 and "2 DICOM files of 1 studies" in exported.stdout
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 2
    assert [(e.outcome, e.data.get("operation")) for e in ledger(node, "ticket")] == [
        ("opened", None),
        ("done", "export"),
    ]
    received = datetime.now(UTC) - timedelta(days=11)
    late = cli(
        node,
        "ticket",
        "open",
        "--kind",
        "suspension",
        "--patient-id",
        "P9",
        "--received-at",
        received.isoformat(),
    )
    assert late.returncode == 0, late.stderr
    listed = [
        json.loads(line) for line in cli(node, "ticket", "list", "--overdue").stdout.splitlines()
    ]
    assert [(t["ref"], t["overdue"]) for t in listed] == [("ticket-2", True)]
    ticket = node.casework.carry_out(2, "dpo:kim")
    assert ticket.state == "done" and "restricted" in ticket.outcome
    (restriction,) = node.archive.registry.restrictions("P9")
    assert restriction.lifted_at is None and "ticket-2" in restriction.reason
    assert node.casework.overdue_tickets() == []

    fixed = node.casework.open_ticket("correction", "P9", "dpo:kim", regimes=("gdpr",))
    with pytest.raises(Exception, match="correction is made in the record"):
        node.casework.carry_out(fixed.id, "dpo:kim")
    extended = cli(
        node,
        "ticket",
        "extend",
        str(fixed.id),
        "--until",
        (fixed.received_at + timedelta(days=60)).isoformat(),
        "--reason",
        "complex",
    )
    assert extended.returncode == 0, extended.stderr
    assert node.casework.ticket(fixed.id).state == "extended"
    too_far = cli(
        node,
        "ticket",
        "extend",
        str(fixed.id),
        "--until",
        (fixed.received_at + timedelta(days=100)).isoformat(),
        "--reason",
        "x",
    )
    assert too_far.returncode == 1 and "two further months" in too_far.stderr
    done = cli(node, "ticket", "done", str(fixed.id), "--note", "corrected in the EMR")
    assert done.returncode == 0 and node.casework.ticket(fixed.id).state == "done"


@pytest.fixture
def reviewed_node(start_node, storescp):
    node = start_node(
        peers=[WORKSTATION, research_pacs(storescp("RESEARCH").port)],
        extra='[dpo]\nreview_bulk_instances = 1\nreview_timezone = "Asia/Seoul"',
    )
    publish_days_ago(node, policy_text() + TEN_YEARS)
    from tests.factory import make_ct

    dicomweb_client(node).store_instances(
        [as_file(make_ct(patient_id=p, study_uid=s)) for p, s in (("P1", STUDY_1), ("P2", STUDY_2))]
    )
    AccountStore(node.archive.index).add("dpo1", PASSWORD, "dpo", "Kim Min-ji")
    return node


def test_item_24_the_report_is_generated_for_a_given_month_and_sign_off_is_a_dpo_review(
    reviewed_node,
):
    node = reviewed_node
    assert c_find(node, PatientID="P1")[0] == 0  # a query by the workstation
    assert wado(node, STUDY_1, subject="ohif").status_code == 200  # a retrieval (bulk: >= 1)
    assert wado(node, STUDY_2, subject="lab-client").status_code == 403  # a denial
    for _ in range(30):  # a forged token: refused with 401 and counted
        forged = requests.get(
            f"{dicomweb_url(node)}/studies", headers={"Authorization": "Bearer x.y.z"}, timeout=30
        )
        assert forged.status_code == 401
    assert requests.get(f"{dicomweb_url(node)}/studies", timeout=30).status_code == 401  # no token
    assert browser(node).sign_in("dpo1", "not the password").status_code == 401
    node.app.extensions["dicomnode_casework"].flush_auth_failures()  # written every 5 s
    with node.archive.index.read() as conn:  # one row per hour, kind and address
        assert conn.execute(select(func.count()).select_from(schema.auth_failures)).scalar() == 2
    month = datetime.now(ZoneInfo("Asia/Seoul")).strftime("%Y-%m")

    made = cli(node, "review", "report", "--month", month)
    assert made.returncode == 0, made.stderr
    report = json.loads(made.stdout)
    assert report["timezone"] == "Asia/Seoul"
    ohif = next(r for r in report["requesters"] if r["requester"] == "ohif")
    assert ohif["retrievals"] == 1 and ohif["instances"] == 1
    assert any(b["requester"] == "ohif" and b["operation"] == "wado" for b in report["bulk"])
    assert [d["requester"] for d in report["denials"]] == ["lab-client"]
    assert next(r for r in report["requesters"] if r["requester"] == "WORKSTATION")["queries"] == 1
    assert report["failed_authentication"] == [
        {"kind": "bearer-token", "address": "127.0.0.1", "count": 30},
        {"kind": "dpo-signin", "address": "127.0.0.1", "count": 1},
    ]
    as_csv = cli(node, "review", "report", "--month", month, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert {"requester", "bulk", "denials", "failed_authentication"} <= {r["section"] for r in rows}

    previous = (datetime.now(ZoneInfo("Asia/Seoul")).replace(day=1) - timedelta(days=1)).strftime(
        "%Y-%m"
    )
    empty = json.loads(cli(node, "review", "report", "--month", previous).stdout)
    assert empty["requesters"] == [] and empty["totals"]["failed_authentication"] == 0
    assert cli(node, "review", "report", "--month", "2999-01").returncode == 1

    stale = cli(node, "review", "sign", "--month", month, "--finding", "ok", "--sha256", "0" * 64)
    assert stale.returncode == 1 and "changed" in stale.stderr
    signed = cli(
        node,
        "review",
        "sign",
        "--month",
        month,
        "--finding",
        "no irregularities",
        "--follow-up",
        "ask ohif about the bulk retrieval",
        "--by",
        "dpo:kim",
        "--sha256",
        report["sha256"],
    )
    assert signed.returncode == 0, signed.stderr
    (entry,) = ledger(node, "dpo_review")
    assert (entry.actor, entry.outcome) == ("dpo:kim", "signed")
    assert entry.data["month"] == month and entry.data["report_sha256"] == report["sha256"]
    assert entry.data["finding"] == "no irregularities" and entry.data["totals"] == report["totals"]
    assert node.archive.ledger.verify().ok

    # the DPO pages show the same report and export it as JSON and CSV
    pages = signed_in(node)
    shown = pages.get(f"/governance/review?month={month}")
    assert shown.status_code == 200 and report["sha256"] in shown.text
    exported = pages.get(f"/governance/review.json?month={month}").json()
    assert exported["requesters"] == report["requesters"]
    assert pages.get(f"/governance/review.csv?month={month}").text.startswith("section,seq,at")
    # without ?month= the page shows the node's month in its time zone, not UTC's
    node.stewardship.clock = lambda: datetime(2026, 10, 31, 16, 0, tzinfo=UTC)  # 1 Nov in Seoul
    assert 'name="month" value="2026-11"' in pages.get("/governance/review").text


def test_the_pages_refuse_auditors_missing_csrf_and_bad_input_without_storing_anything(node):
    AccountStore(node.archive.index).add("dpo1", PASSWORD, "dpo")
    AccountStore(node.archive.index).add("aud1", PASSWORD, "auditor")
    form = {"aware_at": "2026-12-01T09:00", "what": "lost CD", "categories": "images"}
    auditor = signed_in(node, "aud1")
    assert auditor.get("/governance/breaches").status_code == 200
    refused = auditor.post(
        "/governance/breaches", data=form | {"csrf_token": auditor.csrf("/governance/breaches")}
    )
    assert refused.status_code == 403
    dpo = signed_in(node, "dpo1")
    assert dpo.post("/governance/breaches", data=form).status_code == 403  # no CSRF token
    token = dpo.csrf("/governance/breaches")
    for bad in (
        {"aware_at": "yesterday"},
        {"what": "x" * 30000},
        {"subjects": "many"},
        {"aware_at": (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")},
    ):
        answer = dpo.post("/governance/breaches", data=form | bad | {"csrf_token": token})
        assert answer.status_code == 400, (bad, answer.status_code)
    for path in ("/governance/breaches/7", "/governance/tickets/7"):
        assert dpo.get(path).status_code == 404
    ticket = {"kind": "deletion", "patient_id": "P" * 65, "law_pipa": "1", "csrf_token": token}
    assert dpo.post("/governance/tickets", data=ticket).status_code == 400
    assert dpo.post("/governance/tickets", data=ticket | {"kind": "erase"}).status_code == 400
    assert dpo.get("/governance/review?month=2026-13").status_code == 400
    assert node.casework.breaches() == [] and node.casework.tickets() == []
    assert [e for e in node.archive.ledger.entries() if e.kind in ("breach", "ticket")] == []

    made = dpo.post("/governance/breaches", data=form | {"csrf_token": token})
    assert made.status_code == 200 and made.url.endswith("/governance/breaches/1")
    assert "lost CD" in made.text


def test_failed_authentications_are_written_in_batches_with_bounded_memory(node):
    from dicomnode.casework import FailureCounts

    counts = FailureCounts(node.casework.store, window=3600, max_keys=2)
    now = datetime.now(UTC)
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.1"):
        counts.add("bearer-token", address, now)
    hour = now.replace(minute=0, second=0, microsecond=0)
    assert node.casework.store.auth_failures(hour, hour + timedelta(hours=1)) == []  # not yet
    counts.flush()
    written = node.casework.store.auth_failures(hour, hour + timedelta(hours=1))
    assert sorted((f["address"], f["count"]) for f in written) == [
        ("10.0.0.1", 2),
        ("10.0.0.2", 1),
        ("other", 2),
    ]
    counts.add("bearer-token", "10.0.0.1", now)
    counts.flush()
    written = node.casework.store.auth_failures(hour, hour + timedelta(hours=1))
    assert ("10.0.0.1", 3) in [(f["address"], f["count"]) for f in written]


def test_the_review_settings_are_checked(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(
        '[dpo]\nreview_timezone = "Mars/Olympus"\nreview_day_starts = 20\nreview_day_ends = 8\n'
    )
    checked = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "config", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = checked.stdout + checked.stderr
    assert checked.returncode != 0
    assert "dpo.review_timezone" in said and "Mars/Olympus" in said
    assert "dpo.review_day_ends: must be later than review_day_starts" in said
