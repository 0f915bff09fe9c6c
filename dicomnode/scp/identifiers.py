"""Translation between DIMSE Identifiers and the archive's Query and result rows."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from dicomnode.core.errors import DatasetMismatch
from dicomnode.core.model import Level, Query

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

_STUDY_ROOT = {STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET}
_SKIPPED = {"QueryRetrieveLevel", "SpecificCharacterSet"}


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value)


def query_from_identifier(identifier: Dataset, sop_class_uid: str) -> Query:
    """The archive Query an Identifier asks for; DatasetMismatch for a bad level."""
    level_text = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    allowed = (
        ("STUDY", "SERIES", "IMAGE")
        if str(sop_class_uid) in _STUDY_ROOT
        else (
            "PATIENT",
            "STUDY",
            "SERIES",
            "IMAGE",
        )
    )
    if level_text not in allowed:
        raise DatasetMismatch(
            f"QueryRetrieveLevel {level_text or '(missing)'} is not one of {', '.join(allowed)} "
            f"for {UID(sop_class_uid).name}"
        )
    filters: dict[str, str] = {}
    return_keys: list[str] = []
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in _SKIPPED or element.VR == "SQ":
            continue
        return_keys.append(keyword)
        text = _as_text(element.value).strip()
        if text:
            filters[keyword] = text
    return Query.build(Level(level_text), filters, return_keys)


def identifier_from_row(row: dict[str, Any], request: Dataset, ae_title: str) -> Dataset:
    """A C-FIND response Identifier: the requested keys, filled from `row`."""
    response = Dataset()
    response.QueryRetrieveLevel = request.QueryRetrieveLevel
    for element in request:
        keyword = element.keyword
        if not keyword or keyword in _SKIPPED:
            continue
        if element.VR == "SQ":
            response.add_new(element.tag, "SQ", [])
            continue
        if keyword == "RetrieveAETitle":
            response.RetrieveAETitle = ae_title
            continue
        value = row.get(keyword)
        setattr(response, keyword, "" if value is None else value)
    for keyword, value in row.items():
        if keyword.endswith("UID") and keyword not in response and value is not None:
            setattr(response, keyword, value)
    if any(isinstance(v, str) and not v.isascii() for v in row.values()):
        response.SpecificCharacterSet = "ISO_IR 192"
    return response
