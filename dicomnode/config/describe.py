"""How a setting is described: once, as the field of its section's dataclass.

`setting(default, doc, ...)` declares one key (its TOML kind follows from the default unless
given, its check, its one-line doc); `section(...)`, `named_sections(...)` and `array(...)` declare
the tables inside a section. `describe(Settings)` lists every key with its description: the
reader, the README reference and the tests all start from it, so adding a setting is one field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

Check = Callable[[Any], "str | None"]


def _same(value: Any, base: Path) -> Any:
    return value


@dataclass(frozen=True)
class Kind:
    """A TOML value kind: the TOML types it accepts and how a value becomes the setting's."""

    label: str  # for the README: "integer", "path", ...
    types: tuple[type, ...]
    convert: Callable[[Any, Path], Any] = _same  # (TOML value, base folder) -> setting value
    empty: Any = ""  # what a required key that is missing is read as (a problem is reported)
    items: bool = False  # a list or table whose values must be non-empty strings
    check: Check | None = None


INT = Kind("integer", (int,), empty=0)
NUMBER = Kind("number", (int, float), lambda v, base: float(v), empty=0.0)
BOOL = Kind("boolean", (bool,), empty=False)
TEXT = Kind("string", (str,))
PATH = Kind("path", (str,), lambda v, base: base / v)
OPTIONAL_PATH = Kind("path", (str,), lambda v, base: (base / v) if v else None)
STRINGS = Kind("list of strings", (list,), lambda v, base: tuple(v), empty=[], items=True)
TABLE = Kind("table", (dict,), empty={})
PATH_TABLE = Kind(
    "table of paths",
    (dict,),
    lambda v, base: tuple((k, base / p) for k, p in sorted(v.items())),
    empty={},
    items=True,
)


def choice(options: type[StrEnum] | tuple[str, ...]) -> Kind:
    """One of a closed list of strings; a StrEnum's values become its members."""
    values = tuple(str(o.value) if isinstance(o, StrEnum) else o for o in options)
    enum = options if isinstance(options, type) else None

    def check(value: str) -> str | None:
        return None if value in values else f"must be one of {', '.join(values)}; got {value!r}"

    def convert(value: str, base: Path) -> Any:
        return enum(value) if enum is not None else value

    return Kind("one of " + ", ".join(f'"{v}"' for v in values), (str,), convert, check=check)


@dataclass(frozen=True)
class Setting:
    """One key: its default, its one-line doc, its kind and its check."""

    default: Any
    doc: str
    kind: Kind
    check: Check | None = None
    hint: str = ""  # the message when a list's (or table's) values are not non-empty strings
    convert: Callable[[Any], Any] | None = None  # applied after the kind's conversion
    required: bool = False
    must_exist: bool = False  # a path that must name an existing file when given
    shown: str = ""  # the default as README shows it, when it is not the plain value


def _kind_of(default: Any) -> Kind:
    if isinstance(default, bool):
        return BOOL
    if isinstance(default, StrEnum):
        return choice(type(default))
    for python_type, kind in ((int, INT), (float, NUMBER), (str, TEXT), (Path, PATH)):
        if isinstance(default, python_type):
            return kind
    if isinstance(default, tuple):
        return STRINGS
    if isinstance(default, dict):
        return TABLE
    raise TypeError(f"name the kind of a setting whose default is {default!r}")


def setting(
    default: Any,
    doc: str,
    *,
    kind: Kind | None = None,
    check: Check | None = None,
    hint: str = "",
    convert: Callable[[Any], Any] | None = None,
    required: bool = False,
    must_exist: bool = False,
    shown: str = "",
) -> Any:
    """A dataclass field that is one settings key (`required`: the field has no default)."""
    described = Setting(
        default,
        doc,
        kind or _kind_of(default),
        check,
        hint,
        convert,
        required,
        must_exist,
        shown,
    )
    meta = {"setting": described}
    if required:
        return field(metadata=meta)
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Table:
    """A table inside a section: one (`optional` ones may be absent), one per name, or an
    array of tables."""

    cls: type
    doc: str
    shape: str  # "one", "named", "array"
    optional: bool = False


def section(cls: type, doc: str, *, optional: bool = False) -> Any:
    """A field that is a table of its own, e.g. [dimse.tls]."""
    meta = {"table": Table(cls, doc, "one", optional)}
    if optional:
        return field(default=None, metadata=meta)
    return field(default_factory=cls, metadata=meta)


def named_sections(cls: type, doc: str) -> Any:
    """A field that holds one table per name, e.g. [analysis.analyzers."xa-qca"]."""
    return field(default=(), metadata={"table": Table(cls, doc, "named")})


def array(cls: type, doc: str) -> Any:
    """A field that is an array of tables, e.g. [[peers]]."""
    return field(default=(), metadata={"table": Table(cls, doc, "array")})


def grouped(doc: str, **settings: Setting) -> Any:
    """A dict field filled from several keys of the table, each kept only when it is given
    (an analyzer's fit rules)."""
    return field(default_factory=dict, metadata={"group": settings, "doc": doc})


def item(default: Any, doc: str, **options: Any) -> Setting:
    """One key of a `grouped` field."""
    return setting(default, doc, **options).metadata["setting"]


@dataclass(frozen=True)
class Described:
    """One key as the README and the tests see it."""

    section: str  # "dimse", "dimse.tls", "analysis.analyzers.NAME", "peers"
    name: str
    setting: Setting

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name


@dataclass(frozen=True)
class Heading:
    """A table as the README shows it, with its doc."""

    section: str
    doc: str
    array: bool = False  # an array of tables, [[section]]


def describe(cls: type, section: str = "") -> Iterator[Described | Heading]:
    """Every table and key under `cls`, in declaration order."""
    for f in fields(cls):
        meta = f.metadata
        if "setting" in meta:
            yield Described(section, f.name, meta["setting"])
        elif "group" in meta:
            for name, described in meta["group"].items():
                yield Described(section, name, described)
        elif "table" in meta:
            table: Table = meta["table"]
            inner = f"{section}.{f.name}" if section else f.name
            inner += ".NAME" if table.shape == "named" else ""
            yield Heading(inner, table.doc, table.shape == "array")
            yield from describe(table.cls, inner)


def keys(cls: type) -> list[Described]:
    """Every key under `cls`."""
    return [d for d in describe(cls) if isinstance(d, Described)]


# Checks: each returns the problem with a value, or None.


def port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"must be 0-65535 (0 picks a free port), got {value}"


def remote_port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else f"must be 1-65535, got {value}"


def process_count(value: int) -> str | None:
    return None if 1 <= value <= 64 else f"must be 1-64, got {value}"


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be greater than 0, got {value}"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value}"


def at_least(minimum: int) -> Check:
    def check(value: int) -> str | None:
        return None if value >= minimum else f"must be at least {minimum}"

    return check


def ae_title(value: str) -> str | None:
    if not 1 <= len(value.strip()) <= 16:
        return f"must be 1-16 characters, got {value!r}"
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        return f"must be printable ASCII without backslash, got {value!r}"
    return None


def services(options: tuple[str, ...]) -> Check:
    """A list of names from `options` (a peer's DIMSE services)."""

    def check(values: list[str]) -> str | None:
        bad = [v for v in values if v not in options]
        return f"unknown services {bad}; use {', '.join(options)}" if bad else None

    return check


def http_url(value: str) -> str | None:
    if not value or value.startswith(("http://", "https://")):
        return None
    return f"must be an http(s) URL such as https://pacs-gw.hospital/, got {value!r}"


def nonempty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def networks(value: list[Any]) -> str | None:
    """IP addresses or networks, e.g. ["10.0.0.5", "10.1.0.0/24"]."""
    for address in value:
        try:
            ipaddress.ip_network(address, strict=False)
        except (TypeError, ValueError):
            return f"must be a list of IP addresses or networks (CIDR), got {address!r}"
    return None


def database_url(value: str) -> str | None:
    if not value or value.startswith(("sqlite:///", "postgresql+psycopg://", "postgresql://")):
        return None
    return f"must start with sqlite:/// or postgresql+psycopg://, got {value!r}"


def zone(value: str) -> str | None:
    """A problem with an IANA time zone name such as Asia/Seoul, or None."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(value)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        return f"is not a time zone name such as Asia/Seoul: {value!r}"
    return None


ACCESS_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a study access tag (item 41)


def access_tag(value: str) -> str | None:
    if ACCESS_TAG.fullmatch(value):
        return None
    return f"must be 1-64 letters, digits, . _ - starting with a letter or digit: {value!r}"


def hour(value: int) -> str | None:
    return None if 0 <= value <= 24 else f"must be an hour from 0 to 24, got {value}"
