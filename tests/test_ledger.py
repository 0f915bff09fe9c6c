"""The ledger: every disclosure decision and every deletion is an entry in a hash chain that
`dicomnode ledger verify` checks; an edited, deleted or moved entry is named; and when the
ledger cannot be written, nothing leaves the node."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pydicom
import pytest
import requests
from joserfc.jwk import RSAKey
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from dicomnode.archive.keys import shared_signing_key, sign_json, verify_json
from dicomnode.core.errors import StorageUnavailable
from dicomnode.stewardship import checkpoint_signed_by
from tests.conftest import (
    WORKSTATION,
    dicomweb_client,
    dicomweb_url,
    drop_append_only_triggers,
    token_for,
)
from tests.factory import make_ct


@pytest.fixture
def node(start_node):
    node = start_node(peers=[WORKSTATION])
    client = dicomweb_client(node)
    client.store_instances([_file(make_ct(patient_id=f"P{i}")) for i in range(3)])
    return node


def _file(ds: Dataset) -> Dataset:
    """As a PACS reads it from disk (with preamble)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def c_find(node, **keys) -> tuple[list[int], list[Dataset]]:
    ae = AE("WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    statuses, answers = [], []
    for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        statuses.append(status.Status)
        if answer is not None and status.Status == 0xFF00:
            answers.append(answer)
    assoc.release()
    return statuses, answers


def test_each_way_out_leaves_an_entry(node):
    before = node.archive.ledger.count()
    dicomweb_client(node).search_for_studies(search_filters={"PatientID": "P1"})
    statuses, answers = c_find(node, PatientID="P2")
    assert statuses[-1] == 0 and len(answers) == 1
    entries = list(node.archive.ledger.entries(after=before))
    assert [(e.kind, e.outcome, e.data["operation"]) for e in entries] == [
        ("disclosure", "allowed", "qido"),
        ("disclosure", "allowed", "find"),
    ]
    qido, cfind = (e.data for e in entries)
    assert (qido["protocol"], qido["patient_ids"], qido["items"]) == ("dicomweb", ["P1"], 1)
    assert (cfind["protocol"], cfind["patient_ids"]) == ("dimse", ["P2"])
    assert entries[1].actor == "WORKSTATION" and entries[0].actor == "tester"
    assert all(e.data["rule_id"] and e.data["policy_version"] for e in entries)


def test_a_deletion_is_an_entry_with_what_was_destroyed(node):
    (study,) = dicomweb_client(node).search_for_studies(search_filters={"PatientID": "P0"})
    uid = study["0020000D"]["Value"][0]
    response = requests.delete(
        f"{dicomweb_url(node)}/studies/{uid}",
        headers={"Authorization": f"Bearer {token_for(node)}"},
        timeout=30,
    )
    assert response.status_code == 200
    last = list(node.archive.ledger.entries())[-1]
    assert (last.kind, last.outcome, last.actor) == ("deletion", "done", "tester")
    assert last.data["study_instance_uids"] == [uid] and last.data["patient_ids"] == ["P0"]
    assert len(last.data["sop_instance_uids"]) == 1


def test_a_sound_chain_verifies(node):
    c_find(node)
    c_find(node, PatientID="P1")
    result = node.archive.ledger.verify()
    assert result.ok and result.entries == node.archive.ledger.count() == 2
    assert result.head_hash == list(node.archive.ledger.entries())[-1].hash


def _tamper(node, *statements: str) -> None:
    """Edit the ledger as someone with the database owner's rights would: drop the triggers
    that keep it append-only, then change it."""
    drop_append_only_triggers(node.archive.engine)
    with node.archive.engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_entries SET actor = 'someone else' WHERE seq = 1",
        "DELETE FROM ledger_entries WHERE seq = 1",
    ],
    ids=["update", "delete"],
)
def test_the_database_itself_refuses_to_edit_the_ledger(node, statement):
    c_find(node)
    with pytest.raises(DBAPIError, match="append-only"), node.archive.engine.begin() as conn:
        conn.execute(text(statement))
    assert node.archive.ledger.verify().ok


def test_a_cut_off_tail_is_found_by_the_signed_checkpoints(node, tmp_path):
    for patient in ("P0", "P1", "P2", "P0"):
        c_find(node, PatientID=patient)
    key = shared_signing_key(node.settings.database_url)
    checkpoint = node.stewardship.checkpoint(lambda payload: sign_json(key, payload))
    assert checkpoint is not None and checkpoint.seq == 4
    exported = node.archive.ledger.checkpoints()
    assert verify_json(key, exported[0].signature)["hash"] == checkpoint.head_hash

    _tamper(node, "DELETE FROM ledger_entries WHERE seq >= 3")
    result = node.archive.ledger.verify()
    assert not result.ok and result.first_bad == 3 and "cut off" in result.problem

    # Someone who also removes the stored checkpoints is still caught by an exported copy.
    _tamper(node, "DELETE FROM ledger_checkpoints")
    assert node.archive.ledger.verify().ok  # the chain alone cannot tell
    result = node.archive.ledger.verify(checkpoints=exported)
    assert not result.ok and "covers entry 4" in result.problem


def test_a_forged_checkpoint_is_refused(node):
    c_find(node)
    foreign = RSAKey.generate_key(2048, private=True)
    node.stewardship.checkpoint(lambda payload: sign_json(foreign, payload))
    key = shared_signing_key(node.settings.database_url)
    result = node.archive.ledger.verify(signature_ok=checkpoint_signed_by(key))
    assert not result.ok and "not signed by this node's key" in result.problem


SWAP_2_AND_3 = (  # move entries 2 and 3 into each other's places (via negative keys)
    "UPDATE ledger_entries SET seq = -seq WHERE seq IN (2, 3)",
    "UPDATE ledger_entries SET seq = CASE seq WHEN -2 THEN 3 ELSE 2 END WHERE seq IN (-2, -3)",
)


@pytest.mark.parametrize(
    ("statements", "first_bad", "words"),
    [
        (
            ["UPDATE ledger_entries SET detail = replace(detail, 'P1', 'P9') WHERE seq = 2"],
            2,
            "content",
        ),
        (["UPDATE ledger_entries SET actor = 'someone else' WHERE seq = 3"], 3, "content"),
        (["DELETE FROM ledger_entries WHERE seq = 2"], 2, "missing"),
        (SWAP_2_AND_3, 2, "does not link"),
    ],
    ids=["edited-detail", "edited-actor", "deleted", "reordered"],
)
def test_tampering_is_found_and_named(node, statements, first_bad, words):
    for patient in ("P0", "P1", "P2", "P0"):
        c_find(node, PatientID=patient)
    assert node.archive.ledger.verify().ok
    _tamper(node, *statements)
    result = node.archive.ledger.verify()
    assert not result.ok
    assert result.first_bad == first_bad
    assert words in result.problem


def test_the_cli_verifies_and_exports(node):
    c_find(node)
    config = str(node.settings.source)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dicomnode.cli", "ledger", *args, "--config", config],
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = cli("verify")
    assert ok.returncode == 0 and "ledger OK" in ok.stdout
    exported = json.loads(cli("export", "--format", "json").stdout)
    assert [e["seq"] for e in exported] == list(range(1, len(exported) + 1))
    assert exported[-1]["detail"]["operation"] == "find"
    rows = list(csv.DictReader(io.StringIO(cli("export", "--format", "csv").stdout)))
    assert [r["hash"] for r in rows] == [e["hash"] for e in exported]

    _tamper(node, "UPDATE ledger_entries SET outcome = 'denied' WHERE seq = 1")
    broken = cli("verify")
    assert broken.returncode == 1
    assert "entry 1" in broken.stderr


def test_nothing_leaves_when_the_ledger_cannot_be_written(node, monkeypatch):
    def broken(*args, **kwargs):
        raise StorageUnavailable("the ledger cannot be written: disk full")

    monkeypatch.setattr(node.archive.ledger, "record", broken)
    statuses, answers = c_find(node)
    assert answers == [] and statuses == [0xA700]
    response = requests.get(
        f"{dicomweb_url(node)}/studies",
        headers={"Authorization": f"Bearer {token_for(node)}"},
        timeout=30,
    )
    assert response.status_code == 503
    assert "ledger" in response.json()["detail"]
