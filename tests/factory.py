"""DICOM test data made in code: small CT-like instances with known attributes."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def make_ct(
    patient_id: str = "PAT001",
    patient_name: str = "Doe^Jane",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    size: int = 32,
    seed: int | None = None,
    **attributes: object,
) -> Dataset:
    """A CT Image instance with `size` x `size` 16-bit pixels; extra keywords set attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate = "20240315"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC001"
    ds.StudyID = "1"
    ds.StudyDescription = "CT CHEST"
    ds.ReferringPhysicianName = "Kim^Minsu"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = 1
    ds.Modality = "CT"
    ds.SeriesDescription = "AXIAL"
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = size
    ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    rng = np.random.default_rng(seed if seed is not None else instance_number)
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def write_series(
    folder: Path, count: int, patient_id: str = "PAT001", **attributes: object
) -> list[Path]:
    """Write `count` instances of one new series into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = attributes.pop("study_uid", None) or generate_uid()
    series_uid = attributes.pop("series_uid", None) or generate_uid()
    paths = []
    for number in range(1, count + 1):
        ds = make_ct(
            patient_id,
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=number,
            **attributes,
        )
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def part10(ds: Dataset) -> bytes:
    """`ds` as a DICOM Part 10 file's bytes."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def encode_elements(elements: list[tuple[int, str, bytes]], transfer_syntax: str) -> bytes:
    """Data elements (tag, VR, value bytes, in the order given) encoded byte by byte as a
    modality sends them: implicit VR (tag, 4-byte length) or explicit VR (a 4-byte length
    after the VRs that have one, else 2), little or big endian."""
    order = ">" if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN else "<"
    out = b""
    for tag, vr, value in elements:
        head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
        if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
            out += head + struct.pack("<I", len(value)) + value
        elif vr in _LONG_LENGTH_VRS:
            out += head + vr.encode() + b"\0\0" + struct.pack(order + "I", len(value)) + value
        else:
            out += head + vr.encode() + struct.pack(order + "H", len(value)) + value
    return out
