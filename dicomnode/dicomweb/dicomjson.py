"""DICOM JSON (PS3.18 F.2): query rows, instance metadata with BulkDataURIs, STOW answers;
and the same metadata as PS3.19 XML (the Native DICOM Model) for application/dicom+xml."""

from __future__ import annotations

from typing import Any
from xml.etree import ElementTree

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_NUMBER_VRS = {"IS": int, "US": int, "UL": int, "SS": int, "SL": int, "SV": int, "UV": int}
_FLOAT_VRS = {"DS", "FL", "FD"}


def _vr(keyword: str) -> str:
    vr = dictionary_VR(tag_for_keyword(keyword))
    return vr.split(" or ")[0]


def attribute(keyword: str, value: Any) -> tuple[str, dict[str, Any]]:
    """One DICOM JSON attribute for a plain value (backslash-separated for several)."""
    tag = tag_for_keyword(keyword)
    vr = _vr(keyword)
    entry: dict[str, Any] = {"vr": vr}
    if value is not None and value != "":
        items = str(value).split("\\") if isinstance(value, str) else [value]
        if vr == "PN":
            entry["Value"] = [{"Alphabetic": v} for v in items]
        elif vr in _NUMBER_VRS:
            entry["Value"] = [int(v) for v in items]
        elif vr in _FLOAT_VRS:
            entry["Value"] = [float(v) for v in items]
        else:
            entry["Value"] = items
    return f"{tag:08X}", entry


def row_to_json(row: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A query result row (keyword -> value) as a DICOM JSON object, tags in order."""
    values = {**row, **(extra or {})}
    pairs = [
        attribute(keyword, value) for keyword, value in values.items() if tag_for_keyword(keyword)
    ]
    return dict(sorted(pairs))


def dataset_to_json(ds: Dataset, bulk_uri: str, threshold: int, _path: str = "") -> dict[str, Any]:
    """A data set as DICOM JSON; binary values over `threshold` bytes (and Pixel Data) become
    BulkDataURIs ``{bulk_uri}/{tag}[/{item}/{tag}...]`` that the bulkdata route resolves."""
    result: dict[str, Any] = {}
    for tag in list(ds.keys()):  # noqa: SIM118 (tags, without converting values)
        if tag.group == 0x0002 or tag.element == 0x0000:
            continue
        raw = ds.get_item(tag)
        vr = getattr(raw, "VR", None) or _dictionary_vr(tag)
        length = getattr(raw, "length", None)
        key = f"{tag:08X}"
        path = f"{_path}/{key}" if _path else key
        if vr in BULK_VRS or tag == 0x7FE00010:
            if length is None:
                value = ds[tag].value
                length = len(value) if value is not None else 0
            if tag == 0x7FE00010 or length == 0xFFFFFFFF or length > threshold:
                result[key] = {
                    "vr": vr if vr != "OB or OW" else "OW",
                    "BulkDataURI": f"{bulk_uri}/{path}",
                }
                continue
        element: DataElement = ds[tag]
        if element.VR == "SQ":
            items = [
                dataset_to_json(item, bulk_uri, threshold, f"{path}/{index}")
                for index, item in enumerate(element.value)
            ]
            result[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            continue
        result[key] = element.to_json_dict(
            bulk_data_element_handler=None, bulk_data_threshold=2**31
        )
    return result


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def resolve_bulk_path(ds: Dataset, path: str) -> DataElement:
    """The element a BulkDataURI path names: ``TAG`` or ``TAG/ITEM/TAG...``; KeyError if none."""
    parts = path.strip("/").split("/")
    current: Dataset = ds
    for index in range(0, len(parts) - 1, 2):
        sequence = current[Tag(int(parts[index], 16))]
        current = sequence.value[int(parts[index + 1])]
    return current[Tag(int(parts[-1], 16))]


def sequence_item(**values: Any) -> dict[str, Any]:
    return dict(sorted(attribute(k, v) for k, v in values.items()))


def stow_response(
    retrieve_url: str | None, referenced: list[dict[str, Any]], failed: list[dict[str, Any]]
) -> dict[str, Any]:
    """The STOW-RS answer: ReferencedSOPSequence and FailedSOPSequence (PS3.18 10.5.3)."""
    body: dict[str, Any] = {}
    if retrieve_url:
        body["00081190"] = {"vr": "UR", "Value": [retrieve_url]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    return body


_XML_NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_NAME_PARTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")


def _xml_attributes(parent: ElementTree.Element, entries: dict[str, Any]) -> None:
    for tag, entry in sorted(entries.items()):
        vr = entry.get("vr", "UN")
        attribute = ElementTree.SubElement(parent, "DicomAttribute", tag=tag, vr=vr)
        keyword = keyword_for_tag(int(tag, 16))
        if keyword:
            attribute.set("keyword", keyword)
        if "BulkDataURI" in entry:
            ElementTree.SubElement(attribute, "BulkData", uri=entry["BulkDataURI"])
        elif "InlineBinary" in entry:
            ElementTree.SubElement(attribute, "InlineBinary").text = entry["InlineBinary"]
        for number, value in enumerate(entry.get("Value", []), start=1):
            if vr == "SQ":
                item = ElementTree.SubElement(attribute, "Item", number=str(number))
                _xml_attributes(item, value)
            elif vr == "PN":
                name = ElementTree.SubElement(attribute, "PersonName", number=str(number))
                for group in ("Alphabetic", "Ideographic", "Phonetic"):
                    if value and value.get(group):
                        element = ElementTree.SubElement(name, group)
                        for part, text in zip(_NAME_PARTS, value[group].split("^"), strict=False):
                            if text:
                                ElementTree.SubElement(element, part).text = text
            else:
                element = ElementTree.SubElement(attribute, "Value", number=str(number))
                element.text = "" if value is None else str(value)


def json_to_xml(entries: dict[str, Any]) -> bytes:
    """One instance's DICOM JSON as the PS3.19 Native DICOM Model (application/dicom+xml)."""
    root = ElementTree.Element("NativeDicomModel", xmlns=_XML_NAMESPACE)
    _xml_attributes(root, entries)
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)
