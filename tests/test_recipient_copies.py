"""Recipients' copies (checklist item 29): the retention each recipient promised, destruction
confirmations recorded, a copy past its promised retention without a confirmation flagged on the
DPO's page; an erasure lists the recipients holding copies and queues a notice to each."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dicomnode.governance import recipient_copies as rules
from tests.test_break_glass import wado
from tests.test_dpo_pages import signed_in
from tests.test_share_links import SECOND_OPINION, node_with

STUDY_1 = "1.2.826.0.1.1"
T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


def test_the_state_of_each_copy():
    copies = [("lab", "1.2.3", T0), ("uni", "1.2.4", T0), ("lab", "1.2.5", T0)]
    confirmations = {("lab", "1.2.5"): T0 - timedelta(days=1)}  # before the copy: not it
    promised = {"lab": "P30D"}
    soon = {c.study_instance_uid: c for c in rules.copy_status(copies, promised, {}, T0)}
    assert soon["1.2.3"].state == "kept" and soon["1.2.3"].due_at == T0 + timedelta(days=30)
    assert soon["1.2.4"].state == "no-promise" and soon["1.2.4"].due_at is None
    late = {
        c.study_instance_uid: c
        for c in rules.copy_status(copies, promised, confirmations, T0 + timedelta(days=30))
    }
    assert late["1.2.3"].state == "overdue" and late["1.2.5"].state == "overdue"
    confirmed = rules.copy_status(
        copies, promised, {("lab", "1.2.3"): T0 + timedelta(days=2)}, T0 + timedelta(days=40)
    )
    assert [c.state for c in confirmed if c.study_instance_uid == "1.2.3"] == ["confirmed"]
    assert rules.notices_owed("erasure", "P1", {"lab": ["1.2.3", "1.2.3"], "": ["x"]}) == [
        {"recipient": "lab", "patient_id": "P1", "studies": ["1.2.3"], "reason": "erasure"}
    ]


@pytest.fixture
def node(start_node):
    promised = SECOND_OPINION.replace(
        'default_purpose = "TREAT"',
        'default_purpose = "TREAT"\ntoken_subjects = ["dr-lee"]\nretention = "P30D"',
    )
    return node_with(start_node, promised)


def test_copies_their_promised_retention_confirmations_and_erasure_notices(node):
    node.stewardship.record_consent("P1", "TREAT", "granted", "dpo:dpo1")
    assert wado(node, STUDY_1, subject="dr-lee").status_code == 200  # a copy at the recipient
    dpo = signed_in(node)
    page = dpo.get("/governance/recipients").text
    assert 'class="copy kept"' in page and "P30D" in page and "second-opinion" in page

    now = node.stewardship.clock()
    node.stewardship.clock = lambda: now + timedelta(days=31)
    page = dpo.get("/governance/recipients").text
    assert 'class="copy overdue"' in page and "1 copies are past the retention" in page
    assert "기한 초과" in dpo.get("/governance/recipients?lang=ko").text
    confirmed = dpo.post(
        "/governance/recipients/confirm",
        data={
            "csrf_token": dpo.csrf("/governance/recipients"),
            "recipient": "second-opinion",
            "study": STUDY_1,
            "evidence": "letter of 2026-12-20",
        },
    )
    assert confirmed.status_code == 200 and 'class="copy confirmed"' in confirmed.text
    assert "copies are past the retention" not in confirmed.text

    outcome = node.stewardship.erase_subject("P1", "dpo:dpo1")
    assert outcome.done
    page = dpo.get("/governance/recipients").text
    assert 'class="notice queued"' in page and "erasure" in page
    notice = (
        node.archive.engine.connect()
        .exec_driver_sql("select id, recipient, patient_id from recipient_notices")
        .all()
    )
    assert [(r[1], r[2]) for r in notice] == [("second-opinion", "P1")]
    sent = dpo.post(
        f"/governance/recipients/notices/{notice[0][0]}/sent",
        data={"csrf_token": dpo.csrf("/governance/recipients")},
    )
    assert sent.status_code == 200 and 'class="notice sent"' in sent.text
    kinds = [
        (e.outcome, e.data.get("recipient"))
        for e in node.archive.ledger.entries()
        if e.kind == "recipient_copy"
    ]
    assert kinds == [
        ("confirmed", "second-opinion"),
        ("notice-queued", "second-opinion"),
        ("notice-sent", None),
    ]
