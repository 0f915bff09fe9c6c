"""What leaves and what waits: `dicomnode share`, `deliveries` and `held`."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from dicomnode.cli.common import command, who, with_archive, with_services
from dicomnode.core.enums import DeliveryState

DELIVERY_STATES = tuple(s.value for s in DeliveryState)


def _print_delivery(delivery: Any) -> None:
    sent = len((delivery.outcome or {}).get("sent", []))
    print(
        f"{delivery.id:>6}  {delivery.kind:<7} {delivery.state:<9} to {delivery.recipient:<16} "
        f"{sent}/{len(delivery.sop_instance_uids)} sent, attempts {delivery.attempts}/"
        f"{delivery.max_attempts}  {delivery.study_instance_uid}"
        + (f"\n        {delivery.error}" if delivery.error else "")
    )


@with_services
def _share(args: argparse.Namespace, node: Any) -> int:
    backoff = timedelta(seconds=node.settings.governance.delivery_backoff)
    delivery = node.egress.share_now(args.recipient, args.study, who(args), backoff, args.purpose)
    _print_delivery(delivery)
    if delivery.state == "done":
        return 0
    if delivery.state == "queued":
        print("not all sent; a running node retries it (dicomnode deliveries list)")
    return 1


@with_archive
def _deliveries_list(args: argparse.Namespace, archive: Any) -> None:
    for delivery in archive.registry.deliveries(args.state, args.patient_id, limit=args.limit):
        _print_delivery(delivery)


@with_archive
def _deliveries_show(args: argparse.Namespace, archive: Any) -> None:
    print(json.dumps(archive.registry.delivery(args.id).as_dict(), indent=2))


@with_archive
def _deliveries_retry(args: argparse.Namespace, archive: Any) -> None:
    archive.registry.requeue_delivery(args.id, datetime.now(UTC), who(args))
    print(f"delivery {args.id} queued again")


@with_archive
def _held_list(args: argparse.Namespace, archive: Any) -> None:
    for item in archive.registry.quarantined(study_uid=args.study):
        print(
            f"{item.held_at:%Y-%m-%d %H:%M:%S}  {item.study_instance_uid}  "
            f"{item.sop_instance_uid}  from {item.source_caller or '?'}: {item.reason}"
        )


@with_services
def _held_release(args: argparse.Namespace, node: Any) -> None:
    results = node.intake.release_held(args.study, who(args))
    print(f"{len(results)} objects of study {args.study} filed into the archive")


@with_services
def _held_discard(args: argparse.Namespace, node: Any) -> None:
    count = node.intake.discard_held(args.study, who(args))
    print(f"{count} held objects of study {args.study} destroyed")


def add_parsers(commands: Any) -> None:
    """share, deliveries, held."""
    share = command(
        commands,
        "share",
        _share,
        "send a study to a policy recipient, if the policy allows it",
        by=True,
    )
    share.add_argument("--recipient", required=True, help="the recipient's id in the policy")
    share.add_argument("--study", required=True, help="StudyInstanceUID")
    share.add_argument("--purpose", help="HL7 purpose of use (default: the recipient's)")

    deliveries = commands.add_parser("deliveries", help="forwarded results and shares")
    delivery_commands = deliveries.add_subparsers(dest="deliveries_command", required=True)
    listing = command(delivery_commands, "list", _deliveries_list, "newest first")
    listing.add_argument("--state", choices=DELIVERY_STATES)
    listing.add_argument("--patient-id")
    listing.add_argument("--limit", type=int, default=50)
    for name, run, text in (
        ("show", _deliveries_show, "one delivery in full (JSON)"),
        ("retry", _deliveries_retry, "queue it again"),
    ):
        command(delivery_commands, name, run, text).add_argument("id", type=int)

    held = commands.add_parser("held", help="objects intake filed aside")
    held_commands = held.add_subparsers(dest="held_command", required=True)
    command(held_commands, "list", _held_list, "held objects and why").add_argument("--study")
    for name, run, text in (
        (
            "release",
            _held_release,
            "file a study's held objects into the archive (they are then analysed)",
        ),
        ("discard", _held_discard, "destroy a study's held objects"),
    ):
        command(held_commands, name, run, text, by=True).add_argument("--study", required=True)
