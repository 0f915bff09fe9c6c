"""Pixels as a viewer receives them: colour that agrees with the metadata (PS3.5 8.2.1), every
stored image syntax viewable or a clear 406 (never a 500), transfer syntaxes as asked, 1-bit
segmentations, rendered studies and series, and a bound on what the node decodes.

Each image is made in code (Pillow for JPEG baseline, GDCM for 12-bit JPEG Extended and JPEG
lossless, pydicom for RLE, deflate) and read back over HTTP on loopback as a client would:
metadata plus frames turned into pixels with pydicom, bitstreams decoded with Pillow.
"""

from __future__ import annotations

import tempfile
from io import BytesIO
from pathlib import Path

import gdcm
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from tests.conftest import WORKSTATION, dicomweb_client
from tests.factory import make_ct, part10
from tests.test_dicomweb import get
from tests.test_dimse_dcmtk import getscu
from tests.test_media_types import parts_of, path_of, syntax_of

OCTET = "application/octet-stream"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
MPEG2 = "1.2.840.10008.1.2.4.100"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
RED, BLUE = (255, 0, 0), (0, 0, 255)


# --- test images ------------------------------------------------------------------------


def _plain(ds: Dataset) -> Dataset:
    for keyword in ("RescaleIntercept", "RescaleSlope"):
        if keyword in ds:
            del ds[keyword]
    return ds


def colour_jpeg(photometric: str, study: str | None = None) -> Dataset:
    """A 16x32 JPEG baseline image, left half red, right half blue, stored as YBR_FULL (4:4:4)
    or YBR_FULL_422 (chroma halved across), as a modality's lossy colour image is."""
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[:, :16], rgb[:, 16:] = RED, BLUE
    encoded = BytesIO()
    subsampling = 1 if photometric == "YBR_FULL_422" else 0  # Pillow: 1 = 4:2:2, 0 = 4:4:4
    Image.fromarray(rgb).save(encoded, format="JPEG", quality=95, subsampling=subsampling)
    ds = _plain(make_ct(size=8, study_uid=study))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # SC
    ds.Modality = "OT"
    ds.Rows, ds.Columns = 16, 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate([encoded.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG_BASELINE
    return ds


def gdcm_encoded(ds: Dataset, transfer_syntax: str) -> Dataset:
    """`ds` compressed by GDCM (12-bit JPEG Extended, JPEG lossless)."""
    kinds = {
        JPEG_EXTENDED: gdcm.TransferSyntax.JPEGExtendedProcess2_4,
        JPEG_LOSSLESS: gdcm.TransferSyntax.JPEGLosslessProcess14,
        JPEG_LOSSLESS_SV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1,
    }
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder, "in.dcm"), Path(folder, "out.dcm")
        ds.save_as(source, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(kinds[transfer_syntax]))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(target))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        encoded = pydicom.dcmread(target)
    assert encoded.file_meta.TransferSyntaxUID == transfer_syntax
    return encoded


def gradient_ct(frames: int = 2, size: int = 32) -> tuple[Dataset, np.ndarray]:
    """A 12-bit image with smooth frames (lossy JPEG keeps them close)."""
    ds = make_ct(size=size)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    ds.Modality = "OT"
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([(x * 100 + y * 20 + 500 * f) % 4096 for f in range(frames)]).astype(
        np.uint16
    )
    ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    return ds, pixels


def store(node, *datasets: Dataset) -> None:
    dicomweb_client(node).store_instances([pydicom.dcmread(BytesIO(part10(d))) for d in datasets])


def client_pixels(node, ds: Dataset, accept: str) -> np.ndarray:
    """Frame 1 as a DICOMweb viewer builds it: the instance's metadata plus the frame's bytes,
    decoded by pydicom (colour converted to RGB after the metadata's photometric
    interpretation); a compressed part is decoded per its transfer-syntax parameter."""
    (metadata,) = get(node, path_of(ds, "/metadata")).json()
    metadata.pop("7FE00010")
    response = get(node, path_of(ds, "/frames/1"), Accept=accept)
    assert response.status_code == 200, response.text
    ((content_type, body),) = parts_of(response)
    built = Dataset.from_json(metadata)
    built.file_meta = pydicom.dataset.FileMetaDataset()
    syntax = syntax_of(content_type) or ExplicitVRLittleEndian
    built.file_meta.TransferSyntaxUID = syntax
    built.PixelData = encapsulate([body]) if pydicom.uid.UID(syntax).is_compressed else body
    return built.pixel_array


@pytest.fixture
def node(start_node):
    return start_node()


# --- colour (item 2) --------------------------------------------------------------------


@pytest.mark.parametrize("photometric", ["YBR_FULL_422", "YBR_FULL"])
def test_jpeg_colour_frames_agree_with_the_metadata(node, photometric):
    ds = colour_jpeg(photometric)
    store(node, ds)
    (metadata,) = get(node, path_of(ds, "/metadata")).json()
    assert metadata["00280004"]["Value"] == [photometric]  # the metadata says what is stored

    for accept in (
        f"multipart/related; type={OCTET}",  # decoded, in the metadata's colour space
        f"multipart/related; type={OCTET}; transfer-syntax=*",  # OHIF: the JPEG as stored
        "multipart/related; type=image/jpeg",
    ):
        rgb = client_pixels(node, ds, accept).astype(int)
        assert np.abs(rgb[8, 4] - RED).max() < 24, (accept, rgb[8, 4])
        assert np.abs(rgb[8, 28] - BLUE).max() < 24, (accept, rgb[8, 28])

    # The stored bitstream itself decodes to red and blue (Pillow, as a browser would).
    response = get(node, path_of(ds, "/frames/1"), Accept="multipart/related; type=image/jpeg")
    ((_, body),) = parts_of(response)
    jpeg = np.asarray(Image.open(BytesIO(body)).convert("RGB")).astype(int)
    assert np.abs(jpeg[8, 4] - RED).max() < 24 and np.abs(jpeg[8, 28] - BLUE).max() < 24

    rendered = get(node, path_of(ds, "/rendered"), Accept="image/png")
    assert rendered.status_code == 200
    image = np.asarray(Image.open(BytesIO(rendered.content)).convert("RGB")).astype(int)
    assert np.abs(image[8, 4] - RED).max() < 24 and np.abs(image[8, 28] - BLUE).max() < 24


# --- every syntax viewable (item 3) -----------------------------------------------------


@pytest.mark.parametrize(
    ("transfer_syntax", "tolerance"),
    [(JPEG_EXTENDED, 24), (JPEG_LOSSLESS, 0), (JPEG_LOSSLESS_SV1, 0)],
)
def test_jpeg_extended_and_lossless_frames_rendered_and_retrieved(node, transfer_syntax, tolerance):
    original, pixels = gradient_ct()
    ds = gdcm_encoded(original, transfer_syntax)
    store(node, ds)
    client = dicomweb_client(node)
    where = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)

    frames = client.retrieve_instance_frames(*where, frame_numbers=[1, 2])
    for got, expected in zip(frames, pixels, strict=True):
        values = np.frombuffer(got, "<u2").reshape(32, 32).astype(int)
        assert np.abs(values - expected).max() <= tolerance

    for suffix in ("/rendered", "/thumbnail", "/frames/2/rendered"):
        response = get(node, path_of(ds, suffix), Accept="image/jpeg")
        assert response.status_code == 200, (suffix, response.text)
        assert Image.open(BytesIO(response.content)).format == "JPEG"

    decompressed = client.retrieve_instance(*where, media_types=(("application/dicom",),))
    assert decompressed.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.abs(decompressed.pixel_array.astype(int) - pixels).max() <= tolerance
    as_stored = client.retrieve_instance(*where, media_types=(("application/dicom", "*"),))
    assert as_stored.PixelData == ds.PixelData


def test_c_get_of_jpeg_extended_to_an_uncompressed_only_caller(start_node, tmp_path):
    node = start_node([WORKSTATION])
    original, pixels = gradient_ct(frames=1)
    ds = gdcm_encoded(original, JPEG_EXTENDED)
    store(node, ds)
    got = getscu(node, tmp_path / "get", "-S", "STUDY", f"StudyInstanceUID={ds.StudyInstanceUID}")
    assert got.process.returncode == 0, got.output
    (received,) = got.datasets
    assert not received.file_meta.TransferSyntaxUID.is_compressed
    assert np.abs(received.pixel_array.astype(int) - pixels[0]).max() <= 24


def video_like(study: str | None = None) -> Dataset:
    """An object stored as MPEG2 (a few bytes stand for the stream: it is never decoded)."""
    ds = _plain(make_ct(size=8, study_uid=study))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
    ds.Modality = "XC"
    ds.Rows, ds.Columns = 16, 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = (
        3,
        "YBR_PARTIAL_420",
        0,
    )
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2
    return ds


def test_a_syntax_that_cannot_be_decoded_is_406_json_and_served_as_stored(node):
    ds = video_like()
    store(node, ds)
    for path, accept in (
        ("/frames/1", f"multipart/related; type={OCTET}"),
        ("/rendered", "image/jpeg"),
        ("/thumbnail", "image/jpeg"),
        ("", "multipart/related; type=application/dicom"),
    ):
        response = get(node, path_of(ds, path), Accept=accept)
        assert response.status_code == 406, (path, response.status_code, response.text[:200])
        assert response.headers["Content-Type"] == "application/json"
        assert "MPEG2" in response.json()["detail"] or MPEG2 in response.json()["detail"]
    as_stored = get(
        node, path_of(ds), Accept="multipart/related; type=application/dicom; transfer-syntax=*"
    )
    assert as_stored.status_code == 200
    ((_, body),) = parts_of(as_stored)
    assert pydicom.dcmread(BytesIO(body)).PixelData == ds.PixelData

    # The stream itself, as stored, from the Pixel Data bulk data (OHIF asks it that way).
    (metadata,) = get(node, path_of(ds, "/metadata")).json()
    bulk = metadata["7FE00010"]["BulkDataURI"].split("/dicomweb", 1)[1]
    stream = get(node, bulk + "?accept=video/mpeg", Accept="application/json")
    assert stream.status_code == 200, stream.text
    assert stream.headers["Content-Type"].startswith("video/mpeg")
    assert stream.content == b"\x00\x00\x01\xb3" + bytes(60)
    assert get(node, bulk, Accept="image/jpeg").status_code == 406


# --- transfer syntaxes as asked (item 4) ------------------------------------------------


def test_lossless_asked_of_a_lossy_image_is_406(node):
    ds = colour_jpeg("YBR_FULL_422")
    store(node, ds)
    for syntax in (JPEG_LOSSLESS_SV1, JPEG_LOSSLESS):
        response = get(
            node,
            path_of(ds, "/frames/1"),
            Accept=f"multipart/related; type=image/jpeg; transfer-syntax={syntax}",
        )
        assert response.status_code == 406, response.text
        assert "lossless" in response.json()["detail"]
    same = get(
        node,
        path_of(ds, "/frames/1"),
        Accept=f"multipart/related; type=image/jpeg; transfer-syntax={JPEG_BASELINE}",
    )
    assert same.status_code == 200
    ((content_type, _),) = parts_of(same)
    assert syntax_of(content_type) == JPEG_BASELINE


def test_implicit_vr_objects_are_sent_as_explicit_vr(node):
    ds = make_ct(size=8)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    store(node, ds)
    for accept in (
        "multipart/related; type=application/dicom; transfer-syntax=*",
        "multipart/related; type=application/dicom",
        "application/dicom; transfer-syntax=*",
    ):
        response = get(node, path_of(ds), Accept=accept)
        assert response.status_code == 200, response.text
        if accept.startswith("application/dicom"):
            content_type, body = response.headers["Content-Type"], response.content
        else:
            ((content_type, body),) = parts_of(response)
        assert syntax_of(content_type) == ExplicitVRLittleEndian
        received = pydicom.dcmread(BytesIO(body))
        assert received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert received.PixelData == ds.PixelData and received.SOPInstanceUID == ds.SOPInstanceUID
    implicit = get(
        node,
        path_of(ds),
        Accept="multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2",
    )
    assert implicit.status_code == 406


def test_bulkdata_of_compressed_pixel_data_comes_as_frames(node):
    ds, pixels = gradient_ct(frames=3, size=16)
    ds.compress(RLELossless)
    store(node, ds)
    (metadata,) = get(node, path_of(ds, "/metadata")).json()
    uri = metadata["7FE00010"]["BulkDataURI"]
    path = uri.split("/dicomweb", 1)[1]
    decoded = get(node, path, Accept=f"multipart/related; type={OCTET}")
    assert decoded.status_code == 200
    assert [body for _, body in parts_of(decoded)] == [frame.tobytes() for frame in pixels]
    stored = get(node, path, Accept="multipart/related; type=image/dicom-rle")
    assert [syntax_of(ct) for ct, _ in parts_of(stored)] == [RLELossless] * 3


# --- results a viewer can show (item 6) -------------------------------------------------


def segmentation(study: str, frames: np.ndarray) -> Dataset:
    """A binary SEG-like instance whose 5x7 frames are packed without gaps (35 bits each)."""
    ds = _plain(make_ct(size=8, study_uid=study))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SEGMENTATION
    ds.Modality = "SEG"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 5, 7, len(frames)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.SegmentationType = "BINARY"
    ds.PixelData = np.packbits(frames.astype(np.uint8).ravel(), bitorder="little").tobytes()
    ds["PixelData"].VR = "OB"
    return ds


def text_report(study: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "PAT001", "Doe^Jane", "SR"
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    return ds


def test_segmentation_and_report_frames_rendered_and_study_rendering(node):
    study = generate_uid()
    masks = np.random.default_rng(3).integers(0, 2, (3, 5, 7)).astype(bool)
    seg, report = segmentation(study, masks), text_report(study)
    image = make_ct(size=8, study_uid=study)
    store(node, seg, report, image)

    response = get(node, path_of(seg, "/frames/2,3"), Accept=f"multipart/related; type={OCTET}")
    assert response.status_code == 200, response.text
    for (_, body), mask in zip(parts_of(response), masks[1:], strict=True):
        unpacked = np.unpackbits(np.frombuffer(body, np.uint8), bitorder="little")[:35]
        assert np.array_equal(unpacked.reshape(5, 7).astype(bool), mask)

    png = get(node, path_of(seg, "/frames/2/rendered"), Accept="image/png")
    assert png.status_code == 200, png.text
    assert np.array_equal(np.asarray(Image.open(BytesIO(png.content))) > 127, masks[1])

    for suffix in ("/rendered", "/thumbnail"):
        refused = get(node, path_of(report, suffix), Accept="image/jpeg")
        assert refused.status_code == 406, (suffix, refused.text)
        assert "no image" in refused.json()["detail"]

    rendered = get(node, f"/studies/{study}/rendered", Accept="multipart/related; type=image/png")
    assert rendered.status_code == 200, rendered.text
    assert sorted(Image.open(BytesIO(b)).size for _, b in parts_of(rendered)) == [(7, 5), (8, 8)]
    series = get(node, f"/studies/{study}/series/{image.SeriesInstanceUID}/rendered", Accept="*/*")
    assert series.status_code == 200
    ((content_type, body),) = parts_of(series)
    assert content_type == "image/jpeg" and Image.open(BytesIO(body)).size == (8, 8)
    # single part types are ignored for a study (PS3.18 10.4.4): nothing else acceptable: 406
    assert get(node, f"/studies/{study}/rendered", Accept="image/jpeg").status_code == 406
    thumbnail = get(node, f"/studies/{study}/thumbnail", Accept="image/jpeg")
    assert thumbnail.status_code == 200


# --- bounds (issue 18, item 3) ----------------------------------------------------------


def test_images_over_the_decoding_bound_are_406_and_deflated_objects_are_not_inflated_past_it(
    start_node,
):
    node = start_node(http={"max_decoded_bytes": 200_000})
    big, pixels = gradient_ct(frames=2, size=256)  # 262,144 bytes decoded
    big.compress(RLELossless)
    deflated = make_ct(size=512)  # 524,288 bytes of pixels, a few kB deflated
    deflated.PixelData = bytes(512 * 512 * 2)
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    store(node, big, deflated)

    for path, accept in (
        ("/frames/1,2", f"multipart/related; type={OCTET}"),
        ("/rendered", "image/jpeg"),
        ("", "multipart/related; type=application/dicom"),
    ):
        refused = get(node, path_of(big, path), Accept=accept)
        assert refused.status_code == 406, (path, refused.text[:200])
        assert "http.max_decoded_bytes" in refused.json()["detail"]
    # One frame, read by its byte range, decodes to 131,072 bytes: within the bound.
    one = get(node, path_of(big, "/frames/2"), Accept=f"multipart/related; type={OCTET}")
    assert one.status_code == 200
    ((_, frame),) = parts_of(one)
    assert frame == pixels[1].tobytes()
    stored = get(
        node,
        path_of(big, "/frames/1"),
        Accept=f"multipart/related; type={OCTET}; transfer-syntax=*",
    )
    assert stored.status_code == 200

    # Its metadata is read by inflating only up to the Pixel Data (which would pass the bound).
    metadata = get(node, path_of(deflated, "/metadata"), Accept="application/dicom+json")
    assert metadata.status_code == 200, metadata.text
    (entry,) = metadata.json()
    assert entry["00280010"]["Value"] == [512] and "BulkDataURI" in entry["7FE00010"]
    for path, accept in (
        ("/frames/1", f"multipart/related; type={OCTET}"),
        ("/rendered", "image/jpeg"),
    ):
        refused = get(node, path_of(deflated, path), Accept=accept)
        assert refused.status_code == 406, (path, refused.text[:200])
        assert "inflates to more than 200000" in refused.json()["detail"]
    as_stored = get(
        node,
        path_of(deflated),
        Accept="multipart/related; type=application/dicom; transfer-syntax=*",
    )
    assert as_stored.status_code == 200
    ((content_type, body),) = parts_of(as_stored)
    assert syntax_of(content_type) == DeflatedExplicitVRLittleEndian
    assert len(body) < 100_000  # the stored, deflated bytes


def test_frames_of_a_big_endian_image_come_as_little_endian_values(node):
    ds, pixels = gradient_ct(frames=2, size=8)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.2"  # explicit VR big endian (retired)
    ds.PixelData = pixels.astype(">u2").tobytes()
    encoded = BytesIO()
    pydicom.dcmwrite(encoded, ds, little_endian=False, implicit_vr=False, enforce_file_format=True)
    dicomweb_client(node).store_instances([pydicom.dcmread(BytesIO(encoded.getvalue()))])
    response = get(node, path_of(ds, "/frames/2"), Accept=f"multipart/related; type={OCTET}")
    assert response.status_code == 200, response.text
    ((content_type, body),) = parts_of(response)
    assert syntax_of(content_type) == ExplicitVRLittleEndian
    assert body == pixels[1].astype("<u2").tobytes()
