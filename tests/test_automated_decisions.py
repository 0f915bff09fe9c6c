"""Automated-decision transparency (checklist item 9, PIPA 37-2): each AI output type's criteria
and procedure are disclosed (public ``/automated-decisions``, the DPO's page) as the analyzer
declares them or as the site replaced them; a patient's refusal or explanation request is a
ticket routed to a reviewer, ledgered, and flags the patient's AI outputs in the job listing;
a refusal holds the patient's new analysis, visibly, until the ticket is closed.

One node (SQLite) for the module, with real HTTP clients on loopback; the analysis is the small
`series-mean` test plugin, run by hand (no workers)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
import requests

from dicomnode.analysis import provenance
from dicomnode.analysis.ct_lung import CtLung
from dicomnode.analysis.xa_qca.analyzer import XaQca
from dicomnode.archive.accounts import AccountStore
from dicomnode.config import read_settings
from dicomnode.core.errors import InvalidInput
from dicomnode.governance import casework as rules
from tests.conftest import cli, token_for, write_config
from tests.test_analysis import SeriesMean, send_series
from tests.test_dpo_pages import PASSWORD, signed_in

SITE_TEXT = "Site text: lung volumes, reviewed by the thoracic radiologist on duty."
ANALYSIS = f"""
[analysis]
workers = 0
[analysis.analyzers."ct-lung"]
enabled = false
criteria = "{SITE_TEXT}"
[analysis.analyzers."xa-qca"]
enabled = false
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from dicomnode.serve import Node

    folder = tmp_path_factory.mktemp("automated-decisions")
    url = f"sqlite:///{folder / 'index.sqlite'}"
    node = Node(
        read_settings(write_config(folder / "node.toml", folder / "data", url, extra=ANALYSIS))
    )
    node.start()
    node.analysis.analyzers = {"series-mean": SeriesMean()}  # the built-ins are turned off
    AccountStore(node.archive.index).add("dpo1", PASSWORD, "dpo", "Kim Min-ji")
    yield node
    node.stop()


def analysed(node, patient_id: str):
    """A new CT series of `patient_id` sent, queued and run; returns its study UID and job."""
    study = send_series(node, patient_id=patient_id)[0].StudyInstanceUID
    (job_id,) = node.analysis.request(study)
    job = node.analysis.run_one()
    assert job is not None and job.id == job_id
    return study, job


def listed_jobs(node, study: str) -> list[dict]:
    answer = requests.get(
        f"http://127.0.0.1:{node.http_port}/analysis/jobs",
        params={"study": study},
        headers={"Authorization": f"Bearer {token_for(node)}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def ticket_entries(node, ref: str) -> list:
    return [
        e for e in node.archive.ledger.entries() if e.kind == "ticket" and e.data["ticket"] == ref
    ]


def test_item_9_a_refusal_creates_a_ticket_flags_the_ai_output_and_holds_new_analysis(node):
    before, done = analysed(node, "P-AI")
    assert done.state == "done" and len(json.loads(done.outputs)) == 1
    other_before, _ = analysed(node, "P-OTHER")

    # the DPO records the patient's refusal on the ticket page, routed to a reviewer
    dpo = signed_in(node)
    opened = dpo.post(
        "/governance/tickets",
        data={
            "kind": "ai-refusal",
            "patient_id": "P-AI",
            "requester": "the patient, by letter",
            "law_pipa": "1",
            "reviewer": "dr-lee",
            "details": "I refuse automated analysis of my images",
            "csrf_token": dpo.csrf("/governance/tickets"),
        },
    )
    assert opened.status_code == 200, opened.text
    ticket_id = int(re.search(r"/governance/tickets/(\d+)$", opened.url).group(1))
    ticket = node.casework.ticket(ticket_id)
    assert (ticket.kind, ticket.state, ticket.patient_id) == ("ai-refusal", "open", "P-AI")
    assert ticket.due_at == ticket.received_at + timedelta(days=30)  # PIPA 37-2 (Decree 44-4)
    assert "dr-lee" in opened.text and "refusal of an automated decision" in opened.text
    # routed to a human: in the DPO's open tickets, and on the automated-decisions page
    assert ticket.ref in dpo.get("/governance/tickets").text
    page = dpo.get("/governance/automated-decisions")
    assert page.status_code == 200
    row = re.search(rf'<tr class="flag open">.*?{ticket.ref}.*?</tr>', page.text, re.S)
    assert row and "P-AI" in row.group(0) and "dr-lee" in row.group(0), page.text
    # ledgered, with the flag and its reviewer
    (entry,) = ticket_entries(node, ticket.ref)
    assert entry.outcome == "opened" and entry.actor == "dpo:dpo1"
    assert entry.data["request"] == "ai-refusal" and entry.data["patient_ids"] == ["P-AI"]
    assert entry.data["flag"]["reviewer"] == "dr-lee" and entry.data["flag"]["state"] == "open"

    # the AI output already made is flagged in the job listing; another patient's is not
    (flagged,) = listed_jobs(node, before)
    assert flagged["state"] == "done" and flagged["outputs"] == json.loads(done.outputs)
    assert [
        (f["ticket"], f["request"], f["reviewer"], f["state"])
        for f in flagged["automated_decision_flags"]
    ] == [(ticket.ref, "refuse", "dr-lee", "open")]
    assert listed_jobs(node, other_before)[0]["automated_decision_flags"] == []

    # the patient's new data is not analysed while the request is open, and the listing says why
    runs = SeriesMean.runs
    after, held = analysed(node, "P-AI")
    assert held.state == "held" and SeriesMean.runs == runs and held.outputs is None
    assert f"refused automated processing ({ticket.ref}, PIPA 37-2)" in held.error
    (shown,) = listed_jobs(node, after)
    assert shown["state"] == "held" and shown["error"] == held.error
    assert "held until dr-lee has reviewed the request" in shown["error"]
    denial = [e for e in node.archive.ledger.entries() if e.data.get("job") == held.id]
    assert [(e.outcome, e.data["rule_id"], e.data["patient_ids"]) for e in denial] == [
        ("denied", "PIPA-37-2", ["P-AI"])
    ]
    assert node.analysis.run_one() is None  # held, not retried
    _, other = analysed(node, "P-OTHER")  # another patient's analysis goes on
    assert other.state == "done", other.error

    # the reviewer's answer closes the ticket: the flag is resolved and the held job runs
    closed = dpo.post(
        f"/governance/tickets/{ticket_id}/done",
        data={
            "note": "reviewed by dr-lee; the report was read without the automated measurement",
            "csrf_token": dpo.csrf(f"/governance/tickets/{ticket_id}"),
        },
    )
    assert closed.status_code == 200 and node.casework.ticket(ticket_id).state == "done"
    done_entry = ticket_entries(node, ticket.ref)[-1]
    assert done_entry.outcome == "done" and done_entry.data["released_jobs"] == [held.id]
    rerun = node.analysis.run_one()
    assert rerun.id == held.id and rerun.state == "done", rerun.error
    (resolved,) = listed_jobs(node, after)
    assert [f["state"] for f in resolved["automated_decision_flags"]] == ["resolved"]


def test_an_explanation_request_flags_one_study_and_does_not_hold_analysis(node):
    study, _ = analysed(node, "P-EXPLAIN")
    later, _ = analysed(node, "P-EXPLAIN")
    opened = cli(
        node,
        "ticket",
        "open",
        "--kind",
        "ai-explanation",
        "--patient-id",
        "P-EXPLAIN",
        "--study",
        study,
        "--law",
        "pipa",
        "--law",
        "gdpr",
        "--by",
        "dpo:kim",
    )
    assert opened.returncode == 0, opened.stderr
    ticket = next(t for t in node.casework.tickets() if t.patient_id == "P-EXPLAIN")
    flag = node.casework.decision_flag(ticket.id)
    assert (flag.request, flag.reviewer, flag.study_instance_uid) == ("explain", "dpo:kim", study)
    assert ticket.due_at == rules.ticket_due(ticket.received_at, ("gdpr", "pipa"), ticket.kind)
    assert [f["request"] for f in listed_jobs(node, study)[0]["automated_decision_flags"]] == [
        "explain"
    ]
    assert listed_jobs(node, later)[0]["automated_decision_flags"] == []  # another study
    _, job = analysed(node, "P-EXPLAIN")
    assert job.state == "done", job.error  # an explanation does not stop analysis
    with pytest.raises(InvalidInput, match="a person reviews the automated decision"):
        node.casework.carry_out(ticket.id, "dpo:kim")
    too_late = ticket.received_at + timedelta(days=95)
    with pytest.raises(InvalidInput, match="at most two"):  # GDPR 12(3), PIPA 44-4
        node.casework.extend(ticket.id, "dpo:kim", too_late, "the reviewer is away")
    with pytest.raises(InvalidInput, match="only a request about an automated decision"):
        node.casework.open_ticket("deletion", "P-EXPLAIN", "dpo:kim", reviewer="dr-lee")
    refused = node.casework.refuse(
        ticket.id, "dpo:kim", "PIPA-37-2-1-proviso", "the analysis rests on the patient's consent"
    )
    assert refused.state == "refused" and "자동화된 결정 설명" in refused.outcome
    assert node.casework.decision_flag(ticket.id).state == "resolved"


def test_the_criteria_of_each_ai_output_are_public_and_a_site_text_replaces_the_analyzers(node):
    answer = requests.get(f"http://127.0.0.1:{node.http_port}/automated-decisions", timeout=30)
    assert answer.status_code == 200  # no token: for anyone to read (PIPA 37-2(4))
    body = answer.json()
    assert body["law"] == "PIPA 37-2(4)" and "refuse" in body["requests"]
    outputs = {o["analyzer"]: o for o in body["outputs"]}
    assert {"ct-lung", "xa-qca"} <= set(outputs)
    lung, qca = outputs["ct-lung"], outputs["xa-qca"]
    assert (lung["source"], lung["text"], lung["enabled"]) == ("site", SITE_TEXT, False)
    assert "-400 HU" in lung["criteria"]["method"]  # the analyzer's own parts stay readable
    assert qca["source"] == "analyzer" and qca["version"] == "1.0.0"
    for part in ("%DS", "minimal lumen diameter", "synthetic phantoms", "a clinician reviews"):
        assert part in qca["text"], part
    assert [c["name"] for c in qca["output_sop_classes"]] == [
        "Segmentation (SEG)",
        "Comprehensive SR",
    ]
    page = signed_in(node).get("/governance/automated-decisions?lang=ko")
    assert page.status_code == 200 and "자동화된 결정" in page.text
    assert SITE_TEXT in page.text and "interpolated reference line" in page.text
    # every SEG and SR the built-ins write points at the disclosure
    for analyzer in (CtLung(), XaQca()):
        equipment = provenance.contributing_equipment(analyzer)
        assert "/automated-decisions (PIPA 37-2)" in equipment.ContributionDescription
        assert len(equipment.ContributionDescription) <= 1024  # ST


def test_requests_about_automated_decisions_are_due_in_30_days_under_pipa():
    t0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
    assert rules.ticket_due(t0, ("pipa",), "ai-refusal") == t0 + timedelta(days=30)
    assert rules.ticket_due(t0, ("pipa",), "deletion") == t0 + timedelta(days=10)
    february = datetime(2026, 2, 2, tzinfo=UTC)  # GDPR's month is shorter here
    assert rules.ticket_due(february, ("pipa", "gdpr"), "ai-explanation") == datetime(
        2026, 3, 2, tzinfo=UTC
    )
    assert rules.extended_due(t0, ("pipa",), t0 + timedelta(days=90), "ai-refusal")
    with pytest.raises(ValueError, match="two delays"):
        rules.extended_due(t0, ("pipa",), t0 + timedelta(days=91), "ai-refusal")
