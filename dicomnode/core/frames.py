"""Where each frame of an object lies in its stored file: found once at ingest (`frame_table`),
kept in the index, and used by a WADO-RS frame retrieval to read the data set's header and
those frames' byte ranges only (a range GET on object storage) instead of the whole object.

Offsets count from the start of the data set (after the File Meta group), so a table stays
true whatever File Meta group the stored file carries. A table is only made where frames can
be found without decoding: native little endian pixels of 8 bits or more, and encapsulated
pixels whose fragments map to frames (one frame, a Basic or Extended Offset Table, one
fragment per frame, or frames each starting with a JPEG or JPEG 2000 marker)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

PIXEL_DATA = 0x7FE00010
_EXTENDED_OFFSETS, _EXTENDED_LENGTHS = 0x7FE00001, 0x7FE00002
_ITEM = b"\xfe\xff\x00\xe0"
_PIXEL_TAG = b"\xe0\x7f\x10\x00"
# what a frame's first fragment starts with: JPEG (SOI) and JPEG 2000 (SOC, SIZ)
_FRAME_STARTS = (b"\xff\xd8", b"\xff\x4f\xff\x51")


class StaleFrameTable(Exception):
    """The stored bytes are not where the table says (the reader falls back to the whole file)."""


def native_frame_bytes(ds: Dataset) -> int:
    """The bytes one frame of native (uncompressed) pixel data takes, as `ds` describes it."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
    if ds.get("PhotometricInterpretation") in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        return rows * columns * 2 * bits // 8  # two chroma samples per two pixels
    return rows * columns * samples * bits // 8


@dataclass(frozen=True)
class FrameTable:
    """Byte offsets from the start of the data set. `pixel_value` is where the Pixel Data
    element's value starts (its first item when encapsulated); native frames follow each other
    from there, `frame_bytes` each; encapsulated frame k is `spans[k-1]`, from the tag of its
    first fragment item to the end of its last fragment."""

    file_meta_bytes: int  # the File Meta group (with preamble) the table was made behind
    pixel_value: int
    frames: int
    frame_bytes: int = 0  # native
    spans: tuple[tuple[int, int], ...] = ()  # encapsulated

    @property
    def encapsulated(self) -> bool:
        return bool(self.spans)

    def frame_range(self, number: int) -> tuple[int, int]:
        """Frame `number` (1-based): [start, end) from the start of the data set."""
        if self.encapsulated:
            return self.spans[number - 1]
        start = self.pixel_value + (number - 1) * self.frame_bytes
        return start, start + self.frame_bytes

    def to_json(self) -> str:
        return json.dumps(
            {
                "meta": self.file_meta_bytes,
                "value": self.pixel_value,
                "frames": self.frames,
                "frame_bytes": self.frame_bytes,
                "spans": [list(span) for span in self.spans],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> FrameTable:
        data = json.loads(text)
        return cls(
            data["meta"],
            data["value"],
            data["frames"],
            data["frame_bytes"],
            tuple((int(a), int(b)) for a, b in data["spans"]),
        )


def frame_table(
    header: Dataset, transfer_syntax_uid: str, file_meta_bytes: int
) -> FrameTable | None:
    """The frames of the data set parsed as `header` (its elements still raw, as received),
    or None where they cannot be found without decoding."""
    syntax = UID(transfer_syntax_uid)
    raw = header.get_item(PIXEL_DATA) if PIXEL_DATA in header else None
    if (
        not isinstance(raw, RawDataElement)
        or syntax.is_deflated
        or not syntax.is_little_endian
        or raw.value is None
        or not header.get("Rows")
        or not header.get("Columns")
    ):
        return None
    try:
        frames = int(header.get("NumberOfFrames", 1) or 1)
        bits = int(header.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return None
    if frames < 1:
        return None
    if raw.length != 0xFFFFFFFF:  # native
        if syntax.is_compressed or bits < 8 or bits % 8:
            return None
        size = native_frame_bytes(header)
        if size <= 0 or size * frames > raw.length:
            return None
        return FrameTable(file_meta_bytes, raw.value_tell, frames, frame_bytes=size)
    spans = _encapsulated_spans(raw.value, header, frames)
    if spans is None:
        return None
    base = raw.value_tell
    return FrameTable(
        file_meta_bytes,
        base,
        frames,
        spans=tuple((base + start, base + end) for start, end in spans),
    )


def _items(value: bytes) -> list[tuple[int, int]]:
    """Each item of encapsulated pixel data: (offset of its tag, length of its value)."""
    items, position = [], 0
    while position + 8 <= len(value):
        tag, length = value[position : position + 4], struct.unpack_from("<I", value, position + 4)
        if tag != _ITEM:
            break  # the sequence delimiter (pydicom keeps it out of the value) or junk
        items.append((position, length[0]))
        position += 8 + length[0]
    return items


def _encapsulated_spans(value: bytes, header: Dataset, frames: int) -> list[tuple[int, int]] | None:
    """[start, end) of each frame within the encapsulated value, or None."""
    items = _items(value)
    if len(items) < 2:
        return None
    (_, bot_length), fragments = items[0], items[1:]
    first = fragments[0][0]
    starts: list[int] | None = None  # the fragment index each frame starts at
    offsets: list[int] = []
    if frames == 1:
        starts = [0]
    elif bot_length:
        offsets = list(struct.unpack_from(f"<{bot_length // 4}I", value, 8))
    elif _EXTENDED_OFFSETS in header:
        extended = header.get_item(_EXTENDED_OFFSETS).value or b""
        offsets = list(struct.unpack(f"<{len(extended) // 8}Q", extended))
    if starts is None and offsets:
        index_of = {position - first: n for n, (position, _) in enumerate(fragments)}
        if len(offsets) != frames or any(offset not in index_of for offset in offsets):
            return None
        starts = [index_of[offset] for offset in offsets]
    if starts is None and len(fragments) == frames:
        starts = list(range(frames))
    if starts is None:
        starts = [
            n
            for n, (position, _) in enumerate(fragments)
            if value[position + 8 : position + 12].startswith(_FRAME_STARTS)
        ]
    if len(starts) != frames or starts[0] != 0 or starts != sorted(set(starts)):
        return None
    ends = [*starts[1:], len(fragments)]
    spans = []
    for start, end in zip(starts, ends, strict=True):
        last_position, last_length = fragments[end - 1]
        spans.append((fragments[start][0], last_position + 8 + last_length))
    return spans


def split_items(data: bytes) -> bytes:
    """The fragments read for one frame span (items), joined: the frame's bitstream.
    StaleFrameTable when the bytes are not items filling the span exactly."""
    out, position = [], 0
    while position < len(data):
        if data[position : position + 4] != _ITEM or position + 8 > len(data):
            raise StaleFrameTable("no fragment item where the frame table says")
        (length,) = struct.unpack_from("<I", data, position + 4)
        out.append(data[position + 8 : position + 8 + length])
        position += 8 + length
    if position != len(data):
        raise StaleFrameTable("the fragments do not end where the frame table says")
    return b"".join(out)


def check_pixel_header(element_header: bytes) -> None:
    """The bytes just before the pixel value must end a Pixel Data element's header
    (explicit VR: tag, VR, reserved, length; implicit: tag, length): StaleFrameTable if not."""
    if _PIXEL_TAG not in element_header[-12:]:
        raise StaleFrameTable("no Pixel Data element where the frame table says")


# One read of consecutive frames covers at most this many bytes (more frames: more reads).
_MOST_PER_READ = 32 << 20


class StoredFrames:
    """A stored object's header and frames, read by byte range (`read_range(start, end)` of
    the stored file) with its `table`; StaleFrameTable when the file is not as the table says."""

    def __init__(self, table: FrameTable, read_range: Callable[[int, int], bytes]) -> None:
        self.table = table
        self._read_range = read_range
        head = read_range(0, table.file_meta_bytes + table.pixel_value)
        if head[128:132] != b"DICM" or len(head) < 144:
            raise StaleFrameTable("the stored file does not start with a File Meta group")
        (group_length,) = struct.unpack_from("<I", head, 140)
        if 144 + group_length != table.file_meta_bytes:
            raise StaleFrameTable("the stored file's File Meta group is not the one indexed")
        check_pixel_header(head)
        self.header = dcmread(BytesIO(head), stop_before_pixels=True)

    def read(self, numbers: list[int]) -> dict[int, bytes]:
        """Frames `numbers` (1-based, each at most `table.frames`), as stored: a native frame's
        pixel bytes, an encapsulated frame's fragments joined."""
        wanted, found = sorted(set(numbers)), {}
        runs: list[list[int]] = []
        for number in wanted:
            if (
                runs
                and number == runs[-1][-1] + 1
                and self._run_bytes(runs[-1] + [number]) <= (_MOST_PER_READ)
            ):
                runs[-1].append(number)
            else:
                runs.append([number])
        meta = self.table.file_meta_bytes
        for run in runs:
            start, end = self.table.frame_range(run[0])[0], self.table.frame_range(run[-1])[1]
            data = self._read_range(meta + start, meta + end)
            if len(data) != end - start:
                raise StaleFrameTable("the stored file ends before its frames do")
            for number in run:
                first, last = self.table.frame_range(number)
                part = data[first - start : last - start]
                found[number] = split_items(part) if self.table.encapsulated else part
        return found

    def _run_bytes(self, run: list[int]) -> int:
        return self.table.frame_range(run[-1])[1] - self.table.frame_range(run[0])[0]

    def dataset(self, numbers: list[int]) -> Dataset:
        """The header with Pixel Data holding just frames `numbers`, in that order (frame k of
        it is frame numbers[k-1] of the object)."""
        frames = self.read(numbers)
        ds = self.header
        for tag in (_EXTENDED_OFFSETS, _EXTENDED_LENGTHS):
            if tag in ds:
                del ds[tag]
        ds.NumberOfFrames = len(numbers)
        if self.table.encapsulated:
            ds.add_new(PIXEL_DATA, "OB", encapsulate([frames[n] for n in numbers], has_bot=True))
            ds["PixelData"].is_undefined_length = True
        else:
            vr = "OW" if int(ds.BitsAllocated) > 8 else "OB"
            ds.add_new(PIXEL_DATA, vr, b"".join(frames[n] for n in numbers))
        return ds
