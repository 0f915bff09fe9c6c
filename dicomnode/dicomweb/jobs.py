"""The analysis jobs API: ``GET /analysis/jobs`` (state, timings, errors, inputs, outputs),
``GET /analysis/jobs/{id}``, ``POST /analysis/jobs/{id}/retry`` and
``POST /analysis/studies/{study}/run`` (the explicit "commit" of a study). Each job names the
refusal and explanation requests (PIPA 37-2) flagging its output (`automated_decision_flags`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, jsonify, request

from dicomnode.core.errors import NotFound, NotPermitted
from dicomnode.core.uids import validate_uid
from dicomnode.dicomweb.access import requester, require_token, services
from dicomnode.records.workbench import Job


def _store() -> Any:
    """The job table (its records leave through egress: `_disclosed`)."""
    return services().records.jobs


def _disclosed(jobs: list[Job]) -> list[dict]:
    """Job records name patients and studies: they leave through egress like any answer
    (records of patients governance leaves out are dropped)."""
    left_out = services().egress.account(
        requester(),
        "job-info",
        {job.patient_id for job in jobs},
        {job.study_instance_uid for job in jobs},
        len(jobs),
    )
    shown = [job for job in jobs if job.patient_id not in left_out]
    flags = services().casework.decision_flags({job.patient_id for job in shown}) if shown else []
    return [job.as_dict() | {"automated_decision_flags": _flags_of(job, flags)} for job in shown]


def _flags_of(job: Job, flags: list) -> list[dict]:
    """The refusal and explanation requests (PIPA 37-2) that flag this job's AI output."""
    return [f.as_dict() for f in flags if f.covers(job.patient_id, job.study_instance_uid)]


def _single(job: Job) -> Response:
    disclosed = _disclosed([job])
    if not disclosed:
        raise NotPermitted(f"job {job.id} concerns a patient whose data may not be shown")
    return jsonify(disclosed[0])


def jobs_blueprint() -> Blueprint:
    bp = Blueprint("analysis_jobs", __name__)
    require_token(bp)

    @bp.get("/jobs")
    def list_jobs() -> Response:
        study = request.args.get("study")
        jobs = _store().list(
            state=request.args.get("state"),
            study_uid=validate_uid(study, "study") if study else None,
            limit=min(int(request.args.get("limit", "100") or 100), 1000),
        )
        return jsonify(_disclosed(jobs))

    @bp.get("/jobs/<int:job_id>")
    def show_job(job_id: int) -> Response:
        return _single(_store().get(job_id))

    @bp.post("/jobs/<int:job_id>/retry")
    def retry_job(job_id: int) -> Response:
        _store().retry(job_id, datetime.now(UTC))
        return _single(_store().get(job_id))

    @bp.post("/studies/<study>/run")
    def run_study(study: str) -> tuple[Response, int]:
        run = services().request_analysis
        if run is None:
            raise NotFound("analysis is turned off on this node ([analysis] enabled = false)")
        job_ids = run(validate_uid(study, "StudyInstanceUID"))
        if not job_ids:
            raise NotFound(f"no analyzer wants anything in study {study}")
        return jsonify({"jobs": job_ids}), 202

    return bp
