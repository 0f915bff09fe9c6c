"""The rules of PS3.15 Table E.1-1 as the de-identification engine applies them.

`TABLE` is our copy of Table E.1-1 (`deid_table`) as entries; `_plan(options)` gives each tag's
action under a set of options; `attribute_type` and `resolve_compound` turn a compound action
into a simple one by the attribute's Type in the object's IOD (`deid_types`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

from dicomnode.governance import deid_private, deid_table, deid_types

# Option name -> its column in deid_table (the two pixel options have no column).
_OPTION_COLUMN = {
    "retain-safe-private": "safe-private",
    "retain-uids": "uids",
    "retain-device-identity": "device",
    "retain-institution-identity": "institution",
    "retain-patient-characteristics": "patient-chars",
    "retain-longitudinal-full-dates": "full-dates",
    "retain-longitudinal-modified-dates": "modified-dates",
    "clean-descriptors": "descriptors",
    "clean-structured-content": "structured",
    "clean-graphics": "graphics",
}

# When several options give an attribute different actions, the most protective one wins.
_PROTECTION_ORDER = ("X", "Z", "D", "U", "C", "K")


@dataclass(frozen=True)
class TableEntry:
    """One row of Table E.1-1: tag or pattern, name, Basic Profile and option actions."""

    tag: str
    in_std_iod: bool
    basic: str
    options: dict[str, str]
    name: str


def _parse_table() -> tuple[TableEntry, ...]:
    entries = []
    for tag, in_std, basic, options, name in deid_table.ROWS:
        columns = dict(word.split("=", 1) for word in options.split())
        entries.append(TableEntry(tag, in_std == "Y", basic, columns, name))
    return tuple(entries)


TABLE: tuple[TableEntry, ...] = _parse_table()
EDITION = deid_table.EDITION
# Identifies the rules in force, for the ledger entry of each de-identification.
TABLE_SHA256 = hashlib.sha256(
    repr((deid_table.ROWS, deid_types.TYPES, deid_private.SAFE_PRIVATE_ATTRIBUTES)).encode()
).hexdigest()
_PATTERN_PRIVATE, _PATTERN_CURVE = "odd-group", "50xxxxxx"
_PATTERN_OVERLAY_DATA, _PATTERN_OVERLAY_COMMENTS = "60xx3000", "60xx4000"
_PATTERNS = (_PATTERN_PRIVATE, _PATTERN_CURVE, _PATTERN_OVERLAY_DATA, _PATTERN_OVERLAY_COMMENTS)


def _safe_private() -> frozenset[tuple[str, int, int]]:
    found = set()
    for creator, group, elements in deid_private.SAFE_PRIVATE_ATTRIBUTES:
        found.update((creator, int(group, 16), int(e, 16)) for e in elements.split())
    return frozenset(found)


_SAFE_PRIVATE = _safe_private()
_SAFE_PRIVATE_BLOCKS = frozenset((creator, group) for creator, group, _ in _SAFE_PRIVATE)


def _entry_action(entry: TableEntry, options: frozenset[str]) -> str:
    """The entry's action under `options`: an option's action overrides the Basic Profile's."""
    chosen = [
        entry.options[column]
        for option in options
        if (column := _OPTION_COLUMN.get(option)) in entry.options
    ]
    if not chosen:
        return entry.basic
    return min(chosen, key=_PROTECTION_ORDER.index)


@dataclass(frozen=True)
class _Plan:
    """Table actions for one set of options, precomputed for dict lookups."""

    by_tag: dict[int, str]
    private: str
    curve: str
    overlay_data: str
    overlay_comments: str

    def action(self, tag: int) -> str | None:
        found = self.by_tag.get(tag)
        if found is not None:
            return found
        group, element = tag >> 16, tag & 0xFFFF
        if group % 2:
            return self.private
        if group & 0xFF00 == 0x5000:
            return self.curve
        if group & 0xFF00 == 0x6000:
            if element == 0x3000:
                return self.overlay_data
            if element == 0x4000:
                return self.overlay_comments
        return None


@lru_cache(maxsize=64)
def _plan(options: frozenset[str]) -> _Plan:
    by_tag, patterns = {}, {}
    for entry in TABLE:
        action = _entry_action(entry, options)
        if entry.tag in _PATTERNS:
            patterns[entry.tag] = action
        else:
            by_tag[int(entry.tag, 16)] = action
    return _Plan(
        by_tag,
        patterns[_PATTERN_PRIVATE],
        patterns[_PATTERN_CURVE],
        patterns[_PATTERN_OVERLAY_DATA],
        patterns[_PATTERN_OVERLAY_COMMENTS],
    )


_FALLBACK_IOD = "*"  # deid_types' strictest Type over every IOD of the standard


def _strictest_by_leaf() -> dict[str, str]:
    strictest: dict[str, str] = {}
    for path, kind in deid_types.TYPES[_FALLBACK_IOD].items():
        leaf = path.rsplit("/", 1)[-1]
        strictest[leaf] = min(strictest.get(leaf, "3"), kind)
    return strictest


_STRICTEST_BY_LEAF = _strictest_by_leaf()


def attribute_type(iod: str | None, path: tuple[int, ...]) -> str:
    """The Type ("1", "2" or "3") of the attribute at `path` in `iod`, for compound actions.

    Unknown IOD: the strictest Type over all IODs. Top-level attribute not in a known IOD: "3"
    (optional there). A nested attribute whose sequence path is not tabulated: the strictest
    Type the attribute has anywhere, and "1" if it has none (the most protective action that
    keeps the object conformant: a dummy, never a removal that could break it).
    """
    key = "/".join(f"{t:08X}" for t in path)
    if iod is not None:
        found = deid_types.TYPES[iod].get(key)
        if found is not None:
            return found
        if len(path) == 1:
            return "3"
    found = deid_types.TYPES[_FALLBACK_IOD].get(key)
    if found is not None:
        return found
    if len(path) == 1:
        return "3"
    return _STRICTEST_BY_LEAF.get(key.rsplit("/", 1)[-1], "1")


_COMPOUND_BY_TYPE = {
    "Z/D": {"1": "D", "2": "Z", "3": "Z"},
    "X/Z": {"1": "Z", "2": "Z", "3": "X"},
    "X/D": {"1": "D", "2": "D", "3": "X"},
    "X/Z/D": {"1": "D", "2": "Z", "3": "X"},
    # Type 2 too keeps the items with their UIDs replaced: an empty reference sequence would
    # break the conditions that tie references together (e.g. the Common Instance Reference
    # Module of a SEG), and replaced UIDs identify nobody.
    "X/Z/U*": {"1": "U", "2": "U", "3": "X"},
}


def resolve_compound(action: str, kind: str) -> str:
    """A simple action for a compound one, given the attribute Type (PS3.15 Table E.1-1a)."""
    if "/" not in action:
        return action
    return _COMPOUND_BY_TYPE[action][kind]
