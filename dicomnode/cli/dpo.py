"""`dicomnode dpo user`: the local accounts of the DPO's pages."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from dicomnode.cli.common import command, with_archive


def _new_password(args: argparse.Namespace) -> str:
    """The password from one line of standard input, or typed twice at a prompt."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise argparse.ArgumentTypeError("the two passwords differ")
    return first


def _accounts(archive: Any) -> Any:
    from dicomnode.archive.accounts import AccountStore

    return AccountStore(archive.index)


@with_archive
def _add(args: argparse.Namespace, archive: Any) -> None:
    store = _accounts(archive)
    account = store.add(args.name, _new_password(args), args.role, args.display_name or "")
    print(f"account {account.username} ({account.role}) added")


@with_archive
def _list(args: argparse.Namespace, archive: Any) -> None:
    for account in _accounts(archive).list():
        state = f"disabled {account.disabled_at:%Y-%m-%d %H:%M}" if account.disabled_at else ""
        print(
            f"{account.username:<24} {account.role:<8} "
            f"created {account.created_at:%Y-%m-%d %H:%M}  {account.display_name}  {state}"
        )


@with_archive
def _disable(args: argparse.Namespace, archive: Any) -> None:
    account = _accounts(archive).disable(args.name)
    print(f"account {account.username} disabled; its sessions end at their next request")


def add_parsers(commands: Any) -> None:
    """dpo user add, list, disable."""
    dpo = commands.add_parser("dpo", help="the DPO's pages at /governance")
    dpo_commands = dpo.add_subparsers(dest="dpo_command", required=True)
    user = dpo_commands.add_parser("user", help="local accounts of the DPO pages")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    add = command(
        user_commands,
        "add",
        _add,
        "add an account (the password is asked for, or read from stdin)",
    )
    add.add_argument("name", help="user name: letters, digits, . _ @ -")
    add.add_argument("--role", required=True, choices=("dpo", "auditor"))
    add.add_argument("--display-name", help="the person's name as the pages show it")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    command(user_commands, "list", _list, "every account, disabled ones too")
    command(user_commands, "disable", _disable, "stop an account from signing in").add_argument(
        "name"
    )
