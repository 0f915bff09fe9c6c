"""Reading stored objects and their pixels for web answers, within bounds.

- Decoders: pydicom's plugins (Pillow, pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls, GDCM),
  plus one of ours for JPEG Extended with 12-bit samples (1.2.840.10008.1.2.4.51), which GDCM
  decodes but pydicom's GDCM plugin refuses. Importing this module registers it with pydicom,
  so `Dataset.decompress` and `pixel_array` anywhere in the process can use it (C-GET too).
- Bounds: an image whose decoded size (rows x columns x frames x samples x bits) is over
  `http.max_decoded_bytes` is not decoded (406, with the reason; `transfer-syntax=*` still
  gives it as stored), and a deflated data set is inflated step by step and never past that
  bound.
- Decoded frames come in the photometric interpretation and planar configuration that the
  instance's metadata states (PS3.5 8.2.1): a YBR_FULL or YBR_FULL_422 JPEG is not turned into
  RGB, so a viewer that converts colour after the metadata draws the right colour.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.pixels.decoders.base import DecodeRunner, get_decoder
from pydicom.uid import UID, JPEGExtended12Bit

from dicomnode.core.frames import native_frame_bytes
from dicomnode.dicomweb import media
from dicomnode.dicomweb.errors import NotAcceptable

try:
    import gdcm
except ImportError:  # python-gdcm is a dependency; without it .4.51 12-bit is refused (406)
    gdcm = None

PLUGIN_LABEL = "dicomnode-gdcm-12bit"
DECODER_DEPENDENCIES = {JPEGExtended12Bit: ("python-gdcm>=3.0.10",)}
_INFLATE_CHUNK = 1024 * 1024


class ImageTooLarge(NotAcceptable):
    """The image (or the inflated data set) is larger than the node decodes (HTTP 406)."""


class CannotDecode(NotAcceptable):
    """The stored pixels cannot be decoded here (HTTP 406; `transfer-syntax=*` gives them)."""


# --- a pydicom decoding plugin: JPEG Extended 12-bit through GDCM ---------------------------


def is_available(uid: str) -> bool:
    """Whether this plugin can decode `uid` (pydicom's plugin interface)."""
    return gdcm is not None and uid in DECODER_DEPENDENCIES


def decode_jpeg_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One JPEG Extended frame decoded by GDCM (pydicom's plugin interface)."""
    if runner.bits_stored <= 8:
        raise NotImplementedError("8-bit JPEG Extended is decoded by the other plugins")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    kind = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(kind))
    if runner.samples_per_pixel > 1:
        image.SetPlanarConfiguration(runner.planar_configuration)
    syntax = gdcm.TransferSyntax.GetTSType(str(JPEGExtended12Bit))
    image.SetTransferSyntax(gdcm.TransferSyntax(syntax))
    bits = runner.bits_stored
    image.SetPixelFormat(
        gdcm.PixelFormat(
            runner.samples_per_pixel, runner.bits_allocated, bits, bits - 1,
            runner.pixel_representation,
        )
    )  # fmt: skip
    decoded = image.GetBuffer()
    if decoded is None:
        raise ValueError("GDCM could not decode the JPEG Extended frame")
    return decoded.encode("utf-8", "surrogateescape")  # GDCM hands char* back as str


def register_decoders() -> None:
    """Add the 12-bit JPEG Extended plugin to pydicom's decoder (once per process)."""
    decoder = get_decoder(JPEGExtended12Bit)
    if PLUGIN_LABEL not in decoder._available and PLUGIN_LABEL not in decoder._unavailable:
        decoder.add_plugin(PLUGIN_LABEL, (__name__, "decode_jpeg_frame"))


register_decoders()


def decode_refusal(transfer_syntax: str) -> str | None:
    """Why pixels stored as `transfer_syntax` cannot be decoded here (None when they can)."""
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax:
        return f"{transfer_syntax} is not a transfer syntax this node knows"
    if not ts.is_compressed:
        return None if ts.is_little_endian else f"big endian {ts.name} is not converted"
    if transfer_syntax in media.VIDEO_MEDIA_TYPE:
        return f"{ts.name} is video; it is sent only as stored (transfer-syntax=*)"
    try:
        decoder = get_decoder(ts)
    except (NotImplementedError, ValueError):
        return f"no decoder here for {ts.name} ({transfer_syntax})"
    if not decoder.is_available:
        return f"no decoder is installed here for {ts.name} ({transfer_syntax})"
    return None


# --- bounds -----------------------------------------------------------------------------


def decoded_size(ds: Dataset) -> int:
    """Bytes of the decoded image: rows x columns x frames x samples x bits allocated / 8."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    return (
        int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * frames * samples * bits // 8
    )


def check_decoded_size(ds: Dataset, limit: int) -> None:
    """ImageTooLarge when decoding `ds` would take more than `limit` bytes."""
    size = decoded_size(ds)
    if size > limit:
        raise ImageTooLarge(
            f"the image decodes to {size} bytes ({ds.get('Rows')}x{ds.get('Columns')}, "
            f"{ds.get('NumberOfFrames', 1)} frames, {ds.get('SamplesPerPixel', 1)} samples, "
            f"{ds.get('BitsAllocated')} bits), over this node's limit of {limit} bytes "
            "(http.max_decoded_bytes); ask for transfer-syntax=* to receive it as stored"
        )


def _inflated_too_far(limit: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"the deflated data set inflates to more than {limit} bytes, this node's limit "
        "(http.max_decoded_bytes); ask for transfer-syntax=* to receive it as stored"
    )


class _Inflating:
    """A read-only file over a raw-deflate stream, inflated only as far as it is read (so a
    header read stops before the Pixel Data is inflated), never past `limit` bytes."""

    def __init__(self, source: BinaryIO, limit: int) -> None:
        self._source, self._limit = source, limit
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._data = bytearray()
        self._position = 0
        self._pending = b""

    def _fill(self, wanted: int | None) -> None:
        while wanted is None or len(self._data) < wanted:
            if not self._pending:
                if self._inflater.eof or not (chunk := self._source.read(_INFLATE_CHUNK)):
                    self._data += self._inflater.flush()
                    return
                self._pending = chunk
            step = _INFLATE_CHUNK if wanted is None else max(wanted - len(self._data), 65536)
            step = min(step, self._limit + 1 - len(self._data))
            self._data += self._inflater.decompress(self._pending, step)
            self._pending = self._inflater.unconsumed_tail
            if len(self._data) > self._limit:
                raise _inflated_too_far(self._limit)

    def read(self, size: int = -1) -> bytes:
        end = None if size is None or size < 0 else self._position + size
        self._fill(end)
        chunk = bytes(self._data[self._position : end])
        self._position += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self._fill(None)
        base = {0: 0, 1: self._position, 2: len(self._data)}[whence]
        self._position = max(base + offset, 0)
        return self._position

    def tell(self) -> int:
        return self._position


def check_transcodable(f: BinaryIO, limit: int) -> None:
    """ImageTooLarge when re-encoding the stored object read from `f` (a seekable stream)
    uncompressed would decode or inflate more than `limit` bytes (nothing is kept: a deflated
    one is inflated and dropped in steps)."""
    read_preamble(f, False)
    meta = _read_file_meta_info(f)
    syntax = UID(meta.get("TransferSyntaxUID", ""))
    if syntax.is_deflated:
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while (chunk := f.read(_INFLATE_CHUNK)) and not inflater.eof:
            while chunk:
                total += len(inflater.decompress(chunk, _INFLATE_CHUNK))
                if total > limit:
                    raise _inflated_too_far(limit)
                chunk = inflater.unconsumed_tail
    elif syntax.is_compressed:
        f.seek(0)
        check_decoded_size(pydicom.dcmread(f, stop_before_pixels=True), limit)


def read_instance(
    f: BinaryIO, limit: int, stop_before_pixels: bool = False, defer_size: int | None = None
) -> Dataset:
    """The stored object read from `f` (a seekable stream); a deflated one is inflated within
    `limit` bytes, and only up to its Pixel Data when `stop_before_pixels`."""
    read_preamble(f, False)
    meta = _read_file_meta_info(f)
    if not UID(meta.get("TransferSyntaxUID", "")).is_deflated:
        f.seek(0)
        return pydicom.dcmread(f, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
    stop = _pixels_stop if stop_before_pixels else None
    ds = read_dataset(_Inflating(f, limit), False, True, stop_when=stop)
    ds.file_meta = FileMetaDataset(meta)
    ds.set_original_encoding(False, True)
    return ds


def _pixels_stop(tag, vr, length) -> bool:  # noqa: ANN001 (pydicom's callback)
    return tag >= 0x7FE00010


# --- frames -----------------------------------------------------------------------------


def stored_frames(ds: Dataset, numbers: list[int], single_stream: bool = False) -> Iterator[bytes]:
    """The stored bitstream of each frame in `numbers` (1-based) of encapsulated Pixel Data
    (`single_stream`: all fragments are one stream, as in video)."""
    total = 1 if single_stream else int(ds.get("NumberOfFrames", 1) or 1)
    fragments = list(generate_fragmented_frames(ds.PixelData, number_of_frames=total))
    for n in numbers:
        yield b"".join(fragments[n - 1])


def _bit_frame(data: bytes, frame_bits: int, n: int) -> bytes:
    """Frame `n` of 1-bit pixel data (frames packed without gaps), packed from its own first
    byte, least significant bit first as stored."""
    start = (n - 1) * frame_bits
    first, last = start // 8, (start + frame_bits + 7) // 8
    bits = np.unpackbits(np.frombuffer(data[first : last + 1], np.uint8), bitorder="little")
    offset = start - first * 8
    return np.packbits(bits[offset : offset + frame_bits], bitorder="little").tobytes()


def _to_422(array: np.ndarray) -> np.ndarray:
    """A full YBR frame (rows, columns, 3) as YBR_FULL_422 samples: Y1 Y2 Cb Cr per pair of
    pixels, the chroma of each pair averaged."""
    rows, columns, _ = array.shape
    pairs = array[:, : columns - columns % 2].reshape(rows, columns // 2, 2, 3).astype(np.uint16)
    out = np.empty((rows, columns // 2, 4), dtype=array.dtype)
    out[..., 0] = pairs[:, :, 0, 0]
    out[..., 1] = pairs[:, :, 1, 0]
    out[..., 2] = (pairs[:, :, 0, 1] + pairs[:, :, 1, 1] + 1) // 2
    out[..., 3] = (pairs[:, :, 0, 2] + pairs[:, :, 1, 2] + 1) // 2
    return out


def native_frames(ds: Dataset, numbers: list[int], limit: int) -> Iterator[bytes]:
    """Each frame in `numbers` (1-based) as native little endian pixel values, laid out as the
    instance's metadata describes them (photometric interpretation, planar configuration;
    1-bit frames packed from their own first byte). Compressed frames are decoded one by one;
    CannotDecode or ImageTooLarge before anything is decoded."""
    stored = str(ds.file_meta.TransferSyntaxUID)
    check_decoded_size(ds, limit)
    syntax = UID(stored)
    if not syntax.is_compressed and (syntax.is_little_endian or int(ds.BitsAllocated) == 8):
        data = ds.PixelData
        if int(ds.BitsAllocated) == 1:
            frame_bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
            for n in numbers:
                yield _bit_frame(data, frame_bits, n)
            return
        size = native_frame_bytes(ds)
        for n in numbers:
            yield data[(n - 1) * size : n * size]
        return
    reason = decode_refusal(stored) if syntax.is_compressed else None
    if reason:
        raise CannotDecode(f"these frames cannot be decoded: {reason}")
    decoder = get_decoder(stored)  # big endian native values come back as little endian too
    photometric = str(ds.get("PhotometricInterpretation", ""))
    for n in numbers:
        array, _ = decoder.as_array(ds, index=n - 1, as_rgb=False)
        if array.ndim == 3 and photometric in ("YBR_FULL_422", "YBR_PARTIAL_422"):
            array = _to_422(array)
        elif array.ndim == 3 and int(ds.get("PlanarConfiguration", 0) or 0) == 1:
            array = np.ascontiguousarray(array.transpose(2, 0, 1))
        if int(ds.BitsAllocated) == 1:
            yield np.packbits(array.astype(np.uint8).ravel(), bitorder="little").tobytes()
            continue
        yield array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
