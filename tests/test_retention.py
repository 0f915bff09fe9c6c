"""Retention and destruction, legal holds, data-subject requests and the disk quota: data is kept
for the policy's period and then destroyed so that nothing can retrieve it, each destruction is
in the ledger, a legal hold blocks every deletion, erasure is refused while the law requires the
data, and at its quota the node refuses new data instead of deleting old data."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from io import BytesIO

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from dicomnode.core.errors import NotPermitted
from dicomnode.core.model import Level, Source
from tests.conftest import (
    WORKSTATION,
    dicomweb_client,
    dicomweb_url,
    run_dcmtk,
    token_for,
)
from tests.factory import make_ct, write_series
from tests.test_governance_node import c_find, policy_text, publish_days_ago

RETENTION = """
[[retention]]
id = "images"
category = "received-images"
period = "P90D"
start = "received"

[[retention]]
id = "results"
category = "analysis-results"
period = "P30D"
start = "received"

[[retention]]
id = "legal-record"
category = "received-images"
period = "P5Y"
start = "study-date"
priority = 5
modalities = ["MG"]
legal_basis = "MSA-22-2"
description = "Mammograms are the hospital's record here: kept five years"

[[retention]]
id = "withdrawn"
category = "received-images"
period = "P5D"
start = "consent-withdrawn"
priority = 10
"""


def store(node, patient: str, study: str | None = None, count: int = 2, **attributes) -> str:
    study = study or generate_uid()
    series = generate_uid()
    for n in range(1, count + 1):
        buffer = BytesIO()
        ds = make_ct(
            patient, study_uid=study, series_uid=series, instance_number=n, size=8, **attributes
        )
        ds.save_as(buffer, enforce_file_format=True)
        node.intake.receive_part10(buffer.getvalue(), Source("dimse", "MODALITY"))
    return study


def file_result(node, study: str, patient: str) -> str:
    """An SR the node's analysis produced for `study` (filed as analysis output is)."""
    from tests.test_analysis import text_report

    class Unit:
        study_instance_uid, patient_id = study, patient
        paths = [
            node.archive.blob_file(
                node.archive.find_instances(Level.STUDY, (("StudyInstanceUID", study),))[0]
            )
        ]

    class Context:
        @staticmethod
        def uid(role: str) -> str:
            return generate_uid()

    ds = text_report(Unit, Context, "a result")
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    node.intake.receive_part10(buffer.getvalue(), Source("analysis", "series-mean/1.0"), study)
    return str(ds.SOPInstanceUID)


def later(node, days: float) -> datetime:
    moment = datetime.now(UTC) + timedelta(days=days)
    node.stewardship.clock = lambda: moment
    return moment


def in_archive(node, study: str) -> int:
    return len(node.archive.find_instances(Level.STUDY, (("StudyInstanceUID", study),)))


@pytest.fixture
def node(start_node):
    node = start_node(peers=[WORKSTATION], extra="[governance]\nretention_interval = 0")
    publish_days_ago(node, policy_text() + RETENTION)
    return node


def test_an_expired_study_is_destroyed_and_a_held_one_survives(node):
    expired = store(node, "P1")
    result = file_result(node, expired, "P1")
    held = store(node, "P2")
    today = datetime.now(UTC).strftime("%Y%m%d")
    kept = store(node, "P3", Modality="MG", StudyDate=today)  # the legal record: five years
    blob = node.archive.blob_file(
        node.archive.find_instances(Level.STUDY, (("StudyInstanceUID", expired),))[0]
    )
    hold = node.stewardship.place_hold(
        "dpo", "legal counsel", "litigation 2026-44", patient_id="P2", case_ref="2026-44"
    )

    later(node, 91)
    dry = node.stewardship.retention_sweep("dpo", dry_run=True)
    assert {(i.study_instance_uid, i.category) for i in dry.destroyed} == {
        (expired, "received-images"),
        (expired, "analysis-results"),
    }
    assert [(i.study_instance_uid, i.action) for i in dry.skipped] == [(held, "keep-hold")]
    assert in_archive(node, expired) == 3  # the dry run changed nothing

    real = node.stewardship.retention_sweep("dpo")
    assert real.destroyed == dry.destroyed and real.skipped == dry.skipped  # as predicted

    assert in_archive(node, expired) == 0 and not blob.exists()
    assert in_archive(node, held) == 2 and in_archive(node, kept) == 2
    status, answers = c_find(node, StudyInstanceUID=expired)
    assert status == 0 and answers == []
    client = dicomweb_client(node)
    assert client.search_for_studies(search_filters={"StudyInstanceUID": expired}) == []
    gone = requests.get(
        f"{dicomweb_url(node)}/studies/{expired}",
        timeout=30,
        headers={"Authorization": f"Bearer {token_for(node)}"},
    )
    assert gone.status_code == 404

    deletions = [e for e in node.archive.ledger.entries() if e.kind == "deletion"]
    (destroyed,) = [d for d in deletions if d.outcome == "done"]
    assert destroyed.data["study_instance_uids"] == [expired]
    assert result in destroyed.data["sop_instance_uids"]  # the SR went with its study
    assert destroyed.data["rule_id"] == "images" and "P90D" in destroyed.data["reason"]
    assert destroyed.data["method"] == "blob files unlinked, index rows deleted"
    (skip,) = [d for d in deletions if d.outcome == "skipped"]
    assert skip.data["study_instance_uids"] == [held] and hold.ref in skip.data["reason"]

    from tests.test_governance_node import spooled_events

    assert ("110105", "D", "0") in spooled_events(node)  # an audit "study deleted" message

    node.stewardship.release_hold(hold.id, "dpo")
    assert [i.study_instance_uid for i in node.stewardship.retention_sweep("dpo").destroyed] == [
        held
    ]


def test_results_can_go_before_their_images_never_after(node):
    study = store(node, "P4")
    result = file_result(node, study, "P4")
    later(node, 31)
    report = node.stewardship.retention_sweep("dpo")
    assert [(i.category, i.rule_id) for i in report.destroyed] == [("analysis-results", "results")]
    left = {
        i.sop_instance_uid
        for i in node.archive.find_instances(Level.STUDY, (("StudyInstanceUID", study),))
    }
    assert len(left) == 2 and result not in left


def test_withdrawn_consent_shortens_retention(node):
    study = store(node, "P5")
    node.stewardship.record_consent("P5", "TREAT", "withdrawn", "dpo", evidence_ref="letter")
    later(node, 4)
    assert node.stewardship.retention_sweep("dpo").destroyed == []
    later(node, 6)
    (gone,) = node.stewardship.retention_sweep("dpo").destroyed
    assert (gone.study_instance_uid, gone.rule_id) == (study, "withdrawn")


def test_erasure_is_refused_under_a_legal_retention_or_a_hold(node):
    store(node, "P6", Modality="MG", StudyDate=datetime.now(UTC).strftime("%Y%m%d"))
    refused = node.stewardship.erase_subject("P6", "dpo")
    assert not refused.done and "MSA-22-2" in refused.reason and "legal-record" in refused.reason
    assert node.archive.counts()["instances"] == 2
    entry = [e for e in node.archive.ledger.entries() if e.kind == "subject"][-1]
    assert entry.outcome == "refused" and entry.data["reason"] == refused.reason

    store(node, "P7")
    node.stewardship.place_hold("dpo", "counsel", "complaint", patient_id="P7")
    held = node.stewardship.erase_subject("P7", "dpo")
    assert not held.done and "legal hold" in held.reason


def test_erasure_destroys_everything_of_the_patient(node, tmp_path):
    study = store(node, "P8")
    file_result(node, study, "P8")
    store(node, "P9")
    done = node.stewardship.erase_subject("P8", "dpo")
    assert done.done and done.changed["instances"] == 3
    assert node.archive.find_instances(Level.PATIENT, (("PatientID", "P8"),)) == []
    assert node.archive.counts()["instances"] == 2  # the other patient's data stays
    kinds = [(e.kind, e.outcome) for e in node.archive.ledger.entries()][-2:]
    assert kinds == [("deletion", "done"), ("subject", "erased")]


def test_restriction_blocks_a_share(node):
    study = store(node, "P10")
    node.stewardship.record_consent("P10", "HRESCH", "granted", "dpo")
    node.stewardship.restrict("P10", "dpo", "objection")
    delivery = node.egress.deliver_now(node.egress.queue_share("lab", study, "dpo"), timedelta(0))
    assert delivery.state == "denied" and "restricted" in delivery.error


def test_the_export_holds_every_instance_and_every_disclosure(node, tmp_path):
    first = store(node, "P11")
    second = store(node, "P11", count=1)
    store(node, "P12")
    c_find(node, PatientID="P11")
    dicomweb_client(node).retrieve_study(first)
    node.egress.deliver_now(node.egress.queue_share("lab", second, "dpo"), timedelta(0))  # denied
    config = str(node.settings.source)
    out = tmp_path / "export"
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomnode.cli",
            "subject",
            "export",
            "--patient-id",
            "P11",
            "--output",
            str(out),
            "--config",
            config,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr
    files = sorted(out.glob("DICOM/**/*.dcm"))
    assert len(files) == 3
    assert {str(pydicom.dcmread(f).PatientID) for f in files} == {"P11"}
    summary = json.loads((out / "summary.json").read_text())
    operations = [(d["kind"], d["operation"]) for d in summary["disclosures"]]
    assert ("disclosure", "find") in operations and ("disclosure", "wado") in operations
    assert ("denial", "share") in operations
    every = [
        e.seq
        for e in node.archive.ledger.entries()
        if "P11" in (e.data.get("patient_ids") or ())
        and e.kind in ("disclosure", "denial", "transfer")
    ]
    assert [d["seq"] for d in summary["disclosures"]] == every[: len(summary["disclosures"])]
    assert "Every disclosure" in (out / "summary.txt").read_text()


def test_at_its_quota_the_node_refuses_new_data_and_deletes_nothing(start_node, tmp_path):
    node = start_node(peers=[WORKSTATION])
    files = write_series(tmp_path / "in", 1, patient_id="P13")
    sent = run_dcmtk(
        "storescu",
        "-aet",
        "WORKSTATION",
        "-aec",
        "DICOMNODE",
        "127.0.0.1",
        str(node.dimse.port),
        *map(str, files),
    )
    assert sent.returncode == 0
    node.archive.quota_bytes = node.archive.storage()["used_bytes"] + 100
    more = write_series(tmp_path / "more", 1, patient_id="P14")
    refused = run_dcmtk(
        "storescu",
        "-d",
        "-aet",
        "WORKSTATION",
        "-aec",
        "DICOMNODE",
        "127.0.0.1",
        str(node.dimse.port),
        *map(str, more),
    )
    assert "0xa700" in (refused.stdout + refused.stderr).lower()  # refused: out of resources
    assert node.archive.counts()["instances"] == 1  # nothing deleted to make room
    health = requests.get(f"http://127.0.0.1:{node.http_port}/healthz", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "refusing-new-data"
    assert health.json()["storage"]["refusing_new_data"] is True


def test_retention_from_the_command_line(node):
    store(node, "P15")
    config = str(node.settings.source)
    dry = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomnode.cli",
            "retention",
            "sweep",
            "--dry-run",
            "--config",
            config,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0 and "0 would destroy" in dry.stdout
    status = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "retention", "status", "--config", config],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "keep" in status.stdout and "images" in status.stdout


# --- regressions found in review ----------------------------------------------------------


def test_a_hold_placed_after_the_decision_still_stops_the_deletion(node):
    study = store(node, "P20")
    node.stewardship.place_hold("dpo", "counsel", "late complaint", study_uid=study)
    with pytest.raises(NotPermitted, match="legal hold"):  # checked in the deleting transaction
        node.archive.delete(
            Level.STUDY, (("StudyInstanceUID", study),), "dpo", "test", unless_held=True
        )
    assert in_archive(node, study) == 2


def test_objects_that_arrive_after_the_decision_are_not_destroyed_with_it(node):
    study = store(node, "P21")
    decided = datetime.now(UTC)
    store(node, "P21", study=study, count=1)  # arrives after the decision
    removed = node.archive.delete(
        Level.STUDY, (("StudyInstanceUID", study),), "dpo", "test", received_before=decided
    )
    assert len(removed) == 2 and in_archive(node, study) == 1


def test_erasure_removes_the_patients_job_and_delivery_records(node):
    study = store(node, "P22")
    node.egress.queue_share("lab", study, "dpo")
    done = node.stewardship.erase_subject("P22", "dpo")
    assert done.done and done.changed["records_removed"]["deliveries"] == 1
    assert node.archive.registry.deliveries(patient_id="P22") == []


def test_held_objects_take_space_and_expire_like_received_images(start_node, tmp_path):
    node = start_node(peers=[WORKSTATION], extra="[governance]\nretention_interval = 0")
    publish_days_ago(node, policy_text(unknown_sender="hold") + RETENTION)
    files = write_series(tmp_path / "in", 2, patient_id="P23")
    sent = run_dcmtk("storescu", "-aet", "STRANGER", "-aec", "DICOMNODE", "127.0.0.1",
                     str(node.dimse.port), *map(str, files))  # fmt: skip
    assert sent.returncode == 0 and len(node.archive.registry.quarantined()) == 2
    node.archive._usage = None  # re-read the stored bytes
    assert node.archive.storage()["used_bytes"] >= sum(f.stat().st_size for f in files) - 1024
    later(node, 91)
    report = node.stewardship.retention_sweep("dpo")
    assert [(i.held, i.category) for i in report.destroyed] == [(True, "received-images")]
    assert node.archive.registry.quarantined() == []
    assert not any((node.settings.node.data_dir / "blobs" / "held").rglob("*.dcm"))
