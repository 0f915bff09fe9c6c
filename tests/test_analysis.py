"""Analysis jobs: units become complete, jobs run analyzers, results are filed into the same
study, and failures are recorded and retried; the state survives a restart.

The analyzers here are small test plugins: a series mean that writes a Basic Text SR (checked
against the pixel values sent), and ones that fail, hang or return another study's object.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from io import BytesIO

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.analysis import plugin
from dicomnode.analysis.plugin import AnalysisResult, Analyzer, Selector
from dicomnode.analysis.runner import AnalysisService
from dicomnode.config import read_settings
from dicomnode.core.model import Level, Source
from dicomnode.records import Workbench
from dicomnode.serve import Node
from tests.conftest import dicomweb_url, run_dcmtk, token_for
from tests.factory import make_ct, part10

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def text_report(unit, context, text: str) -> Dataset:
    """A minimal Basic Text SR in the unit's study, with the analysis's deterministic UIDs."""
    first = pydicom.dcmread(unit.paths[0], stop_before_pixels=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = context.uid("report")
    ds.SeriesInstanceUID = context.uid("series")
    ds.StudyInstanceUID = unit.study_instance_uid
    ds.PatientID = unit.patient_id
    ds.PatientName = first.PatientName
    ds.Modality = "SR"
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = text
    ds.ContentSequence = Sequence([item])
    return ds


class SeriesMean(Analyzer):
    name = "series-mean"
    version = "1.0"
    selector = Selector(modalities=frozenset({"CT"}))
    unit = "series"
    output_sop_classes = frozenset({BASIC_TEXT_SR})
    runs = 0

    def analyze(self, unit, context):
        type(self).runs += 1
        pixels = [pydicom.dcmread(p).pixel_array.astype(np.float64) for p in unit.paths]
        mean = float(np.mean(pixels))
        return AnalysisResult([text_report(unit, context, f"mean {mean:.6f}")], {"mean": mean})


class Failing(SeriesMean):
    name = "failing"

    def analyze(self, unit, context):
        raise ValueError("the model could not converge")


class Hanging(SeriesMean):
    name = "hanging"

    def analyze(self, unit, context):
        time.sleep(5)
        return AnalysisResult([])


class Stray(SeriesMean):
    name = "stray"

    def analyze(self, unit, context):
        ds = text_report(unit, context, "elsewhere")
        ds.StudyInstanceUID = generate_uid()
        return AnalysisResult([ds])


def analysis_toml(**analyzers: dict) -> str:
    lines = ["[analysis]", "enabled = false", "max_attempts = 2", "retry_backoff = 0"]
    for name, values in analyzers.items():
        lines.append(f'[analysis.analyzers."{name}"]')
        lines += [f"{k} = {v}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def send_series(node: Node, count: int = 3, **attributes) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    sent = []
    for n in range(1, count + 1):
        ds = make_ct(
            study_uid=study, series_uid=series, instance_number=n, size=8, seed=n, **attributes
        )
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        node.intake.receive_part10(buffer.getvalue(), Source("dimse", "MODALITY"))
        sent.append(ds)
    return sent


def dimse_answers(node: Node) -> bool:
    """The node's SCP still answers dcmtk's C-ECHO."""
    echo = run_dcmtk("echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(node.dimse.port))
    return echo.returncode == 0


def service_for(node: Node, *analyzers: type[Analyzer]) -> AnalysisService:
    service = AnalysisService(
        node.settings.analysis,
        Workbench(node.archive),
        node.intake,
        node.egress,
        {a.name: a for a in analyzers},
    )
    node.intake.subscribe(service.on_stored)
    return service


@pytest.fixture
def node(start_node):
    return start_node(
        extra=analysis_toml(**{"series-mean": {"quiet_period": 0.5}, "hanging": {"timeout": 0.5}})
    )


def test_a_quiet_series_is_analysed_and_the_result_filed_in_its_study(node):
    service = service_for(node, SeriesMean)
    sent = send_series(node)
    assert service.sweep() == 0  # still inside its quiet period
    assert service.sweep(datetime.now(UTC) + timedelta(seconds=1)) == 1
    job = service.run_one()
    assert job.state == "done" and job.reason == "quiet-period" and job.attempts == 1
    assert set(job.as_dict()["inputs"]) == {ds.SOPInstanceUID for ds in sent}
    expected = float(np.mean([ds.pixel_array.astype(np.float64) for ds in sent]))
    assert job.as_dict()["summary"]["mean"] == pytest.approx(expected, abs=1e-9)
    (report_uid,) = job.as_dict()["outputs"]
    (report,) = node.archive.find_instances(Level.IMAGE, (("SOPInstanceUID", report_uid),))
    assert report.study_instance_uid == sent[0].StudyInstanceUID  # filed in the same study
    stored = pydicom.dcmread(node.archive.blob_file(report))
    assert stored.ContentSequence[0].TextValue == f"mean {expected:.6f}"
    assert service.run_one() is None  # nothing else is due


def test_announced_instance_count_completes_a_series_without_waiting(node):
    service = service_for(node, SeriesMean)
    send_series(node, count=4, ImagesInAcquisition=4)
    assert service.sweep() == 1
    assert service.run_one().reason == "expected-count"


def test_a_rerun_replaces_the_result_instead_of_duplicating_it(node):
    service = service_for(node, SeriesMean)
    sent = send_series(node)
    (first,) = service.request(sent[0].StudyInstanceUID)
    done = service.run_one()
    before = node.archive.counts()["instances"]
    service.jobs.retry(first, datetime.now(UTC))
    again = service.run_one()
    assert again.state == "done"
    assert again.as_dict()["outputs"] == done.as_dict()["outputs"]
    assert node.archive.counts()["instances"] == before


def test_a_failing_analyzer_is_retried_then_marked_failed_with_its_reason(node):
    service = service_for(node, Failing)
    sent = send_series(node)
    service.request(sent[0].StudyInstanceUID)
    first = service.run_one()
    assert first.state == "queued" and "could not converge" in first.error
    second = service.run_one()
    assert second.state == "failed" and second.attempts == 2
    assert "ValueError: the model could not converge" in second.error
    assert service.run_one() is None
    assert dimse_answers(node)
    service.jobs.retry(second.id, datetime.now(UTC))
    assert service.jobs.get(second.id).state == "queued"


def test_a_hanging_analyzer_times_out(node):
    service = service_for(node, Hanging)
    sent = send_series(node)
    service.request(sent[0].StudyInstanceUID)
    started = time.monotonic()
    job = service.run_one()
    assert time.monotonic() - started < 3
    assert "timeout of 0.5 s" in job.error
    assert dimse_answers(node)


def test_an_output_for_another_study_is_refused_and_nothing_filed(node):
    service = service_for(node, Stray)
    sent = send_series(node)
    before = node.archive.counts()
    service.request(sent[0].StudyInstanceUID)
    job = service.run_one()
    assert job.state == "queued" and "belongs to study" in job.error
    assert node.archive.counts() == before


def test_queued_work_survives_a_restart(tmp_path, database_url):
    from tests.conftest import write_config

    config = write_config(
        tmp_path / "node.toml",
        tmp_path / "data",
        database_url,
        extra=analysis_toml(**{"series-mean": {"quiet_period": 0}}),
    )
    first = Node(read_settings(config))
    first.start()
    service = service_for(first, SeriesMean)
    sent = send_series(first)
    assert service.sweep() == 1
    first.stop()  # the job was queued, never run

    second = Node(read_settings(config))
    second.start()
    try:
        SeriesMean.runs = 0
        restarted = service_for(second, SeriesMean)
        job = restarted.run_one()
        assert job.state == "done" and SeriesMean.runs == 1
        assert restarted.run_one() is None
        assert len(restarted.jobs.list(study_uid=sent[0].StudyInstanceUID)) == 1
    finally:
        second.stop()


def test_a_job_whose_worker_died_is_claimed_again_after_its_lease(node):
    service = service_for(node, SeriesMean)
    sent = send_series(node)
    service.request(sent[0].StudyInstanceUID)
    now = datetime.now(UTC)
    claimed = service.jobs.claim("dead-worker", now, timedelta(seconds=30))
    assert claimed.state == "running"
    assert service.jobs.claim("other", now, timedelta(seconds=30)) is None  # leased
    later = service.jobs.claim("other", now + timedelta(seconds=31), timedelta(seconds=30))
    assert later.id == claimed.id and later.attempts == 2 and later.claimed_by == "other"


def test_jobs_api_and_explicit_run(start_node):
    node = start_node(
        extra='[analysis]\nworkers = 0\n[analysis.analyzers."ct-lung"]\nenabled = false\n'
    )
    sent = send_series(node)
    headers = {"Authorization": f"Bearer {token_for(node)}"}
    base = f"http://127.0.0.1:{node.http_port}/analysis"
    refused = requests.post(
        f"{base}/studies/{sent[0].StudyInstanceUID}/run", headers=headers, timeout=30
    )
    assert refused.status_code == 404  # no enabled analyzer wants this CT series
    node.analysis.analyzers = {"series-mean": SeriesMean()}
    queued = requests.post(
        f"{base}/studies/{sent[0].StudyInstanceUID}/run", headers=headers, timeout=30
    )
    assert queued.status_code == 202
    (job_id,) = queued.json()["jobs"]
    node.analysis.run_one()
    listed = requests.get(
        f"{base}/jobs", params={"study": sent[0].StudyInstanceUID}, headers=headers, timeout=30
    )
    assert [j["state"] for j in listed.json()] == ["done"]
    # job records name the patient and study: their disclosure is in the ledger
    last = list(node.archive.ledger.entries())[-1]
    assert last.data["operation"] == "job-info"
    assert last.data["study_instance_uids"] == [sent[0].StudyInstanceUID]
    shown = requests.get(f"{base}/jobs/{job_id}", headers=headers, timeout=30).json()
    assert shown["analyzer"] == "series-mean" and len(shown["outputs"]) == 1
    assert requests.get(f"{base}/jobs", timeout=30).status_code == 401
    assert dicomweb_url(node)  # the same node serves DICOMweb beside the jobs API


def test_analyzers_are_found_through_entry_points(monkeypatch):
    class Entry:
        def load(self):
            return SeriesMean

    monkeypatch.setattr(
        plugin, "entry_points", lambda group: [Entry()] if group == plugin.ENTRY_POINT_GROUP else []
    )
    assert plugin.discover() == {"series-mean": SeriesMean}


def test_a_selector_reads_an_arriving_header_as_pydicom_would():
    """Selectors are asked of every arriving object's raw header (read without pydicom's
    conversion); the answers are those of the values pydicom gives."""
    from dicomnode.archive.received import from_part10

    header = from_part10(
        part10(make_ct(BodyPartExamined="CHEST ", ImagesInAcquisition="12"))
    ).header
    chest_ct = Selector(
        sop_class_uids=frozenset({str(CTImageStorage)}),
        modalities=frozenset({"CT"}),
        attributes={"BodyPartExamined": frozenset({"CHEST"})},
    )
    assert chest_ct.matches(header)
    assert not Selector(modalities=frozenset({"MR"})).matches(header)
    assert not Selector(attributes={"BodyPartExamined": frozenset({"HEAD"})}).matches(header)
    assert not Selector(attributes={"Laterality": frozenset({"R"})}).matches(header)  # absent
    assert SeriesMean().unit_uid(header) == str(header.SeriesInstanceUID)
    assert SeriesMean().expected_instances(header) == 12
    assert SeriesMean().expected_instances(from_part10(part10(make_ct())).header) is None


def test_deterministic_uids_are_valid_and_stable():
    from dicomnode.core.uids import is_valid_uid

    first = plugin.deterministic_uid("xa-qca", "1.0", "1.2.3", "seg")
    assert first == plugin.deterministic_uid("xa-qca", "1.0", "1.2.3", "seg")
    assert first != plugin.deterministic_uid("xa-qca", "1.1", "1.2.3", "seg")
    assert is_valid_uid(first) and first.startswith("2.25.")


def test_end_to_end_a_sent_series_gets_its_report_without_being_asked(start_node, tmp_path):
    """storescu sends a series; after its quiet period the node's own workers analyse it and the
    report appears in QIDO-RS in the same study."""
    from tests.conftest import dicomweb_client, run_dcmtk, wait_until
    from tests.factory import write_series

    node = start_node(
        extra='[analysis]\nworkers = 1\nsweep_interval = 0.1\n[analysis.analyzers."series-mean"]\n'
        "quiet_period = 0.3\n"
    )
    node.analysis.analyzers = {"series-mean": SeriesMean()}
    paths = write_series(tmp_path / "series", 3, size=8)
    sent = run_dcmtk(
        "storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.dimse.port), *map(str, paths)
    )
    assert sent.returncode == 0, sent.stderr
    study = pydicom.dcmread(paths[0]).StudyInstanceUID
    client = dicomweb_client(node)

    def report_series():
        found = client.search_for_series(study, search_filters={"Modality": "SR"})
        return found or None

    (series,) = wait_until(report_series, 30, "the analysis report to appear in QIDO-RS")
    assert series["0020000D"]["Value"] == [study]
    (job,) = node.analysis.jobs.list(study_uid=study)
    assert job.state == "done" and job.reason == "quiet-period"


def test_the_job_record_keeps_the_provenance(start_node):
    """Inputs, analyzer name and version, the configured parameters and the code version are
    stored with the job (issue 4, item 7)."""
    from dicomnode import __version__

    node = start_node(extra=analysis_toml(**{"series-mean": {"params": "{ threshold = 2.5 }"}}))
    service = service_for(node, SeriesMean)
    sent = send_series(node)
    service.request(sent[0].StudyInstanceUID)
    record = service.run_one().as_dict()
    assert record["summary"]["provenance"] == {
        "analyzer": "series-mean",
        "analyzer_version": "1.0",
        "code_version": f"dicomnode {__version__}",
        "parameters": {"threshold": 2.5},
        "inputs": record["inputs"],
    }
    assert sorted(record["inputs"]) == sorted(ds.SOPInstanceUID for ds in sent)
