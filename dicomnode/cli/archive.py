"""`dicomnode archive check`, `jobs` and `analysis run`."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from dicomnode.cli.common import command, who, with_archive, with_services
from dicomnode.core.enums import JobState


@with_archive
def _archive_check(args: argparse.Namespace, archive: Any) -> int:
    report = archive.check(verify_hashes=args.hashes, repair=args.repair)
    print(f"{report.indexed} indexed instances, {report.blobs} blob files")
    for label, paths in (
        ("index row without its blob", report.missing_blobs),
        ("blob whose content does not match its SHA-256", report.corrupt_blobs),
        ("removed unindexed blob" if report.repaired else "unindexed blob", report.unindexed_blobs),
    ):
        for path in paths:
            print(f"{label}: {path}")
    return 0 if report.ok else 1


@with_archive
def _backup_purges(args: argparse.Namespace, archive: Any) -> int:
    """The backup purges destructions queued (item 31), or one marked done."""
    if args.done is not None:
        purge = archive.backup_purge_done(args.done, who(args))
        print(f"backup purge {purge.id} of study {purge.study_instance_uid} done")
        return 0
    keys = getattr(archive.blobs, "study_keys", None)
    if keys is None:
        print("encryption at rest is off ([storage] encrypt_at_rest): no purges", file=sys.stderr)
        return 1
    for purge in keys.backup_purges(args.state):
        print(
            f"{purge.id:>6}  {purge.state:<6}  due {purge.due_at:%Y-%m-%d}  destroyed "
            f"{purge.destroyed_at:%Y-%m-%d %H:%M}  {purge.study_instance_uid}  by {purge.actor}"
        )
    return 0


def _jobs(archive: Any) -> Any:
    from dicomnode.archive.jobs import JobStore

    return JobStore(archive.index)


@with_archive
def _jobs_list(args: argparse.Namespace, archive: Any) -> None:
    for job in _jobs(archive).list(state=args.state, study_uid=args.study, limit=args.limit):
        print(
            f"{job.id:>6}  {job.state:<8} {job.analyzer:<16} attempts {job.attempts}/"
            f"{job.max_attempts}  {job.created_at:%Y-%m-%d %H:%M:%S}  {job.unit_uid}"
            + (f"  {_job_note(job.state)}: {job.error}" if job.error else "")
        )


@with_archive
def _jobs_show(args: argparse.Namespace, archive: Any) -> None:
    print(json.dumps(_jobs(archive).get(args.id).as_dict(), indent=2))


@with_archive
def _jobs_retry(args: argparse.Namespace, archive: Any) -> None:
    _jobs(archive).retry(args.id, datetime.now(UTC))
    print(f"job {args.id} queued again")


def _job_note(state: str) -> str:
    """How `jobs list` labels a job's error column: why it did not run, or what failed."""
    return "why" if state in ("held", "not-applicable", "cancelled") else "error"


@with_services
def _analysis_run(args: argparse.Namespace, node: Any) -> int:
    from dicomnode.compose import build_analysis

    service = build_analysis(node.settings, node.archive, node.intake, node.egress)
    job_ids = service.request(args.study)
    if not job_ids:
        print(f"no analyzer wants anything in study {args.study}", file=sys.stderr)
        return 1
    print(f"queued jobs {', '.join(map(str, job_ids))}; a running node's workers will run them")
    return 0


JOB_STATES = tuple(s.value for s in JobState)


def add_parsers(commands: Any) -> None:
    """archive, jobs, analysis."""
    archive = commands.add_parser("archive", help="archive maintenance")
    archive_commands = archive.add_subparsers(dest="archive_command", required=True)
    check = command(
        archive_commands,
        "check",
        _archive_check,
        "compare the index with the blob files; exit 1 if a row lacks its blob",
    )
    check.add_argument("--hashes", action="store_true", help="also verify every blob's SHA-256")
    check.add_argument("--repair", action="store_true", help="remove blobs no index row names")
    purges = command(
        archive_commands,
        "backup-purges",
        _backup_purges,
        "the backup purges destructions queued (encryption at rest), or --done ID",
    )
    purges.add_argument("--state", choices=("queued", "done"), help="only purges in this state")
    purges.add_argument(
        "--done", type=int, metavar="ID", help="every backup holding its study is purged or expired"
    )
    purges.add_argument("--by", help="who says so (default: the login name)")

    jobs = commands.add_parser("jobs", help="analysis jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = command(jobs_commands, "list", _jobs_list, "recent jobs, newest first")
    listing.add_argument("--state", choices=JOB_STATES)
    listing.add_argument("--study", help="only jobs of this StudyInstanceUID")
    listing.add_argument("--limit", type=int, default=50)
    command(jobs_commands, "show", _jobs_show, "one job in full (JSON)").add_argument(
        "id", type=int
    )
    command(
        jobs_commands, "retry", _jobs_retry, "queue a failed or finished job again"
    ).add_argument("id", type=int)

    analysis = commands.add_parser("analysis", help="analysis")
    analysis_commands = analysis.add_subparsers(dest="analysis_command", required=True)
    run = command(analysis_commands, "run", _analysis_run, "queue every analysis of a study now")
    run.add_argument("--study", required=True, help="StudyInstanceUID")
