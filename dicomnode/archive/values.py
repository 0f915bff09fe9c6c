"""The value types of the governance records (archive/registry.py and the stores it joins):
deliveries, objects in intake's quarantine, restrictions and legal holds, and the row readers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dicomnode.core.enums import DeliveryState
from dicomnode.core.model import (
    ConsentRecord,
)
from dicomnode.core.times import as_utc

GOVERNANCE_LOCK = 1573_0002  # serialises check-then-write changes of governance records
CACHE_SECONDS = 5.0  # how stale another process's writes may look to the cached reads

# delivery states (dicomnode.core.enums.DeliveryState)
QUEUED, SENDING, DONE, FAILED, DENIED, CANCELLED = tuple(DeliveryState)
FINISHED_DELIVERIES = (DONE, FAILED, DENIED, CANCELLED)


@dataclass(frozen=True)
class Delivery:
    """Data on its way to a recipient: forwarded analysis results or a share."""

    id: int
    kind: str
    recipient: str
    purpose: str
    patient_id: str
    study_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    requested_by: str
    state: str
    attempts: int
    max_attempts: int
    not_before: datetime
    created_at: datetime
    finished_at: datetime | None
    error: str | None
    outcome: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["sop_instance_uids"] = list(self.sop_instance_uids)
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        return data


@dataclass(frozen=True)
class QuarantinedObject:
    """An object intake filed aside in its quarantine instead of admitting, and why (not a
    legal hold, nor a job awaiting governance: those are other things)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    blob_path: str
    source_protocol: str
    source_caller: str
    reason: str
    rule_id: str
    policy_version: str
    held_at: datetime

    def as_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "blob_path"}
        data["held_at"] = self.held_at.isoformat()
        return data


@dataclass(frozen=True)
class Restriction:
    id: int
    patient_id: str
    issuer_of_patient_id: str
    reason: str
    requested_by: str
    created_at: datetime
    lifted_at: datetime | None
    lifted_by: str | None

    @property
    def ref(self) -> str:
        return f"restriction:{self.id}"


@dataclass(frozen=True)
class LegalHold:
    """A hold on a patient's or a study's data: no deletion of it until released."""

    id: int
    patient_id: str | None
    study_instance_uid: str | None
    owner: str
    reason: str
    case_ref: str
    review_date: datetime | None
    placed_by: str
    placed_at: datetime
    released_at: datetime | None
    released_by: str | None
    issuer_of_patient_id: str | None = None  # None: the Patient ID under any issuer

    @property
    def ref(self) -> str:
        return f"hold:{self.id}"

    @property
    def active(self) -> bool:
        return self.released_at is None

    def holds_patient(self, patient_id: str, issuer: str | None = None) -> bool:
        """Whether this hold is on that patient: the same Patient ID, and the same issuer when
        both the hold and the object name one (an unknown side counts: conservative)."""
        return self.patient_id == patient_id and (
            self.issuer_of_patient_id is None
            or issuer is None
            or self.issuer_of_patient_id == issuer
        )

    def covers(self, patient_id: str, study_uid: str, issuer: str | None = None) -> bool:
        """Whether this active hold covers a study of this patient (issuer: of the study's
        Patient ID, None when not known)."""
        return self.active and (
            self.holds_patient(patient_id, issuer) or self.study_instance_uid == study_uid
        )

    def as_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        return data | {"ref": self.ref, "active": self.active}


def _hold(row: Any) -> LegalHold:
    return LegalHold(
        **{
            k: (
                as_utc(row._mapping[k])
                if k in ("review_date", "placed_at", "released_at")
                else row._mapping[k]
            )
            for k in LegalHold.__dataclass_fields__
        }
    )


def _consent(row: Any) -> ConsentRecord:
    return ConsentRecord(
        patient_id=row.patient_id,
        issuer_of_patient_id=row.issuer_of_patient_id,
        purpose=row.purpose,
        version=row.version,
        state=row.state,
        valid_from=as_utc(row.valid_from),
        valid_until=as_utc(row.valid_until),
        evidence_ref=row.evidence_ref,
        recorded_by=row.recorded_by,
        recorded_at=as_utc(row.recorded_at),
        note=row.note,
        recipients=tuple(json.loads(row.recipients)) if row.recipients else (),
    )


def _delivery(row: Any) -> Delivery:
    return Delivery(
        id=row.id,
        kind=row.kind,
        recipient=row.recipient,
        purpose=row.purpose,
        patient_id=row.patient_id,
        study_instance_uid=row.study_instance_uid,
        sop_instance_uids=tuple(json.loads(row.sop_instance_uids)),
        requested_by=row.requested_by,
        state=row.state,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        not_before=as_utc(row.not_before),
        created_at=as_utc(row.created_at),
        finished_at=as_utc(row.finished_at),
        error=row.error,
        outcome=json.loads(row.outcome) if row.outcome else None,
    )


def _restriction(row: Any) -> Restriction:
    return Restriction(
        row.id,
        row.patient_id,
        row.issuer_of_patient_id,
        row.reason,
        row.requested_by,
        as_utc(row.created_at),
        as_utc(row.lifted_at),
        row.lifted_by,
    )


def _chunks(values: list[str], size: int = 500) -> list[list[str]]:
    return [values[i : i + size] for i in range(0, len(values), size)]
