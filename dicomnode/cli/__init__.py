"""The `dicomnode` command: serve, configuration, tokens, archive and analysis maintenance, and
the governance operations (policy, consent, shares, deliveries, held objects, the ledger, the
DPO's casework). One module per command group; each adds its parsers with `add_parsers`."""

from __future__ import annotations

import argparse
import sys

from dicomnode import __version__
from dicomnode.cli import (
    archive,
    casework,
    dpo,
    ledger,
    oversight,
    policy,
    serve,
    sharing,
    subjects,
)
from dicomnode.core.errors import ConfigError, DicomnodeError

# In the order `dicomnode --help` lists them.
COMMAND_GROUPS = (serve, archive, ledger, policy, subjects, sharing, dpo, casework, oversight)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command: each group adds its own."""
    parser = argparse.ArgumentParser(
        prog="dicomnode", description="A DICOM node for image analysis."
    )
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status (2 for a configuration error, 1 for another error)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    except (DicomnodeError, argparse.ArgumentTypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
