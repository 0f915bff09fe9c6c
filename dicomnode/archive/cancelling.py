"""Cancelling and purging work: analysis jobs and deliveries a consent withdrawal or an
erasure stops, and the records retention purges (a part of `Registry`). Job states are
jobs.py's."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, select, update

from dicomnode.archive import schema
from dicomnode.archive.index import Index
from dicomnode.archive.jobs import AWAITING_GOVERNANCE
from dicomnode.archive.jobs import CANCELLED as JOB_CANCELLED
from dicomnode.archive.jobs import DONE as JOB_DONE
from dicomnode.archive.jobs import FAILED as JOB_FAILED
from dicomnode.archive.jobs import QUEUED as JOB_QUEUED
from dicomnode.archive.jobs import SKIPPED as JOB_SKIPPED
from dicomnode.archive.ledger import Ledger
from dicomnode.archive.values import (
    CANCELLED,
    FINISHED_DELIVERIES,
    QUEUED,
    _chunks,
)
from dicomnode.core.times import as_utc


class WorkCancelling:
    """Cancels queued work, purges finished records."""

    index: Index
    ledger: Ledger

    # --- retention --------------------------------------------------------------------------

    def analysis_done_at(self) -> dict[str, datetime]:
        """Per study, when its last analysis job finished successfully."""
        jobs = schema.analysis_jobs
        query = (
            select(jobs.c.study_instance_uid, func.max(jobs.c.finished_at))
            .where(jobs.c.state == JOB_DONE)
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
                    jobs.c.state.in_((JOB_QUEUED, AWAITING_GOVERNANCE)),
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
        finished_jobs = (JOB_DONE, JOB_FAILED, JOB_CANCELLED, JOB_SKIPPED)
        with self.index.write() as conn:
            removed_jobs = conn.execute(
                delete(jobs).where(
                    jobs.c.state.in_(finished_jobs), jobs.c.finished_at < finished_before
                )
            ).rowcount
            removed_deliveries = conn.execute(
                delete(d).where(
                    d.c.state.in_(FINISHED_DELIVERIES), d.c.finished_at < finished_before
                )
            ).rowcount
            removed_units = conn.execute(
                delete(units).where(
                    units.c.state == JOB_QUEUED, units.c.last_received_at < finished_before
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
