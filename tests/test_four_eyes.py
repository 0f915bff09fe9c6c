"""Four-eyes (checklist item 44): once a deputy is named, publishing a widening policy, erasing a
patient, a DICOMweb DELETE, releasing a legal hold and releasing held objects each wait as a
pending request until a second person (a DPO or a named deputy) approves it; both people are in
the ledger; nobody approves their own request; a narrowing publication needs none; a change
without approval is not activated. On a running node (SQLite and PostgreSQL), through the
governance API and DICOMweb with real bearer tokens, and the approval through the service the
DPO pages and the CLI call."""

from __future__ import annotations

import pytest
import requests

from dicomnode.core.errors import NotPermitted
from dicomnode.governance import approvals as rules
from dicomnode.oversight.approvals import ApprovalPending, Approvals, acting_as
from tests.conftest import WORKSTATION, dicomweb_client, dicomweb_url, token_for
from tests.factory import make_ct
from tests.test_governance_node import (
    as_file,
    c_find,
    governance_api,
    policy_text,
    publish_days_ago,
)
from tests.test_policy_notice import research_denied, with_partner

STUDY_1, STUDY_2 = "1.2.826.0.1.1", "1.2.826.0.1.2"


# --- the rules (pure) ---------------------------------------------------------------------------


def test_who_may_decide_and_what_waits():
    deputies = {"dep1"}
    assert not rules.may_decide("dpo:alice", "dpo:alice", True, deputies).allowed
    own = rules.may_decide("token:Alice", "dpo:alice", True, deputies)  # one person, two doors
    assert not own.allowed and "nobody approves their own request" in own.reason
    assert rules.may_decide("dpo:alice", "dpo:bob", True, deputies).allowed  # another DPO
    assert rules.may_decide("dpo:alice", "account:dep1", False, deputies).allowed  # a deputy
    auditor = rules.may_decide("dpo:alice", "dpo:aud1", False, deputies)
    assert not auditor.allowed and "neither a DPO nor a named deputy" in auditor.reason
    assert not rules.may_decide("dpo:alice", "  ", True, deputies).allowed

    assert rules.needs_approval(rules.ERASE, four_eyes=True)
    assert not rules.needs_approval(rules.ERASE, four_eyes=False)  # single-user embedded node
    assert rules.needs_approval(rules.PUBLISH_POLICY, True, "wider")
    assert rules.needs_approval(rules.PUBLISH_POLICY, True, "material")
    assert not rules.needs_approval(rules.PUBLISH_POLICY, True, "narrower")  # the fast brake
    with pytest.raises(ValueError):
        rules.needs_approval("format-disk", True)


# --- on a running node --------------------------------------------------------------------------


@pytest.fixture
def node(start_node):
    node = start_node(peers=[WORKSTATION])
    publish_days_ago(node, policy_text())
    dicomweb_client(node).store_instances(
        [
            as_file(make_ct(patient_id=p, study_uid=study))
            for p, study in (("P1", STUDY_1), ("P2", STUDY_2))
        ]
    )
    return node


@pytest.fixture
def four_eyes(node):
    """The node's four-eyes service with deputy dep1 named by the DPO (four-eyes in force)."""
    approvals = Approvals(node.stewardship, node.intake)
    assert not approvals.in_force()
    assert approvals.name_deputy("dep1", "dpo:dpo1", by_is_dpo=True)
    assert approvals.in_force()
    return approvals


def approval_entries(node, request_id: int) -> list:
    return [
        e
        for e in node.archive.ledger.entries()
        if e.kind == "approval" and e.data.get("request") == request_id
    ]


def pending_id(response: requests.Response) -> int:
    """The request a gated change became: 202 Accepted, naming it and where it is decided."""
    assert response.status_code == 202, response.text
    answer = response.json()
    assert "needs a second person's approval" in answer["detail"], answer
    assert response.headers["Location"] == f"/governance/approvals/{answer['pending_request']}"
    return answer["pending_request"]


def test_without_a_deputy_nothing_waits(node):
    """The embedded single-user default: no second person exists, so an erasure is done at once
    (and the CLI's free-text --by still names who did it)."""
    outcome = node.stewardship.erase_subject("P2", "cli:operator")
    assert outcome.done and c_find(node, PatientID="P2")[1] == []
    assert Approvals(node.stewardship, node.intake).requests() == []


def test_an_erasure_waits_for_a_second_person_who_is_not_the_requester(node, four_eyes):
    response = governance_api(node, "POST", "/subjects/P2/erase")  # token subject "dpo"
    request_id = pending_id(response)
    assert len(c_find(node, PatientID="P2")[1]) == 1  # not erased: not activated
    request = four_eyes.request(request_id)
    assert (request.state, request.action, request.requested_by) == (
        "pending",
        "erase",
        "token:dpo",
    )

    # the same person through another door (the DPO pages' account "dpo") is refused
    with pytest.raises(NotPermitted, match="nobody approves their own request"):
        four_eyes.approve(request_id, "dpo:dpo", approver_is_dpo=True)
    # an account that is neither a DPO nor a deputy is refused
    with pytest.raises(NotPermitted, match="neither a DPO nor a named deputy"):
        four_eyes.approve(request_id, "dpo:aud1", approver_is_dpo=False)
    assert four_eyes.request(request_id).state == "pending"
    assert len(c_find(node, PatientID="P2")[1]) == 1

    done = four_eyes.approve(request_id, "dpo:dep1", approver_is_dpo=False, note="checked ID")
    assert done.state == "approved" and done.decided_by == "dpo:dep1"
    assert done.outcome["done"] is True
    assert c_find(node, PatientID="P2")[1] == []  # erased now
    assert len(c_find(node, PatientID="P1")[1]) == 1

    ledger = approval_entries(node, request_id)
    assert [(e.outcome, e.actor) for e in ledger] == [
        ("requested", "token:dpo"),
        ("refused", "dpo:dpo"),
        ("refused", "dpo:aud1"),
        ("approved", "dpo:dep1"),
        ("carried-out", "dpo:dep1"),
    ]
    assert ledger[3].data["requested_by"] == "token:dpo"  # both people in one entry
    erased = [e for e in node.archive.ledger.entries() if e.kind == "subject"][-1]
    assert erased.outcome == "erased" and erased.actor == "token:dpo"
    with pytest.raises(NotPermitted, match="not pending"):  # decided once only
        four_eyes.reject(request_id, "dpo:dpo2", approver_is_dpo=True)


def test_a_dicomweb_delete_waits_and_a_rejection_changes_nothing(node, four_eyes):
    token = token_for(node, ("dicomweb.read", "dicomweb.delete"), subject="pacs-admin")
    response = requests.delete(
        f"{dicomweb_url(node)}/studies/{STUDY_1}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    request_id = pending_id(response)
    assert len(c_find(node, PatientID="P1")[1]) == 1
    assert four_eyes.request(request_id).requested_by == "token:pacs-admin"
    rejected = four_eyes.reject(request_id, "dpo:dpo1", approver_is_dpo=True, note="no reason")
    assert rejected.state == "rejected" and len(c_find(node, PatientID="P1")[1]) == 1

    second = pending_id(
        requests.delete(
            f"{dicomweb_url(node)}/studies/{STUDY_1}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
    )
    assert four_eyes.approve(second, "dpo:dep1", False).outcome["done"] is True
    assert c_find(node, PatientID="P1")[1] == []
    deletion = [e for e in node.archive.ledger.entries() if e.kind == "deletion"][-1]
    assert deletion.outcome == "deleted" or deletion.data.get("operation") == "delete"


def test_a_widening_publication_waits_and_a_narrowing_does_not(node, four_eyes):
    before = node.stewardship.policy_status().published
    with acting_as("dpo:dpo1"), pytest.raises(ApprovalPending) as waiting:
        node.stewardship.publish_policy(with_partner("v-wide"), "dpo:dpo1")
    assert [p.version for p in node.stewardship.policy_status().published] == [
        p.version for p in before
    ]  # not published, so never in force
    request_id = waiting.value.request.id

    with acting_as("dpo:dpo1"):  # the fast brake needs nobody else
        brake, new = node.stewardship.publish_policy(research_denied("v-brake"), "dpo:dpo1")
    assert new and brake.effective_at <= node.stewardship.clock()
    assert "v-brake" in node.stewardship.policy_status().in_force.version
    assert [r.id for r in four_eyes.requests()] == [request_id]

    approved = four_eyes.approve(request_id, "dpo:dep1", approver_is_dpo=False)
    assert approved.outcome["version"] == "v-wide" and approved.outcome["new"] is True
    published = {p.version: p for p in node.stewardship.policy_status().published}
    assert published["v-wide"].published_by == "dpo:dpo1"  # the requester published it
    assert published["v-wide"].effective_at > node.stewardship.clock()  # and notice still runs


def test_releasing_a_hold_or_held_objects_waits(node, four_eyes):
    hold = node.stewardship.place_hold("dpo:dpo1", "legal", "litigation", patient_id="P1")
    with acting_as("dpo:dpo1"), pytest.raises(ApprovalPending) as waiting:
        node.stewardship.release_hold(hold.id, "dpo:dpo1")
    assert node.archive.registry.holds(active_only=True)[0].id == hold.id  # still held
    four_eyes.approve(waiting.value.request.id, "dpo:dep1", approver_is_dpo=False)
    assert node.archive.registry.holds(active_only=True) == []

    # releasing nothing needs nobody; a study with held objects waits (intake's gate)
    with acting_as("dpo:dpo1"):
        assert node.intake.release_held("1.2.3.999", "dpo:dpo1") == []


def test_a_free_text_actor_cannot_request_while_four_eyes_is_in_force(node, four_eyes):
    with pytest.raises(NotPermitted, match="signed-in, named account") as refused:
        node.stewardship.erase_subject("P2", "cli:whoever")
    assert not isinstance(refused.value, ApprovalPending)
    assert four_eyes.requests() == [] and len(c_find(node, PatientID="P2")[1]) == 1


def test_removing_the_last_deputy_needs_a_second_person(node, four_eyes):
    with pytest.raises(ApprovalPending) as waiting:
        four_eyes.remove_deputy("dep1", "dpo:dpo1", by_is_dpo=True)
    assert four_eyes.in_force()
    with pytest.raises(NotPermitted, match="own request"):
        four_eyes.approve(waiting.value.request.id, "dpo:dpo1", approver_is_dpo=True)
    four_eyes.approve(waiting.value.request.id, "dpo:dep1", approver_is_dpo=False)
    assert not four_eyes.in_force()
    with pytest.raises(NotPermitted, match="only a DPO"):
        four_eyes.name_deputy("aud1", "dpo:aud1", by_is_dpo=False)


def test_releasing_held_objects_waits_for_a_second_person(start_node, tmp_path):
    from tests.conftest import run_dcmtk
    from tests.factory import write_series

    node = start_node(peers=[WORKSTATION])
    publish_days_ago(node, policy_text(unknown_sender="hold"))
    files = write_series(tmp_path / "in", 2, patient_id="P7")
    sent = run_dcmtk(
        "storescu", "-aet", "STRANGER", "-aec", "DICOMNODE", "127.0.0.1",
        str(node.dimse.port), *map(str, files),
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr
    study = node.archive.registry.quarantined()[0].study_instance_uid
    approvals = Approvals(node.stewardship, node.intake)
    approvals.name_deputy("dep1", "dpo:dpo1", by_is_dpo=True)

    response = governance_api(node, "POST", f"/held/{study}/release")  # token subject "dpo"
    request_id = pending_id(response)
    assert len(node.archive.registry.quarantined()) == 2 and c_find(node, PatientID="P7")[1] == []
    with pytest.raises(NotPermitted, match="own request"):
        approvals.approve(request_id, "account:dpo", approver_is_dpo=True)
    done = approvals.approve(request_id, "dpo:dep1", approver_is_dpo=False)
    assert done.outcome == {"released": 2}
    assert node.archive.registry.quarantined() == [] and len(c_find(node, PatientID="P7")[1]) == 1
