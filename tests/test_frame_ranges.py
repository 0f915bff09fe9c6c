"""Frame offsets recorded at ingest (issue 20): a WADO-RS frame retrieval reads the data set's
header and the asked frames' byte ranges from the blob store, not the whole object; where the
stored file is not as the table says, the whole object still answers."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate_extended
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)
from sqlalchemy import update

from dicomnode.archive import schema
from dicomnode.archive.received import from_part10
from dicomnode.core.frames import FrameTable, StaleFrameTable, frame_table
from dicomnode.core.model import Source
from tests.conftest import dicomweb_client, open_archive
from tests.factory import make_ct, part10
from tests.test_dicomweb import get

SENDER = Source("dimse", "MODALITY")
ROWS = 64  # a 64 x 64 16-bit frame is 8 KiB


def multiframe(frames: int = 6, **attributes: object) -> tuple[pydicom.Dataset, np.ndarray]:
    pixels = np.random.default_rng(frames).integers(0, 4096, (frames, ROWS, ROWS), np.uint16)
    ds = make_ct(size=ROWS, NumberOfFrames=frames, **attributes)
    ds.PixelData = pixels.tobytes()
    return ds, pixels


def frames_of(pixel_data: bytes, number: int) -> list[bytes]:
    """Each frame's fragments of encapsulated `pixel_data`, joined."""
    fragmented = pydicom.encaps.generate_fragmented_frames(pixel_data, number_of_frames=number)
    return [b"".join(fragments) for fragments in fragmented]


def jpeg_like(number: int, size: int = 600) -> bytes:
    """A made-up frame bitstream that starts with a JPEG SOI marker (never decoded here)."""
    return b"\xff\xd8" + bytes([number]) * (size - 4) + b"\xff\xd9"


def encapsulated(ds: pydicom.Dataset, syntax: str, value: bytes) -> pydicom.Dataset:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = value
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def items(fragments: list[bytes], bot: list[int] | None = None) -> bytes:
    """Encapsulated Pixel Data items: a Basic Offset Table (empty unless `bot`), fragments."""
    table = struct.pack(f"<{len(bot)}I", *bot) if bot else b""
    out = [b"\xfe\xff\x00\xe0" + struct.pack("<I", len(table)) + table]
    out += [b"\xfe\xff\x00\xe0" + struct.pack("<I", len(f)) + f for f in fragments]
    return b"".join(out)


def two_fragments_each(frames: list[bytes]) -> list[bytes]:
    return [part for frame in frames for part in (frame[:300], frame[300:])]


def offsets_of(fragments: list[bytes], firsts: list[int]) -> list[int]:
    """Basic Offset Table values: where each frame's first fragment item starts."""
    positions, at = [], 0
    for fragment in fragments:
        positions.append(at)
        at += 8 + len(fragment)
    return [positions[n] for n in firsts]


FRAMES = [jpeg_like(n) for n in range(1, 5)]


def native_case() -> tuple[pydicom.Dataset, list[bytes]]:
    ds, pixels = multiframe()
    return ds, [frame.tobytes() for frame in pixels]


def rle_case() -> tuple[pydicom.Dataset, list[bytes]]:
    ds, pixels = multiframe(4)
    ds.compress(RLELossless)
    wanted = [
        b"".join(f)
        for f in pydicom.encaps.generate_fragmented_frames(ds.PixelData, number_of_frames=4)
    ]
    return ds, wanted


def basic_offset_table_case() -> tuple[pydicom.Dataset, list[bytes]]:
    fragments = two_fragments_each([b"\x00\x00" + f[2:] for f in FRAMES])  # no JPEG markers
    bot = offsets_of(fragments, [0, 2, 4, 6])
    ds = make_ct(NumberOfFrames=4)
    encapsulated(ds, JPEGBaseline8Bit, items(fragments, bot))
    return ds, [b"\x00\x00" + f[2:] for f in FRAMES]


def extended_offset_table_case() -> tuple[pydicom.Dataset, list[bytes]]:
    value, offsets, lengths = encapsulate_extended(FRAMES)
    ds = make_ct(NumberOfFrames=4)
    encapsulated(ds, JPEGBaseline8Bit, value)
    ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = offsets, lengths
    return ds, FRAMES


def marker_case() -> tuple[pydicom.Dataset, list[bytes]]:
    """No offset table and more fragments than frames: each frame starts with SOI."""
    ds = make_ct(NumberOfFrames=4)
    encapsulated(ds, JPEGBaseline8Bit, items(two_fragments_each(FRAMES)))
    return ds, FRAMES


CASES = {
    "native": native_case,
    "rle-one-fragment-per-frame": rle_case,
    "basic-offset-table": basic_offset_table_case,
    "extended-offset-table": extended_offset_table_case,
    "jpeg-markers": marker_case,
}


@pytest.fixture
def archive(tmp_path: Path):
    archive = open_archive(tmp_path / "data", f"sqlite:///{tmp_path / 'index.sqlite'}")
    yield archive
    archive.close()


def reads_of(archive, monkeypatch) -> list[tuple[int, int] | None]:
    """Every byte range the archive asks its blob store for (None: the whole blob)."""
    asked: list[tuple[int, int] | None] = []
    opened = archive.blobs.open

    def counting(key, byte_range=None):
        asked.append(byte_range)
        return opened(key, byte_range)

    monkeypatch.setattr(archive.blobs, "open", counting)
    return asked


@pytest.mark.parametrize("case", CASES)
def test_frames_are_read_by_their_byte_ranges_alone(archive, monkeypatch, case):
    """Frames 3 and 2 of each layout come back exactly, read by ranges that together cover
    the header and those two frames: never the whole blob, never another frame's bytes."""
    ds, frames = CASES[case]()
    data = part10(ds)
    stored = archive.store(from_part10(data), SENDER).instance
    asked = reads_of(archive, monkeypatch)
    found = archive.stored_frames(stored)
    assert found is not None, "the frame table was recorded at ingest"
    subset = found.dataset([3, 2])
    assert None not in asked
    header_end = len(data) - len(ds.PixelData)
    frame_sizes = len(frames[1]) + len(frames[2])
    overhead = 12 + 8 * 4  # the Pixel Data element's header; the fragments' item headers
    assert sum(end - start for start, end in asked) <= header_end + frame_sizes + overhead
    assert int(subset.NumberOfFrames) == 2
    if found.table.encapsulated:
        got = [
            b"".join(f)
            for f in pydicom.encaps.generate_fragmented_frames(subset.PixelData, number_of_frames=2)
        ]
    else:
        size = len(frames[0])
        got = [subset.PixelData[:size], subset.PixelData[size:]]
    assert got == [frames[2], frames[1]]


def test_no_table_where_frames_cannot_be_found_without_decoding():
    """Deflated, 1-bit and fragments that map to no frame: the whole object is read, as before."""
    deflated, _ = multiframe()
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    one_bit = make_ct(size=64, NumberOfFrames=2, BitsAllocated=1, BitsStored=1, HighBit=0)
    one_bit.PixelData = bytes(64 * 64 * 2 // 8)
    unmarked = make_ct(NumberOfFrames=4)
    encapsulated(unmarked, JPEGBaseline8Bit, items([b"\x00" * 300] * 8))
    for ds in (deflated, one_bit, unmarked):
        received = from_part10(part10(ds))
        table = frame_table(received.header, received.transfer_syntax_uid, 0)
        assert table is None, ds.file_meta.TransferSyntaxUID


def test_a_table_that_does_not_match_the_file_is_found_stale(archive):
    """A table behind another File Meta group, or pointing between fragments, is refused."""
    ds, _ = marker_case()
    stored = archive.store(from_part10(part10(ds)), SENDER).instance
    row = schema.instances.c.blob_path == stored.blob_path
    with archive.index.read() as conn:
        table = FrameTable.from_json(
            conn.execute(schema.instances.select().where(row)).one().frame_table
        )
    behind_other_meta = FrameTable(
        table.file_meta_bytes + 2, table.pixel_value, 4, spans=table.spans
    )
    between_items = FrameTable(
        table.file_meta_bytes, table.pixel_value, 4, spans=tuple((s + 8, e) for s, e in table.spans)
    )
    for wrong in (behind_other_meta, between_items):
        with archive.index.engine.begin() as conn:
            conn.execute(update(schema.instances).where(row).values(frame_table=wrong.to_json()))
        with pytest.raises(StaleFrameTable):
            archive.stored_frames(stored).read([2])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_wado_frames_come_from_the_table_and_from_the_whole_object_when_it_is_stale(
    start_node, database_url, caplog
):
    """Over HTTP: frames 5 and 1 of a native multi-frame instance are its pixels; after the
    index's table is spoiled the same request still answers the same bytes."""
    node = start_node()
    ds, pixels = multiframe()
    dicomweb_client(node).store_instances([pydicom.dcmread(BytesIO(part10(ds)))])
    path = (
        f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/5,1"
    )
    accept = {"Accept": 'multipart/related; type="application/octet-stream"'}
    first = get(node, path, **accept)
    assert first.status_code == 200
    assert pixels[4].tobytes() in first.content and pixels[0].tobytes() in first.content
    assert first.content.index(pixels[4].tobytes()) < first.content.index(pixels[0].tobytes())
    assert "not used" not in caplog.text  # the table served them
    archive = node.archive
    with archive.index.engine.begin() as conn:
        conn.execute(
            update(schema.instances)
            .where(schema.instances.c.sop_instance_uid == ds.SOPInstanceUID)
            .values(frame_table=FrameTable(0, 10, 6, frame_bytes=ROWS * ROWS * 2).to_json())
        )
    again = get(node, path, **accept)
    assert again.status_code == 200
    assert pixels[4].tobytes() in again.content and pixels[0].tobytes() in again.content
    assert f"frame table of {ds.SOPInstanceUID} not used" in caplog.text
