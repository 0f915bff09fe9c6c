"""Four-eyes on the DPO pages in a real browser (Debian's headless Chromium through Playwright),
in English and Korean: the DPO names a deputy, asks for an erasure, and is refused when approving
their own request; the deputy, in Korean, is refused approving their own hold release, then
approves the DPO's erasure, which is carried out; the DPO approves the deputy's release. Both
people are in the ledger for each request."""

from __future__ import annotations

import pytest

from dicomnode.archive.accounts import AccountStore
from tests.test_dpo_browser import chromium, shots  # noqa: F401 (fixtures)
from tests.test_dpo_pages import PASSWORD, STUDY_1, prepared_node
from tests.test_governance_node import c_find, governance_api

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def node(start_node, storescp):
    node = prepared_node(start_node, storescp("RESEARCH"))
    AccountStore(node.archive.index).add("dep1", PASSWORD, "auditor", "Park Ji-ho")
    return node


def sign_in(browser, base: str, username: str, locale: str):
    context = browser.new_context(locale=locale)
    page = context.new_page()
    page.goto(f"{base}/governance/approvals")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("form[action='/governance/signin'] button[type=submit]")
    page.wait_for_url(f"{base}/governance/approvals")
    return context, page


def request_id_of(page) -> int:
    return int(page.url.rsplit("/", 1)[1])


def test_four_eyes_in_the_browser_in_english_and_korean(node, chromium, shots):  # noqa: F811
    base = f"http://127.0.0.1:{node.http_port}"
    hold = node.stewardship.place_hold("dpo:dpo1", "legal", "claim 12", patient_id="P1")

    # --- the DPO, in English ------------------------------------------------------------------
    dpo_context, dpo = sign_in(chromium, base, "dpo1", "en-US")
    assert "Four-eyes is not in force" in dpo.inner_text("#four-eyes-state")
    dpo.fill("#name-deputy input[name=name]", "dep1")
    dpo.click("#name-deputy button[type=submit]")
    dpo.wait_for_url(f"{base}/governance/approvals")
    assert "Four-eyes is in force" in dpo.inner_text("#four-eyes-state")
    assert "dep1" in dpo.inner_text("#deputies")
    dpo.fill("#ask-erase input[name=patient_id]", "P2")
    dpo.click("#ask-erase button[type=submit]")
    dpo.wait_for_url(f"{base}/governance/approvals/*")
    erase_id = request_id_of(dpo)
    assert dpo.inner_text("#request-state") == "pending"
    assert dpo.inner_text("#requested-by").startswith("dpo:dpo1")
    assert "This is your own request" in dpo.inner_text("#own-request")
    shots(dpo, "four-eyes-01-pending-en")
    dpo.click("#approve button[type=submit]")
    refusal = dpo.inner_text("main")
    assert "Refused: nobody approves or rejects their own request" in refusal
    shots(dpo, "four-eyes-02-self-approval-refused-en")
    assert len(c_find(node, PatientID="P2")[1]) == 1  # not erased

    # --- the deputy, in Korean ----------------------------------------------------------------
    dep_context, dep = sign_in(chromium, base, "dep1", "ko-KR")
    assert "이중 승인이 적용 중입니다" in dep.inner_text("#four-eyes-state")
    dep.fill("#ask-release-hold input[name=hold_id]", str(hold.id))
    dep.click("#ask-release-hold button[type=submit]")
    dep.wait_for_url(f"{base}/governance/approvals/*")
    release_id = request_id_of(dep)
    assert dep.inner_text("#request-state") == "대기"
    dep.click("#approve button[type=submit]")
    assert "거부됨: 누구도 자신의 요청을 승인하거나 거부할 수 없습니다" in dep.inner_text("main")
    shots(dep, "four-eyes-03-self-approval-refused-ko")
    assert node.archive.registry.holds(active_only=True)[0].id == hold.id  # still held

    dep.goto(f"{base}/governance/approvals/{erase_id}")
    assert "승인하고 실행" in dep.inner_text("#approve")
    dep.fill("#approve input[name=note]", "신원 확인함")
    dep.click("#approve button[type=submit]")
    dep.wait_for_url(f"{base}/governance/approvals/{erase_id}")
    assert dep.inner_text("#request-state") == "승인되어 실행됨"
    assert dep.inner_text("#decided-by").startswith("dpo:dep1")
    shots(dep, "four-eyes-04-approved-ko")
    assert c_find(node, PatientID="P2")[1] == []  # erased by the approval
    assert len(c_find(node, PatientID="P1")[1]) == 1

    # --- the DPO approves the deputy's request -------------------------------------------------
    dpo.goto(f"{base}/governance/approvals/{release_id}")
    dpo.click("#approve button[type=submit]")
    dpo.wait_for_url(f"{base}/governance/approvals/{release_id}")
    assert dpo.inner_text("#request-state") == "approved and carried out"
    assert node.archive.registry.holds(active_only=True) == []
    dpo.goto(f"{base}/governance/approvals")
    decided = dpo.inner_text("table.approvals >> nth=1")
    assert f"approval-{erase_id}" in decided and f"approval-{release_id}" in decided
    shots(dpo, "four-eyes-05-list-en")

    ledger = [e for e in node.archive.ledger.entries() if e.kind == "approval"]
    by_request = {
        rid: [(e.outcome, e.actor) for e in ledger if e.data.get("request") == rid]
        for rid in (erase_id, release_id)
    }
    assert by_request[erase_id] == [
        ("requested", "dpo:dpo1"),
        ("refused", "dpo:dpo1"),
        ("approved", "dpo:dep1"),
        ("carried-out", "dpo:dep1"),
    ]
    assert by_request[release_id] == [
        ("requested", "dpo:dep1"),
        ("refused", "dpo:dep1"),
        ("approved", "dpo:dpo1"),
        ("carried-out", "dpo:dpo1"),
    ]
    dpo_context.close()
    dep_context.close()


def test_break_glass_share_links_and_recipients_pages_in_the_browser(node, chromium, shots):  # noqa: F811
    """The other oversight pages in Chromium: the DPO opens a break-glass grant for a
    clinician and reviews it (English), creates a share link that is shown once and revokes it,
    and reads the recipients' copies page in Korean."""
    base = f"http://127.0.0.1:{node.http_port}"
    context, page = sign_in(chromium, base, "dpo1", "en-US")
    page.goto(f"{base}/governance/break-glass")
    page.fill("#open-grant input[name=requester]", "er-doctor")
    page.fill("#open-grant input[name=patient_id]", "P1")
    page.fill("#open-grant input[name=reason]", "trauma bay, prior CT needed now")
    page.click("#open-grant button[type=submit]")
    page.wait_for_url(f"{base}/governance/break-glass")
    assert "1 grants wait for the DPO" in page.inner_text("#unreviewed")
    row = page.locator("tr#break-glass-1")
    assert "er-doctor" in row.inner_text() and "not reviewed" in row.inner_text()
    shots(page, "oversight-01-break-glass-en")
    row.locator("input[name=note]").fill("called the ED: justified")
    row.locator("button[type=submit]").click()
    page.wait_for_url(f"{base}/governance/break-glass")
    assert "Reviewed: dpo:dpo1" in page.locator("tr#break-glass-1").inner_text()
    assert page.locator("#unreviewed").count() == 0

    page.goto(f"{base}/governance/share-links")
    page.fill("#create-link input[name=study]", "1.2.826.0.1.1")
    page.fill("#create-link input[name=recipient]", "lab")
    page.click("#create-link button[type=submit]")
    link = page.inner_text("#new-link")
    assert "/share/" in link and link.endswith("/studies/1.2.826.0.1.1")
    shots(page, "oversight-02-share-link-en")
    page.goto(f"{base}/governance/share-links")
    assert page.locator("#new-link").count() == 0  # shown once
    page.click("tr#share-link-1 button[type=submit]")
    assert "revoked" in page.inner_text("tr#share-link-1")

    page.goto(f"{base}/governance/recipients?lang=ko")
    assert "수령자가 보유한 사본" in page.inner_text("main")
    assert "수령자에게 보낼 통지" in page.inner_text("main")
    shots(page, "oversight-03-recipients-ko")
    page.goto(f"{base}/governance/break-glass")  # the language is kept in the session
    assert "긴급 접근" in page.inner_text("h1") and "검토됨" in page.inner_text("tr#break-glass-1")
    context.close()
    kinds = [
        (e.kind, e.outcome)
        for e in node.archive.ledger.entries()
        if e.kind in ("break_glass", "share_link")
    ]
    assert kinds == [
        ("break_glass", "granted"),
        ("break_glass", "reviewed"),
        ("share_link", "created"),
        ("share_link", "revoked"),
    ]


PSEUDONYMISED_COLUMNS = {
    "en": [
        "Record",
        "Pseudonymised and provided at",
        "Processed by (requested by)",
        "Purpose of processing",
        "Recipient (third party)",
        "Items pseudonymised",
        "De-identification profile",
        "Study (original UID)",
        "Objects provided",
        "Processing period to",
        "Pseudonymised data destroyed at",
        "Record kept until",
    ],
    "ko": [
        "기록 번호",
        "가명처리·제공 일시",
        "처리자(요청자)",
        "가명정보의 처리 목적",
        "제공받는 자(제3자)",
        "가명처리한 개인정보의 항목",
        "가명처리 프로파일",
        "검사(원래 UID)",
        "제공한 객체 수",
        "처리 기간 종료",
        "가명정보 파기 일시",
        "기록 보관 기한",
    ],
}
HEADINGS = {
    "automated-decisions": {
        "en": [
            "Automated decisions",
            "AI output types",
            "Refusal and explanation requests (flagged AI outputs)",
        ],
        "ko": ["자동화된 결정", "AI 결과 유형", "거부 및 설명 요구(표시된 AI 결과)"],
    },
    "pseudonymised": {
        "en": [
            "Pseudonymised data",
            "Pseudonymised data not known to be destroyed",
            "Pseudonymised data destroyed",
        ],
        "ko": ["가명정보", "파기가 확인되지 않은 가명정보", "파기된 가명정보"],
    },
}
NAV_LINKS = {
    "en": {"automated-decisions": "Automated decisions", "pseudonymised": "Pseudonymised data"},
    "ko": {"automated-decisions": "자동화된 결정", "pseudonymised": "가명정보"},
}


def open_from_top_nav(page, base: str, lang: str, slug: str) -> None:
    """Follow the main navigation bar's link to /governance/`slug`, found by its label."""
    link = page.locator("header.top nav").get_by_role(
        "link", name=NAV_LINKS[lang][slug], exact=True
    )
    link.click()
    page.wait_for_url(f"{base}/governance/{slug}")
    current = page.locator("header.top nav a[aria-current=page]")
    assert current.inner_text() == NAV_LINKS[lang][slug]


def headings(page) -> list[str]:
    return [h.strip() for h in page.locator("main h1, main h2").all_inner_texts()]


def test_automated_decisions_and_pseudonymised_register_pages_in_the_browser(node, chromium, shots):  # noqa: F811
    """The DPO opens the automated-decisions page (PIPA 37-2: the built-in analyzers' criteria)
    and the pseudonymised-data register (items 27 and 36, with the record of one de-identified
    share) from the main navigation bar, in English and then in Korean."""
    node.stewardship.record_consent("P1", "HRESCH", "granted", "dpo", evidence_ref="form 7")
    share = governance_api(node, "POST", "/shares", json={"recipient": "lab", "study": STUDY_1})
    assert share.status_code == 200, share.text  # de-identified to the research PACS: a record
    base = f"http://127.0.0.1:{node.http_port}"
    context, page = sign_in(chromium, base, "dpo1", "en-US")

    for lang in ("en", "ko"):
        if lang == "ko":
            page.goto(f"{base}/governance/approvals?lang=ko")  # kept in the session from here
        open_from_top_nav(page, base, lang, "automated-decisions")
        assert headings(page)[:3] == HEADINGS["automated-decisions"][lang]
        lung = page.inner_text("#output-ct-lung pre.criteria")
        qca = page.inner_text("#output-xa-qca pre.criteria")
        for part in ("body and lungs", "-400 HU", "No trained model", "research use only"):
            assert part in lung, part
        for part in ("%DS", "minimal lumen diameter", "interpolated reference line"):
            assert part in qca, part
        writes = page.inner_text("#output-xa-qca")
        assert "Segmentation (SEG), Comprehensive SR" in writes
        source = {"en": "text of the analyzer", "ko": "분석기 제공 문구"}[lang]
        assert source in writes and source in page.inner_text("#output-ct-lung")
        assert page.inner_text("table.flags tbody") == {"en": "None.", "ko": "없음."}[lang]
        shots(page, f"governance-01-automated-decisions-{lang}")

        open_from_top_nav(page, base, lang, "pseudonymised")
        assert headings(page) == HEADINGS["pseudonymised"][lang]
        for table in ("#open", "#destroyed"):
            columns = page.locator(f"table{table} thead th").all_inner_texts()
            assert columns == PSEUDONYMISED_COLUMNS[lang], (table, columns)
        (record,) = page.locator("table#open tr.record").all()
        cells = record.locator("td").all_inner_texts()
        assert cells[0] == "1" and "lab" in cells[4]
        assert cells[7].startswith(STUDY_1) and cells[7].endswith("P1")  # original UID, subject
        assert {"en": "Patient ID: keyed pseudonym", "ko": "환자 ID: 키 기반 가명"}[lang] in cells[
            5
        ]
        assert page.locator("table#destroyed tr.record").count() == 0
        shots(page, f"governance-02-pseudonymised-{lang}")

    for slug in ("automated-decisions", "pseudonymised"):  # Korean: no English heading left
        page.goto(f"{base}/governance/{slug}")
        shown = headings(page)
        assert not {h for h in shown for en in HEADINGS[slug]["en"] if en in h}, shown
    context.close()
