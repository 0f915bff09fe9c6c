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
import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cached_property, lru_cache

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode import __version__
from dicomnode.governance import deid_private, deid_table, deid_types

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
# Option name -> its column in deid_table (the two pixel options have no column).
_OPTION_COLUMN = {
    "retain-safe-private": "safe-private",
    "retain-uids": "uids",
    "retain-device-identity": "device",
    "retain-institution-identity": "institution",
    "retain-patient-characteristics": "patient-chars",
    "retain-longitudinal-full-dates": "full-dates",
    "retain-longitudinal-modified-dates": "modified-dates",
    "clean-descriptors": "descriptors",
    "clean-structured-content": "structured",
    "clean-graphics": "graphics",
}
_EXCLUSIVE = ("retain-longitudinal-full-dates", "retain-longitudinal-modified-dates")

# The same implementation identity as the archive's received files (dicomnode.archive.received).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1573.1"
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]
MIN_KEY_BYTES = 16

# When several options give an attribute different actions, the most protective one wins.
_PROTECTION_ORDER = ("X", "Z", "D", "U", "C", "K")
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
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
# Burned-in text risk: these image types are held whatever Burned In Annotation says, ...
_ALWAYS_HELD_MODALITIES = {"US", "IVUS", "OT", "SC", "XC", "ES", "GM", "DOC", "OP"}
_ALWAYS_HELD_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture, single and multi-frame
    "1.2.840.10008.5.1.4.1.1.6.",  # ultrasound
    "1.2.840.10008.5.1.4.1.1.3.1",  # ultrasound multi-frame
    "1.2.840.10008.5.1.4.1.1.77.",  # visible light (endoscopy, photography, microscopy)
)
# ... and these projection images are held unless it says NO.
_HELD_UNLESS_FLAGGED_MODALITIES = {"CR", "DX", "MG", "IO", "PX", "RF", "XA", "RG"}


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


@dataclass(frozen=True)
class TableEntry:
    """One row of Table E.1-1: tag or pattern, name, Basic Profile and option actions."""

    tag: str
    in_std_iod: bool
    basic: str
    options: dict[str, str]
    name: str


def _parse_table() -> tuple[TableEntry, ...]:
    entries = []
    for tag, in_std, basic, options, name in deid_table.ROWS:
        columns = dict(word.split("=", 1) for word in options.split())
        entries.append(TableEntry(tag, in_std == "Y", basic, columns, name))
    return tuple(entries)


TABLE: tuple[TableEntry, ...] = _parse_table()
EDITION = deid_table.EDITION
# Identifies the rules in force, for the ledger entry of each de-identification.
TABLE_SHA256 = hashlib.sha256(
    repr((deid_table.ROWS, deid_types.TYPES, deid_private.SAFE_PRIVATE_ATTRIBUTES)).encode()
).hexdigest()
_PATTERN_PRIVATE, _PATTERN_CURVE = "odd-group", "50xxxxxx"
_PATTERN_OVERLAY_DATA, _PATTERN_OVERLAY_COMMENTS = "60xx3000", "60xx4000"
_PATTERNS = (_PATTERN_PRIVATE, _PATTERN_CURVE, _PATTERN_OVERLAY_DATA, _PATTERN_OVERLAY_COMMENTS)


def _safe_private() -> frozenset[tuple[str, int, int]]:
    found = set()
    for creator, group, elements in deid_private.SAFE_PRIVATE_ATTRIBUTES:
        found.update((creator, int(group, 16), int(e, 16)) for e in elements.split())
    return frozenset(found)


_SAFE_PRIVATE = _safe_private()
_SAFE_PRIVATE_BLOCKS = frozenset((creator, group) for creator, group, _ in _SAFE_PRIVATE)


def _entry_action(entry: TableEntry, options: frozenset[str]) -> str:
    """The entry's action under `options`: an option's action overrides the Basic Profile's."""
    chosen = [
        entry.options[column]
        for option in options
        if (column := _OPTION_COLUMN.get(option)) in entry.options
    ]
    if not chosen:
        return entry.basic
    return min(chosen, key=_PROTECTION_ORDER.index)


@dataclass(frozen=True)
class _Plan:
    """Table actions for one set of options, precomputed for dict lookups."""

    by_tag: dict[int, str]
    private: str
    curve: str
    overlay_data: str
    overlay_comments: str

    def action(self, tag: int) -> str | None:
        found = self.by_tag.get(tag)
        if found is not None:
            return found
        group, element = tag >> 16, tag & 0xFFFF
        if group % 2:
            return self.private
        if group & 0xFF00 == 0x5000:
            return self.curve
        if group & 0xFF00 == 0x6000:
            if element == 0x3000:
                return self.overlay_data
            if element == 0x4000:
                return self.overlay_comments
        return None


@lru_cache(maxsize=64)
def _plan(options: frozenset[str]) -> _Plan:
    by_tag, patterns = {}, {}
    for entry in TABLE:
        action = _entry_action(entry, options)
        if entry.tag in _PATTERNS:
            patterns[entry.tag] = action
        else:
            by_tag[int(entry.tag, 16)] = action
    return _Plan(
        by_tag,
        patterns[_PATTERN_PRIVATE],
        patterns[_PATTERN_CURVE],
        patterns[_PATTERN_OVERLAY_DATA],
        patterns[_PATTERN_OVERLAY_COMMENTS],
    )


def table_action(tag: int, profile: DeidProfile) -> str | None:
    """The Table E.1-1 action for `tag` under `profile` (compound codes unresolved), or None."""
    return _plan(profile.options).action(int(tag))


_FALLBACK_IOD = "*"  # deid_types' strictest Type over every IOD of the standard


def _strictest_by_leaf() -> dict[str, str]:
    strictest: dict[str, str] = {}
    for path, kind in deid_types.TYPES[_FALLBACK_IOD].items():
        leaf = path.rsplit("/", 1)[-1]
        strictest[leaf] = min(strictest.get(leaf, "3"), kind)
    return strictest


_STRICTEST_BY_LEAF = _strictest_by_leaf()


def attribute_type(iod: str | None, path: tuple[int, ...]) -> str:
    """The Type ("1", "2" or "3") of the attribute at `path` in `iod`, for compound actions.

    Unknown IOD: the strictest Type over all IODs. Top-level attribute not in a known IOD: "3"
    (optional there). A nested attribute whose sequence path is not tabulated: the strictest
    Type the attribute has anywhere, and "1" if it has none (the most protective action that
    keeps the object conformant: a dummy, never a removal that could break it).
    """
    key = "/".join(f"{t:08X}" for t in path)
    if iod is not None:
        found = deid_types.TYPES[iod].get(key)
        if found is not None:
            return found
        if len(path) == 1:
            return "3"
    found = deid_types.TYPES[_FALLBACK_IOD].get(key)
    if found is not None:
        return found
    if len(path) == 1:
        return "3"
    return _STRICTEST_BY_LEAF.get(key.rsplit("/", 1)[-1], "1")


_COMPOUND_BY_TYPE = {
    "Z/D": {"1": "D", "2": "Z", "3": "Z"},
    "X/Z": {"1": "Z", "2": "Z", "3": "X"},
    "X/D": {"1": "D", "2": "D", "3": "X"},
    "X/Z/D": {"1": "D", "2": "Z", "3": "X"},
    # Type 2 too keeps the items with their UIDs replaced: an empty reference sequence would
    # break the conditions that tie references together (e.g. the Common Instance Reference
    # Module of a SEG), and replaced UIDs identify nobody.
    "X/Z/U*": {"1": "U", "2": "U", "3": "X"},
}


def resolve_compound(action: str, kind: str) -> str:
    """A simple action for a compound one, given the attribute Type (PS3.15 Table E.1-1a)."""
    if "/" not in action:
        return action
    return _COMPOUND_BY_TYPE[action][kind]


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"key: must be a node secret of at least {MIN_KEY_BYTES} bytes")


def _mac(key: bytes, purpose: str, scope: str, value: str) -> bytes:
    message = "\0".join((purpose, scope, value)).encode("utf-8")
    return hmac.new(bytes(key), message, hashlib.sha256).digest()


def remap_uid(uid: str, key: bytes, scope: str = "") -> str:
    """The replacement for `uid`: "2.25." + a 128-bit keyed HMAC-SHA256 value (UUID version 8).

    The same uid, key and scope always give the same replacement; without the key nobody can
    tell which original a replacement stands for.
    """
    _check_key(key)
    if not isinstance(uid, str):
        raise ValueError("uid: must be a string")
    raw = bytearray(_mac(key, "uid", scope, uid.strip("\0 "))[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8: custom (RFC 9562)
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC variant
    return f"2.25.{int.from_bytes(raw, 'big')}"


def patient_pseudonym(patient_id: str, key: bytes, scope: str = "") -> str:
    """The Patient ID written out for `patient_id`: keyed, so stable per key and scope."""
    _check_key(key)
    return "P" + _mac(key, "patient", scope, patient_id.strip()).hex()[:20].upper()


def date_shift_days(patient_id: str, key: bytes, scope: str = "") -> int:
    """Days (between -3650 and -1) that one patient's dates move under modified dates."""
    _check_key(key)
    digest = _mac(key, "date-shift", scope, patient_id.strip())
    return -(1 + int.from_bytes(digest[:8], "big") % 3650)


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


def burned_in_risk(ds: Dataset, profile: DeidProfile) -> str | None:
    """Why the object's pixels may carry burned-in identity (so it must not leave), or None."""
    if "clean-pixel-data" in profile.options or not any(t in ds for t in _PIXEL_TAGS):
        return None
    flag = _text(ds.get("BurnedInAnnotation", "")).strip().upper()
    modality = _text(ds.get("Modality", "")).strip().upper()
    sop_class = _text(ds.get("SOPClassUID", ""))
    if flag == "YES":
        return "Burned In Annotation is YES: the pixel data must be cleaned first"
    if modality in _ALWAYS_HELD_MODALITIES or sop_class.startswith(_ALWAYS_HELD_SOP_PREFIXES):
        kind = modality or sop_class
        return (
            f"{kind} images often carry burned-in text whatever Burned In Annotation says "
            f"({flag or 'missing'}): the pixel data must be cleaned first"
        )
    if modality in _HELD_UNLESS_FLAGGED_MODALITIES and flag != "NO":
        return f"{modality} image without Burned In Annotation NO: clean the pixel data first"
    return None


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
    modified = "retain-longitudinal-modified-dates" in profile.options
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
        "cleaning": (
            "Sequences are cleaned by applying these rules to every item. Dates are moved by "
            "the patient's date shift (modified dates); AE titles become keyed pseudonyms; text "
            "is kept with every name, ID, address, institution and birth date found in the "
            "object blanked out; binary data (overlay bitmaps, curve data) cannot be cleaned "
            "and is removed."
        ),
        "resolved_by_type": by_type,
        "type_resolution": (
            "Compound actions use the attribute's Type in the object's IOD (PS3.3, CT, MR, XA, "
            "SC, US, DX/CR, MG, PET, NM, SEG, SR and KOS): Type 3 removed, Type 2 zero length, "
            "Type 1 dummy (X/Z/U*: Types 1 and 2 keep the items with their UIDs replaced). For "
            "other IODs the strictest Type over all IODs is used; for an attribute of unknown "
            "Type the dummy."
        ),
        "private_attributes": (
            "kept only if listed in PS3.15 Table E.3.10-1 (by private creator, group and "
            "element); every other private attribute and every unknown creator is removed"
            if private == "C"
            else "all removed"
        ),
        "uid_scope": (
            "UIDs are replaced by 2.25 UIDs derived with HMAC-SHA256 under the node secret and "
            "the recipient scope: consistent across objects, studies and re-runs for one scope, "
            "different between scopes; every UID attribute that names an instance, series, "
            "study, frame of reference or other entity is replaced, at any depth."
            if "retain-uids" not in profile.options
            else "UIDs are kept (Retain UIDs Option)."
        ),
        "key": (
            f"HMAC-SHA256 with the node secret (at least {MIN_KEY_BYTES} bytes); replacement "
            "UIDs carry 122 bits of the MAC. No unkeyed hash is used."
        ),
        "patient_identity": (
            "Patient ID is replaced by a keyed pseudonym of the original Patient ID (stable per "
            "scope); Patient's Name, Birth Date and the other identity attributes follow the table."
        ),
        "dates": (
            "Dates are moved into the past by a per-patient shift of 1-3650 days derived from "
            "the node secret and scope; times of day are kept, so intervals are preserved."
            if modified
            else "Dates and times are kept."
            if "retain-longitudinal-full-dates" in profile.options
            else "Dates and times are removed or replaced by dummies per the table."
        ),
        "inserted_attributes": [
            "PatientIdentityRemoved",
            "DeidentificationMethod",
            "DeidentificationMethodCodeSequence",
            "LongitudinalTemporalInformationModified",
            "PatientID",
            *(["BurnedInAnnotation"] if "clean-pixel-data" in profile.options else []),
            *(
                ["RecognizableVisualFeatures"]
                if "clean-recognizable-visual-features" in profile.options
                else []
            ),
        ],
        "file_meta": (
            "The File Meta Information is rebuilt (new Media Storage SOP Instance UID, dicomnode "
            f"implementation UID {IMPLEMENTATION_CLASS_UID}); the preamble is not carried over."
        ),
        "encrypted_attributes": "none: no Encrypted Attributes Sequence is written",
        "pixel_data": (
            "This engine does not clean pixel data. Images likely to carry burned-in text "
            "(Burned In Annotation YES; US, secondary capture, OT and other captures whatever "
            "the flag; CR, DX, MG, XA, RF without the flag NO) are held unless the Clean Pixel "
            "Data Option states that a separate step cleaned them."
        ),
    }


def _display_tag(tag: str) -> str:
    if tag == _PATTERN_PRIVATE:
        return "(gggg,eeee) where gggg is odd"
    return f"({tag[:4].upper()},{tag[4:].upper()})".replace("X", "x")
