"""Ingest's parse refuses a data set that does not end where its last element ends.

pydicom's reader stops quietly when fewer than 8 bytes remain (not even an element's tag and
length), so a data set with up to 7 stray bytes at its end looked complete; ingest counts
only the bytes of whole elements.
"""

from __future__ import annotations

import pytest

from dicomnode.archive.received import _parse_complete
from dicomnode.core.errors import InvalidInput
from tests.factory import encode_elements

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def encode(elements: list[tuple[int, str, bytes]], implicit: bool) -> bytes:
    return encode_elements(elements, IMPLICIT_LE if implicit else EXPLICIT_LE)


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_a_data_set_cut_anywhere_but_between_elements_is_refused(implicit):
    ts = IMPLICIT_LE if implicit else EXPLICIT_LE
    first = encode([(0x00100020, "LO", b"P1")], implicit)
    data = first + encode([(0x7FE00010, "OB", b"\x01" * 64)], implicit)
    assert _parse_complete(data, ts).PatientID == "P1"
    assert _parse_complete(first, ts).PatientID == "P1"  # the first element alone is whole
    for cut in set(range(1, len(data))) - {len(first)}:
        with pytest.raises(InvalidInput, match="truncated|cannot parse"):
            _parse_complete(data[:cut], ts)


@pytest.mark.parametrize("stray", [b"\0", b"\x10\x00", b"\x10\x00\x20\x00LO\x02"])
def test_stray_bytes_after_the_last_element_are_refused(stray):
    data = encode([(0x00100020, "LO", b"P1")], implicit=False) + stray
    with pytest.raises(InvalidInput, match=f"{len(stray)} trailing bytes"):
        _parse_complete(data, EXPLICIT_LE)
