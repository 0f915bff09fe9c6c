"""Durable analysis state: units being collected and the jobs made from them.

A unit (one instance, series or study for one analyzer) is "collecting" while its objects
arrive. It becomes ready by quiet period, by reaching the instance count its headers announce,
on receipt (self-contained instances) or on request; the job row is written in the same
transaction that marks the unit queued, so a restart loses nothing and several processes can
share the work. Workers claim jobs with a lease (`SELECT ... FOR UPDATE SKIP LOCKED` on
PostgreSQL; SQLite's write lock serialises claims); a job whose lease ran out (its worker died)
is claimed again, and a failed attempt is retried with exponential backoff until
`max_attempts`, then stays visibly "failed".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select, update

from dicomnode.archive import schema
from dicomnode.archive.index import Index
from dicomnode.archive.leases import any_due, claim_due, db_now, on_db_clock, retry_or_fail
from dicomnode.core.enums import JobState
from dicomnode.core.errors import NotFound
from dicomnode.core.times import as_utc

# The job states are dicomnode.core.enums.JobState; these names are kept for the callers.
QUEUED, RUNNING, DONE, FAILED, SKIPPED = (
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.DONE,
    JobState.FAILED,
    JobState.SKIPPED,
)
# Governance states: awaiting governance (not allowed now, e.g. consent missing or processing
# restricted; it runs again when that changes) and cancelled (consent withdrawn or refused).
AWAITING_GOVERNANCE, CANCELLED = JobState.AWAITING_GOVERNANCE, JobState.CANCELLED
# "awaiting governance" is stored and shown as "held" (unchanged, so data and API stay
# readable); it is neither intake's quarantine nor a legal hold.
# Minimum data: the unit does not fit the analyzer clinically (a head CT for a lung analysis);
# it is not processed, and the reason is the job's error.
NOT_APPLICABLE = JobState.NOT_APPLICABLE
STATES = tuple(JobState)
COLLECTING = "collecting"


@dataclass(frozen=True)
class Job:
    id: int
    analyzer: str
    analyzer_version: str
    unit_uid: str
    study_instance_uid: str
    patient_id: str
    reason: str
    state: str
    attempts: int
    max_attempts: int
    not_before: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    claimed_by: str | None
    lease_until: datetime | None
    error: str | None
    inputs: str | None
    outputs: str | None
    summary: str | None

    def as_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key in ("inputs", "outputs", "summary"):
            data[key] = json.loads(data[key]) if data[key] else None
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        return data


def _job(row: Any) -> Job:
    return Job(**{k: row._mapping[k] for k in Job.__dataclass_fields__})


class JobStore:
    """Units and jobs in the index database."""

    def __init__(self, index: Index) -> None:
        self.index = index

    # --- units ------------------------------------------------------------------------------

    def note_received(
        self,
        analyzer: str,
        unit_uid: str,
        study_uid: str,
        patient_id: str,
        now: datetime,
        expected: int | None = None,
        count: int = 1,
    ) -> None:
        """Count `count` more objects of a unit, the last received at `now`, creating the unit
        or re-opening it if its job was already queued (a late object joins a new run). On
        PostgreSQL `last_received_at` is the database's clock, which every node shares."""
        units = schema.analysis_units
        with self.index.write() as conn:
            received = now if self.index.is_sqlite else db_now(conn)
            row = conn.execute(
                select(units.c.id, units.c.state).where(
                    units.c.analyzer == analyzer, units.c.unit_uid == unit_uid
                )
            ).first()
            if row is None:
                conn.execute(
                    units.insert().values(
                        analyzer=analyzer,
                        unit_uid=unit_uid,
                        study_instance_uid=study_uid,
                        patient_id=patient_id,
                        instances=count,
                        expected=expected,
                        first_received_at=now,
                        last_received_at=received,
                        state=COLLECTING,
                    )
                )
            else:  # a late object re-opens a queued unit, so its analysis sees everything
                conn.execute(
                    update(units)
                    .where(units.c.id == row.id)
                    .values(
                        instances=units.c.instances + count,
                        last_received_at=received,
                        expected=expected if expected is not None else units.c.expected,
                        state=COLLECTING,
                    )
                )

    def ready_units(self, quiet: dict[str, timedelta], now: datetime) -> list[tuple[str, str, str]]:
        """(analyzer, unit_uid, reason) for collecting units that are complete now: quiet for the
        analyzer's quiet period, or holding the number of instances their headers announced.
        The quiet period is judged on the database's clock (moved as far as `now` is from this
        node's clock: a caller may look ahead)."""
        units = schema.analysis_units
        with self.index.read() as conn:
            rows = conn.execute(select(units).where(units.c.state == COLLECTING)).all()
            now = now + on_db_clock(conn)
        ready = []
        for row in rows:
            period = quiet.get(row.analyzer)
            if period is None:
                continue
            if row.expected is not None and row.instances >= row.expected:
                ready.append((row.analyzer, row.unit_uid, "expected-count"))
            elif as_utc(row.last_received_at) + period <= now:
                ready.append((row.analyzer, row.unit_uid, "quiet-period"))
        return ready

    def queue(
        self,
        analyzer: str,
        version: str,
        unit_uid: str,
        reason: str,
        now: datetime,
        max_attempts: int,
        inputs: list[str],
        study_uid: str | None = None,
        patient_id: str | None = None,
    ) -> int:
        """Mark the unit queued and write its job in one transaction; returns the job id."""
        units = schema.analysis_units
        with self.index.write() as conn:
            unit = conn.execute(
                select(units).where(units.c.analyzer == analyzer, units.c.unit_uid == unit_uid)
            ).first()
            if unit is not None:
                conn.execute(update(units).where(units.c.id == unit.id).values(state=QUEUED))
                study_uid, patient_id = unit.study_instance_uid, unit.patient_id
            if study_uid is None or patient_id is None:
                raise NotFound(f"no unit {unit_uid} for analyzer {analyzer}")
            return self._insert_job(
                conn,
                analyzer,
                version,
                unit_uid,
                study_uid,
                patient_id,
                reason,
                now,
                max_attempts,
                inputs,
            )

    def _insert_job(
        self,
        conn: Connection,
        analyzer: str,
        version: str,
        unit_uid: str,
        study_uid: str,
        patient_id: str,
        reason: str,
        now: datetime,
        max_attempts: int,
        inputs: list[str],
    ) -> int:
        result = conn.execute(
            schema.analysis_jobs.insert().values(
                analyzer=analyzer,
                analyzer_version=version,
                unit_uid=unit_uid,
                study_instance_uid=study_uid,
                patient_id=patient_id,
                reason=reason,
                state=QUEUED,
                attempts=0,
                max_attempts=max_attempts,
                not_before=now,
                created_at=now,
                inputs=json.dumps(inputs),
            )
        )
        return int(result.inserted_primary_key[0])

    # --- jobs -------------------------------------------------------------------------------

    def claim(self, worker: str, now: datetime, lease: timedelta) -> Job | None:
        """Take the oldest job that is due (queued, or running with an expired lease)."""
        values = {
            "started_at": now,
            "claimed_by": worker,
            "lease_until": now + lease,
            "error": None,
        }
        with self.index.read() as conn:
            if not any_due(conn, schema.analysis_jobs, now, QUEUED, RUNNING):
                return None
        with self.index.write() as conn:
            row = claim_due(
                conn, schema.analysis_jobs, self.index.is_sqlite, now, QUEUED, RUNNING, values
            )
            return _job(row) if row is not None else None

    def finish(
        self,
        job_id: int,
        now: datetime,
        outputs: list[str],
        summary: dict[str, Any],
        state: str = DONE,
    ) -> None:
        self._set(
            job_id,
            state=state,
            finished_at=now,
            lease_until=None,
            outputs=json.dumps(outputs),
            summary=json.dumps(summary, default=str),
        )

    def fail(self, job_id: int, now: datetime, error: str, backoff: timedelta) -> str:
        """Record a failed attempt: queued again after `backoff` x 2^(attempts-1), or failed
        for good once max_attempts are used; returns the new state."""
        with self.index.write() as conn:
            return retry_or_fail(
                conn, schema.analysis_jobs, job_id, now, error, backoff, QUEUED, FAILED
            )

    def await_governance(self, job_id: int, now: datetime, reason: str) -> None:
        """Governance does not allow the job now: it waits, visibly, until a consent grant or a
        lifted restriction queues it again (the attempt does not count)."""
        jobs = schema.analysis_jobs
        self._set(
            job_id,
            state=AWAITING_GOVERNANCE,
            attempts=jobs.c.attempts - 1,
            lease_until=None,
            finished_at=now,
            error=reason[:4000],
        )

    def not_applicable(self, job_id: int, now: datetime, reason: str) -> None:
        """The unit does not fit the analyzer clinically: it is not processed (the attempt does
        not count); `reason` says why. A retry (after the site widened the fit) asks again."""
        jobs = schema.analysis_jobs
        self._set(
            job_id,
            state=NOT_APPLICABLE,
            attempts=jobs.c.attempts - 1,
            lease_until=None,
            finished_at=now,
            error=reason[:4000],
            summary=json.dumps({"not_applicable": reason}),
        )

    def retry(self, job_id: int, now: datetime) -> None:
        """Queue a failed, finished, held, cancelled or not-applicable job again with a fresh
        set of attempts (a held job is asked about again when it runs, a not-applicable one is
        checked against the analyzer's fit again)."""
        jobs = schema.analysis_jobs
        with self.index.write() as conn:
            changed = conn.execute(
                update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.state.in_(
                        (FAILED, DONE, SKIPPED, AWAITING_GOVERNANCE, CANCELLED, NOT_APPLICABLE)
                    ),
                )
                .values(state=QUEUED, attempts=0, not_before=now, finished_at=None, error=None)
            ).rowcount
        if not changed:
            raise NotFound(f"job {job_id} is queued or running, not finished")

    def _set(self, job_id: int, **values: Any) -> None:
        with self.index.write() as conn:
            conn.execute(
                update(schema.analysis_jobs)
                .where(schema.analysis_jobs.c.id == job_id)
                .values(**values)
            )

    def get(self, job_id: int) -> Job:
        with self.index.read() as conn:
            row = conn.execute(
                select(schema.analysis_jobs).where(schema.analysis_jobs.c.id == job_id)
            ).first()
        if row is None:
            raise NotFound(f"no job {job_id}")
        return _job(row)

    def list(
        self,
        state: str | None = None,
        study_uid: str | None = None,
        limit: int | None = 100,
        patient_id: str | None = None,
    ) -> list[Job]:
        """Jobs, newest first; `patient_id` is matched exactly; `limit` None: all of them."""
        jobs = schema.analysis_jobs
        query = select(jobs).order_by(jobs.c.id.desc())
        if limit is not None:
            query = query.limit(limit)
        if state:
            query = query.where(jobs.c.state == state)
        if study_uid:
            query = query.where(jobs.c.study_instance_uid == study_uid)
        if patient_id is not None:
            query = query.where(jobs.c.patient_id == patient_id)
        with self.index.read() as conn:
            return [_job(row) for row in conn.execute(query)]
