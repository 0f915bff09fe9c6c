"""The pseudonymised-data register page and its exports (checklist items 27 and 36): one row
per pseudonymised disclosure with the items of PIPA Decree Art. 29-5(2), the date its data were
destroyed and how long the record is kept (destruction + 3 years, PIPA Art. 28-4(3)).

CSV and JSON exports with English or Korean labels (the page's language, ``?lang=ko``). No
pseudonym, replacement UID or key appears here (PIPA Art. 28-4(1))."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g

from dicomnode.dicomweb.dpo import records
from dicomnode.dicomweb.dpo.approvals_views import label
from dicomnode.dicomweb.dpo.views import download, json_array, log_used, page
from dicomnode.oversight.pseudonymised import COLUMNS, PseudonymisedRecords

EXTENSION_KEY = "dicomnode_pseudonymised"

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "nav_pseudonymised": "Pseudonymised data",
        "ps_intro": "One record per pseudonymised disclosure (PIPA Enforcement Decree Art. "
        "29-5(2)). A record is kept until 3 years after its pseudonymised data are destroyed "
        "(PIPA Art. 28-4(3)). The re-identification key is kept apart, in the node's key "
        "store; no pseudonym is shown here (PIPA Art. 28-4(1)).",
        "ps_open": "Pseudonymised data not known to be destroyed",
        "ps_destroyed": "Pseudonymised data destroyed",
        "ps_col_record": "Record",
        "ps_col_delivery": "Delivery",
        "ps_col_processed_at": "Pseudonymised and provided at",
        "ps_col_processed_by": "Processed by (requested by)",
        "ps_col_purpose": "Purpose of processing",
        "ps_col_activity": "Activity",
        "ps_col_basis": "Lawful basis",
        "ps_col_recipient": "Recipient (third party)",
        "ps_col_recipient_name": "Recipient name",
        "ps_col_recipient_country": "Recipient country",
        "ps_col_items": "Items pseudonymised",
        "ps_col_profile": "De-identification profile",
        "ps_col_method_codes": "Method codes (CID 7050)",
        "ps_col_table_edition": "PS3.15 table edition",
        "ps_col_patient_ids": "Data subjects (original Patient IDs)",
        "ps_col_study_instance_uid": "Study (original UID)",
        "ps_col_instances": "Objects pseudonymised",
        "ps_col_instances_sent": "Objects provided",
        "ps_col_withheld": "Objects withheld",
        "ps_col_period_start": "Processing period from",
        "ps_col_period_end": "Processing period to",
        "ps_col_period": "Retention promised by the recipient",
        "ps_col_policy_version": "Policy version",
        "ps_col_destroyed_at": "Pseudonymised data destroyed at",
        "ps_col_destroyed_how": "How destruction is known",
        "ps_col_keep_until": "Record kept until",
        "ps_how_study-destroyed": "the source study was destroyed at the node",
        "ps_how_recipient-confirmed": "the recipient confirmed destruction",
        "ps_export_csv": "CSV",
        "ps_export_json": "JSON",
        "ps_item_patient-id": "Patient ID",
        "ps_item_uids": "UIDs",
        "ps_item_dates": "dates",
        "ps_item_direct-identifiers": "names and other direct identifiers",
        "ps_item_private-attributes": "private attributes",
        "ps_item_device-identity": "device identity",
        "ps_item_institution-identity": "institution identity",
        "ps_item_patient-characteristics": "patient characteristics",
        "ps_how_keyed-pseudonym": "keyed pseudonym",
        "ps_how_keyed-replacement": "keyed replacement",
        "ps_how_shifted-per-patient": "shifted per patient",
        "ps_how_removed": "removed",
        "ps_how_kept": "kept",
        "ps_how_safe-kept": "safe ones kept",
    },
    "ko": {
        "nav_pseudonymised": "가명정보",
        "ps_intro": "가명정보를 제공할 때마다 한 건씩 기록합니다(개인정보 보호법 시행령 제29조의5 "
        "제2항). 기록은 가명정보를 파기한 날부터 3년이 지날 때까지 보관합니다(법 제28조의4 "
        "제3항). 재식별에 쓰일 수 있는 키는 노드의 키 저장소에 분리하여 보관하며, 이 화면에는 "
        "가명이 표시되지 않습니다(법 제28조의4 제1항).",
        "ps_open": "파기가 확인되지 않은 가명정보",
        "ps_destroyed": "파기된 가명정보",
        "ps_col_record": "기록 번호",
        "ps_col_delivery": "전송 번호",
        "ps_col_processed_at": "가명처리·제공 일시",
        "ps_col_processed_by": "처리자(요청자)",
        "ps_col_purpose": "가명정보의 처리 목적",
        "ps_col_activity": "처리 활동",
        "ps_col_basis": "법적 근거",
        "ps_col_recipient": "제공받는 자(제3자)",
        "ps_col_recipient_name": "제공받는 자 명칭",
        "ps_col_recipient_country": "제공받는 자 국가",
        "ps_col_items": "가명처리한 개인정보의 항목",
        "ps_col_profile": "가명처리 프로파일",
        "ps_col_method_codes": "처리 방법 코드(CID 7050)",
        "ps_col_table_edition": "PS3.15 표 판",
        "ps_col_patient_ids": "정보주체(원래 환자 ID)",
        "ps_col_study_instance_uid": "검사(원래 UID)",
        "ps_col_instances": "가명처리한 객체 수",
        "ps_col_instances_sent": "제공한 객체 수",
        "ps_col_withheld": "보류한 객체 수",
        "ps_col_period_start": "처리 기간 시작",
        "ps_col_period_end": "처리 기간 종료",
        "ps_col_period": "제공받는 자가 약속한 보유 기간",
        "ps_col_policy_version": "정책 버전",
        "ps_col_destroyed_at": "가명정보 파기 일시",
        "ps_col_destroyed_how": "파기 확인 근거",
        "ps_col_keep_until": "기록 보관 기한",
        "ps_how_study-destroyed": "노드에서 원본 검사를 파기함",
        "ps_how_recipient-confirmed": "제공받는 자가 파기를 확인함",
        "ps_export_csv": "CSV",
        "ps_export_json": "JSON",
        "ps_item_patient-id": "환자 ID",
        "ps_item_uids": "UID",
        "ps_item_dates": "날짜",
        "ps_item_direct-identifiers": "이름 등 직접 식별자",
        "ps_item_private-attributes": "사설 속성",
        "ps_item_device-identity": "장비 식별 정보",
        "ps_item_institution-identity": "기관 식별 정보",
        "ps_item_patient-characteristics": "환자 특성",
        "ps_how_keyed-pseudonym": "키 기반 가명",
        "ps_how_keyed-replacement": "키 기반 대체",
        "ps_how_shifted-per-patient": "환자별 이동",
        "ps_how_removed": "삭제",
        "ps_how_kept": "유지",
        "ps_how_safe-kept": "안전한 것만 유지",
    },
}


def service() -> PseudonymisedRecords:
    return current_app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]


def column_labels(lang: str) -> list[str]:
    """The export's column labels in `lang`."""
    return [label(lang, f"ps_col_{c}") for c in COLUMNS]


def item_text(lang: str, item: str) -> str:
    """An "item:treatment" pair of a record in words, in `lang`."""
    name, _, how = item.partition(":")
    return f"{label(lang, 'ps_item_' + name)}: {label(lang, 'ps_how_' + how)}"


def _csv(rows: list[dict[str, Any]], lang: str) -> Iterator[str]:
    lines = records.csv_lines(COLUMNS, rows)
    next(lines)  # the keys' header, replaced by the labels'
    yield next(records.csv_lines(tuple(column_labels(lang)), []))
    yield from lines


def install_pseudonymised(bp: Blueprint, app: Flask, node: Any) -> None:
    """The register's page and exports on the DPO blueprint."""
    app.extensions[EXTENSION_KEY] = PseudonymisedRecords(node.stewardship)

    @bp.get("/pseudonymised")
    def pseudonymised() -> Any:
        rows = service().rows()
        return page(
            "pseudonymised.html",
            open_rows=[r for r in rows if not r["destroyed_at"]],
            destroyed_rows=[r for r in rows if r["destroyed_at"]],
            item_text=lambda item: item_text(g.lang, item),
        )

    @bp.get("/pseudonymised.csv")
    def pseudonymised_csv() -> Response:
        log_used("pseudonymised-data register CSV export")
        return download(_csv(service().rows(), g.lang), "pseudonymised-register.csv", "text/csv")

    @bp.get("/pseudonymised.json")
    def pseudonymised_json() -> Response:
        log_used("pseudonymised-data register JSON export")
        head = {
            "register": "PIPA Enforcement Decree Art. 29-5(2)",
            "kept": "until 3 years after the pseudonymised data are destroyed (PIPA Art. 28-4(3))",
            "language": g.lang,
            "labels": dict(zip(COLUMNS, column_labels(g.lang), strict=True)),
        }
        return download(
            json_array(head, "records", iter(service().rows())),
            "pseudonymised-register.json",
            "application/json",
        )
