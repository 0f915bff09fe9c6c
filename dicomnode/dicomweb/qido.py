"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

Query parameters name attributes by keyword or by tag (``PatientName`` or ``00100010``) and use
the same matching as C-FIND, since both run the archive's one query engine; a UID list is
comma-separated (PS3.18 8.3.4.1) or backslash-separated as in C-FIND. ``includefield``
(repeated or comma-separated; ``all``), ``limit`` and ``offset`` are honoured;
``fuzzymatching=true`` is accepted and answered with a Warning header, as the node matches
exactly. An empty result is ``200 []``. Answers are application/dicom+json (the default) or,
when asked, multipart/related; type="application/dicom+xml" with one PS3.19 document per match
(PS3.18 10.6.3.3: both are required of an origin server); a request that accepts neither is
answered 406. A person name is answered split into its Alphabetic,
Ideographic and Phonetic groups (PS3.18 F.2.2), as in WADO-RS metadata.

Bad input is a 400 with a JSON reason, checked before any SQL runs: ``limit`` and ``offset``
must be whole numbers (``offset`` at most 2**63 - 1; a ``limit`` over MAX_LIMIT is served as
MAX_LIMIT), and key values stay within the query engine's bounds.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, g, json, request
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from dicomnode.core.attributes import COMPUTED, INDEXED, default_return_keys, levels_up_to
from dicomnode.core.errors import InvalidInput
from dicomnode.core.model import Level, Query
from dicomnode.core.uids import validate_uid
from dicomnode.dicomweb import media
from dicomnode.dicomweb.access import base_url, requester, require_token, services
from dicomnode.dicomweb.auth import PATIENT_AWARE_SCOPES
from dicomnode.dicomweb.dicomjson import json_to_xml, row_to_json
from dicomnode.dicomweb.multipart import new_boundary, stream_multipart
from dicomnode.governance import audit, patient_scope

MAX_LIMIT = 10_000
MAX_OFFSET = 2**63 - 1  # the largest OFFSET the databases take
_CONTROL = {"includefield", "limit", "offset", "fuzzymatching", "accept", "charset"}
_DIGITS = re.compile(r"[0-9]+")
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def _shown(text: str, width: int = 64) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def _keyword(name: str) -> str:
    if tag_for_keyword(name) is not None:
        return name
    try:
        keyword = keyword_for_tag(int(name, 16)) if len(name) == 8 else ""
    except ValueError:
        keyword = ""
    if not keyword:
        raise InvalidInput(
            f"unknown query attribute {_shown(name)}: use a keyword or an 8-digit tag"
        )
    return keyword


def _uid_list(keyword: str, value: str) -> str:
    """A UID list as the query engine takes it: PS3.18 8.3.4.1 separates the UIDs with commas,
    C-FIND (and the engine) with backslashes."""
    return value.replace(",", "\\") if dictionary_VR(keyword) == "UI" else value


def _int_param(name: str, maximum: int | None = None) -> int | None:
    """The whole-number query parameter `name` (ASCII digits only), None when absent; beyond
    `maximum` it is refused, without one it is capped at MAX_LIMIT."""
    text = request.args.get(name)
    if text is None:
        return None
    text = text.strip()
    if text.startswith("-") and _DIGITS.fullmatch(text[1:]):
        raise InvalidInput(f"{name} must not be negative, got {_shown(text)}")
    if not _DIGITS.fullmatch(text):
        raise InvalidInput(f"{name} must be a whole number, got {_shown(text)}")
    digits = text.lstrip("0") or "0"
    if maximum is None:
        return int(digits) if len(digits) <= len(str(MAX_LIMIT)) else MAX_LIMIT
    if len(digits) > len(str(maximum)) or int(digits) > maximum:
        raise InvalidInput(f"{name} must be at most {maximum}, got {_shown(text)}")
    return int(digits)


def _query(level: Level, fixed: dict[str, str]) -> tuple[Query, bool]:
    filters: dict[str, str] = {}
    includes: list[str] = []
    include_all = False
    for name, value in request.args.items(multi=True):
        if name == "includefield":
            for item in value.split(","):
                item = item.strip()
                if item == "all":
                    include_all = True
                elif item:
                    includes.append(_keyword(item))
        elif name not in _CONTROL:
            keyword = _keyword(name)
            value = _uid_list(keyword, value)
            # A repeated key (StudyInstanceUID=a&StudyInstanceUID=b) asks for any of its values.
            filters[keyword] = f"{filters[keyword]}\\{value}" if keyword in filters else value
    filters.update(fixed)
    returned = list(default_return_keys(level)) + includes + list(filters)
    if include_all:
        returned += [k for k, a in INDEXED.items() if a.level in levels_up_to(level)]
        returned += [k for k, lv in COMPUTED.items() if lv in levels_up_to(level)]
    limit = _int_param("limit")
    query = Query.build(
        level,
        filters,
        list(dict.fromkeys(returned)),
        limit=min(limit, MAX_LIMIT) if limit is not None else MAX_LIMIT,
        offset=_int_param("offset", MAX_OFFSET) or 0,
    )
    fuzzy = request.args.get("fuzzymatching", "false").lower() == "true"
    return query, fuzzy


def _retrieve_url(row: dict[str, Any], level: Level) -> str:
    url = f"{base_url()}/studies/{row['StudyInstanceUID']}"
    if level in (Level.SERIES, Level.IMAGE):
        url += f"/series/{row['SeriesInstanceUID']}"
    if level == Level.IMAGE:
        url += f"/instances/{row['SOPInstanceUID']}"
    return url


def person_name_json(name: str) -> dict[str, str]:
    """One PN value as DICOM JSON (PS3.18 F.2.2): its component groups, empty ones left out
    (``Hong^Gildong=洪^吉洞=홍^길동`` -> Alphabetic, Ideographic and Phonetic)."""
    groups = name.split("=")[: len(_PN_GROUPS)]
    return {key: group for key, group in zip(_PN_GROUPS, groups, strict=False) if group}


def _split_person_names(attributes: dict[str, Any]) -> dict[str, Any]:
    """`attributes` (DICOM JSON) with every PN value split into its component groups."""
    for entry in attributes.values():
        if entry.get("vr") == "PN" and "Value" in entry:
            entry["Value"] = [
                person_name_json(value.get("Alphabetic", "")) for value in entry["Value"]
            ]
    return attributes


def _answer(body: list[dict[str, Any]], kind: str) -> Response:
    """The matches as DICOM JSON, or as multipart XML (one Native DICOM Model per match)."""
    if kind == media.DICOM_XML:
        boundary = new_boundary()
        headers = {"Content-Type": f"{media.DICOM_XML}; charset=utf-8"}
        parts = ((headers, [json_to_xml(entry)]) for entry in body)
        return Response(
            b"".join(stream_multipart(parts, boundary)),
            status=200,
            content_type=f'multipart/related; type="{media.DICOM_XML}"; boundary={boundary}',
        )
    return Response(json.dumps(body), status=200, mimetype="application/dicom+json")


def search(level: Level, **path: str) -> Response:
    ranges = media.parse_accept(request.args.get("accept"), request.headers.get("Accept"))
    media.check_charset(ranges, request.args.get("charset"))
    kind = media.choose_metadata(ranges, xml_available=True)
    fixed = {}
    if "study" in path:
        fixed["StudyInstanceUID"] = validate_uid(path["study"], "StudyInstanceUID")
    if "series" in path:
        fixed["SeriesInstanceUID"] = validate_uid(path["series"], "SeriesInstanceUID")
    query, fuzzy = _query(level, fixed)
    url = request.url  # the request is gone when the audit message is built
    rows = _find(query, lambda: audit.web_query(url))
    body = [
        _split_person_names(row_to_json(row, {"RetrieveURL": _retrieve_url(row, level)}))
        for row in rows
    ]
    response = _answer(body, kind)
    if fuzzy:
        response.headers["Warning"] = (
            '299 dicomnode "fuzzymatching is not supported; matched exactly"'
        )
    return response


def _find(query: Query, asked: Any) -> list[dict[str, Any]]:
    """The rows egress lets out; for a patient-bound token only the rows of its patient,
    matched exactly (item 40: the claim is never a pattern)."""
    patient = g.principal.patient
    tags = g.principal.access_tags  # item 41: only studies carrying one of the token's tags
    if patient is None:
        return services().egress.find(query, requester(), asked, tags)
    bound = patient_scope.bound_query(query, patient)
    if bound is None:
        return []
    rows = services().egress.find(bound, requester(), asked, tags)
    return [
        r for r in rows if patient_scope.admits(patient, r["PatientID"], r["IssuerOfPatientID"])
    ]


def qido_blueprint() -> Blueprint:
    bp = Blueprint("qido", __name__)
    require_token(bp, PATIENT_AWARE_SCOPES)

    @bp.get("/studies")
    def studies() -> Response:
        return search(Level.STUDY)

    @bp.get("/series")
    def all_series() -> Response:
        return search(Level.SERIES)

    @bp.get("/studies/<study>/series")
    def study_series(study: str) -> Response:
        return search(Level.SERIES, study=study)

    @bp.get("/instances")
    def all_instances() -> Response:
        return search(Level.IMAGE)

    @bp.get("/studies/<study>/instances")
    def study_instances(study: str) -> Response:
        return search(Level.IMAGE, study=study)

    @bp.get("/studies/<study>/series/<series>/instances")
    def series_instances(study: str, series: str) -> Response:
        return search(Level.IMAGE, study=study, series=series)

    return bp
