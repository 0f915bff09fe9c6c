"""Typed ledger event records: what each kind of ledger entry says, as frozen dataclasses.

A record's `as_details()` is the entry's detail exactly as the ledger stores (and hashes) it: the
same keys and values the dicts built at each call site wrote before these types existed, so
chains written then verify and read back the same. `from_details()` reads an entry's detail
back, raising ValueError naming the record and the key when it is not that record's shape.

Keys every entry of a record carries with one value (`"operation": "retention"`) are the class's
`fixed`; fields in `optional` are left out when None (they were added only by some callers);
`rest` names a dict field whose keys are written flat beside the others; `nested` names fields
holding another record whose keys are written flat. stdlib only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self

from dicomnode.core.model import LedgerKind


def _json(value: Any) -> Any:
    """`value` as the ledger's JSON holds it (tuples are lists)."""
    if isinstance(value, tuple | list):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value


def _typed(value: Any) -> Any:
    """A detail value as a record field holds it (lists are tuples)."""
    return tuple(value) if isinstance(value, list) else value


class Record:
    """The base of every ledger event record (see the module's docstring)."""

    kind: ClassVar[str]  # a LedgerKind, or a casework kind
    fixed: ClassVar[Mapping[str, Any]] = {}
    optional: ClassVar[frozenset[str]] = frozenset()
    rest: ClassVar[str] = ""
    nested: ClassVar[Mapping[str, type[Record]]] = {}

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # a list given where the record holds a tuple
                object.__setattr__(self, f.name, tuple(value))

    def as_details(self) -> dict[str, Any]:
        """The entry's detail, exactly as the ledger stores it."""
        out: dict[str, Any] = dict(self.fixed)
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in self.optional:
                continue
            if f.name == self.rest:
                out.update(_json(value))
            elif f.name in self.nested:
                out.update(value.as_details())
            else:
                out[f.name] = _json(value)
        return out

    @classmethod
    def from_details(cls, details: Mapping[str, Any]) -> Self:
        """The record an entry's detail holds; ValueError naming the key when it is not one."""
        for key, value in cls.fixed.items():
            if details.get(key) != value:
                raise ValueError(
                    f"{cls.__name__}: {key} must be {value!r}, got {details.get(key)!r}"
                )
        names = [f.name for f in fields(cls)]
        inner = {k for record in cls.nested.values() for k in record.detail_keys()}
        values: dict[str, Any] = {}
        for name in names:
            if name == cls.rest:
                taken = set(names) | set(cls.fixed) | inner
                values[name] = {k: v for k, v in details.items() if k not in taken}
            elif name in cls.nested:
                record = cls.nested[name]
                own = {k: v for k, v in details.items() if k in record.detail_keys()}
                values[name] = record.from_details(own) if own else None
            elif name in details:
                values[name] = _typed(details[name])
            elif name in cls.optional:
                values[name] = None
            else:
                raise ValueError(f"{cls.__name__}: the detail has no {name}")
        if not cls.rest:
            unknown = set(details) - set(names) - set(cls.fixed) - inner
            if unknown:
                raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def read(cls, details: Mapping[str, Any]) -> Self:
        """The record as far as an entry holds it, for views of old entries: an entry written
        by an earlier version may lack keys (those fields are None) or carry others (left
        out). `from_details` is the strict reading."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in details.items() if k in names and k not in cls.nested}
        values: dict[str, Any] = dict.fromkeys(names) | {k: _typed(v) for k, v in known.items()}
        for name, record in cls.nested.items():
            own = {k: v for k, v in details.items() if k in record.detail_keys()}
            values[name] = record.read(own) if own else None
        if cls.rest:
            taken = (
                names | set(cls.fixed) | {k for r in cls.nested.values() for k in r.detail_keys()}
            )
            values[cls.rest] = {k: v for k, v in details.items() if k not in taken}
        return cls(**values)

    @classmethod
    def detail_keys(cls) -> set[str]:
        """The detail keys this record writes (not counting `rest`)."""
        own = {f.name for f in fields(cls) if f.name != cls.rest and f.name not in cls.nested}
        return own | set(cls.fixed) | {k for r in cls.nested.values() for k in r.detail_keys()}


# --- the way out: decisions and transfers (egress) ---------------------------------------------


@dataclass(frozen=True)
class DeidPlan(Record):
    """How a delivery leaves: as stored (`deidentified` false) or de-identified under a profile,
    with the objects withheld and the pseudonymised-data register's record of it.

    The pseudonyms and replacement UIDs are not in the ledger (PIPA 28-4(1): the linkage is
    kept apart, as the de-identification secret); `patient_pseudonyms` and `uid_map` are read
    only from entries written before (they are never written now)."""

    kind: ClassVar[LedgerKind] = LedgerKind.DISCLOSURE
    optional: ClassVar[frozenset[str]] = frozenset(
        {"deid", "patient_pseudonyms", "uid_map", "withheld", "pseudonymised_record"}
    )

    deidentified: bool
    deid: dict[str, Any] | None = None  # profile, options, codes, table edition and hash, scope
    patient_pseudonyms: dict[str, str] | None = None  # entries before the register only
    uid_map: dict[str, str] | None = None  # entries before the register only
    withheld: dict[str, str] | None = None  # SOP Instance UID -> why it may not leave
    pseudonymised_record: int | None = None  # the register's record (pseudonymised_records.id)


# Keys of entries written before the pseudonymised-data register that map originals to their
# pseudonyms: the re-identification linkage (PIPA 28-4(1)), never shown to the ledger's readers.
LINKAGE_KEYS = ("patient_pseudonyms", "uid_map")


def without_linkage(detail: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """An entry's detail as the DPO's and auditors' views show it: the linkage keys left out;
    and which were left out (the entry's hash covers them: the chain still verifies)."""
    left_out = [k for k in LINKAGE_KEYS if k in detail]
    return {k: v for k, v in detail.items() if k not in LINKAGE_KEYS}, left_out


# The action (of the PIPA safety standard's access records) each operation a decision is about
# is: answers to queries are viewed, copies that leave are downloads, filing is entering.
ACCESS_ACTIONS: Mapping[str, str] = {
    "find": "view",
    "qido": "view",
    "job-info": "view",
    "analyze": "view",
    "wado": "download",
    "move": "download",
    "get": "download",
    "forward": "download",
    "share": "download",
    "export": "download",
    "admit": "enter",
}


@dataclass(frozen=True)
class DecisionRecord(Record):
    """A governance decision about data leaving (kind disclosure or denial) or being processed
    (kind processing): who asked, for whom, the rule, basis and policy version, whose data."""

    kind: ClassVar[LedgerKind] = LedgerKind.DISCLOSURE  # denial / processing: see `kind_of`
    optional: ClassVar[frozenset[str]] = frozenset(
        {"service", "sop_instance_uids", "job", "analyzer", "delivery", "gone", "plan"}
    )
    nested: ClassVar[Mapping[str, type[Record]]] = {"plan": DeidPlan}

    operation: str
    protocol: str
    address: str
    peer: str | None
    recipient: str
    recipient_kind: str
    activity: str
    purpose: str | None
    basis: str
    consent_refs: tuple[str, ...]
    rule_id: str
    reason: str
    policy_version: str
    deid_profile: str
    patient_ids: tuple[str, ...]
    study_instance_uids: tuple[str, ...]
    denied_patients: tuple[str, ...]
    items: int
    disclosure_id: str
    # what some decisions add: a retrieval its service and instances, an analysis its job, a
    # delivery its id, the instances gone since it was queued, and how it leaves
    service: str | None = None
    sop_instance_uids: tuple[str, ...] | None = None
    job: int | None = None
    analyzer: str | None = None
    delivery: int | None = None
    gone: tuple[str, ...] | None = None
    plan: DeidPlan | None = None

    @property
    def action(self) -> str:
        """The action of the access record this decision is (PIPA safety standard: view,
        modify, enter, delete, print, download), from its operation ("" for an unknown one)."""
        return ACCESS_ACTIONS.get(self.operation, "")

    @staticmethod
    def kind_of(operation: str, allowed: bool) -> LedgerKind:
        """The entry kind of a decision: processing for analysis and admission, else
        disclosure or denial."""
        if operation in ("analyze", "admit"):
            return LedgerKind.PROCESSING
        return LedgerKind.DISCLOSURE if allowed else LedgerKind.DENIAL


@dataclass(frozen=True)
class TransferRecord(Record):
    """The outcome of sending what an earlier disclosure entry allowed (a delivery attempt);
    a de-identified send names its profile and the Table E.1-1 edition and checksum (`deid`)."""

    kind: ClassVar[LedgerKind] = LedgerKind.TRANSFER
    optional: ClassVar[frozenset[str]] = frozenset({"deid"})

    operation: str  # forward, share
    delivery: int
    recipient: str
    patient_ids: tuple[str, ...]
    study_instance_uids: tuple[str, ...]
    attempt: int
    disclosure_id: str
    sent: tuple[str, ...]
    failed: dict[str, str]
    withheld: dict[str, str]
    gone: tuple[str, ...]
    rule_id: str
    deid: dict[str, Any] | None = None  # as DeidPlan.deid: profile, table edition and hash...


@dataclass(frozen=True)
class SubjectExported(Record):
    """A data subject's copy was written (an access or portability request)."""

    kind: ClassVar[LedgerKind] = LedgerKind.SUBJECT
    fixed: ClassVar[Mapping[str, Any]] = {"request": "export"}

    patient_ids: tuple[str, ...]
    study_instance_uids: tuple[str, ...]
    files: int
    disclosures_listed: int


# --- the way in (intake) -----------------------------------------------------------------------


@dataclass(frozen=True)
class AdmissionRefused(Record):
    """Governance refused an object at intake."""

    kind: ClassVar[LedgerKind] = LedgerKind.PROCESSING
    fixed: ClassVar[Mapping[str, Any]] = {"operation": "admit"}

    reason: str
    rule_id: str
    policy_version: str
    protocol: str
    sender: str
    address: str
    patient_ids: tuple[str, ...]
    study_instance_uids: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class QuarantineReleased(Record):
    """Objects held at intake left the quarantine: filed (released) or destroyed (discarded)."""

    kind: ClassVar[LedgerKind] = LedgerKind.PROCESSING
    fixed: ClassVar[Mapping[str, Any]] = {"operation": "admit"}

    decision: str  # released, discarded
    method: str
    patient_ids: tuple[str, ...]
    study_instance_uids: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]
    reasons: tuple[str, ...]


# --- destruction and data subjects (stewardship) -----------------------------------------------


@dataclass(frozen=True)
class QuarantineDestroyed(Record):
    """Objects held at intake destroyed by a retention sweep or an erasure."""

    kind: ClassVar[LedgerKind] = LedgerKind.DELETION

    operation: str  # retention, erase
    patient_ids: tuple[str, ...]
    study_instance_uids: tuple[str, ...]
    method: str


@dataclass(frozen=True)
class RetentionDestruction(Record):
    """What the retention sweep adds to the archive's destruction record of a study."""

    kind: ClassVar[LedgerKind] = LedgerKind.DELETION
    fixed: ClassVar[Mapping[str, Any]] = {"operation": "retention"}

    category: str  # study, analysis-results
    rule_id: str
    expired_at: str | None
    policy_version: str
    recipients_with_copies: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class ErasureDestruction(Record):
    """What an erasure adds to the archive's destruction record of a patient."""

    kind: ClassVar[LedgerKind] = LedgerKind.DELETION
    fixed: ClassVar[Mapping[str, Any]] = {"operation": "erase"}

    recipients_with_copies: tuple[dict[str, str], ...]
    policy_version: str


@dataclass(frozen=True)
class RequestedDestruction(Record):
    """What a deletion on request (DICOMweb DELETE) adds to the archive's destruction record."""

    kind: ClassVar[LedgerKind] = LedgerKind.DELETION
    fixed: ClassVar[Mapping[str, Any]] = {"operation": "delete"}

    request: str  # e.g. "dicomweb DELETE"
    policy_version: str
    recipients_with_copies: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class DeletionRefused(Record):
    """A deletion on request that a legal hold or a statutory retention refused."""

    kind: ClassVar[LedgerKind] = LedgerKind.DELETION
    fixed: ClassVar[Mapping[str, Any]] = {"operation": "delete"}

    request: str
    level: str
    target: dict[str, str]
    patient_ids: tuple[str, ...]
    study_instance_uids: tuple[str, ...]
    policy_version: str
    address: str
    reason: str


@dataclass(frozen=True)
class RetentionSkipped(Record):
    """An expired study the sweep kept (a legal hold)."""

    kind: ClassVar[LedgerKind] = LedgerKind.DELETION
    fixed: ClassVar[Mapping[str, Any]] = {"operation": "retention"}

    reason: str
    rule_id: str
    category: str
    expired_at: str | None
    policy_version: str
    patient_ids: tuple[str, ...]
    study_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class RecordsPurged(Record):
    """Index records (logs) past their retention, removed by the sweep."""

    kind: ClassVar[LedgerKind] = LedgerKind.DELETION
    fixed: ClassVar[Mapping[str, Any]] = {"operation": "retention", "category": "logs"}

    rule_id: str
    method: str
    removed: dict[str, int]
    finished_before: str
    policy_version: str


@dataclass(frozen=True)
class ErasureRequest(Record):
    """A data subject's erasure request and its outcome: refused with the reason, or erased
    with what changed (`changed`: instances, held objects, cancelled work, records removed)."""

    kind: ClassVar[LedgerKind] = LedgerKind.SUBJECT
    fixed: ClassVar[Mapping[str, Any]] = {"request": "erase"}
    optional: ClassVar[frozenset[str]] = frozenset({"reason"})
    rest: ClassVar[str] = "changed"

    patient_ids: tuple[str, ...]
    issuer_of_patient_id: str
    study_instance_uids: tuple[str, ...]
    policy_version: str
    reason: str | None = None
    changed: dict[str, Any] = field(default_factory=dict)


# --- the DPO's casework -------------------------------------------------------------------------

BREACH, DPO_REVIEW = "breach", "dpo_review"  # entry kinds of the casework


@dataclass(frozen=True)
class BreachRecorded(Record):
    """A personal-data breach entered in the register, with its statutory deadlines. `breach`
    (its reference) is added by the register when it files it."""

    kind: ClassVar[str] = BREACH
    optional: ClassVar[frozenset[str]] = frozenset({"breach"})

    aware_at: str
    what: str
    subjects: int
    categories: tuple[str, ...]
    patient_ids: tuple[str, ...]
    study_instance_uids: tuple[str, ...]
    emr_linked: bool
    deadlines: dict[str, str]  # duty -> due at
    breach: str | None = None


@dataclass(frozen=True)
class BreachNotified(Record):
    """A breach notified to a regulator or to the data subjects."""

    kind: ClassVar[str] = BREACH
    optional: ClassVar[frozenset[str]] = frozenset({"breach"})

    notified: str
    at: str
    note: str
    breach: str | None = None


@dataclass(frozen=True)
class BreachClosed(Record):
    """A breach closed, with why."""

    kind: ClassVar[str] = BREACH
    optional: ClassVar[frozenset[str]] = frozenset({"breach"})

    reason: str
    breach: str | None = None


@dataclass(frozen=True)
class ReviewSignedOff(Record):
    """The DPO's sign-off of a month's access review, with the report's hash."""

    kind: ClassVar[str] = DPO_REVIEW

    month: str
    report_sha256: str
    totals: dict[str, Any]
    reviewer: str
    finding: str
    follow_up: str
    reviewed_at: str


# Every record, for readers that take an entry of any of them.
RECORDS: tuple[type[Record], ...] = (
    DecisionRecord,
    TransferRecord,
    SubjectExported,
    AdmissionRefused,
    QuarantineReleased,
    QuarantineDestroyed,
    RetentionDestruction,
    ErasureDestruction,
    RequestedDestruction,
    DeletionRefused,
    RetentionSkipped,
    RecordsPurged,
    ErasureRequest,
    BreachRecorded,
    BreachNotified,
    BreachClosed,
    ReviewSignedOff,
)


@dataclass(frozen=True)
class Destruction(Record):
    """The archive's record of data it destroyed (kind deletion, outcome done): what, why and
    how, plus what the operation that asked for it added (`added`: a RetentionDestruction,
    ErasureDestruction or RequestedDestruction's detail)."""

    kind: ClassVar[LedgerKind] = LedgerKind.DELETION
    rest: ClassVar[str] = "added"

    level: str
    target: dict[str, str]
    reason: str
    method: str
    patient_ids: tuple[str, ...]
    study_instance_uids: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]
    added: dict[str, Any] = field(default_factory=dict)

    @property
    def recipients_with_copies(self) -> list[dict[str, str]] | None:
        """The recipients that held copies when it was destroyed (None: not recorded)."""
        return self.added.get("recipients_with_copies")


RECORDS += (Destruction,)
