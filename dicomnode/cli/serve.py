"""`dicomnode serve`, `migrate`, `config check` and `token create`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dicomnode.cli.common import CONFIG_HELP, seconds
from dicomnode.config import check_settings, read_settings
from dicomnode.core.logs import configure_logging


def _serve(args: argparse.Namespace) -> int:
    settings = read_settings(args.config)
    configure_logging(settings.logging.level, settings.logging.format)
    from dicomnode.serve import Node  # imported late: `config check` needs none of it

    Node(settings).serve_forever()
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from dicomnode.compose import migrate_index

    settings = read_settings(args.config)
    configure_logging(settings.logging.level, settings.logging.format)
    revision = migrate_index(settings)
    print(f"index {settings.database_url.split('@')[-1]}: schema at revision {revision}")
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


def _token_create(args: argparse.Namespace) -> int:
    from dicomnode.archive.keys import KeyStore
    from dicomnode.cli.common import archive
    from dicomnode.core.model import PatientIdentity
    from dicomnode.dicomweb.auth import issue_token
    from dicomnode.governance.decisions import token_purpose
    from dicomnode.stewardship import Stewardship

    settings = read_settings(args.config)
    patient = PatientIdentity(args.patient_id, args.issuer) if args.patient_id else None
    with archive(args.config) as opened:  # the nodes' shared key, from the index
        key = KeyStore(opened.index, settings.node.data_dir).signing_key()
        purpose = args.purpose or token_purpose(
            Stewardship(opened).policy_status().in_force, args.subject
        )
    try:
        token = issue_token(
            key,
            settings.auth,
            args.subject,
            args.scope.split(),
            args.expires,
            purpose or None,
            patient,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(token)
    return 0


def add_parsers(commands: Any) -> None:
    """serve, migrate, token, config."""
    serve = commands.add_parser("serve", help="run DIMSE and HTTP services")
    serve.add_argument(
        "--config",
        help="TOML settings file (default: $DICOMNODE_CONFIG, else the embedded default)",
    )
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser(
        "migrate",
        help="bring the index database to this version's schema (serve does it for SQLite); "
        "several at once wait their turn",
    )
    migrate.add_argument("--config", help=CONFIG_HELP)
    migrate.set_defaults(run=_migrate)

    token = commands.add_parser("token", help="bearer tokens for DICOMweb clients")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="print a token signed by the node's key")
    create.add_argument(
        "--scope", required=True, help='e.g. "dicomweb.read dicomweb.write", "patient/*.read"'
    )
    create.add_argument("--subject", required=True, help="who the token is for")
    create.add_argument("--expires", type=seconds, default=3600, help="lifetime: 3600, 30m, 1h, 7d")
    create.add_argument(
        "--purpose",
        help="purpose_of_use claim (HL7 code, e.g. HRESCH); default: the one the policy in force "
        "gives --subject (its recipient's default purpose), else TREAT",
    )
    create.add_argument(
        "--patient-id",
        help="bind the token to this one patient (patient/*.read: QIDO/WADO of that patient only)",
    )
    create.add_argument("--issuer", help="the IssuerOfPatientID of --patient-id; default: none")
    create.add_argument("--config", help="settings file (for data_dir and the issuer)")
    create.set_defaults(run=_token_create)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="report every problem in a settings file")
    check.add_argument("file")
    check.set_defaults(run=_config_check)
