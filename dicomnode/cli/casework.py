"""The DPO's casework: `dicomnode breach`, `review` and `ticket`."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicomnode.cli.common import Run, command, moment, print_json, required_moment, who
from dicomnode.cli.common import with_services as _with_services


def _with_casework(body: Callable[[argparse.Namespace, Any], int | None]) -> Run:
    """A command that runs `body(args, casework)`."""
    return _with_services(lambda args, node: body(args, node.casework))


def _breach_record(args: argparse.Namespace, casework: Any) -> None:
    record = casework.record_breach(
        who(args),
        required_moment(args.aware_at),
        args.what,
        moment(args.occurred_at),
        how=args.how,
        subjects=args.subjects,
        records=args.records,
        patient_ids=args.patient or [],
        study_instance_uids=args.study or [],
        categories=args.category or [],
        external_access=args.external_access,
        emr_linked=args.emr_linked,
        gdpr=args.gdpr,
        consequences=args.consequences,
        measures=args.measures,
        subject_actions=args.subject_actions,
        remedy=args.remedy,
        contact=args.contact,
        risk_unlikely=args.risk_unlikely,
        harm_contained=args.harm_contained,
    )
    view = casework.breach_view(record)
    print(f"{record.ref} recorded")
    for d in view["deadlines"]:
        print(f"  {d['duty']}: due {d['due_at']} ({d['law']}) {d['status']}")


def _breach_list(args: argparse.Namespace, casework: Any) -> None:
    for record in casework.breaches():
        view = casework.breach_view(record)
        print(json.dumps(record.as_dict() | {"overdue": view["overdue"]}, ensure_ascii=False))


def _breach_show(args: argparse.Namespace, casework: Any) -> None:
    view = casework.breach_view(casework.breach(args.id))
    print_json(view | {"record": view["record"].as_dict(), "now": view["now"]})


def _breach_notify(args: argparse.Namespace, casework: Any) -> None:
    record = casework.notify_breach(args.id, args.to, who(args), moment(args.at), args.note or "")
    print(f"{record.ref}: {args.to} notified; state {record.state}")


def _breach_close(args: argparse.Namespace, casework: Any) -> None:
    record = casework.close_breach(args.id, who(args), args.reason)
    print(f"{record.ref} closed")


def _write_review(report: dict[str, Any], fmt: str, out: Any) -> None:
    from dicomnode.governance.casework import REVIEW_CSV_COLUMNS, review_rows

    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=REVIEW_CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(review_rows(report))
    else:
        out.write(json.dumps(report, ensure_ascii=False, indent=2) + "\n")


def _review_report(args: argparse.Namespace, casework: Any) -> None:
    report = casework.review_report(args.month)
    if args.output:
        with open(args.output, "w", newline="", encoding="utf-8") as out:
            _write_review(report, args.format, out)
    else:
        _write_review(report, args.format, sys.stdout)


def _review_sign(args: argparse.Namespace, casework: Any) -> None:
    entry = casework.sign_review(
        args.month, who(args), args.finding, args.follow_up or "", args.sha256
    )
    print(f"review of {args.month} signed: ledger entry {entry.seq} ({entry.kind})")


def _review_list(args: argparse.Namespace, casework: Any) -> None:
    for entry in casework.reviews(args.month):
        print(json.dumps({"seq": entry.seq, "actor": entry.actor} | entry.data))


def _ticket_open(args: argparse.Namespace, casework: Any) -> None:
    ticket = casework.open_ticket(
        args.kind,
        args.patient_id,
        who(args),
        requester=args.requester or "",
        regimes=tuple(args.law or ["pipa"]),
        details=args.details or "",
        issuer=args.issuer or "",
        received_at=moment(args.received_at),
        reviewer=args.reviewer or "",
        study_instance_uid=args.study or "",
    )
    print(f"{ticket.ref} opened: {ticket.kind} for {ticket.patient_id}, due {ticket.due_at}")


def _ticket_list(args: argparse.Namespace, casework: Any) -> None:
    for ticket in casework.tickets():
        overdue = casework.is_overdue(ticket)
        if not args.overdue or overdue:
            print(json.dumps(ticket.as_dict() | {"overdue": overdue}, ensure_ascii=False))


def _ticket_show(args: argparse.Namespace, casework: Any) -> None:
    ticket = casework.ticket(args.id)
    print_json(ticket.as_dict() | {"overdue": casework.is_overdue(ticket)})


def _ticket_step(step: Callable[[argparse.Namespace, Any], Any]) -> Run:
    """A command that moves a ticket on (`step` returns it) and prints where it stands; exit
    status 1 when the ticket ends refused."""

    def body(args: argparse.Namespace, casework: Any) -> int:
        ticket = step(args, casework)
        print(f"{ticket.ref} {ticket.state}: {ticket.outcome}")
        return 0 if ticket.state != "refused" else 1

    return _with_casework(body)


_TICKET_STEPS: dict[str, Callable[[argparse.Namespace, Any], Any]] = {
    "carry-out": lambda args, casework: casework.carry_out(
        args.id, who(args), Path(args.output) if args.output else None
    ),
    "done": lambda args, casework: casework.complete(args.id, who(args), args.note),
    "refuse": lambda args, casework: casework.refuse(args.id, who(args), args.code, args.reason),
    "extend": lambda args, casework: casework.extend(
        args.id, who(args), required_moment(args.until), args.reason
    ),
}


def _breach_parsers(commands: Any) -> None:
    breach = commands.add_parser("breach", help="the breach register (GDPR 33, PIPA 34)")
    breach_commands = breach.add_subparsers(dest="breach_command", required=True)
    record = command(
        breach_commands, "record", _with_casework(_breach_record), "record an incident", by=True
    )
    record.add_argument("--aware-at", required=True, help="when the hospital became aware")
    record.add_argument("--what", required=True, help="what happened")
    record.add_argument("--occurred-at", help="when it happened, if known")
    record.add_argument("--how", default="", help="how it happened")
    record.add_argument("--subjects", type=int, default=0, help="approximate data subjects")
    record.add_argument("--records", type=int, default=0, help="approximate records")
    record.add_argument("--patient", action="append", help="an affected Patient ID (repeat)")
    record.add_argument("--study", action="append", help="an affected Study UID (repeat)")
    record.add_argument("--category", action="append", help="a data category (repeat)")
    for flag, text in (
        ("--external-access", "unlawful access from outside (PIPA Decree 40(1)3)"),
        ("--emr-linked", "electronic medical records involved (MSA 23-3 report to MOHW)"),
        ("--gdpr", "EU data subjects: GDPR 33 applies"),
        ("--risk-unlikely", "GDPR 33(1): unlikely to result in a risk"),
        ("--harm-contained", "PIPA Decree 40(1) proviso: recovered or deleted"),
    ):
        record.add_argument(flag, action="store_true", help=text)
    for option in ("consequences", "measures", "subject-actions", "remedy", "contact"):
        record.add_argument(f"--{option}", default="")
    command(breach_commands, "list", _with_casework(_breach_list), "every breach")
    command(
        breach_commands, "show", _with_casework(_breach_show), "deadlines and drafts (JSON)"
    ).add_argument("id", type=int)
    notify = command(
        breach_commands,
        "notify",
        _with_casework(_breach_notify),
        "record a notification made",
        by=True,
    )
    notify.add_argument("id", type=int)
    notify.add_argument(
        "--to", required=True, choices=("subjects", "pipc", "supervisory-authority", "mohw")
    )
    notify.add_argument("--at", help="when (default: now)")
    notify.add_argument("--note", help="how, reference of the report")
    close = command(
        breach_commands, "close", _with_casework(_breach_close), "close a breach", by=True
    )
    close.add_argument("id", type=int)
    close.add_argument("--reason", required=True)


def _review_parsers(commands: Any) -> None:
    review = commands.add_parser("review", help="the monthly access review")
    review_commands = review.add_subparsers(dest="review_command", required=True)
    report = command(review_commands, "report", _with_casework(_review_report), "a month's report")
    report.add_argument("--month", required=True, help="YYYY-MM")
    report.add_argument("--format", choices=("json", "csv"), default="json")
    report.add_argument("--output", help="file (default: standard output)")
    sign = command(
        review_commands, "sign", _with_casework(_review_sign), "sign a month's review off", by=True
    )
    sign.add_argument("--month", required=True, help="YYYY-MM")
    sign.add_argument("--finding", required=True)
    sign.add_argument("--follow-up")
    sign.add_argument("--sha256", help="the report's hash as read (refused if it changed)")
    command(
        review_commands, "list", _with_casework(_review_list), "sign-offs, newest first"
    ).add_argument("--month")


def _ticket_parsers(commands: Any) -> None:
    from dicomnode.governance.casework import EXEMPTIONS, TICKET_KINDS

    ticket = commands.add_parser("ticket", help="data-subject request tickets")
    ticket_commands = ticket.add_subparsers(dest="ticket_command", required=True)
    opened = command(
        ticket_commands, "open", _with_casework(_ticket_open), "record a request", by=True
    )
    opened.add_argument("--kind", required=True, choices=TICKET_KINDS)
    opened.add_argument("--patient-id", required=True)
    opened.add_argument("--issuer")
    opened.add_argument("--requester", help="who asked (default: the data subject)")
    opened.add_argument("--law", action="append", choices=("pipa", "gdpr"), help="repeatable")
    opened.add_argument("--details")
    opened.add_argument("--received-at", help="when it was received (default: now)")
    opened.add_argument(
        "--reviewer", help="ai-refusal, ai-explanation: who reviews it (default: --by)"
    )
    opened.add_argument(
        "--study", help="ai-refusal, ai-explanation: the study whose AI output is meant"
    )
    command(ticket_commands, "list", _with_casework(_ticket_list), "every ticket").add_argument(
        "--overdue", action="store_true"
    )
    command(
        ticket_commands, "show", _with_casework(_ticket_show), "one ticket (JSON)"
    ).add_argument("id", type=int)
    steps = {
        name: command(ticket_commands, name, _ticket_step(_TICKET_STEPS[name]), text, by=True)
        for name, text in (
            ("carry-out", "erase, restrict or export as the request asks"),
            ("done", "mark done, saying what was done"),
            ("refuse", "refuse with a coded exemption"),
            ("extend", "extend the deadline"),
        )
    }
    for parser in steps.values():
        parser.add_argument("id", type=int)
    steps["carry-out"].add_argument("--output", help="folder for an access or portability export")
    steps["done"].add_argument("--note", required=True)
    steps["refuse"].add_argument("--code", required=True, choices=tuple(EXEMPTIONS))
    steps["refuse"].add_argument("--reason", required=True)
    steps["extend"].add_argument("--until", required=True)
    steps["extend"].add_argument("--reason", required=True)


def add_parsers(commands: Any) -> None:
    """breach, review, ticket."""
    _breach_parsers(commands)
    _review_parsers(commands)
    _ticket_parsers(commands)
