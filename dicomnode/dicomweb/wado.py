"""WADO-RS (PS3.18 10.4): instances, metadata, frames, bulk data, rendered images and
thumbnails; and DELETE of a study, series or instance.

Every answer leaves through egress (governance decides, the decision is recorded) before a
byte is sent. Instances are streamed from their blobs, so a large study never sits in memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from io import BytesIO

import pydicom
from flask import Blueprint, Response, jsonify, request
from pydicom.encaps import generate_fragmented_frames
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicomnode.core.errors import InvalidInput, NotFound
from dicomnode.core.model import Level, StoredInstance
from dicomnode.core.uids import validate_uid
from dicomnode.dicomweb import media, render
from dicomnode.dicomweb.access import base_url, requester, require_token, services
from dicomnode.dicomweb.dicomjson import dataset_to_json, resolve_bulk_path
from dicomnode.dicomweb.errors import NotAcceptable
from dicomnode.dicomweb.multipart import file_chunks, new_boundary, stream_multipart

log = logging.getLogger("dicomnode.wado")


def _filters(
    study: str, series: str | None = None, instance: str | None = None
) -> tuple[Level, tuple]:
    filters = [("StudyInstanceUID", validate_uid(study, "StudyInstanceUID"))]
    level = Level.STUDY
    if series is not None:
        filters.append(("SeriesInstanceUID", validate_uid(series, "SeriesInstanceUID")))
        level = Level.SERIES
    if instance is not None:
        filters.append(("SOPInstanceUID", validate_uid(instance, "SOPInstanceUID")))
        level = Level.IMAGE
    return level, tuple(filters)


def _instances(
    service: str, study: str, series: str | None = None, instance: str | None = None
) -> list[StoredInstance]:
    level, filters = _filters(study, series, instance)
    found = services().egress.retrieve(level, filters, requester(), "wado", service=service)
    if not found:
        raise NotFound(f"no instances at {request.path.removeprefix('/dicomweb')}")
    return found


def _multipart(parts: Iterator[tuple[dict[str, str], Iterator[bytes]]], part_type: str) -> Response:
    boundary = new_boundary()
    return Response(
        stream_multipart(parts, boundary),
        status=200,
        content_type=f'multipart/related; type="{part_type}"; boundary={boundary}',
        direct_passthrough=True,
    )


def _transcoded(path: str) -> bytes:
    """The instance at `path` as a Part 10 file in explicit VR little endian: the same instance,
    so its SOP Instance UID is kept (pydicom would otherwise generate a new one)."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def retrieve(study: str, series: str | None = None, instance: str | None = None) -> Response:
    wanted = media.dicom_transfer_syntax(request.headers.get("Accept"))
    found = _instances("instances", study, series, instance)
    media.check_producible({i.transfer_syntax_uid for i in found}, wanted)
    archive = services().archive

    def parts() -> Iterator[tuple[dict[str, str], Iterator[bytes]]]:
        for item in found:
            path = str(archive.blob_file(item))
            if wanted in (media.AS_STORED, item.transfer_syntax_uid):
                ts, chunks = item.transfer_syntax_uid, file_chunks(path)
            else:
                ts, chunks = wanted, iter([_transcoded(path)])
            yield {"Content-Type": f"application/dicom; transfer-syntax={ts}"}, chunks

    return _multipart(parts(), "application/dicom")


def _read_header(path: str) -> tuple[pydicom.Dataset, bool]:
    """The instance's attributes without reading bulk values; and whether Pixel Data follows."""
    threshold = services().settings.http.bulk_data_threshold
    with open(path, "rb") as f:
        ds = pydicom.dcmread(f, defer_size=threshold + 1, stop_before_pixels=True)
        position = f.tell()
        f.seek(0, 2)
        has_pixels = f.tell() > position + 8
    return ds, has_pixels


_BULK_BASE = "urn:dicomnode:bulkdata"  # stands for the instance's bulkdata URL in cached metadata
_METADATA_SUFFIX = ".metadata.json"


def _instance_metadata(item: StoredInstance) -> str:
    """The instance's DICOM JSON with BulkDataURIs relative to `_BULK_BASE`, cached beside the
    blob after the first request (the blob never changes under its name)."""
    blobs = services().archive.blobs
    cached = blobs.sidecar(item.blob_path, _METADATA_SUFFIX)
    try:
        return cached.read_text()
    except FileNotFoundError:
        pass
    ds, has_pixels = _read_header(str(blobs.absolute(item.blob_path)))
    entry = dataset_to_json(ds, _BULK_BASE, services().settings.http.bulk_data_threshold)
    if has_pixels:
        vr = "OW" if ds.get("BitsAllocated", 8) > 8 else "OB"
        entry["7FE00010"] = {"vr": vr, "BulkDataURI": f"{_BULK_BASE}/7FE00010"}
    text = json.dumps(dict(sorted(entry.items())))
    blobs.write_sidecar(item.blob_path, _METADATA_SUFFIX, text.encode())
    return text


def metadata(study: str, series: str | None = None, instance: str | None = None) -> Response:
    found = _instances("metadata", study, series, instance)
    root = base_url()
    parts = []
    for item in found:
        bulk = (
            f"{root}/studies/{item.study_instance_uid}/series/{item.series_instance_uid}"
            f"/instances/{item.sop_instance_uid}/bulkdata"
        )
        parts.append(_instance_metadata(item).replace(f'"{_BULK_BASE}', f'"{bulk}'))
    return Response("[" + ",".join(parts) + "]", mimetype="application/dicom+json")


def _frame_numbers(text: str, total: int) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise InvalidInput(f"frame list must be comma-separated numbers, got {text!r}") from None
    if not numbers:
        raise InvalidInput("the frame list is empty")
    missing = [n for n in numbers if not 1 <= n <= total]
    if missing:
        raise NotFound(f"frames {missing} do not exist; the instance has {total}")
    return numbers


def frames(study: str, series: str, instance: str, frame_list: str) -> Response:
    (item,) = _instances("frames", study, series, instance)
    path = str(services().archive.blob_file(item))
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise NotFound("the instance has no pixel data")
    total = int(ds.get("NumberOfFrames", 1) or 1)
    numbers = _frame_numbers(frame_list, total)
    stored = item.transfer_syntax_uid
    compressed_type = media.FRAME_MEDIA_TYPE.get(stored)
    for choice in media.accepted(request.headers.get("Accept")):
        part_type = _frame_part_type(choice)
        if part_type == "application/octet-stream":
            return _native_frames(ds, stored, numbers)
        if compressed_type and part_type == compressed_type:
            fragments = list(generate_fragmented_frames(ds.PixelData, number_of_frames=total))
            headers = {"Content-Type": f"{compressed_type}; transfer-syntax={stored}"}
            parts = ((headers, iter([b"".join(fragments[n - 1])])) for n in numbers)
            return _multipart(parts, compressed_type)
    raise NotAcceptable(
        'frames are served as multipart/related; type="application/octet-stream"'
        + (f' or type="{compressed_type}"' if compressed_type else "")
    )


def _frame_part_type(choice: media.MediaRange) -> str:
    if choice.media_type == "multipart/related":
        wildcard = choice.related_type in ("", "*", "*/*")
        part_type = "application/octet-stream" if wildcard else choice.related_type
    elif choice.media_type in ("*/*", "multipart/*"):
        part_type = "application/octet-stream"
    else:
        part_type = choice.media_type
    return media.FRAME_MEDIA_TYPE_ALIASES.get(part_type, part_type)


def _native_frames(ds: pydicom.Dataset, stored: str, numbers: list[int]) -> Response:
    if UID(stored).is_compressed:
        if not media.can_decode(stored):
            raise NotAcceptable(f"frames stored as {stored} cannot be decompressed here")
        ds.decompress()
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
    frame_bytes = rows * columns * samples * bits // 8
    if bits == 1:
        raise NotAcceptable("single-bit frames are not served individually")
    data = ds.PixelData
    parts = (
        (
            {"Content-Type": "application/octet-stream"},
            iter([data[(n - 1) * frame_bytes : n * frame_bytes]]),
        )
        for n in numbers
    )
    return _multipart(parts, "application/octet-stream")


def bulkdata(study: str, series: str, instance: str, path: str) -> Response:
    (item,) = _instances("bulkdata", study, series, instance)
    ds = pydicom.dcmread(str(services().archive.blob_file(item)))
    try:
        element = resolve_bulk_path(ds, path)
    except (KeyError, IndexError, ValueError):
        raise NotFound(f"no bulk data at {path}") from None
    value = element.value if isinstance(element.value, bytes) else bytes(element.value or b"")
    return _multipart(
        iter([({"Content-Type": "application/octet-stream"}, iter([value]))]),
        "application/octet-stream",
    )


def rendered(
    study: str, series: str | None, instance: str | None, frame: int = 1, thumbnail: bool = False
) -> Response:
    found = _instances("rendered", study, series, instance)
    item = found[len(found) // 2]  # a study or series thumbnail shows its middle instance
    path = str(services().archive.blob_file(item))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if not media.can_decode(item.transfer_syntax_uid):
        raise NotAcceptable(f"images stored as {item.transfer_syntax_uid} cannot be rendered here")
    media_type = render.rendered_type(request.headers.get("Accept"))
    viewport = render.parse_viewport(request.args.get("viewport"))
    if thumbnail and viewport is None:
        viewport = render.THUMBNAIL_SIZE
    quality = request.args.get("quality", "90")
    if not quality.isdigit():
        raise InvalidInput(f"quality must be 1-100, got {quality!r}")
    image = render.render(
        path,
        ds,
        frame,
        media_type,
        render.parse_window(request.args.get("window")),
        viewport,
        int(quality),
    )
    return Response(image, mimetype=media_type)


def delete(
    study: str, series: str | None = None, instance: str | None = None
) -> tuple[Response, int]:
    """DELETE asks stewardship: a legal hold or a retention a law requires refuses it (409)."""
    level, filters = _filters(study, series, instance)
    who = requester()
    outcome = services().stewardship.delete_on_request(
        level, filters, who, "DICOMweb DELETE request"
    )
    removed = outcome.changed.get("instances", [])
    log.info(
        "deleted %d instances" if outcome.done else "deletion refused",
        len(removed),
        extra={
            "event": "delete",
            "level": str(level),
            "target": dict(filters),
            "instances": len(removed),
            "requester": who.caller,
            "address": who.address,
            "refused": "" if outcome.done else outcome.reason,
        },
    )
    if not outcome.done:
        return jsonify({"error": "Retained", "detail": outcome.reason, "status": 409}), 409
    return jsonify({"deleted": len(removed), "level": str(level)}), 200


def wado_blueprint() -> Blueprint:
    bp = Blueprint("wado", __name__)
    require_token(bp)
    study_url = "/studies/<study>"
    series_url = study_url + "/series/<series>"
    instance_url = series_url + "/instances/<instance>"

    bp.add_url_rule(study_url, "study", retrieve, methods=["GET"])
    bp.add_url_rule(series_url, "series", retrieve, methods=["GET"])
    bp.add_url_rule(instance_url, "instance", retrieve, methods=["GET"])
    bp.add_url_rule(study_url, "delete_study", delete, methods=["DELETE"])
    bp.add_url_rule(series_url, "delete_series", delete, methods=["DELETE"])
    bp.add_url_rule(instance_url, "delete_instance", delete, methods=["DELETE"])
    bp.add_url_rule(study_url + "/metadata", "study_metadata", metadata)
    bp.add_url_rule(series_url + "/metadata", "series_metadata", metadata)
    bp.add_url_rule(instance_url + "/metadata", "instance_metadata", metadata)
    bp.add_url_rule(instance_url + "/frames/<frame_list>", "frames", frames)
    bp.add_url_rule(instance_url + "/bulkdata/<path:path>", "bulkdata", bulkdata)

    @bp.get(instance_url + "/rendered")
    def instance_rendered(study: str, series: str, instance: str) -> Response:
        return rendered(study, series, instance)

    @bp.get(instance_url + "/frames/<int:frame>/rendered")
    def frame_rendered(study: str, series: str, instance: str, frame: int) -> Response:
        return rendered(study, series, instance, frame)

    @bp.get(study_url + "/thumbnail")
    def study_thumbnail(study: str) -> Response:
        return rendered(study, None, None, thumbnail=True)

    @bp.get(series_url + "/thumbnail")
    def series_thumbnail(study: str, series: str) -> Response:
        return rendered(study, series, None, thumbnail=True)

    @bp.get(instance_url + "/thumbnail")
    def instance_thumbnail(study: str, series: str, instance: str) -> Response:
        return rendered(study, series, instance, thumbnail=True)

    @bp.get(instance_url + "/frames/<int:frame>/thumbnail")
    def frame_thumbnail(study: str, series: str, instance: str, frame: int) -> Response:
        return rendered(study, series, instance, frame, thumbnail=True)

    return bp
