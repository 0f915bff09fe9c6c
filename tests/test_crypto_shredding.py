"""Encryption at rest and crypto-shredding (checklist item 31): with ``[storage]
encrypt_at_rest``, every blob, held object and cached metadata is sealed with its study's data
key, kept in a key store apart from the index; destroying a study destroys its key, so a copy
of its blobs taken before (a backup) cannot be read with what remains, and a backup purge is
queued for the documented window."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicomnode.archive import Archive, received
from dicomnode.archive.blobs import FileBlobStore
from dicomnode.archive.blobstore import blob_key, cache_key, read_all
from dicomnode.archive.migrate import migrate
from dicomnode.archive.objectstore import S3BlobStore, location_from_files
from dicomnode.archive.placements import DatabasePlacements
from dicomnode.archive.sealed import (
    HEADER,
    QUEUED,
    SealBroken,
    SealedBlobStore,
    StudyKeyDestroyed,
    StudyKeyStore,
    sealed_store_builder,
    unseal,
)
from dicomnode.core.errors import NotFound
from dicomnode.core.metrics import Metrics
from dicomnode.core.model import Level, Source
from dicomnode.intake import Intake
from tests.conftest import WORKSTATION, cli, dicomweb_client, dicomweb_url, token_for, write_config
from tests.factory import make_ct, part10
from tests.test_governance_node import policy_text, publish_days_ago
from tests.test_retention import RETENTION, later

NAME = "Shredding^Patricia"  # the patient name no sealed byte may show
SIZE = 192  # 192 x 192 x 2 bytes: one frame spans two 64 KiB chunks


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A node on SQLite with encryption at rest, the retention policy in force."""
    from dicomnode.config import read_settings
    from dicomnode.serve import Node

    folder = tmp_path_factory.mktemp("shredding")
    extra = "[storage]\nencrypt_at_rest = true\n[governance]\nretention_interval = 0"
    config = write_config(
        folder / "node.toml",
        folder / "data",
        f"sqlite:///{folder / 'data' / 'index.sqlite'}",
        [WORKSTATION],
        extra=extra,
    )
    started = Node(read_settings(config))
    started.start()
    publish_days_ago(started, policy_text() + RETENTION)
    yield started
    started.stop()


def c_store(node, datasets: list) -> list[int]:
    ae = AE("WORKSTATION")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    return statuses


def files_under(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_item_31_an_expired_study_is_crypto_shredded(node, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    sent = [
        make_ct("P31", NAME, study, series, instance_number=n, size=SIZE, seed=n) for n in (1, 2)
    ]
    assert c_store(node, sent) == [0, 0]
    data_dir = node.settings.node.data_dir
    keys: StudyKeyStore = node.archive.blobs.study_keys
    assert keys.has_key(study)

    # Retrieval works: the whole instance (WADO-RS), a frame (a byte range), the metadata.
    client = dicomweb_client(node)
    where = (study, series, sent[0].SOPInstanceUID)
    retrieved = client.retrieve_instance(*where)
    assert retrieved.PatientName == NAME and retrieved.PixelData == sent[0].PixelData
    assert client.retrieve_instance_frames(*where, frame_numbers=[1]) == [sent[0].PixelData]
    metadata = client.retrieve_instance_metadata(*where)
    assert metadata["00100010"]["Value"][0]["Alphabetic"] == NAME
    instance = node.archive.find_instances(Level.IMAGE, (("SOPInstanceUID", where[2]),))[0]
    assert node.archive.cached(instance, "metadata.json") is not None  # cached, sealed

    # What the node wrote holds no plaintext: blobs, cached metadata, the key store.
    blobs = files_under(data_dir / "blobs")
    sealed = [p for p in blobs if study in str(p)]
    assert len(sealed) >= 3  # two instances and cached metadata
    assert not any(NAME.encode() in data or b"P31" in data for data in blobs.values())
    assert all(data.startswith(b"DNSEAL1\n") for p, data in blobs.items() if p in sealed)
    key_file = data_dir / "study-keys.sqlite"
    assert NAME.encode() not in key_file.read_bytes()
    data_key = keys._read(study)[1]
    assert data_key in key_file.read_bytes()

    # The backup: the blobs and the index as a nightly copy would take them (not the keys).
    backup = tmp_path / "backup"
    shutil.copytree(data_dir / "blobs", backup / "blobs")
    shutil.copy(data_dir / "index.sqlite", backup / "index.sqlite")

    # Expiry: the retention sweep destroys the study.
    later(node, 91)
    try:
        report = node.stewardship.retention_sweep("dpo")
    finally:
        node.stewardship.clock = lambda: datetime.now(UTC)
    assert study in {i.study_instance_uid for i in report.destroyed}

    # It cannot be retrieved from primary storage, and its key is gone from everywhere.
    gone = requests.get(
        f"{dicomweb_url(node)}/studies/{study}",
        timeout=30,
        headers={"Authorization": f"Bearer {token_for(node)}"},
    )
    assert gone.status_code == 404
    assert not any(p.exists() for p in sealed)
    assert not keys.has_key(study)
    for path, data in files_under(data_dir).items():
        assert data_key not in data, path  # secure_delete: not in the key store's free pages
    assert data_key not in (backup / "index.sqlite").read_bytes()

    # The backup's blobs cannot be read with what remains: the key store and the index.
    remaining = StudyKeyStore(f"sqlite:///{key_file}")
    restored = SealedBlobStore(FileBlobStore(backup / "blobs"), remaining)
    for path in sealed:
        key = path.relative_to(data_dir / "blobs").as_posix()
        with pytest.raises(StudyKeyDestroyed):
            read_all(restored, key)
    with remaining.engine.connect() as conn:
        left = [bytes(k) for (k,) in conn.exec_driver_sql("SELECT data_key FROM study_keys")]
    for path in sealed:
        data = (backup / "blobs" / path.relative_to(data_dir / "blobs")).read_bytes()
        key = path.relative_to(data_dir / "blobs").as_posix()
        for other in left:  # no key that remains opens it
            with pytest.raises(SealBroken):
                unseal(key, other, data)
    remaining.close()

    # The backup purge is queued, and the ledger says the key was destroyed.
    (purge,) = [p for p in keys.backup_purges(QUEUED) if p.study_instance_uid == study]
    assert purge.actor == "dpo"
    assert timedelta(days=34) < purge.due_at - datetime.now(UTC) <= timedelta(days=35)
    shredded = [
        e
        for e in node.archive.ledger.entries()
        if e.kind == "deletion" and e.data.get("operation") == "crypto-shred"
    ]
    (entry,) = [e for e in shredded if study in e.data["study_instance_uids"]]
    assert entry.data["patient_ids"] == ["P31"]
    assert entry.data["backup_purges"][0]["id"] == purge.id


def test_a_study_received_again_after_its_destruction_gets_a_new_key(node) -> None:
    study = generate_uid()
    first = make_ct("P32", NAME, study, size=8)
    assert c_store(node, [first]) == [0]
    keys: StudyKeyStore = node.archive.blobs.study_keys
    old = keys._read(study)
    node.archive.delete(Level.STUDY, (("StudyInstanceUID", study),), "dpo", "test")
    assert not keys.has_key(study)
    again = make_ct("P32", NAME, study, size=8)
    assert c_store(node, [again]) == [0]
    assert keys._read(study)[0] != old[0]
    (instance,) = node.archive.find_instances(Level.STUDY, (("StudyInstanceUID", study),))
    assert pydicom.dcmread(node.archive.open_blob(instance)).SOPInstanceUID == again.SOPInstanceUID


def test_the_backup_purges_are_listed_and_marked_done_from_the_command_line(node) -> None:
    study = generate_uid()
    assert c_store(node, [make_ct("P37", NAME, study, size=8)]) == [0]
    node.archive.delete(Level.STUDY, (("StudyInstanceUID", study),), "dpo", "test")
    (purge,) = [
        p for p in node.archive.blobs.study_keys.backup_purges() if p.study_instance_uid == study
    ]
    listed = cli(node, "archive", "backup-purges", "--state", "queued")
    assert listed.returncode == 0, listed.stderr
    assert f"{purge.id:>6}  queued  due {purge.due_at:%Y-%m-%d}" in listed.stdout
    assert study in listed.stdout
    done = cli(node, "archive", "backup-purges", "--done", str(purge.id), "--by", "backup-admin")
    assert done.returncode == 0, done.stderr
    assert purge.id not in [p.id for p in node.archive.blobs.study_keys.backup_purges(QUEUED)]
    with pytest.raises(NotFound, match=f"no queued backup purge {purge.id}"):
        node.archive.backup_purge_done(purge.id, "dpo")
    (entry,) = [e for e in node.archive.ledger.entries() if e.data.get("backup_purge") == purge.id]
    assert entry.actor == "backup-admin" and entry.data["study_instance_uids"] == [study]


# --- the sealed format, on both stores -----------------------------------------------------


def sealed_archive(folder: Path, inner=None) -> Archive:
    url = f"sqlite:///{folder / 'index.sqlite'}"
    migrate(url)
    build = sealed_store_builder(inner, folder / "data", "", 35)
    return Archive(folder / "data", url, blob_store=build)


def test_ranges_cross_chunks_and_a_tampered_chunk_is_refused(tmp_path: Path) -> None:
    archive = sealed_archive(tmp_path)
    try:
        store = archive.blobs
        data = os.urandom(200_000)
        key = blob_key(generate_uid(), generate_uid(), generate_uid())
        store.write(key, [data[:1000], data[1000:]])
        assert store.size(key) == len(data)
        assert read_all(store, key) == data
        for start, end in ((0, 10), (65_530, 65_550), (100, 199_999), (131_072, 300_000)):
            with store.open(key, (start, end)) as stream:
                assert stream.read() == data[start:end], (start, end)
        with store.open(key) as stream:  # seeks as a file does
            stream.seek(140_000)
            assert stream.read(10) == data[140_000:140_010]
            stream.seek(5)
            assert stream.read(3) == data[5:8]

        path = store.inner.absolute(key)
        sealed = bytearray(path.read_bytes())
        assert len(sealed) == HEADER.size + len(data) + 4 * 16
        sealed[HEADER.size + 70_000] ^= 1  # a bit of the second chunk
        path.write_bytes(bytes(sealed))
        with store.open(key, (0, 100)) as stream:  # the first chunk is intact
            assert stream.read() == data[:100]
        with pytest.raises(SealBroken), store.open(key, (65_600, 65_700)) as stream:
            stream.read()
        path.write_bytes(path.read_bytes()[:-100])  # truncated
        with pytest.raises(SealBroken):
            read_all(store, key)
        other = blob_key(generate_uid(), generate_uid(), generate_uid())
        store.write(other, [b"a header altered"])
        altered = bytearray(store.inner.absolute(other).read_bytes())
        altered[20] ^= 1  # a byte of the salt
        store.inner.absolute(other).write_bytes(bytes(altered))
        with pytest.raises(SealBroken):
            read_all(store, other)

        legacy = blob_key(generate_uid(), generate_uid(), generate_uid())
        store.inner.write(legacy, [b"written before encryption was on"])
        assert read_all(store, legacy) == b"written before encryption was on"
    finally:
        archive.close()


def test_held_objects_discarded_take_their_study_key(tmp_path: Path) -> None:
    archive = sealed_archive(tmp_path)
    try:
        intake = Intake(archive, Metrics())
        ds = make_ct("P33", NAME, size=8)
        result = archive.quarantine(
            received.from_part10(part10(ds)),
            Source("dimse", "STRANGER"),
            "unknown sender",
            "rule",
            "v1",
        )
        assert result.outcome == "held"
        keys = archive.blobs.study_keys
        assert keys.has_key(ds.StudyInstanceUID)
        (held,) = archive.registry.quarantined()
        assert NAME.encode() not in archive.blobs.inner.absolute(held.blob_path).read_bytes()
        assert pydicom.dcmread(archive.open_blob(held)).PatientName == NAME
        assert intake.discard_held(ds.StudyInstanceUID, "dpo") == 1
        assert not keys.has_key(ds.StudyInstanceUID)
        assert [p.study_instance_uid for p in keys.backup_purges()] == [ds.StudyInstanceUID]
    finally:
        archive.close()


def test_shredding_a_crash_interrupted_is_finished_at_the_next_start(tmp_path: Path) -> None:
    archive = sealed_archive(tmp_path)
    try:
        intake = Intake(archive, Metrics())
        keys = archive.blobs.study_keys
        doomed, again = make_ct("P35", NAME, size=8), make_ct("P36", NAME, size=8)
        for ds in (doomed, again):
            intake.receive_part10(part10(ds), Source("dimse", "MODALITY"))

        def crash(study: str, actor: str) -> None:
            raise KeyboardInterrupt("the process stops before the key store")

        keys.destroy, destroy = crash, keys.destroy
        for ds in (doomed, again):
            with pytest.raises(KeyboardInterrupt):
                archive.delete(
                    Level.STUDY, (("StudyInstanceUID", ds.StudyInstanceUID),), "dpo", "t"
                )
        keys.destroy = destroy
        assert keys.has_key(doomed.StudyInstanceUID) and keys.has_key(again.StudyInstanceUID)
        destroy(again.StudyInstanceUID, "dpo")  # received again since: a key made after it
        intake.receive_part10(part10(again), Source("dimse", "MODALITY"))
        assert intake.recover_unindexed() == 0  # at start-up
        assert not keys.has_key(doomed.StudyInstanceUID)
        assert keys.has_key(again.StudyInstanceUID)
        (entry,) = [
            e for e in archive.ledger.entries() if e.data.get("operation") == "crypto-shred"
        ][-1:]
        assert entry.actor == "recovery" and entry.data["patient_ids"] == ["P35"]
    finally:
        archive.close()


@pytest.mark.s3
def test_item_31_on_s3_the_same_object_again_and_shredding(s3_server, tmp_path: Path) -> None:
    location = location_from_files(
        s3_server.endpoint,
        "dicomnode",
        s3_server.credentials_file,
        prefix=f"t-{uuid.uuid4().hex[:12]}",
    )
    archive = sealed_archive(
        tmp_path, lambda index: S3BlobStore(location, DatabasePlacements(index, "node-1"))
    )
    try:
        intake = Intake(archive, Metrics())
        ds = make_ct("P34", NAME, size=SIZE)
        data = part10(ds)
        assert intake.receive_part10(data, Source("dimse", "MODALITY")).outcome == "stored"
        assert intake.receive_part10(data, Source("dimse", "MODALITY")).outcome == "duplicate"
        ds.file_meta.ImplementationVersionName = "OTHER_SENDER"
        resent = part10(ds)  # the same data set: the sealed put is refused (412), then compared
        assert intake.receive_part10(resent, Source("dimse", "OTHER")).outcome == "duplicate"

        (instance,) = archive.find_instances(
            Level.STUDY, (("StudyInstanceUID", ds.StudyInstanceUID),)
        )
        assert archive.read_blob(instance) == data
        start = data.index(ds.PixelData)
        with archive.open_blob(instance, (start, start + 70_000)) as stream:
            assert stream.read() == ds.PixelData[:70_000]
        archive.put_cached(instance, "metadata.json", b'{"PatientName": "%s"}' % NAME.encode())
        inner = archive.blobs.inner
        backup = {
            key: read_all(inner, key)
            for key in (instance.blob_path, cache_key(instance.blob_path, "metadata.json"))
        }
        assert not any(NAME.encode() in b for b in backup.values())
        assert archive.cached(instance, "metadata.json") is not None

        archive.delete(Level.STUDY, (("StudyInstanceUID", ds.StudyInstanceUID),), "dpo", "test")
        keys = archive.blobs.study_keys
        assert not keys.has_key(ds.StudyInstanceUID)
        for key, sealed in backup.items():
            assert not inner.exists(key)
            with pytest.raises(StudyKeyDestroyed):
                archive.blobs.reveal(key, sealed)
        (purge,) = keys.backup_purges(QUEUED)
        assert purge.study_instance_uid == ds.StudyInstanceUID
        with pytest.raises(NotFound):
            archive.delete(Level.STUDY, (("StudyInstanceUID", ds.StudyInstanceUID),), "dpo", "x")
    finally:
        archive.close()


@pytest.mark.postgres
def test_several_nodes_share_one_key_store_on_postgresql(postgres) -> None:
    """`[storage] key_store_url` on PostgreSQL: two nodes' stores agree on a study's key, and
    one node's destruction is seen by the other (a new key for new data)."""
    url = postgres.create_database()
    first, second = StudyKeyStore(url), StudyKeyStore(url, cache_seconds=0)
    try:
        study = generate_uid()
        made = first.key_for_sealing(study)
        assert second.key_for_sealing(study) == made
        assert second.key_for_opening(study, made[0]) == made[1]
        purge = first.destroy(study, "dpo")
        assert purge is not None and purge.state == QUEUED
        with pytest.raises(StudyKeyDestroyed):
            second.key_for_opening(study, made[0])  # its cached copy is checked against the store
        assert second.key_for_sealing(study)[0] != made[0]
        assert [p.study_instance_uid for p in second.backup_purges(QUEUED)] == [study]
        second.purge_done(purge.id)
        assert first.backup_purges(QUEUED) == []
    finally:
        first.close()
        second.close()
