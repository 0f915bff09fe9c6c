"""WADO-RS (PS3.18 10.4): instances, metadata, frames, bulk data, rendered images and
thumbnails; and DELETE of a study, series or instance.

Every answer leaves through egress (governance decides, the decision is recorded) before a
byte is sent. Instances are streamed from their blobs, so a large study never sits in memory.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import BinaryIO

import pydicom
from flask import Blueprint, Response, g, jsonify, request, stream_with_context
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicomnode.core.errors import InvalidInput, NotFound
from dicomnode.core.frames import StaleFrameTable
from dicomnode.core.model import Level, StoredInstance
from dicomnode.core.uids import validate_uid
from dicomnode.dicomweb import media, pixels, render
from dicomnode.dicomweb.access import base_url, requester, require_token, services
from dicomnode.dicomweb.auth import PATIENT_AWARE_SCOPES, ScopeError
from dicomnode.dicomweb.dicomjson import dataset_to_json, json_to_xml, resolve_bulk_path
from dicomnode.dicomweb.errors import NotAcceptable
from dicomnode.dicomweb.multipart import new_boundary, stream_chunks, stream_multipart
from dicomnode.governance import patient_scope

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
    if g.principal.patient is not None:  # a patient-bound token: that patient's objects only
        filters += patient_scope.retrieval_keys(g.principal.patient)
    return level, tuple(filters)


def _instances(
    service: str, study: str, series: str | None = None, instance: str | None = None
) -> list[StoredInstance]:
    level, filters = _filters(study, series, instance)
    found = services().egress.retrieve(
        level, filters, requester(), "wado", service=service, access_tags=g.principal.access_tags
    )
    if not found and g.principal.patient is not None:  # another patient's, or not held: alike
        raise ScopeError("this token reads one patient's studies; this is not one of them")
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


def _acceptable() -> list[media.MediaRange]:
    """The request's acceptable media ranges: the ``accept`` query parameter, then Accept."""
    return media.parse_accept(request.args.get("accept"), request.headers.get("Accept"))


def _limit() -> int:
    return services().settings.http.max_decoded_bytes


def _read(item: StoredInstance, **options: object) -> pydicom.Dataset:
    """The instance (egress handed it out: `_instances`), read from its blob's stream."""
    with services().egress.open_blob(item) as stream:
        return pixels.read_instance(stream, _limit(), **options)


def _transcoded(stream: BinaryIO, limit: int) -> bytes:
    """The instance read from `stream` as a Part 10 file in explicit VR little endian: the same
    instance, so its SOP Instance UID is kept (pydicom would otherwise generate a new one)."""
    with stream:
        ds = pixels.read_instance(stream, limit)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        if "PixelData" in ds:
            pixels.check_decoded_size(ds, limit)
        ds.decompress(generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _producible(found: list[StoredInstance]) -> Callable[[str], str | None]:
    """For a transfer syntax asked for `found`: why it cannot be sent (None when it can)."""
    stored = {i.transfer_syntax_uid for i in found}

    def reason(wanted: str) -> str | None:
        if wanted == media.AS_STORED:
            return None  # implicit VR little endian objects go as explicit VR (served_syntax)
        if wanted == media.IMPLICIT_VR_LE:
            return "implicit VR little endian is not sent to web clients"
        if not UID(wanted).is_transfer_syntax:
            return f"{wanted!r} is not a transfer syntax"
        if wanted != media.EXPLICIT_VR_LE:
            others = sorted(stored - {wanted})
            if others:
                return f"{wanted} is sent only for objects stored in it; these are {others}"
            return None
        refusals = sorted({r for ts in stored if (r := pixels.decode_refusal(ts))})
        if refusals:
            return "; ".join(refusals) + " (transfer-syntax=* sends them as stored)"
        egress, limit = services().egress, _limit()
        for item in found:  # checked before the answer starts: no 500 in the middle of it
            ts = UID(item.transfer_syntax_uid)
            if ts.is_compressed or ts.is_deflated:
                try:
                    with egress.open_blob(item) as stream:
                        pixels.check_transcodable(stream, limit)
                except pixels.ImageTooLarge as e:
                    return str(e)
        return None

    return reason


def retrieve(study: str, series: str | None = None, instance: str | None = None) -> Response:
    ranges = _acceptable()
    found = _instances("instances", study, series, instance)
    choice = media.choose_instances(ranges, instance is not None, _producible(found))
    egress, limit = services().egress, _limit()  # the parts are made after the request

    def body(item: StoredInstance) -> tuple[str, Iterator[bytes]]:
        ts = media.served_syntax(item.transfer_syntax_uid, choice.transfer_syntax)
        if ts == item.transfer_syntax_uid:
            return ts, stream_chunks(lambda: egress.open_blob(item))
        return ts, iter([_transcoded(egress.open_blob(item), limit)])

    if choice.single_part:
        ts, chunks = body(found[0])
        return Response(
            chunks,
            content_type=f"{media.DICOM}; transfer-syntax={ts}",
            direct_passthrough=True,
        )

    def parts() -> Iterator[tuple[dict[str, str], Iterator[bytes]]]:
        for item in found:
            ts, chunks = body(item)
            yield {"Content-Type": f"{media.DICOM}; transfer-syntax={ts}"}, chunks

    return _multipart(parts(), media.DICOM)


def _read_header(item: StoredInstance) -> tuple[pydicom.Dataset, bool]:
    """The instance's attributes without reading bulk values; and whether Pixel Data follows."""
    threshold = services().settings.http.bulk_data_threshold
    with services().egress.open_blob(item) as f:
        if UID(item.transfer_syntax_uid).is_deflated:  # inflated up to its Pixel Data only
            ds = pixels.read_instance(f, _limit(), stop_before_pixels=True)
            return ds, ds.get("Rows") is not None
        named = isinstance(getattr(f, "name", None), str)  # a file pydicom can open again
        defer = threshold + 1 if named else None  # a spooled copy is closed before values are read
        ds = pydicom.dcmread(f, defer_size=defer, stop_before_pixels=True)
        position = f.tell()
        f.seek(0, 2)
        has_pixels = f.tell() > position + 8
    return ds, has_pixels


_BULK_BASE = "urn:dicomnode:bulkdata"  # stands for the instance's bulkdata URL in cached metadata
_METADATA = "metadata.json"  # the kind of cached data


def _instance_metadata(item: StoredInstance) -> str:
    """The instance's DICOM JSON with BulkDataURIs relative to `_BULK_BASE`, cached in the
    store after the first request (the blob never changes under its name)."""
    records = services().records
    cached = records.cached(item, _METADATA)
    if cached is not None:
        return cached.decode()
    ds, has_pixels = _read_header(item)
    entry = dataset_to_json(ds, _BULK_BASE, services().settings.http.bulk_data_threshold)
    if has_pixels:
        vr = "OW" if ds.get("BitsAllocated", 8) > 8 else "OB"
        entry["7FE00010"] = {"vr": vr, "BulkDataURI": f"{_BULK_BASE}/7FE00010"}
    text = json.dumps(dict(sorted(entry.items())))
    records.cache(item, _METADATA, text.encode())
    return text


def metadata(study: str, series: str | None = None, instance: str | None = None) -> Response:
    ranges = _acceptable()
    media.check_charset(ranges, request.args.get("charset"))
    kind = media.choose_metadata(ranges, xml_available=True)
    found = _instances("metadata", study, series, instance)
    root = base_url()
    parts = []
    for item in found:
        bulk = (
            f"{root}/studies/{item.study_instance_uid}/series/{item.series_instance_uid}"
            f"/instances/{item.sop_instance_uid}/bulkdata"
        )
        parts.append(_instance_metadata(item).replace(f'"{_BULK_BASE}', f'"{bulk}'))
    if kind == media.DICOM_XML:
        documents = [json_to_xml(json.loads(part)) for part in parts]
        headers = {"Content-Type": f"{media.DICOM_XML}; charset=utf-8"}
        return _multipart(((headers, iter([doc])) for doc in documents), media.DICOM_XML)
    return Response("[" + ",".join(parts) + "]", content_type=f"{media.DICOM_JSON}; charset=utf-8")


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


def _is_lossy(ds: pydicom.Dataset, stored: str) -> bool:
    return media.is_lossy(stored) or str(ds.get("LossyImageCompression", "")) == "01"


def _send_frames(ds: pydicom.Dataset, stored: str, numbers: list[int]) -> Response:
    """The frames `numbers` of `ds` in the media type the request accepts."""
    ranges = _acceptable()

    def decodable() -> str | None:
        reason = pixels.decode_refusal(stored)
        if reason is None and pixels.decoded_size(ds) > _limit():
            reason = (
                f"the image decodes to {pixels.decoded_size(ds)} bytes, over this node's limit "
                f"of {_limit()} (http.max_decoded_bytes)"
            )
        return reason and reason + "; transfer-syntax=* sends the frames as stored"

    choice = media.choose_frames(
        ranges, stored, _is_lossy(ds, stored), len(numbers) == 1, decodable
    )
    if choice.decoded or not UID(stored).is_compressed:
        bodies = pixels.native_frames(ds, numbers, _limit())
        content_type = f"{media.OCTET_STREAM}; transfer-syntax={media.EXPLICIT_VR_LE}"
        part_headers = {"Content-Type": content_type}
    else:
        bodies = pixels.stored_frames(ds, numbers)
        content_type = f"{choice.part_type}; transfer-syntax={stored}"
        part_headers = {"Content-Type": content_type}
    first = next(iter(bodies))  # made before the answer starts: an error is still a JSON 4xx
    if choice.single_part:
        return Response(first, content_type=content_type)
    every = itertools.chain([first], bodies)
    return _multipart(((part_headers, iter([body])) for body in every), choice.part_type)


def frames(study: str, series: str, instance: str, frame_list: str) -> Response:
    (item,) = _instances("frames", study, series, instance)
    try:
        stored = services().egress.stored_frames(item)
        if stored is not None:  # the header and those frames by byte range
            ds = stored.header
            if not ds.get("Rows") or not ds.get("Columns"):
                raise NotFound("the instance has no image pixel data")
            numbers = _frame_numbers(frame_list, stored.table.frames)
            ds = stored.dataset(numbers)
            return _send_frames(ds, item.transfer_syntax_uid, list(range(1, len(numbers) + 1)))
    except StaleFrameTable as e:  # not as indexed: the whole object still answers
        log.warning("frame table of %s not used: %s", item.sop_instance_uid, e)
    ds = _read(item)
    if "PixelData" not in ds:
        raise NotFound("the instance has no pixel data")
    if not ds.get("Rows") or not ds.get("Columns"):
        raise NotFound("the instance has no image pixel data")
    total = int(ds.get("NumberOfFrames", 1) or 1)
    numbers = _frame_numbers(frame_list, total)
    return _send_frames(ds, item.transfer_syntax_uid, numbers)


def bulkdata(study: str, series: str, instance: str, path: str) -> Response:
    (item,) = _instances("bulkdata", study, series, instance)
    ds = _read(item)
    try:
        element = resolve_bulk_path(ds, path)
    except (KeyError, IndexError, ValueError):
        raise NotFound(f"no bulk data at {path}") from None
    if element.tag == 0x7FE00010 and path.strip("/").upper() == "7FE00010" and ds.get("Rows"):
        stored = item.transfer_syntax_uid
        if stored in media.VIDEO_MEDIA_TYPE:
            return _video(ds, stored)
        if UID(stored).is_compressed:  # Pixel Data: its frames, in the asked media type
            total = int(ds.get("NumberOfFrames", 1) or 1)
            return _send_frames(ds, stored, list(range(1, total + 1)))
    value = element.value if isinstance(element.value, bytes) else bytes(element.value or b"")
    ranges = _acceptable()
    if not any(
        media.OCTET_STREAM in (r.media_type, r.related_type)
        or r.media_type in ("*/*", "application/*", "multipart/*")
        or (r.media_type == media.MULTIPART and r.related_type in ("", "*", "*/*"))
        for r in ranges
    ):
        raise media.not_acceptable(
            "bulk data",
            [f'multipart/related; type="{media.OCTET_STREAM}"'],
            [],
            media.described(ranges),
        )
    return _multipart(
        iter([({"Content-Type": media.OCTET_STREAM}, iter([value]))]),
        media.OCTET_STREAM,
    )


def _video(ds: pydicom.Dataset, stored: str) -> Response:
    """A video's Pixel Data as stored: its fragments joined into one stream."""
    kind = media.VIDEO_MEDIA_TYPE[stored]
    ranges = _acceptable()
    single = media.choose_video(ranges, kind)
    if single is None:
        raise media.not_acceptable(
            "this video", [kind, f'multipart/related; type="{kind}"'], [], media.described(ranges)
        )
    (stream,) = pixels.stored_frames(ds, [1], single_stream=True)
    content_type = f"{kind}; transfer-syntax={stored}"
    if single:
        return Response(stream, content_type=content_type)
    return _multipart(iter([({"Content-Type": content_type}, iter([stream]))]), kind)


def _render_one(
    item: StoredInstance, frame: int, media_type: str, viewport: tuple[int, int] | None
) -> bytes:
    ds = _read(item)
    if "PixelData" not in ds or not ds.get("Rows"):
        raise NotAcceptable(
            f"the instance ({ds.get('Modality', '?')}, SOP class {ds.get('SOPClassUID', '?')}) "
            "has no image to render; rendered images are image/jpeg or image/png of images"
        )
    reason = pixels.decode_refusal(item.transfer_syntax_uid)
    if reason:
        raise pixels.CannotDecode(f"this image cannot be rendered here: {reason}")
    pixels.check_decoded_size(ds, _limit())
    quality = request.args.get("quality", "90")
    if not quality.isdigit():
        raise InvalidInput(f"quality must be 1-100, got {quality!r}")
    return render.render(
        ds,
        frame,
        media_type,
        render.parse_window(request.args.get("window")),
        viewport,
        int(quality),
    )


def _has_image(item: StoredInstance) -> bool:
    ds = _read(item, stop_before_pixels=True)
    return bool(ds.get("Rows")) and bool(ds.get("Columns"))


def rendered(
    study: str,
    series: str | None,
    instance: str | None,
    frame: int | None = None,
    thumbnail: bool = False,
) -> Response:
    single = thumbnail or instance is not None
    media_type, single_part = media.choose_rendered(_acceptable(), single)
    found = _instances("rendered", study, series, instance)
    viewport = render.parse_viewport(request.args.get("viewport"))
    if thumbnail and viewport is None:
        viewport = render.THUMBNAIL_SIZE
    if single:
        item = found[0]
        if len(found) > 1:  # a study or series thumbnail shows its middle image
            middle = len(found) // 2
            order = sorted(range(len(found)), key=lambda i: abs(i - middle))
            item = next((found[i] for i in order if _has_image(found[i])), found[middle])
        if frame is None and thumbnail:
            ds = _read(item, stop_before_pixels=True)
            frame = (int(ds.get("NumberOfFrames", 1) or 1) + 1) // 2
        image = _render_one(item, frame or 1, media_type, viewport)
        if single_part:
            return Response(image, mimetype=media_type)
        return _multipart(iter([({"Content-Type": media_type}, iter([image]))]), media_type)
    images = [
        item
        for item in found
        if not pixels.decode_refusal(item.transfer_syntax_uid) and _has_image(item)
    ]
    if not images:
        raise NotAcceptable("nothing here has an image that can be rendered here")

    def parts() -> Iterator[tuple[dict[str, str], Iterator[bytes]]]:
        for item in images:
            try:
                image = _render_one(item, 1, media_type, viewport)
            except NotAcceptable:  # over the decoding bound: the others are still rendered
                continue
            yield {"Content-Type": media_type}, iter([image])

    return _multipart(stream_with_context(parts()), media_type)


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
    require_token(bp, PATIENT_AWARE_SCOPES)
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

    @bp.get(study_url + "/rendered")
    def study_rendered(study: str) -> Response:
        return rendered(study, None, None)

    @bp.get(series_url + "/rendered")
    def series_rendered(study: str, series: str) -> Response:
        return rendered(study, series, None)

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
