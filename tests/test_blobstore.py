"""The BlobStore protocol: what every store (filesystem here; S3 in test_object_store) must do,
and its Placements record, which recovery reads instead of walking folders or a bucket."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from dicomnode.archive import Archive
from dicomnode.archive.blobs import FileBlobStore
from dicomnode.archive.blobstore import (
    BlobStore,
    Placements,
    StoreUsage,
    blob_key,
    cache_key,
    read_all,
    stage_to_file,
)
from dicomnode.archive.placements import DatabasePlacements
from dicomnode.core.metrics import Metrics
from dicomnode.core.model import Source
from dicomnode.intake import Intake
from tests.factory import make_ct, part10

SENDER = Source("dimse", "MODALITY", "127.0.0.1")

KEY = "1.2/3.4/5.6.0123456789abcdef.dcm"


@pytest.fixture
def store(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs", tmp_path / "placing")


def check_conformance(store: BlobStore) -> None:
    """The protocol's promises, for any store (s3 reuses this against SeaweedFS)."""
    assert isinstance(store, BlobStore)
    assert isinstance(store.placements, Placements)
    store.check()
    pending = store.begin([b"first ", b"object"])
    assert pending.size == 12
    assert pending.sha256() == hashlib.sha256(b"first object").hexdigest()
    pending.place(KEY)
    assert pending.named and pending.key == KEY
    assert [left.key for left in store.placements.leftovers()] == [KEY]
    pending.settle()
    assert store.placements.leftovers() == []
    assert read_all(store, KEY) == b"first object"
    with store.open(KEY, (6, 12)) as part:
        assert part.read() == b"object"
    with store.open(KEY, (2, 5)) as part:
        assert part.read(1) == b"r" and part.read() == b"st"
    assert store.size(KEY) == 12 and store.exists(KEY)
    assert list(store.keys()) == [KEY]
    # create-only: a second placing at the same key keeps the first blob
    again = store.begin([b"other bytes!"])
    again.place(KEY)
    assert not again.named
    again.withdraw()  # not named by it: the blob stays
    assert read_all(store, KEY) == b"first object"
    assert store.placements.leftovers() == []
    # cached data lives in its own key space and goes with its blob
    store.put_cached(cache_key(KEY, "metadata.json"), b"[1]")
    store.put_cached(cache_key(KEY, "metadata.json"), b"[2]")
    assert read_all(store, cache_key(KEY, "metadata.json")) == b"[2]"
    assert list(store.keys()) == [KEY]
    store.delete(KEY)
    assert not store.exists(KEY) and not store.exists(cache_key(KEY, "metadata.json"))
    with pytest.raises(FileNotFoundError):
        store.open(KEY)
    store.delete(KEY)  # nothing there: no error
    usage = store.usage()
    assert isinstance(usage, StoreUsage)
    assert usage.free_bytes is None or usage.free_bytes > 0


def test_the_filesystem_store_conforms(store):
    check_conformance(store)


def test_construction_creates_nothing(tmp_path):
    FileBlobStore(tmp_path / "blobs", tmp_path / "placing")
    assert list(tmp_path.iterdir()) == []


def test_a_withdrawn_placing_is_durable_before_its_blob_goes(store, monkeypatch):
    """A refused object's record is marked withdrawn first: a crash before its blob is removed
    leaves a leftover that says so, and recovery removes the blob instead of filing it."""
    pending = store.begin([b"refused"])
    pending.place(KEY)
    monkeypatch.setattr(store, "delete", lambda key: (_ for _ in ()).throw(OSError("crash")))
    monkeypatch.setattr(store.placements, "forget", lambda placement: None)  # crashed first
    with pytest.raises(OSError):
        pending.withdraw()
    (left,) = store.placements.leftovers()
    assert left.key == KEY and left.withdrawn
    assert store.exists(KEY)


def test_another_unsettled_placing_keeps_the_blob(store):
    first = store.begin([b"same"])
    first.place(KEY)
    second = store.begin([b"same"])
    second.place(KEY)
    first.withdraw()  # named it, but the second placing counts on it
    assert store.exists(KEY)
    second.settle()
    assert store.placements.leftovers() == []


def test_a_range_past_the_end_is_short_and_a_bad_range_refused(store):
    store.write(KEY, [b"0123456789"])
    with store.open(KEY, (8, 100)) as part:
        assert part.read() == b"89"
    with pytest.raises(ValueError):
        store.open(KEY, (5, 2))


def test_staging_copies_a_blob_to_a_local_file(store, tmp_path):
    data = os.urandom(3 << 20)
    store.write(KEY, [data[:1000], data[1000:]])
    staged = stage_to_file(store, KEY, tmp_path / "tmp-analysis")
    assert staged.parent == tmp_path / "tmp-analysis" and staged.read_bytes() == data
    with pytest.raises(FileNotFoundError):
        stage_to_file(store, "1.2/3.4/9.9.dcm", tmp_path / "tmp-analysis")
    assert list((tmp_path / "tmp-analysis").iterdir()) == [staged]  # nothing half-copied


def test_partial_writes_of_dead_processes_are_discarded_by_recover_only(store):
    pending = store.begin([b"interrupted"])
    del pending  # the process "died" holding it: its temporary file stays
    (tmp,) = store.tmp.iterdir()
    dead = store.tmp / ("999999999" + tmp.name.lstrip("0123456789"))  # a pid no longer running
    tmp.rename(dead)
    FileBlobStore(store.root, store.placements.folder)  # constructing removes nothing
    assert dead.exists()
    assert store.recover() == 1
    assert list(store.tmp.iterdir()) == []


def test_keys_leave_out_quarantine_and_cache(store):
    store.write(KEY, [b"a"])
    store.write("held/" + KEY, [b"b"])
    store.put_cached(cache_key(KEY, "metadata.json"), b"c")
    assert list(store.keys()) == [KEY]


def test_blob_keys_carry_validated_uids_and_the_hash():
    assert blob_key("1.2", "3.4", "5.6", "ab" * 32) == "1.2/3.4/5.6.abababababababab.dcm"
    assert blob_key("1.2", "3.4", "5.6") == "1.2/3.4/5.6.dcm"
    with pytest.raises(Exception, match="StudyInstanceUID"):
        blob_key("../etc", "3.4", "5.6")


def test_a_ranged_stream_is_a_binary_stream(store):
    store.write(KEY, [b"abcdef"])
    with store.open(KEY, (1, 4)) as part:
        assert isinstance(part, io.BufferedIOBase)
        assert part.read(10) == b"bcd" and part.read() == b""


# --- recovery from the Placements record, for both implementations ----------------------------


@pytest.fixture(params=["journal", "database"])
def recovering_archive(request, tmp_path, database_url):
    """An archive whose placings are recorded in the filesystem journal or in the database
    (the S3 store's Placements, here under a filesystem store), on SQLite and PostgreSQL."""

    def store(index):
        if request.param == "journal":
            return FileBlobStore(tmp_path / "data" / "blobs", tmp_path / "data" / "placing")
        return FileBlobStore(tmp_path / "data" / "blobs", placements=DatabasePlacements(index))

    archive = Archive(tmp_path / "data", database_url, blob_store=store)
    yield archive
    archive.close()


def test_a_crash_between_placing_and_indexing_is_recovered_from_the_record(
    recovering_archive, monkeypatch
):
    """The process stops after the blob was placed and before its index row was committed:
    the sender got no answer, the blob is in the store, nothing names it. The next start files
    it again from the Placements record alone (no folder walked), then nothing is left."""
    archive = recovering_archive
    intake = Intake(archive, Metrics())
    kept, lost = make_ct(instance_number=1), make_ct(instance_number=2)
    intake.receive_part10(part10(kept), SENDER)
    archive.settle_placements(older_than=0)
    assert archive.blobs.placements.leftovers() == []

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt("the process stops here")

    with monkeypatch.context() as crashing:
        crashing.setattr(archive.index, "write_grouped", crash)
        crashing.setattr(archive, "_withdraw", lambda blob: None)  # a crash withdraws nothing
        with pytest.raises(KeyboardInterrupt):
            intake.receive_part10(part10(lost), SENDER)
    (left,) = archive.blobs.placements.leftovers()
    assert left.key.startswith(f"{lost.StudyInstanceUID}/") and not left.withdrawn
    assert archive.blobs.exists(left.key)
    assert archive.counts()["instances"] == 1

    def no_walking(*_args, **_kwargs):
        raise AssertionError("recovery walked the blob store")

    monkeypatch.setattr(archive.blobs, "placed", no_walking)
    assert intake.recover_unindexed() == 1
    assert archive.counts()["instances"] == 2
    archive.settle_placements(older_than=0)
    assert archive.blobs.placements.leftovers() == []
    assert intake.recover_unindexed() == 0


def test_a_refused_object_whose_removal_a_crash_stopped_never_comes_back(
    recovering_archive, monkeypatch
):
    """The index refused the object; the record was marked withdrawn, then the process stopped
    before the blob was removed: recovery removes it instead of filing it."""
    archive = recovering_archive
    intake = Intake(archive, Metrics())
    refused = make_ct()

    def index_down(*_args, **_kwargs):
        raise OSError("disk I/O error")

    def crash_after_marking(blob):
        archive.blobs.placements.withdraw(blob.placement)
        raise KeyboardInterrupt("the process stops here")

    with monkeypatch.context() as failing:
        failing.setattr(archive.index, "write_grouped", index_down)
        failing.setattr(archive, "_withdraw", crash_after_marking)
        with pytest.raises(KeyboardInterrupt):
            intake.receive_part10(part10(refused), SENDER)
    (left,) = archive.blobs.placements.leftovers()
    assert left.withdrawn and archive.blobs.exists(left.key)
    assert intake.recover_unindexed() == 0
    assert not archive.blobs.exists(left.key)
    assert archive.blobs.placements.leftovers() == []
    assert archive.counts()["instances"] == 0


def test_database_placements_are_judged_only_by_their_own_node(tmp_path, database_url):
    """On shared storage, node A's recovery never sees node B's placings (they may be in
    flight on B)."""
    archive = Archive(tmp_path / "data", database_url)
    try:
        node_a = DatabasePlacements(archive.index, "node-a")
        node_b = DatabasePlacements(archive.index, "node-b")
        a = node_a.record("1.2/3.4/5.6.aaaa.dcm")
        b = node_b.record("1.2/3.4/5.6.aaaa.dcm")
        assert [left.placement for left in node_a.leftovers()] == [a]
        assert [left.key for left in node_b.leftovers()] == ["1.2/3.4/5.6.aaaa.dcm"]
        assert not node_a.withdraw(a)  # B's unsettled placing of the same key counts on it
        assert node_a.leftovers()[0].withdrawn
        node_b.settle([b])
        node_a.forget(a)
        assert node_a.leftovers() == [] and node_b.leftovers() == []
    finally:
        archive.close()
