"""A person is named exactly: erasure, a data subject's export, the accounting of what left and
DICOMweb DELETE select by Patient ID (with its issuer) and UIDs as values, never as C-FIND
patterns. A Patient ID `*` is one patient (any unauthenticated C-STORE can create one), not
everyone; `A*` is not ALICE. C-FIND and QIDO keep their wildcards.

DICOMweb DELETE is a stewardship operation: a legal hold or a retention a law requires refuses
it (409), both outcomes are ledger entries, and an allowed deletion writes the destruction
record the retention sweep writes."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import requests

from dicomnode.core.errors import InvalidInput
from dicomnode.core.model import Level
from tests.conftest import WORKSTATION, cli, dicomweb_url, token_for
from tests.test_governance_node import c_find, policy_text, publish_days_ago
from tests.test_retention import RETENTION, store

PATIENTS = ("*", "A*", "ALICE", "ABE", "BOB", "?")


@pytest.fixture
def node(start_node):
    node = start_node(peers=[WORKSTATION], extra="[governance]\nretention_interval = 0")
    publish_days_ago(node, policy_text() + RETENTION)
    return node


def patients_in_archive(node) -> dict[str, int]:
    counts: dict[str, int] = {}
    for patient in PATIENTS:
        found = node.archive.find_instances_exactly((("PatientID", patient),))
        if found:
            counts[patient] = len(found)
    return counts


def test_erasing_the_patient_whose_id_is_a_star_erases_only_that_patient(node):
    for patient in PATIENTS:
        store(node, patient)
    node.stewardship.place_hold("dpo", "counsel", "litigation", patient_id="BOB")

    done = node.stewardship.erase_subject("*", "dpo")

    assert done.done and done.changed["instances"] == 2
    assert patients_in_archive(node) == {p: 2 for p in PATIENTS if p != "*"}
    deletion = [e for e in node.archive.ledger.entries() if e.kind == "deletion"][-1]
    assert deletion.data["patient_ids"] == ["*"]


def test_subject_erase_on_the_command_line_takes_a_star_in_an_id_literally(node):
    for patient in PATIENTS:
        store(node, patient)

    erased = cli(node, "subject", "erase", "--patient-id", "A*", "--by", "dpo")

    assert erased.returncode == 0, erased.stderr
    assert patients_in_archive(node) == {p: 2 for p in PATIENTS if p != "A*"}


def test_the_export_of_a_star_hands_over_only_that_patient_and_is_accounted_to_them(node, tmp_path):
    for patient in ("*", "A*", "ALICE"):
        store(node, patient)
    c_find(node, PatientID="A*")  # C-FIND keeps its wildcard: A* and ALICE are both found

    out = tmp_path / "export"
    exported = cli(
        node, "subject", "export", "--patient-id", "A*", "--output", str(out), "--by", "dpo"
    )

    assert exported.returncode == 0, exported.stderr
    import pydicom

    files = sorted(out.glob("DICOM/**/*.dcm"))
    assert {str(pydicom.dcmread(f).PatientID) for f in files} == {"A*"} and len(files) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["patient_id"] == "A*"
    exports = [
        e for e in node.archive.ledger.entries() if e.kind == "subject" and e.outcome == "exported"
    ]
    assert [e.data["patient_ids"] for e in exports] == [["A*"]]
    # the C-FIND above disclosed both patients the pattern matched
    found = [e for e in node.archive.ledger.entries() if e.data.get("operation") == "find"]
    assert sorted(found[-1].data["patient_ids"]) == ["A*", "ALICE"]


def test_one_patient_id_under_two_issuers_is_two_people(node):
    here = store(node, "P1", IssuerOfPatientID="HOSPITAL-A")
    there = store(node, "P1", IssuerOfPatientID="HOSPITAL-B")

    with pytest.raises(InvalidInput, match="several issuers"):
        node.stewardship.erase_subject("P1", "dpo")
    assert node.archive.counts()["instances"] == 4

    done = node.stewardship.erase_subject("P1", "dpo", issuer="HOSPITAL-A")

    assert done.done and done.changed["instances"] == 2
    left = node.archive.find_instances(Level.PATIENT, (("PatientID", "P1"),))
    assert {i.study_instance_uid for i in left} == {there} and here != there
    entry = [e for e in node.archive.ledger.entries() if e.kind == "subject"][-1]
    assert entry.data["issuer_of_patient_id"] == "HOSPITAL-A"
    # now P1 names one person again: a request without the issuer is that person
    assert node.archive.identify("P1").issuer == "HOSPITAL-B"


def test_an_erasure_the_law_refuses_leaves_other_patients_held_data_alone(node):
    """Holds and statutory retention are checked with the exact ID and the deletion uses the
    same identity: another patient's kept data cannot go with it."""
    store(node, "A*")
    store(node, "ALICE", Modality="MG", StudyDate=datetime.now(UTC).strftime("%Y%m%d"))
    node.stewardship.place_hold("dpo", "counsel", "litigation", patient_id="ABE")
    store(node, "ABE")

    done = node.stewardship.erase_subject("A*", "dpo")

    assert done.done and done.changed["instances"] == 2
    assert patients_in_archive(node) == {"ALICE": 2, "ABE": 2}


# --- DICOMweb DELETE asks stewardship ----------------------------------------------------


def web_delete(node, path: str) -> requests.Response:
    return requests.delete(
        dicomweb_url(node) + path,
        headers={"Authorization": f"Bearer {token_for(node)}"},
        timeout=30,
    )


def deletion_entries(node) -> list:
    return [e for e in node.archive.ledger.entries() if e.kind == "deletion"]


def test_a_delete_of_a_study_under_legal_hold_is_refused_and_recorded(node):
    study = store(node, "P20")
    node.stewardship.place_hold("dpo", "counsel", "litigation", study_uid=study)

    response = web_delete(node, f"/studies/{study}")

    assert response.status_code == 409
    assert "legal hold" in response.json()["detail"]
    assert node.archive.counts()["instances"] == 2
    (refused,) = deletion_entries(node)
    assert refused.outcome == "refused" and refused.data["study_instance_uids"] == [study]
    assert "legal hold" in refused.data["reason"]


def test_a_delete_of_a_study_the_law_requires_kept_is_refused_and_recorded(node):
    study = store(node, "P21", Modality="MG", StudyDate=datetime.now(UTC).strftime("%Y%m%d"))
    series = node.archive.find_instances_exactly((("StudyInstanceUID", study),))[0]

    response = web_delete(node, f"/studies/{study}/series/{series.series_instance_uid}")

    assert response.status_code == 409 and "MSA-22-2" in response.json()["detail"]
    assert node.archive.counts()["instances"] == 2
    (refused,) = deletion_entries(node)
    assert refused.outcome == "refused" and "legal-record" in refused.data["reason"]


def test_an_allowed_delete_writes_the_destruction_record(node):
    study = store(node, "P22")
    kept = store(node, "P23")

    response = web_delete(node, f"/studies/{study}")

    assert response.status_code == 200 and response.json()["deleted"] == 2
    assert node.archive.counts()["instances"] == 2
    (done,) = deletion_entries(node)
    assert done.outcome == "done" and done.data["operation"] == "delete"
    assert done.data["study_instance_uids"] == [study] and kept not in str(done.data)
    assert done.data["policy_version"] == "hospital-2026-1"
    assert "recipients_with_copies" in done.data
    assert web_delete(node, f"/studies/{study}").status_code == 404


def test_a_patient_level_c_get_takes_a_star_in_a_patient_id_literally(node):
    """C-GET and C-MOVE hand data over: their Patient ID is a unique key, matched exactly."""
    from pydicom import Dataset
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, PatientRootQueryRetrieveInformationModelGet

    for patient in ("A*", "ALICE"):
        store(node, patient)
    received: list[str] = []

    def on_store(event):
        received.append(str(event.dataset.PatientID))
        return 0x0000

    ae = AE("WORKSTATION")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        "127.0.0.1",
        node.dimse.port,
        ae_title="DICOMNODE",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "PATIENT"
    identifier.PatientID = "A*"
    statuses = [
        s.Status
        for s, _ in assoc.send_c_get(identifier, PatientRootQueryRetrieveInformationModelGet)
        if s
    ]
    assoc.release()
    assert statuses[-1] == 0x0000
    assert received == ["A*", "A*"]
