"""The DPO's casework, decided from facts: breach deadlines and drafted notices, the monthly
access review, and the deadlines and exemptions of data-subject requests (those in
`subject_requests`, named here too).

Pure: every function takes the facts and the time (`now`) it is asked at; nothing here reads a
database, a clock or a file. The sources of each rule are named where it is applied:

* GDPR Art. 33(1): notify the supervisory authority without undue delay and, where feasible,
  not later than 72 hours after having become aware; 33(3) the notification's contents;
  Art. 12(3): answer a data subject's request within one month, extendable by two further
  months; Art. 17(3)(b), (c), (e): erasure does not apply where a legal obligation or public
  health requires the processing, or for legal claims.
* PIPA Art. 34(1) (개인정보 보호법): notify the data subjects "without delay" of the five items
  of 34(1) 1-5; Enforcement Decree Art. 39(1): in writing etc. within 72 hours of becoming
  aware; Decree Art. 40(1): report to the PIPC or KISA within 72 hours when (1) 1,000 or more
  data subjects, (2) sensitive or unique identifying information, or (3) unlawful access from
  outside to the processing system is involved (the proviso: no report when recovery or
  deletion has made harm markedly unlikely). Health data is sensitive information (Art. 23),
  so a leak of medical images meets condition (2).
* PIPA Arts. 35-37 with Decree Arts. 41(4), 43(3), 44(2): access, correction or deletion and
  suspension are answered within 10 days; Art. 36(1) proviso: deletion may not be asked while
  another law requires the data to be kept (e.g. the Medical Service Act's record retention,
  MSA Art. 22 with its Enforcement Rule); Art. 28-7: pseudonymised data are exempt from
  Arts. 35-37.
* Medical Service Act Art. 23-3: an electronic intrusion incident affecting electronic medical
  records is reported to the Minister of Health and Welfare immediately.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any

from dicomnode.governance.subject_requests import (  # named here for callers of `casework`
    AUTOMATED_DECISION_REQUESTS,
    EXEMPTIONS,
    REGIMES,
    TICKET_KINDS,
    TICKET_STATES,
    Exemption,
    KeptItem,
    deletion_exemptions,
    extended_due,
    refusal_notice,
    ticket_due,
    ticket_overdue,
)

# --- breaches -------------------------------------------------------------------------------

BREACH_STATES = ("open", "notified", "closed")
BREACH_TRANSITIONS = {"open": ("notified", "closed"), "notified": ("notified", "closed")}
NOTICE_WINDOW = timedelta(hours=72)  # GDPR 33(1); PIPA Decree 39(1) and 40(1)
PIPC_REPORT_SUBJECTS = 1000  # PIPA Decree 40(1)1
# Data categories PIPA treats as sensitive (Art. 23, Decree 18) or unique identifying
# information (Art. 24, Decree 19); medical images and reports are health data.
SENSITIVE_CATEGORIES = frozenset(
    {"health", "images", "reports", "analysis-results", "genetic", "biometric", "sex-life"}
)
UNIQUE_ID_CATEGORIES = frozenset(
    {"resident-registration-number", "passport-number", "driver-licence-number", "alien-number"}
)
NOTIFY_SUBJECTS, NOTIFY_AUTHORITY, REPORT_PIPC, REPORT_MOHW = (
    "subjects",
    "supervisory-authority",
    "pipc",
    "mohw",
)


@dataclass(frozen=True)
class BreachFacts:
    """What the DPO knows about an incident."""

    aware_at: datetime  # when the controller became aware (starts every clock)
    what: str  # what happened
    occurred_at: datetime | None = None  # when the leak happened, if known
    how: str = ""  # how it happened (circumstances)
    subjects: int = 0  # approximate number of data subjects
    records: int = 0  # approximate number of records (instances, studies)
    patient_ids: tuple[str, ...] = ()
    study_instance_uids: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()  # data categories: images, reports, demographics, ...
    external_access: bool = False  # unlawful access from outside (hacking)
    emr_linked: bool = False  # electronic medical records are involved (MSA 23-3)
    gdpr: bool = False  # EU data subjects, GDPR applies
    consequences: str = ""  # likely consequences
    measures: str = ""  # measures taken or proposed by the controller
    subject_actions: str = ""  # what the data subjects can do to limit the harm
    remedy: str = ""  # the controller's remedy procedure
    contact: str = ""  # the DPO's or department's contact
    risk_unlikely: bool = False  # GDPR 33(1): unlikely to result in a risk (then no report)
    harm_contained: bool = False  # Decree 40(1) proviso: recovered or deleted, harm unlikely

    @property
    def sensitive(self) -> bool:
        return bool(set(self.categories) & SENSITIVE_CATEGORIES)

    @property
    def unique_ids(self) -> bool:
        return bool(set(self.categories) & UNIQUE_ID_CATEGORIES)


@dataclass(frozen=True)
class Deadline:
    """One obligation a breach starts: to whom, by when, under which provision."""

    duty: str  # subjects | supervisory-authority | pipc | mohw
    law: str  # the provision, e.g. "GDPR 33(1)"
    due_at: datetime
    immediately: bool = False  # "immediately": due the moment the controller is aware
    why: tuple[str, ...] = ()  # the conditions that make it apply
    done_at: datetime | None = None  # when it was met (a recorded notification)

    def seconds_left(self, now: datetime) -> float:
        """Seconds until due (negative: overdue)."""
        return (self.due_at - now).total_seconds()

    def status(self, now: datetime) -> str:
        """done | late (done after the deadline) | overdue | due."""
        if self.done_at is not None:
            return "done" if self.done_at <= self.due_at else "late"
        return "overdue" if now >= self.due_at and not self.immediately else "due"

    def as_dict(self, now: datetime) -> dict[str, Any]:
        return {
            "duty": self.duty,
            "law": self.law,
            "due_at": self.due_at.isoformat(),
            "immediately": self.immediately,
            "why": list(self.why),
            "done_at": self.done_at.isoformat() if self.done_at else None,
            "status": self.status(now),
            "seconds_left": int(self.seconds_left(now)),
        }


def pipc_report_reasons(facts: BreachFacts) -> tuple[str, ...]:
    """Why PIPA Decree 40(1) requires a report to the PIPC or KISA (empty: none applies, or the
    proviso does: the leaked data was recovered or deleted and harm is markedly unlikely)."""
    if facts.harm_contained:
        return ()
    reasons = []
    if facts.subjects >= PIPC_REPORT_SUBJECTS:
        reasons.append(f"{facts.subjects} data subjects (1,000 or more: Decree 40(1)1)")
    if facts.sensitive or facts.unique_ids:
        reasons.append("sensitive or unique identifying information (Decree 40(1)2)")
    if facts.external_access:
        reasons.append("unlawful access from outside (Decree 40(1)3)")
    return tuple(reasons)


def breach_deadlines(
    facts: BreachFacts, notifications: Sequence[dict[str, Any]] = ()
) -> list[Deadline]:
    """The deadlines the incident starts, each met by the first recorded notification to its
    party (`notifications`: dicts with ``to`` and ``at``)."""
    met: dict[str, datetime] = {}
    for n in notifications:
        at = _moment(n["at"])
        met[n["to"]] = min(met.get(n["to"], at), at)
    window = facts.aware_at + NOTICE_WINDOW
    deadlines = [
        Deadline(
            NOTIFY_SUBJECTS,
            "PIPA 34(1); Decree 39(1)",
            window,
            why=("personal information leaked: the data subjects are told without delay",),
            done_at=met.get(NOTIFY_SUBJECTS),
        )
    ]
    reasons = pipc_report_reasons(facts)
    if reasons:
        deadlines.append(
            Deadline(
                REPORT_PIPC,
                "PIPA 34(3); Decree 40(1)",
                window,
                why=reasons,
                done_at=met.get(REPORT_PIPC),
            )
        )
    if facts.gdpr and not facts.risk_unlikely:
        deadlines.append(
            Deadline(
                NOTIFY_AUTHORITY,
                "GDPR 33(1)",
                window,
                why=("a personal data breach likely to result in a risk",),
                done_at=met.get(NOTIFY_AUTHORITY),
            )
        )
    if facts.emr_linked:
        deadlines.append(
            Deadline(
                REPORT_MOHW,
                "MSA 23-3",
                facts.aware_at,
                immediately=True,
                why=("an incident affecting electronic medical records",),
                done_at=met.get(REPORT_MOHW),
            )
        )
    return deadlines


def next_breach_state(state: str, wanted: str) -> str:
    """`wanted` if a breach in `state` may move there, else ValueError."""
    if wanted not in BREACH_TRANSITIONS.get(state, ()):
        raise ValueError(f"a breach that is {state} cannot become {wanted}")
    return wanted


def _when(moment: datetime | None, lang: str) -> str:
    if moment is None:
        return "확인 중" if lang == "ko" else "being established"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _or(text: str, lang: str) -> str:
    return text.strip() or ("(작성 필요)" if lang == "ko" else "(to be completed)")


def draft_pipa_notice(facts: BreachFacts, lang: str = "ko") -> dict[str, str]:
    """The data subjects' notice with the five items of PIPA 34(1), in Korean or English:
    what leaked, when and how, what the subject can do, what the controller does and its
    remedy procedure, whom to contact."""
    categories = ", ".join(facts.categories)
    if lang == "ko":
        items = {
            "items": f"유출된 개인정보의 항목: {_or(categories, lang)}",
            "when_how": f"유출된 시점과 그 경위: {_when(facts.occurred_at, lang)}, "
            f"{_or(facts.how or facts.what, lang)}",
            "subject_actions": "피해를 최소화하기 위하여 정보주체가 할 수 있는 방법: "
            + _or(facts.subject_actions, lang),
            "controller_measures": "개인정보처리자의 대응조치 및 피해 구제절차: "
            + _or(facts.measures, lang)
            + (f" / {facts.remedy}" if facts.remedy else ""),
            "contact": f"피해 신고·상담 담당부서 및 연락처: {_or(facts.contact, lang)}",
        }
        title = "개인정보 유출 통지 (개인정보 보호법 제34조제1항)"
    else:
        items = {
            "items": f"The personal information that leaked: {_or(categories, lang)}",
            "when_how": f"When and how it leaked: {_when(facts.occurred_at, lang)}, "
            f"{_or(facts.how or facts.what, lang)}",
            "subject_actions": "What you can do to limit the harm: "
            + _or(facts.subject_actions, lang),
            "controller_measures": "What we are doing and how to obtain redress: "
            + _or(facts.measures, lang)
            + (f" / {facts.remedy}" if facts.remedy else ""),
            "contact": f"Whom to contact to report harm or ask: {_or(facts.contact, lang)}",
        }
        title = "Notice of a personal information leak (PIPA Art. 34(1))"
    return {"title": title, **items, "text": "\n".join([title, *items.values()])}


def draft_gdpr_notification(facts: BreachFacts, now: datetime) -> dict[str, str]:
    """The supervisory authority's notification with the items of GDPR 33(3) (a) nature,
    categories and approximate numbers of data subjects and records, (b) the DPO's contact,
    (c) likely consequences, (d) measures; past 72 hours, the reasons for the delay (33(1))."""
    items = {
        "nature": f"(a) Nature of the breach: {_or(facts.what, 'en')}"
        + (f" ({facts.how})" if facts.how else "")
        + f". Categories of data: {_or(', '.join(facts.categories), 'en')}. Approximate "
        f"number of data subjects: {facts.subjects}; of records: {facts.records}.",
        "contact": f"(b) Data protection officer: {_or(facts.contact, 'en')}",
        "consequences": f"(c) Likely consequences: {_or(facts.consequences, 'en')}",
        "measures": f"(d) Measures taken or proposed: {_or(facts.measures, 'en')}",
    }
    if now > facts.aware_at + NOTICE_WINDOW:
        items["delay"] = "Reasons for the delay beyond 72 hours (Art. 33(1)): (to be completed)"
    title = "Notification of a personal data breach (GDPR Art. 33)"
    return {"title": title, **items, "text": "\n".join([title, *items.values()])}


def draft_mohw_report(facts: BreachFacts) -> dict[str, str]:
    """The MSA 23-3 report to the Ministry of Health and Welfare (electronic intrusion affecting
    electronic medical records), in Korean."""
    text = (
        "전자의료기록 침해사고 보고 (의료법 제23조의3)\n"
        f"인지 시각: {_when(facts.aware_at, 'ko')}\n"
        f"발생 시각: {_when(facts.occurred_at, 'ko')}\n"
        f"내용: {_or(facts.what, 'ko')}\n"
        f"경위: {_or(facts.how, 'ko')}\n"
        f"영향받은 환자 수(추정): {facts.subjects}\n"
        f"조치: {_or(facts.measures, 'ko')}\n"
        f"연락처: {_or(facts.contact, 'ko')}"
    )
    return {"title": "의료법 제23조의3 보고", "text": text}


def breach_drafts(facts: BreachFacts, now: datetime) -> dict[str, dict[str, str]]:
    """Every draft the incident needs: the subjects' notice in Korean and English, the PIPC
    report (same items) when Decree 40(1) applies, the GDPR notification when GDPR applies, the
    MSA 23-3 report when EMR are involved."""
    drafts = {
        "pipa_notice_ko": draft_pipa_notice(facts, "ko"),
        "pipa_notice_en": draft_pipa_notice(facts, "en"),
    }
    if facts.gdpr and not facts.risk_unlikely:
        drafts["gdpr_notification"] = draft_gdpr_notification(facts, now)
    if facts.emr_linked:
        drafts["mohw_report"] = draft_mohw_report(facts)
    return drafts


# --- the monthly review ---------------------------------------------------------------------

QUERY_OPERATIONS = frozenset({"find", "qido"})  # the rest (wado, move, get, export, share, ...)
# hand over data


@dataclass(frozen=True)
class ReviewSettings:
    """What the review calls off-hours and bulk."""

    zone: tzinfo = UTC  # the node's time zone
    day_starts: int = 8  # local hour the working day starts (Monday to Friday)
    day_ends: int = 19  # local hour it ends
    bulk_instances: int = 500  # a retrieval of at least this many instances is bulk


def month_bounds(month: str, zone: tzinfo = UTC) -> tuple[datetime, datetime]:
    """The first moment of `month` (YYYY-MM, in `zone`) and of the next one, in UTC."""
    try:
        first = date.fromisoformat(f"{month}-01")
    except ValueError:
        raise ValueError(f"a month is YYYY-MM, such as 2026-11, got {month!r}") from None
    following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    start = datetime(first.year, first.month, 1, tzinfo=zone)
    end = datetime(following.year, following.month, 1, tzinfo=zone)
    return start.astimezone(UTC), end.astimezone(UTC)


def off_hours(moment: datetime, settings: ReviewSettings) -> bool:
    """Whether `moment` falls outside the working day in the node's time zone."""
    local = moment.astimezone(settings.zone)
    return local.weekday() >= 5 or not settings.day_starts <= local.hour < settings.day_ends


def _operation(entry: dict[str, Any]) -> str:
    return str(entry["detail"].get("operation", ""))


def review_report(
    month: str,
    entries: Iterable[dict[str, Any]],
    auth_failures: Iterable[dict[str, Any]],
    settings: ReviewSettings,
) -> dict[str, Any]:
    """The month's access review (Safety Standard Art. 8(2): the access records are checked
    monthly): retrievals and queries per requester, bulk retrievals, off-hours access, failed
    authentication and denials. `entries` are the month's ledger entries (seq, recorded_at,
    kind, actor, outcome, detail), `auth_failures` the month's counted failures (at, kind,
    address, count). The report carries its own SHA-256 over its canonical JSON."""
    start, end = month_bounds(month, settings.zone)
    per_requester: dict[str, Counter[str]] = defaultdict(Counter)
    bulk, after_hours, denials = [], [], []
    for e in entries:
        at = _moment(e["recorded_at"])
        if not start <= at < end or e["kind"] not in ("disclosure", "denial"):
            continue
        operation, items = _operation(e), int(e["detail"].get("items") or 0)
        summary = {
            "seq": e["seq"],
            "at": at.isoformat(),
            "requester": e["actor"],
            "operation": operation,
            "recipient": e["detail"].get("recipient", ""),
            "instances": items,
            "patients": len(e["detail"].get("patient_ids") or ()),
        }
        if e["kind"] == "denial":
            denials.append(summary | {"reason": e["detail"].get("reason", "")})
            per_requester[e["actor"]]["denials"] += 1
            continue
        row = per_requester[e["actor"]]
        if operation not in QUERY_OPERATIONS:
            row["retrievals"] += 1
            row["instances"] += items
            if items >= settings.bulk_instances:
                bulk.append(summary)
        else:
            row["queries"] += 1
        if off_hours(at, settings):
            after_hours.append(summary | {"local_time": at.astimezone(settings.zone).isoformat()})
    failures: Counter[tuple[str, str]] = Counter()
    for f in auth_failures:
        if start <= _moment(f["at"]) < end:
            failures[(f["kind"], f["address"])] += int(f["count"])
    report: dict[str, Any] = {
        "month": month,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "timezone": str(settings.zone),
        "working_day": f"{settings.day_starts:02d}:00-{settings.day_ends:02d}:00 Mon-Fri",
        "bulk_instances": settings.bulk_instances,
        "requesters": [
            {
                "requester": who,
                "retrievals": c["retrievals"],
                "instances": c["instances"],
                "queries": c["queries"],
                "denials": c["denials"],
            }
            for who, c in sorted(per_requester.items())
        ],
        "bulk": bulk,
        "off_hours": after_hours,
        "failed_authentication": [
            {"kind": kind, "address": address, "count": n}
            for (kind, address), n in sorted(failures.items())
        ],
        "denials": denials,
    }
    report["totals"] = {
        "retrievals": sum(r["retrievals"] for r in report["requesters"]),
        "bulk": len(bulk),
        "off_hours": len(after_hours),
        "failed_authentication": sum(failures.values()),
        "denials": len(denials),
    }
    report["sha256"] = report_hash(report)
    return report


def report_hash(report: dict[str, Any]) -> str:
    """SHA-256 of the report's canonical JSON (without its own ``sha256``)."""
    body = {k: v for k, v in report.items() if k != "sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


REVIEW_CSV_COLUMNS = (
    "section",
    "seq",
    "at",
    "requester",
    "operation",
    "recipient",
    "instances",
    "count",
    "detail",
)


def review_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report as flat rows (one per finding), for CSV."""
    rows: list[dict[str, Any]] = []
    for r in report["requesters"]:
        rows.append(
            {
                "section": "requester",
                "requester": r["requester"],
                "instances": r["instances"],
                "count": r["retrievals"],
                "detail": f"queries={r['queries']} denials={r['denials']}",
            }
        )
    for section in ("bulk", "off_hours", "denials"):
        for s in report[section]:
            rows.append(
                {
                    "section": section,
                    "seq": s["seq"],
                    "at": s["at"],
                    "requester": s["requester"],
                    "operation": s["operation"],
                    "recipient": s["recipient"],
                    "instances": s["instances"],
                    "detail": s.get("reason", s.get("local_time", "")),
                }
            )
    for f in report["failed_authentication"]:
        rows.append(
            {
                "section": "failed_authentication",
                "requester": f["address"],
                "operation": f["kind"],
                "count": f["count"],
            }
        )
    return [{c: row.get(c, "") for c in REVIEW_CSV_COLUMNS} for row in rows]


def _moment(value: datetime | str) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


__all__ = [
    "AUTOMATED_DECISION_REQUESTS",
    "BREACH_STATES",
    "EXEMPTIONS",
    "TICKET_KINDS",
    "TICKET_STATES",
    "BreachFacts",
    "Deadline",
    "Exemption",
    "KeptItem",
    "REGIMES",
    "ReviewSettings",
    "breach_deadlines",
    "breach_drafts",
    "deletion_exemptions",
    "extended_due",
    "month_bounds",
    "refusal_notice",
    "review_report",
    "review_rows",
    "ticket_due",
    "ticket_overdue",
]
