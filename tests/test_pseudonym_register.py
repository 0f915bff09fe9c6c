"""The pseudonymised-data register (checklist items 27 and 36) and the separation of the
re-identification linkage (PIPA Art. 28-4(1)), against a running node on SQLite.

A scripted scenario on a fixed clock: three studies shared de-identified with the research
institute (a dcmtk storescp), one of them confirmed destroyed by the recipient through the DPO
page. Its exports are compared with the golden files under tests/golden/ (regenerate them with
DICOMNODE_REGENERATE_GOLDEN=1 after a deliberate change, and review the diff)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicomnode.archive.accounts import AccountStore
from dicomnode.governance import pseudonymised as rules
from dicomnode.governance.deid_keys import patient_pseudonym, remap_uid
from dicomnode.stewardship import Stewardship
from tests.conftest import (
    DCMTK_ENV,
    WORKSTATION,
    dcmtk_tool,
    dicomweb_client,
    free_port,
    read_folder,
    run_dcmtk,
    wait_until,
    write_config,
)
from tests.factory import make_ct
from tests.test_dpo_pages import PASSWORD, browser, signed_in
from tests.test_governance_node import as_file, policy_text, research_pacs

GOLDEN = Path(__file__).parent / "golden"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # the scenario's clock starts here
STUDIES = {"P1": "1.2.826.0.1.3680043.27.1", "P2": "1.2.826.0.1.3680043.27.2"}
STUDIES |= {"P3": "1.2.826.0.1.3680043.27.3", "P4": "1.2.826.0.1.3680043.27.4"}
CONFIRMED_AT = "2026-03-12T09:00:00+00:00"  # the recipient's confirmation of P1's copy
POLICY = policy_text().replace(
    'default_purpose = "HRESCH"', 'default_purpose = "HRESCH"\nretention = "P1Y"'
)


class Clock:
    """The node's clock for the scenario: set, never read from the machine."""

    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def __call__(self) -> datetime:
        return self.moment


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The node after the scripted scenario, its storescp and clock, and the exports as they
    were at its end (`exports`: name -> text)."""
    from dicomnode.config import read_settings
    from dicomnode.serve import Node

    folder = tmp_path_factory.mktemp("pseudonymised")
    port = free_port()
    (folder / "received").mkdir()
    scp = subprocess.Popen(
        [dcmtk_tool("storescp"), "-aet", "RESEARCH", "-od", str(folder / "received"), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=DCMTK_ENV,
    )
    wait_until(
        lambda: run_dcmtk("echoscu", "-aec", "RESEARCH", "127.0.0.1", str(port)).returncode == 0,
        30,
        "storescp to answer C-ECHO",
    )
    config = write_config(
        folder / "node.toml",
        folder / "data",
        f"sqlite:///{folder / 'index.sqlite'}",
        [WORKSTATION, research_pacs(port)],
        extra="[governance]\nretention_interval = 0",
    )
    node = Node(read_settings(config))
    node.start()
    try:
        yield _run_scenario(node, folder / "received")
    finally:
        node.stop()
        scp.terminate()
        scp.wait(10)


def _run_scenario(node, received: Path) -> dict:
    clock = Clock(T0 - timedelta(days=30))
    Stewardship(node.archive, clock=clock).publish_policy(POLICY, "dpo")
    node.archive.registry.forget_cached()
    node.egress.clock = node.stewardship.clock = clock
    accounts = AccountStore(node.archive.index)
    accounts.add("dpo1", PASSWORD, "dpo", "Kim Min-ji")
    accounts.add("aud1", PASSWORD, "auditor")
    dicomweb_client(node).store_instances(
        [
            as_file(make_ct(patient_id=patient, study_uid=study, instance_number=n))
            for patient, study in STUDIES.items()
            for n in ((1, 2) if patient == "P1" else (1,))
        ]
    )
    for patient in STUDIES:
        node.stewardship.record_consent(patient, "HRESCH", "granted", "dpo", evidence_ref="form")
    clock.moment = T0 - timedelta(days=10)  # P4's share, confirmed destroyed 5 days later
    shares = {"P4": node.egress.share_now("lab", STUDIES["P4"], "dpo:dpo1", timedelta(0))}
    clock.moment = T0 - timedelta(days=5)
    _confirm(node, "P4", clock.moment.isoformat())
    for hours, patient in enumerate(("P1", "P2", "P3")):
        clock.moment = T0 + timedelta(hours=hours)
        shares[patient] = node.egress.share_now("lab", STUDIES[patient], "dpo:dpo1", timedelta(0))
    assert {s.state for s in shares.values()} == {"done"}
    clock.moment = T0 + timedelta(days=10)
    _confirm(node, "P1", CONFIRMED_AT)
    client = signed_in(node)
    exports = {
        name: client.get(f"/governance/{path}").text
        for name, path in (
            ("pseudonymised-register.csv", "pseudonymised.csv?lang=en"),
            ("pseudonymised-register-ko.csv", "pseudonymised.csv?lang=ko"),
            ("pseudonymised-register.json", "pseudonymised.json?lang=en"),
            ("accounting-P1.csv", "accounting.csv?patient_id=P1&lang=en"),
        )
    }
    return {
        "node": node,
        "clock": clock,
        "exports": exports,
        "received": read_folder(received),
    }


def _confirm(node, patient: str, confirmed_at: str) -> None:
    """The DPO records the recipient's destruction confirmation on the recipients' page."""
    dpo = signed_in(node)
    response = dpo.post(
        "/governance/recipients/confirm",
        data={
            "csrf_token": dpo.csrf("/governance/recipients"),
            "recipient": "lab",
            "study": STUDIES[patient],
            "confirmed_at": confirmed_at,
            "evidence": f"destruction certificate for {patient}",
        },
    )
    assert response.status_code == 200, response.text[:300]


def rows(node) -> dict[str, dict]:
    """The register's rows (the JSON export, read now) by study."""
    body = json.loads(signed_in(node).get("/governance/pseudonymised.json").text)
    return {r["study_instance_uid"]: r for r in body["records"]}


# --- item 27: the register, one record per pseudonymised disclosure -----------------------


def with_ledger_times_named(text: str) -> str:
    """An accounting export with its disclosure times (the ledger's own clock, the machine's)
    replaced by a placeholder, each checked to be a moment first."""
    table = list(csv.DictReader(io.StringIO(text)))
    for row in table:
        datetime.fromisoformat(row["disclosed_at"])
        text = text.replace(row["disclosed_at"], "<recorded_at>")
    return text


def test_item_27_the_register_exports_match_the_golden_files(scenario):
    exports = dict(scenario["exports"])
    exports["accounting-P1.csv"] = with_ledger_times_named(exports["accounting-P1.csv"])
    for name, text in exports.items():
        golden = GOLDEN / name
        if os.environ.get("DICOMNODE_REGENERATE_GOLDEN"):
            golden.write_bytes(text.encode("utf-8"))
        assert text == golden.read_bytes().decode("utf-8"), name  # byte for byte (CSV: CRLF)
    table = list(csv.reader(io.StringIO(scenario["exports"]["pseudonymised-register-ko.csv"])))
    assert table[0][:3] == ["기록 번호", "전송 번호", "가명처리·제공 일시"]
    assert len(table) == 5  # the labels and one row per share
    (share,) = csv.DictReader(io.StringIO(exports["accounting-P1.csv"]))  # item 27's accounting
    assert (share["operation"], share["deidentified"]) == ("share", "yes")


def test_item_27_each_pseudonymised_share_is_one_record_its_ledger_entry_names(scenario):
    node = scenario["node"]
    found = rows(node)
    disclosures = [
        e
        for e in node.archive.ledger.entries()
        if e.kind == "disclosure" and e.data.get("operation") == "share"
    ]
    assert len(disclosures) == 4
    for entry in disclosures:
        (study,) = entry.data["study_instance_uids"]
        record = found[study]
        assert entry.data["pseudonymised_record"] == record["record"]
        assert entry.data["delivery"] == record["delivery"]
    p1 = found[STUDIES["P1"]]
    assert p1["purpose"] == "HRESCH" and p1["recipient"] == "lab"
    assert p1["recipient_name"] == "Imaging Research Institute"
    assert p1["profile"] == "research" and p1["method_codes"] == ["113100", "113107"]
    assert (
        "dates:shifted-per-patient" in p1["items"] and "patient-id:keyed-pseudonym" in p1["items"]
    )
    assert (p1["instances"], p1["instances_sent"], p1["processed_by"]) == (2, 2, "dpo:dpo1")
    assert p1["period_start"] == T0.isoformat() and p1["period_end"] == "2027-03-02T09:00:00+00:00"


def test_item_27_the_register_page_in_english_and_korean_for_the_dpo_and_an_auditor(scenario):
    node = scenario["node"]
    for username in ("dpo1", "aud1"):
        client = signed_in(node, username)
        english = client.get("/governance/pseudonymised?lang=en")
        assert english.status_code == 200
        assert "Pseudonymised data destroyed" in english.text
        assert "the recipient confirmed destruction" in english.text
        assert "Patient ID: keyed pseudonym" in english.text
        assert english.text.count('class="record"') >= 4
        korean = client.get("/governance/pseudonymised?lang=ko").text
        assert "가명처리한 개인정보의 항목" in korean and "기록 보관 기한" in korean
        assert "환자 ID: 키 기반 가명" in korean
        client.get("/governance/?lang=en")
    assert browser(node).get("/governance/pseudonymised.csv").status_code == 401


# --- PIPA 28-4: the linkage is kept apart --------------------------------------------------


def test_item_27_pipa_28_4_no_pseudonym_is_in_the_ledger_or_the_auditors_views(scenario):
    node = scenario["node"]
    secret = node.egress.deid_secret
    received = scenario["received"]
    pseudonym = patient_pseudonym("P1", secret, "recipient:lab")
    shared_study = remap_uid(STUDIES["P1"], secret, "recipient:lab")
    # the recipient got exactly what the secret derives: the secret is the linkage
    assert {(d.PatientID, d.StudyInstanceUID) for d in received if d.PatientID == pseudonym} == {
        (pseudonym, shared_study)
    }
    ledger = json.dumps([e.data for e in node.archive.ledger.entries()])
    assert pseudonym not in ledger and shared_study not in ledger
    assert '"uid_map"' not in ledger and '"patient_pseudonyms"' not in ledger
    auditor = signed_in(node, "aud1")
    share = next(
        e
        for e in node.archive.ledger.entries()
        if e.kind == "disclosure" and e.data.get("study_instance_uids") == [STUDIES["P1"]]
    )
    for path in (
        f"/governance/ledger/{share.seq}",
        "/governance/disclosures.json?transfers=1",
        "/governance/accounting.csv?patient_id=P1",
        "/governance/pseudonymised.json",
        "/governance/pseudonymised",
    ):
        text = auditor.get(path).text
        assert STUDIES["P1"] in text, path  # the views show the originals...
        assert pseudonym not in text and shared_study not in text, path  # ...never the link
        assert secret.hex() not in text, path


def test_item_27_pipa_28_4_an_earlier_versions_entry_shows_no_pseudonyms(scenario):
    node = scenario["node"]
    share = next(
        e
        for e in node.archive.ledger.entries()
        if e.kind == "disclosure" and e.data.get("study_instance_uids") == [STUDIES["P3"]]
    )
    earlier = {**share.data, "patient_pseudonyms": {"P3": "PSEUDO-P3-EARLIER"}}
    earlier["uid_map"] = {STUDIES["P3"]: "2.25.424242424242"}
    entry = node.archive.ledger.record("disclosure", "dpo:dpo1", "allowed", earlier)
    auditor = signed_in(node, "aud1")
    page = auditor.get(f"/governance/ledger/{entry.seq}").text
    exported = json.loads(auditor.get("/governance/disclosures.json").text)["entries"]
    (shown,) = [e for e in exported if e["seq"] == entry.seq]
    assert shown["left_out"] == ["patient_pseudonyms", "uid_map"]
    for text in (page, json.dumps(shown)):
        assert "PSEUDO-P3-EARLIER" not in text and "2.25.424242424242" not in text
    assert "re-identification linkage" in page and STUDIES["P3"] in page
    assert node.archive.ledger.verify().ok  # the entry itself is unchanged


# --- item 36: kept >= 3 years after the pseudonymised data are destroyed -----------------


def test_item_36_a_confirmed_destruction_keeps_the_record_until_three_years_later(scenario):
    found = rows(scenario["node"])
    p1 = found[STUDIES["P1"]]
    assert p1["destroyed_at"] == CONFIRMED_AT and p1["destroyed_how"] == "recipient-confirmed"
    assert p1["keep_until"] == "2029-03-12T09:00:00+00:00"  # destruction date + 3 years
    for patient in ("P2", "P3"):  # not known to be destroyed: kept, no end
        assert found[STUDIES[patient]]["destroyed_at"] == ""
        assert found[STUDIES[patient]]["keep_until"] == ""
    leap = datetime(2028, 2, 29, 12, 0, tzinfo=UTC)
    assert rules.keep_until(leap) == datetime(2031, 2, 28, 12, 0, tzinfo=UTC)


def test_item_36_an_erased_study_dates_its_records_destruction_and_keeps_them(scenario):
    node = scenario["node"]
    outcome = node.stewardship.erase_subject("P2", "dpo:dpo1")
    assert outcome.done
    deletion = next(
        e
        for e in reversed(list(node.archive.ledger.entries()))
        if e.kind == "deletion" and e.data.get("study_instance_uids") == [STUDIES["P2"]]
    )
    p2 = rows(node)[STUDIES["P2"]]  # the erasure does not remove the register's record
    destroyed = datetime.fromisoformat(deletion.recorded_at)
    assert p2["destroyed_how"] == "study-destroyed"
    assert p2["destroyed_at"] == destroyed.isoformat(timespec="seconds")
    assert p2["keep_until"] == rules.keep_until(destroyed).isoformat(timespec="seconds")
    assert datetime.fromisoformat(p2["keep_until"]).year == destroyed.year + 3


def test_item_36_a_sweep_never_purges_a_record_before_its_keep_until(scenario):
    node, clock = scenario["node"], scenario["clock"]
    p4_keep_until = datetime.fromisoformat(rows(node)[STUDIES["P4"]]["keep_until"])
    assert p4_keep_until == datetime(2029, 2, 25, 9, 0, tzinfo=UTC)  # T0 - 5 days + 3 years
    clock.moment = p4_keep_until - timedelta(seconds=1)
    assert "pseudonymised_records" not in node.stewardship.retention_sweep("dpo").records_removed
    assert STUDIES["P4"] in rows(node)
    clock.moment = p4_keep_until
    swept = node.stewardship.retention_sweep("dpo")
    assert swept.records_removed["pseudonymised_records"] == 1
    left = rows(node)
    assert STUDIES["P4"] not in left and STUDIES["P1"] in left  # P1's is kept until 2029-03-12
    purge = [
        e
        for e in node.archive.ledger.entries()
        if e.kind == "deletion" and e.data.get("rule_id") == "PIPA-28-4-3"
    ]
    assert [e.data["removed"] for e in purge] == [{"pseudonymised_records": 1}]
    clock.moment = datetime(2100, 1, 1, tzinfo=UTC)  # records of data not known destroyed stay
    node.stewardship.retention_sweep("dpo")
    assert STUDIES["P3"] in rows(node) and STUDIES["P1"] not in rows(node)


def test_item_36_the_register_keeps_dates_on_both_back_ends(database_url):
    """The store's SQL on SQLite and PostgreSQL: a retried delivery updates its one record,
    destruction dates only records not yet destroyed, removal spares undestroyed ones."""
    from sqlalchemy import select

    from dicomnode.archive.index import Index, create_index_engine
    from dicomnode.archive.pseudonymised import (
        PseudonymisedRegister,
        mark_recipient_destroyed,
        mark_study_destroyed,
    )
    from dicomnode.archive.schema import pseudonymised_records

    engine = create_index_engine(database_url)
    index = Index(engine)
    try:
        register = PseudonymisedRegister(index)
        facts = {
            "processed_at": T0,
            "processed_by": "dpo:dpo1",
            "purpose": "HRESCH",
            "activity": "research-sharing",
            "basis": "PIPA-28-2",
            "recipient": "lab",
            "recipient_name": "Imaging Research Institute",
            "recipient_country": "KR",
            "profile": "research",
            "method": {"profile": "research", "codes": ["113100"]},
            "items": rules.pseudonymised_items(set()),
            "patient_ids": ["P1"],
            "study_instance_uid": "1.2.3",
            "instances": 2,
            "withheld": 0,
            "period": "",
            "period_end": None,
            "policy_version": "v1",
        }
        first = register.open(7, facts)
        assert register.open(7, facts | {"instances": 3}) == first  # a retry: the same record
        other = register.open(8, facts | {"study_instance_uid": "1.2.4"})
        register.sent(first, 3, T0)
        with index.write() as conn:
            assert mark_recipient_destroyed(conn, "lab", "1.2.3", T0 - timedelta(days=1)) == 0
            assert mark_recipient_destroyed(conn, "lab", "1.2.3", T0 + timedelta(days=1)) == 1
            assert mark_study_destroyed(conn, ["1.2.3", "1.2.4"], T0 + timedelta(days=9)) == 1
        found = {r.id: r for r in register.records()}
        assert (found[first].instances, found[first].instances_sent) == (3, 3)
        assert found[first].destroyed_at == T0 + timedelta(days=1)  # the first date stays
        assert found[other].destroyed_how == "study-destroyed"
        assert found[first].items == rules.pseudonymised_items(set())
        with index.write() as conn:  # a record not known destroyed is never removed
            conn.execute(
                pseudonymised_records.update()
                .where(pseudonymised_records.c.id == other)
                .values(destroyed_at=None)
            )
        assert register.remove([first, other]) == 1
        with index.read() as conn:
            left = conn.execute(select(pseudonymised_records.c.id)).scalars().all()
        assert left == [other]
    finally:
        index.close()
        engine.dispose()
