"""Break-glass: an emergency retrieval past a patient's restriction, for one requester and one
patient, with a stated reason, time-limited, every use a ledger disclosure naming the grant,
every grant waiting for the DPO's review. On a running node with real bearer tokens (DICOMweb
WADO-RS and QIDO-RS) and the DPO's pages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import requests

from dicomnode.governance import break_glass as rules
from dicomnode.governance.decisions import Decision
from tests.conftest import dicomweb_url, token_for
from tests.test_dpo_pages import prepared_node, signed_in

STUDY_1, STUDY_2 = "1.2.826.0.1.1", "1.2.826.0.1.2"
T0 = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
REASON = "unconscious patient in the ED, prior CT needed"


def open_grant(node, subject: str, **body) -> requests.Response:
    return requests.post(
        f"{dicomweb_url(node)}/break-glass",
        json=body,
        headers={"Authorization": f"Bearer {token_for(node, ('dicomweb.read',), subject=subject)}"},
        timeout=30,
    )


def wado(node, study: str, subject: str) -> requests.Response:
    """WADO-RS: the study's instances."""
    return requests.get(
        f"{dicomweb_url(node)}/studies/{study}",
        headers={
            "Authorization": f"Bearer {token_for(node, ('dicomweb.read',), subject=subject)}",
            "Accept": 'multipart/related; type="application/dicom"',
        },
        timeout=30,
    )


def qido_patients(node, subject: str) -> set[str]:
    response = requests.get(
        f"{dicomweb_url(node)}/studies",
        headers={"Authorization": f"Bearer {token_for(node, ('dicomweb.read',), subject=subject)}"},
        timeout=30,
    )
    assert response.status_code in (200, 204), response.text
    return {s["00100020"]["Value"][0] for s in (response.json() if response.content else [])}


# --- the rule (pure) ----------------------------------------------------------------------------


def grant(**changes) -> rules.Grant:
    values = dict(
        id=1,
        requester="er-doctor",
        patient_id="P1",
        issuer="",
        study_instance_uid="",
        reason=REASON,
        granted_at=T0,
        expires_at=T0 + timedelta(hours=1),
    )
    return rules.Grant(**(values | changes))


def refused(**changes) -> Decision:
    values = dict(
        allowed=False,
        reason="patient P1 restricted processing (restriction-1)",
        rule_id="hospital",
        policy_version="v1",
        denied_patients=("P1",),
    )
    return Decision(**(values | changes))


def test_what_a_grant_lets_through():
    now = T0 + timedelta(minutes=5)
    args = ("wado", "er-doctor", {STUDY_1}, {}, [grant()], now)
    allowed, used = rules.override(refused(), *args, False)
    assert allowed.allowed and used == ("break-glass-1",)
    assert allowed.reason.startswith(f"break-glass (break-glass-1: {REASON}) past: patient P1")
    assert allowed.rule_id == "hospital" and allowed.denied_patients == ()

    def unchanged(decision=None, **changed) -> bool:
        call = dict(
            zip(
                ("operation", "requester", "studies", "issuers", "grants", "now"), args, strict=True
            )
        )
        call |= changed
        got, used = rules.override(decision or refused(), *call.values(), False)
        return got == (decision or refused()) and used == ()

    assert unchanged(requester="someone-else")  # one requester
    assert unchanged(now=T0 + timedelta(hours=1))  # expired
    assert unchanged(grants=[grant(ended_at=now)])  # ended early
    assert unchanged(grants=[grant(patient_id="P2")])  # another patient
    assert unchanged(grants=[grant(study_instance_uid=STUDY_2)])  # another study
    assert unchanged(grants=[grant(issuer="HOSP-B")], issuers={"P1": ("HOSP-A",)})
    assert unchanged(operation="share")  # not a retrieval
    assert unchanged(refused(denied_patients=(), rule_id="unknown-recipient"))
    assert unchanged(refused(deid_profile="research"))  # de-identified only: still refused
    assert unchanged(refused(denied_patients=("P1", "P2")))  # P2 not covered: a retrieval

    assert rules.check_request("help", 60, "P1", "er-doctor").startswith("state the emergency")
    assert "1 to 720 minutes" in rules.check_request(REASON, 24 * 60, "P1", "er-doctor")
    assert rules.check_request(REASON, 60, "P1", "") != ""
    assert rules.check_request(REASON, 60, "P1", "er-doctor") == ""


# --- on a running node --------------------------------------------------------------------------


@pytest.fixture
def node(start_node, storescp):
    node = prepared_node(start_node, storescp("RESEARCH"))
    node.stewardship.restrict("P1", "dpo:dpo1", "the patient asked to stop processing")
    return node


def test_an_emergency_retrieval_past_a_restriction(node):
    assert wado(node, STUDY_1, subject="er-doctor").status_code == 403  # restricted
    assert "P1" not in qido_patients(node, "er-doctor")

    too_short = open_grant(node, "er-doctor", patient_id="P1", reason="urgent")
    assert too_short.status_code == 400 and "state the emergency" in too_short.json()["detail"]
    opened = open_grant(node, "er-doctor", patient_id="P1", reason=REASON, minutes=30)
    assert opened.status_code == 201, opened.text
    ref = opened.json()["ref"]
    expires = datetime.fromisoformat(opened.json()["expires_at"])
    assert timedelta(minutes=29) < expires - datetime.now(UTC) <= timedelta(minutes=30)

    retrieved = wado(node, STUDY_1, subject="er-doctor")
    assert retrieved.status_code == 200, retrieved.text
    assert "P1" in qido_patients(node, "er-doctor")
    uses = [
        e
        for e in node.archive.ledger.entries()
        if e.kind == "disclosure" and ref in e.data.get("reason", "")
    ]
    assert {e.data["operation"] for e in uses} == {"wado", "qido"}
    assert all(e.actor == "er-doctor" and "P1" in e.data["patient_ids"] for e in uses)
    assert all(e.data["reason"].startswith(f"break-glass ({ref}: {REASON}) past:") for e in uses)

    # only that requester, only that patient; the grant ends; an expired grant opens nothing
    assert wado(node, STUDY_1, subject="other-doctor").status_code == 403
    node.stewardship.restrict("P2", "dpo:dpo1", "asked too")
    assert wado(node, STUDY_2, subject="er-doctor").status_code == 403
    node.egress.clock = lambda: datetime.now(UTC) + timedelta(minutes=31)
    assert wado(node, STUDY_1, subject="er-doctor").status_code == 403


def test_the_dpo_reviews_every_grant(node):
    opened = open_grant(node, "er-doctor", patient_id="P1", reason=REASON)
    grant_id = opened.json()["id"]
    ended = requests.post(
        f"{dicomweb_url(node)}/break-glass/{grant_id}/end",
        headers={"Authorization": f"Bearer {token_for(node, ('dicomweb.read',), 'er-doctor')}"},
        timeout=30,
    )
    assert ended.status_code == 200 and ended.json()["ended_at"]
    assert wado(node, STUDY_1, subject="er-doctor").status_code == 403  # ended early

    client = signed_in(node)
    page = client.get("/governance/break-glass")
    assert page.status_code == 200 and "1 grants wait for the DPO" in page.text
    assert f"break-glass-{grant_id}" in page.text and "not reviewed" in page.text
    korean = client.get("/governance/break-glass?lang=ko")
    assert "DPO 검토를 기다리는 허가 1건" in korean.text
    token = client.csrf("/governance/break-glass")
    reviewed = client.post(
        f"/governance/break-glass/{grant_id}/review",
        data={"csrf_token": token, "note": "ED record checked: justified"},
    )
    assert reviewed.status_code == 200 and "grants wait" not in reviewed.text
    auditor = signed_in(node, "aud1")
    assert (
        auditor.post(
            f"/governance/break-glass/{grant_id}/review",
            data={"csrf_token": auditor.csrf("/governance/break-glass"), "note": "x"},
        ).status_code
        == 403
    )
    entries = [e for e in node.archive.ledger.entries() if e.kind == "break_glass"]
    assert [(e.outcome, e.actor) for e in entries] == [
        ("granted", "er-doctor"),
        ("ended", "er-doctor"),
        ("reviewed", "dpo:dpo1"),
    ]
    assert entries[0].data["review"] == "pending" and entries[0].data["reason"] == REASON
    assert entries[2].data["note"] == "ED record checked: justified"
