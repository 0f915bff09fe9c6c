"""Frozen value types shared by the archive, intake, egress and the services."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class LedgerKind(StrEnum):
    """What a ledger entry records."""

    DISCLOSURE = "disclosure"  # data left the node (allowed decision)
    DENIAL = "denial"  # data was refused (denied decision)
    DELETION = "deletion"  # data was destroyed


class Level(StrEnum):
    """Query/Retrieve levels (PS3.4 C.3)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


@dataclass(frozen=True)
class Source:
    """Who sent or asked: the protocol, the caller's AE title or user, and their address."""

    protocol: str  # "dimse", "dicomweb", "analysis"
    caller: str = ""
    address: str = ""
    peer: str | None = None  # configured peer name, when the caller is one


@dataclass(frozen=True)
class Query:
    """A search at one level: attribute keyword -> DICOM query value, plus the keys to return.

    Values use DICOM matching syntax (PS3.4 C.2.2.2): empty = universal, `*`/`?` wildcards,
    backslash-separated UID lists, `A-B` date/time ranges.
    """

    level: Level
    filters: tuple[tuple[str, str], ...] = ()
    return_keys: tuple[str, ...] = ()
    limit: int | None = None
    offset: int = 0

    @classmethod
    def build(
        cls,
        level: Level,
        filters: dict[str, str] | None = None,
        return_keys: list[str] | tuple[str, ...] = (),
        limit: int | None = None,
        offset: int = 0,
    ) -> Query:
        return cls(
            level=level,
            filters=tuple(sorted((filters or {}).items())),
            return_keys=tuple(return_keys),
            limit=limit,
            offset=offset,
        )


@dataclass(frozen=True)
class StoredInstance:
    """An instance as the archive holds it."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    transfer_syntax_uid: str
    blob_path: str  # relative to the blob store root
    size: int
    sha256: str


@dataclass(frozen=True)
class IngestResult:
    """What ingest did with one object.

    outcome: "stored", "duplicate" (identical, nothing new) or "replaced".
    """

    instance: StoredInstance
    outcome: str
    warnings: tuple[str, ...] = field(default=())
    header: Any = None  # the parsed pydicom Dataset (without pixel data access), for subscribers
