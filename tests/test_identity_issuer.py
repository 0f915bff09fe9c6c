"""A person is a Patient ID within the issuer that assigned it: patient "P1" of hospital A and
patient "P1" of hospital B are two people. A consent, a restriction or a legal hold recorded
under an issuer applies to that issuer's patient only; one recorded without an issuer applies to
the ID under every issuer (for a consent, only where the archive does not hold the ID under
several issuers: there it is ambiguous and refused, naming them). Decisions about an object use
the object's own (Patient ID, issuer)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dicomnode.core.errors import InvalidInput
from dicomnode.governance import retention
from tests.conftest import WORKSTATION, cli, dicomweb_client
from tests.factory import make_ct
from tests.test_governance_node import (
    as_file,
    governance_api,
    policy_text,
    publish_days_ago,
    research_pacs,
    wado,
)
from tests.test_retention import RETENTION

A_STUDY, B_STUDY = "1.2.826.0.1.71", "1.2.826.0.1.72"


@pytest.fixture
def research(storescp):
    return storescp("RESEARCH")


@pytest.fixture
def node(start_node, research):
    """P1 of HOSPITAL-A and P1 of HOSPITAL-B, one study each, sent by STOW-RS."""
    node = start_node(
        peers=[WORKSTATION, research_pacs(research.port)],
        extra="[governance]\nretention_interval = 0",
    )
    publish_days_ago(node, policy_text() + RETENTION)
    dicomweb_client(node).store_instances(
        [
            as_file(make_ct(patient_id="P1", study_uid=study, IssuerOfPatientID=issuer))
            for study, issuer in ((A_STUDY, "HOSPITAL-A"), (B_STUDY, "HOSPITAL-B"))
        ]
    )
    return node


def share(node, study: str):
    return governance_api(node, "POST", "/shares", json={"recipient": "lab", "study": study})


def test_a_consent_under_hospital_a_does_not_let_p1_of_hospital_b_be_shared(node, research):
    stored, _ = node.stewardship.record_consent(
        "P1", "HRESCH", "granted", "dpo", issuer="HOSPITAL-A", evidence_ref="form 9"
    )
    assert stored.ref == "consent:P1^HOSPITAL-A:HRESCH:v1"
    for issuer, count in (("HOSPITAL-A", 1), ("HOSPITAL-B", 0)):
        listed = governance_api(
            node, "GET", f"/consents/P1?issuer={issuer}", scopes=("governance.read",)
        ).json()
        assert len(listed["history"]) == count and len(listed["current"]) == count

    to_b = share(node, B_STUDY)
    assert to_b.status_code == 403 and to_b.json()["state"] == "denied"
    denial = [e for e in node.archive.ledger.entries() if e.kind == "denial"][-1]
    assert "P1 (issuer HOSPITAL-B): no consent to HRESCH" in denial.data["reason"]
    assert research.received() == []

    to_a = share(node, A_STUDY)
    assert to_a.status_code == 200, to_a.text
    disclosure = [e for e in node.archive.ledger.entries() if e.kind == "disclosure"][-1]
    assert disclosure.data["consent_refs"] == ["consent:P1^HOSPITAL-A:HRESCH:v1"]
    assert len(research.received()) == 1


def test_a_consent_without_issuer_for_an_id_held_under_two_issuers_is_refused(node):
    with pytest.raises(InvalidInput, match="HOSPITAL-A.*HOSPITAL-B"):
        node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo")
    answer = governance_api(
        node,
        "POST",
        "/consents",
        json={"patient_id": "P1", "purpose": "HRESCH", "state": "granted"},
    )
    assert answer.status_code == 400 and "name the IssuerOfPatientID" in answer.json()["detail"]
    assert node.archive.registry.consents("P1") == []
    # an ID held under one issuer only: the consent is recorded under that issuer
    dicomweb_client(node).store_instances([as_file(make_ct(patient_id="P9", study_uid="1.2.9"))])
    dicomweb_client(node).store_instances(
        [as_file(make_ct(patient_id="P8", study_uid="1.2.8", IssuerOfPatientID="HOSPITAL-A"))]
    )
    eight, _ = node.stewardship.record_consent("P8", "HRESCH", "granted", "dpo")
    assert eight.issuer_of_patient_id == "HOSPITAL-A"
    # an ID not held yet: recorded without an issuer, it counts for the ID under any issuer
    seven, _ = node.stewardship.record_consent("P7", "HRESCH", "granted", "dpo")
    assert seven.issuer_of_patient_id == ""
    dicomweb_client(node).store_instances(
        [as_file(make_ct(patient_id="P7", study_uid="1.2.7", IssuerOfPatientID="HOSPITAL-C"))]
    )
    assert share(node, "1.2.7").status_code == 200


def test_a_restriction_under_hospital_a_blocks_only_a_and_one_without_issuer_both(node):
    node.stewardship.restrict("P1", "dpo", "request 2026-31", issuer="HOSPITAL-A")
    assert wado(node, A_STUDY, subject="ohif").status_code == 403
    assert wado(node, B_STUDY, subject="ohif").status_code == 200
    entry = [e for e in node.archive.ledger.entries() if e.kind == "denial"][-1]
    assert "restriction:" in entry.data["reason"] and entry.data["study_instance_uids"] == [A_STUDY]

    answer = governance_api(node, "POST", "/subjects/P1/restrict", json={"reason": "any"})
    assert answer.status_code == 201
    assert wado(node, A_STUDY, subject="ohif").status_code == 403
    assert wado(node, B_STUDY, subject="ohif").status_code == 403
    # two restrictions of P1 are active: lifting one must name its issuer
    with pytest.raises(InvalidInput, match="several issuers"):
        node.stewardship.unrestrict("P1", "dpo")
    node.stewardship.unrestrict("P1", "dpo", issuer="")
    assert wado(node, B_STUDY, subject="ohif").status_code == 200
    assert wado(node, A_STUDY, subject="ohif").status_code == 403


def test_a_legal_hold_under_hospital_a_keeps_only_a_and_one_without_issuer_both(node):
    expired = datetime.now(UTC) + timedelta(days=91)  # the P90D retention of images has run
    node.stewardship.clock = lambda: expired
    hold = node.stewardship.place_hold(
        "dpo", "counsel", "litigation 2026-5", patient_id="P1", issuer="HOSPITAL-A"
    )
    assert hold.issuer_of_patient_id == "HOSPITAL-A"

    def actions() -> dict[str, str]:
        report = node.stewardship.retention_sweep("dpo", dry_run=True)
        return {i.study_instance_uid: i.action for i in report.items}

    assert actions() == {A_STUDY: retention.KEEP_HOLD, B_STUDY: retention.DESTROY}
    # and so it is done: hospital B's P1 can be erased while A's P1 is held
    erased = node.stewardship.erase_subject("P1", "dpo", issuer="HOSPITAL-B")
    assert erased.done, erased.reason
    assert {
        i.study_instance_uid for i in node.archive.find_instances_exactly((("PatientID", "P1"),))
    } == {A_STUDY}
    node.stewardship.release_hold(hold.id, "dpo")
    everyone = node.stewardship.place_hold("dpo", "counsel", "litigation 2026-6", patient_id="P1")
    assert everyone.issuer_of_patient_id is None
    assert actions() == {A_STUDY: retention.KEEP_HOLD}
    refused = node.stewardship.erase_subject("P1", "dpo", issuer="HOSPITAL-A")
    assert not refused.done and everyone.ref in refused.reason


def test_a_withdrawal_under_hospital_a_cancels_only_the_work_of_a(node):
    for issuer in ("HOSPITAL-A", "HOSPITAL-B"):
        node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo", issuer=issuer)
    to_a = node.egress.queue_share("lab", A_STUDY, "dpo")
    to_b = node.egress.queue_share("lab", B_STUDY, "dpo")

    _, changed = node.stewardship.record_consent(
        "P1", "HRESCH", "withdrawn", "dpo", issuer="HOSPITAL-A"
    )

    assert changed["cancelled_deliveries"] == [to_a]
    registry = node.archive.registry
    assert (registry.delivery(to_a).state, registry.delivery(to_b).state) == (
        "cancelled",
        "queued",
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the CLI: any index
def test_the_command_line_names_the_issuer_and_the_recipients(node):
    refused = cli(
        node, "consent", "record", "--patient-id", "P1", "--purpose", "HRESCH", "--state",
        "granted", "--by", "dpo",
    )  # fmt: skip
    assert refused.returncode != 0 and "HOSPITAL-A" in refused.stderr
    recorded = cli(
        node, "consent", "record", "--patient-id", "P1", "--issuer", "HOSPITAL-B", "--purpose",
        "HRESCH", "--state", "granted", "--recipients", "lab", "--by", "dpo",
    )  # fmt: skip
    assert recorded.returncode == 0, recorded.stderr
    (stored,) = node.archive.registry.consents("P1")
    assert (stored.issuer_of_patient_id, stored.recipients) == ("HOSPITAL-B", ("lab",))
    shown = cli(node, "consent", "show", "--patient-id", "P1", "--issuer", "HOSPITAL-A")
    assert shown.returncode == 0 and "no consent recorded" in shown.stdout

    restricted = cli(
        node, "subject", "restrict", "--patient-id", "P1", "--issuer", "HOSPITAL-B", "--by", "dpo"
    )
    assert restricted.returncode == 0, restricted.stderr
    assert wado(node, B_STUDY, subject="ohif").status_code == 403
    assert wado(node, A_STUDY, subject="ohif").status_code == 200

    placed = cli(
        node, "hold", "place", "--patient-id", "P1", "--issuer", "HOSPITAL-B", "--owner",
        "counsel", "--reason", "case 7", "--by", "dpo",
    )  # fmt: skip
    assert placed.returncode == 0, placed.stderr
    (hold,) = node.archive.registry.holds(active_only=True)
    assert (hold.patient_id, hold.issuer_of_patient_id) == ("P1", "HOSPITAL-B")


def test_intake_decides_on_the_arriving_objects_own_issuer(node):
    """A restriction of hospital A's P1 holds A's new objects at intake and files B's."""
    node.stewardship.restrict("P1", "dpo", "request 2026-32", issuer="HOSPITAL-A")
    arriving = {
        issuer: make_ct(patient_id="P1", study_uid=study, IssuerOfPatientID=issuer)
        for study, issuer in ((A_STUDY, "HOSPITAL-A"), (B_STUDY, "HOSPITAL-B"))
    }
    dicomweb_client(node).store_instances([as_file(ds) for ds in arriving.values()])
    held = {h.sop_instance_uid for h in node.archive.registry.quarantined()}
    assert held == {arriving["HOSPITAL-A"].SOPInstanceUID}
    assert wado(node, B_STUDY, subject="ohif").status_code == 200
    assert node.archive.counts()["instances"] == 3  # the two first objects and B's new one
