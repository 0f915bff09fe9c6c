"""The DPO's pages at /governance, against a running node on SQLite and on PostgreSQL: sign-in
(local accounts, the hospital's OIDC provider), who sees what, cookies and CSRF, Korean labels,
the disclosure filters, pages and exports, the per-patient accounting and the ledger's verify.

The ledger entries come from real operations: C-FIND by a workstation, WADO-RS by the hospital's
viewer and by a research client, consent records, a refused and a completed share."""

from __future__ import annotations

import csv
import io
import logging
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlencode, urljoin

import pytest
import requests
from flask import Flask, jsonify, redirect
from flask import request as flask_request
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from sqlalchemy import text
from werkzeug.serving import make_server

from dicomnode.archive import schema
from dicomnode.archive.accounts import AccountStore
from dicomnode.dicomweb.dpo import i18n
from tests.conftest import WORKSTATION, dicomweb_client, drop_append_only_triggers
from tests.factory import make_ct
from tests.test_governance_node import (
    as_file,
    c_find,
    governance_api,
    policy_text,
    publish_days_ago,
    research_pacs,
    wado,
)

PASSWORD = "correct horse battery staple"
STUDY_1, STUDY_2 = "1.2.826.0.1.1", "1.2.826.0.1.2"
RETENTION = """
[[retention]]
id = "images-10y"
category = "received-images"
period = "P10Y"
start = "study-date"
"""
PAGES = (
    "/governance/",
    "/governance/disclosures",
    "/governance/accounting?patient_id=P1",
    "/governance/consents?patient_id=P1",
    "/governance/holds",
    "/governance/restrictions",
    "/governance/destructions",
    "/governance/pending",
    "/governance/retention",
    "/governance/ledger",
    "/governance/ledger/1",
    "/governance/processing-record",
    "/governance/policy",
)
EXPORTS = (
    "/governance/disclosures.csv",
    "/governance/disclosures.json",
    "/governance/accounting.csv?patient_id=P1",
    "/governance/processing-record.json",
)


class Browser(requests.Session):
    """A requests session that acts like a browser on localhost: it sends the Secure session
    cookie over http://127.0.0.1 (browsers treat loopback as a secure context) and follows
    redirects itself, so that every hop carries the cookie."""

    def __init__(self, base: str) -> None:
        super().__init__()
        self.base = base

    def request(self, method, url, follow=True, **kw):  # type: ignore[override]
        url = urljoin(self.base, url)
        kw.pop("allow_redirects", None)
        for _ in range(10):
            cookie = "; ".join(f"{c.name}={c.value}" for c in self.cookies)
            headers = {**kw.pop("headers", {}), **({"Cookie": cookie} if cookie else {})}
            response = super().request(method, url, headers=headers, allow_redirects=False, **kw)
            if not follow or response.status_code not in (301, 302, 303, 307):
                return response
            url = urljoin(url, response.headers["Location"])
            method, kw = "GET", {}
        raise AssertionError("too many redirects")

    def csrf(self, path: str = "/governance/signin") -> str:
        found = re.search(r'name="csrf_token" value="([^"]+)"', self.get(path).text)
        assert found, f"no CSRF token on {path}"
        return found.group(1)

    def sign_in(self, username: str, password: str = PASSWORD) -> requests.Response:
        token = self.csrf()
        return self.post(
            "/governance/signin",
            data={"username": username, "password": password, "csrf_token": token},
        )


def browser(node) -> Browser:
    return Browser(f"http://127.0.0.1:{node.http_port}")


def signed_in(node, username: str = "dpo1") -> Browser:
    client = browser(node)
    response = client.sign_in(username)
    assert response.status_code == 200 and response.url.endswith("/governance/"), response.text
    return client


@pytest.fixture
def research(storescp):
    return storescp("RESEARCH")


@pytest.fixture
def node(start_node, research):
    return prepared_node(start_node, research)


def prepared_node(start_node, research):
    """A node with the hospital's policy, two patients' studies, a DPO and an auditor."""
    node = start_node(peers=[WORKSTATION, research_pacs(research.port)])
    publish_days_ago(node, policy_text() + RETENTION)
    dicomweb_client(node).store_instances(
        [
            as_file(make_ct(patient_id=p, study_uid=study))
            for p, study in (("P1", STUDY_1), ("P2", STUDY_2))
        ]
    )
    accounts = AccountStore(node.archive.index)
    accounts.add("dpo1", PASSWORD, "dpo", "Kim Min-ji")
    accounts.add("aud1", PASSWORD, "auditor")
    return node


def make_history(node) -> None:
    """Ledger entries from real operations: allowed and denied disclosures, consents, a share
    that is refused and one that is sent (a transfer)."""
    assert c_find(node, PatientID="P1")[0] == 0  # disclosure: find, hospital, P1
    assert c_find(node)[0] == 0  # disclosure: find, hospital, P1 and P2
    assert wado(node, STUDY_1, subject="ohif").status_code == 200  # disclosure: wado, P1
    assert wado(node, STUDY_2, subject="lab-client").status_code == 403  # denial: no consent
    share = governance_api(node, "POST", "/shares", json={"recipient": "lab", "study": STUDY_2})
    assert share.status_code == 403  # denial: share, no consent
    node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo", evidence_ref="form 7")
    share = governance_api(node, "POST", "/shares", json={"recipient": "lab", "study": STUDY_1})
    assert share.status_code == 200, share.text  # disclosure + transfer to the lab
    # identified data never goes to the lab, whose rule de-identifies: only shares do that
    assert wado(node, STUDY_1, subject="lab-client").status_code == 403  # denial: wado, lab


def entries(node, kinds=("disclosure", "denial"), **where):
    """The ledger's entries of `kinds` whose detail has every `where` value, newest first
    (computed here from the whole ledger, independently of the pages' SQL)."""
    found = []
    for entry in node.archive.ledger.entries():
        if entry.kind not in kinds:
            continue
        detail = entry.data
        if all(
            (value in detail.get("patient_ids", []))
            if key == "patient_id"
            else (entry.outcome == value if key == "outcome" else detail.get(key) == value)
            for key, value in where.items()
        ):
            found.append(entry)
    return found[::-1]


def shown_seqs(html: str) -> list[int]:
    """The ledger entries a disclosure table lists, in order."""
    return [int(n) for n in re.findall(r'href="/governance/ledger/(\d+)">#', html)]


# --- who sees what ----------------------------------------------------------------------------


def test_every_page_renders_for_a_dpo(node):
    make_history(node)
    client = signed_in(node)
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 200, (path, response.text[:500])
        assert "<h1>" in response.text and "Sign out" in response.text, path
        assert response.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    for path in EXPORTS:
        assert client.get(path).status_code == 200, path
    page = client.get("/governance/disclosures").text
    assert "<svg" in page and "Disclosures per recipient over time" in page
    allowed = entries(node, ("disclosure",))
    for recipient in ("lab", "hospital"):  # the legend counts the allowed disclosures
        n = sum(1 for e in allowed if e.data["recipient"] == recipient)
        assert f"{recipient} ({n})</li>" in page, recipient
    assert "lab" in page and "hospital" in page and "P1" in page


def test_the_entry_view_shows_every_field_its_hash_and_place_in_the_chain(node):
    make_history(node)
    denial = entries(node, ("denial",), operation="share")[0]
    page = signed_in(node).get(f"/governance/ledger/{denial.seq}").text
    head = node.archive.ledger.count()
    assert f"Entry {denial.seq} of {head} in the chain" in page
    assert denial.hash in page and denial.prev_hash in page
    assert "recomputed: matches" in page and "links to the entry before it" in page
    for key, value in denial.data.items():
        assert f"<th>{key}</th>" in page, key
        if isinstance(value, str) and value:
            assert value.replace("'", "&#39;") in page or value in page, key


def leaks(node, body: str, asked: str = "") -> list[str]:
    """The recorded data in `body`: patient IDs (other than one the request itself named),
    study UIDs, recipients, hashes."""
    secrets = ["P2", STUDY_1, STUDY_2, "Imaging Research Institute", "lab-client", "HRESCH"]
    secrets += [e.hash for e in node.archive.ledger.entries()]
    if "P1" not in asked:
        secrets.append("P1")
    body = re.sub(r'name="csrf_token" value="[^"]*"', "", body)  # random: may hold "P1"
    return [s for s in secrets if s in body]


def test_an_unsigned_browser_gets_no_page_and_no_data(node):
    make_history(node)
    client = browser(node)
    for path in PAGES:
        response = client.get(path, follow=False)
        assert response.status_code == 302, path
        assert response.headers["Location"].startswith("/governance/signin?next="), path
        assert leaks(node, response.text, path) == []
        landed = client.get(path)
        assert landed.url.split("?")[0].endswith("/governance/signin")
        assert leaks(node, landed.text, path) == [], path
    for path in EXPORTS:
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.headers["Content-Type"].startswith("text/plain")
        assert leaks(node, response.text) == [], path
    token = client.csrf()
    refused = client.post("/governance/ledger/verify", data={"csrf_token": token})
    assert refused.status_code == 401 and leaks(node, refused.text) == []


def test_a_user_without_a_role_or_with_a_disabled_account_gets_nothing(node):
    make_history(node)
    with node.archive.index.write() as conn:  # an account whose role is neither dpo nor auditor
        conn.execute(
            schema.dpo_accounts.insert().values(
                username="viewer",
                password_hash=_hash(PASSWORD),
                role="viewer",
                created_at=datetime.now(UTC),
            )
        )
    client = browser(node)
    refused = client.sign_in("viewer")
    assert refused.status_code == 403 and leaks(node, refused.text) == []
    assert client.get("/governance/disclosures").url.split("?")[0].endswith("/signin")
    assert client.get("/governance/disclosures.csv").status_code == 401

    auditor = signed_in(node, "aud1")
    assert auditor.get("/governance/disclosures").status_code == 200
    AccountStore(node.archive.index).disable("aud1")
    after = auditor.get("/governance/disclosures")
    assert after.url.split("?")[0].endswith("/governance/signin") and leaks(node, after.text) == []
    assert auditor.sign_in("aud1").status_code == 401


def _hash(password: str) -> str:
    from werkzeug.security import generate_password_hash

    return generate_password_hash(password, method="scrypt")


def test_an_auditor_reads_everything_but_cannot_verify_or_sign(node):
    make_history(node)
    auditor = signed_in(node, "aud1")
    page = auditor.get("/governance/ledger").text
    assert "Auditor (read-only)" in page and 'id="verify"' not in page
    before, marks = node.archive.ledger.count(), len(node.archive.ledger.checkpoints())
    token = auditor.csrf("/governance/ledger")
    for action in ("verify", "checkpoint"):
        refused = auditor.post(f"/governance/ledger/{action}", data={"csrf_token": token})
        assert refused.status_code == 403 and "Only the DPO role" in refused.text
    assert node.archive.ledger.count() == before
    assert len(node.archive.ledger.checkpoints()) == marks
    assert auditor.get("/governance/disclosures.csv").status_code == 200


def test_the_session_cookie_is_the_only_one_and_is_secure_httponly_strict(node):
    client = browser(node)
    first = client.get("/governance/signin")
    cookies = first.raw.headers.getlist("Set-Cookie")
    assert len(cookies) == 1
    flags = [part.strip() for part in cookies[0].split(";")]
    assert flags[0].startswith("dicomnode_dpo=")
    assert {"Secure", "HttpOnly", "SameSite=Strict", "Path=/governance"} <= set(flags)
    assert not any(f.lower().startswith(("expires", "max-age")) for f in flags)  # ends with
    signed = client.sign_in("dpo1")  # the browser session
    assert signed.status_code == 200
    # the answer to the sign-in POST set the new session with the same flags
    post = client.post(
        "/governance/signin",
        data={"username": "dpo1", "password": PASSWORD, "csrf_token": client.csrf()},
        follow=False,
    )
    assert post.status_code == 303
    flags = {part.strip() for part in post.headers["Set-Cookie"].split(";")}
    assert {"Secure", "HttpOnly", "SameSite=Strict"} <= flags
    # the DICOMweb and API answers set no cookie at all
    api = governance_api(node, "GET", "/policy", scopes=("governance.read",))
    assert "Set-Cookie" not in api.headers


def test_csrf_tokens_are_enforced_on_every_post(node):
    client = browser(node)
    client.get("/governance/signin")
    no_token = client.post("/governance/signin", data={"username": "dpo1", "password": PASSWORD})
    assert no_token.status_code == 403
    wrong = client.post(
        "/governance/signin",
        data={"username": "dpo1", "password": PASSWORD, "csrf_token": "forged"},
    )
    assert wrong.status_code == 403
    client = signed_in(node)
    before = node.archive.ledger.count()
    for data in ({}, {"csrf_token": "forged"}):
        assert client.post("/governance/ledger/verify", data=data).status_code == 403
        assert client.post("/governance/signout", data=data).status_code == 403
    assert node.archive.ledger.count() == before  # nothing was verified
    assert client.get("/governance/disclosures").status_code == 200  # still signed in
    token = client.csrf("/governance/ledger")
    assert client.post("/governance/signout", data={"csrf_token": token}).url.endswith("/signin")
    assert client.get("/governance/disclosures").url.split("?")[0].endswith("/signin")


def test_korean_labels_with_lang_ko_kept_in_the_session(node):
    client = signed_in(node)
    page = client.get("/governance/disclosures?lang=ko").text
    assert '<html lang="ko">' in page
    for key in ("nav_disclosures", "date_from", "basis", "apply_filters", "export_csv"):
        assert i18n.KO[key] in page, key
    kept = client.get("/governance/ledger").text  # no ?lang: the session remembers
    assert i18n.KO["nav_ledger"] in kept and i18n.KO["verify_now"] in kept
    back = client.get("/governance/ledger?lang=en").text
    assert "Verify the ledger now" in back
    unsigned = requests.get(
        f"http://127.0.0.1:{node.http_port}/governance/signin",
        headers={"Accept-Language": "ko-KR,ko;q=0.9,en;q=0.5"},
        timeout=30,
    )
    assert i18n.KO["sign_in"] in unsigned.text and i18n.KO["password"] in unsigned.text
    assert set(i18n.KO) == set(i18n.EN)


# --- the disclosure views -------------------------------------------------------------------


def test_filters_and_pagination_return_the_right_rows(node):
    make_history(node)
    client = signed_in(node)

    def listed(**args) -> list[int]:
        return shown_seqs(client.get(f"/governance/disclosures?{urlencode(args)}").text)

    everything = entries(node)
    assert listed(per_page=500) == [e.seq for e in everything]
    assert len(everything) == 7
    for args, expected in (
        ({"recipient": "lab"}, entries(node, recipient="lab")),
        ({"outcome": "denied"}, entries(node, outcome="denied")),
        (
            {"outcome": "allowed", "operation": "wado"},
            entries(node, outcome="allowed", operation="wado"),
        ),
        ({"purpose": "HRESCH"}, entries(node, purpose="HRESCH")),
        ({"basis": "PIPA-26"}, entries(node, basis="PIPA-26")),
        ({"patient_id": "P2"}, entries(node, patient_id="P2")),
        ({"operation": "share"}, entries(node, operation="share")),
    ):
        assert expected, args  # each filter has something to find
        assert listed(**args, per_page=500) == [e.seq for e in expected], args
        assert len(expected) < len(everything), args
    assert len(entries(node, recipient="lab")) == 4 and len(entries(node, outcome="denied")) == 3
    assert len(entries(node, patient_id="P2")) == 3  # the find of everyone, a wado, a share

    today = datetime.now(UTC).date()
    assert listed(date_from=today, date_to=today, per_page=500) == [e.seq for e in everything]
    yesterday = today - timedelta(days=1)
    assert listed(date_to=yesterday) == []
    assert listed(date_from=today + timedelta(days=1)) == []

    with_transfers = entries(node, ("disclosure", "denial", "transfer"))
    assert listed(transfers=1, per_page=500) == [e.seq for e in with_transfers]
    assert len(with_transfers) == len(everything) + 1

    pages = [listed(per_page=3, page=n) for n in (1, 2, 3)]
    assert pages == [[e.seq for e in everything[i : i + 3]] for i in (0, 3, 6)]
    third = client.get("/governance/disclosures?per_page=3&page=3").text
    assert "Page 3 of 3" in third and 'rel="next"' not in third and 'rel="prev"' in third

    bad = client.get("/governance/disclosures?date_from=yesterday")
    assert bad.status_code == 400 and "date_from" in bad.text


def test_csv_and_json_exports_equal_the_filtered_rows(node):
    make_history(node)
    client = signed_in(node)
    for args in ({"recipient": "lab"}, {"patient_id": "P1", "outcome": "allowed"}, {}):
        expected = entries(node, **args)
        response = client.get(f"/governance/disclosures.csv?{urlencode({**args, 'per_page': 1})}")
        assert response.status_code == 200
        assert response.headers["Content-Disposition"] == 'attachment; filename="disclosures.csv"'
        rows = list(csv.DictReader(io.StringIO(response.text)))
        assert [int(r["seq"]) for r in rows] == [e.seq for e in expected], args  # all pages
        for row, entry in zip(rows, expected, strict=True):
            assert row["hash"] == entry.hash and row["recipient"] == entry.data["recipient"]
            assert row["patient_ids"] == ";".join(entry.data["patient_ids"])
            assert row["basis"] == entry.data["basis"] and row["outcome"] == entry.outcome
        exported = client.get(f"/governance/disclosures.json?{urlencode(args)}").json()
        assert [e["seq"] for e in exported["entries"]] == [e.seq for e in expected]
        assert exported["entries"][0]["detail"] == expected[0].data
        page = client.get(f"/governance/disclosures?{urlencode({**args, 'per_page': 500})}")
        assert shown_seqs(page.text) == [int(r["seq"]) for r in rows]


def test_the_accounting_lists_exactly_that_patients_disclosures(node):
    make_history(node)
    node.stewardship.restrict("P2", "dpo", "data subject request")
    assert c_find(node)[0] == 0  # P2 is left out of this answer: not a disclosure of P2
    client = signed_in(node)

    def accounted(patient: str) -> list[int]:
        response = client.get(f"/governance/accounting.csv?patient_id={patient}")
        assert response.status_code == 200
        return [int(r["seq"]) for r in csv.DictReader(io.StringIO(response.text))]

    left_out = entries(node, ("disclosure",))[0]
    assert left_out.data["denied_patients"] == ["P2"]
    for patient in ("P1", "P2"):
        expected = sorted(
            e.seq
            for e in entries(node, ("disclosure",), patient_id=patient)
            if patient not in e.data["denied_patients"]
        )
        assert accounted(patient) == expected, patient
        page = client.get(f"/governance/accounting?patient_id={patient}").text
        assert sorted(shown_seqs(page)) == expected
    assert left_out.seq in accounted("P1") and left_out.seq not in accounted("P2")
    assert len(accounted("P1")) == 5 and len(accounted("P2")) == 1
    assert accounted("NOBODY") == []
    rows = list(
        csv.DictReader(io.StringIO(client.get("/governance/accounting.csv?patient_id=P2").text))
    )
    (only,) = rows
    assert only["recipient"] == "hospital" and only["operation"] == "find"
    assert "part of an answer about 2 patients" in only["what"]
    assert only["study_instance_uids"] == STUDY_2  # not P1's study from the same answer
    p1 = list(
        csv.DictReader(io.StringIO(client.get("/governance/accounting.csv?patient_id=P1").text))
    )
    share = next(r for r in p1 if r["operation"] == "share")
    assert (share["recipient"], share["deidentified"], share["deid_profile"]) == (
        "lab",
        "yes",
        "research",
    )
    summary = client.get("/governance/accounting?patient_id=P1").text
    assert "sent de-identified (profile research)" in summary
    assert "Imaging Research Institute" in summary and "HRESCH" in summary


def test_consent_history_holds_restrictions_and_destruction_records(node):
    make_history(node)
    node.stewardship.record_consent("P1", "HRESCH", "withdrawn", "dpo", evidence_ref="call")
    node.stewardship.place_hold(
        "dpo",
        "legal",
        "litigation",
        patient_id="P2",
        case_ref="2026-G-17",
        review_date=datetime.now(UTC) - timedelta(days=1),
    )
    released = node.stewardship.place_hold("dpo", "legal", "audit", study_uid=STUDY_1)
    node.stewardship.release_hold(released.id, "dpo")
    node.stewardship.restrict("P2", "dpo", "request 2026-3")
    response = requests.delete(
        f"http://127.0.0.1:{node.http_port}/dicomweb/studies/{STUDY_1}",
        headers={"Authorization": "Bearer " + _token(node, ("dicomweb.delete",))},
        timeout=30,
    )
    assert response.status_code in (200, 204), response.text
    client = signed_in(node)

    consents = client.get("/governance/consents?patient_id=P1").text
    assert consents.count("consent:P1:HRESCH:v") == 2 and "form 7" in consents
    history = node.stewardship.consent_history("P1")
    assert [c.state for c in history] == ["granted", "withdrawn"]
    for record in history:
        assert record.ref in consents

    holds = client.get("/governance/holds").text
    active, _, released_part = holds.partition("Released</h2>")
    assert "2026-G-17" in active and "review overdue" in active
    assert f"hold:{released.id}" in released_part
    pending = client.get("/governance/pending").text
    assert "2026-G-17" in pending.split("Legal holds past their review date")[1]

    restrictions = client.get("/governance/restrictions").text
    assert "request 2026-3" in restrictions.partition("Lifted</h2>")[0]

    destructions = client.get("/governance/destructions").text
    deletion = entries(node, ("deletion",))[0]
    assert f"#{deletion.seq}" in destructions and STUDY_1 in destructions
    assert deletion.data["method"] in destructions
    # the DICOMweb DELETE record names no recipients: the page reads them from the ledger
    # (the share's transfer and the research client's WADO; the hospital's own viewer is not
    # a recipient of a copy)
    row = destructions.split(f"#{deletion.seq}</a>")[1].split("</tr>")[0]
    assert '<span class="chip">lab</span>' in row and "hospital" not in row


def test_retention_compliance_and_the_sweep_s_destruction_records(node):
    """Studies whose period ran out, one under a legal hold, one expiring soon: the report
    groups them as the sweep will act, and the sweep's destruction records show rule, method
    and the recipients that had copies."""
    today = datetime.now(UTC).date()

    def studied(patient: str, study: str, day: date) -> None:
        ds = make_ct(patient_id=patient, study_uid=study, StudyDate=day.strftime("%Y%m%d"))
        dicomweb_client(node).store_instances([as_file(ds)])

    def ten_years_before(day: date) -> date:
        return day.replace(year=day.year - 10, day=min(day.day, 28))

    studied("P3", "1.2.826.0.1.3", ten_years_before(today) - timedelta(days=40))  # expired
    studied("P4", "1.2.826.0.1.4", ten_years_before(today) - timedelta(days=40))  # held
    studied("P5", "1.2.826.0.1.5", ten_years_before(today) + timedelta(days=10))  # soon
    hold = node.stewardship.place_hold("dpo", "legal", "litigation", patient_id="P4")
    node.stewardship.record_consent("P3", "HRESCH", "granted", "dpo")
    share = governance_api(
        node, "POST", "/shares", json={"recipient": "lab", "study": "1.2.826.0.1.3"}
    )
    assert share.status_code == 200, share.text
    client = signed_in(node)

    report = client.get("/governance/retention").text
    due, _, rest = report.partition("Expired but kept: legal hold")
    held, _, rest = rest.partition("Expiring within 30 days")
    soon, _, kept = rest.partition("Within their retention period")
    assert "1.2.826.0.1.3" in due and "images-10y" in due
    assert "1.2.826.0.1.4" in held and hold.ref in held
    assert "1.2.826.0.1.5" in soon
    assert STUDY_1 in kept and STUDY_2 in kept
    exported = list(csv.DictReader(io.StringIO(client.get("/governance/retention.csv").text)))
    status = node.stewardship.retention_status()
    assert [(r["study_instance_uid"], r["action"]) for r in exported] == [
        (i.study_instance_uid, i.action) for i in status
    ]
    assert "1.2.826.0.1.3" in client.get("/governance/pending").text.split("Due for destruction")[1]

    node.stewardship.retention_sweep("dicomnode:retention")
    destructions = client.get("/governance/destructions").text
    done = entries(node, ("deletion",), outcome="done")
    skipped = entries(node, ("deletion",), outcome="skipped")
    assert [e.data["study_instance_uids"] for e in done] == [["1.2.826.0.1.3"]]
    assert [e.data["study_instance_uids"] for e in skipped] == [["1.2.826.0.1.4"]]
    row = destructions.split(f"#{done[0].seq}</a>")[1].split("</tr>")[0]
    assert "destroyed" in row and "images-10y" in row and done[0].data["method"] in row
    assert '<span class="chip">lab</span>' in row  # recorded by the sweep
    held_row = destructions.split(f"#{skipped[0].seq}</a>")[1].split("</tr>")[0]
    assert "kept: legal hold" in held_row
    after = client.get("/governance/retention").text.partition("Expired but kept")[0]
    assert "1.2.826.0.1.3" not in after


def _token(node, scopes) -> str:
    from tests.conftest import token_for

    return token_for(node, scopes, subject="ohif")


def test_the_record_of_processing_activities_comes_from_the_policy_in_force(node):
    client = signed_in(node)
    record = client.get("/governance/processing-record.json").json()
    policy = node.stewardship.policy_status().in_force
    assert record["policy"]["version"] == policy.version == "hospital-2026-1"
    assert record["controller"] == "Example University Hospital"
    assert record["dpo_contact"] == "dpo@hospital.example"
    assert [a["id"] for a in record["activities"]] == [a.id for a in policy.activities]
    research = next(a for a in record["activities"] if a["id"] == "research-sharing")
    assert research["purposes"] == [{"code": "HRESCH", "text": "healthcare research"}]
    assert research["lawful_basis"]["code"] == "PIPA-17-1-1" and research["recipients"] == ["lab"]
    assert research["data_categories"][0]["code"] == "received-images"
    hospital = next(a for a in record["activities"] if a["id"] == "hospital-access")
    assert hospital["recipients"] == ["hospital"]
    analysis = next(a for a in record["activities"] if a["id"] == "analysis")
    assert analysis["recipients"] == []  # processing, not a disclosure
    assert {r["id"] for r in record["recipients"]} == {"hospital", "lab"}
    assert record["transfers_abroad"] == []
    (limit,) = record["erasure_time_limits"]
    assert (limit["rule"], limit["period"], limit["from"]["code"]) == (
        "images-10y",
        "P10Y",
        "study-date",
    )
    assert any("hash-chained ledger" in m for m in record["security_measures"])
    page = client.get("/governance/processing-record").text
    assert "images-10y" in page and "Imaging Research Institute" in page


def test_policy_versions_in_force_scheduled_and_published(node):
    # a new controller widens (notice is due); material: 30 days
    later = policy_text("hospital-2026-2").replace(
        "Example University Hospital", "Example University Hospital Group", 1
    )
    published, _ = node.stewardship.publish_policy(
        (later + RETENTION).replace(
            "effective_from = 2026-01-01", "effective_from = 2026-01-01\nmaterial = true"
        ),
        "dpo",
    )
    page = signed_in(node).get("/governance/policy").text
    scheduled = page.split("Every published version")[0].split("Scheduled policy versions")[1]
    assert "hospital-2026-2" in scheduled and published.sha256 in scheduled
    assert '<td class="num">30</td>' in scheduled  # a material change: 30 days' notice
    for version in node.archive.registry.published_policies():
        assert version.sha256 in page
    assert "hospital-2026-1" in page.split("Scheduled policy versions")[0]


# --- the ledger: verify and checkpoints -----------------------------------------------------


def test_the_dpo_verifies_the_ledger_and_signs_a_checkpoint(node):
    make_history(node)
    client = signed_in(node)
    token = client.csrf("/governance/ledger")
    head = node.archive.ledger.count()
    verified = client.post("/governance/ledger/verify", data={"csrf_token": token})
    assert verified.status_code == 200
    assert f"The chain verifies: {head} entries" in verified.text
    assert f"Verified up to entry {head} at" in verified.text
    recorded = node.archive.ledger.count()
    assert recorded == head + 1
    last = list(node.archive.ledger.entries(after=head))[0]
    assert (last.kind, last.outcome, last.actor) == ("checkpoint", "verified", "dpo:dpo1")

    signed = client.post("/governance/ledger/checkpoint", data={"csrf_token": token})
    assert f"Checkpoint of entry {recorded} signed." in signed.text
    assert "signed by this node&#39;s key" in signed.text or "signed by this node's key" in (
        signed.text
    )
    again = client.post("/governance/ledger/checkpoint", data={"csrf_token": token})
    assert "already signed" in again.text

    drop_append_only_triggers(node.archive.engine)
    with node.archive.engine.begin() as conn:  # someone edits a disclosure
        conn.execute(
            text("UPDATE ledger_entries SET detail = :d WHERE seq = :s"),
            {"d": '{"recipient": "nobody"}', "s": 3},
        )
    broken = client.post("/governance/ledger/verify", data={"csrf_token": token})
    assert "The chain is BROKEN at entry 3" in broken.text
    assert "found broken at entry 3" in client.get("/governance/").text
    entry = client.get("/governance/ledger/3").text
    assert "recomputed: DIFFERS" in entry


# --- sign-in: lockout, logs, the CLI, OIDC ------------------------------------------------


def test_repeated_failures_lock_the_account_and_every_attempt_is_logged(node, caplog):
    caplog.set_level(logging.INFO, logger="dicomnode.dpo")
    client = browser(node)
    for _ in range(node.settings.dpo.max_failed_signins):
        assert client.sign_in("dpo1", "wrong password!!").status_code == 401
    locked = client.sign_in("dpo1")  # the right password, but locked now
    assert locked.status_code == 429 and "locked" in locked.text
    assert client.get("/governance/disclosures").url.split("?")[0].endswith("/signin")
    events = [r for r in caplog.records if getattr(r, "event", "") == "dpo_signin"]
    assert [(e.outcome, e.user) for e in events] == [("failure", "dpo1")] * 6
    assert events[-1].reason == "locked after repeated failures"
    assert "now locked" in events[-2].reason and events[0].reason == "wrong password"
    assert all(e.address == "127.0.0.1" for e in events)
    assert signed_in(node, "aud1")  # another account is not locked
    success = [r for r in caplog.records if getattr(r, "event", "") == "dpo_signin"][-1]
    assert (success.outcome, success.user, success.role) == ("success", "aud1", "auditor")


def authentication_messages(node) -> list[tuple[str, str, str]]:
    """(event type, outcome, user) of each User Authentication audit message (DCM 110114)
    spooled, and each Audit Log Used message (110101) as ("log-used", outcome, user)."""
    from lxml import etree

    node.audit.stop_writer()  # spool what was submitted
    node.audit.start_writer()
    found = []
    for path in node.audit.pending():
        document = etree.parse(str(path))
        event = document.find("EventIdentification")
        code = event.find("EventID").get("csd-code")
        if code not in ("110114", "110101"):
            continue
        requestor = next(
            p for p in document.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"
        )
        if code == "110114":
            kind = event.find("EventTypeCode").get("csd-code")
            found.append((kind, event.get("EventOutcomeIndicator"), requestor.get("UserID")))
        else:
            found.append(("log-used", event.get("EventOutcomeIndicator"), requestor.get("UserID")))
    return found


def test_sign_ins_sign_outs_and_exports_write_audit_messages(node):
    client = browser(node)
    assert client.sign_in("dpo1", "not the password").status_code == 401
    client = signed_in(node)
    assert client.get("/governance/disclosures.csv").status_code == 200
    token = client.csrf("/governance/ledger")
    assert client.post("/governance/signout", data={"csrf_token": token}).status_code == 200
    login, logout, failure, success = "110122", "110123", "4", "0"
    assert authentication_messages(node) == [
        (login, failure, "dpo1"),
        (login, success, "dpo1"),
        ("log-used", success, "dpo1"),
        (logout, success, "dpo1"),
    ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the CLI: any index
def test_cli_adds_lists_and_disables_accounts(node):
    config = str(node.settings.source)

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dicomnode.cli", "dpo", "user", *args, "--config", config],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    added = cli("add", "lee", "--role", "auditor", "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0 and "account lee (auditor) added" in added.stdout
    assert cli("add", "lee", "--role", "dpo", "--password-stdin", stdin=PASSWORD).returncode == 1
    short = cli("add", "park", "--role", "dpo", "--password-stdin", stdin="short\n")
    assert short.returncode == 1 and "at least 12 characters" in short.stderr
    assert cli("add", "x", "--role", "admin", "--password-stdin").returncode == 2
    listed = cli("list")
    assert re.search(r"^lee\s+auditor", listed.stdout, re.M)
    assert re.search(r"^dpo1\s+dpo", listed.stdout, re.M) and "park" not in listed.stdout
    client = signed_in(node, "lee")
    assert cli("disable", "lee").returncode == 0
    assert "disabled" in cli("list").stdout.split("lee", 1)[1].splitlines()[0]
    assert client.get("/governance/").url.split("?")[0].endswith("/signin")
    assert browser(node).sign_in("lee").status_code == 401
    assert cli("disable", "nobody").returncode == 1


class Provider:
    """A small OpenID Connect provider on 127.0.0.1 for the sign-in test: authorization code
    flow, RS256 ID tokens from its own key, and the claims of whoever `next_user` names."""

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, private=True, parameters={"kid": "op-1"})
        self.client_id, self.secret = "dicomnode-dpo", "s3cret-" + uuid.uuid4().hex
        self.next_user: dict = {}
        self.codes: dict[str, dict] = {}
        app = Flask("provider")
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.issuer = f"http://127.0.0.1:{self.server.server_port}"

        @app.get("/.well-known/openid-configuration")
        def discovery():
            return jsonify(
                issuer=self.issuer,
                authorization_endpoint=f"{self.issuer}/authorize",
                token_endpoint=f"{self.issuer}/token",
                jwks_uri=f"{self.issuer}/jwks",
                response_types_supported=["code"],
                subject_types_supported=["public"],
                id_token_signing_alg_values_supported=["RS256"],
            )

        @app.get("/authorize")
        def authorize():
            args = flask_request.args
            assert args["client_id"] == self.client_id and args["response_type"] == "code"
            code = uuid.uuid4().hex
            self.codes[code] = {"nonce": args.get("nonce"), "claims": dict(self.next_user)}
            return redirect(
                f"{args['redirect_uri']}?{urlencode({'code': code, 'state': args['state']})}"
            )

        @app.post("/token")
        def token():
            granted = self.codes.pop(flask_request.form["code"])
            now = int(time.time())
            claims = {
                "iss": self.issuer,
                "aud": self.client_id,
                "iat": now,
                "exp": now + 300,
                "nonce": granted["nonce"],
                **granted["claims"],
            }
            id_token = jwt.encode({"alg": "RS256", "kid": "op-1"}, claims, self.key)
            return jsonify(
                access_token=uuid.uuid4().hex,
                token_type="Bearer",
                expires_in=300,
                id_token=id_token,
            )

        @app.get("/jwks")
        def jwks():
            return jsonify(KeySet([self.key]).as_dict(private=False))

        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def provider():
    op = Provider()
    yield op
    op.stop()


def test_sign_in_through_the_hospitals_oidc_provider(start_node, provider, tmp_path):
    secret = tmp_path / "oidc-secret"
    secret.write_text(provider.secret + "\n")
    node = start_node(
        extra=(
            "[dpo]\n"
            f'oidc_issuer = "{provider.issuer}"\n'
            f'oidc_client_id = "{provider.client_id}"\n'
            f'oidc_client_secret_file = "{secret}"\n'
            'oidc_role_claim = "realm_access.roles"\n'
            'oidc_dpo_values = ["privacy-officer"]\n'
            'oidc_auditor_values = ["internal-audit"]\n'
        )
    )
    client = browser(node)
    assert "Sign in with the hospital account" in client.get("/governance/signin").text

    provider.next_user = {
        "sub": "u-1",
        "preferred_username": "choi",
        "realm_access": {"roles": ["privacy-officer"]},
    }
    start = client.get("/governance/oidc/login?next=/governance/ledger", follow=False)
    assert start.status_code == 302 and start.headers["Location"].startswith(provider.issuer)
    assert "SameSite=Lax" in start.headers["Set-Cookie"]  # survives the provider's redirect
    landed = client.get(start.headers["Location"])
    assert landed.status_code == 200 and landed.url.endswith("/governance/ledger")
    assert "choi" in landed.text and 'id="verify"' in landed.text  # a DPO

    nurse = browser(node)
    provider.next_user = {
        "sub": "u-2",
        "preferred_username": "han",
        "realm_access": {"roles": ["nurse"]},
    }
    refused = nurse.get("/governance/oidc/login")
    assert refused.status_code == 403 and "neither the DPO nor the auditor role" in refused.text
    assert nurse.get("/governance/disclosures").url.split("?")[0].endswith("/signin")
    assert nurse.get("/governance/disclosures.csv").status_code == 401

    forged = browser(node)
    forged.get("/governance/signin")
    bad_state = forged.get("/governance/oidc/callback?code=x&state=forged")
    assert bad_state.status_code == 401
