"""Governance in a running node: every way out asks the policy in force and records the
decision; consent, restriction and intake holds change what the node does, end to end, with
real DICOM and DICOMweb clients."""

from __future__ import annotations

import io
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.config import Peer
from dicomnode.core.errors import InvalidInput
from dicomnode.governance.deid_keys import patient_pseudonym, remap_uid
from dicomnode.stewardship import Stewardship
from tests.conftest import (
    WORKSTATION,
    cli,
    dicomweb_client,
    dicomweb_url,
    run_dcmtk,
    token_for,
)
from tests.factory import make_ct, write_series

POLICY = """
[policy]
version = "{version}"
effective_from = 2026-01-01
controller = "Example University Hospital"
dpo_contact = "dpo@hospital.example"

[intake]
unknown_sender = "{unknown_sender}"

[[activities]]
id = "intake"
purposes = ["TREAT"]
lawful_basis = "PIPA-26"

[[activities]]
id = "analysis"
purposes = ["TREAT"]
lawful_basis = "PIPA-26"

[[activities]]
id = "return-results"
purposes = ["TREAT"]
lawful_basis = "PIPA-26"

[[activities]]
id = "hospital-access"
purposes = ["TREAT"]
lawful_basis = "PIPA-26"

[[activities]]
id = "subject-access"
purposes = ["PATRQT"]
lawful_basis = "PIPA-35"

[[activities]]
id = "research-sharing"
purposes = ["HRESCH"]
lawful_basis = "PIPA-17-1-1"
data_categories = ["received-images"]

[[recipients]]
id = "hospital"
name = "Example University Hospital"
kind = "controller"
peers = ["*"]
token_subjects = ["*"]

[[recipients]]
id = "lab"
name = "Imaging Research Institute"
kind = "third-party"
peers = ["research-pacs"]
token_subjects = ["lab-client"]
default_purpose = "HRESCH"

[[deid_profiles]]
id = "research"
options = ["retain-longitudinal-modified-dates"]

[[rules]]
id = "hospital"
effect = "allow"
activity = "hospital-access"
recipients = ["kind:controller"]

[[rules]]
id = "analysis"
effect = "allow"
activity = "analysis"

[[rules]]
id = "results"
effect = "allow"
activity = "return-results"
recipients = ["kind:controller"]

[[rules]]
id = "patients-own-data"
effect = "allow"
activity = "subject-access"

[[rules]]
id = "research-with-consent"
effect = "allow"
activity = "research-sharing"
recipients = ["lab"]
lawful_basis = "PIPA-17-1-1"
deid_profile = "research"
"""


def policy_text(version: str = "hospital-2026-1", unknown_sender: str = "admit") -> str:
    return POLICY.format(version=version, unknown_sender=unknown_sender)


def publish_days_ago(node, text: str, days: int = 8) -> None:
    """Publish `text` as if `days` ago, so that its notice period has run."""
    then = datetime.now(UTC) - timedelta(days=days)
    Stewardship(node.archive, clock=lambda: then).publish_policy(text, "dpo")
    node.archive.registry.forget_cached()


def research_pacs(port: int = 1) -> Peer:
    """The research institute's PACS, a C-MOVE destination and share target of recipient lab."""
    return Peer("research-pacs", "RESEARCH", "127.0.0.1", port, ("echo",))


def as_file(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


@pytest.fixture
def research(storescp):
    return storescp("RESEARCH")


@pytest.fixture
def node(start_node, research):
    node = start_node(peers=[WORKSTATION, research_pacs(research.port)])
    publish_days_ago(node, policy_text())
    dicomweb_client(node).store_instances(
        [
            as_file(make_ct(patient_id=p, study_uid=f"1.2.826.0.1.{n}"))
            for n, p in enumerate(("P1", "P2"), start=1)
        ]
    )
    return node


def c_find(node, **keys) -> tuple[int, list[Dataset]]:
    ae = AE("WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.PatientID = ""
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    answers, final = [], None
    for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        final = status.Status
        if answer is not None and status.Status == 0xFF00:
            answers.append(answer)
    assoc.release()
    return final, answers


def c_move(node, destination: str, study: str) -> int:
    ae = AE("WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    statuses = [
        s.Status
        for s, _ in assoc.send_c_move(
            identifier, destination, StudyRootQueryRetrieveInformationModelMove
        )
        if s
    ]
    assoc.release()
    return statuses[-1]


def last_entry(node, kind: str | None = None):
    entries = [e for e in node.archive.ledger.entries() if kind is None or e.kind == kind]
    return entries[-1]


def wado(node, study: str, subject: str, scopes=("dicomweb.read",)) -> requests.Response:
    return requests.get(
        f"{dicomweb_url(node)}/studies/{study}/metadata",
        headers={"Authorization": f"Bearer {token_for(node, scopes, subject=subject)}"},
        timeout=30,
    )


def governance_api(node, method: str, path: str, scopes=("governance.admin",), **kw):
    token = token_for(node, scopes, subject="dpo")
    return requests.request(
        method,
        f"http://127.0.0.1:{node.http_port}/governance/api{path}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
        **kw,
    )


# --- decisions name the policy version in force -----------------------------------------


def test_each_decision_records_the_version_basis_and_rule(node):
    status, answers = c_find(node, PatientID="P1")
    assert status == 0 and len(answers) == 1
    entry = last_entry(node, "disclosure")
    assert entry.data["policy_version"] == "hospital-2026-1"
    assert (entry.data["rule_id"], entry.data["basis"], entry.data["activity"]) == (
        "hospital",
        "PIPA-26",
        "hospital-access",
    )
    assert entry.data["recipient"] == "hospital" and entry.data["purpose"] == "TREAT"
    in_force = [e for e in node.archive.ledger.entries() if e.kind == "policy"]
    assert [e.outcome for e in in_force] == ["published", "in-force"]


def test_a_new_version_waits_for_its_notice_period(node):
    # a new controller widens (data subjects must be told), so the whole version waits
    text = (
        policy_text("hospital-2026-2")
        .replace('id = "hospital"\neffect = "allow"', ('id = "hospital"\neffect = "deny"'))
        .replace("Example University Hospital", "Example University Hospital Group", 1)
    )
    published, new = node.stewardship.publish_policy(text, "dpo")
    assert new and published.effective_at >= datetime.now(UTC) + timedelta(days=6, hours=23)
    status, answers = c_find(node, PatientID="P1")
    assert status == 0 and answers  # still the old version: notice is 7 days
    assert last_entry(node, "disclosure").data["policy_version"] == "hospital-2026-1"

    node.egress.clock = lambda: datetime.now(UTC) + timedelta(days=8)
    status, answers = c_find(node, PatientID="P1")
    assert answers == [] and status == 0x0124  # refused: not authorized
    denial = last_entry(node, "denial")
    assert denial.data["policy_version"] == "hospital-2026-2"
    assert denial.data["rule_id"] == "hospital"


def test_a_published_version_cannot_be_changed(node):
    text = policy_text().replace("Example University Hospital", "Another Hospital", 1)
    with pytest.raises(InvalidInput, match="immutable"):
        node.stewardship.publish_policy(text, "dpo")


# --- consent: a third party gets nothing without it -------------------------------------


def test_without_consent_a_third_party_gets_nothing_and_each_refusal_is_recorded(node):
    node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo", evidence_ref="form 1")
    node.stewardship.record_consent("P1", "HRESCH", "withdrawn", "dpo", evidence_ref="call")
    before = node.archive.ledger.count()

    # WADO-RS by the research institute's client
    response = wado(node, "1.2.826.0.1.1", subject="lab-client")
    assert response.status_code == 403
    detail = response.json()["detail"]  # the rule and the policy, nothing about the patient
    assert "research-with-consent" in detail and "hospital-2026-1" in detail
    assert "P1" not in response.text and "withdrawn" not in response.text
    # C-MOVE to the research institute's PACS
    assert c_move(node, "RESEARCH", "1.2.826.0.1.1") == 0xC514  # refused before it started
    # a share
    share = governance_api(
        node, "POST", "/shares", json={"recipient": "lab", "study": "1.2.826.0.1.1"}
    )
    assert share.status_code == 403 and share.json()["state"] == "denied"

    denials = [e for e in node.archive.ledger.entries(after=before) if e.kind == "denial"]
    assert [d.data["operation"] for d in denials] == ["wado", "move", "share"]
    for denial in denials:
        assert denial.data["recipient"] == "lab" and denial.data["activity"] == "research-sharing"
        assert "consent:P1:HRESCH:v2" in denial.data["reason"]
    # the hospital itself still may
    assert wado(node, "1.2.826.0.1.1", subject="ohif").status_code == 200


def test_consent_versions_are_immutable_and_kept(node):
    first, _ = node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo")
    second, _ = node.stewardship.record_consent("P1", "HRESCH", "withdrawn", "dpo")
    assert (first.version, second.version) == (1, 2)
    history = governance_api(node, "GET", "/consents/P1", scopes=("governance.read",)).json()
    assert [c["state"] for c in history["history"]] == ["granted", "withdrawn"]
    assert history["current"]["HRESCH"]["in_force"] is False
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    with pytest.raises(DBAPIError, match="append-only"), node.archive.engine.begin() as conn:
        conn.execute(text("UPDATE consents SET state = 'granted'"))
    consents = [e for e in node.archive.ledger.entries() if e.kind == "consent"]
    assert [e.outcome for e in consents] == ["granted", "withdrawn"]


def test_the_governance_api_needs_its_scopes(node):
    assert governance_api(node, "GET", "/policy", scopes=("dicomweb.read",)).status_code == 403
    read_only = governance_api(
        node, "POST", "/consents", scopes=("governance.read",), json={"patient_id": "P1"}
    )
    assert read_only.status_code == 403
    bad = governance_api(
        node, "POST", "/consents", json={"patient_id": "P1", "purpose": "NOPE", "state": "granted"}
    )
    assert bad.status_code == 400 and "purpose" in bad.json()["detail"]
    assert (
        requests.get(
            f"http://127.0.0.1:{node.http_port}/governance/api/policy", timeout=10
        ).status_code
        == 401
    )
    policy = governance_api(node, "GET", "/policy", scopes=("governance.read",)).json()
    assert policy["in_force"]["version"] == "hospital-2026-1"


# --- restriction ------------------------------------------------------------------------


def test_a_restricted_patient_is_left_out_of_answers_and_retrievals(node):
    node.stewardship.restrict("P2", "dpo", "data subject request 2026-17")
    status, answers = c_find(node)
    assert status == 0 and {str(a.PatientID) for a in answers} == {"P1"}
    entry = last_entry(node, "disclosure")
    assert entry.data["denied_patients"] == ["P2"]
    refused = wado(node, "1.2.826.0.1.2", subject="ohif")
    assert refused.status_code == 403 and "P2" not in refused.text
    assert "restricted" in last_entry(node, "denial").data["reason"]  # the DPO sees why
    only_p2 = dicomweb_client(node).search_for_studies(search_filters={"PatientID": "P2"})
    assert only_p2 == []  # an empty answer, not a refusal that would confirm the restriction
    node.stewardship.unrestrict("P2", "dpo")
    assert wado(node, "1.2.826.0.1.2", subject="ohif").status_code == 200


# --- intake holds -----------------------------------------------------------------------


def test_an_unknown_sender_is_held_until_released(start_node, tmp_path):
    node = start_node(peers=[WORKSTATION])
    publish_days_ago(node, policy_text(unknown_sender="hold"))
    files = write_series(tmp_path / "in", 3, patient_id="P7")
    result = run_dcmtk(
        "storescu",
        "-aet",
        "STRANGER",
        "-aec",
        "DICOMNODE",
        "127.0.0.1",
        str(node.dimse.port),
        *map(str, files),
    )
    assert result.returncode == 0, result.stdout + result.stderr  # durably kept: success
    status, answers = c_find(node, PatientID="P7")
    assert status == 0 and answers == []  # held objects are not in the archive
    held = node.archive.registry.quarantined()
    assert len(held) == 3 and "STRANGER is not a known peer" in held[0].reason
    entries = [e for e in node.archive.ledger.entries() if e.kind == "processing"]
    assert [e.outcome for e in entries] == ["held"]  # one entry per study and reason
    assert node.archive.check().ok  # held blobs are not "unindexed blobs"

    config = str(node.settings.source)
    listed = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "held", "list", "--config", config],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.stdout.count("from STRANGER") == 3
    study = held[0].study_instance_uid
    released = governance_api(node, "POST", f"/held/{study}/release")
    assert released.status_code == 200 and released.json()["released"] == 3
    status, answers = c_find(node, PatientID="P7")
    assert len(answers) == 1 and node.archive.registry.quarantined() == []
    assert last_entry(node, "processing").outcome == "released"


def test_an_unknown_sender_is_refused_when_the_policy_says_so(start_node, tmp_path):
    node = start_node(peers=[WORKSTATION])
    publish_days_ago(node, policy_text(unknown_sender="refuse"))
    files = write_series(tmp_path / "in", 1, patient_id="P8")
    result = run_dcmtk(
        "storescu",
        "-d",
        "-aet",
        "STRANGER",
        "-aec",
        "DICOMNODE",
        "127.0.0.1",
        str(node.dimse.port),
        *map(str, files),
    )
    assert "0x0124" in result.stdout + result.stderr  # refused: not authorized
    assert node.archive.counts()["instances"] == 0 and node.archive.registry.quarantined() == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the CLI: any index
def test_cli_policy_check_show_diff(node, tmp_path):
    config = str(node.settings.source)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dicomnode.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    good = tmp_path / "policy.toml"
    good.write_text(policy_text("hospital-2026-3"))
    checked = cli("policy", "check", str(good))
    assert checked.returncode == 0 and "hospital-2026-3" in checked.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(policy_text().replace('lawful_basis = "PIPA-17-1-1"\ndeid', "deid"))
    refused = cli("policy", "check", str(bad))
    assert refused.returncode == 1 and "research-with-consent" in refused.stderr
    shown = cli("policy", "show", "--config", config)
    assert "in force: hospital-2026-1" in shown.stdout
    changed = tmp_path / "changed.toml"
    changed.write_text(
        policy_text("hospital-2026-4")
        .replace("dpo@hospital", "privacy@hospital")
        .replace("Example University Hospital", "Example University Hospital Group", 1)
    )
    diffed = cli("policy", "diff", str(changed), "--config", config)
    assert "~ policy.dpo_contact" in diffed.stdout
    assert "change: wider (7 days' notice)" in diffed.stdout
    published = cli("policy", "publish", str(changed), "--config", config, "--by", "dpo")
    assert published.returncode == 0 and "in force from" in published.stdout
    assert "scheduled: hospital-2026-4" in cli("policy", "show", "--config", config).stdout


# --- shares -------------------------------------------------------------------------------


def test_with_consent_a_share_arrives_deidentified_and_the_same_each_time(node, research):
    study = "1.2.826.0.1.1"
    us_image = make_ct(patient_id="P1", study_uid=study, Modality="US")  # burned-in text risk
    dicomweb_client(node).store_instances([as_file(us_image)])
    refused = cli(node, "share", "--recipient", "lab", "--study", study, "--by", "dpo")
    assert refused.returncode == 1 and "denied" in refused.stdout  # no consent yet
    node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo", evidence_ref="form 9")

    shared = cli(node, "share", "--recipient", "lab", "--study", study, "--by", "dpo")
    assert shared.returncode == 0, shared.stdout + shared.stderr
    (received,) = research.received()  # the US image was withheld
    original = node.archive.find_instances("STUDY", (("StudyInstanceUID", study),))
    disclosure = last_entry(node, "disclosure")
    assert disclosure.data["operation"] == "share"
    assert disclosure.data["consent_refs"] == ["consent:P1:HRESCH:v1"]
    assert disclosure.data["deid"]["profile"] == "research"
    assert disclosure.data["deid"]["table_edition"] == "2024b"
    assert list(disclosure.data["withheld"]) == [us_image.SOPInstanceUID]
    # the pseudonyms are not in the ledger (PIPA 28-4): only the node's secret derives them
    assert not {"uid_map", "patient_pseudonyms"} & set(disclosure.data)
    secret, scope = node.egress.deid_secret, disclosure.data["deid"]["uid_scope"]

    ct = next(i for i in original if i.sop_instance_uid != us_image.SOPInstanceUID)
    assert received.SOPInstanceUID == remap_uid(ct.sop_instance_uid, secret, scope)
    assert received.StudyInstanceUID == remap_uid(study, secret, scope) != study
    assert received.PatientID == patient_pseudonym("P1", secret, scope) != "P1"
    for keyword in ("PatientName", "PatientBirthDate", "ReferringPhysicianName", "AccessionNumber"):
        assert str(received.get(keyword, "")) == "", keyword
    assert received.PatientIdentityRemoved == "YES"
    codes = {item.CodeValue for item in received.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113107"}
    assert received.LongitudinalTemporalInformationModified == "MODIFIED"
    assert received.StudyDate and received.StudyDate != "20240315"  # shifted, not removed

    transfer = last_entry(node, "transfer")
    assert transfer.outcome == "complete" and transfer.data["sent"] == [ct.sop_instance_uid]

    again = cli(node, "share", "--recipient", "lab", "--study", study, "--by", "dpo")
    assert again.returncode == 0
    (second,) = research.received()
    assert (second.SOPInstanceUID, second.StudyInstanceUID, second.PatientID) == (
        received.SOPInstanceUID,
        received.StudyInstanceUID,
        received.PatientID,
    )
    assert second.StudyDate == received.StudyDate  # the same shift for the same patient


# --- the audit trail --------------------------------------------------------------------


def spooled_events(node) -> list[tuple[str, str, str]]:
    """(EventID, EventActionCode, EventOutcomeIndicator) of every spooled audit message, each
    validated against the shipped schema."""
    from lxml import etree

    from dicomnode.governance import audit

    node.audit.stop_writer()  # spool what was submitted
    node.audit.start_writer()
    schema = etree.RelaxNG(etree.parse(str(audit.schema_path())))
    events = []
    for path in node.audit.pending():
        document = etree.parse(str(path))
        assert schema.validate(document), (path.name, schema.error_log)
        identification = document.find("EventIdentification")
        events.append(
            (
                identification.find("EventID").get("csd-code"),
                identification.get("EventActionCode"),
                identification.get("EventOutcomeIndicator"),
            )
        )
    return events


def test_every_way_in_and_out_writes_an_audit_message(node, research, tmp_path):
    files = write_series(tmp_path / "in", 2, patient_id="P3")
    stored = run_dcmtk(
        "storescu",
        "-aet",
        "WORKSTATION",
        "-aec",
        "DICOMNODE",
        "127.0.0.1",
        str(node.dimse.port),
        *map(str, files),
    )
    assert stored.returncode == 0
    c_find(node, PatientID="P1")
    dicomweb_client(node).search_for_studies(search_filters={"PatientID": "P2"})
    assert wado(node, "1.2.826.0.1.1", subject="ohif").status_code == 200
    assert wado(node, "1.2.826.0.1.1", subject="lab-client").status_code == 403
    node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo")
    share = governance_api(
        node, "POST", "/shares", json={"recipient": "lab", "study": "1.2.826.0.1.1"}
    )
    assert share.status_code == 200
    bad_token = requests.get(
        f"{dicomweb_url(node)}/studies", timeout=10, headers={"Authorization": "Bearer nonsense"}
    )
    assert bad_token.status_code == 401
    deleted = requests.delete(
        f"{dicomweb_url(node)}/studies/1.2.826.0.1.2",
        timeout=30,
        headers={"Authorization": f"Bearer {token_for(node)}"},
    )
    assert deleted.status_code == 200

    events = spooled_events(node)
    ids = [e[0] for e in events]
    assert ("110100", "E", "0") in events  # the node started
    assert ("110104", "C", "0") in events  # received: the STOW of the fixture, the storescu
    assert ids.count("110104") >= 3  # received twice, and sent by WADO-RS
    assert ("110104", "R", "0") in events
    assert ids.count("110112") == 2  # C-FIND and QIDO-RS
    assert ("110113", "E", "4") in events  # the refused WADO-RS
    assert ("110106", "R", "0") in events  # the share, a disclosure to a third party
    assert ("110114", "E", "4") in events  # the bad token
    assert ("110105", "D", "0") in events  # the deleted study
    assert "110113" in ids and ids.count("110113") >= 2  # and the policy publication


def test_the_conformance_statement_of_a_profile_in_force(node):
    statement = governance_api(node, "GET", "/deid/research", scopes=("governance.read",))
    assert statement.status_code == 200
    body = statement.json()
    assert [m["code"] for m in body["methods"]] == ["113100", "113107"]
    assert "Patient's Name" in {row["name"] for row in body["replaced_with_zero_length"]}
    missing = governance_api(node, "GET", "/deid/nope", scopes=("governance.read",))
    assert missing.status_code == 404


def test_a_share_by_stow_rs_reaches_another_node_deidentified(start_node, tmp_path):
    from dicomnode.config import read_settings
    from dicomnode.serve import Node
    from tests.conftest import write_config

    recipient = Node(
        read_settings(
            write_config(
                tmp_path / "recipient.toml",
                tmp_path / "recipient-data",
                f"sqlite:///{tmp_path / 'recipient.sqlite'}",
            )
        )
    )
    recipient.start()
    try:
        token_file = tmp_path / "lab.token"
        token_file.write_text(token_for(recipient, ("dicomweb.write",), subject="hospital"))
        url = f"http://127.0.0.1:{recipient.http_port}/dicomweb"
        node = start_node(
            peers=[WORKSTATION],
            extra=f'[governance]\nstow_token_files = {{ lab = "{token_file}" }}',
        )
        text = policy_text().replace(
            'token_subjects = ["lab-client"]',
            f'token_subjects = ["lab-client"]\ndicomweb_url = "{url}"',
        )
        publish_days_ago(node, text)
        study = "1.2.826.0.1.77"
        dicomweb_client(node).store_instances(
            [as_file(make_ct(patient_id="P1", study_uid=study, instance_number=n)) for n in (1, 2)]
        )
        node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo")
        delivery = node.egress.deliver_now(
            node.egress.queue_share("lab", study, "dpo"), timedelta(0)
        )
        assert delivery.state == "done" and len(delivery.outcome["sent"]) == 2
        disclosure = last_entry(node, "disclosure")
        secret, scope = node.egress.deid_secret, disclosure.data["deid"]["uid_scope"]
        shared_study = remap_uid(study, secret, scope)
        arrived = recipient.archive.find_instances("STUDY", (("StudyInstanceUID", shared_study),))
        assert len(arrived) == 2 and {i.patient_id for i in arrived} == {
            patient_pseudonym("P1", secret, scope)
        }
        assert recipient.archive.find_instances("STUDY", (("StudyInstanceUID", study),)) == []
    finally:
        recipient.stop()


# --- regressions found in review ----------------------------------------------------------


def test_disclosure_log_lines_carry_no_patient_data(node, caplog):
    import logging

    node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo")
    with caplog.at_level(logging.INFO, logger="dicomnode.egress"):
        c_find(node, PatientID="P1")
        node.egress.share_now("lab", "1.2.826.0.1.1", "dpo", timedelta(0))
    lines = [r for r in caplog.records if getattr(r, "event", "") == "disclosure"]
    assert len(lines) == 2
    for record in lines:
        fields = {k: v for k, v in record.__dict__.items() if not k.startswith("_")}
        text = repr(fields)
        assert "P1" not in text and "1.2.826.0.1.1" not in text and "uid_map" not in text


def test_moments_with_an_offset_are_kept_exactly(node):
    from datetime import timezone

    seoul = timezone(timedelta(hours=9))
    until = datetime.now(seoul) + timedelta(hours=1)
    node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo", valid_until=until)
    (stored,) = node.archive.registry.consents("P1")
    assert stored.valid_until == until  # the same moment, whatever the back end keeps
    node.stewardship.clock = lambda: until + timedelta(minutes=1)
    assert node.stewardship.consent_in_force("P1")["HRESCH"]["in_force"] is False


def test_one_study_holds_one_patient(node):
    study = "1.2.826.0.1.50"
    client = dicomweb_client(node)
    client.store_instances([as_file(make_ct(patient_id="P1", study_uid=study))])
    with pytest.raises(requests.HTTPError):  # 409: the other patient's object is refused
        client.store_instances([as_file(make_ct(patient_id="P4", study_uid=study))])
    (only,) = node.archive.find_instances("STUDY", (("StudyInstanceUID", study),))
    assert only.patient_id == "P1"


def test_a_stale_worker_cannot_overwrite_and_a_dying_delivery_ends_failed(node):
    registry = node.archive.registry
    delivery_id = node.egress.queue_share("lab", "1.2.826.0.1.1", "dpo")
    now = datetime.now(UTC)
    first = registry.claim_delivery("worker-a", now, timedelta(seconds=1))
    later = now + timedelta(seconds=5)  # worker-a's lease ran out; worker-b takes over
    second = registry.claim_delivery("worker-b", later, timedelta(minutes=5))
    assert first.id == second.id == delivery_id and second.attempts == 2
    assert not registry.finish_delivery(delivery_id, "done", later, {}, None, "worker-a")
    assert registry.delivery(delivery_id).state == "sending"  # still worker-b's
    # a worker that dies on every attempt: after max_attempts the delivery ends failed
    for n in range(3, 10):
        registry.claim_delivery(f"worker-{n}", later + timedelta(minutes=10 * n), timedelta(0))
    final = registry.delivery(delivery_id)
    assert final.state == "failed" and final.attempts == final.max_attempts
    assert "every attempt" in final.error


def test_a_transport_keeps_what_it_sent_when_one_object_cannot_be_prepared(node, research):
    from dicomnode.egress import SendItem, Target

    study = "1.2.826.0.1.1"
    (instance,) = node.archive.find_instances("STUDY", (("StudyInstanceUID", study),))
    path = node.archive.blob_file(instance)

    def broken():
        raise OSError("the blob was destroyed meanwhile")

    items = [
        SendItem("9.9.9", instance.sop_class_uid, instance.transfer_syntax_uid, broken),
        SendItem(
            instance.sop_instance_uid,
            instance.sop_class_uid,
            instance.transfer_syntax_uid,
            lambda: pydicom.dcmread(path),
        ),
    ]
    target = Target("dimse", "lab", peer=research_pacs(research.port))
    report = node.egress.transports["dimse"].send(target, items)
    assert report.sent == [instance.sop_instance_uid]
    assert "destroyed meanwhile" in report.failed["9.9.9"]


def test_a_patients_export_needs_the_admin_scope(node):
    read_only = governance_api(node, "GET", "/subjects/P1/export", scopes=("governance.read",))
    assert read_only.status_code == 403
    admin = governance_api(
        node, "GET", "/subjects/P1/export", scopes=("governance.read", "governance.admin")
    )
    assert admin.status_code == 200 and admin.content[:2] == b"PK"
    entry = last_entry(node, "disclosure")
    assert entry.data["operation"] == "export" and "dpo" in entry.data["recipient"]


def test_a_refused_object_is_a_ledger_entry(start_node, tmp_path):
    node = start_node(peers=[WORKSTATION])
    publish_days_ago(node, policy_text(unknown_sender="refuse"))
    files = write_series(tmp_path / "in", 1, patient_id="P8")
    run_dcmtk("storescu", "-aet", "STRANGER", "-aec", "DICOMNODE", "127.0.0.1",
              str(node.dimse.port), *map(str, files))  # fmt: skip
    entry = last_entry(node, "processing")
    assert (entry.outcome, entry.data["operation"], entry.data["sender"]) == (
        "refused",
        "admit",
        "STRANGER",
    )
