"""Several `dicomnode serve` processes on one PostgreSQL behind Debian's HAProxy (issue 20).

Each node has its own data folder (audit spool, temporary files); the blobs are in one
SeaweedFS bucket over S3 (DICOMNODE_SCALE_OUT_STORE=filesystem: a shared folder linked into
each data folder instead); keys and secrets are in the database. HAProxy balances DIMSE in
TCP mode (leastconn, PROXY protocol v2 from 127.0.0.2) and DICOMweb in HTTP mode, checking
each node's /healthz, with `retries 3` and `option redispatch 1`.

Scenarios: 8 concurrent storescu associations of 100 objects through the balancer (counts
exact, every object retrievable from every node, the ledger verifies after concurrent
appends from every node); one node killed with SIGKILL mid-ingest (the survivors finish,
nothing acknowledged is lost); SIGTERM drain (503 first, then stop) with zero failed
associations.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import sqlalchemy
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicomnode.archive import schema
from dicomnode.core.metrics import Metrics
from dicomnode.serve.observe import TIMED_OPERATIONS, TimedStore, queue_depths, time_ledger_lock
from tests.conftest import ServeProcess, send_concurrently, serve, wait_until
from tests.factory import write_series
from tests.realclients.haproxy import SOURCE, Backend, HAProxy, start_haproxy
from tests.realclients.seaweedfs import BUCKET, SeaweedFS, start_seaweedfs

CLUSTER_MARKS = (pytest.mark.scale_out, pytest.mark.postgres, pytest.mark.dcmtk, pytest.mark.s3)


def cluster_test(test):
    """A test on the module's cluster (marked scale_out, postgres, dcmtk)."""
    for mark in CLUSTER_MARKS:
        test = mark(test)
    return test


INTER_MS, FALL = 500, 2  # the balancer sees a 503 within ~1 s (a check may take up to 2 s)
DRAIN_SECONDS = 3.0  # past that window
START_SECONDS = 180  # a node's start on a loaded 2-core machine (usually 5-15 s)


@dataclass
class Cluster:
    folder: Path
    database_url: str
    configs: list[Path]
    nodes: list[ServeProcess]
    balancer: HAProxy
    token: str = ""
    s3: SeaweedFS | None = None  # the bucket's server, or None: blobs in a shared folder

    def engine(self) -> sqlalchemy.Engine:
        return sqlalchemy.create_engine(self.database_url)

    def count(self, sql: str) -> int:
        engine = self.engine()
        try:
            with engine.connect() as conn:
                return int(conn.execute(sqlalchemy.text(sql)).scalar_one())
        finally:
            engine.dispose()

    def alive(self) -> list[ServeProcess]:
        return [n for n in self.nodes if n.process.poll() is None]

    def name(self, node: ServeProcess) -> str:
        return f"n{self.nodes.index(node) + 1}"

    def no_duplicates(self) -> bool:
        return self.count("SELECT count(*) - count(DISTINCT sop_instance_uid) FROM instances") == 0

    def stored_uids(self) -> set[str]:
        engine = self.engine()
        try:
            with engine.connect() as conn:
                rows = conn.execute(sqlalchemy.text("SELECT sop_instance_uid FROM instances"))
                return {row[0] for row in rows}
        finally:
            engine.dispose()

    def cli(self, index: int, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dicomnode.cli", *args, "--config", str(self.configs[index])],
            capture_output=True,
            text=True,
            timeout=120,
        )


def node_config(folder: Path, index: int, database_url: str, s3: SeaweedFS | None) -> Path:
    """Node `index`'s settings: its own data folder; the blobs in the bucket of `s3`, or
    (without it) in a shared folder linked into each data folder."""
    data = folder / f"n{index}"
    data.mkdir(parents=True)
    storage = ["[storage]", 'backend = "filesystem"']
    if s3 is None:
        (folder / "shared" / "blobs").mkdir(parents=True, exist_ok=True)
        (data / "blobs").symlink_to(folder / "shared" / "blobs")
    else:
        storage = [
            "[storage]",
            'backend = "s3"',
            f'endpoint = "{s3.endpoint}"',
            f'bucket = "{BUCKET}"',
            f'credentials_file = "{s3.credentials_file}"',
        ]
    path = folder / f"n{index}.toml"
    path.write_text(
        "\n".join(
            [
                "[node]",
                'ae_title = "DICOMNODE"',
                f'name = "n{index}"',
                f'data_dir = "{data}"',
                "min_free_bytes = 0",
                f"drain_seconds = {DRAIN_SECONDS}",
                "[dimse]",
                'host = "127.0.0.1"',
                "port = 0",
                "drain_timeout = 20",
                "max_associations = 32",
                f'proxy_protocol_from = ["{SOURCE}"]',
                "[http]",
                'host = "127.0.0.1"',
                "port = 0",
                f'trusted_proxies = ["{SOURCE}"]',
                "[analysis]",
                "enabled = false",
                *storage,
                "[database]",
                f'url = "{database_url}"',
                "migrate_at_start = true",  # the first node to start migrates (under a lock)
                "",
            ]
        )
    )
    return path


def start_cluster(
    folder: Path, database_url: str, count: int, s3: SeaweedFS | None = None
) -> Cluster:
    """`count` nodes on `database_url` (the first alone: it migrates the schema; then the
    others at once) and HAProxy in front of them; blobs in `s3`'s bucket when given."""
    configs = [node_config(folder, i, database_url, s3) for i in range(1, count + 1)]
    nodes: list[ServeProcess] = []
    try:
        nodes.append(serve(configs[0], folder / "n1.log", timeout=START_SECONDS))
        with ThreadPoolExecutor(count) as pool:
            token = pool.submit(
                subprocess.run,
                [sys.executable, "-m", "dicomnode.cli", "token", "create", "--scope"]
                + ["dicomweb.read", "--subject", "scale-out", "--config", str(configs[0])],
                capture_output=True,
                text=True,
                timeout=120,
            )
            started = [
                pool.submit(serve, configs[i - 1], folder / f"n{i}.log", None, START_SECONDS)
                for i in range(2, count + 1)
            ]
            for future in started:  # each one that started is kept, to be stopped on failure
                with contextlib.suppress(Exception):
                    nodes.append(future.result())
        assert len(nodes) == count, "a node did not start (see its log)"
        assert token.result().returncode == 0, token.result().stderr
        backends = [Backend(f"n{i}", n.dimse_port, n.http_port) for i, n in enumerate(nodes, 1)]
        balancer = start_haproxy(folder / "haproxy", backends, inter_ms=INTER_MS, fall=FALL)
    except BaseException:
        for node in nodes:
            node.terminate(signal.SIGKILL)
        raise
    made = Cluster(folder, database_url, configs, nodes, balancer, token.result().stdout.strip())
    made.s3 = s3
    return made


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory) -> Iterator[Cluster]:
    """Three nodes for the module, blobs in SeaweedFS (S3) unless DICOMNODE_SCALE_OUT_STORE
    is "filesystem". The tests run in order and each leaves fewer nodes: the 8 x 100 test
    uses all three, the kill test kills one, the drain test drains the next."""
    started = time.monotonic()
    folder = tmp_path_factory.mktemp("cluster")
    filesystem = os.environ.get("DICOMNODE_SCALE_OUT_STORE", "s3") == "filesystem"
    s3 = None if filesystem else start_seaweedfs(folder / "seaweedfs")
    try:
        made = start_cluster(folder, postgres.create_database(), 3, s3)
        print(f"3 nodes and HAProxy started in {time.monotonic() - started:.1f} s")
        yield made
        made.balancer.stop()
        for node in made.nodes:
            if node.process.poll() is None:
                node.terminate(signal.SIGKILL)
    finally:
        if s3 is not None:
            s3.stop()


def get(url: str, token: str = "", accept: str = "") -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if accept:
        headers["Accept"] = accept
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def retrieved_uids(port: int, token: str, study: str) -> set[str]:
    """The SOP Instance UIDs of a study as WADO-RS retrieves it from the node at `port`."""
    status, body = get(
        f"http://127.0.0.1:{port}/dicomweb/studies/{study}",
        token,
        'multipart/related; type="application/dicom"',
    )
    assert status == 200, body[:300]
    boundary_end = body.index(b"\r\n")
    boundary = body[:boundary_end]
    uids = set()
    for part in body.split(boundary)[1:]:
        if b"\r\n\r\n" not in part:
            continue
        payload = part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
        if payload:
            uids.add(str(pydicom.dcmread(BytesIO(payload), stop_before_pixels=True).SOPInstanceUID))
    return uids


def study_of(folder: Path) -> str:
    first = next(folder.glob("*.dcm"))
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


# --- 8 x 100 through the balancer -------------------------------------------------------------


@cluster_test
def test_eight_associations_land_once_every_node_serves_them_and_the_ledger_verifies(
    cluster, tmp_path
):
    c = cluster
    assert len(c.alive()) == 3
    folders = [tmp_path / "in" / f"s{i}" for i in range(8)]
    for i, folder in enumerate(folders):
        write_series(folder, 100, patient_id=f"SCALE{i}", size=8)
    before = c.count("SELECT count(*) FROM instances")
    logged_before = [len(n.log_events("association")) for n in c.nodes]
    started = time.monotonic()
    send_concurrently(c.balancer.dimse_port, folders)
    elapsed = time.monotonic() - started

    assert c.count("SELECT count(*) FROM instances") == before + 800
    assert c.no_duplicates()
    if c.s3 is None:
        root = c.folder / "shared" / "blobs"
        blobs = [p.relative_to(root) for p in root.rglob("*.dcm") if p.is_file()]
        assert len([p for p in blobs if "tmp" not in p.parts]) == before + 800

    # leastconn spread the associations: every node served some, each under its client's
    # address (PROXY v2), never the balancer's
    served = {}
    for node, skip in zip(c.nodes, logged_before, strict=True):
        events = node.log_events("association")[skip:]
        served[c.name(node)] = sum(e.get("store", 0) for e in events)
        assert all(e["address"].startswith("127.0.0.1:") for e in events), events
    assert sum(served.values()) == 800
    assert len([n for n in served.values() if n]) >= 2, served  # spread (all 3 when not loaded)

    print(f"8 x 100 through HAProxy to 3 nodes: {elapsed:.1f} s; per node {served}")
    mark = time.monotonic()
    # every object retrievable from every node
    for folder in folders:
        study = study_of(folder)
        expected = {p.stem for p in folder.glob("*.dcm")}
        for node in c.nodes:
            assert retrieved_uids(node.http_port, c.token, study) == expected

    print(f"24 study retrievals in {time.monotonic() - mark:.1f} s")
    # concurrent ledger appends from every node (each QIDO-RS is a disclosure entry)
    before = c.count("SELECT count(*) FROM ledger_entries")

    def query(n: int) -> int:
        port = c.nodes[n % 3].http_port
        return get(f"http://127.0.0.1:{port}/dicomweb/studies?PatientID=SCALE{n % 8}", c.token)[0]

    with ThreadPoolExecutor(12) as pool:
        assert set(pool.map(query, range(120))) == {200}
    assert c.count("SELECT count(*) FROM ledger_entries") == before + 120
    verified = c.cli(1, "ledger", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


# --- a node killed mid-ingest -----------------------------------------------------------------


class Sender(threading.Thread):
    """One modality: sends `paths` in associations of `per_association` through the balancer,
    keeps what was acknowledged (status 0x0000), and after a failure (the node it was on
    died) opens a new association and sends the rest again, as a modality retries."""

    def __init__(self, port: int, paths: list[Path], per_association: int, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.port = port
        self.paths = paths
        self.per_association = per_association
        self.acknowledged: set[str] = set()
        self.failed_associations = 0
        self.retried = 0
        self.error: str | None = None

    def run(self) -> None:
        datasets = [(p.stem, pydicom.dcmread(p)) for p in self.paths]
        pending = list(datasets)
        deadline = time.monotonic() + 120
        while pending and time.monotonic() < deadline:
            ae = AE(ae_title=self.name[:16])
            ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
            assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMNODE")
            if not assoc.is_established:
                self.failed_associations += 1
                time.sleep(0.2)
                continue
            batch, broken = pending[: self.per_association], False
            for uid, ds in batch:
                status = assoc.send_c_store(ds)
                if status and status.Status == 0x0000:
                    self.acknowledged.add(uid)
                else:
                    broken = True
                    break
            if broken or not assoc.is_established:
                self.failed_associations += 1
                assoc.abort()
                self.retried += 1
            else:
                assoc.release()
            pending = [(u, d) for u, d in pending if u not in self.acknowledged]
        if pending:
            self.error = f"{len(pending)} objects never acknowledged"


def start_senders(port: int, folders: list[Path], per_association: int) -> list[Sender]:
    senders = [
        Sender(port, sorted(f.glob("*.dcm")), per_association, f"MOD{i}")
        for i, f in enumerate(folders)
    ]
    for sender in senders:
        sender.start()
    return senders


@cluster_test
def test_a_node_killed_mid_ingest_loses_nothing_acknowledged(cluster, tmp_path):
    c = cluster
    victim, *survivors = c.alive()
    folders = [tmp_path / "in" / f"k{i}" for i in range(4)]
    for i, folder in enumerate(folders):
        write_series(folder, 100, patient_id=f"KILL{i}", size=8)
    before = c.count("SELECT count(*) FROM instances")
    senders = start_senders(c.balancer.dimse_port, folders, per_association=100)
    wait_until(
        lambda: c.count("SELECT count(*) FROM instances") >= before + 60, 60, "ingest under way"
    )
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(10)
    for sender in senders:
        sender.join(150)
    assert all(not s.is_alive() for s in senders)
    assert [s.error for s in senders] == [None] * 4
    acknowledged = set().union(*(s.acknowledged for s in senders))
    assert len(acknowledged) == 400
    assert acknowledged <= c.stored_uids()  # nothing acknowledged is lost
    assert c.count("SELECT count(*) FROM instances") == before + 400  # and nothing twice
    assert c.no_duplicates()
    assert sum(s.retried for s in senders) >= 1  # the kill did cut an association
    for folder in folders[:2]:  # retrievable from the survivors
        expected = {p.stem for p in folder.glob("*.dcm")}
        for node in survivors:
            assert retrieved_uids(node.http_port, c.token, study_of(folder)) == expected


# --- SIGTERM drain ----------------------------------------------------------------------------


@cluster_test
def test_sigterm_drains_with_zero_failed_associations(cluster, tmp_path):
    c = cluster
    draining = c.alive()[0]  # the others stay
    folders = [tmp_path / "in" / f"d{i}" for i in range(4)]
    for i, folder in enumerate(folders):
        write_series(folder, 60, patient_id=f"DRAIN{i}", size=8)
    before = c.count("SELECT count(*) FROM instances")
    senders = start_senders(c.balancer.dimse_port, folders, per_association=5)
    wait_until(
        lambda: c.count("SELECT count(*) FROM instances") >= before + 20, 60, "ingest under way"
    )
    draining.process.send_signal(signal.SIGTERM)

    ready = f"http://127.0.0.1:{draining.http_port}/healthz"
    status, body = wait_until(
        lambda: (answer := get(ready))[0] == 503 and answer, 5, "/healthz to answer 503"
    )
    assert json.loads(body)["status"] == "draining"
    assert get(f"http://127.0.0.1:{draining.http_port}/healthz/live")[0] == 200
    c.balancer.wait_for({c.name(draining): "DOWN"}, timeout=10)
    assert draining.process.wait(60) == 0
    for sender in senders:
        sender.join(150)
    assert [s.error for s in senders] == [None] * 4
    assert sum(s.failed_associations for s in senders) == 0  # the balancer never chose n1 late
    assert c.count("SELECT count(*) FROM instances") == before + 240
    assert c.no_duplicates()
    events = draining.log_events("draining")
    assert events and events[0]["drain_seconds"] == DRAIN_SECONDS
    assert draining.log_events("association"), "it served associations before it drained"


# --- the node label and the observed parts, without a cluster ----------------------------------


def test_every_series_carries_the_node_label_and_collectors_are_read_at_each_scrape():
    metrics = Metrics(node="n7")
    metrics.add("dicomnode_associations_total", outcome="accepted")
    depth = iter([3, 5])
    metrics.add_collector(
        lambda: [("dicomnode_jobs", {"kind": "analysis", "state": "queued"}, next(depth))]
    )
    metrics.add_collector(lambda: 1 / 0)  # a failing observer leaves only its own samples out
    first, second = metrics.render(), metrics.render()
    assert 'dicomnode_associations_total{node="n7",outcome="accepted"} 1' in first
    assert 'dicomnode_jobs{node="n7",kind="analysis",state="queued"} 3' in first
    assert 'dicomnode_jobs{node="n7",kind="analysis",state="queued"} 5' in second
    samples = [line for line in first.splitlines() if line and not line.startswith("#")]
    assert all('node="n7"' in line for line in samples)


def test_the_blob_store_is_timed_and_its_failures_counted(tmp_path):
    class Store:
        def __init__(self) -> None:
            self.root = tmp_path

        def exists(self, key: str) -> bool:
            time.sleep(0.01)
            return key == "there"

        def delete(self, key: str) -> None:
            raise FileNotFoundError(key)

        def begin(self, chunks: list[bytes]) -> object:
            return types.SimpleNamespace(place=lambda key: None, size=len(b"".join(chunks)))

    metrics = Metrics()
    store = TimedStore(Store(), metrics, TIMED_OPERATIONS)
    assert store.exists("there") and not store.exists("missing")
    with pytest.raises(FileNotFoundError):
        store.delete("gone")
    pending = store.begin([b"abc"])
    pending.place("key")
    assert pending.size == 3  # attributes pass through
    assert store.root == tmp_path
    assert metrics.value("dicomnode_object_store_requests_total", operation="exists") == 2
    assert metrics.value("dicomnode_object_store_seconds_total", operation="exists") >= 0.02
    assert (
        metrics.value(
            "dicomnode_object_store_errors_total", operation="delete", error="FileNotFoundError"
        )
        == 1
    )
    assert metrics.value("dicomnode_object_store_requests_total", operation="place") == 1


@pytest.mark.postgres
def test_ledger_lock_waits_and_queue_depth_are_measured(postgres):
    engine = sqlalchemy.create_engine(postgres.create_database())
    metrics = Metrics()
    time_ledger_lock(engine, metrics)
    holder = engine.connect()
    holder.begin()
    holder.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(15730001)"))

    def append() -> None:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(15730001)"))

    waiter = threading.Thread(target=append)
    waiter.start()
    time.sleep(0.3)
    holder.rollback()  # the waiter gets the lock now
    holder.close()
    waiter.join(10)
    assert metrics.value("dicomnode_ledger_lock_waits_total") == 2
    assert metrics.value("dicomnode_ledger_lock_wait_seconds_total") >= 0.25
    schema.metadata.create_all(engine, tables=[schema.analysis_jobs, schema.deliveries])
    assert queue_depths(engine)() == []  # nothing queued: no samples
    engine.dispose()
