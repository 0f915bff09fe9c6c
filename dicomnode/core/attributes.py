"""The attributes the index keeps at each level: the one table that the schema, ingest,
C-FIND and QIDO-RS all read.

Each entry names a DICOM keyword and the column that holds it. Matching follows the VR
(PS3.4 C.2.2.2): UI list matching, DA/TM/DT range matching, PN case-insensitive wildcard
matching, IS/US numeric single-value matching, and wildcard matching for the other strings.
Computed attributes (counts, ModalitiesInStudy, ...) are derived from the rows below.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from dicomnode.core.elements import ElementReader, reader_for
from dicomnode.core.model import Level


@dataclass(frozen=True)
class IndexedAttribute:
    keyword: str
    column: str
    level: Level

    @cached_property
    def reader(self) -> ElementReader:
        return reader_for(self.keyword)

    @property
    def vr(self) -> str:
        return self.reader.vr

    @property
    def is_integer(self) -> bool:
        return self.vr in ("IS", "US", "UL", "SS", "SL")


def _attrs(level: Level, *pairs: tuple[str, str]) -> tuple[IndexedAttribute, ...]:
    return tuple(IndexedAttribute(keyword, column, level) for keyword, column in pairs)


PATIENT_ATTRIBUTES = _attrs(
    Level.PATIENT,
    ("PatientID", "patient_id"),
    ("IssuerOfPatientID", "issuer_of_patient_id"),
    ("PatientName", "patient_name"),
    ("PatientBirthDate", "patient_birth_date"),
    ("PatientSex", "patient_sex"),
)

STUDY_ATTRIBUTES = _attrs(
    Level.STUDY,
    ("StudyInstanceUID", "study_instance_uid"),
    ("StudyDate", "study_date"),
    ("StudyTime", "study_time"),
    ("AccessionNumber", "accession_number"),
    ("StudyID", "study_id"),
    ("ReferringPhysicianName", "referring_physician_name"),
    ("StudyDescription", "study_description"),
    ("TimezoneOffsetFromUTC", "timezone_offset_from_utc"),
)

SERIES_ATTRIBUTES = _attrs(
    Level.SERIES,
    ("SeriesInstanceUID", "series_instance_uid"),
    ("Modality", "modality"),
    ("SeriesNumber", "series_number"),
    ("SeriesDescription", "series_description"),
    ("SeriesDate", "series_date"),
    ("SeriesTime", "series_time"),
    ("BodyPartExamined", "body_part_examined"),
    ("Laterality", "laterality"),
    ("ProtocolName", "protocol_name"),
    ("PerformedProcedureStepStartDate", "pps_start_date"),
    ("PerformedProcedureStepStartTime", "pps_start_time"),
    ("InstitutionName", "institution_name"),
    ("StationName", "station_name"),
    ("Manufacturer", "manufacturer"),
)

INSTANCE_ATTRIBUTES = _attrs(
    Level.IMAGE,
    ("SOPInstanceUID", "sop_instance_uid"),
    ("SOPClassUID", "sop_class_uid"),
    ("InstanceNumber", "instance_number"),
    ("ContentDate", "content_date"),
    ("ContentTime", "content_time"),
    ("AcquisitionDateTime", "acquisition_datetime"),
    ("Rows", "rows"),
    ("Columns", "columns"),
    ("BitsAllocated", "bits_allocated"),
    ("NumberOfFrames", "number_of_frames"),
)

ATTRIBUTES_BY_LEVEL: dict[Level, tuple[IndexedAttribute, ...]] = {
    Level.PATIENT: PATIENT_ATTRIBUTES,
    Level.STUDY: STUDY_ATTRIBUTES,
    Level.SERIES: SERIES_ATTRIBUTES,
    Level.IMAGE: INSTANCE_ATTRIBUTES,
}

INDEXED: dict[str, IndexedAttribute] = {
    a.keyword: a for attrs in ATTRIBUTES_BY_LEVEL.values() for a in attrs
}

# Derived at query time from the levels below; keyword -> level it belongs to.
COMPUTED: dict[str, Level] = {
    "NumberOfPatientRelatedStudies": Level.PATIENT,
    "NumberOfPatientRelatedSeries": Level.PATIENT,
    "NumberOfPatientRelatedInstances": Level.PATIENT,
    "ModalitiesInStudy": Level.STUDY,
    "SOPClassesInStudy": Level.STUDY,
    "NumberOfStudyRelatedSeries": Level.STUDY,
    "NumberOfStudyRelatedInstances": Level.STUDY,
    "NumberOfSeriesRelatedInstances": Level.SERIES,
    "AvailableTransferSyntaxUID": Level.IMAGE,
    "InstanceAvailability": Level.IMAGE,
}

UNIQUE_KEY: dict[Level, str] = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}

LEVEL_ORDER = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)


def levels_up_to(level: Level) -> tuple[Level, ...]:
    """The levels from PATIENT down to `level`, inclusive."""
    return LEVEL_ORDER[: LEVEL_ORDER.index(level) + 1]


def default_return_keys(level: Level) -> tuple[str, ...]:
    """What QIDO-RS returns at `level` when no includefield is given (PS3.18 10.6.3.3)."""
    keys = [a.keyword for a in ATTRIBUTES_BY_LEVEL[level]]
    if level == Level.STUDY:
        keys = (
            [a.keyword for a in PATIENT_ATTRIBUTES]
            + keys
            + [
                "ModalitiesInStudy",
                "NumberOfStudyRelatedSeries",
                "NumberOfStudyRelatedInstances",
            ]
        )
    elif level == Level.SERIES:
        keys += ["NumberOfSeriesRelatedInstances"]
    elif level == Level.IMAGE:
        keys += ["AvailableTransferSyntaxUID"]
    return tuple(keys)
