"""The DPO's casework pages in a real browser (Debian's Chromium through Playwright, as
test_dpo_browser): a breach recorded in the form shows its deadlines with the time left, the
MSA 23-3 flag and the drafted notices; the month's review is signed off from its page; a
deletion request for a study under statutory retention is refused with its coded exemption and
notice. In English and Korean."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from dicomnode.archive.accounts import AccountStore
from tests.conftest import WORKSTATION
from tests.test_dpo_browser import chromium, shots  # noqa: F401 (fixtures)
from tests.test_dpo_pages import PASSWORD
from tests.test_governance_node import policy_text, publish_days_ago
from tests.test_retention import RETENTION, store

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def node(start_node):
    node = start_node(peers=[WORKSTATION], extra="[governance]\nretention_interval = 0")
    publish_days_ago(node, policy_text() + RETENTION)
    AccountStore(node.archive.index).add("dpo1", PASSWORD, "dpo", "Kim Min-ji")
    return node


def local_input(moment: datetime) -> str:
    """A datetime-local field's value (the pages read it as UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M")


def sign_in(chromium, node, locale: str = "en-US"):  # noqa: F811
    base = f"http://127.0.0.1:{node.http_port}"
    context = chromium.new_context(accept_downloads=True, locale=locale)
    page = context.new_page()
    page.goto(f"{base}/governance/breaches")
    page.fill("input[name=username]", "dpo1")
    page.fill("input[name=password]", PASSWORD)
    page.click("form[action='/governance/signin'] button[type=submit]")
    page.wait_for_url(f"{base}/governance/breaches")
    return base, context, page


def test_a_recorded_breach_shows_its_timers_flags_and_drafts(node, chromium, shots):  # noqa: F811
    base, context, page = sign_in(chromium, node)
    page.fill("input[name=aware_at]", local_input(datetime.now(UTC) - timedelta(hours=5)))
    page.fill("input[name=what]", "A USB stick with exported studies was lost")
    page.fill("input[name=how]", "lost on the subway")
    page.fill("input[name=subjects]", "12")
    page.fill("input[name=categories]", "images, demographics")
    page.check("input[name=emr_linked]")
    page.check("input[name=gdpr]")
    page.fill("input[name=measures]", "the stick was encrypted; key revoked")
    page.fill("input[name=contact]", "privacy@hospital.example")
    page.click("#record-breach")
    page.wait_for_url(f"{base}/governance/breaches/1")
    shots(page, "casework-01-breach")

    gdpr = page.inner_text("table.deadlines tr[data-duty='supervisory-authority'] td.timer")
    hours = int(re.fullmatch(r"(\d+) h (\d+) min left", gdpr).group(1))
    assert 66 <= hours <= 67  # 72 h from aware_at, 5 h gone
    assert page.inner_text("tr[data-duty='mohw'] td.timer") == "due immediately"
    assert "Medical Service Act 23-3" in page.inner_text("p.msa")
    assert "PIPA Decree 40(1)" in page.inner_text("p.pipc")  # images: sensitive data
    ko = page.inner_text("#draft-pipa_notice_ko pre")
    for item in (
        "유출된 개인정보의 항목: demographics, images",
        "유출된 시점과 그 경위",
        "정보주체가 할 수 있는 방법",
        "대응조치 및 피해 구제절차",
        "privacy@hospital.example",
    ):
        assert item in ko
    notification = page.inner_text("#draft-gdpr_notification pre")
    assert "(a) Nature of the breach: A USB stick" in notification
    assert "Approximate number of data subjects: 12" in notification
    assert "(d) Measures taken or proposed: the stick was encrypted" in notification
    assert "의료법 제23조의3" in page.inner_text("#draft-mohw_report pre")

    page.select_option("select[name=to]", "supervisory-authority")
    page.fill("form.notify input[name=note]", "online form, ref 42")
    page.click("#notify")
    page.wait_for_url(f"{base}/governance/breaches/1")
    assert page.inner_text("td.state") == "notified"
    assert page.inner_text("tr[data-duty='supervisory-authority'] td.timer").startswith("done")
    assert "online form, ref 42" in page.inner_text("table.notifications")
    entries = [e for e in node.archive.ledger.entries() if e.kind == "breach"]
    assert [(e.outcome, e.actor) for e in entries] == [
        ("recorded", "dpo:dpo1"),
        ("notified", "dpo:dpo1"),
    ]

    node.casework.record_breach(
        "dpo:dpo1", datetime.now(UTC) - timedelta(hours=80), "misdirected CD", gdpr=True
    )
    page.goto(f"{base}/governance/breaches")
    late = page.locator("table.breaches tbody tr.overdue")
    assert late.count() == 1 and "misdirected CD" in late.inner_text()
    assert re.search(r"overdue by 8 h \d+ min", late.inner_text())
    shots(page, "casework-02-breaches")

    page.goto(f"{base}/governance/breaches/1?lang=ko")
    body = page.inner_text("main")
    assert "보건복지부에 즉시 보고해야 합니다" in body
    assert re.search(r"\d+시간 \d+분 남음", page.inner_text("tr[data-duty='pipc'] td.timer"))
    assert page.inner_text("td.state") == "통지함"
    shots(page, "casework-03-breach-ko")
    context.close()


def test_the_month_s_review_is_signed_off_from_its_page(node, chromium, shots):  # noqa: F811
    store(node, "P1")
    base, context, page = sign_in(chromium, node, "ko-KR")
    page.goto(f"{base}/governance/review")
    assert "월간 점검" in page.inner_text("h1")
    sha = page.get_attribute("form.sign-off input[name=sha256]", "value")
    assert sha and sha in page.inner_text("code.sha")
    page.fill("input[name=finding]", "이상 없음")
    page.fill("input[name=follow_up]", "none")
    page.click("#sign-review")
    page.wait_for_url("**/governance/review?*signed=*")
    assert "점검을 확인했습니다" in page.inner_text("p.alert")
    shots(page, "casework-04-review-ko")
    (entry,) = [e for e in node.archive.ledger.entries() if e.kind == "dpo_review"]
    month = datetime.now(UTC).strftime("%Y-%m")
    assert (entry.actor, entry.data["month"], entry.data["report_sha256"]) == (
        "dpo:dpo1",
        month,
        sha,
    )
    assert entry.data["finding"] == "이상 없음"
    assert "이상 없음" in page.inner_text("table.signoffs")

    page.goto(f"{base}/governance/review?lang=en")
    with page.expect_download() as download:
        page.click("a.export:has-text('Export CSV')")
    assert download.value.suggested_filename == f"review-{month}.csv"
    context.close()


def test_a_deletion_under_statutory_retention_is_refused_on_the_tickets_page(
    node,
    chromium,  # noqa: F811
    shots,  # noqa: F811
):
    study = store(node, "P6", Modality="MG", StudyDate=datetime.now(UTC).strftime("%Y%m%d"))
    late = node.casework.open_ticket(
        "access", "P7", "dpo:dpo1", received_at=datetime.now(UTC) - timedelta(days=11)
    )
    base, context, page = sign_in(chromium, node, "ko-KR")
    page.goto(f"{base}/governance/tickets")
    assert "1건 기한 초과" in page.inner_text("p.alert")
    assert page.locator("table.tickets tr.overdue").count() == 1
    assert late.ref in page.inner_text("table.tickets tr.overdue")

    page.select_option("select[name=kind]", "deletion")
    page.fill("form.open-ticket input[name=patient_id]", "P6")
    page.fill("form.open-ticket input[name=details]", "유방촬영 영상을 삭제해 주세요")
    page.click("#open-ticket")
    page.wait_for_url(re.compile(r".*/governance/tickets/\d+$"))
    page.click("#carry-out")
    page.wait_for_url(re.compile(r".*/governance/tickets/\d+$"))
    shots(page, "casework-05-ticket-refused-ko")
    assert page.inner_text("td.state") == "거절"
    codes = page.inner_text("td.exemptions")
    assert "PIPA-36-1-proviso" in codes and study in codes and "MSA-22-2" in codes
    notice = page.inner_text("pre.notice")
    assert "삭제 요구를 다음 사유로 거절합니다" in notice and "[PIPA-36-1-proviso]" in notice
    kept = node.archive.find_instances_exactly(  # kept, in the retained store (item 33)
        (("StudyInstanceUID", study),), include_retained=True
    )
    assert len(kept) == 2 and all(i.blob_path.startswith("retained/") for i in kept)

    page.goto(page.url + "?lang=en")
    assert page.inner_text("td.state") == "refused"
    assert "is refused for the following reasons" in page.inner_text("pre.notice")
    context.close()
