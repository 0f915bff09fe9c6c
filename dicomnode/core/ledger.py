"""The ledger's plain values: an entry and how its hash is computed, a signed checkpoint, the
result of verifying the chain, and the filter and page of the DPO's views of it.

The chain itself (appends, verification, checkpoints) is kept by ``dicomnode.archive.ledger``;
these types are what the rooms above read back. stdlib only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from dicomnode.core.model import LedgerKind

GENESIS_HASH = "0" * 64


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    recorded_at: str
    kind: str
    actor: str
    outcome: str
    detail: str  # canonical JSON, exactly as hashed
    prev_hash: str
    hash: str

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.detail)

    @classmethod
    def from_row(cls, row: Any) -> LedgerEntry:
        """The entry of a ledger_entries row."""
        return cls(
            row.seq,
            row.recorded_at,
            row.kind,
            row.actor,
            row.outcome,
            row.detail,
            row.prev_hash,
            row.hash,
        )


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement that entry `seq` of the ledger had hash `head_hash`."""

    seq: int
    head_hash: str
    created_at: str
    signature: str

    def payload(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.head_hash, "at": self.created_at}

    def as_dict(self) -> dict[str, Any]:
        return {**self.payload(), "signature": self.signature}


@dataclass(frozen=True)
class Verification:
    """The result of checking the chain: `first_bad` names the first entry that fails."""

    ok: bool
    entries: int
    first_bad: int | None = None
    problem: str = ""
    head_hash: str = GENESIS_HASH
    checkpoints: int = 0  # checkpoints the chain was checked against


def canonical_detail(detail: dict[str, Any]) -> str:
    return json.dumps(
        detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )


def entry_hash(
    prev_hash: str, seq: int, recorded_at: str, kind: str, actor: str, outcome: str, detail: str
) -> str:
    head = json.dumps(
        [seq, recorded_at, kind, actor, outcome], separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(f"{prev_hash}\n{head}\n{detail}".encode()).hexdigest()


DECISION_KINDS = (LedgerKind.DISCLOSURE.value, LedgerKind.DENIAL.value)
# Retrievals: operations that hand a copy of the data itself (not only attributes) over.
RETRIEVALS = ("move", "get", "wado")


@dataclass(frozen=True)
class LedgerFilter:
    """Which entries a view shows; empty values filter nothing. `date_to` is inclusive."""

    kinds: tuple[str, ...] = DECISION_KINDS
    date_from: date | None = None
    date_to: date | None = None
    recipient: str = ""
    purpose: str = ""
    basis: str = ""
    operation: str = ""
    patient_id: str = ""
    outcome: str = ""
    # only entries that gave out this patient's data: with `patient_id`, leave out entries
    # whose decision left the patient out (denied_patients)
    disclosed_patient_only: bool = False

    def with_(self, **changes: Any) -> LedgerFilter:
        return replace(self, **changes)


@dataclass(frozen=True)
class Page:
    entries: list[LedgerEntry]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))
