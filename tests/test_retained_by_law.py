"""Data kept only because a law requires it is stored apart, with restricted access (PIPA 21(3),
checklist item 33): a study whose purpose has ended (erasure refused under a statutory
retention, consent withdrawn, the consented period over) and that only a legal retention keeps
moves to the retained store (``retained/`` blobs, a marked index row, a ledger entry); no normal
role sees or reads it (QIDO, WADO, C-FIND, a governance token); the ``governance.legal`` role
reads it with a stated reason, ledgered; when the legal period ends it is destroyed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import BytesIO

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from dicomnode.archive.retained import RetainedStore
from dicomnode.core.model import Level
from tests.conftest import WORKSTATION, dicomweb_client, dicomweb_url, token_for
from tests.test_governance_node import c_find, policy_text, publish_days_ago
from tests.test_patient_tokens import _patient_token
from tests.test_retention import RETENTION, later, store


@pytest.fixture
def node(start_node):
    node = start_node(peers=[WORKSTATION], extra="[governance]\nretention_interval = 0")
    publish_days_ago(node, policy_text() + RETENTION)
    return node


def _every_instance(node, study: str):
    return node.archive.find_instances_exactly(
        (("StudyInstanceUID", study),), include_retained=True
    )


def _get(node, path: str, token: str, **params) -> requests.Response:
    return requests.get(
        f"http://127.0.0.1:{node.http_port}{path}",
        params=params,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def test_item_33_a_study_kept_only_by_law_is_stored_apart_and_read_only_by_the_legal_role(node):
    today = datetime.now(UTC).strftime("%Y%m%d")
    kept = store(node, "P33", Modality="MG", StudyDate=today)  # MSA-22-2: five years
    other = store(node, "P34")
    before = [node.archive.blob_file(i) for i in _every_instance(node, kept)]
    assert all(path.exists() for path in before)

    # the erasure is refused under the statutory retention: the study moves to retained/
    refused = node.stewardship.erase_subject("P33", "dpo")
    assert not refused.done and "MSA-22-2" in refused.reason
    assert refused.changed == {"retained_by_law": [kept]}
    moved = _every_instance(node, kept)
    assert len(moved) == 2 and all(i.blob_path.startswith("retained/") for i in moved)
    root = node.settings.node.data_dir / "blobs"
    assert all((root / i.blob_path).is_file() for i in moved)
    assert not any(path.exists() for path in before)  # the originals are gone
    (study,) = RetainedStore(node.archive).studies()
    assert (study.study_instance_uid, study.legal_basis, study.rule_id) == (
        kept,
        "MSA-22-2",
        "legal-record",
    )
    assert study.retained_until.year == datetime.now(UTC).year + 5
    (entry,) = [e for e in node.archive.ledger.entries() if e.kind == "retention"]
    assert entry.outcome == "retained-by-law" and entry.data["legal_basis"] == "MSA-22-2"
    assert entry.data["retained_until"] == study.retained_until.isoformat()
    assert "erasure" in entry.data["ground"] and entry.data["study_instance_uids"] == [kept]
    assert node.archive.find_instances(Level.STUDY, (("StudyInstanceUID", kept),)) == []

    # an object of the study that arrives later is hidden with it, and moved by the next sweep
    store(node, "P33", study=kept, count=1, Modality="MG", StudyDate=today)
    assert node.archive.find_instances(Level.STUDY, (("StudyInstanceUID", kept),)) == []
    assert sum(not i.blob_path.startswith("retained/") for i in _every_instance(node, kept)) == 1
    assert node.stewardship.retention_sweep("dpo").retained == []  # not newly retained
    moved = _every_instance(node, kept)
    assert len(moved) == 3 and all(i.blob_path.startswith("retained/") for i in moved)
    assert [e.data["moved_instances"] for e in node.archive.ledger.entries()
            if e.kind == "retention"][-1] == [moved[-1].sop_instance_uid]  # fmt: skip

    # normal roles: QIDO does not list it, WADO answers 404, C-FIND finds nothing
    client = dicomweb_client(node)
    listed = {a["0020000D"]["Value"][0] for a in client.search_for_studies()}
    assert other in listed and kept not in listed
    assert client.search_for_studies(search_filters={"PatientID": "P33"}) == []
    normal = token_for(node)
    for path in (f"/studies/{kept}", f"/studies/{kept}/metadata"):
        assert _get(node, "/dicomweb" + path, normal).status_code == 404
    sop = moved[0].sop_instance_uid
    series = moved[0].series_instance_uid
    instance_url = f"{dicomweb_url(node)}/studies/{kept}/series/{series}/instances/{sop}"
    assert requests.get(
        instance_url, headers={"Authorization": f"Bearer {normal}"}, timeout=30
    ).status_code == 404  # fmt: skip
    own = _patient_token(node, {"patient": "P33"})  # the patient's own token: nothing either
    listed_to_patient = _get(node, "/dicomweb/studies", own)
    assert listed_to_patient.status_code in (200, 204), listed_to_patient.text
    assert not listed_to_patient.content or listed_to_patient.json() == []
    as_if_absent = _get(node, f"/dicomweb/studies/{generate_uid()}", own).status_code
    assert _get(node, f"/dicomweb/studies/{kept}", own).status_code == as_if_absent >= 403
    deleted = requests.delete(
        f"{dicomweb_url(node)}/studies/{kept}",
        headers={"Authorization": f"Bearer {normal}"},
        timeout=30,
    )
    assert deleted.status_code == 404  # a client's DELETE does not reach it either
    status, answers = c_find(node, PatientID="P33")
    assert status == 0 and answers == []
    status, answers = c_find(node, StudyInstanceUID=kept)
    assert status == 0 and answers == []
    dpo_admin = token_for(node, ("governance.read", "governance.admin", "dicomweb.read"))
    assert _get(node, "/governance/api/retained", dpo_admin).status_code == 403
    assert _get(node, f"/governance/api/retained/{kept}", dpo_admin, reason="x").status_code == 403

    # the legal role reads it, stating a reason; each read is a ledger entry
    legal = token_for(node, ("governance.legal",), subject="legal-counsel")
    listing = _get(node, "/governance/api/retained", legal)
    assert listing.status_code == 200
    assert [(s["study_instance_uid"], s["legal_basis"]) for s in listing.json()] == [
        (kept, "MSA-22-2")
    ]
    assert _get(node, f"/governance/api/retained/{kept}", legal).status_code == 400  # no reason
    assert _get(node, f"/governance/api/retained/{other}", legal, reason="x").status_code == 404
    reason = "court order 2026-Ga-1234: produce the mammogram record"
    read = _get(node, f"/governance/api/retained/{kept}/instances/{sop}", legal, reason=reason)
    assert read.status_code == 200 and read.headers["Content-Type"] == "application/dicom"
    ds = pydicom.dcmread(BytesIO(read.content))
    assert (ds.SOPInstanceUID, ds.PatientID) == (sop, "P33")
    accesses = [
        e
        for e in node.archive.ledger.entries()
        if e.kind == "disclosure" and e.data.get("operation") == "legal-access"
    ]
    assert len(accesses) == 1
    (access,) = accesses
    assert access.actor == "legal-counsel" and reason in access.data["reason"]
    assert access.data["basis"] == "MSA-22-2" and access.data["sop_instance_uids"] == [sop]
    assert access.data["patient_ids"] == ["P33"] and access.data["service"] == "retained"

    # at the end of the legal period, retention destroys it as any other study
    later(node, 5 * 366 + 1)
    report = node.stewardship.retention_sweep("dpo")
    assert kept in {i.study_instance_uid for i in report.destroyed}
    assert _every_instance(node, kept) == [] and RetainedStore(node.archive).studies() == []
    assert not any((root / i.blob_path).exists() for i in moved)
    assert _get(node, "/governance/api/retained", legal).json() == []
    (destroyed,) = [
        e
        for e in node.archive.ledger.entries()
        if e.kind == "deletion" and kept in e.data.get("study_instance_uids", [])
    ]
    assert destroyed.data["rule_id"] == "legal-record"
    assert set(destroyed.data["sop_instance_uids"]) == {i.sop_instance_uid for i in moved}


def test_a_withdrawn_or_ended_consent_moves_a_legally_kept_study_at_the_next_sweep(node):
    today = datetime.now(UTC).strftime("%Y%m%d")
    withdrawn = store(node, "P35", Modality="MG", StudyDate=today)
    ended = store(node, "P36", Modality="MG", StudyDate=today)
    plain = store(node, "P37", Modality="MG", StudyDate=today)  # purpose not ended: stays
    node.stewardship.record_consent("P35", "TREAT", "withdrawn", "dpo", evidence_ref="letter")
    node.stewardship.record_consent(
        "P36", "TREAT", "granted", "dpo", valid_until=datetime.now(UTC) + timedelta(days=1)
    )
    later(node, 2)
    dry = node.stewardship.retention_sweep("dpo", dry_run=True)
    assert {r.study_instance_uid: r.ground.split(" on ")[0] for r in dry.retained} == {
        withdrawn: "consent withdrawn",
        ended: "the consented period ended",
    }
    assert RetainedStore(node.archive).studies() == []  # the dry run moved nothing
    real = node.stewardship.retention_sweep("dpo")
    assert real.retained == dry.retained and real.destroyed == []
    assert {s.study_instance_uid for s in RetainedStore(node.archive).studies()} == {
        withdrawn,
        ended,
    }
    for study in (withdrawn, ended):
        assert all(i.blob_path.startswith("retained/") for i in _every_instance(node, study))
    assert not any(i.blob_path.startswith("retained/") for i in _every_instance(node, plain))
    assert node.stewardship.retention_sweep("dpo").retained == []  # moved once
    assert len([e for e in node.archive.ledger.entries() if e.kind == "retention"]) == 2
    # the archive check counts the retained blobs as indexed, not missing
    check = node.archive.check()
    assert check.ok and check.unindexed_blobs == [] and check.blobs == check.indexed == 6


def test_a_legal_access_needs_a_reason_and_a_running_legal_period():
    from dicomnode.governance.retained_access import MAX_REASON, legal_access

    now = datetime(2027, 1, 1, tzinfo=UTC)
    until = now + timedelta(days=365)
    allowed = legal_access("MSA-22-2", until, "court order 12", "v1", now)
    assert allowed.allowed and allowed.basis == "MSA-22-2" and "court order 12" in allowed.reason
    assert allowed.rule_id == "retained-by-law" and allowed.activity == "legal-access"
    for reason, moment, why in (
        ("  ", now, "no reason"),
        ("x" * (MAX_REASON + 1), now, "longer than"),
        ("court order 12", until, "legal period is over"),
    ):
        refused = legal_access("MSA-22-2", until, reason, "v1", moment)
        assert not refused.allowed and why in refused.reason
