"""The deadlines and exemptions of data-subject requests (access, correction, deletion,
suspension, portability), decided from facts; pure, like the rest of `casework`.

* GDPR Art. 12(3): answer within one month, extendable by two further months; Art. 17(3)(b),
  (c), (e): erasure does not apply where a legal obligation or public health requires the
  processing, or for legal claims.
* PIPA Arts. 35-37 with Decree Arts. 41(4), 43(3), 44(2): answered within 10 days; Art. 36(1)
  proviso: deletion may not be asked while another law requires the data to be kept;
  Art. 28-7: pseudonymised data are exempt from Arts. 35-37.
* PIPA Art. 37-2 (automated decisions): the data subject may refuse a decision made by a fully
  automated system (37-2(1)) or ask for its explanation (37-2(2)); the controller discloses the
  criteria and procedure (37-2(4)). Decree Art. 44-4 (as read here): the measures are taken
  within 30 days, a delay for a justified reason (told to the subject) twice at most, 30 days
  each. GDPR Art. 22(3): human intervention, answered like any request (Art. 12(3)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

# PIPA 37-2 requests about an automated decision (an AI output): the kind -> what is asked.
AUTOMATED_DECISION_REQUESTS = {"ai-refusal": "refuse", "ai-explanation": "explain"}
TICKET_KINDS = (
    "access",
    "correction",
    "deletion",
    "suspension",
    "portability",
    *AUTOMATED_DECISION_REQUESTS,
)
TICKET_STATES = ("open", "extended", "done", "refused")
REGIMES = ("pipa", "gdpr")
PIPA_DAYS = 10  # Decree 41(4), 43(3), 44(2)
PIPA_AUTOMATED_DECISION_DAYS = 30  # Decree 44-4, for AUTOMATED_DECISION_REQUESTS
PIPA_AUTOMATED_DECISION_EXTENSIONS = 2  # delays of 30 days each at most
GDPR_EXTENSION_MONTHS = 2  # Art. 12(3)
# Coded exemptions: why a request is not (wholly) granted.
EXEMPTIONS = {
    "PIPA-36-1-proviso": "another law requires the data to be kept (PIPA 36(1) proviso)",
    "PIPA-28-7": "pseudonymised data are exempt from PIPA 35 to 37 (PIPA 28-7)",
    "GDPR-17-3-b": "erasure does not apply: a legal obligation requires the processing "
    "(GDPR 17(3)(b))",
    "GDPR-17-3-c": "erasure does not apply: public health reasons (GDPR 17(3)(c))",
    "GDPR-17-3-e": "erasure does not apply: the establishment, exercise or defence of legal "
    "claims (GDPR 17(3)(e)); a legal hold is in place",
    "LEGAL-HOLD": "a legal hold keeps the data until it is released",
    "PIPA-37-2-1-proviso": "the automated decision rests on the subject's consent, a law or a "
    "contract (PIPA 37-2(1) proviso: Art. 15(1)1, 2, 4); it is explained instead",
    "OTHER": "refused for the reason stated",
}


@dataclass(frozen=True)
class Exemption:
    code: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "reason": self.reason, "meaning": EXEMPTIONS[self.code]}


def _add_months(moment: datetime, months: int) -> datetime:
    year, month = divmod(moment.month - 1 + months, 12)
    year += moment.year
    month += 1
    days = (date(year + month // 12, month % 12 + 1, 1) - date(year, month, 1)).days
    return moment.replace(year=year, month=month, day=min(moment.day, days))


def _pipa_days(kind: str) -> int:
    return PIPA_AUTOMATED_DECISION_DAYS if kind in AUTOMATED_DECISION_REQUESTS else PIPA_DAYS


def ticket_due(received_at: datetime, regimes: Sequence[str], kind: str = "") -> datetime:
    """When a request must be answered: 10 days under PIPA (30 for a request about an
    automated decision, PIPA 37-2), one month under GDPR (12(3)); the earlier when both
    apply."""
    if not regimes or set(regimes) - set(REGIMES):
        raise ValueError(f"a request's law is one or more of {', '.join(REGIMES)}")
    due = []
    if "pipa" in regimes:
        due.append(received_at + timedelta(days=_pipa_days(kind)))
    if "gdpr" in regimes:
        due.append(_add_months(received_at, 1))
    return min(due)


def extended_due(
    received_at: datetime, regimes: Sequence[str], until: datetime, kind: str = ""
) -> datetime:
    """The new deadline of an extended request: GDPR 12(3) allows two further months at most;
    PIPA 35(3) allows postponing the answer for a justified reason, told to the subject
    (Decree 44-4 for an automated decision: twice at most, 30 days each)."""
    if until <= ticket_due(received_at, regimes, kind):
        raise ValueError("an extension must end after the current deadline")
    if "gdpr" in regimes and until > _add_months(received_at, 1 + GDPR_EXTENSION_MONTHS):
        raise ValueError("GDPR 12(3) allows at most two further months")
    if "pipa" in regimes and kind in AUTOMATED_DECISION_REQUESTS:
        days = PIPA_AUTOMATED_DECISION_DAYS * (1 + PIPA_AUTOMATED_DECISION_EXTENSIONS)
        if until > received_at + timedelta(days=days):
            raise ValueError("PIPA Decree 44-4 allows at most two delays of 30 days")
    return until


def ticket_overdue(state: str, due_at: datetime, now: datetime) -> bool:
    return state in ("open", "extended") and now > due_at


@dataclass(frozen=True)
class KeptItem:
    """A study's data a retention rule keeps, as the deletion check sees it."""

    study_instance_uid: str
    rule_id: str
    legal_basis: str  # "" when no law requires keeping it
    expires_at: datetime | None


def deletion_exemptions(
    kept: Sequence[KeptItem],
    holds: Sequence[str],
    regimes: Sequence[str],
    now: datetime,
    pseudonymised: bool = False,
) -> list[Exemption]:
    """Why a deletion request is refused: a retention another law requires (PIPA 36(1)
    proviso; GDPR 17(3)(b), or (c) for public health), a legal hold (GDPR 17(3)(e)), or
    pseudonymised data (PIPA 28-7). Empty: nothing stands in the way."""
    found: list[Exemption] = []
    for item in kept:
        if not item.legal_basis or item.expires_at is None or item.expires_at <= now:
            continue
        why = (
            f"study {item.study_instance_uid} must be kept until {item.expires_at:%Y-%m-%d} "
            f"under {item.legal_basis} (rule {item.rule_id})"
        )
        if "pipa" in regimes:
            found.append(Exemption("PIPA-36-1-proviso", why))
        if "gdpr" in regimes:
            found.append(Exemption("GDPR-17-3-b", why))
    if holds:
        why = f"under legal hold {', '.join(sorted(holds))}"
        found.append(Exemption("GDPR-17-3-e" if "gdpr" in regimes else "LEGAL-HOLD", why))
    if pseudonymised and "pipa" in regimes:
        found.append(Exemption("PIPA-28-7", "the data held are pseudonymised"))
    return found


def refusal_notice(
    kind: str, patient_id: str, exemptions: Sequence[Exemption], lang: str = "ko"
) -> str:
    """The notice telling the data subject that (and why) the request is refused, and how to
    object (PIPA Decree 43(3): the reason and the way to appeal; GDPR 12(4): the reasons and the
    right to complain to a supervisory authority)."""
    if lang == "ko":
        names = {
            "deletion": "삭제",
            "access": "열람",
            "correction": "정정",
            "suspension": "처리정지",
            "portability": "전송",
            "ai-refusal": "자동화된 결정 거부",
            "ai-explanation": "자동화된 결정 설명",
        }
        lines = [
            f"귀하(환자번호 {patient_id})의 개인정보 {names.get(kind, kind)} 요구를 "
            "다음 사유로 거절합니다."
        ]
        lines += [f"- [{e.code}] {e.reason}" for e in exemptions]
        lines.append(
            "이 결정에 이의가 있으면 통지를 받은 날부터 담당부서에 이의를 제기할 수 있으며, "
            "개인정보분쟁조정위원회 또는 개인정보침해 신고센터(국번없이 182)에 분쟁조정·"
            "신고를 할 수 있습니다."
        )
    else:
        lines = [
            f"Your request ({kind}) concerning the data of patient {patient_id} is refused "
            "for the following reasons:"
        ]
        lines += [f"- [{e.code}] {e.reason}" for e in exemptions]
        lines.append(
            "You may object to this decision with our privacy office, and you have the right "
            "to lodge a complaint with a supervisory authority (in Korea: the Personal "
            "Information Dispute Mediation Committee or the privacy infringement report centre, "
            "182)."
        )
    return "\n".join(lines)
