"""Typed ledger event records (dicomnode/core/ledger_events.py): each writes exactly the detail
the ledger stored before the records existed, reads it back, and names what is wrong with a
detail that is not its shape; the chains written then still verify with entries written now."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from sqlalchemy import insert

from dicomnode.archive import Archive
from dicomnode.core import ledger_events as ev
from dicomnode.core.enums import DuplicatePolicy, JobState, Protocol, TransportKind, coerce
from dicomnode.core.ledger import canonical_detail
from dicomnode.core.model import LedgerKind, Source
from dicomnode.egress.transport import Target
from tests.conftest import drop_append_only_triggers

# Entries the code before the records wrote (commit 952842a, captured from a run of
# test_governance_node, test_retention, test_casework and test_forwarding): kind, outcome and the
# detail exactly as stored and hashed, then one whole chain as a node wrote it.
BEFORE = json.loads((Path(__file__).parent / "ledger_before_records.json").read_text())

RECIPIENTS = ({"recipient": "lab", "operation": "share", "first_at": "2026-01-02T03:04:05"},)

SAMPLES: list[ev.Record] = [
    ev.DecisionRecord(
        operation="share",
        protocol="cli",
        address="",
        peer=None,
        recipient="lab",
        recipient_kind="third-party",
        activity="research-sharing",
        purpose="research",
        basis="consent",
        consent_refs=("consent-1",),
        rule_id="research-with-consent",
        reason="consent recorded",
        policy_version="hospital-2026-1",
        deid_profile="basic",
        patient_ids=("P1",),
        study_instance_uids=("1.2.3",),
        denied_patients=(),
        items=2,
        disclosure_id="d1",
        sop_instance_uids=("1.2.3.1", "1.2.3.2"),
        delivery=7,
        gone=(),
        plan=ev.DeidPlan(
            deidentified=True,
            deid={"profile": "basic", "options": []},
            patient_pseudonyms={"P1": "X"},
            uid_map={"1.2.3": "2.25.1"},
            withheld={},
        ),
    ),
    ev.TransferRecord(
        operation="forward",
        delivery=3,
        recipient="pacs",
        patient_ids=("P1",),
        study_instance_uids=("1.2.3",),
        attempt=1,
        disclosure_id="d2",
        sent=("1.2.3.1",),
        failed={"1.2.3.2": "refused"},
        withheld={},
        gone=(),
        rule_id="results-to-sender",
    ),
    ev.SubjectExported(("P1",), ("1.2.3",), files=2, disclosures_listed=3),
    ev.AdmissionRefused(
        "unknown sender",
        "known-senders",
        "v1",
        "dimse",
        "STRANGER",
        "10.0.0.9",
        ("P1",),
        ("1.2.3",),
        ("1.2.3.1",),
    ),  # fmt: skip
    ev.QuarantineReleased(
        "released", "filed into the archive by dpo", ("P1",), ("1.2.3",), ("1.2.3.1",), ("x",)
    ),
    ev.QuarantineDestroyed("erase", ("P1",), ("1.2.3",), "held blobs deleted, never filed"),
    ev.RetentionDestruction("study", "ten-years", None, "v1", RECIPIENTS),
    ev.ErasureDestruction(RECIPIENTS, "v1"),
    ev.RequestedDestruction("dicomweb DELETE", "v1", ()),
    ev.DeletionRefused(
        "dicomweb DELETE",
        "STUDY",
        {"StudyInstanceUID": "1.2.3"},
        ("P1",),
        ("1.2.3",),
        "v1",
        "127.0.0.1",
        "deletion refused: under legal hold hold-1",
    ),  # fmt: skip
    ev.RetentionSkipped(
        "under legal hold",
        "ten-years",
        "study",
        "2026-01-01T00:00:00+00:00",
        "v1",
        ("P1",),
        ("1.2.3",),
    ),  # fmt: skip
    ev.RecordsPurged("logs-1y", "index rows deleted", {"jobs": 3}, "2025-01-01T00:00:00", "v1"),
    ev.ErasureRequest(("P1",), "", ("1.2.3",), "v1", changed={"instances": 2, "jobs": 1}),
    ev.ErasureRequest(("P1",), "HOSP-A", (), "v1", reason="erasure refused: under legal hold"),
    ev.BreachRecorded(
        "2026-01-01T00:00:00+00:00",
        "a lost laptop",
        3,
        ("health",),
        ("P1",),
        (),
        False,
        {"pipa-34": "2026-01-04T00:00:00+00:00"},
        breach="breach-1",
    ),  # fmt: skip
    ev.BreachNotified("regulator", "2026-01-02T00:00:00+00:00", "sent by post"),
    ev.BreachClosed("contained", breach="breach-1"),
    ev.ReviewSignedOff("2026-01", "ab" * 32, {"retrievals": 4}, "dpo", "none", "", "2026-02-01"),
    ev.Destruction(
        "STUDY",
        {"StudyInstanceUID": "1.2.3"},
        "retention: expired",
        "blob files unlinked, index rows deleted",
        ("P1",),
        ("1.2.3",),
        ("1.2.3.1",),
        added=ev.RetentionDestruction("study", "r", None, "v1", RECIPIENTS).as_details(),
    ),  # fmt: skip
]


def test_every_record_has_a_sample():
    assert {type(s) for s in SAMPLES} == set(ev.RECORDS) - {ev.DeidPlan} | {ev.DecisionRecord}


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_a_record_reads_back_what_it_writes(record):
    details = record.as_details()
    again = type(record).from_details(json.loads(canonical_detail(details)))
    assert again == record
    assert canonical_detail(again.as_details()) == canonical_detail(details)
    assert record.kind in set(LedgerKind) | {ev.BREACH, ev.DPO_REVIEW}


def test_optional_fields_are_left_out_and_fixed_keys_written():
    bare = dataclasses.replace(SAMPLES[0], sop_instance_uids=None, delivery=None, plan=None)
    details = bare.as_details()
    assert not {"sop_instance_uids", "delivery", "deidentified", "uid_map", "job"} & set(details)
    assert details["gone"] == [] and details["peer"] is None  # given, and None that is given
    assert ev.RetentionSkipped.from_details(SAMPLES[10].as_details()).expired_at is not None
    assert SAMPLES[11].as_details()["category"] == "logs"
    assert SAMPLES[12].as_details() | {} == {
        "request": "erase",
        "patient_ids": ["P1"],
        "issuer_of_patient_id": "",
        "study_instance_uids": ["1.2.3"],
        "policy_version": "v1",
        "instances": 2,
        "jobs": 1,
    }


def test_a_detail_of_another_shape_is_refused_naming_the_key():
    details = SAMPLES[2].as_details()
    with pytest.raises(ValueError, match="SubjectExported: request must be 'export'"):
        ev.SubjectExported.from_details(details | {"request": "erase"})
    with pytest.raises(ValueError, match="SubjectExported: the detail has no files"):
        ev.SubjectExported.from_details({k: v for k, v in details.items() if k != "files"})
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        ev.SubjectExported.from_details(details | {"colour": "blue"})
    with pytest.raises(TypeError, match="colour"):
        ev.DecisionRecord(**SAMPLES[0].__dict__ | {"colour": "blue"})


def _record_of(entry: dict) -> ev.Record:
    """The one record class whose detail this stored entry is, read back."""
    found = []
    for record in ev.RECORDS:
        try:
            read = record.from_details(json.loads(entry["detail"]))
        except (ValueError, TypeError):
            continue
        if canonical_detail(read.as_details()) == entry["detail"]:
            found.append(read)
    assert found, f"no record reads back {entry['kind']}/{entry['outcome']}: {entry['detail']}"
    return found[0]


@pytest.mark.parametrize(
    "entry", BEFORE["entries"], ids=lambda e: f"{e['kind']}-{e['outcome']}-{e['record']}"
)
def test_the_old_code_wrote_exactly_what_the_record_writes(entry):
    read = _record_of(entry)
    assert type(read).__name__ == entry["record"]
    assert canonical_detail(read.as_details()) == entry["detail"]
    if isinstance(read, ev.Destruction) and read.added:  # what the operation handed the archive
        part = {
            "retention": ev.RetentionDestruction,
            "erase": ev.ErasureDestruction,
            "delete": ev.RequestedDestruction,
        }[read.added["operation"]]
        assert part.from_details(read.added).as_details() == read.added


def test_a_chain_written_before_the_records_verifies_with_entries_written_now(start_node):
    node = start_node()
    ledger, engine = node.archive.ledger, node.archive.engine
    drop_append_only_triggers(engine)  # replace the node's own first entries with the old chain
    from dicomnode.archive.schema import ledger_entries

    with engine.begin() as conn:
        conn.execute(ledger_entries.delete())
        conn.execute(insert(ledger_entries), BEFORE["chain"])
    assert ledger.verify().ok and ledger.count() == len(BEFORE["chain"])
    for record in SAMPLES:
        ledger.record(record.kind, "tester", "done", record.as_details())
    result = ledger.verify()
    assert result.ok, result.problem
    assert result.entries == len(BEFORE["chain"]) + len(SAMPLES)
    written = list(ledger.entries(after=len(BEFORE["chain"])))
    assert [type(r).from_details(e.data) for r, e in zip(SAMPLES, written, strict=True)] == SAMPLES


def test_bare_strings_are_coerced_to_their_enums_naming_the_field(tmp_path):
    source = Source("dimse", "MODALITY")
    assert source.protocol is Protocol.DIMSE and source.protocol == "dimse"
    assert Target("stow", "lab", url="https://lab").transport is TransportKind.STOW
    with pytest.raises(ValueError, match="Source.protocol: must be one of dimse, dicomweb"):
        Source("carrier-pigeon")
    with pytest.raises(ValueError, match="Target.transport: must be one of dimse, stow; got 'x'"):
        Target("x", "lab")
    assert coerce(JobState, "not-applicable", "state") is JobState.NOT_APPLICABLE
    policy = coerce(DuplicatePolicy, "replace", "dimse.duplicate_policy")
    assert json.dumps({"policy": policy}) == '{"policy": "replace"}'
    # the archive took anything but "reject" for "replace": an unknown policy is refused now
    with pytest.raises(ValueError, match="duplicate_policy: must be one of reject, replace"):
        Archive(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite'}", duplicate_policy="maybe")


def test_views_read_an_older_entry_that_lacks_keys():
    old = {"operation": "wado", "recipient": "ohif", "patient_ids": ["P1"], "items": 3, "x": 1}
    read = ev.DecisionRecord.read(old)
    assert (read.operation, read.recipient, read.patient_ids, read.items) == (
        "wado",
        "ohif",
        ("P1",),
        3,
    )
    assert read.purpose is None and read.plan is None and read.service is None
    full = SAMPLES[0]
    assert ev.DecisionRecord.read(full.as_details()) == full
    destruction = SAMPLES[-1]
    assert ev.Destruction.read(destruction.as_details()) == destruction
