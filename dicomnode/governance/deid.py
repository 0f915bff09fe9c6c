"""De-identification by PS3.15 Annex E: the Basic Application Confidentiality Profile and options.

`deidentify(ds, profile, key, scope)` returns a de-identified copy of `ds` (the input is never
changed). The rules come from our copy of Table E.1-1 (`deid_table`, edition 2024b); compound
actions (Z/D, X/Z, X/D, X/Z/D, X/Z/U*) are resolved by the attribute's Type in the object's IOD
(`deid_types`); the rules apply at every sequence depth. UIDs and the patient pseudonym are
derived with HMAC-SHA256 under the caller's node secret and a scope (one per recipient), so the
same object gives the same output for one recipient and nobody without the key can confirm an
original from an output. The engine reads and writes no file, clock or network.

What it does not do: it cleans no pixel data. Objects whose pixels are likely to carry burned-in
text come back with `held` set unless the profile has the clean-pixel-data option, which states
that a separate, audited step cleaned them. `conformance_statement(profile)` says all this in
the terms of PS3.15 E.1.3.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cached_property

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode import __version__
from dicomnode.governance import deid_types
from dicomnode.governance.deid_conformance import statement_texts
from dicomnode.governance.deid_keys import (
    _check_key,
    _mac,
    date_shift_days,
    patient_pseudonym,
    remap_uid,
)
from dicomnode.governance.deid_pixels import burned_in_risk
from dicomnode.governance.deid_rules import (
    _PATTERN_PRIVATE,
    _SAFE_PRIVATE,
    _SAFE_PRIVATE_BLOCKS,
    EDITION,
    TABLE,
    TABLE_SHA256,
    _entry_action,
    _plan,
    attribute_type,
    resolve_compound,
)

# Option name -> CID 7050 code (PS3.16). The Basic Profile itself is 113100.
OPTIONS = {
    "retain-safe-private": "113111",
    "retain-uids": "113110",
    "retain-device-identity": "113109",
    "retain-institution-identity": "113112",
    "retain-patient-characteristics": "113108",
    "retain-longitudinal-full-dates": "113106",
    "retain-longitudinal-modified-dates": "113107",
    "clean-descriptors": "113105",
    "clean-structured-content": "113104",
    "clean-graphics": "113103",
    "clean-pixel-data": "113101",
    "clean-recognizable-visual-features": "113102",
}
BASIC_PROFILE_CODE = "113100"
# CID 7050 code meanings.
CODE_MEANINGS = {
    "113100": "Basic Application Confidentiality Profile",
    "113101": "Clean Pixel Data Option",
    "113102": "Clean Recognizable Visual Features Option",
    "113103": "Clean Graphics Option",
    "113104": "Clean Structured Content Option",
    "113105": "Clean Descriptors Option",
    "113106": "Retain Longitudinal Temporal Information Full Dates Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
    "113109": "Retain Device Identity Option",
    "113110": "Retain UIDs Option",
    "113111": "Retain Safe Private Option",
    "113112": "Retain Institution Identity Option",
}
_EXCLUSIVE = ("retain-longitudinal-full-dates", "retain-longitudinal-modified-dates")

# The same implementation identity as the archive's received files (dicomnode.archive.received).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1573.1"
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]

_TEXT = "DEIDENTIFIED"
DUMMY_VALUES: dict[str, object] = {
    "AE": _TEXT,
    "AS": "000D",
    "CS": _TEXT,
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "LO": _TEXT,
    "LT": _TEXT,
    "PN": _TEXT,
    "SH": _TEXT,
    "ST": _TEXT,
    "UC": _TEXT,
    "UT": _TEXT,
    "UR": "urn:uuid:00000000-0000-0000-0000-000000000000",
    "AT": 0,
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_FREE_TEXT_VRS = {"LO", "LT", "SH", "ST", "UC", "UT", "PN"}
_DATE_VRS = {"DA", "DT", "TM"}
# Text that a dummy sequence (D on a sequence) replaces even where the table does not list it;
# codes (CS), numbers and UIDs (remapped) keep the items valid.
_DUMMY_TEXT_VRS = {"AE", "AS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
_STANDARD_UID_ROOT = "1.2.840.10008."
# Unlisted UID attributes that name a class, syntax or code system, not an instance: kept.
_NON_INSTANCE_UID = re.compile(
    r"Class|TransferSyntax|CodingScheme|MappingResource|ContextGroupExtensionCreator|ContextUID"
    r"|CreatorVersion|TemplateUID|PrivateInformationCreator"
)
# Attributes whose values are searched for and blanked out of text that is cleaned (C).
_IDENTIFYING_KEYWORDS = (
    "PatientID",
    "OtherPatientIDs",
    "IssuerOfPatientID",
    "AccessionNumber",
    "StudyID",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "PatientBirthDate",
    "AdmissionID",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
    "PerformedProcedureStepID",
)


@dataclass(frozen=True)
class DeidProfile:
    """A named de-identification profile: the Basic Profile plus options (keys of OPTIONS)."""

    name: str
    options: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("DeidProfile.name: must be a non-empty string")
        if isinstance(self.options, str) or not hasattr(self.options, "__iter__"):
            raise ValueError("DeidProfile.options: must be a set of option names")
        options = frozenset(self.options)
        unknown = sorted(str(o) for o in options - set(OPTIONS))
        if unknown:
            raise ValueError(
                f"DeidProfile.options: unknown option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(OPTIONS))}"
            )
        if set(_EXCLUSIVE) <= options:
            raise ValueError(
                "DeidProfile.options: retain-longitudinal-full-dates and "
                "retain-longitudinal-modified-dates exclude each other"
            )
        object.__setattr__(self, "options", options)

    @property
    def codes(self) -> tuple[str, ...]:
        """The CID 7050 codes of this profile: 113100, then the options' codes in order."""
        return (BASIC_PROFILE_CODE, *sorted(OPTIONS[o] for o in self.options))


@dataclass(frozen=True)
class DeidResult:
    """A de-identified copy and what a caller needs to record about it."""

    dataset: Dataset
    uid_map: dict[str, str]
    patient_pseudonym: str
    date_shift_days: int
    held: str | None


def table_action(tag: int, profile: DeidProfile) -> str | None:
    """The Table E.1-1 action for `tag` under `profile` (compound codes unresolved), or None."""
    return _plan(profile.options).action(int(tag))


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _values(elem: DataElement) -> list:
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _patient_key(ds: Dataset) -> str:
    """What identifies the patient for the pseudonym and the date shift."""
    patient_id = _text(ds.get("PatientID", "")).strip()
    if patient_id:
        return patient_id
    fallback = _text(ds.get("PatientName", "")) + "\0" + _text(ds.get("PatientBirthDate", ""))
    if fallback.strip("\0 "):
        return "name:" + fallback
    return "study:" + _text(ds.get("StudyInstanceUID", ""))


def _collect_identifiers(ds: Dataset) -> tuple[str, ...]:
    """Identifying values of `ds` (at any depth) to blank out of text that is cleaned."""
    found: set[str] = set()

    def visit(item: Dataset) -> None:
        for elem in item:
            if elem.VR == "SQ":
                for child in elem.value or ():
                    visit(child)
                continue
            keyword = elem.keyword
            if elem.VR == "PN" or keyword in _IDENTIFYING_KEYWORDS:
                for value in _values(elem):
                    text = _text(value).strip()
                    found.add(text)
                    if elem.VR == "PN":
                        found.update(re.split(r"[\^=\s]+", text))
                    if elem.VR == "DA" and len(text) == 8:
                        found.update({f"{text[:4]}-{text[4:6]}-{text[6:]}", text[2:]})

    visit(ds)
    return tuple(sorted((v for v in found if len(v) >= 2), key=len, reverse=True))


_MODES = ("keep", "clean", "dummy")  # how unlisted attributes inside a sequence are treated


class _Run:
    """One de-identification of one object."""

    def __init__(self, ds: Dataset, profile: DeidProfile, key: bytes, scope: str) -> None:
        self.profile = profile
        self.options = profile.options
        self.plan = _plan(profile.options)
        self.key = key
        self.scope = scope
        sop_class = _text(ds.get("SOPClassUID", "")) or _text(
            getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
        )
        self.iod = deid_types.IOD_OF_SOP_CLASS.get(sop_class)
        self.patient_key = _patient_key(ds)
        self.modified_dates = "retain-longitudinal-modified-dates" in self.options
        self.shift = date_shift_days(self.patient_key, key, scope) if self.modified_dates else 0
        self.source = ds
        self.uid_map: dict[str, str] = {}

    # --- datasets -------------------------------------------------------------------------

    def dataset(self, source: Dataset, path: tuple[int, ...], mode: str) -> Dataset:
        out = Dataset()
        creators = self._private_creators(source)
        for elem in source:
            tag = int(elem.tag)
            if tag >> 16 == 0x0002:  # File Meta never belongs in the dataset: rebuilt apart
                continue
            if (tag >> 16) % 2:
                new = self._private(elem, path, mode, creators)
            else:
                new = self.element(elem, (*path, tag), mode)
            if new is not None:
                out.add(new)
        return out

    def _private_creators(self, source: Dataset) -> dict[tuple[int, int], str]:
        creators = {}
        for elem in source:
            tag = int(elem.tag)
            group, element = tag >> 16, tag & 0xFFFF
            if group % 2 and 0x0010 <= element <= 0x00FF:
                creators[(group, element)] = _text(elem.value).strip()
        return creators

    def _private(
        self,
        elem: DataElement,
        path: tuple[int, ...],
        mode: str,
        creators: dict[tuple[int, int], str],
    ) -> DataElement | None:
        if self.plan.private != "C":
            return None
        tag = int(elem.tag)
        group, element = tag >> 16, tag & 0xFFFF
        if 0x0010 <= element <= 0x00FF:  # a creator: kept if one of its elements is safe
            if (creators[(group, element)], group) not in _SAFE_PRIVATE_BLOCKS:
                return None
            return self._copy(elem, (*path, tag), mode)
        creator = creators.get((group, element >> 8))
        if element < 0x1000 or (creator, group, element & 0xFF) not in _SAFE_PRIVATE:
            return None
        return self._copy(elem, (*path, tag), mode)

    # --- one attribute ---------------------------------------------------------------------

    def element(self, elem: DataElement, path: tuple[int, ...], mode: str) -> DataElement | None:
        action = self.plan.action(path[-1])
        if action is None:
            return self._unlisted(elem, path, mode)
        if "/" in action:
            action = resolve_compound(action, attribute_type(self.iod, path))
        if action == "X":
            return None
        if action == "Z":
            return self._zero(elem, path)
        if action == "D":
            return self._dummy(elem, path)
        if action == "U":
            return self._uid(elem, path, mode)
        if action == "C":
            return self._clean(elem, path, mode)
        return self._copy(elem, path, mode)  # K

    def _unlisted(self, elem: DataElement, path: tuple[int, ...], mode: str) -> DataElement:
        vr = elem.VR
        if vr == "SQ":
            return self._sequence(elem, path, mode)
        if vr == "UI" and self._is_instance_uid(elem):
            return self._remapped(elem)
        if mode == "dummy" and vr in _DATE_VRS:
            return self._date(elem, self._date_action())
        if mode == "dummy" and vr in _DUMMY_TEXT_VRS:
            return self._dummy(elem, path)
        if mode == "clean" and vr in _FREE_TEXT_VRS:
            return self._scrubbed(elem)
        return self._copy(elem, path, mode)

    def _is_instance_uid(self, elem: DataElement) -> bool:
        if "retain-uids" in self.options or _NON_INSTANCE_UID.search(elem.keyword or ""):
            return False
        return any(not _text(v).startswith(_STANDARD_UID_ROOT) for v in _values(elem))

    def _copy(self, elem: DataElement, path: tuple[int, ...], mode: str) -> DataElement:
        if elem.VR == "SQ":
            return self._sequence(elem, path, mode)
        return DataElement(elem.tag, elem.VR, copy.deepcopy(elem.value))

    def _sequence(self, elem: DataElement, path: tuple[int, ...], mode: str) -> DataElement:
        items = [self.dataset(item, path, mode) for item in elem.value or ()]
        return DataElement(elem.tag, "SQ", Sequence(items))

    def _zero(self, elem: DataElement, path: tuple[int, ...]) -> DataElement:
        if elem.tag == 0x00100020:  # Patient ID: the keyed pseudonym (Z allows a dummy)
            return self._pseudonym(elem)
        if elem.VR == "SQ":
            return DataElement(elem.tag, "SQ", Sequence())
        return DataElement(elem.tag, elem.VR, None if elem.VR not in _STRING_VRS else "")

    def _dummy(self, elem: DataElement, path: tuple[int, ...]) -> DataElement:
        vr = elem.VR
        if elem.tag == 0x00100020:
            return self._pseudonym(elem)
        if vr == "SQ":
            items = [self.dataset(item, path, "dummy") for item in elem.value or ()]
            return DataElement(elem.tag, "SQ", Sequence(items or [Dataset()]))
        if vr == "UI":
            return self._remapped(elem, required=True)
        if vr in _BINARY_VRS:
            return DataElement(elem.tag, vr, b"\0" * 8)
        return DataElement(elem.tag, vr, DUMMY_VALUES.get(vr, _TEXT))

    def _uid(self, elem: DataElement, path: tuple[int, ...], mode: str) -> DataElement | None:
        if elem.VR == "SQ":  # X/Z/U* resolved to U: keep the items, their UIDs replaced
            return self._sequence(elem, path, mode)
        if elem.VR != "UI":
            return None
        return self._remapped(elem, required=True)

    def _clean(self, elem: DataElement, path: tuple[int, ...], mode: str) -> DataElement | None:
        vr = elem.VR
        if vr == "SQ":
            return self._sequence(elem, path, "dummy" if mode == "dummy" else "clean")
        if vr in _DATE_VRS:
            return self._date(elem, self._date_action())
        if vr == "AE":
            names = [self._ae_pseudonym(_text(v)) for v in _values(elem)]
            return DataElement(elem.tag, vr, names or "")
        if vr in _FREE_TEXT_VRS:
            return self._scrubbed(elem)
        if vr in _BINARY_VRS or vr == "UR":  # cannot be cleaned automatically: removed
            return None
        return self._copy(elem, path, mode)

    # --- values ----------------------------------------------------------------------------

    def _pseudonym(self, elem: DataElement) -> DataElement:
        own = _text(elem.value).strip()
        return DataElement(
            elem.tag, elem.VR, patient_pseudonym(own or self.patient_key, self.key, self.scope)
        )

    def _remapped(self, elem: DataElement, required: bool = False) -> DataElement:
        values = []
        for value in _values(elem):
            original = _text(value).strip("\0 ")
            if not original:
                continue
            new = self.uid_map.get(original) or remap_uid(original, self.key, self.scope)
            self.uid_map[original] = new
            values.append(new)
        if not values and required:
            values = [remap_uid(f"empty:{elem.tag:08X}", self.key, self.scope)]
        return DataElement(elem.tag, "UI", values if len(values) != 1 else values[0])

    def _ae_pseudonym(self, value: str) -> str:
        return "AE" + _mac(self.key, "ae", self.scope, value.strip()).hex()[:14].upper()

    def _date_action(self) -> str:
        if "retain-longitudinal-full-dates" in self.options:
            return "K"
        return "C" if self.modified_dates else "D"

    def _date(self, elem: DataElement, action: str) -> DataElement:
        if action == "K":
            return DataElement(elem.tag, elem.VR, copy.deepcopy(elem.value))
        if action == "D":
            return DataElement(elem.tag, elem.VR, DUMMY_VALUES[elem.VR])
        shifted = [self._shifted(elem.VR, _text(v).strip()) for v in _values(elem)]
        return DataElement(elem.tag, elem.VR, shifted if len(shifted) != 1 else shifted[0])

    def _shifted(self, vr: str, text: str) -> str:
        """`text` moved by the patient's date shift; times of day are not moved."""
        if vr == "TM":
            return text
        match = re.fullmatch(r"(\d{4})(\d{2})(\d{2})(.*)", text)
        if match is None or (vr == "DA" and match.group(4)):
            return DUMMY_VALUES[vr]  # partial or malformed: cannot be shifted, so replaced
        try:
            day = date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
            moved = day + timedelta(days=self.shift)
        except (ValueError, OverflowError):
            return DUMMY_VALUES[vr]
        return moved.strftime("%Y%m%d").rjust(8, "0") + match.group(4)

    def _scrubbed(self, elem: DataElement) -> DataElement:
        """Text kept with every identifying value of the object blanked out."""
        cleaned = [self.scrub(_text(v)) for v in _values(elem)]
        if not cleaned:
            return DataElement(elem.tag, elem.VR, "")
        return DataElement(elem.tag, elem.VR, cleaned if len(cleaned) != 1 else cleaned[0])

    @cached_property
    def identifiers(self) -> tuple[str, ...]:
        return _collect_identifiers(self.source)

    def scrub(self, text: str) -> str:
        for identifier in self.identifiers:
            text = re.sub(re.escape(identifier), "*" * len(identifier), text, flags=re.IGNORECASE)
        return text


_STRING_VRS = {
    "AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
    "UR", "UT",
}  # fmt: skip


def deidentify(ds: Dataset, profile: DeidProfile, key: bytes, scope: str = "") -> DeidResult:
    """A de-identified copy of `ds` under `profile`; `ds` itself is not changed.

    `key` is the node secret (at least 16 bytes); `scope` separates recipients: the same
    input, key and scope give the same UIDs, pseudonym and date shift.
    """
    if not isinstance(ds, Dataset):
        raise ValueError("ds: must be a pydicom Dataset")
    if not isinstance(profile, DeidProfile):
        raise ValueError("profile: must be a DeidProfile")
    if not isinstance(scope, str):
        raise ValueError("scope: must be a string")
    _check_key(key)
    run = _Run(ds, profile, key, scope)
    out = run.dataset(ds, (), "keep")
    pseudonym = patient_pseudonym(run.patient_key, key, scope)
    out.PatientID = pseudonym
    _mark(out, profile)
    out.file_meta = _file_meta(ds, out, run)
    return DeidResult(
        dataset=out,
        uid_map=dict(run.uid_map),
        patient_pseudonym=pseudonym,
        date_shift_days=run.shift,
        held=burned_in_risk(ds, profile),
    )


def _mark(out: Dataset, profile: DeidProfile) -> None:
    """Write the PS3.15 E.1.1 marks: identity removed, method and codes, temporal flag."""
    out.PatientIdentityRemoved = "YES"
    method = [f"dicomnode PS3.15 {EDITION} {profile.name}".replace("\\", "/")[:64]]
    method += [CODE_MEANINGS[c][:64] for c in profile.codes]
    out.DeidentificationMethod = method
    items = list(out.get("DeidentificationMethodCodeSequence", None) or ())
    have = {
        (_text(i.get("CodeValue", "")), _text(i.get("CodingSchemeDesignator", ""))) for i in items
    }
    for code in profile.codes:
        if (code, "DCM") in have:
            continue
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = CODE_MEANINGS[code]
        items.append(item)
    out.DeidentificationMethodCodeSequence = Sequence(items)
    options = profile.options
    if "retain-longitudinal-full-dates" in options:
        out.LongitudinalTemporalInformationModified = "UNMODIFIED"
    elif "retain-longitudinal-modified-dates" in options:
        out.LongitudinalTemporalInformationModified = "MODIFIED"
    else:
        out.LongitudinalTemporalInformationModified = "REMOVED"
    if "clean-pixel-data" in options:
        out.BurnedInAnnotation = "NO"
    if "clean-recognizable-visual-features" in options:
        out.RecognizableVisualFeatures = "NO"


def _file_meta(source: Dataset, out: Dataset, run: _Run) -> FileMetaDataset:
    """New File Meta Information naming dicomnode; nothing of the original's is carried over."""
    old = getattr(source, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = _text(out.get("SOPClassUID", "")) or _text(
        old.get("MediaStorageSOPClassUID", "")
    )
    instance = _text(out.get("SOPInstanceUID", ""))
    if not instance:
        original = _text(old.get("MediaStorageSOPInstanceUID", "")) or "no-sop-instance"
        keep = "retain-uids" in run.options and original != "no-sop-instance"
        instance = original if keep else remap_uid(original, run.key, run.scope)
        if not keep:
            run.uid_map.setdefault(original, instance)
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = _text(old.get("TransferSyntaxUID", "")) or ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def conformance_statement(profile: DeidProfile) -> dict:
    """What `deidentify` does under `profile`, in the terms of PS3.15 E.1.3, from the table."""
    if not isinstance(profile, DeidProfile):
        raise ValueError("profile: must be a DeidProfile")
    private = _plan(profile.options).private
    groups: dict[str, list[dict[str, str]]] = {a: [] for a in ("X", "Z", "D", "U", "K", "C")}
    by_type: list[dict[str, str]] = []
    for entry in TABLE:
        action = _entry_action(entry, profile.options)
        row = {"tag": _display_tag(entry.tag), "name": entry.name}
        if "/" in action:
            by_type.append({**row, "action": action})
        else:
            groups[action].append(row)
    options = sorted(profile.options)
    return {
        "profile": profile.name,
        "standard": f"DICOM PS3.15 Annex E, Table E.1-1 edition {EDITION}",
        "table_sha256": TABLE_SHA256,
        "methods": [
            {"code": c, "scheme": "DCM", "meaning": CODE_MEANINGS[c]} for c in profile.codes
        ],
        "options": options,
        "removed": groups["X"],
        "replaced_with_zero_length": groups["Z"],
        "replaced_with_dummy": groups["D"],
        "dummy_values": {vr: str(v) for vr, v in DUMMY_VALUES.items()}
        | {"binary": "8 zero bytes", "SQ": "the items with every value in them replaced"},
        "uid_replaced": groups["U"],
        "kept": groups["K"],
        "cleaned": groups["C"],
        **statement_texts(profile.options, private, by_type, IMPLEMENTATION_CLASS_UID),
    }


def _display_tag(tag: str) -> str:
    if tag == _PATTERN_PRIVATE:
        return "(gggg,eeee) where gggg is odd"
    return f"({tag[:4].upper()},{tag[4:].upper()})".replace("X", "x")
