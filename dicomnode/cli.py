"""The `dicomnode` command: serve, configuration, tokens, archive and analysis maintenance, and
the governance operations (policy, consent, shares, deliveries, held objects, the ledger)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import getpass
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dicomnode import __version__
from dicomnode.config import check_settings, read_settings
from dicomnode.core.errors import ConfigError, DicomnodeError
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
        token = issue_token(
            key, settings.auth, args.subject, args.scope.split(), args.expires, args.purpose
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _open_archive(config: str | None) -> Any:
    from dicomnode.archive import Archive

    settings = read_settings(config)
    return Archive(
        settings.node.data_dir,
        settings.database_url,
        settings.dimse.duplicate_policy,
        settings.node.quota_bytes,
        settings.node.min_free_bytes,
    )


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
                    + (f"  {_job_note(job.state)}: {job.error}" if job.error else "")
                )
        elif args.jobs_command == "show":
            print(json.dumps(store.get(args.id).as_dict(), indent=2))
        else:
            store.retry(args.id, datetime.now(UTC))
            print(f"job {args.id} queued again")
    finally:
        archive.close()
    return 0


def _job_note(state: str) -> str:
    """How `jobs list` labels a job's error column: why it did not run, or what failed."""
    return "why" if state in ("held", "not-applicable", "cancelled") else "error"


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


@contextlib.contextmanager
def _node_services(config: str | None) -> Iterator[Any]:
    """Settings, archive, intake, egress and stewardship for one CLI command (no servers)."""
    from types import SimpleNamespace

    from dicomnode.app import build_services, publish_configured_policy
    from dicomnode.core.metrics import Metrics

    settings = read_settings(config)
    archive = _open_archive(config)
    try:
        intake, egress, stewardship = build_services(settings, archive, Metrics())
        publish_configured_policy(settings, stewardship)
        yield SimpleNamespace(
            settings=settings,
            archive=archive,
            intake=intake,
            egress=egress,
            stewardship=stewardship,
        )
    finally:
        archive.close()


def _who(args: argparse.Namespace) -> str:
    return getattr(args, "by", None) or f"cli:{getpass.getuser()}"


def _moment(text: str | None) -> datetime | None:
    from dicomnode.core.times import parse_moment

    if not text:
        return None
    try:
        return parse_moment(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or date-time: {text!r}") from None


def _read_checkpoints(path: str) -> list[Any]:
    from dicomnode.archive.ledger import Checkpoint

    marks = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            data = json.loads(line)
            marks.append(Checkpoint(data["seq"], data["hash"], data["at"], data["signature"]))
    return marks


def _ledger_verify(args: argparse.Namespace) -> int:
    from dicomnode.archive.keys import load_or_create_signing_key
    from dicomnode.stewardship import checkpoint_signed_by

    settings = read_settings(args.config)
    archive = _open_archive(args.config)
    try:
        extra = _read_checkpoints(args.checkpoints) if args.checkpoints else []
        marks = {c.seq: c for c in archive.ledger.checkpoints() + extra}
        key = load_or_create_signing_key(settings.node.data_dir)
        result = archive.ledger.verify(list(marks.values()), checkpoint_signed_by(key))
    finally:
        archive.close()
    if result.ok:
        print(
            f"ledger OK: {result.entries} entries verified against {result.checkpoints} signed "
            f"checkpoints; head {result.head_hash}"
        )
        return 0
    print(
        f"ledger BROKEN at entry {result.first_bad}: {result.problem} "
        f"({result.entries} entries before it verified)",
        file=sys.stderr,
    )
    return 1


def _ledger_checkpoint(args: argparse.Namespace) -> int:
    from dicomnode.archive.keys import load_or_create_signing_key, sign_json

    with _node_services(args.config) as node:
        key = load_or_create_signing_key(node.settings.node.data_dir)
        made = node.stewardship.checkpoint(lambda payload: sign_json(key, payload))
    if made is None:
        print("the ledger's head is already signed (or the ledger is empty)")
    else:
        print(json.dumps(made.as_dict()))
    return 0


def _ledger_checkpoints(args: argparse.Namespace) -> int:
    archive = _open_archive(args.config)
    try:
        lines = [json.dumps(c.as_dict()) for c in archive.ledger.checkpoints()]
    finally:
        archive.close()
    text = "".join(line + "\n" for line in lines)
    if args.output:
        Path(args.output).write_text(text)
        print(f"{len(lines)} checkpoints written to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


# --- policy -----------------------------------------------------------------------------------


def _policy_check(args: argparse.Namespace) -> int:
    from dicomnode.governance import PolicyError, notice_period, parse_policy

    try:
        policy = parse_policy(Path(args.file).read_text(encoding="utf-8"))
    except (OSError, PolicyError) as e:
        print(f"{args.file}: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: OK: version {policy.version}, {len(policy.activities)} activities, "
        f"{len(policy.recipients)} recipients, {len(policy.rules)} rules, "
        f"{len(policy.retention)} retention rules; effective from "
        f"{policy.effective_from:%Y-%m-%d %H:%M %Z} at the earliest "
        f"({notice_period(policy.material).days} days' notice from publication)"
    )
    return 0


def _policy_show(args: argparse.Namespace) -> int:
    with _node_services(args.config) as node:
        status = node.stewardship.policy_status()
    policy = status.in_force
    since = f"since {status.in_force_since:%Y-%m-%d %H:%M %Z}" if status.in_force_since else ""
    print(f"in force: {policy.version} {since or '(the embedded default policy)'}")
    for narrowing in policy.narrowed_by:
        print(f"  narrowed by {narrowing.version} (a request must be allowed by it too)")
    print(f"  controller: {policy.controller}")
    for rule in policy.rules:
        consent = ", consent required" if rule.consent_required else ""
        print(
            f"  rule {rule.id}: {rule.effect} {rule.activity} to {', '.join(rule.recipients)} "
            f"on {rule.lawful_basis}{consent}"
        )
    for published in status.scheduled:
        print(
            f"scheduled: {published.version}, published {published.published_at:%Y-%m-%d %H:%M}, "
            f"in force from {published.effective_at:%Y-%m-%d %H:%M %Z}"
            + (" (material change, 30 days' notice)" if published.material else "")
        )
    return 0


def _policy_diff(args: argparse.Namespace) -> int:
    from dicomnode.governance import PolicyError, diff_policies, parse_policy

    try:
        new = parse_policy(Path(args.file).read_text(encoding="utf-8"))
    except (OSError, PolicyError) as e:
        print(f"{args.file}: {e}", file=sys.stderr)
        return 1
    from dicomnode.governance.notice import NARROWER, classify_change

    with _node_services(args.config) as node:
        old = node.stewardship.policy_status().in_force
    lines = diff_policies(old, new)
    print(f"--- {old.version} (in force)\n+++ {new.version} ({args.file})")
    for line in lines:
        print(line)
    if not lines:
        print("(no differences)")
    change = classify_change(old, new)
    if change.kind == NARROWER:
        print("change: narrower (takes effect at once when published)")
    else:
        print(f"change: {change.kind} ({change.notice.days} days' notice); widens:")
        for finding in change.widens:
            print(f"  {finding}")
    return 0


def _policy_deid(args: argparse.Namespace) -> int:
    from dicomnode.governance import deid

    with _node_services(args.config) as node:
        policy = node.stewardship.policy_status().in_force
    rule = policy.deid_profile(args.profile)
    if rule is None:
        known = ", ".join(p.id for p in policy.deid_profiles) or "none"
        print(
            f"no de-identification profile {args.profile!r} in force (known: {known})",
            file=sys.stderr,
        )
        return 1
    statement = deid.conformance_statement(deid.DeidProfile(rule.id, frozenset(rule.options)))
    print(json.dumps(statement, indent=2, ensure_ascii=False))
    return 0


def _policy_publish(args: argparse.Namespace) -> int:
    from dicomnode.governance import PolicyError

    with _node_services(args.config) as node:
        try:
            published, new = node.stewardship.publish_policy(
                Path(args.file).read_text(encoding="utf-8"), _who(args), args.reason
            )
        except (OSError, PolicyError, ValueError) as e:
            print(f"{args.file}: {e}", file=sys.stderr)
            return 1
    state = "published" if new else "already published"
    print(
        f"policy {published.version} {state}; in force from "
        f"{published.effective_at:%Y-%m-%d %H:%M %Z}"
    )
    return 0


# --- consent and data subjects ----------------------------------------------------------------


def _consent_record(args: argparse.Namespace) -> int:
    with _node_services(args.config) as node:
        stored, changed = node.stewardship.record_consent(
            patient_id=args.patient_id,
            purpose=args.purpose,
            state=args.state,
            recorded_by=_who(args),
            issuer=args.issuer or None,
            valid_from=_moment(args.valid_from),
            valid_until=_moment(args.valid_until),
            evidence_ref=args.evidence or "",
            note=args.note or "",
            recipients=[r.strip() for r in (args.recipients or "").split(",") if r.strip()],
        )
    print(f"recorded {stored.ref} ({stored.state})")
    for key, ids in changed.items():
        if ids:
            print(f"  {key.replace('_', ' ')}: {', '.join(map(str, ids))}")
    return 0


def _consent_show(args: argparse.Namespace) -> int:
    with _node_services(args.config) as node:
        current = node.stewardship.consent_in_force(args.patient_id, args.issuer)
    if not current:
        print(f"no consent recorded for patient {args.patient_id}")
    for purpose, record in current.items():
        until = f" until {record['valid_until']}" if record["valid_until"] else ""
        state = "IN FORCE" if record["in_force"] else "not in force"
        print(f"{purpose:<8} {record['state']:<9} v{record['version']} {state}{until}")
    return 0


def _consent_history(args: argparse.Namespace) -> int:
    with _node_services(args.config) as node:
        history = node.stewardship.consent_history(args.patient_id, args.issuer)
    for record in history:
        print(json.dumps(record.as_dict(), ensure_ascii=False))
    return 0


def _subject(args: argparse.Namespace) -> int:
    from dicomnode.core.model import Source

    with _node_services(args.config) as node:
        command = args.subject_command
        if command == "restrict":
            restriction = node.stewardship.restrict(
                args.patient_id, _who(args), args.reason or "", issuer=args.issuer or ""
            )
            print(f"patient {args.patient_id} restricted ({restriction.ref})")
        elif command == "unrestrict":
            restriction = node.stewardship.unrestrict(args.patient_id, _who(args), args.issuer)
            print(f"patient {args.patient_id}: {restriction.ref} lifted")
        elif command == "export":
            summary = node.egress.export_subject(
                args.patient_id,
                Source("cli", _who(args)),
                Path(args.output),
                node.stewardship.subject_context(args.patient_id),
                issuer=args.issuer,
            )
            print(
                f"{len(summary['files'])} DICOM files of {len(summary['studies'])} studies and "
                f"a summary of {len(summary['disclosures'])} disclosures written to {args.output}"
            )
        else:
            outcome = node.stewardship.erase_subject(
                args.patient_id, _who(args), issuer=args.issuer
            )
            print(outcome.reason, file=sys.stdout if outcome.done else sys.stderr)
            return 0 if outcome.done else 1
    return 0


def _retention(args: argparse.Namespace) -> int:
    with _node_services(args.config) as node:
        if args.retention_command == "status":
            for item in node.stewardship.retention_status():
                print(
                    f"{item.action:<9} {item.category:<16} {item.study_instance_uid}  "
                    f"{item.instances} objects  {item.reason}"
                )
            return 0
        report = node.stewardship.retention_sweep(_who(args), dry_run=args.dry_run)
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
    return 0


def _hold(args: argparse.Namespace) -> int:
    with _node_services(args.config) as node:
        if args.hold_command == "place":
            hold = node.stewardship.place_hold(
                _who(args),
                args.owner,
                args.reason,
                patient_id=args.patient_id,
                study_uid=args.study,
                case_ref=args.case or "",
                review_date=_moment(args.review),
                issuer=args.issuer,
            )
            print(f"placed {hold.ref} on {hold.patient_id or hold.study_instance_uid}")
        elif args.hold_command == "release":
            hold = node.stewardship.release_hold(args.id, _who(args))
            print(f"released {hold.ref}")
        else:
            for hold in node.archive.registry.holds(active_only=not args.all):
                state = "active" if hold.active else f"released {hold.released_at:%Y-%m-%d}"
                review = f", review {hold.review_date:%Y-%m-%d}" if hold.review_date else ""
                print(
                    f"{hold.ref:<8} {hold.patient_id or hold.study_instance_uid}  "
                    f"owner {hold.owner}, case {hold.case_ref or '-'}{review}: {hold.reason} "
                    f"({state})"
                )
    return 0


# --- shares, deliveries, held objects ---------------------------------------------------------


def _print_delivery(delivery: Any) -> None:
    sent = len((delivery.outcome or {}).get("sent", []))
    print(
        f"{delivery.id:>6}  {delivery.kind:<7} {delivery.state:<9} to {delivery.recipient:<16} "
        f"{sent}/{len(delivery.sop_instance_uids)} sent, attempts {delivery.attempts}/"
        f"{delivery.max_attempts}  {delivery.study_instance_uid}"
        + (f"\n        {delivery.error}" if delivery.error else "")
    )


def _share(args: argparse.Namespace) -> int:
    with _node_services(args.config) as node:
        backoff = timedelta(seconds=node.settings.governance.delivery_backoff)
        delivery = node.egress.share_now(
            args.recipient, args.study, _who(args), backoff, args.purpose
        )
    _print_delivery(delivery)
    if delivery.state == "done":
        return 0
    if delivery.state == "queued":
        print("not all sent; a running node retries it (dicomnode deliveries list)")
    return 1


def _deliveries(args: argparse.Namespace) -> int:
    archive = _open_archive(args.config)
    try:
        registry = archive.registry
        if args.deliveries_command == "list":
            for delivery in registry.deliveries(args.state, args.patient_id, limit=args.limit):
                _print_delivery(delivery)
        elif args.deliveries_command == "show":
            print(json.dumps(registry.delivery(args.id).as_dict(), indent=2))
        else:
            registry.requeue_delivery(args.id, datetime.now(UTC), _who(args))
            print(f"delivery {args.id} queued again")
    finally:
        archive.close()
    return 0


def _held(args: argparse.Namespace) -> int:
    with _node_services(args.config) as node:
        if args.held_command == "list":
            for item in node.archive.registry.held(study_uid=args.study):
                print(
                    f"{item.held_at:%Y-%m-%d %H:%M:%S}  {item.study_instance_uid}  "
                    f"{item.sop_instance_uid}  from {item.source_caller or '?'}: {item.reason}"
                )
        elif args.held_command == "release":
            results = node.intake.release_held(args.study, _who(args))
            print(f"{len(results)} objects of study {args.study} filed into the archive")
        else:
            count = node.intake.discard_held(args.study, _who(args))
            print(f"{count} held objects of study {args.study} destroyed")
    return 0


# --- the DPO pages' local accounts -------------------------------------------------------------


def _new_password(args: argparse.Namespace) -> str:
    """The password from one line of standard input, or typed twice at a prompt."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise argparse.ArgumentTypeError("the two passwords differ")
    return first


def _dpo_user(args: argparse.Namespace) -> int:
    from dicomnode.archive.accounts import AccountStore

    archive = _open_archive(args.config)
    try:
        store = AccountStore(archive.index)
        if args.user_command == "add":
            account = store.add(args.name, _new_password(args), args.role, args.display_name or "")
            print(f"account {account.username} ({account.role}) added")
        elif args.user_command == "list":
            for account in store.list():
                state = (
                    f"disabled {account.disabled_at:%Y-%m-%d %H:%M}" if account.disabled_at else ""
                )
                print(
                    f"{account.username:<24} {account.role:<8} "
                    f"created {account.created_at:%Y-%m-%d %H:%M}  {account.display_name}  {state}"
                )
        else:
            account = store.disable(args.name)
            print(f"account {account.username} disabled; its sessions end at their next request")
    finally:
        archive.close()
    return 0


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
    create.add_argument(
        "--purpose", help="purpose_of_use claim (HL7 code, e.g. HRESCH); default: none"
    )
    create.add_argument("--config", help="settings file (for data_dir and the issuer)")
    create.set_defaults(run=_token_create)

    jobs = commands.add_parser("jobs", help="analysis jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = jobs_commands.add_parser("list", help="recent jobs, newest first")
    listing.add_argument(
        "--state",
        choices=(
            "queued",
            "running",
            "done",
            "failed",
            "skipped",
            "held",
            "cancelled",
            "not-applicable",
        ),
    )
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
    verify = ledger_commands.add_parser(
        "verify", help="recompute the chain and check it against the signed checkpoints"
    )
    verify.add_argument(
        "--checkpoints", help="also check against checkpoints exported earlier (JSON lines)"
    )
    verify.add_argument("--config", help="settings file (default: $DICOMNODE_CONFIG or embedded)")
    verify.set_defaults(run=_ledger_verify)
    signed = ledger_commands.add_parser("checkpoint", help="sign the ledger's head now")
    signed.add_argument("--config", help="settings file")
    signed.set_defaults(run=_ledger_checkpoint)
    listed = ledger_commands.add_parser(
        "checkpoints", help="export the signed checkpoints (JSON lines) to keep elsewhere"
    )
    listed.add_argument("--output", help="file to write (default: standard output)")
    listed.add_argument("--config", help="settings file")
    listed.set_defaults(run=_ledger_checkpoints)
    export = ledger_commands.add_parser("export", help="write every entry as JSON or CSV")
    export.add_argument("--format", choices=("json", "csv"), default="json")
    export.add_argument("--output", help="file to write (default: standard output)")
    export.add_argument("--config", help="settings file (default: $DICOMNODE_CONFIG or embedded)")
    export.set_defaults(run=_ledger_export)

    _governance_parsers(commands)
    _dpo_parsers(commands)
    _casework_parsers(commands)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="report every problem in a settings file")
    check.add_argument("file")
    check.set_defaults(run=_config_check)
    return parser


def _governance_parsers(commands: Any) -> None:
    def with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--config", help="settings file (default: $DICOMNODE_CONFIG)")
        return parser

    def with_by(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--by", help="who does this (default: cli:<login name>)")
        return parser

    policy = commands.add_parser("policy", help="the governance policy")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_commands.add_parser("check", help="validate a policy file; exit 1 if unusable")
    check.add_argument("file")
    check.set_defaults(run=_policy_check)
    show = with_config(policy_commands.add_parser("show", help="versions in force and scheduled"))
    show.set_defaults(run=_policy_show)
    diff = with_config(
        policy_commands.add_parser("diff", help="a file against the version in force")
    )
    diff.add_argument("file")
    diff.set_defaults(run=_policy_diff)
    statement = with_config(
        policy_commands.add_parser(
            "deid-statement",
            help="the PS3.15 E.1.3 conformance statement of a de-identification profile",
        )
    )
    statement.add_argument("profile", help="the profile's id in the policy in force")
    statement.set_defaults(run=_policy_deid)
    publish = with_by(
        with_config(
            policy_commands.add_parser(
                "publish",
                help="publish a version: a narrowing takes effect at once, a widening after "
                "its notice period",
            )
        )
    )
    publish.add_argument("file")
    publish.add_argument(
        "--reason",
        default="",
        help="why (ledgered); initial-deployment: the first version replacing the embedded "
        "policy takes effect at once",
    )
    publish.set_defaults(run=_policy_publish)

    consent = commands.add_parser("consent", help="the consent registry")
    consent_commands = consent.add_subparsers(dest="consent_command", required=True)
    record = with_by(
        with_config(
            consent_commands.add_parser(
                "record", help="record a new consent version for a patient and purpose"
            )
        )
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
    record.set_defaults(run=_consent_record)
    for name, run, text in (
        ("show", _consent_show, "the patient's current consent per purpose"),
        ("history", _consent_history, "every consent version of the patient (JSON lines)"),
    ):
        sub = with_config(consent_commands.add_parser(name, help=text))
        sub.add_argument("--patient-id", required=True)
        sub.add_argument("--issuer", help="IssuerOfPatientID: the consents that count for it")
        sub.set_defaults(run=run)

    subject = commands.add_parser("subject", help="data-subject requests")
    subject_commands = subject.add_subparsers(dest="subject_command", required=True)
    for name, text in (
        ("restrict", "stop analysis and every disclosure of a patient's data"),
        ("unrestrict", "lift a patient's restriction"),
        ("export", "write the patient's DICOM files and a summary of every disclosure"),
        ("erase", "destroy the patient's data, unless a legal hold or retention duty applies"),
    ):
        sub = with_by(with_config(subject_commands.add_parser(name, help=text)))
        sub.add_argument("--patient-id", required=True, help="matched exactly, never a pattern")
        if name in ("export", "erase"):
            sub.add_argument(
                "--issuer",
                help="IssuerOfPatientID; needed when the ID is held under several issuers",
            )
        if name in ("restrict", "unrestrict"):
            sub.add_argument(
                "--issuer", help="IssuerOfPatientID (restrict without it: the ID under any issuer)"
            )
        if name == "restrict":
            sub.add_argument("--reason")
        if name == "export":
            sub.add_argument("--output", required=True, help="folder to write (created)")
        sub.set_defaults(run=_subject)

    retention = commands.add_parser("retention", help="retention and destruction")
    retention_commands = retention.add_subparsers(dest="retention_command", required=True)
    sweep = with_by(
        with_config(
            retention_commands.add_parser(
                "sweep", help="destroy what expired (a running node does this on its own)"
            )
        )
    )
    sweep.add_argument("--dry-run", action="store_true", help="list what would go, change nothing")
    sweep.set_defaults(run=_retention)
    status = with_config(
        retention_commands.add_parser(
            "status", help="every study's expiry and what a sweep now would do"
        )
    )
    status.set_defaults(run=_retention)

    hold = commands.add_parser("hold", help="legal holds (block every deletion)")
    hold_commands = hold.add_subparsers(dest="hold_command", required=True)
    place = with_by(with_config(hold_commands.add_parser("place", help="place a legal hold")))
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
    place.set_defaults(run=_hold)
    release = with_by(with_config(hold_commands.add_parser("release", help="release a hold")))
    release.add_argument("id", type=int)
    release.set_defaults(run=_hold)
    listing = with_config(hold_commands.add_parser("list", help="active holds"))
    listing.add_argument("--all", action="store_true", help="released ones too")
    listing.set_defaults(run=_hold)

    share = with_by(
        with_config(
            commands.add_parser(
                "share", help="send a study to a policy recipient, if the policy allows it"
            )
        )
    )
    share.add_argument("--recipient", required=True, help="the recipient's id in the policy")
    share.add_argument("--study", required=True, help="StudyInstanceUID")
    share.add_argument("--purpose", help="HL7 purpose of use (default: the recipient's)")
    share.set_defaults(run=_share)

    deliveries = commands.add_parser("deliveries", help="forwarded results and shares")
    delivery_commands = deliveries.add_subparsers(dest="deliveries_command", required=True)
    listing = with_config(delivery_commands.add_parser("list", help="newest first"))
    listing.add_argument(
        "--state", choices=("queued", "sending", "done", "failed", "denied", "cancelled")
    )
    listing.add_argument("--patient-id")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(run=_deliveries)
    for name, text in (("show", "one delivery in full (JSON)"), ("retry", "queue it again")):
        sub = with_config(delivery_commands.add_parser(name, help=text))
        sub.add_argument("id", type=int)
        sub.set_defaults(run=_deliveries)

    held = commands.add_parser("held", help="objects intake filed aside")
    held_commands = held.add_subparsers(dest="held_command", required=True)
    listing = with_config(held_commands.add_parser("list", help="held objects and why"))
    listing.add_argument("--study")
    listing.set_defaults(run=_held)
    for name, text in (
        ("release", "file a study's held objects into the archive (they are then analysed)"),
        ("discard", "destroy a study's held objects"),
    ):
        sub = with_by(with_config(held_commands.add_parser(name, help=text)))
        sub.add_argument("--study", required=True)
        sub.set_defaults(run=_held)


def _dpo_parsers(commands: Any) -> None:
    dpo = commands.add_parser("dpo", help="the DPO's pages at /governance")
    dpo_commands = dpo.add_subparsers(dest="dpo_command", required=True)
    user = dpo_commands.add_parser("user", help="local accounts of the DPO pages")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    add = user_commands.add_parser(
        "add", help="add an account (the password is asked for, or read from stdin)"
    )
    add.add_argument("name", help="user name: letters, digits, . _ @ -")
    add.add_argument("--role", required=True, choices=("dpo", "auditor"))
    add.add_argument("--display-name", help="the person's name as the pages show it")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    listing = user_commands.add_parser("list", help="every account, disabled ones too")
    disable = user_commands.add_parser("disable", help="stop an account from signing in")
    disable.add_argument("name")
    for sub in (add, listing, disable):
        sub.add_argument("--config", help="settings file (default: $DICOMNODE_CONFIG)")
        sub.set_defaults(run=_dpo_user)


# --- the DPO's casework: breaches, the monthly review, data-subject request tickets ----------


@contextlib.contextmanager
def _casework(config: str | None) -> Iterator[Any]:
    from dicomnode.casework import Casework, review_settings

    with _node_services(config) as node:
        yield Casework(
            node.archive,
            node.stewardship,
            node.egress,
            review=review_settings(node.settings.dpo),
        )


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2, default=str))


def _required_moment(text: str) -> datetime:
    moment = _moment(text)
    assert moment is not None
    return moment


def _breach(args: argparse.Namespace) -> int:
    with _casework(args.config) as casework:
        command = args.breach_command
        if command == "record":
            record = casework.record_breach(
                _who(args),
                _required_moment(args.aware_at),
                args.what,
                _moment(args.occurred_at),
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
        elif command == "list":
            for record in casework.breaches():
                view = casework.breach_view(record)
                print(
                    json.dumps(
                        record.as_dict() | {"overdue": view["overdue"]},
                        ensure_ascii=False,
                    )
                )
        elif command == "show":
            view = casework.breach_view(casework.breach(args.id))
            _print_json(view | {"record": view["record"].as_dict(), "now": view["now"]})
        elif command == "notify":
            record = casework.notify_breach(
                args.id, args.to, _who(args), _moment(args.at), args.note or ""
            )
            print(f"{record.ref}: {args.to} notified; state {record.state}")
        else:
            record = casework.close_breach(args.id, _who(args), args.reason)
            print(f"{record.ref} closed")
    return 0


def _write_review(report: dict[str, Any], fmt: str, out: Any) -> None:
    from dicomnode.governance.casework import REVIEW_CSV_COLUMNS, review_rows

    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=REVIEW_CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(review_rows(report))
    else:
        out.write(json.dumps(report, ensure_ascii=False, indent=2) + "\n")


def _review(args: argparse.Namespace) -> int:
    with _casework(args.config) as casework:
        command = args.review_command
        if command == "report":
            report = casework.review_report(args.month)
            if args.output:
                with open(args.output, "w", newline="", encoding="utf-8") as out:
                    _write_review(report, args.format, out)
            else:
                _write_review(report, args.format, sys.stdout)
        elif command == "sign":
            entry = casework.sign_review(
                args.month, _who(args), args.finding, args.follow_up or "", args.sha256
            )
            print(f"review of {args.month} signed: ledger entry {entry.seq} ({entry.kind})")
        else:
            for entry in casework.reviews(args.month):
                print(json.dumps({"seq": entry.seq, "actor": entry.actor} | entry.data))
    return 0


def _ticket(args: argparse.Namespace) -> int:
    with _casework(args.config) as casework:
        command = args.ticket_command
        if command == "open":
            ticket = casework.open_ticket(
                args.kind,
                args.patient_id,
                _who(args),
                requester=args.requester or "",
                regimes=tuple(args.law or ["pipa"]),
                details=args.details or "",
                issuer=args.issuer or "",
                received_at=_moment(args.received_at),
            )
            print(
                f"{ticket.ref} opened: {ticket.kind} for {ticket.patient_id}, due {ticket.due_at}"
            )
            return 0
        if command == "list":
            for ticket in casework.tickets():
                overdue = casework.is_overdue(ticket)
                if not args.overdue or overdue:
                    print(json.dumps(ticket.as_dict() | {"overdue": overdue}, ensure_ascii=False))
            return 0
        if command == "show":
            ticket = casework.ticket(args.id)
            _print_json(ticket.as_dict() | {"overdue": casework.is_overdue(ticket)})
            return 0
        if command == "carry-out":
            output = Path(args.output) if args.output else None
            ticket = casework.carry_out(args.id, _who(args), output)
        elif command == "done":
            ticket = casework.complete(args.id, _who(args), args.note)
        elif command == "refuse":
            ticket = casework.refuse(args.id, _who(args), args.code, args.reason)
        else:
            ticket = casework.extend(args.id, _who(args), _required_moment(args.until), args.reason)
        print(f"{ticket.ref} {ticket.state}: {ticket.outcome}")
        return 0 if ticket.state != "refused" else 1


def _casework_parsers(commands: Any) -> None:
    from dicomnode.governance.casework import EXEMPTIONS, TICKET_KINDS

    def common(parser: argparse.ArgumentParser, by: bool = True) -> argparse.ArgumentParser:
        parser.add_argument("--config", help="settings file (default: $DICOMNODE_CONFIG)")
        if by:
            parser.add_argument("--by", help="who does this (default: cli:<login name>)")
        return parser

    breach = commands.add_parser("breach", help="the breach register (GDPR 33, PIPA 34)")
    breach_commands = breach.add_subparsers(dest="breach_command", required=True)
    record = common(breach_commands.add_parser("record", help="record an incident"))
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
    record.set_defaults(run=_breach)
    common(breach_commands.add_parser("list", help="every breach"), False).set_defaults(run=_breach)
    show = common(breach_commands.add_parser("show", help="deadlines and drafts (JSON)"), False)
    show.add_argument("id", type=int)
    show.set_defaults(run=_breach)
    notify = common(breach_commands.add_parser("notify", help="record a notification made"))
    notify.add_argument("id", type=int)
    notify.add_argument(
        "--to", required=True, choices=("subjects", "pipc", "supervisory-authority", "mohw")
    )
    notify.add_argument("--at", help="when (default: now)")
    notify.add_argument("--note", help="how, reference of the report")
    notify.set_defaults(run=_breach)
    close = common(breach_commands.add_parser("close", help="close a breach"))
    close.add_argument("id", type=int)
    close.add_argument("--reason", required=True)
    close.set_defaults(run=_breach)

    review = commands.add_parser("review", help="the monthly access review")
    review_commands = review.add_subparsers(dest="review_command", required=True)
    report = common(review_commands.add_parser("report", help="a month's report"), False)
    report.add_argument("--month", required=True, help="YYYY-MM")
    report.add_argument("--format", choices=("json", "csv"), default="json")
    report.add_argument("--output", help="file (default: standard output)")
    report.set_defaults(run=_review)
    sign = common(review_commands.add_parser("sign", help="sign a month's review off"))
    sign.add_argument("--month", required=True, help="YYYY-MM")
    sign.add_argument("--finding", required=True)
    sign.add_argument("--follow-up")
    sign.add_argument("--sha256", help="the report's hash as read (refused if it changed)")
    sign.set_defaults(run=_review)
    listing = common(review_commands.add_parser("list", help="sign-offs, newest first"), False)
    listing.add_argument("--month")
    listing.set_defaults(run=_review)

    ticket = commands.add_parser("ticket", help="data-subject request tickets")
    ticket_commands = ticket.add_subparsers(dest="ticket_command", required=True)
    opened = common(ticket_commands.add_parser("open", help="record a request"))
    opened.add_argument("--kind", required=True, choices=TICKET_KINDS)
    opened.add_argument("--patient-id", required=True)
    opened.add_argument("--issuer")
    opened.add_argument("--requester", help="who asked (default: the data subject)")
    opened.add_argument("--law", action="append", choices=("pipa", "gdpr"), help="repeatable")
    opened.add_argument("--details")
    opened.add_argument("--received-at", help="when it was received (default: now)")
    opened.set_defaults(run=_ticket)
    listing = common(ticket_commands.add_parser("list", help="every ticket"), False)
    listing.add_argument("--overdue", action="store_true")
    listing.set_defaults(run=_ticket)
    show = common(ticket_commands.add_parser("show", help="one ticket (JSON)"), False)
    show.add_argument("id", type=int)
    show.set_defaults(run=_ticket)
    carry = common(
        ticket_commands.add_parser(
            "carry-out", help="erase, restrict or export as the request asks"
        )
    )
    carry.add_argument("id", type=int)
    carry.add_argument("--output", help="folder for an access or portability export")
    carry.set_defaults(run=_ticket)
    done = common(ticket_commands.add_parser("done", help="mark done, saying what was done"))
    done.add_argument("id", type=int)
    done.add_argument("--note", required=True)
    done.set_defaults(run=_ticket)
    refuse = common(ticket_commands.add_parser("refuse", help="refuse with a coded exemption"))
    refuse.add_argument("id", type=int)
    refuse.add_argument("--code", required=True, choices=tuple(EXEMPTIONS))
    refuse.add_argument("--reason", required=True)
    refuse.set_defaults(run=_ticket)
    extend = common(ticket_commands.add_parser("extend", help="extend the deadline"))
    extend.add_argument("id", type=int)
    extend.add_argument("--until", required=True)
    extend.add_argument("--reason", required=True)
    extend.set_defaults(run=_ticket)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    except (DicomnodeError, argparse.ArgumentTypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
