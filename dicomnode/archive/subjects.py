"""Data subjects' records: consent versions, restrictions of processing, legal holds, and
the facts governance decides on (a part of `Registry`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update

from dicomnode.archive import schema
from dicomnode.archive.index import Index
from dicomnode.archive.jobs import AWAITING_GOVERNANCE
from dicomnode.archive.jobs import CANCELLED as JOB_CANCELLED
from dicomnode.archive.jobs import QUEUED as JOB_QUEUED
from dicomnode.archive.ledger import Ledger
from dicomnode.archive.values import (
    CACHE_SECONDS,
    CANCELLED,
    GOVERNANCE_LOCK,
    QUEUED,
    LegalHold,
    Restriction,
    _chunks,
    _consent,
    _hold,
    _restriction,
)
from dicomnode.core.errors import InvalidInput, NotFound
from dicomnode.core.model import (
    ConsentRecord,
    LedgerKind,
    PatientFacts,
    PatientIdentity,
)


class SubjectRecords:
    """Consents, restrictions, legal holds and the facts for decisions."""

    index: Index
    ledger: Ledger

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
                    jobs.c.state.in_((JOB_QUEUED, AWAITING_GOVERNANCE)),
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
            changed["released_jobs"] = self._release_jobs_awaiting_governance(
                conn, record.patient_id, others
            )
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

    def _release_jobs_awaiting_governance(
        self, conn: Connection, patient_id: str, others: list[str] | None = None
    ) -> list[int]:
        jobs = schema.analysis_jobs
        mine = and_(jobs.c.patient_id == patient_id, jobs.c.state == AWAITING_GOVERNANCE)
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
            released = self._release_jobs_awaiting_governance(conn, patient_id, others)
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
