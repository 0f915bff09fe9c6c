"""The STOW-RS multipart/related parser, fed by streams that cut the body anywhere."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomnode.core.errors import InvalidInput
from dicomnode.dicomweb import multipart
from dicomnode.dicomweb.multipart import PartTooLarge, read_multipart

BOUNDARY = "b0undary"


class Trickle(io.RawIOBase):
    """A stream that hands out at most `step` bytes per read, as a slow client's socket does."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.at = data, step, 0

    def read(self, size: int = -1) -> bytes:
        count = self.step if size < 0 else min(size, self.step)
        chunk = self.data[self.at : self.at + count]
        self.at += len(chunk)
        return chunk


def body(parts: list[bytes], preamble: bytes = b"") -> bytes:
    out = [preamble + b"\r\n" if preamble else b""]
    for part in parts:
        out.append(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        out.append(part + b"\r\n")
    out.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(out)


# Part contents made to contain near-boundaries: a separator cut short, CRLFs, dashes.
near_boundary = st.sampled_from(
    [b"\r\n", b"--", b"\r\n--", f"\r\n--{BOUNDARY[:-1]}".encode(), b"b0und", b"\r\n\r\n", b"x"]
)
part_bytes = st.lists(st.one_of(near_boundary, st.binary(max_size=40)), max_size=12).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(part_bytes, min_size=1, max_size=5),
    step=st.integers(min_value=1, max_value=64),
    preamble=st.sampled_from([b"", b"a preamble"]),
)
def test_parts_come_back_byte_for_byte_however_the_stream_is_cut(parts, step, preamble):
    read = read_multipart(Trickle(body(parts, preamble), step), BOUNDARY, 10_000)
    assert [p.read() for p in read] == parts
    assert [p.content_type for p in read] == ["application/dicom"] * len(parts)
    assert [p.open().read() for p in read] == parts


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(part_bytes, min_size=1, max_size=3), data=st.data())
def test_a_body_cut_anywhere_before_its_closing_delimiter_is_refused(parts, data):
    whole = body(parts)
    cut = data.draw(st.integers(min_value=0, max_value=len(whole) - len(b"--\r\n") - 1))
    with pytest.raises(InvalidInput):
        read_multipart(Trickle(whole[:cut], 7), BOUNDARY, 10_000)


def test_a_large_part_spills_to_a_file_and_reads_back_whole(monkeypatch):
    monkeypatch.setattr(multipart, "SPOOL_IN_MEMORY", 1000)
    big, small = bytes(range(256)) * 40, b"small part"
    read = read_multipart(Trickle(body([big, small]), 333), BOUNDARY, 100_000)
    assert read[0]._file is not None and read[1]._file is None
    assert read[0].read() == big and read[0].open().read() == big
    assert read[1].read() == small


def test_a_part_over_the_limit_is_refused_as_too_large():
    with pytest.raises(PartTooLarge, match="part 2"):
        read_multipart(io.BytesIO(body([b"a" * 100, b"b" * 101])), BOUNDARY, 100)


def test_a_body_with_another_boundary_is_refused():
    with pytest.raises(InvalidInput, match="does not start with the multipart boundary"):
        read_multipart(io.BytesIO(body([b"x"])), "another", 100)
