"""Governance records in the index: published policy versions, consent versions, restrictions,
legal holds, objects held at intake and deliveries on their way out.

Every change here that the DPO must be able to account for is written in the same transaction
as its ledger entry. Consent versions are append-only (a database trigger refuses UPDATE and
DELETE); a change of consent is a new version. The registry stores and returns facts; what they
mean is decided by `dicomnode.governance`, never here.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, delete, func, or_, select, update

from dicomnode.archive import notify, schema
from dicomnode.archive.index import Index
from dicomnode.archive.leases import any_due, claim_due, owned_by, retry_or_fail
from dicomnode.archive.ledger import Ledger
from dicomnode.core.errors import InvalidInput, NotFound
from dicomnode.core.model import (
    ConsentRecord,
    LedgerKind,
    PatientFacts,
    PatientIdentity,
    PublishedPolicy,
)
from dicomnode.core.times import as_utc

GOVERNANCE_LOCK = 1573_0002  # serialises check-then-write changes of governance records
CACHE_SECONDS = 5.0  # how stale another process's writes may look to the cached reads

# analysis job states this module moves (see archive/jobs.py for the rest)
JOB_QUEUED, JOB_HELD, JOB_CANCELLED = "queued", "held", "cancelled"
# delivery states
QUEUED, SENDING, DONE, FAILED, DENIED, CANCELLED = (
    "queued",
    "sending",
    "done",
    "failed",
    "denied",
    "cancelled",
)


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
class HeldObject:
    """An object intake filed aside instead of admitting, and why."""

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


class Registry:
    """The governance tables of the index."""

    def __init__(self, index: Index, ledger: Ledger) -> None:
        self.index = index
        self.ledger = ledger
        self._lock = threading.Lock()
        self._policies: tuple[float, list[PublishedPolicy]] | None = None
        self._governed: tuple[float, frozenset[str]] | None = None
        self._wakeups = notify.Listener(index.engine, notify.GOVERNANCE, self._drop_cached)
        self._generation = 0  # counts drops: a read begun before one is not cached

    def forget_cached(self) -> None:
        """Drop cached reads (after a write here, or when a test moves the clock), and wake
        the other nodes to drop theirs (PostgreSQL's NOTIFY, `notify.py`)."""
        self._drop_cached()
        notify.announce(self.index.engine, notify.GOVERNANCE)

    def _drop_cached(self, _payload: str = "") -> None:
        with self._lock:
            self._generation += 1
            self._policies = None
            self._governed = None

    # --- policy versions --------------------------------------------------------------------

    def published_policies(self) -> list[PublishedPolicy]:
        """Every published version (cached for a few seconds: read for every decision)."""
        with self._lock:
            cached, generation = self._policies, self._generation
        if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
            return cached[1]
        self._wakeups.start()  # listening before reading: no change slips in between
        t = schema.policy_versions
        with self.index.read() as conn:
            rows = conn.execute(select(t).order_by(t.c.published_at, t.c.id)).all()
        policies = [
            PublishedPolicy(
                version=r.version,
                source=r.source,
                sha256=r.sha256,
                published_at=as_utc(r.published_at),
                effective_at=as_utc(r.effective_at),
                material=r.material,
                published_by=r.published_by,
            )
            for r in rows
        ]
        with self._lock:
            if generation == self._generation:
                self._policies = (time.monotonic(), policies)
        return policies

    def publish_policy(self, published: PublishedPolicy, detail: dict[str, Any]) -> bool:
        """Record a new version (and its ledger entry); False when that exact version is
        already published. A different text under a published version number is refused."""
        t = schema.policy_versions
        with self.index.write() as conn:
            existing = conn.execute(select(t).where(t.c.version == published.version)).first()
            if existing is not None:
                if existing.sha256 != published.sha256:
                    raise InvalidInput(
                        f"policy version {published.version} is already published with other "
                        "content; published versions are immutable, give the change a new version"
                    )
                return False
            conn.execute(
                t.insert().values(
                    version=published.version,
                    sha256=published.sha256,
                    source=published.source,
                    material=published.material,
                    published_at=published.published_at,
                    effective_at=published.effective_at,
                    published_by=published.published_by,
                )
            )
            self.ledger.append(conn, LedgerKind.POLICY, published.published_by, "published", detail)
        self.forget_cached()
        return True

    def note_in_force(self, version: str, now: datetime, detail: dict[str, Any]) -> bool:
        """Record, once, that `version` came into force (ledger entry); True the first time."""
        t = schema.policy_versions
        with self.index.write() as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.version == version, t.c.activated_at.is_(None))
                .values(activated_at=now)
            ).rowcount
            if changed:
                self.ledger.append(conn, LedgerKind.POLICY, "dicomnode", "in-force", detail)
        return bool(changed)

    def activations(self) -> dict[str, datetime | None]:
        t = schema.policy_versions
        with self.index.read() as conn:
            return {r.version: as_utc(r.activated_at) for r in conn.execute(select(t))}

    # --- consents ---------------------------------------------------------------------------

    def record_consent(
        self,
        record: ConsentRecord,
        cancel_activities: frozenset[str],
        detail: dict[str, Any],
    ) -> tuple[ConsentRecord, dict[str, list[int]]]:
        """Store `record` as the next version for its patient and purpose, with its ledger
        entry, in one transaction. A refusal or withdrawal cancels the patient's queued work
        of `cancel_activities` (analysis jobs, deliveries for the purpose); a grant releases
        analysis jobs held for want of it. Returns the stored version and what changed."""
        c = schema.consents
        with self.index.write() as conn:
            self.index.serialize(conn, GOVERNANCE_LOCK)
            latest = conn.execute(
                select(func.max(c.c.version)).where(
                    c.c.patient_id == record.patient_id,
                    c.c.issuer_of_patient_id == record.issuer_of_patient_id,
                    c.c.purpose == record.purpose,
                )
            ).scalar()
            stored = ConsentRecord(**{**record.__dict__, "version": (latest or 0) + 1})
            values = {k: v for k, v in stored.__dict__.items() if k in c.c}  # type: ignore[operator]
            values["recipients"] = json.dumps(list(stored.recipients)) if stored.recipients else ""
            conn.execute(c.insert().values(values))
            changed = self._consequences(conn, stored, cancel_activities)
            self.ledger.append(
                conn,
                LedgerKind.CONSENT,
                stored.recorded_by,
                stored.state,
                {**detail, **stored.as_dict(), **changed},
            )
        self.forget_cached()
        return stored, changed

    def _consequences(
        self, conn: Connection, record: ConsentRecord, cancel_activities: frozenset[str]
    ) -> dict[str, list[int]]:
        jobs, d = schema.analysis_jobs, schema.deliveries
        changed: dict[str, list[int]] = {}
        # a consent under an issuer is that issuer's patient's: work on studies of the same
        # Patient ID under another issuer (another person) stays
        others = self._studies_of_others(conn, record.patient_id, record.issuer_of_patient_id)
        if record.state in ("refused", "withdrawn"):
            reason = f"cancelled: {record.ref} ({record.state})"
            if "analysis" in cancel_activities:
                mine = and_(
                    jobs.c.patient_id == record.patient_id,
                    jobs.c.study_instance_uid.not_in(others),
                    jobs.c.state.in_((JOB_QUEUED, JOB_HELD)),
                )
                ids = list(conn.execute(select(jobs.c.id).where(mine)).scalars())
                if ids:
                    conn.execute(
                        update(jobs)
                        .where(jobs.c.id.in_(ids))
                        .values(state=JOB_CANCELLED, error=reason, finished_at=record.recorded_at)
                    )
                changed["cancelled_jobs"] = ids
            forward = "return-results" in cancel_activities
            mine = and_(
                d.c.patient_id == record.patient_id,
                d.c.study_instance_uid.not_in(others),
                d.c.state == QUEUED,
                or_(d.c.purpose == record.purpose, and_(d.c.kind == "forward", forward)),
            )
            ids = list(conn.execute(select(d.c.id).where(mine)).scalars())
            if ids:
                conn.execute(
                    update(d)
                    .where(d.c.id.in_(ids))
                    .values(state=CANCELLED, error=reason, finished_at=record.recorded_at)
                )
            changed["cancelled_deliveries"] = ids
        elif record.state == "granted":
            changed["released_jobs"] = self._release_held_jobs(conn, record.patient_id, others)
        return changed

    @staticmethod
    def _studies_of_others(conn: Connection, patient_id: str, issuer: str) -> list[str]:
        """Studies of this Patient ID under issuers other than `issuer` (none when `issuer` is
        "": a record without an issuer is about the ID under every issuer)."""
        if not issuer:
            return []
        p, st = schema.patients, schema.studies
        return list(
            conn.execute(
                select(st.c.study_instance_uid)
                .join(p, st.c.patient_pk == p.c.id)
                .where(p.c.patient_id == patient_id, p.c.issuer_of_patient_id != issuer)
            ).scalars()
        )

    def _release_held_jobs(
        self, conn: Connection, patient_id: str, others: list[str] | None = None
    ) -> list[int]:
        jobs = schema.analysis_jobs
        mine = and_(jobs.c.patient_id == patient_id, jobs.c.state == JOB_HELD)
        if others:
            mine = and_(mine, jobs.c.study_instance_uid.not_in(others))
        ids = list(conn.execute(select(jobs.c.id).where(mine)).scalars())
        if ids:
            conn.execute(
                update(jobs).where(jobs.c.id.in_(ids)).values(state=JOB_QUEUED, error=None)
            )
        return ids

    def consents(
        self, patient_id: str | None = None, issuer: str | None = None
    ) -> list[ConsentRecord]:
        """Every consent version (of one Patient ID; with `issuer`, those recorded under that
        issuer or without one), oldest first."""
        c = schema.consents
        query = select(c).order_by(c.c.recorded_at, c.c.id)
        if patient_id is not None:
            query = query.where(c.c.patient_id == patient_id)
        if issuer is not None:
            query = query.where(c.c.issuer_of_patient_id.in_({issuer, ""}))
        with self.index.read() as conn:
            return [_consent(r) for r in conn.execute(query)]

    # --- restrictions -----------------------------------------------------------------------

    def restrict(
        self, patient_id: str, issuer: str, reason: str, by: str, now: datetime
    ) -> Restriction:
        """Restrict all processing of a patient's data until lifted (a ledger entry); `issuer`
        "" restricts the Patient ID under every issuer."""
        r = schema.restrictions
        with self.index.write() as conn:
            self.index.serialize(conn, GOVERNANCE_LOCK)
            active = self._active_restriction(conn, patient_id, issuer)
            if active is not None:
                return active
            new_id = conn.execute(
                r.insert().values(
                    patient_id=patient_id,
                    issuer_of_patient_id=issuer,
                    reason=reason,
                    requested_by=by,
                    created_at=now,
                )
            ).inserted_primary_key[0]
            restriction = _restriction(conn.execute(select(r).where(r.c.id == new_id)).one())
            self.ledger.append(
                conn,
                LedgerKind.SUBJECT,
                by,
                "restricted",
                {
                    "request": "restrict",
                    "patient_ids": [patient_id],
                    "issuer_of_patient_id": issuer,
                    "reason": reason,
                    "restriction": restriction.ref,
                },
            )
        self.forget_cached()
        return restriction

    def unrestrict(
        self, patient_id: str, by: str, now: datetime, issuer: str | None = None
    ) -> Restriction:
        """Lift a patient's restriction (the one recorded under `issuer`; without it, the only
        active one of the Patient ID); analysis held because of it may run again."""
        r = schema.restrictions
        with self.index.write() as conn:
            self.index.serialize(conn, GOVERNANCE_LOCK)
            if issuer is None:
                rows = conn.execute(
                    select(r).where(r.c.patient_id == patient_id, r.c.lifted_at.is_(None))
                ).all()
                if len(rows) > 1:
                    named = ", ".join(repr(row.issuer_of_patient_id) for row in rows)
                    raise InvalidInput(
                        f"patient {patient_id} has restrictions under several issuers "
                        f"({named}): name the IssuerOfPatientID"
                    )
                active = _restriction(rows[0]) if rows else None
            else:
                active = self._active_restriction(conn, patient_id, issuer)
            if active is None:
                raise NotFound(f"patient {patient_id} has no active restriction")
            conn.execute(update(r).where(r.c.id == active.id).values(lifted_at=now, lifted_by=by))
            others = self._studies_of_others(conn, patient_id, active.issuer_of_patient_id)
            released = self._release_held_jobs(conn, patient_id, others)
            self.ledger.append(
                conn,
                LedgerKind.SUBJECT,
                by,
                "unrestricted",
                {
                    "request": "unrestrict",
                    "patient_ids": [patient_id],
                    "restriction": active.ref,
                    "released_jobs": released,
                },
            )
        self.forget_cached()
        return active

    def _active_restriction(
        self, conn: Connection, patient_id: str, issuer: str
    ) -> Restriction | None:
        r = schema.restrictions
        row = conn.execute(
            select(r)
            .where(
                r.c.patient_id == patient_id,
                r.c.issuer_of_patient_id == issuer,
                r.c.lifted_at.is_(None),
            )
            .limit(1)
        ).first()
        return _restriction(row) if row else None

    def restrictions(self, patient_id: str | None = None) -> list[Restriction]:
        r = schema.restrictions
        query = select(r).order_by(r.c.id)
        if patient_id is not None:
            query = query.where(r.c.patient_id == patient_id)
        with self.index.read() as conn:
            return [_restriction(row) for row in conn.execute(query)]

    # --- legal holds ------------------------------------------------------------------------

    def place_hold(
        self,
        patient_id: str | None,
        study_uid: str | None,
        owner: str,
        reason: str,
        case_ref: str,
        review_date: datetime | None,
        by: str,
        now: datetime,
        issuer: str | None = None,
    ) -> LegalHold:
        """Hold a patient's or a study's data against every deletion (a ledger entry); a hold
        on a patient without `issuer` holds the Patient ID under every issuer."""
        if not (patient_id or study_uid) or (patient_id and study_uid):
            raise InvalidInput("a legal hold is on a patient or on a study (one of them)")
        if issuer is not None and not patient_id:
            raise InvalidInput("an IssuerOfPatientID goes with a hold on a patient")
        if not owner.strip() or not reason.strip():
            raise InvalidInput("a legal hold needs an owner and a reason")
        h = schema.legal_holds
        with self.index.write() as conn:
            new_id = conn.execute(
                h.insert().values(
                    patient_id=patient_id,
                    issuer_of_patient_id=issuer,
                    study_instance_uid=study_uid,
                    owner=owner,
                    reason=reason,
                    case_ref=case_ref,
                    review_date=review_date,
                    placed_by=by,
                    placed_at=now,
                )
            ).inserted_primary_key[0]
            hold = _hold(conn.execute(select(h).where(h.c.id == new_id)).one())
            self.ledger.append(
                conn,
                LedgerKind.HOLD,
                by,
                "placed",
                hold.as_dict()
                | {
                    "patient_ids": [patient_id] if patient_id else [],
                    "study_instance_uids": [study_uid] if study_uid else [],
                },
            )
        return hold

    def release_hold(self, hold_id: int, by: str, now: datetime) -> LegalHold:
        h = schema.legal_holds
        with self.index.write() as conn:
            changed = conn.execute(
                update(h)
                .where(h.c.id == hold_id, h.c.released_at.is_(None))
                .values(released_at=now, released_by=by)
            ).rowcount
            if not changed:
                raise NotFound(f"no active legal hold {hold_id}")
            hold = _hold(conn.execute(select(h).where(h.c.id == hold_id)).one())
            self.ledger.append(
                conn,
                LedgerKind.HOLD,
                by,
                "released",
                hold.as_dict()
                | {
                    "patient_ids": [hold.patient_id] if hold.patient_id else [],
                    "study_instance_uids": (
                        [hold.study_instance_uid] if hold.study_instance_uid else []
                    ),
                },
            )
        return hold

    def holds(self, active_only: bool = False) -> list[LegalHold]:
        h = schema.legal_holds
        query = select(h).order_by(h.c.id)
        if active_only:
            query = query.where(h.c.released_at.is_(None))
        with self.index.read() as conn:
            return [_hold(row) for row in conn.execute(query)]

    # --- facts for decisions ----------------------------------------------------------------

    def facts(
        self,
        patients: Iterable[str | PatientIdentity],
        study_uids: Iterable[str] = (),
    ) -> dict[str, PatientFacts]:
        """Consents and restrictions of these patients, read fresh (for disclosures), keyed by
        Patient ID. Each ID's facts name the issuers of the persons the decision is about: the
        ones given (a PatientIdentity with an issuer), else those its studies among
        `study_uids` are held under, else every issuer the archive holds the ID under. A
        restriction counts when recorded without an issuer or under one of them; every
        consent version of the ID is given (`decisions` picks those of each issuer)."""
        named: dict[str, set[str]] = {}
        for patient in patients:
            if isinstance(patient, PatientIdentity):
                issuers = named.setdefault(patient.patient_id, set())
                if patient.issuer is not None:
                    issuers.add(patient.issuer)
            else:
                named.setdefault(patient, set())
        wanted = sorted(named)
        consents: dict[str, list[ConsentRecord]] = {p: [] for p in wanted}
        restrictions: dict[str, list[Restriction]] = {p: [] for p in wanted}
        c, r = schema.consents, schema.restrictions
        with self.index.read() as conn:
            issuers = self._issuers(conn, named, sorted(set(study_uids)))
            for chunk in _chunks(wanted):
                for row in conn.execute(select(c).where(c.c.patient_id.in_(chunk))):
                    consents[row.patient_id].append(_consent(row))
                for row in conn.execute(
                    select(r).where(r.c.patient_id.in_(chunk), r.c.lifted_at.is_(None))
                ):
                    restrictions[row.patient_id].append(_restriction(row))
        facts = {}
        for p in wanted:
            mine = issuers[p]
            applying = [
                x for x in restrictions[p] if not mine or x.issuer_of_patient_id in ("", *mine)
            ]
            facts[p] = PatientFacts(
                p,
                tuple(consents[p]),
                bool(applying),
                ", ".join(x.ref for x in applying),
                tuple(sorted(mine)),
            )
        return facts

    @staticmethod
    def _issuers(
        conn: Connection, named: dict[str, set[str]], study_uids: list[str]
    ) -> dict[str, set[str]]:
        """Per Patient ID, the issuers of the persons a decision is about (see `facts`)."""
        p, st = schema.patients, schema.studies
        found = {pid: set(issuers) for pid, issuers in named.items()}
        open_ids = sorted(pid for pid, issuers in found.items() if not issuers)
        for chunk in _chunks(study_uids):
            if not open_ids:
                break
            rows = conn.execute(
                select(p.c.patient_id, p.c.issuer_of_patient_id)
                .join(st, st.c.patient_pk == p.c.id)
                .where(st.c.study_instance_uid.in_(chunk), p.c.patient_id.in_(open_ids))
                .distinct()
            )
            for pid, issuer in rows:
                found[pid].add(issuer or "")
        open_ids = sorted(pid for pid, issuers in found.items() if not issuers)
        for chunk in _chunks(open_ids):
            rows = conn.execute(
                select(p.c.patient_id, p.c.issuer_of_patient_id)
                .where(p.c.patient_id.in_(chunk))
                .distinct()
            )
            for pid, issuer in rows:
                found[pid].add(issuer or "")
        return found

    def study_identities(
        self, study_uids: Iterable[str] | None = None
    ) -> dict[str, PatientIdentity]:
        """Per study (all, or these), the identity of its patient (Patient ID and issuer, ""
        for objects without one)."""
        p, st = schema.patients, schema.studies
        query = select(st.c.study_instance_uid, p.c.patient_id, p.c.issuer_of_patient_id).join(
            p, st.c.patient_pk == p.c.id
        )
        found: dict[str, PatientIdentity] = {}
        with self.index.read() as conn:
            if study_uids is None:
                rows = list(conn.execute(query))
            else:
                rows = []
                for chunk in _chunks(sorted(set(study_uids))):
                    rows += conn.execute(query.where(st.c.study_instance_uid.in_(chunk))).all()
        for uid, pid, issuer in rows:
            if pid and pid.strip():
                found[uid] = PatientIdentity(pid, issuer or "")
        return found

    def governed_facts(
        self,
        patients: Iterable[str | PatientIdentity],
        study_uids: Iterable[str] = (),
    ) -> dict[str, PatientFacts]:
        """Facts of these patients for a decision on the hot path: no query for patients
        without any consent or restriction on record (the common case), using the set of
        patients that have some, refreshed every few seconds (so a change recorded by another
        process counts within CACHE_SECONDS; one recorded here counts at once)."""
        with self._lock:
            governed, generation = self._governed, self._generation
        if governed is None or time.monotonic() - governed[0] >= CACHE_SECONDS:
            self._wakeups.start()
            c, r = schema.consents, schema.restrictions
            with self.index.read() as conn:
                ids = set(conn.execute(select(c.c.patient_id).distinct()).scalars())
                ids |= set(conn.execute(select(r.c.patient_id).distinct()).scalars())
            governed = (time.monotonic(), frozenset(ids))
            with self._lock:
                if generation == self._generation:
                    self._governed = governed
        patients = list(patients)
        wanted = {p.patient_id if isinstance(p, PatientIdentity) else p for p in patients}
        facts = {p: PatientFacts(p) for p in wanted - governed[1]}
        if wanted & governed[1]:
            mine = [
                p
                for p in patients
                if (p.patient_id if isinstance(p, PatientIdentity) else p) in governed[1]
            ]
            facts |= self.facts(mine, study_uids)
        return facts

    # --- objects held at intake -------------------------------------------------------------

    def hold(self, held: HeldObject, size: int, sha256: str, detail: dict[str, Any]) -> bool:
        """File `held` aside; the first object held for a study and reason gets a ledger entry.
        Returns False when that object was already held (an identical re-send)."""
        h = schema.held_objects
        with self.index.write() as conn:
            self.index.serialize(conn, GOVERNANCE_LOCK)
            if conn.execute(
                select(h.c.id).where(h.c.sop_instance_uid == held.sop_instance_uid)
            ).first():
                return False
            first = (
                conn.execute(
                    select(h.c.id).where(
                        h.c.study_instance_uid == held.study_instance_uid,
                        h.c.rule_id == held.rule_id,
                    )
                ).first()
                is None
            )
            conn.execute(
                h.insert().values(
                    **{k: getattr(held, k) for k in HeldObject.__dataclass_fields__},
                    size=size,
                    sha256=sha256,
                )
            )
            if first:
                self.ledger.append(
                    conn, LedgerKind.PROCESSING, held.source_caller or "intake", "held", detail
                )
        return True

    def held(self, study_uid: str | None = None, patient_id: str | None = None) -> list[HeldObject]:
        h = schema.held_objects
        query = select(h).order_by(h.c.held_at, h.c.id)
        if study_uid:
            query = query.where(h.c.study_instance_uid == study_uid)
        if patient_id:
            query = query.where(h.c.patient_id == patient_id)
        with self.index.read() as conn:
            return [
                HeldObject(
                    **{
                        k: (as_utc(row._mapping[k]) if k == "held_at" else row._mapping[k])
                        for k in HeldObject.__dataclass_fields__
                    }
                )
                for row in conn.execute(query)
            ]

    def drop_held(
        self, sop_instance_uids: list[str], by: str, outcome: str, detail: dict[str, Any]
    ) -> int:
        """Remove held rows (released into the archive, or discarded) with a ledger entry."""
        h = schema.held_objects
        removed = 0
        with self.index.write() as conn:
            for chunk in _chunks(sop_instance_uids):
                removed += conn.execute(delete(h).where(h.c.sop_instance_uid.in_(chunk))).rowcount
            self.ledger.append(conn, LedgerKind.PROCESSING, by, outcome, detail)
        return removed

    # --- retention --------------------------------------------------------------------------

    def analysis_done_at(self) -> dict[str, datetime]:
        """Per study, when its last analysis job finished successfully."""
        jobs = schema.analysis_jobs
        query = (
            select(jobs.c.study_instance_uid, func.max(jobs.c.finished_at))
            .where(jobs.c.state == "done")
            .group_by(jobs.c.study_instance_uid)
        )
        with self.index.read() as conn:
            return {uid: as_utc(done) for uid, done in conn.execute(query) if done is not None}

    def cancel_work(
        self, study_uids: list[str], reason: str, now: datetime
    ) -> dict[str, list[int]]:
        """Cancel queued or held analysis jobs and queued deliveries of these studies (their
        data is gone or going)."""
        jobs, d = schema.analysis_jobs, schema.deliveries
        cancelled: dict[str, list[int]] = {"cancelled_jobs": [], "cancelled_deliveries": []}
        with self.index.write() as conn:
            for chunk in _chunks(study_uids):
                mine = and_(
                    jobs.c.study_instance_uid.in_(chunk),
                    jobs.c.state.in_((JOB_QUEUED, JOB_HELD)),
                )
                ids = list(conn.execute(select(jobs.c.id).where(mine)).scalars())
                if ids:
                    conn.execute(
                        update(jobs)
                        .where(jobs.c.id.in_(ids))
                        .values(state=JOB_CANCELLED, error=reason, finished_at=now)
                    )
                cancelled["cancelled_jobs"] += ids
                mine = and_(d.c.study_instance_uid.in_(chunk), d.c.state == QUEUED)
                ids = list(conn.execute(select(d.c.id).where(mine)).scalars())
                if ids:
                    conn.execute(
                        update(d)
                        .where(d.c.id.in_(ids))
                        .values(state=CANCELLED, error=reason, finished_at=now)
                    )
                cancelled["cancelled_deliveries"] += ids
        return cancelled

    def purge_records(self, finished_before: datetime) -> dict[str, int]:
        """Delete job, unit and delivery records (they name patients) finished before a time:
        the "logs" retention category. The ledger is never purged."""
        jobs, units, d = schema.analysis_jobs, schema.analysis_units, schema.deliveries
        finished = (DONE, FAILED, DENIED, CANCELLED, "skipped")
        with self.index.write() as conn:
            removed_jobs = conn.execute(
                delete(jobs).where(jobs.c.state.in_(finished), jobs.c.finished_at < finished_before)
            ).rowcount
            removed_deliveries = conn.execute(
                delete(d).where(d.c.state.in_(finished), d.c.finished_at < finished_before)
            ).rowcount
            removed_units = conn.execute(
                delete(units).where(
                    units.c.state == "queued", units.c.last_received_at < finished_before
                )
            ).rowcount
        return {
            "analysis_jobs": removed_jobs,
            "deliveries": removed_deliveries,
            "analysis_units": removed_units,
        }

    def purge_patient_records(
        self, patient_id: str, others_studies: set[str] | frozenset[str] = frozenset()
    ) -> dict[str, int]:
        """Delete a patient's analysis job, unit and delivery records (erasure): they name the
        patient (exactly) and hold results; records of `others_studies` (the same Patient ID
        under another issuer: another person) stay. The ledger and the consent versions are
        kept."""
        jobs, units, d = schema.analysis_jobs, schema.analysis_units, schema.deliveries
        others = sorted(others_studies)

        def of_patient(table: Any) -> Any:
            mine = table.c.patient_id == patient_id
            return and_(mine, table.c.study_instance_uid.not_in(others)) if others else mine

        with self.index.write() as conn:
            return {
                "analysis_jobs": conn.execute(delete(jobs).where(of_patient(jobs))).rowcount,
                "analysis_units": conn.execute(delete(units).where(of_patient(units))).rowcount,
                "deliveries": conn.execute(delete(d).where(of_patient(d))).rowcount,
            }

    # --- deliveries -------------------------------------------------------------------------

    def queue_delivery(
        self,
        kind: str,
        recipient: str,
        purpose: str,
        patient_id: str,
        study_uid: str,
        sop_instance_uids: list[str],
        requested_by: str,
        max_attempts: int,
        now: datetime,
        claimed_by: str | None = None,
        lease: timedelta = timedelta(0),
    ) -> int:
        """Queue a delivery (or, with `claimed_by`, insert it already claimed by that worker,
        its first attempt begun)."""
        d = schema.deliveries
        claimed = (
            {
                "state": SENDING,
                "attempts": 1,
                "claimed_by": claimed_by,
                "lease_until": now + lease,
            }
            if claimed_by
            else {"state": QUEUED, "attempts": 0}
        )
        with self.index.write() as conn:
            return int(
                conn.execute(
                    d.insert().values(
                        kind=kind,
                        recipient=recipient,
                        purpose=purpose,
                        patient_id=patient_id,
                        study_instance_uid=study_uid,
                        sop_instance_uids=json.dumps(sop_instance_uids),
                        requested_by=requested_by,
                        max_attempts=max_attempts,
                        not_before=now,
                        created_at=now,
                        **claimed,
                    )
                ).inserted_primary_key[0]
            )

    def claim_delivery(
        self, worker: str, now: datetime, lease: timedelta, delivery_id: int | None = None
    ) -> Delivery | None:
        """Take the oldest due delivery (or exactly `delivery_id`, if it is queued)."""
        d = schema.deliveries
        values = {"claimed_by": worker, "lease_until": now + lease, "error": None}
        if delivery_id is None:
            with self.index.read() as conn:
                if not any_due(conn, d, now, QUEUED, SENDING):
                    return None
        with self.index.write() as conn:
            if delivery_id is None:
                row = claim_due(conn, d, self.index.is_sqlite, now, QUEUED, SENDING, values)
                return _delivery(row) if row is not None else None
            changed = conn.execute(
                update(d)
                .where(d.c.id == delivery_id, d.c.state == QUEUED)
                .values(state=SENDING, attempts=d.c.attempts + 1, **values)
            ).rowcount
            if not changed:
                return None
            return _delivery(conn.execute(select(d).where(d.c.id == delivery_id)).one())

    def finish_delivery(
        self,
        delivery_id: int,
        state: str,
        now: datetime,
        outcome: dict[str, Any],
        error: str | None = None,
        worker: str | None = None,
    ) -> bool:
        """Record how a delivery ended; with `worker`, only if it is still that worker's (a
        worker whose lease ran out must not overwrite the one that took it over)."""
        d = schema.deliveries
        where = [d.c.id == delivery_id]
        if worker is not None:
            where.append(owned_by(d, worker, SENDING))
        with self.index.write() as conn:
            return bool(
                conn.execute(
                    update(d)
                    .where(*where)
                    .values(
                        state=state,
                        finished_at=now,
                        lease_until=None,
                        outcome=json.dumps(outcome, default=str),
                        error=error[:4000] if error else None,
                    )
                ).rowcount
            )

    def retry_delivery_later(
        self,
        delivery_id: int,
        now: datetime,
        error: str,
        backoff: timedelta,
        outcome: dict[str, Any],
        worker: str | None = None,
    ) -> str:
        """A failed attempt: queued again after the backoff, or failed for good once its
        attempts are used (only while it is still `worker`'s, when given); returns the state."""
        d = schema.deliveries
        with self.index.write() as conn:
            return retry_or_fail(
                conn,
                d,
                delivery_id,
                now,
                error,
                backoff,
                QUEUED,
                FAILED,
                owned_by(d, worker, SENDING) if worker is not None else None,
                outcome=json.dumps(outcome, default=str),
            )

    def requeue_delivery(self, delivery_id: int, now: datetime, by: str) -> None:
        """Queue a finished delivery (failed, denied, cancelled, or done: to send it again)
        with fresh attempts, recording who did; it is decided again when it is sent."""
        d = schema.deliveries
        with self.index.write() as conn:
            row = conn.execute(select(d).where(d.c.id == delivery_id)).first()
            changed = conn.execute(
                update(d)
                .where(d.c.id == delivery_id, d.c.state.in_((FAILED, DENIED, CANCELLED, DONE)))
                .values(state=QUEUED, attempts=0, not_before=now, finished_at=None, error=None)
            ).rowcount
            if not changed:
                raise NotFound(f"delivery {delivery_id} is not finished")
            self.ledger.append(
                conn,
                LedgerKind.PROCESSING,
                by,
                "requeued",
                {
                    "operation": row.kind,
                    "delivery": delivery_id,
                    "previous_state": row.state,
                    "recipient": row.recipient,
                    "patient_ids": [row.patient_id],
                    "study_instance_uids": [row.study_instance_uid],
                },
            )

    def delivery(self, delivery_id: int) -> Delivery:
        d = schema.deliveries
        with self.index.read() as conn:
            row = conn.execute(select(d).where(d.c.id == delivery_id)).first()
        if row is None:
            raise NotFound(f"no delivery {delivery_id}")
        return _delivery(row)

    def deliveries(
        self,
        state: str | None = None,
        patient_id: str | None = None,
        study_uid: str | None = None,
        limit: int = 100,
    ) -> list[Delivery]:
        d = schema.deliveries
        query = select(d).order_by(d.c.id.desc()).limit(limit)
        if state:
            query = query.where(d.c.state == state)
        if patient_id:
            query = query.where(d.c.patient_id == patient_id)
        if study_uid:
            query = query.where(d.c.study_instance_uid == study_uid)
        with self.index.read() as conn:
            return [_delivery(row) for row in conn.execute(query)]
