"""Analysis results go back to the hospital through egress: each forward is a decision in the
ledger, it is sent by C-STORE with bounded, visible retries, and a patient's withdrawal or
restriction stops queued analysis and forwarding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import BytesIO

import pytest
from pydicom.uid import generate_uid

from dicomnode.config import Peer
from dicomnode.core.model import Source
from tests.conftest import free_port
from tests.factory import make_ct
from tests.test_analysis import SeriesMean, send_series, service_for


def forwarding_toml(destination: str) -> str:
    return "\n".join(
        [
            "[analysis]",
            "enabled = false",  # the test drives its own service with a test analyzer
            "retry_backoff = 0",
            f'forward_to = ["{destination}"]',
            '[analysis.analyzers."series-mean"]',
            "quiet_period = 0",
            "[governance]",
            "delivery_backoff = 0",
            "delivery_attempts = 3",
            "checkpoint_interval = 0",
        ]
    )


LATER = timedelta(seconds=1)


def run_analysis(node):
    """Send a series of patient P5, let it complete and run its analysis job."""
    service = service_for(node, SeriesMean)
    send_series(node, 3, PatientID="P5")
    service.sweep(datetime.now(UTC) + LATER)
    job = service.run_one()
    return service, job


@pytest.fixture
def pacs_port() -> int:
    return free_port()


def test_results_reach_the_pacs_after_a_visible_failed_attempt(start_node, storescp, pacs_port):
    pacs = Peer("pacs", "PACS", "127.0.0.1", pacs_port, ("echo", "store"))
    node = start_node(peers=[pacs], extra=forwarding_toml("pacs"))
    node.housekeeping.stop()  # the test sends the deliveries itself
    service, job = run_analysis(node)
    assert job.state == "done", job.error
    (delivery_id,) = job.as_dict()["summary"]["deliveries"]
    (report_uid,) = job.as_dict()["outputs"]

    # The PACS is not listening yet: the attempt fails, is recorded, and stays queued.
    first = node.egress.deliver_due("test", timedelta(0))
    assert first.id == delivery_id and first.state == "queued" and first.attempts == 1
    assert "did not accept an association" in first.error
    transfers = [e for e in node.archive.ledger.entries() if e.kind == "transfer"]
    assert [t.outcome for t in transfers] == ["failed"]

    received = storescp("PACS", port=pacs_port)
    second = node.egress.deliver_due("test", timedelta(0))
    assert second.state == "done" and second.attempts == 2
    assert second.outcome["sent"] == [report_uid]
    [report] = received.received()
    assert report.SOPInstanceUID == report_uid and "mean" in report.ContentSequence[0].TextValue

    forwards = [e for e in node.archive.ledger.entries() if e.data.get("operation") == "forward"]
    assert [(e.kind, e.outcome) for e in forwards] == [
        ("disclosure", "allowed"),
        ("transfer", "failed"),
        ("disclosure", "allowed"),
        ("transfer", "complete"),
    ]
    assert forwards[0].data["activity"] == "return-results"
    assert forwards[0].data["recipient"] == "hospital"


def test_a_delivery_that_keeps_failing_ends_failed_with_its_reason(start_node, pacs_port):
    pacs = Peer("pacs", "PACS", "127.0.0.1", pacs_port, ("echo", "store"))
    node = start_node(peers=[pacs], extra=forwarding_toml("pacs"))
    node.housekeeping.stop()
    _, job = run_analysis(node)
    states = [node.egress.deliver_due("test", timedelta(0)).state for _ in range(3)]
    assert states == ["queued", "queued", "failed"]
    assert node.egress.deliver_due("test", timedelta(0)) is None  # nothing left to try
    (failed,) = node.archive.registry.deliveries(state="failed")
    assert failed.attempts == 3 and "association" in failed.error


def test_a_result_queued_again_is_forwarded_once(start_node, storescp, pacs_port):
    """A job claimed again after its node died files the same result (deterministic UIDs) and
    queues its forward again: the PACS must receive it once, while the first forward is
    queued and after it was sent."""
    pacs = Peer("pacs", "PACS", "127.0.0.1", pacs_port, ("echo", "store"))
    node = start_node(peers=[pacs], extra=forwarding_toml("pacs"))
    node.housekeeping.stop()
    _, job = run_analysis(node)
    (delivery_id,) = job.as_dict()["summary"]["deliveries"]
    (report_uid,) = job.as_dict()["outputs"]
    report = node.archive.find_instances_exactly((("SOPInstanceUID", report_uid),))
    assert node.egress.queue_forward(report, ["pacs"], "analysis/again") == [delivery_id]

    received = storescp("PACS", port=pacs_port)
    assert node.egress.deliver_due("test", timedelta(0)).state == "done"
    assert node.egress.queue_forward(report, ["pacs"], "analysis/again") == [delivery_id]
    assert node.egress.deliver_due("test", timedelta(0)) is None
    assert [r.SOPInstanceUID for r in received.received()] == [report_uid]
    assert len(node.archive.registry.deliveries()) == 1


def test_results_go_back_to_the_peer_that_sent_the_study(start_node, storescp):
    pacs = storescp("PACSB")
    node = start_node(peers=[pacs.peer], extra=forwarding_toml("sender"))
    node.housekeeping.stop()
    service = service_for(node, SeriesMean)
    send_series(node, 2)  # sent by "MODALITY", which is not a peer: nowhere to go
    service.sweep(datetime.now(UTC) + LATER)
    assert service.run_one().as_dict()["summary"]["deliveries"] == []

    study, series = generate_uid(), generate_uid()
    for n in (1, 2):  # now a study sent by the configured peer PACSB
        buffer = BytesIO()
        ds = make_ct("P6", study_uid=study, series_uid=series, instance_number=n, size=8)
        ds.save_as(buffer, enforce_file_format=True)
        node.intake.receive_part10(buffer.getvalue(), Source("dimse", "PACSB", peer="pacs-b"))
    service.sweep(datetime.now(UTC) + LATER)
    job = service.run_one()
    assert len(job.as_dict()["summary"]["deliveries"]) == 1
    assert node.egress.deliver_due("test", timedelta(0)).state == "done"
    assert len(pacs.received()) == 1


def test_withdrawn_consent_cancels_queued_analysis_and_forwarding(start_node, pacs_port):
    pacs = Peer("pacs", "PACS", "127.0.0.1", pacs_port, ("echo", "store"))
    node = start_node(peers=[pacs], extra=forwarding_toml("pacs"))
    node.housekeeping.stop()
    service, job = run_analysis(node)
    (delivery_id,) = job.as_dict()["summary"]["deliveries"]
    send_series(node, 2, PatientID="P5")  # a second series: its job is queued below
    service.sweep(datetime.now(UTC) + LATER)
    (queued,) = service.jobs.list(state="queued")

    stored, changed = node.stewardship.record_consent("P5", "TREAT", "withdrawn", "dpo")
    assert changed["cancelled_jobs"] == [queued.id]
    assert changed["cancelled_deliveries"] == [delivery_id]
    assert service.jobs.get(queued.id).state == "cancelled"
    assert node.archive.registry.delivery(delivery_id).state == "cancelled"
    assert node.egress.deliver_due("test", timedelta(0)) is None
    entry = [e for e in node.archive.ledger.entries() if e.kind == "consent"][-1]
    assert entry.data["cancelled_jobs"] == [queued.id] and entry.outcome == "withdrawn"


def test_a_restricted_patient_is_not_analysed_until_the_restriction_is_lifted(start_node):
    node = start_node(extra=forwarding_toml("sender"))
    node.housekeeping.stop()
    service = service_for(node, SeriesMean)
    send_series(node, 2, PatientID="P9")
    node.stewardship.restrict("P9", "dpo", "objection under PIPA 37")
    service.sweep(datetime.now(UTC) + LATER)
    held = service.run_one()
    assert held.state == "held" and "restricted" in held.error
    assert held.outputs is None
    processing = [e for e in node.archive.ledger.entries() if e.kind == "processing"]
    assert processing[-1].outcome == "denied" and processing[-1].data["operation"] == "analyze"
    assert service.run_one() is None  # held jobs are not claimed

    node.stewardship.unrestrict("P9", "dpo")
    assert service.jobs.get(held.id).state == "queued"
    assert service.run_one().state == "done"


def test_xa_and_ct_results_arrive_at_the_pacs_that_sent_the_studies(start_node, storescp, tmp_path):
    """End to end with the built-in analyzers: storescu (as the PACS) sends an XA cine and a
    CT series; the SEG and SR of each are filed in their studies and sent back to that PACS."""
    from dicomnode.analysis.ct_lung.phantom import chest_phantom, phantom_series
    from dicomnode.analysis.xa_qca.phantom import xa_cine, xa_dataset
    from tests.conftest import run_dcmtk, wait_until

    pacs = storescp("PACS")
    node = start_node(
        peers=[Peer("pacs", "PACS", "127.0.0.1", pacs.port, ("echo", "store", "find"))],
        extra="\n".join(
            [
                "[analysis]",
                "workers = 1",
                "sweep_interval = 0.1",
                'forward_to = ["sender"]',
                '[analysis.analyzers."ct-lung"]',
                "quiet_period = 0.5",
                "[governance]",
                "delivery_interval = 0.2",
            ]
        ),
    )
    folder = tmp_path / "studies"
    folder.mkdir()
    cine = xa_cine(2, n_frames=6)
    xa = xa_dataset(cine.frames, cine.pixel_spacing_mm)
    xa.save_as(folder / "xa.dcm", enforce_file_format=True)
    ct = phantom_series(chest_phantom(5, slices=12, size=64))
    for ds in ct:
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    sent = run_dcmtk(
        "storescu",
        "-aet",
        "PACS",
        "-aec",
        "DICOMNODE",
        "127.0.0.1",
        str(node.dimse.port),
        "+sd",
        str(folder),
    )
    assert sent.returncode == 0, sent.stderr

    received: list = []

    def four_results():
        received.extend(pacs.received(settled=1.0))  # still arriving
        return len(received) >= 4

    wait_until(four_results, 180, "the SEG and SR of both studies at the PACS")
    by_study = {}
    for ds in received:
        by_study.setdefault(ds.StudyInstanceUID, set()).add(ds.Modality)
    assert by_study == {xa.StudyInstanceUID: {"SEG", "SR"}, ct[0].StudyInstanceUID: {"SEG", "SR"}}
    done = wait_until(
        lambda: (
            (found := node.archive.registry.deliveries(state="done")) and len(found) == 2 and found
        ),
        30,
        "both deliveries recorded done",
    )
    assert {d.recipient for d in done} == {"pacs"}
    forwards = [e for e in node.archive.ledger.entries() if e.data.get("operation") == "forward"]
    assert [e.kind for e in forwards].count("disclosure") == 2
