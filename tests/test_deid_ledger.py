"""Checklist item 10: the de-identification engine's table is pinned with its edition, and every
ledger entry that names a de-identified instance (the share's disclosure and its transfer)
carries the Table E.1-1 edition and the checksum of the rules it was de-identified under."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest

from dicomnode.governance import deid, deid_private, deid_table, deid_types
from tests.conftest import dicomweb_client
from tests.factory import make_ct
from tests.test_governance_node import as_file, node, research  # noqa: F401 (fixtures)

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

STUDY = "1.2.826.0.1.1"  # patient P1's study in the `node` fixture


def rules_checksum() -> str:
    """The checksum of the rules in force, computed here from the shipped tables."""
    tables = (deid_table.ROWS, deid_types.TYPES, deid_private.SAFE_PRIVATE_ATTRIBUTES)
    return hashlib.sha256(repr(tables).encode()).hexdigest()


def test_every_deidentified_instances_ledger_entries_carry_the_table_edition_and_checksum(
    node,  # noqa: F811
    research,  # noqa: F811
):
    more = [as_file(make_ct(patient_id="P1", study_uid=STUDY, instance_number=n)) for n in (2, 3)]
    dicomweb_client(node).store_instances(more)
    node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo", evidence_ref="form 9")

    delivery = node.egress.share_now("lab", STUDY, "dpo", timedelta(seconds=1))
    assert delivery.state == "done", delivery
    received = research.received()
    assert len(received) == 3
    entries = [e for e in node.archive.ledger.entries() if e.kind in ("disclosure", "transfer")]
    (disclosure,) = [e for e in entries if e.kind == "disclosure"]
    scope = disclosure.data["deid"]["uid_scope"]
    stored = node.archive.find_instances("STUDY", (("StudyInstanceUID", STUDY),))
    original_of = {
        deid.remap_uid(i.sop_instance_uid, node.egress.deid_secret, scope): i.sop_instance_uid
        for i in stored
    }
    checksum = rules_checksum()
    assert len(checksum) == 64 and deid_table.EDITION == "2024b"

    for instance in received:
        original = original_of[instance.SOPInstanceUID]
        assert original != instance.SOPInstanceUID and instance.PatientIdentityRemoved == "YES"
        assert deid_table.EDITION in instance.DeidentificationMethod[0]
        naming = [
            e
            for e in entries
            if original in [*e.data.get("sop_instance_uids", ()), *e.data.get("sent", ())]
        ]
        assert sorted(e.kind for e in naming) == ["disclosure", "transfer"], original
        for entry in naming:
            assert entry.data["deid"]["profile"] == "research", entry.kind
            assert entry.data["deid"]["table_edition"] == deid_table.EDITION, entry.kind
            assert entry.data["deid"]["table_sha256"] == checksum, entry.kind
    assert node.archive.ledger.verify().ok
