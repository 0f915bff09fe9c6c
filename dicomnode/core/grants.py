"""A break-glass grant as recorded and as governance reads it (one type for both rooms)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Grant:
    """One break-glass grant: one requester, one patient (or one study of theirs), a stated
    reason and an expiry."""

    id: int
    requester: str
    patient_id: str
    issuer: str  # "" when not known: the Patient ID under any issuer
    study_instance_uid: str  # "" : every study of the patient
    reason: str
    granted_at: datetime
    expires_at: datetime
    ended_at: datetime | None = None

    @property
    def ref(self) -> str:
        return f"break-glass-{self.id}"

    def active(self, now: datetime) -> bool:
        return self.granted_at <= now < self.expires_at and self.ended_at is None
