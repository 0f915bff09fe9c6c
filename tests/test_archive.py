"""The archive and its one ingest path: durable blobs kept as received, exact duplicates,
refused input that leaves everything as it was. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
import time
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydicom.data import get_testdata_file
from sqlalchemy import event, select

from dicomnode.archive import Archive, schema
from dicomnode.archive.blobs import SPARES
from dicomnode.archive.received import from_part10
from dicomnode.core.errors import DuplicateConflict, InvalidInput, InvalidUID, MissingAttribute
from dicomnode.core.metrics import Metrics
from dicomnode.core.model import Level, Source
from dicomnode.intake import Intake
from tests.conftest import open_archive, wait_until
from tests.factory import make_ct, part10

SENDER = Source("dimse", "MODALITY", "127.0.0.1")


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def archive(tmp_path, database_url):
    archive = Archive(tmp_path / "data", database_url)
    yield archive
    archive.close()


def test_blob_keeps_the_bytes_as_received_with_their_sha256(archive):
    original = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    received = from_part10(original)
    result = archive.store(received, SENDER)
    assert result.outcome == "stored"
    blob = archive.blob_file(result.instance).read_bytes()
    assert blob == original  # Part 10 in, the very same file kept
    assert result.instance.sha256 == hashlib.sha256(received.dataset_bytes).hexdigest()
    assert result.instance.transfer_syntax_uid == "1.2.840.10008.1.2.4.91"
    assert archive.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}


def test_hierarchy_rows_are_shared(archive):
    first = make_ct(instance_number=1)
    same_series = make_ct(
        study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID, instance_number=2
    )
    other_series = make_ct(study_uid=first.StudyInstanceUID, instance_number=1, Modality="PT")
    for ds in (first, same_series, other_series):
        archive.store(from_part10(part10(ds)), SENDER)
    assert archive.counts() == {"patients": 1, "studies": 1, "series": 2, "instances": 3}


def test_identical_resend_stores_nothing_new(archive, tmp_path):
    data = part10(make_ct())
    archive.store(from_part10(data), SENDER)
    before = files_under(tmp_path / "data" / "blobs")
    result = archive.store(from_part10(data), SENDER)
    assert result.outcome == "duplicate"
    assert files_under(tmp_path / "data" / "blobs") == before
    assert archive.counts()["instances"] == 1


def test_different_object_under_a_stored_uid_is_rejected_and_the_original_kept(archive, tmp_path):
    original = make_ct(seed=1)
    archive.store(from_part10(part10(original)), SENDER)
    before = files_under(tmp_path / "data" / "blobs")
    impostor = make_ct(
        sop_uid=original.SOPInstanceUID,
        study_uid=original.StudyInstanceUID,
        series_uid=original.SeriesInstanceUID,
        seed=2,
    )
    with pytest.raises(DuplicateConflict, match="already stored"):
        archive.store(from_part10(part10(impostor)), SENDER)
    assert files_under(tmp_path / "data" / "blobs") == before
    assert archive.counts()["instances"] == 1


def test_replace_policy_swaps_the_object(tmp_path, database_url):
    archive = Archive(tmp_path / "data", database_url, duplicate_policy="replace")
    try:
        original = make_ct(seed=1)
        first = archive.store(from_part10(part10(original)), SENDER)
        newer = make_ct(
            sop_uid=original.SOPInstanceUID,
            study_uid=original.StudyInstanceUID,
            series_uid=original.SeriesInstanceUID,
            seed=2,
        )
        second = archive.store(from_part10(part10(newer)), SENDER)
        assert second.outcome == "replaced"
        assert not archive.blob_file(first.instance).exists()
        stored = pydicom.dcmread(archive.blob_file(second.instance))
        assert stored.PixelData == newer.PixelData
        (only,) = archive.find_instances(
            Level.IMAGE, (("SOPInstanceUID", original.SOPInstanceUID),)
        )
        assert only.sha256 == second.instance.sha256
        assert archive.counts()["instances"] == 1
    finally:
        archive.close()


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("SOPInstanceUID", "1.2.3/../../x"),
        ("StudyInstanceUID", "../../etc"),
        ("SeriesInstanceUID", "1.2..3"),
        ("SOPInstanceUID", "1." + "2" * 70),
        ("SOPInstanceUID", "1.2.3\\4"),
    ],
)
def test_hostile_uids_never_reach_a_path(archive, tmp_path, keyword, value):
    ds = make_ct()
    setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    with pytest.raises(InvalidUID, match=keyword):
        archive.store(from_part10(part10(ds)), SENDER)
    assert files_under(tmp_path / "data" / "blobs") == {}
    assert archive.counts()["instances"] == 0


@pytest.mark.parametrize(
    "keyword", ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "PatientID"]
)
def test_required_attributes(keyword):
    ds = make_ct()
    delattr(ds, keyword)
    with pytest.raises(MissingAttribute, match=keyword):
        from_part10(part10(ds))


def test_empty_patient_id_is_refused():
    with pytest.raises(MissingAttribute, match="PatientID"):
        from_part10(part10(make_ct(patient_id="")))


@pytest.mark.parametrize("cut", [1, 100, 1000])
def test_truncated_objects_are_refused(cut):
    data = part10(make_ct(size=32))
    with pytest.raises(InvalidInput, match="truncated"):
        from_part10(data[:-cut])


def test_not_dicom_is_refused():
    with pytest.raises(InvalidInput, match="DICM"):
        from_part10(b"hello, this is not DICOM" * 10)


def test_index_failure_leaves_no_blob_and_no_row(archive, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(archive.index, "ensure_hierarchy", broken)
    with pytest.raises(RuntimeError):
        archive.store(from_part10(part10(make_ct())), SENDER)
    assert [p for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()] == []
    assert archive.counts()["instances"] == 0


def file_paths(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_a_begun_blob_is_visible_only_once_placed_and_abandoning_it_leaves_nothing(archive):
    """C-STORE writes an object's bytes before parsing them (`begin_blob`); until `place`
    they are a temporary file only, and an object refused meanwhile leaves no trace."""
    blobs = archive.blobs.root
    placed = archive.begin_blob([b"first ", b"blob"])
    assert [p.parent.name for p in file_paths(blobs)] == ["tmp"]
    placed.place("1.2/3.4/5.6.dcm")
    assert file_paths(blobs) == [blobs / "1.2/3.4/5.6.dcm"]
    assert (blobs / "1.2/3.4/5.6.dcm").read_bytes() == b"first blob"
    placed.abandon()  # after placing: a no-op
    assert (blobs / "1.2/3.4/5.6.dcm").exists()
    with pytest.raises(ValueError):
        placed.place("1.2/3.4/7.8.dcm")

    refused = archive.begin_blob([b"refused"])
    refused.abandon()
    refused.abandon()
    assert file_paths(blobs) == [blobs / "1.2/3.4/5.6.dcm"]


def record_placing_steps(archive, target: Path, monkeypatch) -> list[str]:
    """The data syncs (was `target` named yet, was a temporary name left) and directory
    syncs of the blob store, in order, from now on."""
    from dicomnode.archive import blobs as blob_module

    steps: list[str] = []
    sync_data, fsync_directory = blob_module._sync_data, blob_module.fsync_directory

    def recording_sync_data(fd: int) -> None:
        named = "named" if target.exists() else "unnamed"
        temporary = "a temporary name left" if any(archive.blobs.tmp.iterdir()) else "no other"
        steps.append(f"data synced, {named}, {temporary}")
        sync_data(fd)

    def recording_fsync_directory(directory: Path) -> None:
        if directory == archive.blobs.journal.folder:
            steps.append("placement journal synced")
        else:
            steps.append(f"directory {directory.relative_to(archive.blobs.root)} synced")
        fsync_directory(directory)

    monkeypatch.setattr(blob_module, "_sync_data", recording_sync_data)
    monkeypatch.setattr(blob_module, "fsync_directory", recording_fsync_directory)
    return steps


def test_a_blob_gets_its_name_before_its_data_is_synced_so_one_commit_makes_both_durable(
    archive, monkeypatch
):
    """Naming first lets a journaling filesystem make the data and the new name durable in
    one commit (syncing first and renaming after took two); the directory is synced last."""
    target = archive.blobs.root / "1.2/3.4/5.6.dcm"
    steps = record_placing_steps(archive, target, monkeypatch)
    archive.begin_blob([b"an ", b"object"]).place("1.2/3.4/5.6.dcm")

    assert steps == [
        "data synced, named, no other",  # an unlink after the sync would take a commit too
        "directory 1.2/3.4 synced",
        "directory 1.2 synced",  # the folders the blob created
        "directory . synced",  # not the placement journal's: the same commit holds its entry
    ]
    assert target.read_bytes() == b"an object"
    assert list(archive.blobs.tmp.iterdir()) == []


def test_an_identical_re_send_keeps_the_stored_file_itself(archive, monkeypatch):
    """A file already at a blob's path has the same content (the name carries its hash): it
    is synced and kept, never replaced by a file whose data is not on disk yet."""
    from dicomnode.archive import blobs as blob_module

    intake = Intake(archive, Metrics())
    ds = make_ct()
    first = intake.receive_part10(part10(ds), SENDER)
    stored = archive.blob_file(first.instance)
    inode, data = stored.stat().st_ino, stored.read_bytes()

    synced_inodes: list[int] = []
    sync_data = blob_module._sync_data

    def recording_sync_data(fd: int) -> None:
        synced_inodes.append(os.fstat(fd).st_ino)
        sync_data(fd)

    monkeypatch.setattr(blob_module, "_sync_data", recording_sync_data)
    again = intake.receive_part10(part10(ds), SENDER)
    assert again.outcome == "duplicate"
    assert stored.stat().st_ino == inode and stored.read_bytes() == data
    assert synced_inodes == [inode]  # its writer may not have synced it yet
    assert list(archive.blobs.tmp.iterdir()) == []


def test_without_hard_links_a_blob_is_synced_then_renamed(archive, monkeypatch):
    """Some network filesystems have no hard links: there the data is synced before the
    file gets its name, as a rename needs, and the folders made for the failed link are
    synced all the same."""

    def no_hard_links(source: Path, target: Path) -> None:
        if not Path(target).parent.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")  # asked first
        raise PermissionError(errno.EPERM, "Operation not permitted")

    target = archive.blobs.root / "1.2/3.4/5.6.dcm"
    monkeypatch.setattr(os, "link", no_hard_links)
    steps = record_placing_steps(archive, target, monkeypatch)
    archive.begin_blob([b"an ", b"object"]).place("1.2/3.4/5.6.dcm")

    assert steps == [
        "data synced, unnamed, a temporary name left",
        "directory 1.2/3.4 synced",
        "directory 1.2 synced",
        "directory . synced",  # not the placement journal's: the same commit holds its entry
    ]
    assert target.read_bytes() == b"an object"
    assert list(archive.blobs.tmp.iterdir()) == []


def test_temporary_files_made_ahead_are_used_by_later_blobs_and_removed_on_close(
    tmp_path, database_url
):
    """After answering a C-STORE the node creates the next object's temporary file, so the
    next object does not wait for it."""
    archive = Archive(tmp_path / "data", database_url)
    tmp = archive.blobs.tmp
    for _ in range(SPARES + 2):
        archive.blobs.prepare_spare()
    spares = sorted(tmp.iterdir())
    assert len(spares) == SPARES and all(p.stat().st_size == 0 for p in spares)

    blob = archive.begin_blob([b"next ", b"object"])
    assert sorted(tmp.iterdir()) == spares  # one of them holds it now
    blob.place("1.2/3.4/5.6.dcm")
    assert (archive.blobs.root / "1.2/3.4/5.6.dcm").read_bytes() == b"next object"
    assert len(list(tmp.iterdir())) == SPARES - 1
    archive.close()
    assert list(tmp.iterdir()) == []


def test_a_c_store_leaves_the_next_objects_temporary_file_to_after_its_answer(archive):
    intake = Intake(archive, Metrics())
    received = from_part10(part10(make_ct()))
    after_the_answer: list = []
    intake.receive_dimse(
        received.dataset_bytes,
        received.transfer_syntax_uid,
        received.sop_class_uid,
        received.sop_instance_uid,
        SENDER,
        later=after_the_answer,
    )
    assert list(archive.blobs.tmp.iterdir()) == []
    for work in after_the_answer:
        work()
    (spare,) = archive.blobs.tmp.iterdir()
    assert spare.stat().st_size == 0


def test_a_blob_whose_data_cannot_be_synced_is_refused_and_never_filed_later(archive, monkeypatch):
    """A failing sync refuses the object (0xA700: try again) and withdraws its blob: the
    sender was told it failed, so the next start must not file it (issue 18 item 7; it
    used to be filed again)."""
    from dicomnode.archive import blobs as blob_module
    from dicomnode.core.errors import StorageUnavailable

    def disk_failure(_fd: int) -> None:
        raise OSError(5, "Input/output error")

    intake = Intake(archive, Metrics())
    with monkeypatch.context() as failing:
        failing.setattr(blob_module, "_sync_data", disk_failure)
        with pytest.raises(StorageUnavailable) as refused:
            intake.receive_part10(part10(make_ct()), SENDER)
    assert "Input/output" not in str(refused.value)  # words for the sender, not internals
    assert list(archive.blobs.tmp.iterdir()) == []
    assert archive.counts()["instances"] == 0
    assert archive.check().unindexed_blobs == []
    assert list(archive.blobs.journal.folder.iterdir()) == []

    assert intake.recover_unindexed() == 0
    assert archive.counts()["instances"] == 0 and archive.check().ok


def test_leftovers_of_an_interrupted_write_are_discarded_at_start(tmp_path, database_url):
    Archive(tmp_path / "data", database_url).close()
    leftover = tmp_path / "data" / "blobs" / "tmp" / "abc.part"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a file")
    archive = Archive(tmp_path / "data", database_url)
    assert leftover.exists()  # opening removes nothing: the start's recover() does
    assert archive.recover() == 1
    archive.close()
    assert not leftover.exists()


def test_migrations_create_exactly_the_schema(archive):
    with archive.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert differences == []


def test_health_probe(archive):
    archive.ping()


def test_file_meta_written_by_hand_equals_pydicoms(tmp_path):
    """The File Meta group is encoded directly on the hot path; it must be what pydicom writes."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    from dicomnode.archive.received import (
        IMPLEMENTATION_CLASS_UID,
        IMPLEMENTATION_VERSION_NAME,
        _file_meta,
    )

    for sop_class, sop_instance, ts in [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.56", "1.2.840.10008.1.2.4.91"),
    ]:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_instance
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        expected = BytesIO()
        expected.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(expected, meta, enforce_standard=True)
        assert _file_meta(sop_class, sop_instance, ts) == expected.getvalue()


def test_a_file_without_preamble_is_accepted_and_filed_with_one(archive):
    """Some clients (dicomweb-client with in-memory data sets) send the File Meta group without
    the 128-byte preamble and 'DICM'; the object is kept and filed as a proper Part 10 file."""
    data = part10(make_ct())
    result = archive.store(from_part10(data[132:]), SENDER)
    assert archive.blob_file(result.instance).read_bytes() == data


def test_two_archives_on_one_index_write_side_by_side(tmp_path, database_url):
    """Two writers that do not share a lock (as two processes would) both get every object in:
    SQLite write transactions take the write lock up front instead of failing on upgrade."""
    from concurrent.futures import ThreadPoolExecutor

    archives = [Archive(tmp_path / "data", database_url) for _ in range(2)]
    study = make_ct().StudyInstanceUID
    try:

        def send(archive: Archive, series: int) -> int:
            for number in range(40):
                ds = make_ct(
                    study_uid=study,
                    series_uid=f"1.2.3.{series}",
                    instance_number=number + 1,
                    size=8,
                )
                archive.store(from_part10(part10(ds)), SENDER)
            return 40

        with ThreadPoolExecutor(2) as pool:
            assert sum(pool.map(send, archives, [1, 2])) == 80
        assert archives[0].counts() == {"patients": 1, "studies": 1, "series": 2, "instances": 80}
    finally:
        for archive in archives:
            archive.close()


def test_check_finds_missing_unindexed_and_corrupt_blobs(archive, tmp_path):
    stored = [
        archive.store(from_part10(part10(make_ct(instance_number=n))), SENDER) for n in (1, 2, 3)
    ]
    assert archive.check(verify_hashes=True).ok
    # a crash between blob write and index commit leaves a complete blob no row names
    orphan = make_ct(study_uid=stored[0].instance.study_instance_uid)
    orphan_path = archive.blobs.relative_path(
        orphan.StudyInstanceUID, orphan.SeriesInstanceUID, orphan.SOPInstanceUID
    )
    archive.blobs.write(orphan_path, [part10(orphan)])
    archive.blob_file(stored[0].instance).unlink()  # a row without its blob
    corrupt = archive.blob_file(stored[1].instance)
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))

    report = archive.check(verify_hashes=True)
    assert not report.ok
    assert report.missing_blobs == [stored[0].instance.blob_path]
    assert report.unindexed_blobs == [orphan_path]
    assert report.corrupt_blobs == [stored[1].instance.blob_path]

    repaired = archive.check(repair=True)
    assert repaired.unindexed_blobs == [orphan_path]
    assert not archive.blobs.exists(orphan_path)
    assert archive.blob_file(stored[2].instance).exists()  # indexed blobs are never touched
    assert archive.check().unindexed_blobs == []


# Group commit: on SQLite, writes of received objects that queue while one commit is being
# synced are committed together (one transaction, one sync), each in a savepoint of its own.


@pytest.fixture
def sqlite_archive(tmp_path):
    archive = open_archive(tmp_path / "data", f"sqlite:///{tmp_path / 'index.sqlite'}")
    yield archive
    archive.close()


def _add_patient(patient_id: str, then_fail: bool = False):
    def work(conn):
        conn.execute(
            schema.patients.insert().values(
                patient_id=patient_id, issuer_of_patient_id="", created_at=datetime.now(UTC)
            )
        )
        if then_fail:
            raise ValueError(f"work of {patient_id} failed after its insert")
        return patient_id

    return work


def _patient_ids(archive) -> set[str]:
    with archive.index.read() as conn:
        return set(conn.execute(select(schema.patients.c.patient_id)).scalars())


def _queue_behind_a_running_commit(archive, works):
    """Run a first write that stays open until the `works` have queued behind it, then let
    it finish; returns each work's outcome (its value or its error) and the commits made."""
    index = archive.index
    commits = []
    event.listen(index.engine, "commit", lambda conn: commits.append(1))
    first_open, release_first = threading.Event(), threading.Event()

    def first(conn):
        first_open.set()
        release_first.wait(10)
        return _add_patient("FIRST")(conn)

    outcomes: dict[int, object] = {}

    def run(number, work):
        try:
            outcomes[number] = index.write_grouped(work)
        except Exception as e:
            outcomes[number] = e

    threads = [threading.Thread(target=run, args=(-1, first))]
    threads[0].start()
    assert first_open.wait(10)
    for number, work in enumerate(works):
        threads.append(threading.Thread(target=run, args=(number, work)))
        threads[-1].start()
    wait_until(lambda: len(index._queued) == len(works), timeout=10)  # all queued behind it
    release_first.set()
    for thread in threads:
        thread.join(10)
    assert outcomes.pop(-1) == "FIRST"
    return outcomes, len(commits)


def test_writes_queued_behind_a_commit_are_committed_together(sqlite_archive):
    works = [_add_patient(f"P{n}") for n in range(4)]
    outcomes, commits = _queue_behind_a_running_commit(sqlite_archive, works)
    assert outcomes == {n: f"P{n}" for n in range(4)}
    assert commits == 2  # the first write's, then one for the four that queued behind it
    assert _patient_ids(sqlite_archive) == {"FIRST", "P0", "P1", "P2", "P3"}


def test_a_failing_write_in_a_group_is_rolled_back_alone_and_raised_to_its_caller(sqlite_archive):
    works = [_add_patient("P0"), _add_patient("P1", then_fail=True), _add_patient("P2")]
    outcomes, commits = _queue_behind_a_running_commit(sqlite_archive, works)
    assert isinstance(outcomes[1], ValueError)
    assert outcomes[0] == "P0" and outcomes[2] == "P2"
    assert commits == 2
    assert _patient_ids(sqlite_archive) == {"FIRST", "P0", "P2"}  # P1's insert was undone


def test_a_failed_group_commit_is_raised_to_every_caller_and_keeps_nothing(sqlite_archive):
    failures = []

    def fail_the_second_commit(conn):
        failures.append(1)
        if len(failures) == 2:
            raise OSError("disk I/O error during the group's commit")

    event.listen(sqlite_archive.index.engine, "commit", fail_the_second_commit)
    works = [_add_patient(f"P{n}") for n in range(3)]
    outcomes, _ = _queue_behind_a_running_commit(sqlite_archive, works)
    assert all(isinstance(outcome, OSError) for outcome in outcomes.values()), outcomes
    assert _patient_ids(sqlite_archive) == {"FIRST"}


def test_concurrent_stores_all_land_with_exact_counts(archive):
    """Sixteen threads storing at once (as sixteen associations would), on both back ends."""
    from concurrent.futures import ThreadPoolExecutor

    study = make_ct().StudyInstanceUID
    files = [
        part10(make_ct(study_uid=study, series_uid=f"1.2.3.{n % 4}", instance_number=n, size=8))
        for n in range(1, 161)
    ]
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda f: archive.store(from_part10(f), SENDER).outcome, files))
    assert outcomes == ["stored"] * 160
    assert archive.counts() == {"patients": 1, "studies": 1, "series": 4, "instances": 160}
    assert archive.check(verify_hashes=True).ok


# Power loss: ingest commits are not synced on their own (their blobs are, before them); the
# rows a power loss takes are filed again from the blobs when the node starts.


def _sync_mode(conn) -> int:
    return conn.connection.dbapi_connection.execute("PRAGMA synchronous").fetchone()[0]


def test_ingest_commits_alone_skip_their_own_sync_and_every_other_write_is_synced(
    sqlite_archive,
):
    NORMAL, FULL = 1, 2
    index = sqlite_archive.index
    assert index.write_grouped(_sync_mode) == NORMAL  # received objects' rows
    with index.write() as conn:  # the ledger, consents, deletions, everything else
        assert _sync_mode(conn) == FULL
    assert index.write_grouped(_sync_mode) == NORMAL


def _lose_rows(archive, *sop_instance_uids):
    """What a power loss does to the index commits that had not reached the disk."""
    instances = schema.instances
    with archive.index.write() as conn:
        conn.execute(instances.delete().where(instances.c.sop_instance_uid.in_(sop_instance_uids)))


def _rows(archive) -> dict[str, tuple[str, str]]:
    with archive.index.read() as conn:
        rows = conn.execute(schema.instances.select()).all()
    return {row.sop_instance_uid: (row.blob_path, row.sha256) for row in rows}


def test_rows_a_power_loss_took_are_filed_again_from_their_blobs(archive, tmp_path):
    intake = Intake(archive, Metrics())
    series = [make_ct(instance_number=n) for n in range(3)]
    for ds in series:
        intake.receive_part10(part10(ds), SENDER)
    before_rows, before_files = _rows(archive), files_under(tmp_path / "data" / "blobs")
    _lose_rows(archive, series[1].SOPInstanceUID, series[2].SOPInstanceUID)
    assert archive.counts()["instances"] == 1

    assert intake.recover_unindexed() == 2
    assert _rows(archive) == before_rows  # same blob paths, same SHA-256
    assert files_under(tmp_path / "data" / "blobs") == before_files
    assert len(archive.find_instances(Level.PATIENT, ())) == 3
    assert intake.recover_unindexed() == 0  # nothing left to file


def test_a_blob_that_cannot_be_filed_again_for_want_of_storage_is_kept(archive, tmp_path):
    intake = Intake(archive, Metrics())
    ds = make_ct()
    result = intake.receive_part10(part10(ds), SENDER)
    blob = archive.blob_file(result.instance)
    data = blob.read_bytes()
    _lose_rows(archive, ds.SOPInstanceUID)
    archive.quota_bytes = 1  # the archive is full now: nothing new may be written

    assert intake.recover_unindexed() == 0
    assert blob.read_bytes() == data  # the only copy of an object that was acknowledged
    archive.quota_bytes = 0
    assert intake.recover_unindexed() == 1
    assert _rows(archive)[ds.SOPInstanceUID][0] == result.instance.blob_path


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(
            lambda data: data[: -len(data) // 4] + bytes(len(data) // 4), id="tail-zeroed"
        ),
        pytest.param(lambda data: data[: len(data) // 2], id="half-written"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_a_blob_a_power_loss_left_incomplete_is_removed_not_filed(archive, tmp_path, damage):
    """A power loss while a blob is placed can leave its name on data that never reached the
    disk (`PendingBlob.place`); its content then differs from the hash in its name, and
    recovery removes it instead of filing what is left (the sender was never answered)."""
    intake = Intake(archive, Metrics())
    kept, interrupted = make_ct(instance_number=1), make_ct(instance_number=2)
    intake.receive_part10(part10(kept), SENDER)
    result = intake.receive_part10(part10(interrupted), SENDER)
    blob = archive.blob_file(result.instance)
    blob.write_bytes(damage(blob.read_bytes()))
    _lose_rows(archive, interrupted.SOPInstanceUID)

    assert intake.recover_unindexed() == 0
    assert not blob.exists()
    assert set(_rows(archive)) == {kept.SOPInstanceUID}
    assert archive.check().ok


def test_a_complete_blob_whose_data_set_starts_with_group_2_elements_is_filed_again(archive):
    """Some senders put File Meta elements at the start of a C-STORE data set. The node files
    the data set as received and its hash covers them: recovery must read it the same way
    (after the File Meta group's declared length), not take the blob for an incomplete one.
    Filed again as a Part 10 file, those elements count as File Meta (a new hash and name);
    the file's bytes stay the same."""
    intake = Intake(archive, Metrics())
    received = from_part10(part10(make_ct()))
    source_ae_title = struct.pack("<HH2sH", 0x0002, 0x0016, b"AE", 6) + b"MODAL "
    result = intake.receive_dimse(
        source_ae_title + received.dataset_bytes,
        received.transfer_syntax_uid,
        received.sop_class_uid,
        received.sop_instance_uid,
        SENDER,
    )
    blob_bytes = archive.blob_file(result.instance).read_bytes()
    _lose_rows(archive, received.sop_instance_uid)

    assert intake.recover_unindexed() == 1
    (again,) = archive.find_instances(Level.IMAGE, (("SOPInstanceUID", received.sop_instance_uid),))
    assert archive.blob_file(again).read_bytes() == blob_bytes  # every byte as received
    assert archive.check(verify_hashes=True).ok


def test_an_object_destroyed_before_the_power_loss_is_not_filed_again(archive):
    intake = Intake(archive, Metrics())
    kept, destroyed = make_ct(instance_number=1), make_ct(instance_number=2)
    intake.receive_part10(part10(kept), SENDER)
    result = intake.receive_part10(part10(destroyed), SENDER)
    blob = archive.blob_file(result.instance)
    data = blob.read_bytes()
    archive.delete(
        Level.IMAGE, (("SOPInstanceUID", destroyed.SOPInstanceUID),), "retention", "expired"
    )
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)  # the deletion was committed, but the unlink did not reach the disk

    assert intake.recover_unindexed() == 0
    assert not blob.exists()
    assert set(_rows(archive)) == {kept.SOPInstanceUID}


def test_an_unindexed_blob_older_than_the_recovery_window_is_left_to_archive_check(archive):
    intake = Intake(archive, Metrics())
    old, new = make_ct(instance_number=1), make_ct(instance_number=2)
    result = intake.receive_part10(part10(old), SENDER)
    intake.receive_part10(part10(new), SENDER)
    _lose_rows(archive, old.SOPInstanceUID)
    blob = archive.blob_file(result.instance)
    an_hour_ago = time.time() - 3600
    for path in (blob, blob.parent):
        os.utime(path, (an_hour_ago, an_hour_ago))

    assert intake.recover_unindexed() == 0  # no commit is lost an hour before the newest one
    assert archive.check().unindexed_blobs == [result.instance.blob_path]


def test_readers_get_streams_a_staged_copy_and_cached_data(archive, tmp_path):
    """`open_blob` gives the object's bytes (or a range of them) as a stream; `stage_blob`
    copies it to a local file for an analyzer; cached data is a blob of its own key space and
    goes when the object is deleted."""
    result = archive.store(from_part10(part10(make_ct())), SENDER)
    data = archive.read_blob(result.instance)
    assert pydicom.dcmread(BytesIO(data)).SOPInstanceUID == result.instance.sop_instance_uid
    with archive.open_blob(result.instance, (128, 132)) as magic:
        assert magic.read() == b"DICM"
    staged = archive.stage_blob(result.instance, tmp_path / "node-tmp")
    assert staged.read_bytes() == data
    assert archive.cached(result.instance, "metadata.json") is None
    archive.put_cached(result.instance, "metadata.json", b'{"x": 1}')
    assert archive.cached(result.instance, "metadata.json") == b'{"x": 1}'
    archive.delete(
        Level.STUDY, (("StudyInstanceUID", result.instance.study_instance_uid),), "t", "r"
    )
    assert archive.cached(result.instance, "metadata.json") is None
    with pytest.raises(FileNotFoundError):
        archive.open_blob(result.instance)
