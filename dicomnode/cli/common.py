"""What every command group shares: the ``--config`` and ``--by`` options, opening the node's
services for one command (`with_services`), parsing moments and durations, printing JSON."""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from dicomnode.config import read_settings

CONFIG_HELP = "settings file (default: $DICOMNODE_CONFIG, else the embedded default)"
BY_HELP = "who does this (default: cli:<login name>)"

Run = Callable[[argparse.Namespace], int]


def with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` with the ``--config`` option."""
    parser.add_argument("--config", help=CONFIG_HELP)
    return parser


def with_by(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` with the ``--config`` and ``--by`` options (a command that changes something)."""
    with_config(parser)
    parser.add_argument("--by", help=BY_HELP)
    return parser


def command(
    parent: Any, name: str, run: Run, help: str, by: bool = False
) -> argparse.ArgumentParser:
    """A subcommand `name` of `parent` (a subparsers action) running `run`, with ``--config``
    (and ``--by`` when it changes something)."""
    parser = parent.add_parser(name, help=help)
    parser.set_defaults(run=run)
    return with_by(parser) if by else with_config(parser)


@contextlib.contextmanager
def services(config: str | None) -> Iterator[Any]:
    """The node's rooms for one command (`compose` role ``cli``: no servers, nothing
    published), closed afterwards."""
    from dicomnode.compose import CLI, compose

    composed = compose(read_settings(config), CLI)
    try:
        yield composed
    finally:
        composed.close()


@contextlib.contextmanager
def archive(config: str | None) -> Iterator[Any]:
    """The archive alone, for a command that reads or mends what it stores, closed afterwards."""
    from dicomnode.compose import open_archive

    opened = open_archive(read_settings(config))
    try:
        yield opened
    finally:
        opened.close()


Body = Callable[[argparse.Namespace, Any], "int | None"]


def with_services(body: Body) -> Run:
    """A command that runs `body(args, services)` over the node's rooms opened from
    ``args.config``; its exit status is what `body` returns (None: 0)."""
    return _run_over(services, body)


def with_archive(body: Body) -> Run:
    """A command that runs `body(args, archive)` over the archive opened from
    ``args.config``; its exit status is what `body` returns (None: 0)."""
    return _run_over(archive, body)


def _run_over(opener: Callable[[str | None], Any], body: Body) -> Run:
    @functools.wraps(body)
    def run(args: argparse.Namespace) -> int:
        with opener(args.config) as opened:
            return int(body(args, opened) or 0)

    return run


def who(args: argparse.Namespace) -> str:
    """Who does this: ``--by``, else the login name."""
    return getattr(args, "by", None) or f"cli:{getpass.getuser()}"


def moment(text: str | None) -> datetime | None:
    """An ISO 8601 date or date-time (None for none given)."""
    from dicomnode.core.times import parse_moment

    if not text:
        return None
    try:
        return parse_moment(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or date-time: {text!r}") from None


def required_moment(text: str) -> datetime:
    """An ISO 8601 date or date-time that must be given."""
    parsed = moment(text)
    if parsed is None:
        raise argparse.ArgumentTypeError("a date or date-time is required")
    return parsed


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> int:
    """'90', '30m', '1h', '7d' as seconds."""
    unit = text[-1].lower()
    try:
        return int(text[:-1]) * _DURATION[unit] if unit in _DURATION else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use e.g. 3600, 30m, 1h, 7d)"
        ) from None


def print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2, default=str))
