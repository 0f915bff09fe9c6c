"""Frozen value types shared by the archive, intake, egress and the services."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from dicomnode.core.enums import Protocol, coerce


class LedgerKind(StrEnum):
    """What a ledger entry records."""

    DISCLOSURE = "disclosure"  # data left the node (allowed decision)
    DENIAL = "denial"  # data was refused (denied decision)
    DELETION = "deletion"  # data was destroyed
    PROCESSING = "processing"  # a processing decision that was not a plain yes (held, skipped)
    TRANSFER = "transfer"  # the outcome of sending data an earlier disclosure entry allowed
    CONSENT = "consent"  # a consent version was recorded
    POLICY = "policy"  # a policy version was published or came into force
    SUBJECT = "subject"  # a data-subject request (restrict, export, erase) and its outcome
    HOLD = "hold"  # a legal hold placed or released
    CHECKPOINT = "checkpoint"  # a signed checkpoint of the chain


class Level(StrEnum):
    """Query/Retrieve levels (PS3.4 C.3)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


@dataclass(frozen=True)
class Source:
    """Who sent or asked: the protocol, the caller's AE title or user, and their address."""

    protocol: Protocol  # dimse, dicomweb, analysis, cli...; a string is coerced
    caller: str = ""
    address: str = ""
    peer: str | None = None  # configured peer name, when the caller is one
    purpose: str | None = None  # the purpose of use the caller states (token claim, CLI flag)

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol", coerce(Protocol, self.protocol, "Source.protocol"))


@dataclass(frozen=True)
class PatientIdentity:
    """One person as the archive knows them: a Patient ID, exactly, within the issuer that
    assigned it. `issuer` None means "not named by the requester": it then stands for the one
    issuer the archive holds that ID under (see `Archive.identify`). Never a query pattern:
    `*` is the Patient ID `*`, not everyone."""

    patient_id: str
    issuer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.patient_id, str) or not self.patient_id.strip():
            raise ValueError("patient_id: a person is named by a non-empty Patient ID")
        object.__setattr__(self, "patient_id", self.patient_id.strip())
        if self.issuer is not None:
            object.__setattr__(self, "issuer", self.issuer.strip())

    def __str__(self) -> str:
        return self.patient_id if not self.issuer else f"{self.patient_id} (issuer {self.issuer})"


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


@dataclass(frozen=True)
class ConsentRecord:
    """One immutable version of a patient's consent for one purpose (HL7 purpose-of-use code).

    state: "granted", "refused" or "withdrawn". A change is a new version, never an edit.
    """

    patient_id: str
    issuer_of_patient_id: str
    purpose: str
    version: int
    state: str
    valid_from: datetime
    valid_until: datetime | None
    evidence_ref: str
    recorded_by: str
    recorded_at: datetime
    note: str = ""
    # PIPA 17(2)1: the recipients the consent names; empty: any recipient of the purpose
    recipients: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """How decisions and the ledger name this version."""
        issuer = f"^{self.issuer_of_patient_id}" if self.issuer_of_patient_id else ""
        return f"consent:{self.patient_id}{issuer}:{self.purpose}:v{self.version}"

    def as_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        return data | {"ref": self.ref}


@dataclass(frozen=True)
class PatientFacts:
    """What governance needs to know about one patient to decide: every consent version and
    whether the patient restricted processing (a data-subject request)."""

    patient_id: str
    consents: tuple[ConsentRecord, ...] = ()
    restricted: bool = False
    restriction_ref: str = ""
    # the IssuerOfPatientID of each person the decision is about ("" for objects without
    # one); empty: not known, every consent of the Patient ID counts
    issuers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PublishedPolicy:
    """A policy version as the node published it: its TOML source and when it takes effect."""

    version: str
    source: str
    sha256: str
    published_at: datetime
    effective_at: datetime
    material: bool
    published_by: str = ""


@dataclass(frozen=True)
class StudyFacts:
    """What retention needs to know of one study (gathered by the archive, judged by governance)."""

    study_instance_uid: str
    patient_id: str
    modalities: frozenset[str]
    images: int  # received objects
    results: int  # objects the node's analyses produced
    images_received_at: datetime | None  # the last received object's time
    results_received_at: datetime | None
    study_date: datetime | None
    analysis_done_at: datetime | None  # the last finished analysis job of the study
    consent_withdrawn_at: datetime | None  # the patient withdrew consent to the intake purpose
    holds: tuple[str, ...] = ()  # active legal holds on the patient or the study
