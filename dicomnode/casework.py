"""The DPO's casework: the breach register, the monthly access review and data-subject request
tickets.

Governance (`dicomnode.governance.casework`) decides what the facts mean (deadlines, drafted
notices, exemptions, the report); the archive's case store keeps the records, each change with
its ledger entry. A ticket is carried out by the operations that already exist: erasure and
restriction (stewardship), the subject's export (egress); this room calls them and records what
they answered. The CLI (`dicomnode breach|review|ticket`) and the DPO pages both call this room.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from dicomnode.archive import Archive
from dicomnode.archive.automated_decisions import DecisionFlag, DecisionFlagStore
from dicomnode.archive.casework import BreachRecord, CaseStore, TicketRecord, TicketStep
from dicomnode.core.errors import InvalidInput
from dicomnode.core.ledger import LedgerEntry
from dicomnode.core.ledger_events import (
    BreachClosed,
    BreachNotified,
    BreachRecorded,
    ReviewSignedOff,
)
from dicomnode.core.model import Source
from dicomnode.core.times import utc_now
from dicomnode.core.uids import validate_uid
from dicomnode.governance import casework as rules

log = logging.getLogger("dicomnode.casework")

BREACH_FACT_KEYS = (
    "how",
    "subjects",
    "records",
    "patient_ids",
    "study_instance_uids",
    "categories",
    "external_access",
    "emr_linked",
    "gdpr",
    "consequences",
    "measures",
    "subject_actions",
    "remedy",
    "contact",
    "risk_unlikely",
    "harm_contained",
)
TEXT_FACTS = ("how", "consequences", "measures", "subject_actions", "remedy", "contact")
FLAG_FACTS = ("external_access", "emr_linked", "gdpr", "risk_unlikely", "harm_contained")
LIST_FACTS = ("patient_ids", "study_instance_uids", "categories")
COUNT_FACTS = ("subjects", "records")
DUTIES = (rules.NOTIFY_SUBJECTS, rules.REPORT_PIPC, rules.NOTIFY_AUTHORITY, rules.REPORT_MOHW)


def review_settings(dpo_settings: Any) -> rules.ReviewSettings:
    """The review's off-hours and bulk threshold from ``[dpo]`` (defaults without it)."""
    if dpo_settings is None:
        return rules.ReviewSettings()
    return rules.ReviewSettings(
        zone=ZoneInfo(dpo_settings.review_timezone),
        day_starts=dpo_settings.review_day_starts,
        day_ends=dpo_settings.review_day_ends,
        bulk_instances=dpo_settings.review_bulk_instances,
    )


MAX_LINE = 2000  # characters of a note, reason, finding or name


def _line(name: str, value: str, limit: int = MAX_LINE) -> str:
    """`value` stripped, or InvalidInput when it is longer than `limit` characters."""
    value = value.strip()
    if len(value) > limit:
        raise InvalidInput(f"{name} is longer than {limit} characters")
    return value


def _facts_from(values: dict[str, Any]) -> dict[str, Any]:
    """The stored facts of a breach from what the DPO entered, checked and normalised."""
    unknown = set(values) - set(BREACH_FACT_KEYS)
    if unknown:
        raise InvalidInput(f"unknown breach facts: {', '.join(sorted(unknown))}")
    facts: dict[str, Any] = {}
    for key in TEXT_FACTS:
        facts[key] = str(values.get(key) or "").strip()
    for key in FLAG_FACTS:
        facts[key] = bool(values.get(key))
    for key in LIST_FACTS:
        listed = values.get(key) or ()
        if isinstance(listed, str):
            listed = listed.replace("\n", ",").split(",")
        facts[key] = sorted({str(v).strip() for v in listed if str(v).strip()})
    for key in COUNT_FACTS:
        raw = values.get(key) or 0
        try:
            count = int(raw)
        except (TypeError, ValueError):
            raise InvalidInput(f"{key} must be a whole number, got {raw!r}") from None
        if count < 0:
            raise InvalidInput(f"{key} must not be negative")
        facts[key] = count
    facts["subjects"] = max(facts["subjects"], len(facts["patient_ids"]))
    return facts


class FailureCounts:
    """Failed authentications counted in memory per (hour, kind, address) and written to the
    store `window` seconds after the first one of a batch (a timer thread), so that a flood of
    refused requests makes one write per key and window. At most `max_keys` keys are kept
    between writes; further addresses count as "other". Counts not yet written are lost if the
    process dies."""

    def __init__(self, store: CaseStore, window: float = 5.0, max_keys: int = 10000) -> None:
        self.store = store
        self.window = window
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._pending: Counter[tuple[datetime, str, str]] = Counter()
        self._timer: threading.Timer | None = None

    def add(self, kind: str, address: str, now: datetime) -> None:
        hour = now.replace(minute=0, second=0, microsecond=0)
        with self._lock:
            key = (hour, kind, address)
            if key not in self._pending and len(self._pending) >= self.max_keys:
                key = (hour, kind, "other")
            self._pending[key] += 1
            if self._timer is None:
                self._timer = threading.Timer(self.window, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Write what is counted so far."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for (hour, kind, address), count in pending.items():
            try:
                self.store.count_auth_failure(kind, address, hour, count)
            except Exception:  # the index is unavailable: these counts are lost, say so
                log.exception("%d failed authentications from %s not counted", count, address)


class Casework:
    """Breaches, reviews and tickets over `archive`; `stewardship` and `egress` carry out the
    requests (erase, restrict, export)."""

    def __init__(
        self,
        archive: Archive,
        stewardship: Any,
        egress: Any,
        clock: Callable[[], datetime] = utc_now,
        review: rules.ReviewSettings | None = None,
    ) -> None:
        self.archive = archive
        self.store = CaseStore(archive.index, archive.ledger)
        self.stewardship = stewardship
        self.egress = egress
        self.clock = clock
        self.review = review or rules.ReviewSettings()
        self.failures = FailureCounts(self.store)
        self.flags = DecisionFlagStore(archive.index)  # automated-decision requests' flags

    # --- breaches ---------------------------------------------------------------------------

    @staticmethod
    def facts(record: BreachRecord) -> rules.BreachFacts:
        """The governance view of a recorded breach."""
        f = record.facts
        return rules.BreachFacts(
            record.aware_at,
            record.what,
            record.occurred_at,
            **{k: tuple(f[k]) if k in LIST_FACTS else f[k] for k in BREACH_FACT_KEYS},
        )

    def record_breach(
        self,
        by: str,
        aware_at: datetime,
        what: str,
        occurred_at: datetime | None = None,
        **values: Any,
    ) -> BreachRecord:
        """Record an incident: when the controller became aware (GDPR 33 and PIPA Decree 39/40
        count from then), what happened and whom it affects. Every deadline starts now."""
        now = self.clock()
        if not what.strip():
            raise InvalidInput("say what happened")
        if aware_at > now:
            raise InvalidInput("aware_at is in the future")
        if occurred_at is not None and occurred_at > aware_at:
            raise InvalidInput("occurred_at is after aware_at")
        facts = _facts_from(values)
        stated = rules.BreachFacts(
            aware_at,
            what.strip(),
            occurred_at,
            **{k: tuple(facts[k]) if k in LIST_FACTS else facts[k] for k in BREACH_FACT_KEYS},
        )
        return self.store.add_breach(
            aware_at, occurred_at, what.strip(), facts, by, now, self._breach_detail(stated)
        )

    @staticmethod
    def _breach_detail(facts: rules.BreachFacts) -> dict[str, Any]:
        return BreachRecorded(
            aware_at=facts.aware_at.isoformat(),
            what=facts.what,
            subjects=facts.subjects,
            categories=tuple(facts.categories),
            patient_ids=tuple(facts.patient_ids),
            study_instance_uids=tuple(facts.study_instance_uids),
            emr_linked=facts.emr_linked,
            deadlines={d.duty: d.due_at.isoformat() for d in rules.breach_deadlines(facts, ())},
        ).as_details()

    def breaches(self) -> list[BreachRecord]:
        return self.store.breaches()

    def breach(self, breach_id: int) -> BreachRecord:
        return self.store.breach(breach_id)

    def breach_view(self, record: BreachRecord) -> dict[str, Any]:
        """The breach with its deadlines (time left or overdue, now) and its drafted notices."""
        now = self.clock()
        facts = self.facts(record)
        deadlines = rules.breach_deadlines(facts, record.notifications)
        open_ = record.state != "closed"
        return {
            "record": record,
            "deadlines": [d.as_dict(now) for d in deadlines],
            "overdue": open_ and any(d.status(now) == "overdue" for d in deadlines),
            "msa_report": facts.emr_linked,
            "pipc_report": list(rules.pipc_report_reasons(facts)),
            "drafts": rules.breach_drafts(facts, now),
            "now": now,
        }

    def notify_breach(
        self, breach_id: int, to: str, by: str, at: datetime | None = None, note: str = ""
    ) -> BreachRecord:
        """Record that `to` (subjects, pipc, supervisory-authority, mohw) was notified, when and
        how; the breach becomes notified."""
        if to not in DUTIES:
            raise InvalidInput(f"notified whom? one of {', '.join(DUTIES)}")
        now = self.clock()
        record = self.store.breach(breach_id)
        at = at or now
        if at > now or at < record.aware_at:
            raise InvalidInput("a notification is made between aware_at and now")
        if record.state == "closed":
            raise InvalidInput(f"{record.ref} is closed")
        note = _line("note", note)
        notification = {"to": to, "at": at.isoformat(), "by": by, "note": note}
        rules.next_breach_state(record.state, "notified")
        return self.store.change_breach(
            breach_id,
            record.state,
            by,
            "notified",
            BreachNotified(notified=to, at=at.isoformat(), note=note).as_details(),
            state="notified",
            notifications=[*record.notifications, notification],
        )

    def close_breach(self, breach_id: int, by: str, reason: str) -> BreachRecord:
        reason = _line("reason", reason)
        if not reason:
            raise InvalidInput("closing a breach needs a reason")
        record = self.store.breach(breach_id)
        try:
            rules.next_breach_state(record.state, "closed")
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        now = self.clock()
        return self.store.change_breach(
            breach_id,
            record.state,
            by,
            "closed",
            BreachClosed(reason=reason.strip()).as_details(),
            state="closed",
            closed_at=now,
            closed_by=by,
        )

    def overdue_breaches(self) -> list[BreachRecord]:
        return [b for b in self.breaches() if self.breach_view(b)["overdue"]]

    # --- the monthly review ------------------------------------------------------------------

    def review_report(self, month: str) -> dict[str, Any]:
        """The month's access review, generated from the ledger and the failure counts."""
        try:
            start, end = rules.month_bounds(month, self.review.zone)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        if start > self.clock():
            raise InvalidInput(f"{month} has not begun")
        self.failures.flush()  # this process's counts so far
        entries = self.store.entries_between(start, end, ("disclosure", "denial"))
        failures = self.store.auth_failures(start, end)
        return rules.review_report(month, entries, failures, self.review)

    def sign_review(
        self,
        month: str,
        by: str,
        finding: str,
        follow_up: str = "",
        expected_sha256: str | None = None,
    ) -> LedgerEntry:
        """The DPO's sign-off of the month's review: a ledger entry of kind dpo_review with the
        report's hash (the report regenerated now; `expected_sha256`, when given, must match
        what the DPO read)."""
        finding, follow_up = _line("finding", finding), _line("follow_up", follow_up)
        if not finding:
            raise InvalidInput("a sign-off needs the finding (e.g. 'no irregularities')")
        report = self.review_report(month)
        if expected_sha256 and expected_sha256 != report["sha256"]:
            raise InvalidInput("the report changed since it was opened; read it again")
        return self.store.record_review(
            by,
            ReviewSignedOff(
                month=month,
                report_sha256=report["sha256"],
                totals=report["totals"],
                reviewer=by,
                finding=finding.strip(),
                follow_up=follow_up.strip(),
                reviewed_at=self.clock().isoformat(),
            ).as_details(),
        )

    def reviews(self, month: str | None = None) -> list[LedgerEntry]:
        return self.store.reviews(month)

    def count_auth_failure(self, kind: str, address: str) -> None:
        """Count a failed authentication: kept in memory and written at most every few seconds
        per hour, kind and address (a flood of bad tokens costs no write per request)."""
        self.failures.add(kind, address, self.clock())

    def flush_auth_failures(self) -> None:
        self.failures.flush()

    # --- data-subject request tickets ---------------------------------------------------------

    def open_ticket(
        self,
        kind: str,
        patient_id: str,
        by: str,
        requester: str = "",
        regimes: tuple[str, ...] = ("pipa",),
        details: str = "",
        issuer: str = "",
        received_at: datetime | None = None,
        reviewer: str = "",
        study_instance_uid: str = "",
    ) -> TicketRecord:
        """Record a request (access, correction, deletion, suspension, portability) with its
        deadline: 10 days under PIPA, one month under GDPR. A request about an automated
        decision (ai-refusal, ai-explanation; PIPA 37-2: 30 days) is routed to `reviewer` (a
        person; default: who records it) and flags the patient's AI outputs (of one study,
        when `study_instance_uid` is given); a refusal holds their new analysis meanwhile."""
        if kind not in rules.TICKET_KINDS:
            raise InvalidInput(f"a request is one of {', '.join(rules.TICKET_KINDS)}")
        patient_id, issuer = _line("patient_id", patient_id, 64), _line("issuer", issuer, 64)
        requester = _line("requester", requester)
        if not patient_id:
            raise InvalidInput("a request needs the patient's Patient ID")
        now = self.clock()
        received_at = received_at or now
        if received_at > now:
            raise InvalidInput("received_at is in the future")
        regimes = tuple(sorted(set(regimes)))
        try:
            due = rules.ticket_due(received_at, regimes, kind)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        flag = self._automated_decision_flag(kind, by, reviewer, study_instance_uid, now)
        return self.store.add_ticket(
            kind,
            patient_id.strip(),
            issuer.strip(),
            requester.strip() or "the data subject",
            regimes,
            details.strip(),
            received_at,
            due,
            by,
            now,
            then=flag,
        )

    def _automated_decision_flag(
        self, kind: str, by: str, reviewer: str, study_uid: str, now: datetime
    ) -> TicketStep | None:
        """What opening a PIPA 37-2 request writes with its ticket: the flag on the AI outputs,
        routed to the reviewer (None for the other kinds)."""
        request = rules.AUTOMATED_DECISION_REQUESTS.get(kind)
        if request is None:
            if reviewer.strip() or study_uid.strip():
                raise InvalidInput("only a request about an automated decision has a reviewer")
            return None
        reviewer = _line("reviewer", reviewer, 64).strip() or by
        study_uid = study_uid.strip() and validate_uid(study_uid.strip(), "study_instance_uid")

        def flag(conn: Any, ticket: TicketRecord) -> dict[str, Any]:
            added = self.flags.add_in(
                conn, ticket.id, request, ticket.patient_id, ticket.issuer, study_uid, reviewer, now
            )
            return {"flag": added.as_dict()}

        return flag

    def _resolving_flag(self, ticket: TicketRecord) -> TicketStep | None:
        """Closing a PIPA 37-2 request resolves its flag (and releases what it held)."""
        if ticket.kind not in rules.AUTOMATED_DECISION_REQUESTS:
            return None
        now = self.clock()
        return lambda conn, record: self.flags.resolve_in(conn, record.id, now)

    def decision_flags(self, patient_ids: set[str] | None = None) -> list[DecisionFlag]:
        """The flags automated-decision requests put on AI outputs, newest first."""
        return self.flags.flags(patient_ids)

    def decision_flag(self, ticket_id: int) -> DecisionFlag | None:
        return self.flags.of_ticket(ticket_id)

    def tickets(self) -> list[TicketRecord]:
        return self.store.tickets()

    def ticket(self, ticket_id: int) -> TicketRecord:
        return self.store.ticket(ticket_id)

    def is_overdue(self, ticket: TicketRecord) -> bool:
        return rules.ticket_overdue(ticket.state, ticket.due_at, self.clock())

    def overdue_tickets(self) -> list[TicketRecord]:
        return [t for t in self.tickets() if self.is_overdue(t)]

    def carry_out(self, ticket_id: int, by: str, output: Path | None = None) -> TicketRecord:
        """Carry out a request with the node's own operation: deletion -> erasure (refused with
        coded exemptions and a notice when the law keeps the data), suspension -> restriction,
        access and portability -> the subject's export into `output`. A correction is made
        where the record is kept: mark it done (`complete`)."""
        ticket = self.store.ticket(ticket_id)
        if ticket.state not in ("open", "extended"):
            raise InvalidInput(f"{ticket.ref} is {ticket.state}")
        issuer = ticket.issuer or None
        if ticket.kind == "deletion":
            outcome = self.stewardship.erase_subject(ticket.patient_id, by, issuer=issuer)
            if not outcome.done:
                exemptions = self._deletion_exemptions(ticket) or [
                    rules.Exemption("OTHER", outcome.reason)
                ]
                return self._refuse(ticket, by, exemptions, {"operation": "erase"})
            return self._done(ticket, by, outcome.reason, {"operation": "erase"})
        if ticket.kind == "suspension":
            restriction = self.stewardship.restrict(
                ticket.patient_id, by, f"{ticket.ref}: {ticket.details}".strip(": "), ticket.issuer
            )
            return self._done(
                ticket, by, f"processing restricted ({restriction.ref})", {"operation": "restrict"}
            )
        if ticket.kind in ("access", "portability"):
            if output is None:
                raise InvalidInput("an access or portability request needs an output folder")
            summary = self.egress.export_subject(
                ticket.patient_id,
                Source("cli", by),
                output,
                self.stewardship.subject_context(ticket.patient_id),
                issuer=issuer,
            )
            text = (
                f"{len(summary['files'])} DICOM files of {len(summary['studies'])} studies and "
                f"{len(summary['disclosures'])} disclosures exported"
            )
            return self._done(ticket, by, text, {"operation": "export"})
        if ticket.kind in rules.AUTOMATED_DECISION_REQUESTS:
            raise InvalidInput(
                "a person reviews the automated decision: mark it done saying what the review "
                "found (or explained), or refuse it with its exemption"
            )
        raise InvalidInput("a correction is made in the record it concerns; mark it done")

    def _deletion_exemptions(self, ticket: TicketRecord) -> list[rules.Exemption]:
        identity = self.archive.identify(ticket.patient_id, ticket.issuer or None)
        studies = {
            i.study_instance_uid for i in self.archive.instances_of(identity, include_retained=True)
        }
        kept = [
            rules.KeptItem(i.study_instance_uid, i.rule_id, i.legal_basis, i.expires_at)
            for i in self.stewardship.retention_status()
            if i.study_instance_uid in studies
        ]
        holds = [
            h.ref
            for h in self.archive.registry.holds(active_only=True)
            if h.patient_id == identity.patient_id or h.study_instance_uid in studies
        ]
        return rules.deletion_exemptions(kept, holds, ticket.regimes, self.clock())

    def _refuse(
        self,
        ticket: TicketRecord,
        by: str,
        exemptions: list[rules.Exemption],
        extra: dict[str, Any],
    ) -> TicketRecord:
        notice = "\n\n".join(
            rules.refusal_notice(ticket.kind, ticket.patient_id, exemptions, lang)
            for lang in ("ko", "en")
        )
        coded = [e.as_dict() for e in exemptions]
        return self.store.change_ticket(
            ticket.id,
            ("open", "extended"),
            by,
            self.clock(),
            "refused",
            extra | {"exemptions": coded},
            then=self._resolving_flag(ticket),
            state="refused",
            exemptions=coded,
            outcome=notice,
        )

    def _done(
        self, ticket: TicketRecord, by: str, text: str, extra: dict[str, Any]
    ) -> TicketRecord:
        return self.store.change_ticket(
            ticket.id,
            ("open", "extended"),
            by,
            self.clock(),
            "done",
            extra | {"outcome": text},
            then=self._resolving_flag(ticket),
            state="done",
            outcome=text,
        )

    def complete(self, ticket_id: int, by: str, note: str) -> TicketRecord:
        """Mark a request done, saying what was done (e.g. the correction made in the EMR)."""
        note = _line("note", note)
        if not note:
            raise InvalidInput("say what was done")
        return self._done(self.store.ticket(ticket_id), by, note.strip(), {"operation": "manual"})

    def refuse(self, ticket_id: int, by: str, code: str, reason: str) -> TicketRecord:
        """Refuse a request with a coded exemption and the reason; the notice is drafted."""
        if code not in rules.EXEMPTIONS:
            raise InvalidInput(f"an exemption is one of {', '.join(rules.EXEMPTIONS)}")
        reason = _line("reason", reason)
        if not reason:
            raise InvalidInput("a refusal needs the reason")
        ticket = self.store.ticket(ticket_id)
        return self._refuse(
            ticket, by, [rules.Exemption(code, reason.strip())], {"operation": "manual"}
        )

    def extend(self, ticket_id: int, by: str, until: datetime, reason: str) -> TicketRecord:
        """Extend the deadline (GDPR 12(3): two further months at most; PIPA 35(3): a
        postponement for a justified reason), telling the subject why."""
        reason = _line("reason", reason)
        if not reason:
            raise InvalidInput("an extension needs the reason told to the data subject")
        ticket = self.store.ticket(ticket_id)
        try:
            due = rules.extended_due(ticket.received_at, ticket.regimes, until, ticket.kind)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        return self.store.change_ticket(
            ticket.id,
            ("open", "extended"),
            by,
            self.clock(),
            "extended",
            {"reason": reason.strip(), "until": due.isoformat()},
            state="extended",
            due_at=due,
            outcome=f"extended: {reason.strip()}",
        )
