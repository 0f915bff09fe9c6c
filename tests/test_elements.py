"""The fast reading of indexed values (dicomnode/core/elements.py) gives pydicom's answers.

The reference is what the index stored before the fast path existed: pydicom's value of the
element by keyword, several values joined by backslashes, stripped; integers as int(). Every
value is encoded byte by byte as a modality would send it, parsed by ingest's own parser and
read both ways.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.archive.index import normalized_value
from dicomnode.archive.received import _parse_complete
from dicomnode.core.attributes import INDEXED
from dicomnode.core.elements import ElementReader
from tests.factory import encode_elements

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"


def reference(keyword: str, ds: Dataset) -> str | int | None:
    """What the index stored for `keyword`, by pydicom's conversion alone."""
    attribute = INDEXED[keyword]
    element = ds.get(keyword)
    if element is None or element == "":
        return None
    if attribute.is_integer:
        try:
            return int(element[0] if isinstance(element, MultiValue) else element)
        except (TypeError, ValueError):
            return None
    text = "\\".join(str(v) for v in element) if isinstance(element, MultiValue) else str(element)
    text = text.strip()
    if attribute.vr == "DA":
        text = text.replace(".", "")
    elif attribute.vr == "TM":
        text = text.replace(":", "")
    return text or None


def raw_dataset(elements: list[tuple[int, str, bytes]], ts: str) -> Dataset:
    """A data set encoded byte by byte as a modality would send it, parsed by ingest."""
    padded = [
        (tag, vr, value + (b"\x00" if vr == "UI" else b" ") if len(value) % 2 else value)
        for tag, vr, value in sorted(elements)
    ]
    return _parse_complete(encode_elements(padded, ts), ts)


def charset_elements(charset: str | None) -> list[tuple[int, str, bytes]]:
    return [(0x00080005, "CS", charset.encode())] if charset else []


# Text with what modalities really send: padding spaces and NULs, backslashes (several
# values), tabs, non-ASCII letters, ISO 2022 escapes, and numbers for the IS attributes.
text_values = st.one_of(
    st.text(alphabet=st.sampled_from("AZaz09 .:^=-_\\\x00\t"), max_size=20),
    st.text(alphabet=st.sampled_from("AZ éü\\"), max_size=12),
    st.sampled_from(["", " ", "  12", "12 ", "+7", "1.0", "abc", "1\\2", "\x1b$BF|\x1b(B"]),
)
TEXT_KEYWORDS = sorted(k for k, a in INDEXED.items() if a.vr != "US")
CODECS = {"ISO_IR 192": "utf-8", "ISO 2022 IR 87": "iso2022_jp"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keyword=st.sampled_from(TEXT_KEYWORDS),
    value=text_values,
    ts=st.sampled_from([EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE]),
    charset=st.sampled_from([None, "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 87"]),
)
# person names with empty trailing groups, which pydicom drops (found by this test)
@example(keyword="PatientName", value="=", ts=EXPLICIT_LE, charset=None)
@example(keyword="PatientName", value="Doe^Jane==", ts=EXPLICIT_LE, charset=None)
def test_text_values_read_as_pydicom_reads_them(keyword, value, ts, charset):
    try:
        raw = value.encode(CODECS.get(charset, "latin-1"))
    except UnicodeEncodeError:
        raw = value.encode("utf-8")
    attribute = INDEXED[keyword]
    elements = [*charset_elements(charset), (attribute.reader.tag, attribute.vr, raw)]
    try:
        expected = reference(keyword, raw_dataset(elements, ts))
    except Exception:  # pydicom itself cannot read it: nothing to compare with
        return
    assert normalized_value(attribute, raw_dataset(elements, ts)) == expected


@pytest.mark.parametrize("ts", [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE])
@pytest.mark.parametrize("value", [0, 1, 512, 65535])
def test_binary_integers_in_each_byte_order(ts, value):
    order = ">" if ts == EXPLICIT_BE else "<"
    elements = [
        (INDEXED["Rows"].reader.tag, "US", struct.pack(order + "H", value)),
        (INDEXED["Columns"].reader.tag, "US", struct.pack(order + "H", 7)),
    ]
    assert normalized_value(INDEXED["Rows"], raw_dataset(elements, ts)) == value
    assert reference("Rows", raw_dataset(elements, ts)) == value
    assert normalized_value(INDEXED["Columns"], raw_dataset(elements, ts)) == 7


def test_several_binary_values_as_pydicom_gives_them():
    # pydicom gives a plain list, which was never read as a number: still not indexed.
    elements = [(INDEXED["Rows"].reader.tag, "US", b"\x02\x00\x03\x00")]
    assert normalized_value(INDEXED["Rows"], raw_dataset(elements, EXPLICIT_LE)) is None
    assert reference("Rows", raw_dataset(elements, EXPLICIT_LE)) is None


def test_values_already_converted_and_absent_ones():
    elements = [(0x00100010, "PN", b"Doe^Jane"), (0x00080020, "DA", b"2024.01.02")]
    ds = raw_dataset(elements, EXPLICIT_LE)
    assert str(ds.PatientName) == "Doe^Jane"  # converted by pydicom now: the fast path steps aside
    assert normalized_value(INDEXED["PatientName"], ds) == "Doe^Jane"
    assert normalized_value(INDEXED["StudyDate"], ds) == "20240102"
    assert normalized_value(INDEXED["StudyTime"], ds) is None
    assert normalized_value(INDEXED["InstanceNumber"], ds) is None


def test_non_ascii_and_escaped_values_go_through_pydicom():
    utf8 = [*charset_elements("ISO_IR 192"), (0x00100010, "PN", "Müller^Jürgen".encode())]
    assert normalized_value(INDEXED["PatientName"], raw_dataset(utf8, EXPLICIT_LE)) == (
        "Müller^Jürgen"
    )
    name = b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"
    jis = [(0x00080005, "CS", b"\\ISO 2022 IR 87"), (0x00100010, "PN", name)]
    assert normalized_value(INDEXED["PatientName"], raw_dataset(jis, EXPLICIT_LE)) == (
        "Yamada^Tarou=山田^太郎"
    )


def test_unknown_keyword_is_refused():
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        ElementReader("NoSuchKeyword")
