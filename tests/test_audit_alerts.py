"""Security alerts that an attack cannot flood, and disclosures whose audit messages and ledger
entries share one identifier.

- A refused token (401, 403), a refused association and an object governance refused at intake
  each emit a security audit message, aggregated per source and minute: the first at once, the
  rest of that minute as one message carrying their count.
- Every way data leaves for a third party (a share, and a WADO-RS, C-MOVE or C-GET retrieval
  governance counted as a disclosure) emits 110106 Export; the ledger entry's `disclosure_id`
  and the consent versions the decision rested on are in the audit messages.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
import requests
from lxml import etree
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode.archive.auditlog import AuditLog
from dicomnode.config import AuditSettings
from dicomnode.core.model import Source
from dicomnode.governance import audit, audit_events
from tests.conftest import WORKSTATION, dicomweb_url, token_for
from tests.factory import make_ct
from tests.test_governance_node import (
    as_file,
    policy_text,
    publish_days_ago,
    research_pacs,
    wado,
)

NOW = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
REPORTER = audit_events.reporter("DICOMNODE", "127.0.0.1")


def documents(paths) -> list[etree._Element]:
    schema = etree.RelaxNG(etree.parse(str(audit.schema_path())))
    found = []
    for path in paths:
        document = etree.parse(str(path)).getroot()
        assert schema.validate(document), schema.error_log
        found.append(document)
    return found


def event_id(document) -> str:
    return document.find("EventIdentification/EventID").get("csd-code")


def outcome_text(document) -> str:
    return document.findtext("EventIdentification/EventOutcomeDescription") or ""


def details(document, kind: str) -> list[str]:
    return [
        base64.b64decode(d.get("value")).decode()
        for d in document.iter("ParticipantObjectDetail")
        if d.get("type") == kind
    ]


# --- aggregation in the audit log ---------------------------------------------------------


def test_a_burst_of_alerts_from_one_source_is_one_message_a_minute(tmp_path):
    log = AuditLog(tmp_path / "spool", AuditSettings())
    attacker = Source("dicomweb", "", "10.9.9.9")
    other = Source("dicomweb", "", "10.1.1.1")

    def alert(source: Source, at: datetime) -> None:
        log.submit_alert(
            ("refused", source.address),
            lambda count: audit_events.refused(source, "qido", "bad", at, REPORTER, count=count),
            at,
        )

    for n in range(50):
        alert(attacker, NOW + timedelta(seconds=n))
    alert(other, NOW + timedelta(seconds=30))
    assert len(log.pending()) == 2  # the attacker's first, and the other source's

    alert(attacker, NOW + timedelta(seconds=61))  # the window has passed
    sent = documents(log.pending())
    assert [outcome_text(d) for d in sent] == [
        "qido refused: bad",
        "qido refused: bad",
        "qido refused (49 times within a minute): bad",
        "qido refused: bad",
    ]
    log.flush_alerts()  # nothing else is held back
    assert len(log.pending()) == 4


def test_alerts_held_in_their_window_are_sent_at_stop(tmp_path):
    log = AuditLog(tmp_path / "spool", AuditSettings())
    source = Source("dimse", "STRANGER", "10.9.9.9")
    for n in range(5):
        log.submit_alert(
            ("association", source.address),
            lambda count: audit_events.refused(
                source, "association", "unknown AE", NOW, REPORTER, count=count
            ),
            NOW + timedelta(seconds=n),
        )
    log.stop_writer()
    texts = [outcome_text(d) for d in documents(log.pending())]
    assert texts == [
        "association refused: unknown AE",
        "association refused (4 times within a minute): unknown AE",
    ]


# --- the node's refusals ------------------------------------------------------------------


@pytest.fixture
def node(start_node, storescp):
    research = storescp("RESEARCH")
    node = start_node(peers=[WORKSTATION, research_pacs(research.port)])
    # research shares of identified data with the patient's consent (no de-identification)
    publish_days_ago(node, policy_text().replace('deid_profile = "research"\n', "", 1))
    node.intake.receive_part10(
        _part10(make_ct(patient_id="P1", study_uid="1.2.826.0.1.1")), Source("dimse", "CT")
    )
    return node


def _part10(ds) -> bytes:
    import io

    buffer = io.BytesIO()
    as_file(ds).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def spooled(node) -> list[etree._Element]:
    node.audit.stop_writer()  # spool what was submitted (and the alerts held back)
    node.audit.start_writer()
    return documents(node.audit.pending())


def test_twenty_bad_tokens_make_two_messages_not_twenty(node):
    before = sum(event_id(d) == "110114" for d in spooled(node))
    for _ in range(20):
        answer = requests.get(
            f"{dicomweb_url(node)}/studies", headers={"Authorization": "Bearer x"}, timeout=10
        )
        assert answer.status_code == 401
    failed = [d for d in spooled(node) if event_id(d) == "110114"][before:]
    assert len(failed) == 2
    assert "(19 times within a minute)" in outcome_text(failed[1])


def test_a_token_refused_for_its_scope_is_a_security_alert(node):
    study = "1.2.826.0.1.1"
    for _ in range(3):
        refused = requests.delete(
            f"{dicomweb_url(node)}/studies/{study}",
            headers={"Authorization": f"Bearer {token_for(node, ('dicomweb.read',))}"},
            timeout=10,
        )
        assert refused.status_code == 403
    alerts = [
        d for d in spooled(node) if event_id(d) == "110113" and "token scope" in outcome_text(d)
    ]
    assert len(alerts) == 2 and "(2 times within a minute)" in outcome_text(alerts[1])
    kinds = [c.get("csd-code") for c in alerts[0].iter("EventTypeCode")]
    assert kinds == ["110132"]  # Use of Restricted Function
    assert node.archive.counts()["instances"] == 1


def test_a_refused_association_is_a_node_authentication_alert(start_node):
    node = start_node(peers=[WORKSTATION], require_known_peers=True)
    ae = AE("STRANGER")
    ae.add_requested_context(Verification)
    for _ in range(2):
        assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
        assert assoc.is_rejected
    alerts = [d for d in spooled(node) if "association refused" in outcome_text(d)]
    assert len(alerts) == 2 and "(1 times" not in outcome_text(alerts[1])
    codes = [[c.get("csd-code") for c in d.iter("EventTypeCode")] for d in alerts]
    assert codes == [["110126"], ["110126"]]  # Node Authentication


def test_an_object_governance_refuses_is_a_security_alert(start_node):
    node = start_node(peers=[WORKSTATION])
    publish_days_ago(node, policy_text(unknown_sender="refuse"))
    for n in range(3):
        with pytest.raises(Exception, match="governance refused"):
            node.intake.receive_part10(
                _part10(make_ct(patient_id=f"P{n}")), Source("dimse", "STRANGER", "10.7.7.7")
            )
    alerts = [d for d in spooled(node) if "store refused" in outcome_text(d)]
    assert len(alerts) == 2 and event_id(alerts[0]) == "110113"
    assert node.archive.counts()["instances"] == 0


# --- disclosures: one identifier in the ledger and the audit message ----------------------


def test_a_wado_retrieval_by_a_third_party_is_an_export_tied_to_its_ledger_entry(node):
    consent, _ = node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo")
    assert wado(node, "1.2.826.0.1.1", subject="lab-client").status_code == 200

    entry = [e for e in node.archive.ledger.entries() if e.data.get("operation") == "wado"][-1]
    assert entry.data["recipient_kind"] == "third-party"
    disclosure_id = entry.data["disclosure_id"]
    exports = [d for d in spooled(node) if event_id(d) == "110106"]
    assert len(exports) == 1
    assert details(exports[0], "DisclosureID") == [disclosure_id]
    assert details(exports[0], "ConsentRef") == [consent.ref] == entry.data["consent_refs"]
    sent = [d for d in spooled(node) if disclosure_id in details(d, "DisclosureID")]
    assert sorted(event_id(d) for d in sent) == ["110104", "110106"]


def test_the_hospitals_own_retrieval_is_no_export(node):
    assert wado(node, "1.2.826.0.1.1", subject="ohif").status_code == 200
    entry = [e for e in node.archive.ledger.entries() if e.data.get("operation") == "wado"][-1]
    assert entry.data["recipient_kind"] == "controller"
    events = [event_id(d) for d in spooled(node)]
    assert "110106" not in events
    transfers = [
        d for d in spooled(node) if entry.data["disclosure_id"] in details(d, "DisclosureID")
    ]
    assert [event_id(d) for d in transfers] == ["110104"]


def test_a_denied_retrieval_carries_its_ledger_identifier(node):
    assert wado(node, "1.2.826.0.1.1", subject="lab-client").status_code == 403  # no consent
    entry = [e for e in node.archive.ledger.entries() if e.kind == "denial"][-1]
    alerts = [d for d in spooled(node) if event_id(d) == "110113" and "wado" in outcome_text(d)]
    assert alerts
    subjects = [
        o.get("ParticipantObjectID") for o in alerts[0].iter("ParticipantObjectIdentification")
    ]
    assert entry.data["disclosure_id"] in subjects
