"""`dicomnode policy`: check, show, diff, deid-statement, publish."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dicomnode.cli.common import command, services, who, with_services


def _parsed(path: str) -> Any:
    """The policy in the file `path`; None (the problem printed) when it is unusable."""
    from dicomnode.governance import PolicyError, parse_policy

    try:
        return parse_policy(Path(path).read_text(encoding="utf-8"))
    except (OSError, PolicyError) as e:
        print(f"{path}: {e}", file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    from dicomnode.governance import notice_period

    policy = _parsed(args.file)
    if policy is None:
        return 1
    print(
        f"{args.file}: OK: version {policy.version}, {len(policy.activities)} activities, "
        f"{len(policy.recipients)} recipients, {len(policy.rules)} rules, "
        f"{len(policy.retention)} retention rules; effective from "
        f"{policy.effective_from:%Y-%m-%d %H:%M %Z} at the earliest "
        f"({notice_period(policy.material).days} days' notice from publication)"
    )
    return 0


@with_services
def _show(args: argparse.Namespace, node: Any) -> None:
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


def _diff(args: argparse.Namespace) -> int:
    from dicomnode.governance import diff_policies
    from dicomnode.governance.notice import NARROWER, classify_change

    new = _parsed(args.file)
    if new is None:
        return 1
    with services(args.config) as node:
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


@with_services
def _deid_statement(args: argparse.Namespace, node: Any) -> int:
    from dicomnode.governance import deid

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


@with_services
def _publish(args: argparse.Namespace, node: Any) -> int:
    from dicomnode.governance import PolicyError

    try:
        published, new = node.stewardship.publish_policy(
            Path(args.file).read_text(encoding="utf-8"), who(args), args.reason
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


def add_parsers(commands: Any) -> None:
    """policy check, show, diff, deid-statement, publish."""
    policy = commands.add_parser("policy", help="the governance policy")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_commands.add_parser("check", help="validate a policy file; exit 1 if unusable")
    check.add_argument("file")
    check.set_defaults(run=_check)
    command(policy_commands, "show", _show, "versions in force and scheduled")
    command(policy_commands, "diff", _diff, "a file against the version in force").add_argument(
        "file"
    )
    statement = command(
        policy_commands,
        "deid-statement",
        _deid_statement,
        "the PS3.15 E.1.3 conformance statement of a de-identification profile",
    )
    statement.add_argument("profile", help="the profile's id in the policy in force")
    publish = command(
        policy_commands,
        "publish",
        _publish,
        "publish a version: a narrowing takes effect at once, a widening after its notice period",
        by=True,
    )
    publish.add_argument("file")
    publish.add_argument(
        "--reason",
        default="",
        help="why (ledgered); initial-deployment: the first version replacing the embedded "
        "policy takes effect at once",
    )
