"""The pseudonymised-data register as the DPO reads it (checklist items 27 and 36): one row per
pseudonymised disclosure with the items of PIPA Decree Art. 29-5(2), its destruction date when
known and the keep-until governance computes from it (+ 3 years, PIPA Art. 28-4(3)).

It names no pseudonym and no replacement UID: the linkage stays with the de-identification
secret in the key store (PIPA Art. 28-4(1)), which nothing here reads."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from dicomnode.archive.pseudonymised import PseudonymisedRecord, PseudonymisedRegister
from dicomnode.governance import pseudonymised as rules

# the export's columns, in order (the pages label them in English and Korean)
COLUMNS = (
    "record",
    "delivery",
    "processed_at",
    "processed_by",
    "purpose",
    "activity",
    "basis",
    "recipient",
    "recipient_name",
    "recipient_country",
    "items",
    "profile",
    "method_codes",
    "table_edition",
    "patient_ids",
    "study_instance_uid",
    "instances",
    "instances_sent",
    "withheld",
    "period_start",
    "period_end",
    "period",
    "policy_version",
    "destroyed_at",
    "destroyed_how",
    "keep_until",
)


def _moment(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else ""


def register_row(record: PseudonymisedRecord) -> dict[str, Any]:
    """One record with the export's columns (lists as lists; the CSV joins them with ';')."""
    kept = rules.keep_until(record.destroyed_at) if record.destroyed_at is not None else None
    return {
        "record": record.id,
        "delivery": record.delivery_id,
        "processed_at": _moment(record.processed_at),
        "processed_by": record.processed_by,
        "purpose": record.purpose,
        "activity": record.activity,
        "basis": record.basis,
        "recipient": record.recipient,
        "recipient_name": record.recipient_name,
        "recipient_country": record.recipient_country,
        "items": [f"{item}:{how}" for item, how in record.items],
        "profile": record.profile,
        "method_codes": list(record.method.get("codes", [])),
        "table_edition": str(record.method.get("table_edition", "")),
        "patient_ids": list(record.patient_ids),
        "study_instance_uid": record.study_instance_uid,
        "instances": record.instances,
        "instances_sent": record.instances_sent,
        "withheld": record.withheld,
        "period_start": _moment(record.processed_at),
        "period_end": _moment(record.period_end),
        "period": record.period,
        "policy_version": record.policy_version,
        "destroyed_at": _moment(record.destroyed_at),
        "destroyed_how": record.destroyed_how,
        "keep_until": _moment(kept),
    }


class PseudonymisedRecords:
    """The register over the node's index (`stewardship`: the node's, for its archive)."""

    def __init__(self, stewardship: Any) -> None:
        self.register = PseudonymisedRegister(stewardship.archive.index)

    def rows(self) -> list[dict[str, Any]]:
        """Every record, oldest first, as `register_row` gives it."""
        return [register_row(r) for r in self.register.records()]
