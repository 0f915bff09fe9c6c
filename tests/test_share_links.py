"""Share links for a second opinion (checklist item 42): random (256 bits), stored hashed (the
database holds no plaintext token), scoped to one study, expiring, revocable, last_used
recorded, and every use a disclosure governance decides for the link's recipient and the ledger
records. On a running node: the DPO creates and revokes links on the pages; a plain HTTP client
holding the link reads the study."""

from __future__ import annotations

import hashlib
import io
import re
from datetime import timedelta

import pydicom
import pytest
import requests
from sqlalchemy import select

from dicomnode.archive.oversight_schema import share_links
from tests.conftest import WORKSTATION, dicomweb_client
from tests.factory import make_ct
from tests.test_dpo_pages import PASSWORD, signed_in
from tests.test_governance_node import as_file, policy_text, publish_days_ago

STUDY_1, STUDY_2 = "1.2.826.0.1.1", "1.2.826.0.1.2"
SECOND_OPINION = """
[[activities]]
id = "third-party-provision"
purposes = ["TREAT"]
lawful_basis = "PIPA-17-1-1"

[[recipients]]
id = "second-opinion"
name = "Dr. Lee, Seoul Radiology Clinic"
kind = "third-party"
default_purpose = "TREAT"

[[rules]]
id = "second-opinion-with-consent"
effect = "allow"
activity = "third-party-provision"
recipients = ["second-opinion"]
lawful_basis = "PIPA-17-1-1"
"""


@pytest.fixture
def node(start_node):
    return node_with(start_node, SECOND_OPINION)


def node_with(start_node, extra_policy: str):
    """A node with the hospital's policy plus `extra_policy`, P1's and P2's studies, a DPO
    (dpo1) and an auditor (aud1)."""
    from dicomnode.archive.accounts import AccountStore

    node = start_node(peers=[WORKSTATION])
    publish_days_ago(node, policy_text() + extra_policy)
    dicomweb_client(node).store_instances(
        [
            as_file(make_ct(patient_id=p, study_uid=study))
            for p, study in (("P1", STUDY_1), ("P2", STUDY_2))
        ]
    )
    accounts = AccountStore(node.archive.index)
    accounts.add("dpo1", PASSWORD, "dpo")
    accounts.add("aud1", PASSWORD, "auditor")
    return node


def create_link(client, study: str, recipient: str = "second-opinion", days: str = "7"):
    page = client.post(
        "/governance/share-links",
        data={
            "csrf_token": client.csrf("/governance/share-links"),
            "study": study,
            "recipient": recipient,
            "days": days,
        },
    )
    found = re.search(r'<code id="new-link">([^<]+)</code>', page.text)
    return page, found.group(1) if found else ""


def uses(node, link_ref: str) -> list:
    return [
        e
        for e in node.archive.ledger.entries()
        if e.kind in ("disclosure", "denial") and e.actor == link_ref
    ]


def test_a_share_link_for_a_second_opinion(node):
    dpo = signed_in(node)
    page, url = create_link(dpo, STUDY_1)
    assert page.status_code == 200 and url.endswith(f"/studies/{STUDY_1}"), page.text[-800:]
    token = url.split("/share/")[1].split("/")[0]
    assert len(token) >= 43  # 32 random bytes, urlsafe base64: 256 bits
    with node.archive.engine.connect() as conn:
        rows = [tuple(map(str, r)) for r in conn.execute(select(share_links)).all()]
    assert rows and not any(token in value for row in rows for value in row)  # hashed only
    assert rows[0][1] == hashlib.sha256(token.encode()).hexdigest()

    refused = requests.get(url, timeout=30)  # no consent to this disclosure yet
    assert refused.status_code == 403
    assert [e.outcome for e in uses(node, "share-link-1")] == ["denied"]

    node.stewardship.record_consent("P1", "TREAT", "granted", "dpo:dpo1", evidence_ref="form 9")
    listed = requests.get(url, timeout=30)
    assert listed.status_code == 200, listed.text
    assert listed.headers["Cache-Control"] == "no-store"
    (item,) = listed.json()
    got = requests.get(f"http://127.0.0.1:{node.http_port}{item['url']}", timeout=30)
    assert got.status_code == 200 and got.headers["Content-Type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(got.content))
    assert ds.StudyInstanceUID == STUDY_1 and ds.PatientID == "P1"
    allowed = [e for e in uses(node, "share-link-1") if e.outcome == "allowed"]
    assert len(allowed) == 2  # each use a ledger entry
    assert {e.data["recipient"] for e in allowed} == {"second-opinion"}
    assert all(e.data["patient_ids"] == ["P1"] for e in allowed)

    listing = dpo.get("/governance/share-links").text
    assert re.search(r'class="uses">2<', listing) and "share-link-1" in listing
    link = node.archive.engine.connect().execute(select(share_links)).first()
    assert link.last_used_at is not None and link.uses == 2

    # scoped to its study; a made-up token opens nothing
    other = url.replace(STUDY_1, STUDY_2)
    assert requests.get(other, timeout=30).status_code == 403
    forged = url.replace(token, "A" * len(token))
    assert requests.get(forged, timeout=30).status_code == 403

    # revoked: closed at once
    revoked = dpo.post(
        "/governance/share-links/1/revoke",
        data={"csrf_token": dpo.csrf("/governance/share-links")},
    )
    assert revoked.status_code == 200
    closed = requests.get(url, timeout=30)
    assert closed.status_code == 403 and "revoked" in closed.json()["detail"]
    kinds = [(e.outcome, e.actor) for e in node.archive.ledger.entries() if e.kind == "share_link"]
    assert kinds == [("created", "dpo:dpo1"), ("revoked", "dpo:dpo1")]


def test_a_link_expires_and_only_the_dpo_makes_links(node):
    dpo = signed_in(node)
    node.stewardship.record_consent("P2", "TREAT", "granted", "dpo:dpo1")
    _, url = create_link(dpo, STUDY_2, days="1")
    assert requests.get(url, timeout=30).status_code == 200
    now = node.stewardship.clock()
    node.stewardship.clock = lambda: now + timedelta(days=1, minutes=1)
    expired = requests.get(url, timeout=30)
    assert expired.status_code == 403 and "expired" in expired.json()["detail"]

    page, url = create_link(dpo, STUDY_2, days="31")  # at most 30 days
    assert page.status_code == 400 and not url
    page, url = create_link(dpo, STUDY_2, recipient="nobody")
    assert page.status_code == 400 and not url
    auditor = signed_in(node, "aud1")
    page, url = create_link(auditor, STUDY_2)
    assert page.status_code == 403 and not url
