"""STOW-RS (PS3.18 10.5): POST /studies and /studies/{study} with multipart/related;
type="application/dicom".

The body is parsed as a stream into spooled parts before anything is stored, so a malformed or
truncated body (bad boundary, no closing delimiter, a part over the size limit) is refused
whole with a 4xx and stores nothing. Each complete part then goes through intake, the same
path as C-STORE, up to four parts at a time: their blob syncs overlap and their index rows
share commits, written in the parts' order (so QIDO-RS lists them in that order). The answer
lists what was stored and why anything failed:
200 all stored, 202 some failed, 409 none stored.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pydicom
from flask import Blueprint, Response, request
from werkzeug.http import parse_options_header

from dicomnode.core.errors import DicomnodeError, InvalidInput
from dicomnode.core.statuses import status_for
from dicomnode.core.turns import Turns
from dicomnode.core.uids import validate_uid
from dicomnode.dicomweb.access import audit, base_url, requester, require_token, services
from dicomnode.dicomweb.dicomjson import sequence_item, stow_response
from dicomnode.dicomweb.errors import UnsupportedMediaType
from dicomnode.dicomweb.media import options_header
from dicomnode.dicomweb.multipart import read_multipart
from dicomnode.governance import audit_events

FILING_THREADS = 4  # parts of one request filed at once
PART10_HEAD = 138  # bytes enough to tell a Part 10 file: preamble, "DICM", a first element's tag
IDENTITY_HEAD = 64 * 1024  # a refused part's File Meta group is looked for in this many bytes
FILE_META_VRS = (b"UL", b"OB", b"UI", b"SH", b"AE")  # (0002,xxxx) elements' VRs


def _parts() -> list:
    media_type, params = options_header(request.headers.get("Content-Type", ""))
    if media_type.lower() != "multipart/related":
        raise UnsupportedMediaType(
            'STOW-RS takes multipart/related; type="application/dicom", '
            f"not {media_type or 'nothing'!r}"
        )
    part_type = params.get("type", "application/dicom").strip('"').lower()
    if part_type != "application/dicom":
        raise UnsupportedMediaType(
            f"parts of type {part_type!r} are not accepted; send application/dicom instances"
        )
    return read_multipart(
        request.stream,
        params.get("boundary", "").strip('"'),
        services().settings.http.max_part_bytes,
    )


def store(study: str | None = None) -> Response:
    if study is not None:
        study = validate_uid(study, "StudyInstanceUID")
    parts = _parts()
    if not parts:
        raise InvalidInput("the multipart body holds no parts")
    intake, source = services().intake, requester()

    turns = Turns()  # the parts are indexed in their order

    def file(numbered: tuple[int, Any]) -> Any:
        """The IngestResult of one part, or the DicomnodeError that refused it."""
        number, part = numbered
        part_type = parse_options_header(part.content_type or "application/dicom")[0].lower()
        turn = turns.turn(number - 1)
        try:
            if part_type != "application/dicom":
                raise InvalidInput(f"part {number} is {part_type!r}, not application/dicom")
            if not looks_like_part10(part.head(PART10_HEAD)):
                raise InvalidInput(f"part {number} is not a DICOM Part 10 file")
            return intake.receive_part10(part.read(), source, expected_study=study, turn=turn)
        except DicomnodeError as e:
            return e
        finally:
            turn.passed()  # also when it failed before its index write

    numbered = list(enumerate(parts, start=1))
    if len(parts) == 1:
        outcomes = [file(numbered[0])]
    else:  # parts are filed side by side: their syncs overlap and their index rows share commits
        with ThreadPoolExecutor(min(len(parts), FILING_THREADS), "stow-part") as pool:
            outcomes = list(pool.map(file, numbered))
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    filed: list[Any] = []
    for (number, part), outcome in zip(numbered, outcomes, strict=True):
        if isinstance(outcome, DicomnodeError):
            failed.append(_failure(outcome, part, number))
            continue
        stored = outcome.instance
        if outcome.outcome in ("stored", "replaced"):
            filed.append(stored)
        referenced.append(
            sequence_item(
                ReferencedSOPClassUID=stored.sop_class_uid,
                ReferencedSOPInstanceUID=stored.sop_instance_uid,
                RetrieveURL=f"{base_url()}/studies/{stored.study_instance_uid}/series/"
                f"{stored.series_instance_uid}/instances/{stored.sop_instance_uid}",
            )
        )
    if filed:
        now = datetime.now(UTC)
        audit(lambda by: audit_events.received(source, filed, now, by))
    status = 200 if not failed else 202 if referenced else 409
    study_url = f"{base_url()}/studies/{study}" if study else None
    body = stow_response(study_url, referenced, failed)
    return Response(json.dumps(body), status=status, mimetype="application/dicom+json")


def _failure(error: DicomnodeError, part: Any, number: int) -> dict[str, Any]:
    values: dict[str, Any] = {"FailureReason": status_for(error)}
    identity = _identity(part)
    if identity:
        values["ReferencedSOPClassUID"], values["ReferencedSOPInstanceUID"] = identity
    item = sequence_item(**values)
    item["00000902"] = {"vr": "LO", "Value": [f"part {number}: {error}"[:64]]}  # ErrorComment
    return item


def looks_like_part10(head: bytes) -> bool:
    """True when `head` (a part's first bytes) may start a DICOM Part 10 file: the 128-byte
    preamble and "DICM", or a File Meta group without them, either way followed by a group-0002
    element in explicit VR. Anything else is refused before it is parsed (cheap for junk)."""
    start = 132 if head[128:132] == b"DICM" else 0
    first = head[start : start + 6]
    return len(first) == 6 and first[:2] == b"\x02\x00" and first[4:6] in FILE_META_VRS


def _identity(part: Any) -> tuple[str, str] | None:
    """The SOP Class and Instance UIDs of a refused part, from its File Meta group (Media
    Storage SOP Class and Instance UIDs) within its first IDENTITY_HEAD bytes, when they can be
    read at all: bounded work, whatever the part holds."""
    head = part.head(IDENTITY_HEAD)
    if not looks_like_part10(head):
        return None
    try:
        buffer = io.BytesIO(head)
        buffer.seek(132 if head[128:132] == b"DICM" else 0)
        meta = pydicom.filereader._read_file_meta_info(buffer)
        sop_class, sop_instance = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    except Exception:  # noqa: BLE001 - a refused part's identity is shown only when readable
        return None
    return str(sop_class), str(sop_instance)


def stow_blueprint() -> Blueprint:
    bp = Blueprint("stow", __name__)
    require_token(bp)
    bp.add_url_rule("/studies", "store", store, methods=["POST"])
    bp.add_url_rule("/studies/<study>", "store_study", store, methods=["POST"])
    return bp
