"""What the analysis service reads and keeps: its job table, the instances of a unit, their
headers, copies of their files for analyzers that need local paths, and who sent a study.

The analysis runs inside the node: egress's `permit_processing` decides (and records) whether
a job may run for its patient before any of its files are handed to an analyzer."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicomnode.archive import Archive
from dicomnode.archive.jobs import Job, JobStore
from dicomnode.core.model import Level, StoredInstance


class Workbench:
    """The analysis service's side of the stores, over one archive."""

    def __init__(self, archive: Archive) -> None:
        self._store = archive
        self.jobs = JobStore(archive.index)

    def job(self, job_id: int) -> Job:
        """The job as recorded now (NotFound when there is none)."""
        return self.jobs.get(job_id)

    def instances(self, level: Level, keys: tuple[tuple[str, str], ...]) -> list[StoredInstance]:
        """The stored instances matching `keys` at `level` (e.g. a series by its UID)."""
        return self._store.find_instances(level, keys)

    def header(self, instance: StoredInstance) -> Dataset:
        """The instance's attributes, without its pixel data."""
        with self._store.open_blob(instance) as stream:
            if stream.seekable() and isinstance(getattr(stream, "name", None), str):
                return pydicom.dcmread(stream, stop_before_pixels=True)  # a local file
            with tempfile.SpooledTemporaryFile(max_size=8 << 20) as copy:
                shutil.copyfileobj(stream, copy, 1 << 20)  # an object store's body: spooled
                copy.seek(0)
                return pydicom.dcmread(copy, stop_before_pixels=True)

    def files(self, instances: list[StoredInstance], folder: Path) -> list[Path]:
        """Local copies of `instances` under `folder` (the job's working folder, removed with
        it), staged from the store's streams, for an analyzer that reads paths."""
        return [self._store.stage_blob(i, folder) for i in instances]

    def senders(self, study_uid: str) -> set[str]:
        """The AE titles that sent the study (forwarding skips them)."""
        return self._store.senders(study_uid)
