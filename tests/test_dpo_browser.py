"""The DPO's pages in a real browser: Debian's headless Chromium driven by Playwright (never
`playwright install`; .ci/run installs the chromium package). A DPO signs in, filters the
disclosures, opens an entry, downloads the CSV export and verifies the ledger; a browser that
has not signed in is sent to the sign-in page and sees no data.

Set DPO_SCREENSHOTS to a folder to keep a screenshot of each page visited (default: the
test's temporary folder)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from tests.test_dpo_pages import PAGES, entries, leaks, make_history, prepared_node

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# One back end is enough for the browser; test_dpo_pages covers both.
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def node(start_node, storescp):
    return prepared_node(start_node, storescp("RESEARCH"))


@pytest.fixture
def chromium():
    assert Path(CHROMIUM).is_file(), (
        f"{CHROMIUM} is missing: the browser tests need Debian's chromium package "
        "(apt-get install chromium; .ci/run installs it)"
    )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("DPO_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)

    def shoot(page, name: str) -> None:
        page.screenshot(path=str(folder / f"{name}.png"), full_page=True)

    return shoot


def test_a_dpo_signs_in_filters_opens_an_entry_exports_csv_and_verifies(
    node, chromium, shots, tmp_path
):
    make_history(node)
    base = f"http://127.0.0.1:{node.http_port}"
    context = chromium.new_context(accept_downloads=True, locale="en-US")
    page = context.new_page()

    page.goto(f"{base}/governance/disclosures")
    assert "/governance/signin?next=" in page.url
    shots(page, "01-signin")
    page.fill("input[name=username]", "dpo1")
    page.fill("input[name=password]", "correct horse battery staple")
    page.click("form[action='/governance/signin'] button[type=submit]")
    page.wait_for_url(f"{base}/governance/disclosures")
    (cookie,) = context.cookies()
    assert (cookie["name"], cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (
        "dicomnode_dpo",
        True,
        True,
        "Strict",
    )
    everything = entries(node)
    assert page.locator("table.entries tbody tr").count() == len(everything)
    assert page.locator("svg.chart rect").count() >= 2  # the chart has bars
    shots(page, "02-disclosures")

    lab = entries(node, recipient="lab")
    page.select_option("select[name=recipient]", "lab")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/governance/disclosures?*recipient=lab*")
    rows = page.locator("table.entries tbody tr")
    assert rows.count() == len(lab) == 4
    assert [int(t.lstrip("#")) for t in rows.locator("td:first-child a").all_inner_texts()] == [
        e.seq for e in lab
    ]
    shots(page, "03-disclosures-lab")

    with page.expect_download() as download:
        page.click("a.export:has-text('Export CSV')")
    saved = tmp_path / "disclosures.csv"
    download.value.save_as(saved)
    assert download.value.suggested_filename == "disclosures.csv"
    with saved.open(newline="") as f:
        exported = list(csv.DictReader(f))
    assert [int(r["seq"]) for r in exported] == [e.seq for e in lab]
    assert {r["recipient"] for r in exported} == {"lab"}

    first = lab[0]
    page.click(f"table.entries a[href='/governance/ledger/{first.seq}']")
    page.wait_for_url(f"{base}/governance/ledger/{first.seq}")
    body = page.inner_text("main")
    assert first.hash in body and first.prev_hash in body
    assert f"Entry {first.seq} of {node.archive.ledger.count()} in the chain" in body
    assert "recomputed: matches" in body
    shots(page, "04-entry")

    page.goto(f"{base}/governance/ledger")
    head = node.archive.ledger.count()
    page.click("#verify")
    page.wait_for_url("**/governance/ledger?result=*")
    status = page.inner_text("main")
    assert f"The chain verifies: {head} entries" in status
    assert f"Verified up to entry {head} at" in status
    shots(page, "05-ledger-verified")
    last = list(node.archive.ledger.entries(after=head))
    assert [(e.kind, e.outcome, e.actor) for e in last] == [("checkpoint", "verified", "dpo:dpo1")]

    for name, path in (
        ("06-accounting", "/governance/accounting?patient_id=P1"),
        ("07-processing-record", "/governance/processing-record"),
        ("08-pending", "/governance/pending"),
        ("09-consents", "/governance/consents?patient_id=P1"),
        ("10-policy", "/governance/policy"),
        ("11-disclosures-ko", "/governance/disclosures?lang=ko"),
        ("12-overview-ko", "/governance/"),
    ):
        response = page.goto(base + path)
        assert response is not None and response.status == 200, path
        shots(page, name)
    assert "제공받는 자" in page.inner_text("body") or "개요" in page.inner_text("body")
    context.close()


def test_an_unsigned_browser_is_sent_to_sign_in_and_sees_no_data(node, chromium, shots):
    make_history(node)
    base = f"http://127.0.0.1:{node.http_port}"
    context = chromium.new_context(locale="ko-KR")
    page = context.new_page()
    for path in PAGES:
        page.goto(base + path)
        assert page.url.split("?")[0] == f"{base}/governance/signin", path
        assert leaks(node, page.content(), path) == [], path
    assert "로그인" in page.inner_text("main")  # Chromium's ko-KR Accept-Language
    shots(page, "13-unsigned-signin-ko")
    for path in ("/governance/disclosures.csv", "/governance/accounting.csv?patient_id=P1"):
        response = context.request.get(base + path)
        assert response.status == 401, path
        assert leaks(node, response.text(), path) == [], path
    context.close()
