"""`dicomnode ledger`: verify the chain, sign its head, export checkpoints and entries."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from dicomnode.cli.common import command, with_archive, with_services

LEDGER_COLUMNS = ("seq", "recorded_at", "kind", "actor", "outcome", "detail", "prev_hash", "hash")


def _read_checkpoints(path: str) -> list[Any]:
    from dicomnode.archive.ledger import Checkpoint

    marks = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            data = json.loads(line)
            marks.append(Checkpoint(data["seq"], data["hash"], data["at"], data["signature"]))
    return marks


def _signing_key(node: Any) -> Any:
    from dicomnode.archive.keys import KeyStore

    return KeyStore(node.archive.index, node.settings.node.data_dir).signing_key()


@with_services
def _verify(args: argparse.Namespace, node: Any) -> int:
    from dicomnode.stewardship import checkpoint_signed_by

    ledger = node.archive.ledger
    extra = _read_checkpoints(args.checkpoints) if args.checkpoints else []
    marks = {c.seq: c for c in ledger.checkpoints() + extra}
    result = ledger.verify(list(marks.values()), checkpoint_signed_by(_signing_key(node)))
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


@with_services
def _checkpoint(args: argparse.Namespace, node: Any) -> None:
    from dicomnode.archive.keys import sign_json

    key = _signing_key(node)
    made = node.stewardship.checkpoint(lambda payload: sign_json(key, payload))
    if made is None:
        print("the ledger's head is already signed (or the ledger is empty)")
    else:
        print(json.dumps(made.as_dict()))


@with_archive
def _checkpoints(args: argparse.Namespace, archive: Any) -> None:
    lines = [json.dumps(c.as_dict()) for c in archive.ledger.checkpoints()]
    text = "".join(line + "\n" for line in lines)
    if args.output:
        Path(args.output).write_text(text)
        print(f"{len(lines)} checkpoints written to {args.output}")
    else:
        sys.stdout.write(text)


@with_archive
def _export(args: argparse.Namespace, archive: Any) -> None:
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
        if out is not sys.stdout:
            out.close()


def add_parsers(commands: Any) -> None:
    """ledger verify, checkpoint, checkpoints, export."""
    ledger = commands.add_parser("ledger", help="the hash-chained ledger of decisions")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", required=True)
    verify = command(
        ledger_commands,
        "verify",
        _verify,
        "recompute the chain and check it against the signed checkpoints",
    )
    verify.add_argument(
        "--checkpoints", help="also check against checkpoints exported earlier (JSON lines)"
    )
    command(ledger_commands, "checkpoint", _checkpoint, "sign the ledger's head now")
    listed = command(
        ledger_commands,
        "checkpoints",
        _checkpoints,
        "export the signed checkpoints (JSON lines) to keep elsewhere",
    )
    listed.add_argument("--output", help="file to write (default: standard output)")
    export = command(ledger_commands, "export", _export, "write every entry as JSON or CSV")
    export.add_argument("--format", choices=("json", "csv"), default="json")
    export.add_argument("--output", help="file to write (default: standard output)")
