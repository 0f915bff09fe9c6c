"""The analysis service: units from intake's events, jobs from complete units, results filed.

- `on_stored` (an intake subscriber) counts each received object into the units of the
  analyzers that want it; "on-receipt" analyzers get their job at once.
- A sweeper turns units that are complete (quiet period, or the announced instance count) into
  jobs, in the same transaction that marks them queued.
- Workers claim jobs, check that the unit fits the analyzer clinically (its `ClinicalFit`, as
  the site tuned it: a unit that does not fit ends "not-applicable" with the reason, nothing of
  it processed), and ask governance (through egress) whether the analysis may run for the
  patient now; a job it does not allow is held, visibly, until a consent grant or a lifted
  restriction queues it again. Allowed jobs hand the analyzer the unit's stored files, check
  every output and file it through intake (replacing an earlier run's result, whose UIDs are
  the same), queue the results for the configured forwarding destinations (through egress),
  then record the job done; a failure, a timeout or a bad output is recorded and retried with
  backoff.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset

from dicomnode.analysis.plugin import (
    AnalysisContext,
    AnalysisResult,
    Analyzer,
    InputUnit,
    NotApplicable,
    deterministic_uid,
    discover,
)
from dicomnode.analysis.provenance import job_provenance
from dicomnode.config import AnalysisSettings
from dicomnode.core.enums import JobState
from dicomnode.core.errors import InvalidInput
from dicomnode.core.model import IngestResult, Level, Source
from dicomnode.egress import Egress
from dicomnode.intake import Intake
from dicomnode.records.workbench import Job, Workbench

log = logging.getLogger("dicomnode.analysis")


class OutputRefused(InvalidInput):
    """An analyzer returned an object the node will not file."""


class AnalysisService:
    def __init__(
        self,
        settings: AnalysisSettings,
        workbench: Workbench,
        intake: Intake,
        egress: Egress,
        analyzers: dict[str, type[Analyzer]] | None = None,
    ) -> None:
        self.settings = settings
        self.workbench = workbench
        self.intake = intake
        self.egress = egress
        self.jobs = workbench.jobs
        available = analyzers if analyzers is not None else discover()
        self.analyzers = {
            name: cls() for name, cls in available.items() if settings.analyzer(name).enabled
        }
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: set[tuple[str, str]] = set()  # units whose row exists and is collecting
        self._pending: dict[tuple[str, str], tuple] = {}  # counts not yet written
        self._threads: list[threading.Thread] = []
        self.worker_id = f"{uuid.uuid4().hex[:8]}"

    # --- from intake ------------------------------------------------------------------------

    def on_stored(self, result: IngestResult, source: Source) -> None:
        """Count a newly filed object into the units that want it.

        A unit's row is written when its first object arrives (so a restart knows it); later
        objects are counted in memory and written by the sweeper in one go, which keeps this
        off the C-STORE hot path.
        """
        if source.protocol == "analysis" or result.header is None or result.outcome == "duplicate":
            return
        header, now, instance = result.header, datetime.now(UTC), result.instance
        for name, analyzer in self.analyzers.items():
            if not analyzer.selector.matches(header):
                continue
            key = (name, analyzer.unit_uid(header))
            expected = analyzer.expected_instances(header)
            with self._lock:
                known = key in self._open
                if known:
                    _, _, count, _, last_expected = self._pending.get(
                        key, (None, None, 0, None, None)
                    )
                    self._pending[key] = (
                        instance.study_instance_uid,
                        instance.patient_id,
                        count + 1,
                        now,
                        expected if expected is not None else last_expected,
                    )
                else:
                    self._open.add(key)
            if not known:
                self.jobs.note_received(
                    name, key[1], instance.study_instance_uid, instance.patient_id, now, expected
                )
                if analyzer.completion == "on-receipt":
                    self._queue(name, key[1], "on-receipt")

    def flush(self) -> None:
        """Write the counts gathered in memory since the last flush."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for (name, unit_uid), (study, patient, count, last, expected) in pending.items():
            self.jobs.note_received(name, unit_uid, study, patient, last, expected, count)

    # --- completion -------------------------------------------------------------------------

    def sweep(self, now: datetime | None = None) -> int:
        """Queue every unit that is complete now; returns how many were queued."""
        self.flush()
        now = now or datetime.now(UTC)
        quiet = {
            name: timedelta(seconds=self.settings.analyzer(name).quiet_period)
            for name, analyzer in self.analyzers.items()
            if analyzer.completion != "on-receipt"
        }
        ready = self.jobs.ready_units(quiet, now)
        for name, unit_uid, reason in ready:
            self._queue(name, unit_uid, reason)
        return len(ready)

    def request(self, study_uid: str) -> list[int]:
        """Queue every analyzer's units in a study now (the explicit "commit"); returns job ids."""
        queued: dict[tuple[str, str], int] = {}
        for item in self.workbench.instances(Level.STUDY, (("StudyInstanceUID", study_uid),)):
            header = self.workbench.header(item)
            for name, analyzer in self.analyzers.items():
                key = (name, analyzer.unit_uid(header))
                if key not in queued and analyzer.selector.matches(header):
                    queued[key] = self._queue(name, key[1], "requested", item)
        return list(queued.values())

    def _queue(self, name: str, unit_uid: str, reason: str, item: object = None) -> int:
        analyzer = self.analyzers[name]
        with self._lock:  # the next object of this unit re-opens it with a write of its own
            self._open.discard((name, unit_uid))
        inputs = [i.sop_instance_uid for i in self._unit_instances(analyzer, unit_uid)]
        job_id = self.jobs.queue(
            name,
            analyzer.version,
            unit_uid,
            reason,
            datetime.now(UTC),
            self.settings.max_attempts,
            inputs,
            study_uid=getattr(item, "study_instance_uid", None),
            patient_id=getattr(item, "patient_id", None),
        )
        log.info(
            "analysis queued",
            extra={
                "event": "job",
                "job": job_id,
                "analyzer": name,
                "unit": unit_uid,
                "reason": reason,
            },
        )
        return job_id

    def _unit_instances(self, analyzer: Analyzer, unit_uid: str) -> list:
        level, keyword = {
            "instance": (Level.IMAGE, "SOPInstanceUID"),
            "series": (Level.SERIES, "SeriesInstanceUID"),
            "study": (Level.STUDY, "StudyInstanceUID"),
        }[analyzer.unit]
        return self.workbench.instances(level, ((keyword, unit_uid),))

    # --- workers ----------------------------------------------------------------------------

    def run_one(self, worker: str | None = None) -> Job | None:
        """Claim and run one due job; returns it as recorded afterwards, or None if none was due."""
        now = datetime.now(UTC)
        longest = max((self.settings.analyzer(n).timeout for n in self.analyzers), default=300)
        job = self.jobs.claim(
            worker or self.worker_id,
            now,
            timedelta(seconds=longest + self.settings.lease_grace),
        )
        if job is None:
            return None
        analyzer = self.analyzers.get(job.analyzer)
        misfit = self._misfit(job, analyzer) if analyzer is not None else ""
        if misfit:  # minimum data: nothing of the unit is processed
            self.jobs.not_applicable(job.id, datetime.now(UTC), misfit)
            log.info(
                "analysis not applicable: %s",
                misfit,
                extra={
                    "event": "job",
                    "job": job.id,
                    "analyzer": job.analyzer,
                    "state": JobState.NOT_APPLICABLE,
                },
            )
            return self.jobs.get(job.id)
        permit = self.egress.permit_processing(
            job.analyzer, job.patient_id, job.study_instance_uid, job.id
        )
        if not permit.allowed:
            self.jobs.await_governance(
                job.id, datetime.now(UTC), f"{permit.reason} ({permit.rule_id})"
            )
            log.info(
                "analysis held: %s",
                permit.reason,
                extra={"event": "job", "job": job.id, "analyzer": job.analyzer, "state": "held"},
            )
            return self.jobs.get(job.id)
        started = time.perf_counter()
        try:
            if analyzer is None:
                raise RuntimeError(f"analyzer {job.analyzer} is not installed or not enabled")
            outputs, summary = self._run(job, analyzer)
        except NotApplicable as e:
            self.jobs.finish(
                job.id, datetime.now(UTC), [], {"skipped": str(e)}, state=JobState.SKIPPED
            )
            log.info(
                "analysis skipped: %s",
                e,
                extra={"event": "job", "job": job.id, "analyzer": job.analyzer},
            )
            return self.jobs.get(job.id)
        except Exception as e:
            state = self.jobs.fail(
                job.id,
                datetime.now(UTC),
                f"{type(e).__name__}: {e}",
                timedelta(seconds=self.settings.retry_backoff),
            )
            log.warning(
                "analysis failed: %s",
                e,
                extra={
                    "event": "job",
                    "job": job.id,
                    "analyzer": job.analyzer,
                    "state": state,
                    "attempt": job.attempts,
                },
            )
            return self.jobs.get(job.id)
        summary["seconds"] = round(time.perf_counter() - started, 3)
        self.jobs.finish(job.id, datetime.now(UTC), outputs, summary)
        log.info(
            "analysis done",
            extra={
                "event": "job",
                "job": job.id,
                "analyzer": job.analyzer,
                "outputs": len(outputs),
                **summary,
            },
        )
        return self.jobs.get(job.id)

    def _misfit(self, job: Job, analyzer: Analyzer) -> str:
        """Why the job's unit does not fit the analyzer clinically ("" when it does), judged
        on its first instance's header, by the analyzer's fit as the site tuned it."""
        fit = analyzer.clinical_fit(self.settings.analyzer(job.analyzer).fit)
        if fit is None:
            return ""
        instances = self._unit_instances(analyzer, job.unit_uid)
        if not instances:
            return ""  # the run says so
        header = self.workbench.header(instances[0])
        return fit.misfit(header)

    def _run(self, job: Job, analyzer: Analyzer) -> tuple[list[str], dict]:
        instances = self._unit_instances(analyzer, job.unit_uid)
        if not instances:
            raise RuntimeError(f"the unit {job.unit_uid} holds no instances any more")
        config = self.settings.analyzer(job.analyzer)
        with tempfile.TemporaryDirectory(prefix="dicomnode-job-") as workdir:
            staged = Path(workdir) / "inputs"
            staged.mkdir()
            unit = InputUnit(
                key=job.unit_uid,
                study_instance_uid=job.study_instance_uid,
                patient_id=job.patient_id,
                paths=self.workbench.files(instances, staged),
                sop_instance_uids=[i.sop_instance_uid for i in instances],
            )
            context = AnalysisContext(
                params=config.params,
                uid=lambda role: deterministic_uid(
                    analyzer.name, analyzer.version, job.unit_uid, role
                ),
                deadline=datetime.now(UTC) + timedelta(seconds=config.timeout),
                workdir=Path(workdir),
            )
            result = _with_timeout(lambda: analyzer.analyze(unit, context), config.timeout)
        inputs = {i.sop_instance_uid for i in instances} | {
            i.series_instance_uid for i in instances
        }
        for ds in result.datasets:
            _check_output(ds, analyzer, job.study_instance_uid, inputs)
        source = Source("analysis", f"{analyzer.name}/{analyzer.version}")
        filed = [
            self.intake.receive_part10(_part10(ds), source, job.study_instance_uid, "replace")
            for ds in result.datasets
        ]
        summary = dict(result.summary)
        if result.warnings:
            summary["warnings"] = list(result.warnings)
        summary["provenance"] = job_provenance(analyzer, config.params, unit.sop_instance_uids)
        if self.settings.forward_to:
            summary["deliveries"] = self.egress.queue_forward(
                [f.instance for f in filed],
                self.settings.forward_to,
                source.caller,
                senders=self.workbench.senders(job.study_instance_uid),
            )
        return [f.instance.sop_instance_uid for f in filed], summary

    def start(self) -> None:
        threads = [threading.Thread(target=self._sweep_loop, name="analysis-sweep", daemon=True)]
        threads += [
            threading.Thread(
                target=self._work_loop,
                args=(f"{self.worker_id}-{n}",),
                name=f"analysis-{n}",
                daemon=True,
            )
            for n in range(self.settings.workers)
        ]
        for thread in threads:
            thread.start()
        self._threads = threads

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.settings.sweep_interval):
            try:
                self.sweep()
            except Exception:
                log.exception("analysis sweep failed")

    def _work_loop(self, worker: str) -> None:
        while not self._stop.is_set():
            try:
                job = self.run_one(worker)
            except Exception:
                log.exception("analysis worker failed")
                job = None
            if job is None:
                self._stop.wait(self.settings.sweep_interval / 2)


def _with_timeout(work, seconds: float) -> AnalysisResult:
    """Run `work` in a helper thread; a run past `seconds` fails the job (the thread is left to
    finish on its own, and its late result is discarded)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as e:  # handed back to the worker below
            outcome["error"] = e

    thread = threading.Thread(target=target, name="analyzer", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"the analyzer ran past its timeout of {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    result = outcome["result"]
    if not isinstance(result, AnalysisResult):
        raise TypeError(f"analyze() returned {type(result).__name__}, not AnalysisResult")
    return result


def _check_output(ds: Dataset, analyzer: Analyzer, study_uid: str, inputs: set[str]) -> None:
    if str(ds.get("StudyInstanceUID", "")) != study_uid:
        raise OutputRefused(
            f"an output belongs to study {ds.get('StudyInstanceUID')}, not {study_uid}"
        )
    if str(ds.get("SOPClassUID", "")) not in analyzer.output_sop_classes:
        raise OutputRefused(
            f"output SOP class {ds.get('SOPClassUID')} is not one {analyzer.name} declares"
        )
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
        if str(ds.get(keyword, "")) in inputs:
            raise OutputRefused(f"an output reuses an input's {keyword}")


def _part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
