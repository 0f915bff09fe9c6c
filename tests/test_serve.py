"""`dicomnode serve` as hospital IT runs it: a real process, its JSON log, health and metrics,
graceful shutdown on SIGTERM, crash safety under kill -9, and `dicomnode config check`."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomnode.archive import Archive, schema
from dicomnode.core.model import Level
from tests.conftest import DCMTK_ENV, dcmtk_tool, run_dcmtk, wait_until, write_config
from tests.factory import make_ct, write_series

pytestmark = pytest.mark.dcmtk


# --- helpers ----------------------------------------------------------------------------


def storescu_args(port: int, *paths: Path | str, verbose: bool = False) -> list[str]:
    args = [dcmtk_tool("storescu"), "-aec", "DICOMNODE", "-aet", "STORESCU"]
    if verbose:
        args.append("-v")
    return [*args, "127.0.0.1", str(port), *map(str, paths)]


def http_get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET http://127.0.0.1:port/path."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (-?[0-9.e+-]+|[+-]Inf|NaN)$")


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """The samples of GET /metrics: (name, labels) -> value; fails on a malformed line."""
    status, content_type, body = http_get(port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    samples: dict[tuple[str, frozenset], float] = {}
    typed: set[str] = set()
    nodes: set[str] = set()  # the node label, the same on every sample (dropped from the keys)
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        name, label_text, value = match.groups()
        assert name in typed, f"{name} has no # TYPE line"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', label_text or ""))
        nodes.update(v for k, v in labels if k == "node")
        samples[(name, frozenset(kv for kv in labels if kv[0] != "node"))] = float(value)
    assert len(nodes) == 1, f"every sample carries one node label: {nodes}"
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def connection_refused(port: int) -> bool:
    """Whether a new connection to `port` is refused. One reset while connecting (the
    listener closed with it in its backlog) is not an answer yet: ask again."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False


def blob_files(data_dir: Path) -> list[Path]:
    """Every file in the blob store outside its tmp/ folder."""
    root = data_dir / "blobs"
    return sorted(p for p in root.rglob("*") if p.is_file() and root / "tmp" not in p.parents)


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def log_lines(log_path: Path) -> list[dict]:
    """Every line of a node's log, each of which must be one JSON object."""
    entries = []
    for line in log_path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"log line is not JSON: {line!r}")
    return entries


def dicomnode(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def file_without_patient_id(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ds = make_ct(size=16)
    del ds.PatientID
    path = folder / "no-patient-id.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# --- 1. ports, health, metrics ---------------------------------------------------------


def test_serve_logs_ports_answers_echo_health_and_metrics(serve_node, tmp_path):
    node = serve_node()
    ready = node.ready_event()
    dimse_port, http_port = ready["dimse_port"], ready["http_port"]
    assert isinstance(dimse_port, int) and isinstance(http_port, int)
    assert 0 < dimse_port < 65536 and 0 < http_port < 65536 and dimse_port != http_port
    assert ready["ae_title"] == "DICOMNODE"

    echo = run_dcmtk("echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(dimse_port))
    assert echo.returncode == 0, echo.stderr

    status, content_type, body = http_get(http_port, "/healthz")
    assert status == 200
    assert content_type.startswith("application/json")
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["dimse_port"] == dimse_port

    before = scrape(http_port)
    assert metric(before, "dicomnode_associations_total", outcome="accepted") == 1  # the echo

    files = write_series(tmp_path / "in", 5, size=16)
    stored = run_dcmtk(*storescu_args(dimse_port, *files))
    assert stored.returncode == 0, stored.stderr

    def moved() -> dict:
        samples = scrape(http_port)
        done = metric(samples, "dicomnode_associations_closed_total", how="released") == 2
        return samples if done else {}

    after = wait_until(moved, 10, "the store association to be counted as released")
    received = "dicomnode_instances_received_total"
    assert (
        metric(after, received, outcome="stored") - metric(before, received, outcome="stored") == 5
    )
    assert metric(after, "dicomnode_associations_total", outcome="accepted") == 2
    blob_bytes = sum(p.stat().st_size for p in blob_files(tmp_path / "data"))
    assert len(blob_files(tmp_path / "data")) == 5
    byte_delta = metric(after, "dicomnode_bytes_received_total") - metric(
        before, "dicomnode_bytes_received_total"
    )
    assert byte_delta == blob_bytes
    assert metric(after, "dicomnode_associations_active") == 0
    assert metric(after, "dicomnode_store_failures_total", reason="MissingAttribute") == 0

    refused = run_dcmtk(*storescu_args(dimse_port, file_without_patient_id(tmp_path / "bad")))
    assert "Success" not in refused.stdout + refused.stderr
    failed = wait_until(
        lambda: (
            (s := scrape(http_port))
            and metric(s, "dicomnode_store_failures_total", reason="MissingAttribute") == 1
            and s
        ),
        10,
        "the refused object to be counted",
    )
    assert metric(failed, received, outcome="stored") == metric(after, received, outcome="stored")
    assert metric(failed, "dicomnode_bytes_received_total") == metric(
        after, "dicomnode_bytes_received_total"
    )
    assert len(blob_files(tmp_path / "data")) == 5
    assert node.terminate() == 0


# --- 2. one JSON log line per association and per stored instance ----------------------


def test_one_json_log_line_per_association_and_stored_instance(serve_node, tmp_path):
    node = serve_node()
    port = node.dimse_port
    files = write_series(tmp_path / "in", 6, size=16)
    uids = sorted(uid_of(p) for p in files)

    assert run_dcmtk("echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(port)).returncode == 0
    first = run_dcmtk(*storescu_args(port, *files[:4]))
    second = run_dcmtk(*storescu_args(port, *files[4:]))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert run_dcmtk(*storescu_args(port, files[0])).returncode == 0  # an identical re-send

    assert node.terminate() == 0  # after a clean stop every line has been written
    entries = log_lines(node.log_path)

    associations = [e for e in entries if e.get("event") == "association"]
    assert len(associations) == 4, associations
    assert all(a["outcome"] == "released" for a in associations)
    assert sorted(a.get("store", 0) for a in associations) == [0, 1, 2, 4]
    assert all(a["caller"] in ("ECHOSCU", "STORESCU") for a in associations)

    instances = [e for e in entries if e.get("event") == "instance"]
    stored = [e for e in instances if e["outcome"] == "stored"]
    assert sorted(e["sop_instance_uid"] for e in stored) == uids  # each exactly once
    assert [e["outcome"] for e in instances if e not in stored] == ["duplicate"]
    for entry in stored:
        assert entry["caller"] == "STORESCU" and entry["protocol"] == "dimse"
        assert entry["bytes"] > 0
        assert entry["level"] == "INFO" and entry["time"]


# --- 3. SIGTERM drains an association in flight ------------------------------------------


def test_sigterm_lets_the_association_in_flight_finish(serve_node, tmp_path, database_url):
    node = serve_node(drain_timeout=60)
    port = node.dimse_port
    files = write_series(tmp_path / "in", 400, size=16)
    storescu = subprocess.Popen(
        storescu_args(port, *files),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=DCMTK_ENV,
    )
    try:
        wait_until(lambda: node.log_events("instance"), 30, "the first stored instance")
        node.process.send_signal(signal.SIGTERM)
        wait_until(lambda: node.log_events("stopping"), 10, "the node to log that it stops")
        assert storescu.poll() is None, "storescu finished before SIGTERM; send more files"
        # The listener is closed while the association goes on.
        wait_until(lambda: connection_refused(port), 10, "new connections to be refused")
        still_sending = storescu.poll() is None
        output, _ = storescu.communicate(timeout=120)
    finally:
        if storescu.poll() is None:
            storescu.kill()
    assert storescu.returncode == 0, output
    assert node.process.wait(60) == 0
    assert still_sending, "the association ended before the refusal was checked"

    stored = {
        e["sop_instance_uid"] for e in node.log_events("instance") if e["outcome"] == "stored"
    }
    assert stored == {uid_of(p) for p in files}
    [association] = node.log_events("association")
    assert association["outcome"] == "released" and association["store"] == 400
    assert node.log_events("stopped")

    archive = Archive(tmp_path / "data", database_url)
    try:
        assert archive.counts()["instances"] == 400
    finally:
        archive.close()
    assert len(blob_files(tmp_path / "data")) == 400


# --- 4. kill -9 mid-run ------------------------------------------------------------------


def reported_stored(storescu_output: str) -> set[Path]:
    """Files storescu -v says were stored: 'Sending file: P' ... 'Received Store Response
    (Success)'."""
    stored, current = set(), None
    for line in storescu_output.splitlines():
        if "Sending file: " in line:
            current = Path(line.split("Sending file: ", 1)[1].strip())
        elif "Received Store Response" in line:
            assert current is not None, line
            if "(Success)" in line:
                stored.add(current)
            current = None
    return stored


def test_kill_9_mid_run_loses_nothing_reported_stored(serve_node, tmp_path, database_url):
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "crash.toml", data_dir, database_url)
    node = serve_node(config=config)
    files = write_series(tmp_path / "in", 400, size=16)
    originals = {uid_of(p): p for p in files}
    output_path = tmp_path / "storescu.out"
    with output_path.open("w") as output:
        storescu = subprocess.Popen(
            storescu_args(node.dimse_port, *files, verbose=True),
            stdout=output,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
        try:
            wait_until(lambda: len(node.log_events("instance")) >= 100, 60, "100 stored instances")
            node.process.kill()
            node.process.wait(30)
            storescu.wait(60)
        finally:
            if storescu.poll() is None:
                storescu.kill()
    reported = reported_stored(output_path.read_text())
    assert len(reported) >= 90, output_path.read_text()[-2000:]
    assert len(reported) < 400, "the node was killed after the run had finished"
    assert storescu.returncode != 0

    # A write the crash cut short, as a crash inside FileBlobStore.write leaves it.
    tmp = data_dir / "blobs" / "tmp"
    (tmp / "tmpcutshort.part").write_bytes(b"\x00" * 100)

    restarted = serve_node(config=config)
    assert list(tmp.iterdir()) == [], "partial writes are left in tmp/ after a restart"
    after = run_dcmtk(*storescu_args(restarted.dimse_port, *files))  # the retry hospital IT runs
    assert after.returncode == 0, after.stderr
    assert restarted.terminate() == 0

    archive = Archive(data_dir, database_url)
    try:
        with archive.index.read() as conn:
            rows = conn.execute(schema.instances.select()).all()
        indexed = {row.sop_instance_uid: row for row in rows}
        assert len(indexed) == len(rows) == 400
        assert len(archive.find_instances(Level.PATIENT, ())) == 400
        assert {originals[uid] for uid in indexed} >= reported
        for uid, row in indexed.items():
            blob = data_dir / "blobs" / row.blob_path
            assert blob.is_file(), f"index row {uid} has no blob"
            assert blob.stat().st_size == row.size
            ds = pydicom.dcmread(blob)
            assert ds.SOPInstanceUID == uid
            assert ds.PixelData == pydicom.dcmread(originals[uid]).PixelData
    finally:
        archive.close()
    for path in blob_files(data_dir):
        assert path.suffix == ".dcm", f"unexpected file in the blob store: {path}"
        ds = pydicom.dcmread(path)
        assert ds.PixelData == pydicom.dcmread(originals[ds.SOPInstanceUID]).PixelData
    assert list(tmp.iterdir()) == []


def test_rows_a_power_loss_took_are_filed_again_when_the_node_starts(
    serve_node, tmp_path, database_url
):
    """Ingest commits are not synced on their own (their blobs are, before them): a power loss
    can take the last rows. The next start files those blobs again through intake."""
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "node.toml", data_dir, database_url)
    node = serve_node(config=config)
    files = write_series(tmp_path / "in", 5, size=16)
    assert run_dcmtk(*storescu_args(node.dimse_port, *files)).returncode == 0
    assert node.terminate() == 0
    archive = Archive(data_dir, database_url)
    try:
        with archive.index.read() as conn:
            before = conn.execute(schema.instances.select()).all()
        lost = [uid_of(path) for path in files[2:]]
        instances = schema.instances
        with archive.index.write() as conn:  # what the power loss took
            conn.execute(instances.delete().where(instances.c.sop_instance_uid.in_(lost)))
    finally:
        archive.close()

    restarted = serve_node(config=config)
    assert [e["filed"] for e in restarted.log_events("recovery")] == [3]
    assert restarted.terminate() == 0
    archive = Archive(data_dir, database_url)
    try:
        with archive.index.read() as conn:
            after = conn.execute(schema.instances.select()).all()
    finally:
        archive.close()
    kept = ("sop_instance_uid", "blob_path", "sha256", "size")
    assert sorted(tuple(getattr(r, k) for k in kept) for r in after) == sorted(
        tuple(getattr(r, k) for k in kept) for r in before
    )
    assert {r.source_protocol for r in after if r.sop_instance_uid in lost} == {"recovery"}


# --- 5. configuration errors -------------------------------------------------------------

GOOD_CONFIG = """\
[node]
ae_title = "DICOMNODE"
data_dir = "{data_dir}"

[dimse]
host = "127.0.0.1"
port = {dimse_port}
max_associations = 8
{dimse_extra}
[http]
host = "127.0.0.1"
port = {http_port}

[database]
url = "sqlite:///{data_dir}/index.sqlite"

[[peers]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 11113
allow = ["echo", "store", "find", "move"]
"""

BAD_CONFIG = """\
[node]
ae_title = "DICOMNODE"
data_dir = "{data_dir}"
colour = "blue"

[dimse]
host = "127.0.0.1"
port = "x"
max_associations = 0
duplicate_policy = "maybe"

[dimse.tls]
cert_file = "{data_dir}/no-such-cert.pem"

[http]
host = "127.0.0.1"
port = 70000

[database]
url = "mysql://db/dicomnode"

[[peers]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 11113
allow = ["echo", "teleport"]
"""

BAD_KEYS = (
    "node.colour",
    "dimse.port",
    "dimse.max_associations",
    "dimse.duplicate_policy",
    "dimse.tls.cert_file",
    "dimse.tls.key_file",
    "http.port",
    "database.url",
    "peers[0].allow",
)


def test_config_check_accepts_a_good_file(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text(good_config(tmp_path / "data"))
    result = dicomnode("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert not (tmp_path / "data").exists(), "config check must not create the data folder"


def test_config_check_names_every_bad_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIG.format(data_dir=tmp_path / "data"))
    result = dicomnode("config", "check", str(path))
    assert result.returncode != 0
    problems = [line for line in result.stderr.splitlines() if line.startswith(str(path))]
    for key in BAD_KEYS:
        assert any(f": {key}:" in line for line in problems), f"{key} not named:\n{result.stderr}"
    assert len(problems) == len(BAD_KEYS), result.stderr
    assert "'x'" in result.stderr and "70000" in result.stderr and "'maybe'" in result.stderr


def good_config(
    data_dir: Path, dimse_port: object = 0, http_port: object = 0, extra: str = ""
) -> str:
    return GOOD_CONFIG.format(
        data_dir=data_dir, dimse_port=dimse_port, http_port=http_port, dimse_extra=extra
    )


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"dimse_port": '"x"'}, "dimse.port"),
        ({"dimse_port": 70000}, "dimse.port"),
        ({"extra": 'duplicate_policy = "maybe"'}, "dimse.duplicate_policy"),
        ({"extra": "backlog = 5"}, "dimse.backlog"),
        ({"http_port": -1}, "http.port"),
    ],
)
def test_serve_refuses_a_bad_config_naming_the_key(tmp_path, overrides, key):
    text = good_config(tmp_path / "data", **overrides)
    path = tmp_path / "serve.toml"
    path.write_text(text)
    result = dicomnode("serve", "--config", str(path), timeout=60)
    assert result.returncode != 0
    assert key in result.stderr, result.stderr
    assert '"event": "ready"' not in result.stdout + result.stderr
    assert not (tmp_path / "data").exists(), "a refused config must not touch the data folder"


def test_config_check_reports_a_missing_file_and_broken_toml(tmp_path):
    missing = dicomnode("config", "check", str(tmp_path / "absent.toml"))
    assert missing.returncode != 0 and "absent.toml" in missing.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[dimse\nport = 1\n")
    result = dicomnode("config", "check", str(broken))
    assert result.returncode != 0 and "TOML" in result.stderr


def test_serve_with_a_good_config_stores_to_its_sqlite_file(tmp_path):
    """The contract file layout, with its SQLite index, served end to end."""
    path = tmp_path / "good.toml"
    path.write_text(good_config(tmp_path / "data"))
    from tests.conftest import serve

    node = serve(path, tmp_path / "good.log")
    try:
        sop_uid = generate_uid()
        dataset = make_ct(size=16, sop_uid=sop_uid)
        dataset.save_as(tmp_path / "one.dcm", enforce_file_format=True)
        result = run_dcmtk(*storescu_args(node.dimse_port, tmp_path / "one.dcm"))
        assert result.returncode == 0, result.stderr
        assert node.terminate() == 0
    finally:
        if node.process.poll() is None:
            node.terminate(signal.SIGKILL)
    assert (tmp_path / "data" / "index.sqlite").is_file()
    [blob] = blob_files(tmp_path / "data")
    assert uid_of(blob) == sop_uid


# --- upgrades: `dicomnode migrate`, and what serve does with a schema that is not current ----


def without_migrate_at_start(config: Path) -> Path:
    """`config` (from write_config) as a deployment writes it: serve does not migrate."""
    text = config.read_text()
    assert "migrate_at_start = true\n" in text
    config.write_text(text.replace("migrate_at_start = true\n", ""))
    return config


def test_serve_refuses_a_postgresql_index_until_dicomnode_migrate_has_run(tmp_path, postgres):
    """On PostgreSQL serve neither migrates nor starts on a schema that is not current: it
    exits 2 naming `dicomnode migrate`; migrate brings the index to head (twice: once), and
    then serve starts and stores."""
    from dicomnode.archive.migrate import head_revision
    from tests.conftest import serve

    config = without_migrate_at_start(
        write_config(tmp_path / "node.toml", tmp_path / "data", postgres.create_database())
    )
    refused = dicomnode("serve", "--config", str(config), timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "no dicomnode schema" in refused.stderr
    assert "run `dicomnode migrate`" in refused.stderr
    assert not (tmp_path / "data").exists()  # refused before it opened anything
    for _ in range(2):
        migrated = dicomnode("migrate", "--config", str(config), timeout=120)
        assert migrated.returncode == 0, migrated.stderr
        assert f"schema at revision {head_revision()}" in migrated.stdout
    node = serve(config, tmp_path / "serve.log")
    try:
        dataset = make_ct(size=16)
        dataset.save_as(tmp_path / "one.dcm", enforce_file_format=True)
        result = run_dcmtk(*storescu_args(node.dimse_port, tmp_path / "one.dcm"))
        assert result.returncode == 0, result.stderr
        assert node.terminate() == 0
    finally:
        if node.process.poll() is None:
            node.terminate(signal.SIGKILL)


def test_serve_migrates_sqlite_itself_and_postgresql_when_the_setting_says_so(
    request, tmp_path, database_url
):
    """The embedded default (SQLite) and ``[database] migrate_at_start = true`` (what the tests'
    configs set): composing the node brings a new index to head; on PostgreSQL without the
    setting it is refused, naming `dicomnode migrate`."""
    import dataclasses

    if database_url.startswith("postgresql"):  # a new, empty database (the fixture migrates)
        database_url = request.getfixturevalue("postgres").create_database()
    else:
        database_url = f"sqlite:///{tmp_path / 'new-index.sqlite'}"

    from sqlalchemy import create_engine

    from dicomnode.archive.migrate import SchemaNotCurrent, current_revision, head_revision
    from dicomnode.compose import SERVE, compose, migrates_at_start
    from dicomnode.config import read_settings

    settings = read_settings(write_config(tmp_path / "node.toml", tmp_path / "data", database_url))
    if database_url.startswith("postgresql"):
        manual = dataclasses.replace(
            settings, database=dataclasses.replace(settings.database, migrate_at_start=False)
        )
        assert not migrates_at_start(manual)
        with pytest.raises(SchemaNotCurrent, match="dicomnode migrate"):
            compose(manual, SERVE)
    assert migrates_at_start(settings)
    services = compose(settings, SERVE)
    services.close()
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert current_revision(conn) == head_revision()
    finally:
        engine.dispose()


def test_only_serve_publishes_the_configured_policy(tmp_path):
    """Commands that read (policy show, ledger verify, jobs, holds, consents) leave the policy
    named in the settings unpublished; the node (role serve) publishes it."""
    from dicomnode.compose import SERVE, compose
    from dicomnode.config import read_settings

    policy = Path(__file__).resolve().parent.parent / "config" / "policy.toml"
    config = write_config(
        tmp_path / "node.toml",
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'index.sqlite'}",
        extra=f'[governance]\npolicy = "{policy}"',
    )
    assert dicomnode("migrate", "--config", str(config), timeout=120).returncode == 0
    for command in (
        ("policy", "show"),
        ("ledger", "verify"),
        ("jobs", "list"),
        ("hold", "list"),
        ("consent", "show", "--patient-id", "P1"),
        ("retention", "status"),
    ):
        result = dicomnode(*command, "--config", str(config), timeout=120)
        assert result.returncode == 0, (command, result.stderr)
    shown = dicomnode("policy", "show", "--config", str(config), timeout=120)
    assert "in force: embedded-1" in shown.stdout
    assert "example-hospital-2027-01" not in shown.stdout
    exported = dicomnode("ledger", "export", "--config", str(config), timeout=120)
    assert "example-hospital-2027-01" not in exported.stdout
    services = compose(read_settings(config), SERVE)
    try:
        status = services.stewardship.policy_status()
        versions = [status.in_force.version] + [p.version for p in status.scheduled]
        assert "example-hospital-2027-01" in versions
    finally:
        services.close()
