"""The `dicomnode` command: serve, and check a configuration file."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from dicomnode import __version__
from dicomnode.config import check_settings, read_settings
from dicomnode.core.errors import ConfigError
from dicomnode.core.logs import configure_logging


def _serve(args: argparse.Namespace) -> int:
    settings = read_settings(args.config)
    configure_logging(settings.logging.level, settings.logging.format)
    from dicomnode.app import Node  # imported late: `config check` needs none of it

    Node(settings).serve_forever()
    return 0


def _config_check(args: argparse.Namespace) -> int:
    problems = check_settings(Path(args.file))
    for problem in problems:
        print(f"{args.file}: {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{args.file}: OK")
    return 0


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> int:
    """'90', '30m', '1h', '7d' as seconds."""
    unit = text[-1].lower()
    try:
        return int(text[:-1]) * _DURATION[unit] if unit in _DURATION else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use e.g. 3600, 30m, 1h, 7d)"
        ) from None


def _token_create(args: argparse.Namespace) -> int:
    from dicomnode.archive.keys import load_or_create_signing_key
    from dicomnode.dicomweb.auth import issue_token

    settings = read_settings(args.config)
    key = load_or_create_signing_key(settings.node.data_dir)
    try:
        token = issue_token(key, settings.auth, args.subject, args.scope.split(), args.expires)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _open_archive(config: str | None) -> Any:
    from dicomnode.archive import Archive

    settings = read_settings(config)
    return Archive(settings.node.data_dir, settings.database_url, settings.dimse.duplicate_policy)


def _archive_check(args: argparse.Namespace) -> int:
    archive = _open_archive(args.config)
    try:
        report = archive.check(verify_hashes=args.hashes, repair=args.repair)
    finally:
        archive.close()
    print(f"{report.indexed} indexed instances, {report.blobs} blob files")
    for label, paths in (
        ("index row without its blob", report.missing_blobs),
        ("blob whose content does not match its SHA-256", report.corrupt_blobs),
        ("removed unindexed blob" if report.repaired else "unindexed blob", report.unindexed_blobs),
    ):
        for path in paths:
            print(f"{label}: {path}")
    return 0 if report.ok else 1


def _jobs(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from dicomnode.archive.jobs import JobStore

    archive = _open_archive(args.config)
    try:
        store = JobStore(archive.index)
        if args.jobs_command == "list":
            for job in store.list(state=args.state, study_uid=args.study, limit=args.limit):
                print(
                    f"{job.id:>6}  {job.state:<8} {job.analyzer:<16} attempts {job.attempts}/"
                    f"{job.max_attempts}  {job.created_at:%Y-%m-%d %H:%M:%S}  {job.unit_uid}"
                    + (f"  error: {job.error}" if job.error else "")
                )
        elif args.jobs_command == "show":
            print(json.dumps(store.get(args.id).as_dict(), indent=2))
        else:
            store.retry(args.id, datetime.now(UTC))
            print(f"job {args.id} queued again")
    finally:
        archive.close()
    return 0


def _analysis_run(args: argparse.Namespace) -> int:
    from dicomnode.analysis.runner import AnalysisService
    from dicomnode.app import build_services
    from dicomnode.core.metrics import Metrics

    settings = read_settings(args.config)
    archive = _open_archive(args.config)
    try:
        intake, egress, _ = build_services(settings, archive, Metrics())
        service = AnalysisService(settings.analysis, archive, intake, egress)
        job_ids = service.request(args.study)
    finally:
        archive.close()
    if not job_ids:
        print(f"no analyzer wants anything in study {args.study}", file=sys.stderr)
        return 1
    print(f"queued jobs {', '.join(map(str, job_ids))}; a running node's workers will run them")
    return 0


def _ledger_verify(args: argparse.Namespace) -> int:
    archive = _open_archive(args.config)
    try:
        result = archive.ledger.verify()
    finally:
        archive.close()
    if result.ok:
        print(f"ledger OK: {result.entries} entries verified; head {result.head_hash}")
        return 0
    print(
        f"ledger BROKEN at entry {result.first_bad}: {result.problem} "
        f"({result.entries} entries before it verified)",
        file=sys.stderr,
    )
    return 1


LEDGER_COLUMNS = ("seq", "recorded_at", "kind", "actor", "outcome", "detail", "prev_hash", "hash")


def _ledger_export(args: argparse.Namespace) -> int:
    archive = _open_archive(args.config)
    out = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        if args.format == "csv":
            writer = csv.writer(out)
            writer.writerow(LEDGER_COLUMNS)
            for entry in archive.ledger.entries():
                writer.writerow([getattr(entry, c) for c in LEDGER_COLUMNS])
        else:
            out.write("[")
            for i, entry in enumerate(archive.ledger.entries()):
                row = {c: getattr(entry, c) for c in LEDGER_COLUMNS} | {"detail": entry.data}
                out.write(("," if i else "") + "\n" + json.dumps(row, ensure_ascii=False))
            out.write("\n]\n")
    finally:
        archive.close()
        if out is not sys.stdout:
            out.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnode", description="A DICOM node for image analysis."
    )
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run DIMSE and HTTP services")
    serve.add_argument(
        "--config",
        help="TOML settings file (default: $DICOMNODE_CONFIG, else the embedded default)",
    )
    serve.set_defaults(run=_serve)

    token = commands.add_parser("token", help="bearer tokens for DICOMweb clients")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="print a token signed by the node's key")
    create.add_argument("--scope", required=True, help='e.g. "dicomweb.read dicomweb.write"')
    create.add_argument("--subject", required=True, help="who the token is for")
    create.add_argument(
        "--expires", type=_seconds, default=3600, help="lifetime: 3600, 30m, 1h, 7d"
    )
    create.add_argument("--config", help="settings file (for data_dir and the issuer)")
    create.set_defaults(run=_token_create)

    jobs = commands.add_parser("jobs", help="analysis jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = jobs_commands.add_parser("list", help="recent jobs, newest first")
    listing.add_argument("--state", choices=("queued", "running", "done", "failed", "skipped"))
    listing.add_argument("--study", help="only jobs of this StudyInstanceUID")
    listing.add_argument("--limit", type=int, default=50)
    show = jobs_commands.add_parser("show", help="one job in full (JSON)")
    show.add_argument("id", type=int)
    retry = jobs_commands.add_parser("retry", help="queue a failed or finished job again")
    retry.add_argument("id", type=int)
    for sub_parser in (listing, show, retry):
        sub_parser.add_argument("--config", help="settings file")
        sub_parser.set_defaults(run=_jobs)

    analysis = commands.add_parser("analysis", help="analysis")
    analysis_commands = analysis.add_subparsers(dest="analysis_command", required=True)
    run = analysis_commands.add_parser("run", help="queue every analysis of a study now")
    run.add_argument("--study", required=True, help="StudyInstanceUID")
    run.add_argument("--config", help="settings file")
    run.set_defaults(run=_analysis_run)

    archive = commands.add_parser("archive", help="archive maintenance")
    archive_commands = archive.add_subparsers(dest="archive_command", required=True)
    check = archive_commands.add_parser(
        "check", help="compare the index with the blob files; exit 1 if a row lacks its blob"
    )
    check.add_argument("--hashes", action="store_true", help="also verify every blob's SHA-256")
    check.add_argument("--repair", action="store_true", help="remove blobs no index row names")
    check.add_argument("--config", help="settings file (default: $DICOMNODE_CONFIG or embedded)")
    check.set_defaults(run=_archive_check)

    ledger = commands.add_parser("ledger", help="the hash-chained ledger of decisions")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", required=True)
    verify = ledger_commands.add_parser("verify", help="recompute the chain; exit 1 at a bad entry")
    verify.add_argument("--config", help="settings file (default: $DICOMNODE_CONFIG or embedded)")
    verify.set_defaults(run=_ledger_verify)
    export = ledger_commands.add_parser("export", help="write every entry as JSON or CSV")
    export.add_argument("--format", choices=("json", "csv"), default="json")
    export.add_argument("--output", help="file to write (default: standard output)")
    export.add_argument("--config", help="settings file (default: $DICOMNODE_CONFIG or embedded)")
    export.set_defaults(run=_ledger_export)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="report every problem in a settings file")
    check.add_argument("file")
    check.set_defaults(run=_config_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
