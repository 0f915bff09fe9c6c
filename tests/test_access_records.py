"""Checklist item 21: every access to patient data (QIDO-RS, WADO-RS, C-FIND, C-MOVE) leaves a
ledger entry with the five fields of an access record (PIPA safety standard): the account, the
time, the source address, the data subject and the action (view, download...)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import requests

from dicomnode.core.ledger_events import DecisionRecord
from tests.conftest import WORKSTATION, dicomweb_client, dicomweb_url, token_for
from tests.factory import make_ct
from tests.test_governance_node import as_file, c_move
from tests.test_ledger import c_find

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

STUDY = "1.2.826.0.1.21"


def test_every_wado_qido_find_and_move_leaves_a_record_with_all_five_fields(start_node, storescp):
    pacs = storescp("PACSB")
    node = start_node(peers=[WORKSTATION, pacs.peer])
    dicomweb_client(node).store_instances(
        [as_file(make_ct(patient_id="P1", study_uid=STUDY, instance_number=n)) for n in (1, 2)]
        + [as_file(make_ct(patient_id="P2"))]
    )
    before = node.archive.ledger.count()
    started = datetime.now(UTC)

    dicomweb_client(node).search_for_studies(search_filters={"PatientID": "P1"})
    wado = requests.get(
        f"{dicomweb_url(node)}/studies/{STUDY}",
        headers={"Authorization": f"Bearer {token_for(node, subject='viewer-7')}"},
        timeout=30,
    )
    assert wado.status_code == 200 and wado.content
    statuses, answers = c_find(node, PatientID="P1")
    assert statuses[-1] == 0 and len(answers) == 1
    assert c_move(node, "PACSB", STUDY) == 0
    assert len(pacs.received()) == 2
    ended = datetime.now(UTC)

    entries = list(node.archive.ledger.entries(after=before))
    by_operation = {e.data["operation"]: e for e in entries}
    assert sorted(by_operation) == ["find", "move", "qido", "wado"], [
        (e.kind, e.data.get("operation")) for e in entries
    ]
    expected = {  # operation -> (account, protocol, action)
        "qido": ("tester", "dicomweb", "view"),
        "wado": ("viewer-7", "dicomweb", "download"),
        "find": ("WORKSTATION", "dimse", "view"),
        "move": ("WORKSTATION", "dimse", "download"),
    }
    for operation, (account, protocol, action) in expected.items():
        entry = by_operation[operation]
        record = DecisionRecord.from_details(entry.data)
        assert (entry.kind, entry.outcome) == ("disclosure", "allowed"), operation
        assert entry.actor == account, operation  # the account
        at = datetime.fromisoformat(entry.recorded_at)
        assert started <= (at if at.tzinfo else at.replace(tzinfo=UTC)) <= ended, operation
        assert record.address == "127.0.0.1", operation  # the source address
        assert (record.protocol, record.patient_ids) == (protocol, ("P1",)), operation
        assert record.study_instance_uids == (STUDY,), operation  # the data subject's data
        assert record.action == action, operation
        assert record.items >= 1, operation
    assert len(by_operation["wado"].data["sop_instance_uids"]) == 2
    assert len(by_operation["move"].data["sop_instance_uids"]) == 2
