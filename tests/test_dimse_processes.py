"""`dimse.processes = 2`: the main process and one DIMSE worker serve the one DIMSE port.

Real `dicomnode serve` processes and dcmtk senders: concurrent associations spread over both
processes and all land, /metrics and /healthz count for both, and a worker killed with
SIGKILL is started again and serves."""

from __future__ import annotations

import json
import os
import signal

import pytest

from dicomnode.archive import Archive
from tests.conftest import run_dcmtk, send_concurrently, wait_until
from tests.factory import write_series
from tests.test_serve import blob_files, http_get, metric, scrape, storescu_args

pytestmark = pytest.mark.dcmtk

SENDERS = 4
PER_SENDER = 25


def health(port: int) -> dict:
    status, _, body = http_get(port, "/healthz")
    assert status == 200, body
    return json.loads(body)


def worker_pids(node) -> list[int]:
    """The pids of the DIMSE workers the node started, in order."""
    return [e["pid"] for e in node.log_events("dimse_worker") if "pid" in e]


def test_four_concurrent_associations_over_two_processes_all_land(
    serve_node, tmp_path, database_url
):
    node = serve_node(processes=2)
    assert node.ready_event()["dimse_processes"] == 2
    [worker] = worker_pids(node)
    assert worker != node.process.pid
    state = health(node.http_port)
    assert state["dimse_processes"] == {"configured": 2, "running": 2}

    folders = [tmp_path / "in" / f"s{i}" for i in range(SENDERS)]
    for folder in folders:
        write_series(folder, PER_SENDER, size=16)
    send_concurrently(node.dimse_port, folders)

    total = SENDERS * PER_SENDER
    stored = "dicomnode_instances_received_total"
    samples = wait_until(
        lambda: (
            (s := scrape(node.http_port)) and metric(s, stored, outcome="stored") == total and s
        ),
        30,
        "every stored instance to be counted in /metrics (the worker reports its own)",
    )
    assert metric(samples, "dicomnode_associations_total", outcome="accepted") == SENDERS
    assert metric(samples, "dicomnode_bytes_received_total") == sum(
        p.stat().st_size for p in blob_files(tmp_path / "data")
    )
    assert node.terminate() == 0

    associations = node.log_events("association")
    assert sorted(a["store"] for a in associations) == [PER_SENDER] * SENDERS
    assert {a["pid"] for a in associations} == {node.process.pid, worker}  # both served
    assert len(blob_files(tmp_path / "data")) == total
    archive = Archive(tmp_path / "data", database_url)
    try:
        counts = archive.counts()
    finally:
        archive.close()
    assert counts["instances"] == total
    assert counts["series"] == SENDERS


def test_a_killed_worker_is_started_again_and_serves(serve_node, tmp_path, database_url):
    node = serve_node(processes=2)
    [first] = worker_pids(node)
    os.kill(first, signal.SIGKILL)

    def restarted() -> int:
        pids = worker_pids(node)
        ready = health(node.http_port)["dimse_processes"]["running"] == 2
        return pids[-1] if len(pids) == 2 and ready else 0

    second = wait_until(restarted, 60, "the killed DIMSE worker to be started again")
    assert second != first
    assert any(e.get("exitcode") == -signal.SIGKILL for e in node.log_events("dimse_worker"))

    folders = [tmp_path / "in" / f"s{i}" for i in range(2)]
    for folder in folders:
        write_series(folder, 10, size=16)
    send_concurrently(node.dimse_port, folders)
    assert run_dcmtk(*storescu_args(node.dimse_port, *sorted(folders[0].iterdir()))).returncode == 0

    assert node.terminate() == 0
    associations = node.log_events("association")
    assert sorted(a["store"] for a in associations) == [10, 10, 10]  # the re-send: duplicates
    assert second in {a["pid"] for a in associations}  # the new worker served
    assert len(blob_files(tmp_path / "data")) == 20
    archive = Archive(tmp_path / "data", database_url)
    try:
        assert archive.counts()["instances"] == 20
    finally:
        archive.close()
