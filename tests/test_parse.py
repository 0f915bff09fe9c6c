"""Ingest's parse refuses a data set that does not end where its last element ends, and
whatever bytes arrive it files or refuses with a reason (fuzzed with Hypothesis; more
examples by hand with DICOMNODE_FUZZ_EXAMPLES=50000).

pydicom's reader stops quietly when fewer than 8 bytes remain (not even an element's tag and
length), so a data set with up to 7 stray bytes at its end looked complete; ingest counts
only the bytes of whole elements.
"""

from __future__ import annotations

import functools
import os
import zlib

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomnode.archive.received import DimseCommand, _parse_complete, from_dimse, from_part10
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


# --- fuzzing: whatever arrives, ingest's parser files it or refuses it ---------------------

FUZZ_EXAMPLES = int(os.environ.get("DICOMNODE_FUZZ_EXAMPLES", "300"))
SYNTAXES = (
    IMPLICIT_LE,
    EXPLICIT_LE,
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.1.99",  # deflated
    "1.2.840.10008.1.2.4.50",  # JPEG baseline: encapsulated Pixel Data
)


@functools.cache
def _valid_data_set(syntax: str) -> bytes:
    """A small CT's data set encoded in `syntax` (deflated, or explicit VR LE for an
    encapsulated syntax, whose header is encoded like that)."""
    from pydicom.filewriter import write_dataset

    from tests.factory import make_ct

    ds = make_ct(size=4, seed=1, study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.2.3.4")
    del ds.file_meta
    uid = pydicom.uid.UID(syntax)
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian = uid.is_little_endian
    buffer.is_implicit_VR = uid.is_implicit_VR
    write_dataset(buffer, ds)
    data = buffer.getvalue()
    if uid.is_deflated:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data


@st.composite
def arriving_data_sets(draw: st.DrawFn) -> tuple[str, bytes]:
    """A transfer syntax and bytes: random, or a valid data set cut, spliced or with bytes
    changed (lengths that lie, VRs that do not exist, sequences that never end)."""
    syntax = draw(st.sampled_from(SYNTAXES))
    if draw(st.booleans()):
        return syntax, draw(st.binary(max_size=2048))
    data = bytearray(_valid_data_set(syntax))
    for _ in range(draw(st.integers(0, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        start = draw(st.integers(0, len(data)))
        data[start:start] = draw(st.binary(max_size=64))
    return syntax, bytes(data[: draw(st.integers(0, len(data)))])


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's notes on the invalid values
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(arriving_data_sets())
def test_fuzz_the_data_set_parser_files_or_refuses_never_crashes(arriving):
    syntax, data = arriving
    sop_class = "1.2.840.10008.5.1.4.1.1.2"
    command = DimseCommand.of(syntax, sop_class, "1.2.3.4")
    for parse in (
        lambda: from_dimse(command, data, max_inflated=1 << 20),
        lambda: from_part10(command.file_meta_bytes + data, max_inflated=1 << 20),
    ):
        try:
            received = parse()
        except InvalidInput:
            continue  # refused with a reason: the sender gets 0xC000/0xA900 or a failed part
        assert received.sop_class_uid == sop_class
        assert received.dataset_bytes == data
