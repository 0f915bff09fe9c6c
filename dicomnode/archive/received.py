"""Parsing and validation of an object as it arrives, before anything is stored.

`ReceivedObject` holds the data set bytes exactly as received (they are what the archive
keeps, with their SHA-256) and the parsed header the index reads. The SHA-256 is computed
on the receiving thread (hashlib lets go of the GIL while it hashes): handing it to a
hashing thread cost more, in thread switches, than the overlap gained. Anything that cannot be
parsed completely, lacks a required UID or Patient ID, or carries a UID not fit for a path
is refused here with InvalidInput.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.uid import UID

from dicomnode import __version__
from dicomnode.core.elements import reader_for
from dicomnode.core.errors import DatasetMismatch, InvalidInput, MissingAttribute, TooLarge
from dicomnode.core.uids import validate_uid

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1573.1"
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]
_UNDEFINED_LENGTH = 0xFFFFFFFF
PREAMBLE = b"\x00" * 128 + b"DICM"
# The most a deflated data set (1.2.840.10008.1.2.1.99) may inflate to: ``[node]
# max_inflated_bytes``. Deflate is used for objects without pixel data in practice; a "bomb"
# of 1 MiB that inflates to 1 GiB is refused after this much, inflated in steps.
MAX_INFLATED_BYTES = 128 * 1024**2
_INFLATE_STEP = 1024**2


@dataclass(frozen=True)
class ReceivedObject:
    """A parsed, validated object that has not been stored yet."""

    header: Dataset
    file_meta_bytes: bytes  # preamble + file meta group, as the blob will start
    dataset_bytes: bytes  # the data set exactly as received
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    sha256: str  # of the data set bytes, in hex

    @property
    def size(self) -> int:
        return len(self.file_meta_bytes) + len(self.dataset_bytes)

    @property
    def file_chunks(self) -> list[bytes]:
        """The stored file's bytes: the File Meta group, then the data set."""
        return [self.file_meta_bytes, self.dataset_bytes]


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002."""
    if vr == b"OB":
        return struct.pack("<HH2sxxI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid_value(uid: str) -> bytes:
    data = uid.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def _file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information group (PS3.10 7.1), encoded directly:
    it is written for every received instance, and pydicom's writer costs more than the rest."""
    version = IMPLEMENTATION_VERSION_NAME.encode("ascii")
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _uid_value(sop_class_uid)),
            _element(0x0003, b"UI", _uid_value(sop_instance_uid)),
            _element(0x0010, b"UI", _uid_value(transfer_syntax_uid)),
            _element(0x0012, b"UI", _uid_value(IMPLEMENTATION_CLASS_UID)),
            _element(0x0013, b"SH", version + b" " if len(version) % 2 else version),
        )
    )
    group_length = _element(0x0000, b"UL", struct.pack("<I", len(body)))
    return PREAMBLE + group_length + body


def _inflate(deflated: bytes, limit: int) -> BytesIO:
    """A deflated data set inflated in steps, refused (TooLarge) as soon as it passes `limit`
    bytes: memory and time stay bounded whatever the ratio."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    buffer = BytesIO()
    pending = deflated
    try:
        while True:
            chunk = inflater.decompress(pending, _INFLATE_STEP)
            if buffer.tell() + len(chunk) > limit:
                raise TooLarge(
                    f"the deflated data set inflates to more than {limit} bytes "
                    "(node.max_inflated_bytes); it is refused"
                )
            buffer.write(chunk)
            pending = inflater.unconsumed_tail
            if not pending and len(chunk) < _INFLATE_STEP:
                break
    except zlib.error as e:
        raise InvalidInput(f"the deflated data set cannot be inflated: {e}") from e
    if not inflater.eof:
        raise InvalidInput("the deflated data set cannot be inflated: it is truncated")
    buffer.seek(0)
    return buffer


def _parse_complete(
    dataset_bytes: bytes, transfer_syntax_uid: str, max_inflated: int = MAX_INFLATED_BYTES
) -> Dataset:
    """Parse the data set in one pass, refusing one that ends inside an element, or a
    deflated one that inflates past `max_inflated` bytes."""
    ts = UID(transfer_syntax_uid)
    if not ts.is_transfer_syntax:
        raise InvalidInput(f"unknown transfer syntax {transfer_syntax_uid}")
    buffer = _inflate(dataset_bytes, max_inflated) if ts.is_deflated else BytesIO(dataset_bytes)
    size = buffer.seek(0, 2)
    buffer.seek(0)
    elements = {}
    parsed_up_to = 0  # the end of the last whole element (a short read at the end moves on)
    try:
        for raw in data_element_generator(buffer, ts.is_implicit_VR, ts.is_little_endian):
            if (
                isinstance(raw, RawDataElement)
                and raw.length != _UNDEFINED_LENGTH
                and raw.value is not None
                and len(raw.value) != raw.length
            ):
                raise InvalidInput(
                    f"the data set is truncated: element {raw.tag} declares "
                    f"{raw.length} bytes but {len(raw.value)} arrived"
                )
            if raw.tag.group == 0 or raw.tag in elements:
                # command elements have no place in a data set, and a tag comes once (PS3.5
                # 7.1): junk (8 MiB of zeros is a million (0000,0000) elements) stops here
                what = "a command element" if raw.tag.group == 0 else "a repeated element"
                raise InvalidInput(f"the data set is malformed: {what} {raw.tag}")
            elements[raw.tag] = raw
            parsed_up_to = buffer.tell()
    except EOFError as e:
        raise InvalidInput(f"the data set is truncated: {e}") from e
    except InvalidInput:
        raise
    except Exception as e:  # pydicom raises many types for malformed input
        raise InvalidInput(f"cannot parse the data set: {e}") from e
    if parsed_up_to != size:
        raise InvalidInput(
            f"the data set is truncated: {size - parsed_up_to} trailing bytes "
            "do not form an element"
        )
    header = Dataset(elements)
    try:
        encodings = convert_encodings(header.get("SpecificCharacterSet") or default_encoding)
    except Exception as e:
        raise InvalidInput(f"unreadable SpecificCharacterSet: {e}") from e
    header.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian, encodings)
    return header


def _required_text(ds: Dataset, keyword: str) -> str:
    try:
        value = reader_for(keyword).text(ds)
    except Exception as e:
        raise InvalidInput(f"{keyword} cannot be read: {e}") from e
    if value is None:
        raise MissingAttribute(keyword)
    return value


def _required_uid(ds: Dataset, keyword: str) -> str:
    return validate_uid(_required_text(ds, keyword), keyword)


def _build(
    file_meta_bytes: bytes, dataset_bytes: bytes, ts: str, max_inflated: int = MAX_INFLATED_BYTES
) -> ReceivedObject:
    sha256 = hashlib.sha256(dataset_bytes).hexdigest()
    header = _parse_complete(dataset_bytes, ts, max_inflated)
    sop_class = _required_uid(header, "SOPClassUID")
    sop_instance = _required_uid(header, "SOPInstanceUID")
    study = _required_uid(header, "StudyInstanceUID")
    series = _required_uid(header, "SeriesInstanceUID")
    patient_id = _required_text(header, "PatientID")
    return ReceivedObject(
        header=header,
        file_meta_bytes=file_meta_bytes,
        dataset_bytes=dataset_bytes,
        transfer_syntax_uid=ts,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=study,
        series_instance_uid=series,
        patient_id=patient_id,
        sha256=sha256,
    )


@dataclass(frozen=True)
class DimseCommand:
    """What a C-STORE request says of its data set (UIDs validated once, here) and the
    preamble and File Meta group the object is filed with."""

    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    file_meta_bytes: bytes

    @classmethod
    def of(
        cls, transfer_syntax_uid: str, sop_class_uid: str, sop_instance_uid: str
    ) -> DimseCommand:
        """The command of a C-STORE request; raises InvalidUID for a UID unfit for a file."""
        ts = validate_uid(transfer_syntax_uid, "TransferSyntaxUID")
        sop_class = validate_uid(sop_class_uid, "AffectedSOPClassUID")
        sop_instance = validate_uid(sop_instance_uid, "AffectedSOPInstanceUID")
        return cls(ts, sop_class, sop_instance, _file_meta(sop_class, sop_instance, ts))


def from_dimse(
    command: DimseCommand, dataset_bytes: bytes, max_inflated: int = MAX_INFLATED_BYTES
) -> ReceivedObject:
    """An object received by C-STORE: its command and the encoded data set, which must name
    the same SOP Class and Instance (a deflated one inflating to at most `max_inflated`)."""
    received = _build(
        command.file_meta_bytes, dataset_bytes, command.transfer_syntax_uid, max_inflated
    )
    if received.sop_instance_uid != command.sop_instance_uid:
        raise DatasetMismatch(
            f"SOPInstanceUID {received.sop_instance_uid} in the data set differs from "
            f"the C-STORE request's {command.sop_instance_uid}"
        )
    if received.sop_class_uid != command.sop_class_uid:
        raise DatasetMismatch(
            f"SOPClassUID {received.sop_class_uid} in the data set differs from "
            f"the C-STORE request's {command.sop_class_uid}"
        )
    return received


def from_part10(file_bytes: bytes, max_inflated: int = MAX_INFLATED_BYTES) -> ReceivedObject:
    """An object received as a DICOM Part 10 file (STOW-RS parts, imports).

    A file that starts directly with its File Meta group, without the 128-byte preamble and
    "DICM" (as some clients send), is accepted and filed with a preamble added.
    """
    has_preamble = file_bytes[128:132] == b"DICM"
    if not has_preamble and not file_bytes.startswith(b"\x02\x00"):
        raise InvalidInput("not a DICOM Part 10 file: no 'DICM' prefix and no File Meta group")
    try:
        buffer = BytesIO(file_bytes)
        buffer.seek(132 if has_preamble else 0)
        meta = pydicom.filereader._read_file_meta_info(buffer)
        dataset_offset = buffer.tell()
    except Exception as e:
        raise InvalidInput(f"cannot parse the file meta information: {e}") from e
    ts = validate_uid(meta.get("TransferSyntaxUID", ""), "TransferSyntaxUID")
    meta_bytes = (
        file_bytes[:dataset_offset] if has_preamble else PREAMBLE + file_bytes[:dataset_offset]
    )
    return _build(meta_bytes, file_bytes[dataset_offset:], ts, max_inflated)


def dataset_sha256s(data: bytes) -> set[str]:
    """The SHA-256 of a stored file's data set (the bytes after its File Meta group), for each
    place the group may end: where its (0002,0000) Group Length says (as the node writes the
    group of a C-STORE), and after the last group-0002 element (as a Part 10 file is split on
    arrival; the two differ when a data set starts with group-0002 elements). Raises an
    exception (pydicom's vary) when the file has no File Meta group."""
    start = 132 if data[128:132] == b"DICM" else 0
    buffer = BytesIO(data)
    buffer.seek(start)
    meta = pydicom.filereader._read_file_meta_info(buffer)
    offsets = {buffer.tell()}
    group_length = meta.get("FileMetaInformationGroupLength")
    if isinstance(group_length, int) and data[start : start + 6] == b"\x02\x00\x00\x00UL":
        offsets.add(start + 12 + group_length)
    return {hashlib.sha256(data[offset:]).hexdigest() for offset in offsets}
