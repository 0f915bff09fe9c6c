"""Faults on a bad day (issue 18): crashes, a full disk, a locked index, PostgreSQL going away,
and decompression bombs. Each fault test ends the same way: every acknowledged object is
retrievable and byte-identical, nothing refused reappears after a restart, and `dicomnode
archive check --hashes` and `dicomnode ledger verify` are clean."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import zlib
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
import requests
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from sqlalchemy import select

from dicomnode.archive import Archive, schema
from dicomnode.archive.received import from_part10
from dicomnode.config import read_settings
from dicomnode.core.errors import StorageUnavailable
from dicomnode.core.metrics import Metrics
from dicomnode.core.model import Source
from dicomnode.core.statuses import status_for
from dicomnode.intake import Intake
from tests.conftest import (
    PostgresServer,
    ServeProcess,
    _as_postgres_user,
    dicomweb_client,
    free_port,
    open_archive,
    serve,
    token_for,
    wait_until,
    write_config,
)
from tests.factory import make_ct, part10, write_series

SENDER = Source("dimse", "MODALITY", "127.0.0.1")
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


# --- helpers: sending, and what every fault test checks at the end --------------------------


@pytest.fixture(autouse=True)
def _chunked_sending(monkeypatch):
    """pynetdicom sends a file's data set as it is on disk (no decoding, no re-encoding)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def store_files(
    port: int, files: list[Path], statuses: dict[Path, int], transfer_syntax: str = ""
) -> None:
    """C-STORE `files` on one association, recording each answered status; stops at the
    first object without an answer (the node went away)."""
    ae = AE(ae_title="MODALITY")
    ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(CTImageStorage, transfer_syntax or ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        return
    try:
        for path in files:
            try:
                answer = assoc.send_c_store(path)
            except Exception:
                return
            if "Status" not in answer:
                return
            statuses[path] = int(answer.Status)
    finally:
        if assoc.is_established:
            assoc.release()


def stow_body(files: list[Path]) -> tuple[bytes, str]:
    boundary = "faultsboundary"
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    body = b"".join(head + p.read_bytes() + b"\r\n" for p in files)
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return body + f"--{boundary}--\r\n".encode(), content_type


def stow(node: SimpleNamespace, files: list[Path], token: str = "") -> requests.Response:
    body, content_type = stow_body(files)
    return requests.post(
        f"http://127.0.0.1:{node.http_port}/dicomweb/studies",
        data=body,
        headers={
            "Content-Type": content_type,
            "Authorization": f"Bearer {token or token_for(node)}",
        },
        timeout=120,
    )


def failure_reasons(response: requests.Response) -> list[int]:
    failed = response.json().get("00081198", {}).get("Value", [])
    return [item["00081197"]["Value"][0] for item in failed]


@pytest.fixture
def start_serve(tmp_path):
    """Start `dicomnode serve` with a given settings file (its index chosen by the test)."""
    processes: list[ServeProcess] = []

    def start(config: Path) -> ServeProcess:
        processes.append(serve(config, tmp_path / f"serve{len(processes)}.log"))
        return processes[-1]

    yield start
    for served in processes:
        if served.process.poll() is None:
            served.terminate(signal.SIGKILL)


def as_node(served, config: Path) -> SimpleNamespace:
    """What conftest's DICOMweb helpers need of a node: its settings and HTTP port."""
    return SimpleNamespace(settings=read_settings(config), http_port=served.http_port)


def healthz(node: SimpleNamespace) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{node.http_port}/healthz", timeout=30)


def sha256_of(path: Path) -> str:
    return from_part10(path.read_bytes()).sha256


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_retrievable(node: SimpleNamespace, acknowledged: list[Path]) -> None:
    """Every acknowledged object comes back over WADO-RS with its pixels and UIDs."""
    client = dicomweb_client(node)
    for path in acknowledged:
        sent = pydicom.dcmread(path)
        got = client.retrieve_instance(
            sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID
        )
        assert got.SOPInstanceUID == sent.SOPInstanceUID
        assert got.PixelData == sent.PixelData


def assert_archive_after_fault(config: Path, acknowledged: list[Path], refused: list[Path]) -> None:
    """With the node stopped: each acknowledged object is indexed with the SHA-256 of the data
    set it was sent with (and its blob holds it: `archive check --hashes`), no refused one is
    there, no blob is left unindexed, and the ledger verifies."""
    settings = read_settings(config)
    archive = Archive(settings.node.data_dir, settings.database_url)
    try:
        with archive.index.read() as conn:
            i = schema.instances
            rows = dict(conn.execute(select(i.c.sop_instance_uid, i.c.sha256)).all())
    finally:
        archive.close()
    for path in acknowledged:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert rows.get(uid) == sha256_of(path), f"acknowledged {uid} is not as sent"
    for path in refused:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert uid not in rows, f"refused {uid} came back"
    check = cli(config, "archive", "check", "--hashes")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "unindexed blob" not in check.stdout, check.stdout
    verify = cli(config, "ledger", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


# --- the durable record of each placed blob's outcome (item 7) --------------------------------


@pytest.fixture
def archive(tmp_path, database_url):
    archive = Archive(tmp_path / "data", database_url)
    yield archive
    archive.close()


def _rows(archive) -> set[str]:
    with archive.index.read() as conn:
        return set(conn.execute(select(schema.instances.c.sop_instance_uid)).scalars())


@pytest.mark.parametrize(
    "message", ["database or disk is full", "disk I/O error", "database is locked"]
)
def test_an_object_refused_after_its_blob_was_placed_never_comes_back(
    archive, monkeypatch, message
):
    """The index commit fails after the blob was placed: the sender is answered "out of
    resources" (0xA700, it sends again later) in words without internals, the blob is
    withdrawn, and recovery at the next start files nothing (it used to: "filed again")."""
    intake = Intake(archive, Metrics())
    kept, refused = make_ct(instance_number=1), make_ct(instance_number=2)
    intake.receive_part10(part10(kept), SENDER)

    def failing_commit(*_args, **_kwargs):
        raise sqlite3.OperationalError(message)

    with monkeypatch.context() as failing:
        failing.setattr(archive.index, "write_grouped", failing_commit)
        with pytest.raises(StorageUnavailable) as answer:
            intake.receive_part10(part10(refused), SENDER)
    assert status_for(answer.value) == OUT_OF_RESOURCES
    assert "try again" in str(answer.value) and message not in str(answer.value)
    assert archive.check().unindexed_blobs == []
    assert intake.recover_unindexed() == 0
    assert _rows(archive) == {kept.SOPInstanceUID}
    assert archive.failing() is not None  # /healthz reports it until a store succeeds
    intake.receive_part10(part10(make_ct(instance_number=3)), SENDER)
    assert archive.failing() is None


def test_an_identical_blob_placed_meanwhile_is_kept_when_one_sender_is_refused(
    archive, monkeypatch
):
    """Two senders place the same object and the index refuses one: the blob stays for the
    other, whose placing is unsettled, and is filed once."""
    intake = Intake(archive, Metrics())
    data = part10(make_ct())
    other = archive.begin_blob(from_part10(data).file_chunks)
    other.place(archive._blob_path(from_part10(data)))  # the other sender's, not yet indexed
    assert other.named

    def index_down(*_args, **_kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as failing:
        failing.setattr(archive.index, "write_grouped", index_down)
        with pytest.raises(StorageUnavailable):
            intake.receive_part10(data, SENDER)
    assert archive.blobs.exists(other.relative)
    result = archive.store(from_part10(data), SENDER, blob=None)
    assert result.outcome == "stored" and result.instance.blob_path == other.relative


def test_recovery_reads_the_placement_journal_not_the_folders(archive, monkeypatch):
    """What a start files again comes from the journal's entries: no folder of the store is
    walked (object storage cannot list a bucket cheaply), and a filed object's entry is
    settled once the index is synced."""
    intake = Intake(archive, Metrics())
    ds = make_ct()
    result = intake.receive_part10(part10(ds), SENDER)
    (entry,) = archive.blobs.journal.folder.iterdir()
    assert entry.name.endswith(result.instance.blob_path.replace("/", "+"))
    with archive.index.write() as conn:  # what a power loss takes
        i = schema.instances
        conn.execute(i.delete().where(i.c.sop_instance_uid == ds.SOPInstanceUID))

    def no_walking(*_args, **_kwargs):
        raise AssertionError("recovery walked the blob store's folders")

    monkeypatch.setattr(archive.blobs, "placed", no_walking)
    assert intake.recover_unindexed() == 1
    assert _rows(archive) == {ds.SOPInstanceUID}
    assert list(archive.blobs.journal.folder.iterdir())  # the re-filing's own entry
    archive.settle_placements(older_than=0)
    assert list(archive.blobs.journal.folder.iterdir()) == []
    assert intake.recover_unindexed() == 0


# --- crashes: kill -9 during C-STORE and during STOW-RS ---------------------------------------


def test_kill_9_during_c_store_loses_nothing_acknowledged(serve_node, tmp_path, database_url):
    config = write_config(tmp_path / "node.toml", tmp_path / "data", database_url)
    node = serve_node(config=config)
    files = write_series(tmp_path / "in", 80, size=128)
    statuses: dict[Path, int] = {}
    sender = threading.Thread(target=store_files, args=(node.dimse_port, files, statuses))
    sender.start()
    wait_until(lambda: len(statuses) >= 15, 60, "15 objects acknowledged")
    node.terminate(signal.SIGKILL)
    sender.join(60)
    acknowledged = [p for p, status in statuses.items() if status == 0]
    assert 15 <= len(acknowledged) < len(files), "the kill did not come mid-transfer"
    assert set(statuses.values()) == {0}

    restarted = serve_node(config=config)
    assert_retrievable(as_node(restarted, config), acknowledged)
    assert restarted.terminate() == 0
    assert_archive_after_fault(config, acknowledged, refused=[])


def test_kill_9_during_stow_loses_nothing_acknowledged(serve_node, tmp_path, database_url):
    config = write_config(tmp_path / "node.toml", tmp_path / "data", database_url)
    served = serve_node(config=config)
    node = as_node(served, config)
    first = write_series(tmp_path / "first", 4, size=64)
    assert stow(node, first).status_code == 200
    second = write_series(tmp_path / "second", 60, size=256)
    answer: list = []

    def post() -> None:
        try:
            answer.append(stow(node, second))
        except requests.RequestException as e:
            answer.append(e)

    poster = threading.Thread(target=post)
    poster.start()
    journal = tmp_path / "data" / "placing"
    wait_until(lambda: len(list(journal.iterdir())) > 4 or answer, 60, "the parts being filed")
    served.terminate(signal.SIGKILL)
    poster.join(120)
    acknowledged = list(first)
    if isinstance(answer[0], requests.Response) and answer[0].status_code == 200:
        acknowledged += second  # the request was answered before the kill
    else:
        assert not isinstance(answer[0], requests.Response), answer[0].text

    restarted = serve_node(config=config)
    assert_retrievable(as_node(restarted, config), acknowledged)
    assert restarted.terminate() == 0
    assert_archive_after_fault(config, acknowledged, refused=[])


# --- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 48 MiB tmpfs the test fills (the tests run as root, as CI does)."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all but `leave` bytes of `disk`."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with filler.open("wb") as f:
        f.truncate(0)
        chunk = bytes(1024 * 1024)
        remaining = free - leave
        while remaining > 0:
            remaining -= f.write(chunk[: min(len(chunk), remaining)])
    return filler


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_a_full_disk_refuses_with_out_of_resources_and_recovers(
    request, start_serve, tmp_path, small_disk, database
):
    """ENOSPC and "database or disk is full" answer 0xA700 per object (the association goes
    on), STOW-RS answers per part, /healthz says 503; once space is back the node stores
    again, and nothing it refused comes back after a restart."""
    data_dir = small_disk / "data"
    url = (
        f"sqlite:///{small_disk / 'index.sqlite'}"
        if database == "sqlite"
        else request.getfixturevalue("postgres").create_database()
    )
    config = write_config(tmp_path / "node.toml", data_dir, url)
    served = start_serve(config)
    node = as_node(served, config)
    before = write_series(tmp_path / "before", 3, size=64)
    assert stow(node, before).status_code == 200
    filler = fill(small_disk, leave=2 * 1024**2)

    files = write_series(tmp_path / "in", 30, size=256)  # 128 KiB each: 3.75 MiB
    statuses: dict[Path, int] = {}
    store_files(served.dimse_port, files, statuses)
    assert len(statuses) == len(files), "the association ended before every object was answered"
    refused = [p for p in files if statuses[p] != 0]
    assert refused, "the disk never filled"
    assert {statuses[p] for p in refused} == {OUT_OF_RESOURCES}
    late = write_series(tmp_path / "late", 3, size=256)
    answer = stow(node, late)
    assert answer.status_code == 409, answer.text  # every part failed, each with its reason
    assert failure_reasons(answer) == [OUT_OF_RESOURCES] * 3
    assert healthz(node).status_code == 503

    filler.unlink()
    again = refused[: len(refused) // 2]  # the sender tries again; the others it never does
    statuses_again: dict[Path, int] = {}
    store_files(served.dimse_port, again, statuses_again)
    assert set(statuses_again.values()) == {0}
    wait_until(lambda: healthz(node).status_code == 200, 30, "/healthz to be 200 again")
    assert served.terminate() == 0

    restarted = start_serve(config)
    acknowledged = before + [p for p in files if statuses[p] == 0] + again
    assert_retrievable(as_node(restarted, config), acknowledged)
    assert restarted.terminate() == 0
    never_resent = [p for p in refused if p not in again] + late
    assert_archive_after_fault(config, acknowledged, never_resent)


# --- SQLite locked past the ingest timeout ------------------------------------------------------


def with_node_settings(config: Path, **node: object) -> Path:
    lines = config.read_text().splitlines()
    at = lines.index("[node]") + 1
    lines[at:at] = [f"{key} = {value}" for key, value in node.items()]
    config.write_text("\n".join(lines) + "\n")
    return config


def test_a_locked_sqlite_index_answers_out_of_resources_not_an_abort(start_serve, tmp_path):
    database = tmp_path / "index.sqlite"
    config = with_node_settings(
        write_config(tmp_path / "node.toml", tmp_path / "data", f"sqlite:///{database}"),
        index_busy_seconds=1,
    )
    served = start_serve(config)
    node = as_node(served, config)
    files = write_series(tmp_path / "in", 3, size=64)
    statuses: dict[Path, int] = {}
    store_files(served.dimse_port, files[:1], statuses)
    blocker = sqlite3.connect(database, timeout=30, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        store_files(served.dimse_port, files[1:2], statuses)
        assert statuses[files[1]] == OUT_OF_RESOURCES  # answered while the sender waits
        assert healthz(node).status_code == 503
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store_files(served.dimse_port, files[2:], statuses)
    assert statuses[files[2]] == 0
    wait_until(lambda: healthz(node).status_code == 200, 30, "/healthz to be 200 again")
    assert served.terminate() == 0
    restarted = start_serve(config)
    assert restarted.terminate() == 0
    assert_archive_after_fault(config, [files[0], files[2]], [files[1]])


# --- PostgreSQL stopped and started again -------------------------------------------------------


@pytest.fixture
def own_postgres():
    """A PostgreSQL cluster of this test's own, which it stops and starts."""
    base = Path(tempfile.mkdtemp(prefix="dicomnode-pgfault-"))
    data, sockets = base / "data", base / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    subprocess.run(
        _as_postgres_user(
            ["initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
        ),
        check=True,
        capture_output=True,
    )
    options = f"-k {sockets} -p {port} -c listen_addresses='' -c fsync=off"

    def pg_ctl(*args: str) -> None:
        command = ["pg_ctl", "-D", str(data), "-o", options, "-l", str(base / "log"), *args]
        # no pipes: the server pg_ctl starts would hold them open, and run() would wait for it
        subprocess.run(_as_postgres_user(command), check=True, stdout=subprocess.DEVNULL)

    pg_ctl("-w", "start")
    server = PostgresServer(sockets, port)
    try:
        yield SimpleNamespace(server=server, stop=lambda: pg_ctl("-m", "fast", "-w", "stop"),
                              start=lambda: pg_ctl("-w", "start"))  # fmt: skip
    finally:
        subprocess.run(
            _as_postgres_user(["pg_ctl", "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


def test_postgresql_stopped_and_started_again(start_serve, tmp_path, own_postgres):
    """PostgreSQL down: C-STORE answers 0xA700, STOW-RS fails per part, QIDO-RS and /healthz
    answer 503 without naming the database's host; when it is back the node serves again."""
    url = own_postgres.server.create_database()
    config = write_config(tmp_path / "node.toml", tmp_path / "data", url)
    served = start_serve(config)
    node = as_node(served, config)
    files = write_series(tmp_path / "in", 6, size=64)
    statuses: dict[Path, int] = {}
    store_files(served.dimse_port, files[:2], statuses)
    assert set(statuses.values()) == {0}

    token = token_for(node)  # the signing key lives in the database: minted while it is up
    own_postgres.stop()
    store_files(served.dimse_port, files[2:3], statuses)
    assert statuses[files[2]] == OUT_OF_RESOURCES
    answer = stow(node, files[3:4], token)
    assert answer.status_code == 409 and failure_reasons(answer) == [OUT_OF_RESOURCES]
    query = requests.get(
        f"http://127.0.0.1:{node.http_port}/dicomweb/studies",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert query.status_code == 503, query.text
    assert query.headers.get("Retry-After")
    health = healthz(node)
    assert health.status_code == 503
    for body in (query.text, health.text):
        assert str(own_postgres.server.socket_dir) not in body
        assert "psycopg" not in body and "SELECT" not in body

    own_postgres.start()
    wait_until(lambda: healthz(node).status_code == 200, 60, "/healthz to be 200 again")
    store_files(served.dimse_port, files[4:], statuses)
    assert statuses[files[4]] == statuses[files[5]] == 0
    assert served.terminate() == 0
    restarted = start_serve(config)
    acknowledged = [files[0], files[1], files[4], files[5]]
    assert_retrievable(as_node(restarted, config), acknowledged)
    assert restarted.terminate() == 0
    assert_archive_after_fault(config, acknowledged, [files[2], files[3]])


# --- decompression bombs at ingest (item 3) -----------------------------------------------------

BOMB_BYTES = 1024**3  # what the bomb inflates to


def write_bomb(path: Path) -> Path:
    """A deflated CT data set of about 1 MiB whose Pixel Data inflates to 1 GiB of zeros,
    built in steps (the test never holds the inflated bytes)."""
    ds = make_ct()
    del ds.PixelData
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(header.getvalue())]
    parts.append(deflater.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, BOMB_BYTES)))
    zeros = bytes(1024 * 1024)
    for _ in range(BOMB_BYTES // len(zeros)):
        parts.append(deflater.compress(zeros))
    parts.append(deflater.flush())
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    pydicom.filewriter.write_file_meta_info(meta, ds.file_meta)
    path.write_bytes(b"\x00" * 128 + b"DICM" + meta.getvalue() + b"".join(parts))
    return path


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_decompression_bomb_is_refused_within_bounded_memory(start_serve, tmp_path):
    config = write_config(
        tmp_path / "node.toml", tmp_path / "data", f"sqlite:///{tmp_path / 'index.sqlite'}"
    )
    served = start_serve(config)
    node = as_node(served, config)
    bomb = write_bomb(tmp_path / "bomb.dcm")
    assert bomb.stat().st_size < 2 * 1024**2
    honest = write_series(tmp_path / "in", 1, size=64)
    assert stow(node, honest).status_code == 200  # warms the node up before the baseline
    baseline = peak_rss(served.process.pid)

    statuses: dict[Path, int] = {}
    store_files(served.dimse_port, [bomb], statuses, DeflatedExplicitVRLittleEndian)
    assert statuses == {bomb: CANNOT_UNDERSTAND}
    answer = stow(node, [bomb])
    assert answer.status_code == 409 and failure_reasons(answer) == [CANNOT_UNDERSTAND]
    growth = peak_rss(served.process.pid) - baseline
    assert growth < 256 * 1024**2, f"RSS grew {growth / 1024**2:.0f} MiB"
    assert served.terminate() == 0
    assert_archive_after_fault(config, honest, [bomb])


def test_a_deflated_data_set_within_the_bound_is_stored(tmp_path):
    """The bound refuses only what passes it: an ordinary deflated object is filed as sent."""
    ds = make_ct()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    archive = open_archive(tmp_path / "data", f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        intake = Intake(archive, Metrics())
        result = intake.receive_part10(path.read_bytes(), SENDER)
        assert result.outcome == "stored"
        intake.max_inflated_bytes = 1024  # below this object's inflated size
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
        ds.save_as(path, enforce_file_format=True)
        with pytest.raises(Exception) as refused:
            intake.receive_part10(path.read_bytes(), SENDER)
        assert status_for(refused.value) == CANNOT_UNDERSTAND
        assert "max_inflated_bytes" in str(refused.value)
    finally:
        archive.close()


# --- SQLite's shared memory file (item 10) ------------------------------------------------------


def test_a_fatal_signal_is_logged_and_a_small_block_filesystem_is_warned_of(start_serve, tmp_path):
    """SQLite grows its WAL index (-shm) through a memory mapping; on a filesystem whose blocks
    are smaller than a page, a full disk makes that a SIGBUS, which killed the node with no
    log line. The node now warns at start of such a filesystem (here a 1 KiB-block ext4 the
    test mounts), and a fatal signal leaves the Python stacks in its log (faulthandler)."""
    image, mount = tmp_path / "small-blocks.img", tmp_path / "small-blocks"
    mount.mkdir()
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "1024", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        config = write_config(
            tmp_path / "node.toml", tmp_path / "data", f"sqlite:///{mount / 'index.sqlite'}"
        )
        served = start_serve(config)
        assert any("1024-byte blocks" in e["message"] for e in served.log_events("storage"))
        os.kill(served.process.pid, signal.SIGBUS)
        assert served.process.wait(30) == -signal.SIGBUS
        log = served.log_path.read_text()
        assert "Fatal Python error: Bus error" in log
        assert "most recent call first" in log  # the stacks
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
