"""Reading the few values ingest needs straight from a parsed header's raw elements.

Ingest reads about forty values of every arriving object (its UIDs, Patient ID and the
indexed attributes). pydicom's conversion of each one (keyword lookup, VR dispatch,
validation) costs more than the rest of filing the object, so the common case is read here
directly: one value in plain ASCII of a string VR, or a binary US. Anything else (another
character repertoire, ISO 2022 escapes, several values, an unexpected VR, an element already
converted) goes through pydicom, whose answer is the reference: `tests/test_elements.py`
checks that both give the same answers.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# String VRs whose single ASCII value pydicom gives back as the decoded text less trailing
# spaces and NULs.
_STRING_VRS = frozenset({"AS", "CS", "DA", "DT", "LO", "PN", "SH", "TM", "UI"})
_ESCAPE = 0x1B  # starts an ISO 2022 code extension: the bytes after it mean something else
_BACKSLASH = 0x5C  # separates values
_GROUP_SEPARATOR = 0x3D  # "=": separates a person name's alphabetic, ideographic, phonetic groups


class ElementReader:
    """Reads one attribute, named by keyword, from datasets parsed by ingest."""

    __slots__ = ("keyword", "tag", "vr")

    def __init__(self, keyword: str) -> None:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"{keyword} is not a DICOM keyword")
        self.keyword = keyword
        self.tag = tag
        self.vr = dictionary_VR(tag)

    def text(self, ds: Dataset) -> str | None:
        """The value as text without surrounding spaces (several values joined by
        backslashes); None when absent or empty."""
        raw = ds.get_item(self.tag)
        if raw is None:
            return None
        if self.vr in _STRING_VRS:
            fast = _plain_ascii(raw, self.vr)
            if fast is not None:
                return fast or None
        value = _value(ds, self.tag)
        if value is None:
            return None
        if isinstance(value, MultiValue):
            return "\\".join(str(v) for v in value).strip() or None
        return str(value).strip() or None

    def integer(self, ds: Dataset) -> int | None:
        """The value as an integer (the first of several text values); None when absent,
        empty or not a number."""
        raw = ds.get_item(self.tag)
        if raw is None:
            return None
        if self.vr == "US" and _is_raw(raw, self.vr) and len(raw.value) == 2:
            little_endian = ds.original_encoding[1] is not False
            return int(struct.unpack("<H" if little_endian else ">H", raw.value)[0])
        if self.vr == "IS":
            fast = _plain_ascii(raw, self.vr)
            if fast:
                try:
                    return int(fast)
                except ValueError:
                    pass  # pydicom decides ("1.0" is an IS it accepts)
        value = _value(ds, self.tag)
        if value is None:
            return None
        try:
            return int(value[0] if isinstance(value, MultiValue) else value)
        except (TypeError, ValueError):
            return None


@functools.cache
def reader_for(keyword: str) -> ElementReader:
    """The reader of `keyword`, made once (raises ValueError for an unknown keyword)."""
    return ElementReader(keyword)


def _is_raw(raw: Any, vr: str) -> bool:
    """Not yet converted, of the dictionary VR (or implicit), with a value."""
    return isinstance(raw, RawDataElement) and raw.VR in (None, vr) and bool(raw.value)


def _plain_ascii(raw: Any, vr: str) -> str | None:
    """The stripped text of a raw element holding one plain ASCII value ("" when empty),
    else None."""
    if not isinstance(raw, RawDataElement) or raw.VR not in (None, vr):
        return None
    value = raw.value
    if not value:
        return ""
    if not value.isascii() or _ESCAPE in value or _BACKSLASH in value:
        return None
    if vr == "PN" and _GROUP_SEPARATOR in value:  # pydicom drops trailing empty groups
        return None
    return value.decode("ascii").rstrip(" \x00").strip()


def _value(ds: Dataset, tag: int) -> Any:
    """pydicom's value of the element (None when empty)."""
    element = ds.get(tag)
    value = element.value if element is not None else None
    return None if value is None or value == "" else value
