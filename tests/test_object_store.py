"""The S3-compatible object store (`dicomnode.archive.objectstore`) against a real SeaweedFS
on loopback: the same behaviour as the filesystem store, create-only puts (and the start-up
refusal of a server that ignores them), range and streaming reads, failures answered as
StorageUnavailable, and recovery from the placements' records, never a bucket listing."""

from __future__ import annotations

import http.server
import io
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from dicomnode.archive import Archive
from dicomnode.archive.blobs import FileBlobStore, PlacementJournal
from dicomnode.archive.blobstore import BlobStore, blob_key, cache_key
from dicomnode.archive.migrate import migrate
from dicomnode.archive.objectstore import (
    ObjectStoreUnavailable,
    S3BlobStore,
    S3Location,
    location_from_files,
    open_s3_store,
    read_credentials,
)
from dicomnode.archive.placements import DatabasePlacements
from dicomnode.core.errors import ConfigError, DuplicateConflict, StorageUnavailable
from dicomnode.core.metrics import Metrics
from dicomnode.core.model import Source
from dicomnode.intake import Intake
from tests.factory import make_ct, part10
from tests.realclients.seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS, start_seaweedfs

pytestmark = pytest.mark.s3
SENDER = Source("dimse", "MODALITY", "127.0.0.1")


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.kill()


def s3_location(server: SeaweedFS, prefix: str = "", **options: object) -> S3Location:
    return location_from_files(
        server.endpoint,
        "dicomnode",
        server.credentials_file,
        prefix=prefix or f"t-{uuid.uuid4().hex[:12]}",
        **options,  # type: ignore[arg-type]
    )


def new_s3_store(server: SeaweedFS, folder: Path, **options: object) -> S3BlobStore:
    (folder / "placing").mkdir(parents=True, exist_ok=True)
    return S3BlobStore(s3_location(server, **options), PlacementJournal(folder / "placing"))


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "filesystem":
        made: BlobStore = FileBlobStore(tmp_path / "blobs", tmp_path / "placing")
    else:
        made = new_s3_store(request.getfixturevalue("seaweedfs"), tmp_path)
    yield made
    made.close()


def ct_key_and_bytes(**attributes: object) -> tuple[str, bytes]:
    ds = make_ct(**attributes)
    data = part10(ds)
    return blob_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID), data


def read(store: BlobStore, key: str, byte_range: tuple[int, int] | None = None) -> bytes:
    with store.open(key, byte_range) as stream:
        return stream.read()


# --- the same behaviour as the filesystem store --------------------------------------------


def test_a_placed_blob_reads_back_whole_and_by_range(store: BlobStore) -> None:
    key, data = ct_key_and_bytes()
    blob = store.begin([data[:200], data[200:]])
    assert blob.size == len(data)
    blob.place(key)
    assert blob.named and blob.key == key
    blob.settle()
    assert read(store, key) == data
    assert store.size(key) == len(data)
    assert store.exists(key)
    assert read(store, key, (132, 400)) == data[132:400]
    assert read(store, key, (len(data) - 10, len(data))) == data[-10:]
    assert read(store, key, (5, 5)) == b""
    with store.open(key) as stream:  # read in small pieces, as a streaming answer does
        pieces = iter(lambda: stream.read(1000), b"")
        assert b"".join(pieces) == data


def test_a_frame_is_read_by_its_byte_range(store: BlobStore) -> None:
    """A 4-frame uncompressed object: frame 3 read alone, by the range its offset gives,
    is that frame's pixels (what a WADO-RS frame retrieval asks the store for)."""
    frames = [bytes([number]) * (32 * 32 * 2) for number in range(1, 5)]
    ds = make_ct(size=32, NumberOfFrames=4)
    ds.PixelData = b"".join(frames)
    data = part10(ds)
    key = blob_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    store.write(key, [data])
    first = len(data) - len(ds.PixelData)  # Pixel Data is the last element
    size = len(frames[0])
    assert read(store, key, (first + 2 * size, first + 3 * size)) == frames[2]


def test_a_stream_seeks_as_a_file_does(store: BlobStore) -> None:
    """pydicom reads a blob with deferred elements (it seeks back for them), and a range
    past the end is cut short, on both stores."""
    key, data = ct_key_and_bytes()
    store.write(key, [data])
    with store.open(key) as stream:
        assert stream.seekable()
        ds = pydicom.dcmread(stream, defer_size=256)
        assert stream.seek(0, io.SEEK_END) == len(data)
        assert stream.seek(-10, io.SEEK_END) == len(data) - 10 and stream.read() == data[-10:]
        assert stream.seek(128) == 128 and stream.read(4) == b"DICM" and stream.tell() == 132
    assert ds.PixelData == pydicom.dcmread(io.BytesIO(data)).PixelData  # deferred, read now
    with store.open(key, (len(data) - 4, len(data) + 100)) as tail:
        assert tail.read() == data[-4:]


def test_nothing_at_a_key(store: BlobStore) -> None:
    key, _ = ct_key_and_bytes()
    assert not store.exists(key)
    with pytest.raises(FileNotFoundError):
        store.open(key)
    with pytest.raises(FileNotFoundError):
        store.size(key)
    store.delete(key)  # nothing there is no error


def test_placing_an_identical_object_again_keeps_the_first(store: BlobStore) -> None:
    key, data = ct_key_and_bytes()
    first = store.begin([data])
    first.place(key)
    again = store.begin([data])
    again.place(key)
    assert first.named and not again.named
    again.settle()
    first.settle()
    assert read(store, key) == data
    with pytest.raises(ValueError):
        again.place(key)


def test_a_withdrawn_placing_removes_only_what_it_created(store: BlobStore) -> None:
    key, data = ct_key_and_bytes()
    kept = store.begin([data])
    kept.place(key)
    kept.settle()
    refused = store.begin([data])
    refused.place(key)
    refused.withdraw()  # it found the object there: it is someone else's
    assert read(store, key) == data
    other_key, other = ct_key_and_bytes()
    created = store.begin([other])
    created.place(other_key)
    created.withdraw()
    assert not store.exists(other_key)
    assert store.placements.leftovers() == []  # every record settled or forgotten


def test_delete_takes_the_cached_data_along(store: BlobStore) -> None:
    key, data = ct_key_and_bytes()
    neighbour, neighbour_data = ct_key_and_bytes(
        study_uid=key.split("/")[0], series_uid=key.split("/")[1]
    )
    store.write(key, [data])
    store.write(neighbour, [neighbour_data])
    store.put_cached(cache_key(key, "metadata.json"), b"{}")
    store.put_cached(cache_key(key, "metadata.json"), b'{"a": 1}')  # replaced, not refused
    store.put_cached(cache_key(neighbour, "metadata.json"), b"[]")
    assert read(store, cache_key(key, "metadata.json")) == b'{"a": 1}'
    assert sorted(store.keys()) == sorted([key, neighbour])  # no cached data among the blobs
    store.delete(key)
    assert not store.exists(key)
    assert not store.exists(cache_key(key, "metadata.json"))
    assert read(store, cache_key(neighbour, "metadata.json")) == b"[]"
    assert read(store, neighbour) == neighbour_data


def test_the_store_can_be_written(store: BlobStore) -> None:
    store.check()
    assert store.recover() == 0
    usage = store.usage()
    if isinstance(store, S3BlobStore):
        assert usage.free_bytes is None  # a bucket has no free space to report
    else:
        assert usage.free_bytes and usage.free_bytes > 0
    assert usage.used_bytes is None  # the index's to say


# --- create-only puts ------------------------------------------------------------------------


def test_the_same_data_set_under_another_file_meta_is_the_same_object(
    seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    s3 = new_s3_store(seaweedfs, tmp_path)
    ds = make_ct()
    data = part10(ds)
    key = blob_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, "ab" * 8)
    s3.write(key, [data])
    ds.file_meta.ImplementationVersionName = "OTHER_SENDER"
    resent = part10(ds)
    assert resent != data
    blob = s3.begin([resent])
    blob.place(key)  # accepted: the data set is the one stored
    assert not blob.named
    blob.settle()
    assert read(s3, key) == data


def test_a_different_object_under_a_taken_key_is_refused(
    seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    s3 = new_s3_store(seaweedfs, tmp_path)
    ds = make_ct(seed=1)
    key = blob_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, "cd" * 8)
    first = part10(ds)
    s3.write(key, [first])
    ds.PatientName = "Other^Person"  # another data set whose hash prefix collided
    blob = s3.begin([part10(ds)])
    with pytest.raises(DuplicateConflict):
        blob.place(key)
    assert blob.placement is None
    assert s3.placements.leftovers() == []
    assert read(s3, key) == first


def test_seaweedfs_enforces_create_only_puts(seaweedfs: SeaweedFS) -> None:
    open_s3_store(s3_location(seaweedfs)).verify_create_only()


class _CarelessS3(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that stores every PUT, ignoring If-None-Match (as rclone's and s3rver
    do): enough S3 for the node's start-up check."""

    objects: dict[str, bytes] = {}
    puts: list[tuple[str, str | None]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"", etag: str = "") -> None:
        self.send_response(status)
        if etag:
            self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.objects[self.path] = body
        self.puts.append((self.path, self.headers.get("If-None-Match")))
        self._reply(200, etag=f'"{uuid.uuid4().hex}"')

    def do_POST(self) -> None:  # bulk delete
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._reply(200, b'<?xml version="1.0" encoding="UTF-8"?><DeleteResult></DeleteResult>')


def test_a_server_that_ignores_if_none_match_is_refused_at_start(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CarelessS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        location = S3Location(
            endpoint=f"http://127.0.0.1:{server.server_address[1]}",
            bucket="careless",
            access_key_id="k",
            secret_access_key="s",
        )
        with pytest.raises(ConfigError) as refused:
            open_s3_store(location)
        assert refused.value.key == "storage.endpoint"
        assert "If-None-Match" in str(refused.value)
        # it did ask: both puts of the probe carried the condition, and the server took both
        probes = [p for p in _CarelessS3.puts if "create-only" in p[0]]
        assert len(probes) == 2 and all(condition == "*" for _, condition in probes)
    finally:
        server.shutdown()
        server.server_close()


# --- settings-side helpers -----------------------------------------------------------------


def test_credentials_come_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_text("[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n")
    assert read_credentials(path) == ("AK", "SK", "")
    path.write_text("[default]\naws_access_key_id = AK\n")
    with pytest.raises(ConfigError, match="aws_secret_access_key"):
        read_credentials(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_credentials(tmp_path / "missing")
    with pytest.raises(ConfigError, match="storage.endpoint"):
        S3Location(endpoint="127.0.0.1:9000", bucket="b", access_key_id="k", secret_access_key="s")


def test_storage_settings_choose_the_store(tmp_path: Path) -> None:
    from dicomnode.archive.objectstore import blob_store_from_settings
    from dicomnode.config.reader import parse

    settings, problems = parse({}, tmp_path)
    assert problems == [] and settings.storage.backend == "filesystem"
    assert blob_store_from_settings(settings.storage, "", tmp_path) is None
    _, problems = parse({"storage": {"backend": "s3"}}, tmp_path)
    assert sorted(p.key for p in problems) == [
        "storage.bucket",
        "storage.credentials_file",
        "storage.endpoint",
    ]
    _, problems = parse({"storage": {"backend": "s3", "endpoint": "s3.local:9000"}}, tmp_path)
    assert "storage.endpoint" in {p.key for p in problems}
    (tmp_path / "credentials").write_text("[default]\naws_access_key_id = AK\n")
    settings, problems = parse(
        {
            "storage": {
                "backend": "s3",
                "endpoint": "http://127.0.0.1:9",
                "bucket": "b",
                "credentials_file": "credentials",
            }
        },
        tmp_path,
    )
    assert problems == []
    with pytest.raises(ConfigError, match="aws_secret_access_key"):  # read before any start
        blob_store_from_settings(settings.storage, "", tmp_path)


def test_wrong_credentials_are_a_storage_failure_in_plain_words(seaweedfs: SeaweedFS) -> None:
    location = S3Location(
        endpoint=seaweedfs.endpoint,
        bucket="dicomnode",
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY + "-wrong",
    )
    with pytest.raises(StorageUnavailable) as failed:
        S3BlobStore(location).check()
    assert "127.0.0.1" not in str(failed.value)


# --- streaming ----------------------------------------------------------------------------


def test_a_large_object_streams_without_being_held_in_memory(
    seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    """A 48 MiB object read through `open` in 1 MiB pieces: the reading process's peak
    memory grows by far less than the object (measured against reading one byte of it)."""
    location = s3_location(seaweedfs)
    s3 = new_s3_store(seaweedfs, tmp_path, prefix=location.prefix)
    size = 48 << 20
    big = bytes(range(256)) * (size // 256)
    key = "1.2.3/4.5.6/7.8.9.dcm"
    s3.write(key, [big])
    script = textwrap.dedent(
        f"""
        import resource, sys
        from dicomnode.archive.objectstore import S3BlobStore, location_from_files
        from pathlib import Path
        location = location_from_files({seaweedfs.endpoint!r}, "dicomnode",
            Path({str(seaweedfs.credentials_file)!r}), prefix={location.prefix!r})
        store = S3BlobStore(location)
        total = 0
        with store.open({key!r}) as stream:
            while piece := stream.read(1 << 20 if sys.argv[1] == "all" else 1):
                total += len(piece)
                if sys.argv[1] != "all":
                    break
        print(total, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        """
    )
    peaks = {}
    for how in ("one", "all"):
        done = subprocess.run(
            [sys.executable, "-c", script, how], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        total, peak = map(int, done.stdout.split())
        peaks[how] = peak
        assert total == (size if how == "all" else 1)
    assert peaks["all"] - peaks["one"] < 24 << 20, peaks


# --- failures -----------------------------------------------------------------------------


def test_a_stopped_server_is_a_storage_failure_then_recovers(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs-restarted"))
    try:
        s3 = new_s3_store(server, tmp_path, timeout_seconds=5.0)
        key, data = ct_key_and_bytes()
        s3.write(key, [data])
        refused_key, refused = ct_key_and_bytes()
        placed = s3.begin([refused])
        placed.place(refused_key)
        server.kill()
        with pytest.raises(ObjectStoreUnavailable):
            placed.withdraw()  # refused, but its object cannot be deleted now
        (left,) = s3.placements.leftovers()
        assert left.key == refused_key and left.withdrawn  # recovery deletes it later
        s3.placements.forget(left.placement)
        other_key, other = ct_key_and_bytes()
        blob = s3.begin([other])
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable) as failed:
            blob.place(other_key)
        assert time.monotonic() - started < 15
        assert isinstance(failed.value, StorageUnavailable) and isinstance(failed.value, OSError)
        assert "127.0.0.1" not in str(failed.value) and str(server.ports["s3"]) not in str(
            failed.value
        )
        blob.withdraw()  # outcome unknown: the record stays for recovery
        assert [left.key for left in s3.placements.leftovers()] == [other_key]
        with pytest.raises(StorageUnavailable):
            read(s3, key)
        with pytest.raises(StorageUnavailable):
            s3.check()
        server.start()
        s3.check()
        assert read(s3, key) == data  # acknowledged before the kill: still there
        again = s3.begin([other])
        again.place(other_key)
        again.settle()
        assert read(s3, other_key) == other
    finally:
        server.kill()


# --- a crash between the put and the index row: recovery from the database record ----------


def s3_archive(server: SeaweedFS, folder: Path, prefix: str) -> Archive:
    """An archive on SQLite whose blobs are in the bucket under `prefix`, its placings
    recorded in the index database as node "node-1" (the same node after a restart)."""
    location = s3_location(server, prefix=prefix)
    url = f"sqlite:///{folder / 'index.sqlite'}"
    migrate(url)  # as an operator does before a node opens the index
    return Archive(
        folder / "data",
        url,
        blob_store=lambda index: open_s3_store(location, DatabasePlacements(index, "node-1")),
    )


def _no_listing(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("recovery listed the bucket")


def test_a_crash_after_the_put_files_the_object_at_the_next_start(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process stops after the object was put and before its index row was committed
    (its sender got no answer): the next start finds the database record, not a listing,
    and files the object from the bucket."""
    prefix = f"crash-{uuid.uuid4().hex[:8]}"
    archive = s3_archive(seaweedfs, tmp_path, prefix)
    intake = Intake(archive, Metrics())
    kept, lost = make_ct(instance_number=1), make_ct(instance_number=2)
    assert intake.receive_part10(part10(kept), SENDER).outcome == "stored"

    def the_process_stops(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt("kill -9")

    with monkeypatch.context() as crashing:
        crashing.setattr(archive.index, "write_grouped", the_process_stops)
        crashing.setattr(archive, "_withdraw", lambda blob: None)  # a crash withdraws nothing
        with pytest.raises(KeyboardInterrupt):
            intake.receive_part10(part10(lost), SENDER)
    archive.close()

    restarted = s3_archive(seaweedfs, tmp_path, prefix)
    try:
        # the kept object's record too: records are settled in batches, after a while
        records = {left.key: left for left in restarted.blobs.placements.leftovers()}
        assert sorted(key.split("/")[0] for key in records) == sorted(
            [kept.StudyInstanceUID, lost.StudyInstanceUID]
        )
        (left,) = [r for key, r in records.items() if key.startswith(lost.StudyInstanceUID)]
        assert not left.withdrawn
        assert restarted.blobs.exists(left.key)  # in the bucket, named by nothing
        assert restarted.counts()["instances"] == 1
        monkeypatch.setattr(S3BlobStore, "keys", _no_listing)
        assert Intake(restarted, Metrics()).recover_unindexed() == 1
        assert restarted.counts()["instances"] == 2
        (row,) = restarted.find_instances_exactly((("SOPInstanceUID", lost.SOPInstanceUID),))
        assert row.blob_path == left.key
        assert read(restarted.blobs, row.blob_path) == part10(lost)
        restarted.settle_placements(older_than=0)
        assert restarted.blobs.placements.leftovers() == []
    finally:
        restarted.close()


def test_a_refused_object_left_by_a_crash_is_removed_from_the_bucket(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index refused the object, its record was marked withdrawn, and the process stopped
    before the object was deleted: the next start deletes it instead of filing it."""
    prefix = f"refused-{uuid.uuid4().hex[:8]}"
    archive = s3_archive(seaweedfs, tmp_path, prefix)
    intake = Intake(archive, Metrics())

    def index_down(*_args: object, **_kwargs: object) -> None:
        raise OSError(5, "disk I/O error")

    def stops_after_marking(blob: object) -> None:
        archive.blobs.placements.withdraw(blob.placement)  # type: ignore[attr-defined]
        raise KeyboardInterrupt("kill -9")

    with monkeypatch.context() as failing:
        failing.setattr(archive.index, "write_grouped", index_down)
        failing.setattr(archive, "_withdraw", stops_after_marking)
        with pytest.raises(KeyboardInterrupt):
            intake.receive_part10(part10(make_ct()), SENDER)
    archive.close()

    restarted = s3_archive(seaweedfs, tmp_path, prefix)
    try:
        (left,) = restarted.blobs.placements.leftovers()
        assert left.withdrawn and restarted.blobs.exists(left.key)
        monkeypatch.setattr(S3BlobStore, "keys", _no_listing)
        assert Intake(restarted, Metrics()).recover_unindexed() == 0
        assert not restarted.blobs.exists(left.key)
        assert restarted.blobs.placements.leftovers() == []
        assert restarted.counts()["instances"] == 0
    finally:
        restarted.close()


# --- the object store killed and restarted under a node receiving over DIMSE ---------------


def s3_storage_toml(server: SeaweedFS, prefix: str, timeout_seconds: float = 30.0) -> str:
    """The [storage] section of a node whose blobs are in `server`'s bucket under `prefix`."""
    return "\n".join(
        [
            "[storage]",
            'backend = "s3"',
            f'endpoint = "{server.endpoint}"',
            'bucket = "dicomnode"',
            f'prefix = "{prefix}"',
            f'credentials_file = "{server.credentials_file}"',
            f"timeout_seconds = {timeout_seconds}",
        ]
    )


class _Sender(threading.Thread):
    """C-STOREs new CT objects over short associations until stopped, recording each answer
    (status, or None for an object that got no answer) with the object's bytes."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.answers: list[tuple[object, bytes, int | None]] = []
        self.stopping = threading.Event()

    def count(self, status: int) -> int:
        return sum(1 for _, _, answered in self.answers if answered == status)

    def run(self) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage

        ae = AE(ae_title="MODALITY")
        ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context(CTImageStorage)
        number = 0
        while not self.stopping.is_set():
            assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMNODE")
            if not assoc.is_established:
                time.sleep(0.2)
                continue
            try:
                for _ in range(10):
                    number += 1
                    ds = make_ct(instance_number=number, seed=number)
                    try:
                        answer = assoc.send_c_store(ds)
                    except Exception:
                        self.answers.append((ds, part10(ds), None))
                        break
                    status = int(answer.Status) if "Status" in answer else None
                    self.answers.append((ds, part10(ds), status))
                    if status is None:
                        break
            finally:
                if assoc.is_established:
                    assoc.release()


def test_the_object_store_killed_and_restarted_under_dimse_ingest(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """SeaweedFS is killed (kill -9) while a modality sends, then started again: every object
    the node could not put is answered 0xA700 (Out of Resources), nothing else; every object
    answered success is in the index and in the bucket with its bytes, after the restart."""
    import sqlalchemy

    from tests.conftest import serve, write_config

    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs-ingest"))
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    config = write_config(
        tmp_path / "node.toml",
        tmp_path / "data",
        url,
        extra=s3_storage_toml(server, "ingest", timeout_seconds=3.0),
    )
    node = serve(config, tmp_path / "serve.log")
    sender = _Sender(node.dimse_port)
    try:
        sender.start()
        wait_for(lambda: sender.count(0x0000) >= 20, 60, "20 objects stored")
        server.kill()
        wait_for(lambda: sender.count(0xA700) >= 3, 60, "failures answered 0xA700")
        server.start()
        stored_before = sender.count(0x0000)
        wait_for(lambda: sender.count(0x0000) >= stored_before + 20, 90, "storing again")
    finally:
        sender.stopping.set()
        sender.join(120)
        node.terminate()
    try:
        statuses = {status for _, _, status in sender.answers}
        assert statuses <= {0x0000, 0xA700}, statuses  # no other failure, never no answer
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            query = sqlalchemy.text("SELECT sop_instance_uid, blob_path FROM instances")
            rows = {uid: key for uid, key in conn.execute(query)}
        engine.dispose()
        store = S3BlobStore(s3_location(server, prefix="ingest"))
        acknowledged = [(ds, data) for ds, data, status in sender.answers if status == 0x0000]
        assert len(acknowledged) >= 40
        for ds, _ in acknowledged:
            key = rows[ds.SOPInstanceUID]  # KeyError: an acknowledged object lost its row
            stored = pydicom.dcmread(io.BytesIO(read(store, key)))  # as sent, re-encoded
            assert (stored.SOPInstanceUID, stored.PixelData) == (ds.SOPInstanceUID, ds.PixelData)
        refused = [ds.SOPInstanceUID for ds, _, status in sender.answers if status == 0xA700]
        assert not set(refused) & set(rows)  # a refused object is not filed
    finally:
        server.kill()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
