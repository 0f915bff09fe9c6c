"""Data subjects: `dicomnode consent`, `subject`, `retention` and `hold`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dicomnode.cli.common import command, moment, who, with_services


@with_services
def _consent_record(args: argparse.Namespace, node: Any) -> None:
    stored, changed = node.stewardship.record_consent(
        patient_id=args.patient_id,
        purpose=args.purpose,
        state=args.state,
        recorded_by=who(args),
        issuer=args.issuer or None,
        valid_from=moment(args.valid_from),
        valid_until=moment(args.valid_until),
        evidence_ref=args.evidence or "",
        note=args.note or "",
        recipients=[r.strip() for r in (args.recipients or "").split(",") if r.strip()],
    )
    print(f"recorded {stored.ref} ({stored.state})")
    for key, ids in changed.items():
        if ids:
            print(f"  {key.replace('_', ' ')}: {', '.join(map(str, ids))}")


@with_services
def _consent_show(args: argparse.Namespace, node: Any) -> None:
    current = node.stewardship.consent_in_force(args.patient_id, args.issuer)
    if not current:
        print(f"no consent recorded for patient {args.patient_id}")
    for purpose, record in current.items():
        until = f" until {record['valid_until']}" if record["valid_until"] else ""
        state = "IN FORCE" if record["in_force"] else "not in force"
        print(f"{purpose:<8} {record['state']:<9} v{record['version']} {state}{until}")


@with_services
def _consent_history(args: argparse.Namespace, node: Any) -> None:
    for record in node.stewardship.consent_history(args.patient_id, args.issuer):
        print(json.dumps(record.as_dict(), ensure_ascii=False))


@with_services
def _restrict(args: argparse.Namespace, node: Any) -> None:
    restriction = node.stewardship.restrict(
        args.patient_id, who(args), args.reason or "", issuer=args.issuer or ""
    )
    print(f"patient {args.patient_id} restricted ({restriction.ref})")


@with_services
def _unrestrict(args: argparse.Namespace, node: Any) -> None:
    restriction = node.stewardship.unrestrict(args.patient_id, who(args), args.issuer)
    print(f"patient {args.patient_id}: {restriction.ref} lifted")


@with_services
def _export(args: argparse.Namespace, node: Any) -> None:
    from dicomnode.core.model import Source

    summary = node.egress.export_subject(
        args.patient_id,
        Source("cli", who(args)),
        Path(args.output),
        node.stewardship.subject_context(args.patient_id),
        issuer=args.issuer,
    )
    print(
        f"{len(summary['files'])} DICOM files of {len(summary['studies'])} studies and "
        f"a summary of {len(summary['disclosures'])} disclosures written to {args.output}"
    )


@with_services
def _erase(args: argparse.Namespace, node: Any) -> int:
    outcome = node.stewardship.erase_subject(args.patient_id, who(args), issuer=args.issuer)
    print(outcome.reason, file=sys.stdout if outcome.done else sys.stderr)
    return 0 if outcome.done else 1


@with_services
def _retention_status(args: argparse.Namespace, node: Any) -> None:
    for item in node.stewardship.retention_status():
        print(
            f"{item.action:<9} {item.category:<16} {item.study_instance_uid}  "
            f"{item.instances} objects  {item.reason}"
        )


@with_services
def _retention_sweep(args: argparse.Namespace, node: Any) -> None:
    report = node.stewardship.retention_sweep(who(args), dry_run=args.dry_run)
    verb = "would destroy" if report.dry_run else "destroyed"
    for item in report.destroyed:
        print(f"{verb}: {item.category} of study {item.study_instance_uid} ({item.reason})")
    for item in report.skipped:
        print(f"kept: {item.category} of study {item.study_instance_uid} ({item.reason})")
    print(
        f"{len(report.destroyed)} {verb}, {len(report.skipped)} kept under legal hold, "
        f"{len({i.study_instance_uid for i in report.items})} studies considered"
        + (" (dry run: nothing changed)" if report.dry_run else "")
    )


@with_services
def _hold_place(args: argparse.Namespace, node: Any) -> None:
    hold = node.stewardship.place_hold(
        who(args),
        args.owner,
        args.reason,
        patient_id=args.patient_id,
        study_uid=args.study,
        case_ref=args.case or "",
        review_date=moment(args.review),
        issuer=args.issuer,
    )
    print(f"placed {hold.ref} on {hold.patient_id or hold.study_instance_uid}")


@with_services
def _hold_release(args: argparse.Namespace, node: Any) -> None:
    hold = node.stewardship.release_hold(args.id, who(args))
    print(f"released {hold.ref}")


@with_services
def _hold_list(args: argparse.Namespace, node: Any) -> None:
    for hold in node.archive.registry.holds(active_only=not args.all):
        state = "active" if hold.active else f"released {hold.released_at:%Y-%m-%d}"
        review = f", review {hold.review_date:%Y-%m-%d}" if hold.review_date else ""
        print(
            f"{hold.ref:<8} {hold.patient_id or hold.study_instance_uid}  "
            f"owner {hold.owner}, case {hold.case_ref or '-'}{review}: {hold.reason} "
            f"({state})"
        )


def _consent_parsers(commands: Any) -> None:
    consent = commands.add_parser("consent", help="the consent registry")
    consent_commands = consent.add_subparsers(dest="consent_command", required=True)
    record = command(
        consent_commands,
        "record",
        _consent_record,
        "record a new consent version for a patient and purpose",
        by=True,
    )
    record.add_argument("--patient-id", required=True)
    record.add_argument("--issuer", help="IssuerOfPatientID")
    record.add_argument("--purpose", required=True, help="HL7 purpose of use: TREAT, HRESCH, ...")
    record.add_argument("--state", required=True, choices=("granted", "refused", "withdrawn"))
    record.add_argument("--valid-from", help="ISO 8601 (default: now)")
    record.add_argument("--valid-until", help="ISO 8601 (default: open-ended)")
    record.add_argument("--evidence", help="reference to the signed form, recording, ...")
    record.add_argument("--note")
    record.add_argument(
        "--recipients",
        help="comma-separated policy recipient ids the consent names (PIPA 17(2)); default: any",
    )
    for name, run, text in (
        ("show", _consent_show, "the patient's current consent per purpose"),
        ("history", _consent_history, "every consent version of the patient (JSON lines)"),
    ):
        sub = command(consent_commands, name, run, text)
        sub.add_argument("--patient-id", required=True)
        sub.add_argument("--issuer", help="IssuerOfPatientID: the consents that count for it")


def _subject_parsers(commands: Any) -> None:
    subject = commands.add_parser("subject", help="data-subject requests")
    subject_commands = subject.add_subparsers(dest="subject_command", required=True)
    for name, run, text in (
        ("restrict", _restrict, "stop analysis and every disclosure of a patient's data"),
        ("unrestrict", _unrestrict, "lift a patient's restriction"),
        ("export", _export, "write the patient's DICOM files and a summary of every disclosure"),
        (
            "erase",
            _erase,
            "destroy the patient's data, unless a legal hold or retention duty applies",
        ),
    ):
        sub = command(subject_commands, name, run, text, by=True)
        sub.add_argument("--patient-id", required=True, help="matched exactly, never a pattern")
        if name in ("export", "erase"):
            sub.add_argument(
                "--issuer",
                help="IssuerOfPatientID; needed when the ID is held under several issuers",
            )
        else:
            sub.add_argument(
                "--issuer", help="IssuerOfPatientID (restrict without it: the ID under any issuer)"
            )
        if name == "restrict":
            sub.add_argument("--reason")
        if name == "export":
            sub.add_argument("--output", required=True, help="folder to write (created)")


def _retention_parsers(commands: Any) -> None:
    retention = commands.add_parser("retention", help="retention and destruction")
    retention_commands = retention.add_subparsers(dest="retention_command", required=True)
    sweep = command(
        retention_commands,
        "sweep",
        _retention_sweep,
        "destroy what expired (a running node does this on its own)",
        by=True,
    )
    sweep.add_argument("--dry-run", action="store_true", help="list what would go, change nothing")
    command(
        retention_commands,
        "status",
        _retention_status,
        "every study's expiry and what a sweep now would do",
    )

    hold = commands.add_parser("hold", help="legal holds (block every deletion)")
    hold_commands = hold.add_subparsers(dest="hold_command", required=True)
    place = command(hold_commands, "place", _hold_place, "place a legal hold", by=True)
    target = place.add_mutually_exclusive_group(required=True)
    target.add_argument("--patient-id")
    target.add_argument("--study", help="StudyInstanceUID")
    place.add_argument("--owner", required=True, help="who answers for the hold")
    place.add_argument("--reason", required=True)
    place.add_argument("--case", help="case reference")
    place.add_argument(
        "--issuer", help="IssuerOfPatientID of --patient-id (without it: the ID under any issuer)"
    )
    place.add_argument("--review", help="review date (ISO 8601)")
    release = command(hold_commands, "release", _hold_release, "release a hold", by=True)
    release.add_argument("id", type=int)
    listing = command(hold_commands, "list", _hold_list, "active holds")
    listing.add_argument("--all", action="store_true", help="released ones too")


def add_parsers(commands: Any) -> None:
    """consent, subject, retention, hold."""
    _consent_parsers(commands)
    _subject_parsers(commands)
    _retention_parsers(commands)
