"""The `dicomnode` command: serve, and check a configuration file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
