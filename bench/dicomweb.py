#!/usr/bin/env python3
"""DICOMweb benchmark: dicomnode against Orthanc with its DICOMweb plugin, on the same data.

The benchmark generates, once, into a directory outside the repository

* a small-study archive: ``--studies`` studies of ``--instances-per-study`` 64x64 CT
  instances, one patient per study, with varied PatientName, PatientID and StudyDate, and
* one large CT study of ``--big-instances`` 512x512 16-bit instances (~526 kB each),

starts dicomnode (``dicomnode serve``) and Orthanc (in the foreground, with a temporary
JSON configuration loading the DICOMweb plugin), loads the same files into both with dcmtk
``storescu``, checks that both hold the same number of studies and instances, waits for the
machine to be quiet, and then times, interleaving the two servers:

* QIDO-RS study search by PatientID (one match) and with no filter and ``limit=100``,
* WADO-RS retrieval of the large study (multipart, as stored), reading the whole body,
* WADO-RS ``/metadata`` of the large study,
* STOW-RS of ``--stow-instances`` 512x512 CT instances (onto new UIDs every repetition),

all over one keep-alive ``requests.Session`` per server. Medians (and p95 for QIDO) and
the ratios dicomnode/Orthanc are appended as a Markdown section to ``bench/RESULTS.md``.
Optionally (``--profile DIR``) dicomnode is sampled with py-spy during extra, untimed
metadata and QIDO runs.

It is a hand-run tool; see ``bench/README.md``. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import linecache
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import requests
from common import (
    child_env,
    describe_source,
    dicomnode_source,
    first_line,
    free_port,
    group_cpu_ticks,
    kernel_threads_cpu_seconds,
    make_log,
    package_version,
    phantom_slice,
    snapshot_source,
    system_busy_seconds,
    tree_hash,
)
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

#: Bump when the generated data changes, so that cached data sets are regenerated.
GENERATOR_VERSION = 1
SMALL_SIZE = 64
BIG_SIZE = 512
CALLING_AET = "BENCH"
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "dicomnode-dicomweb-bench"
REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILE_RATE = 200  # py-spy samples per second
#: WADO-RS Accept header: the instances as stored, whatever their transfer syntax.
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DICOM_JSON = "application/dicom+json"
SERVERS = ("dicomnode", "orthanc")
MEASURES = ("qido_patient", "qido_all", "wado", "metadata", "stow")

FAMILY_NAMES = (
    "SMITH", "JONES", "MUELLER", "GARCIA", "ROSSI", "DUBOIS", "NOVAK", "TANAKA",
    "SILVA", "KOWALSKI", "JANSEN", "NIELSEN", "O'BRIEN", "IVANOV", "KIM", "NGUYEN",
    "LEHMANN", "FISCHER", "MARTIN", "BERGER", "HUBER", "KELLER", "WEBER", "MEIER",
)  # fmt: skip
GIVEN_NAMES = (
    "ANNA", "BEN", "CLARA", "DAVID", "EVA", "FELIX", "GRETA", "HUGO", "IDA", "JONAS",
    "KARL", "LENA", "MAX", "NINA", "OSKAR", "PAULA", "QUENTIN", "ROSA", "SARA", "TOM",
)  # fmt: skip

#: Progress message on stderr.
log = make_log("dicomweb-bench")


# --------------------------------------------------------------------------------------
# Tools, environment and machine
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    """Absolute paths of the external programs the benchmark drives."""

    storescu: str
    orthanc: str
    orthanc_plugin: str
    dicomnode: list[str]
    py_spy: str | None
    #: Extra environment for dicomnode (``PYTHONPATH`` of a source snapshot).
    dicomnode_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def discover(cls, plugin: str | None, dicomnode_cmd: str | None) -> Tools:
        """Find dcmtk's storescu (``/usr/bin`` first), Orthanc, its plugin and dicomnode.

        pynetdicom installs a Python ``storescu`` that may come first on ``PATH``, so
        dcmtk is taken from ``/usr/bin`` explicitly.
        """
        storescu = "/usr/bin/storescu"
        if not os.access(storescu, os.X_OK):
            raise SystemExit("dcmtk's /usr/bin/storescu not found (apt-get install dcmtk)")
        orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not os.access(orthanc, os.X_OK):
            raise SystemExit("Orthanc not found (apt-get install orthanc)")
        plugin = plugin or find_dicomweb_plugin()
        if dicomnode_cmd:
            dicomnode = dicomnode_cmd.split()
        else:
            found = shutil.which("dicomnode")
            dicomnode = [found] if found else [sys.executable, "-m", "dicomnode.cli"]
        return cls(storescu, orthanc, plugin, dicomnode, shutil.which("py-spy"))


def find_dicomweb_plugin() -> str:
    """Path of Orthanc's DICOMweb plugin, from ``dpkg -L orthanc-dicomweb``."""
    proc = subprocess.run(
        ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False
    )
    candidates = [
        line.strip()
        for line in proc.stdout.splitlines()
        if "libOrthancDicomWeb.so" in line and Path(line.strip()).exists()
    ]
    if not candidates:
        raise SystemExit(
            "Orthanc's DICOMweb plugin not found: apt-get install -y orthanc-dicomweb "
            "(or pass --orthanc-plugin PATH)"
        )
    # Prefer the copy in Orthanc's plugin directory (a symlink to the versioned file).
    candidates.sort(key=lambda p: ("/plugins/" not in p, p))
    return candidates[0]


def deb_version(name: str) -> str:
    """Version of a Debian package, or ``"unknown"``."""
    return first_line(["dpkg-query", "-W", "-f=${Version}", name])


def machine_info(tools: Tools) -> dict[str, str]:
    """Describe the machine and the software versions for the report."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return {
        "date": first_line(["date", "-u"]),
        "nproc": first_line(["nproc"]),
        "cpu": cpu,
        "ram": ram,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pydicom": package_version("pydicom"),
        "requests": package_version("requests"),
        "dicomnode": package_version("dicomnode"),
        "waitress": package_version("waitress"),
        "orthanc_deb": deb_version("orthanc"),
        "plugin_deb": deb_version("orthanc-dicomweb"),
        "dcmtk": first_line([tools.storescu, "--version"]).strip("$ ").removeprefix("dcmtk: "),
    }


# --------------------------------------------------------------------------------------
# Machine load
# --------------------------------------------------------------------------------------


def load_average() -> float:
    """The 1-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def other_benchmark_running(pattern: str = "store_ingest.py") -> bool:
    """Whether a process whose command line matches ``pattern`` runs (``pgrep -f``)."""
    proc = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    own = {str(os.getpid())}
    return any(pid.strip() and pid.strip() not in own for pid in proc.stdout.splitlines())


def group_cpu_seconds(pgid: int) -> float:
    """User+system CPU seconds of the process group ``pgid`` (children included)."""
    ticks = sum(group_cpu_ticks(pgid))  # utime+cutime, stime+cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its waited-for children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def wait_for_quiet_machine(max_load: float, timeout: float, poll: float = 10.0) -> float:
    """Wait until no ``store_ingest.py`` runs and the 1-minute load is below ``max_load``.

    Polls every ``poll`` seconds for at most ``timeout`` seconds; returns the seconds
    waited. After the timeout it returns anyway (the report shows the load).
    """
    started = time.monotonic()
    announced = False
    while True:
        busy_bench = other_benchmark_running()
        load = load_average()
        if not busy_bench and load < max_load:
            return time.monotonic() - started
        if time.monotonic() - started >= timeout:
            log(f"machine still busy after {timeout:.0f} s (load {load:.2f}); measuring anyway")
            return time.monotonic() - started
        if not announced:
            why = "store_ingest.py is running" if busy_bench else f"load average {load:.2f}"
            log(f"waiting for a quiet machine ({why}; up to {timeout:.0f} s)")
            announced = True
        time.sleep(poll)


def wait_for_idle_cpu(max_cores: float, timeout: float, window: float = 1.0) -> float:
    """Wait until the machine uses fewer than ``max_cores`` cores (the servers are idle
    between measurements, so this is other work) and no ``store_ingest.py`` runs.

    Returns the busy cores of the last window.
    """
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        before, started = system_busy_seconds(), time.monotonic()
        time.sleep(window)
        busy = (system_busy_seconds() - before) / (time.monotonic() - started)
        quiet = busy <= max_cores and not other_benchmark_running()
        if quiet or time.monotonic() >= deadline:
            if not quiet:
                log(f"  machine still busy ({busy:.2f} cores); measuring anyway")
            return busy
        if not announced:
            log(f"  machine busy ({busy:.2f} cores in use); waiting")
            announced = True


@dataclass
class CpuMeter:
    """CPU used during a block of measurements by the servers, by this script, and by
    everything else on the machine (kernel threads left out)."""

    server_pgids: dict[str, int]
    started: float = 0.0
    _system: float = 0.0
    _kernel: float = 0.0
    _own: float = 0.0
    _servers: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        """Take the first readings."""
        # Slow readings (scans of /proc) first and last, so that the machine-wide window
        # matches this process's own window and the scans do not count as other work.
        self._servers = {n: group_cpu_seconds(p) for n, p in self.server_pgids.items()}
        self._kernel = kernel_threads_cpu_seconds()
        self._system = system_busy_seconds()
        self._own = own_cpu_seconds()
        self.started = time.monotonic()

    def stop(self) -> tuple[float, dict[str, float], float, float]:
        """(other CPU s, server CPU s by name, client CPU s, wall s) since :meth:`start`.

        "Other" is the rest of the machine's user+system CPU, kernel threads left out.
        """
        wall = time.monotonic() - self.started
        own = own_cpu_seconds() - self._own
        system = system_busy_seconds() - self._system
        servers = {n: group_cpu_seconds(p) - self._servers[n] for n, p in self.server_pgids.items()}
        kernel = kernel_threads_cpu_seconds() - self._kernel
        # Not clamped at zero: with 10 ms clock ticks single readings are noisy both ways.
        other = system - kernel - own - sum(servers.values())
        return other, servers, own, wall


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """The generated files and what the benchmark needs to know about them."""

    root: Path
    small_dir: Path
    big_dir: Path
    #: PatientID -> StudyInstanceUID of the small studies.
    patients: dict[str, str]
    big_study_uid: str
    small_instances: int
    big_files: list[Path]
    small_bytes: int
    big_bytes: int


def base_dataset(
    sop_uid: str, study_uid: str, series_uid: str, frame_uid: str, size: int
) -> Dataset:
    """A CT Image Storage dataset without patient/study details and pixel data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyTime = ds.SeriesTime = "093000"
    ds.Modality = "CT"
    ds.Manufacturer = "dicomnode-bench"
    ds.ReferringPhysicianName = ""
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = ["0.976562", "0.976562"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def set_position(ds: Dataset, instance_number: int) -> None:
    """InstanceNumber and the slice geometry for an axial slice ``instance_number``."""
    z = -float(instance_number)
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = ["-250.0", "-250.0", f"{z:.1f}"]
    ds.SliceLocation = f"{z:.1f}"


def generate_small(directory: Path, studies: int, per_study: int, rng: np.random.Generator) -> dict:
    """``studies`` one-patient studies of ``per_study`` 64x64 CT instances each."""
    directory.mkdir(parents=True)
    first_day = date(2012, 1, 1)
    patients: dict[str, str] = {}
    total = 0
    for k in range(studies):
        patient_id = f"PAT{k:06d}"
        study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
        patients[patient_id] = study_uid
        study_date = (first_day + timedelta(days=int(rng.integers(0, 13 * 365)))).strftime("%Y%m%d")
        family = FAMILY_NAMES[k % len(FAMILY_NAMES)]
        given = GIVEN_NAMES[(k // len(FAMILY_NAMES)) % len(GIVEN_NAMES)]
        for n in range(1, per_study + 1):
            sop_uid = generate_uid()
            ds = base_dataset(sop_uid, study_uid, series_uid, frame_uid, SMALL_SIZE)
            ds.PatientName = f"{family}^{given}^{k:04d}"
            ds.PatientID = patient_id
            ds.PatientBirthDate = f"{1930 + k % 70:04d}{1 + k % 12:02d}{1 + k % 28:02d}"
            ds.PatientSex = "MF"[k % 2]
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
            ds.AccessionNumber = f"ACC{k:07d}"
            ds.StudyDescription = f"CT {('HEAD', 'CHEST', 'ABDOMEN', 'SPINE')[k % 4]}"
            ds.SeriesDescription = "Axial"
            set_position(ds, n)
            pixels = rng.integers(0, 4096, size=(SMALL_SIZE, SMALL_SIZE), dtype=np.uint16)
            ds.PixelData = pixels.astype("<u2").tobytes()
            path = directory / f"s{k:06d}_{n:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            total += path.stat().st_size
    return {"patients": patients, "small_bytes": total}


def generate_big(directory: Path, count: int, rng: np.random.Generator) -> dict:
    """One CT study (one series) of ``count`` 512x512 16-bit instances."""
    directory.mkdir(parents=True)
    grid = np.mgrid[0:BIG_SIZE, 0:BIG_SIZE].astype(np.float32)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    files = []
    total = 0
    for n in range(1, count + 1):
        sop_uid = generate_uid()
        ds = base_dataset(sop_uid, study_uid, series_uid, frame_uid, BIG_SIZE)
        ds.PatientName = "BIG^CT^STUDY"
        ds.PatientID = "BIGCT0001"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250101"
        ds.AccessionNumber = "BIGCT0001"
        ds.StudyDescription = "CT CHEST ABDOMEN PELVIS"
        ds.SeriesDescription = "Axial 1.0"
        set_position(ds, n)
        ds.PixelData = phantom_slice(float(n), rng, (grid[0], grid[1])).tobytes()
        path = directory / f"big{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
        files.append(path.name)
    return {"big_study_uid": study_uid, "big_files": files, "big_bytes": total}


def generate(root: Path, studies: int, per_study: int, big: int, seed: int) -> Corpus:
    """Generate (or reuse, when ``manifest.json`` matches the parameters) the corpus."""
    params = {
        "version": GENERATOR_VERSION,
        "studies": studies,
        "per_study": per_study,
        "big": big,
        "seed": seed,
    }
    manifest_path = root / "manifest.json"
    manifest: dict[str, Any] | None = None
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("params") != params:
            manifest = None
    if manifest is None:
        # Generate beside the final place and rename, so that a half-generated corpus is
        # never taken for a complete one.
        partial = root.with_name(f"{root.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        started = time.perf_counter()
        rng = np.random.default_rng(seed)
        manifest = {"params": params}
        manifest |= generate_small(partial / "small", studies, per_study, rng)
        manifest |= generate_big(partial / "big", big, rng)
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(root, ignore_errors=True)
        partial.rename(root)
        log(
            f"generated {studies * per_study} small and {big} large instances in "
            f"{time.perf_counter() - started:.1f} s under {root}"
        )
    return Corpus(
        root=root,
        small_dir=root / "small",
        big_dir=root / "big",
        patients=dict(manifest["patients"]),
        big_study_uid=str(manifest["big_study_uid"]),
        small_instances=studies * per_study,
        big_files=[root / "big" / name for name in manifest["big_files"]],
        small_bytes=int(manifest["small_bytes"]),
        big_bytes=int(manifest["big_bytes"]),
    )


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read files once so that loading them does not wait for the disk."""
    for path in paths:
        with path.open("rb") as fh:
            while fh.read(1 << 20):
                pass


class StowSource:
    """STOW-RS request bodies: the first ``count`` large instances under new UIDs.

    Every call of :meth:`bodies` gives the instances a new study, series and SOP
    Instance UIDs (and a new PatientID), so that each repetition stores new instances.
    """

    def __init__(self, files: Sequence[Path], count: int) -> None:
        if count > len(files):
            raise SystemExit(f"--stow-instances {count} exceeds --big-instances {len(files)}")
        self.templates = [pydicom.dcmread(path) for path in files[:count]]
        self.part_bytes = 0

    def bodies(self, batch: int, label: str) -> tuple[str, list[tuple[str, bytes]]]:
        """(StudyInstanceUID, [(Content-Type, body)]) with ``batch`` instances per body."""
        study_uid, series_uid = generate_uid(), generate_uid()
        parts = []
        for ds in self.templates:
            sop_uid = generate_uid()
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.PatientID = f"STOW-{label}"
            ds.PatientName = f"STOW^{label}"
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
            parts.append(out.getvalue())
        self.part_bytes = sum(len(p) for p in parts)
        bodies = []
        for start in range(0, len(parts), batch):
            boundary = f"bench-{uuid.uuid4().hex}"
            chunks = []
            for part in parts[start : start + batch]:
                chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
                chunks.append(part)
                chunks.append(b"\r\n")
            chunks.append(f"--{boundary}--\r\n".encode())
            content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
            bodies.append((content_type, b"".join(chunks)))
        return study_uid, bodies


# --------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------


class ServerError(RuntimeError):
    """A server failed to start or misbehaved."""


class Server(abc.ABC):
    """A DICOMweb server with a DIMSE port, run as a child process in its own session."""

    name: str = ""
    label: str = ""
    ae_title: str = ""
    start_timeout: float = 90.0

    def __init__(self, tools: Tools, workdir: Path) -> None:
        self.tools = tools
        self.workdir = workdir
        self.dimse_port = 0
        self.http_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"
        self.session = requests.Session()
        # No gzip: Orthanc compresses answers by default (HttpCompressionEnabled) when
        # asked to, dicomnode does not; both are compared on the same, uncompressed bytes.
        self.session.headers["Accept-Encoding"] = "identity"

    @property
    def root(self) -> str:
        """Base URL of the server's HTTP interface."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    @abc.abstractmethod
    def dicomweb(self) -> str:
        """Base URL of the DICOMweb services (no trailing slash)."""

    @abc.abstractmethod
    def command(self) -> list[str]:
        """Write the configuration under ``self.workdir``; return the command line."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """Whether the server answers its readiness request."""

    @abc.abstractmethod
    def problems(self) -> list[str]:
        """Error and warning lines from the server's log."""

    def env(self) -> dict[str, str]:
        """Environment of the server process."""
        return child_env()

    def after_start(self) -> None:
        """Hook run once the server answers (e.g. to get a token); nothing by default."""
        return None

    def describe(self) -> str:
        """One line about how the server runs, for the report."""
        return ""

    def version(self) -> str:
        """Version line for the report."""
        return ""

    @property
    def pid(self) -> int:
        """PID (and process group) of the server."""
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Start the server and wait until it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dimse_port, self.http_port = free_port(), free_port()
        cmd = self.command()
        with self.log_path.open("ab") as log_fh:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=self.env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with {self.proc.returncode}; log tail:\n{self.tail()}"
                )
            with contextlib.suppress(requests.RequestException):
                if self.ready():
                    self.after_start()
                    return
            time.sleep(0.2)
        raise ServerError(f"{self.name} did not answer within {self.start_timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL after 30 s."""
        self.session.close()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log(f"{self.name} ignored SIGTERM; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def alive(self) -> bool:
        """Whether the server process still runs."""
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        """Last lines of the server's log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def store(self, directory: Path) -> tuple[float, int]:
        """Send every file under ``directory`` with dcmtk storescu over one association;
        return (seconds, exit code)."""
        started = time.perf_counter()
        with (self.workdir / "storescu.log").open("ab") as log_fh:
            rc = subprocess.run(
                [
                    self.tools.storescu,
                    "-aet",
                    CALLING_AET,
                    "-aec",
                    self.ae_title,
                    "+sd",
                    "+r",
                    "-nh",
                    "127.0.0.1",
                    str(self.dimse_port),
                    str(directory),
                ],
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env(),
                check=False,
            ).returncode
        return time.perf_counter() - started, rc


class DicomnodeServer(Server):
    """``dicomnode serve --config CONFIG.toml`` with a temporary data directory."""

    name = "dicomnode"
    label = "dicomnode"
    ae_title = "DICOMNODE"

    def __init__(
        self,
        tools: Tools,
        workdir: Path,
        http_threads: int | None = None,
        analysis: bool = False,
    ) -> None:
        super().__init__(tools, workdir)
        self.http_threads = http_threads
        self.analysis = analysis
        self.config = workdir / "config.toml"
        self.data_dir = workdir / "data"

    @property
    def dicomweb(self) -> str:
        """``/dicomweb`` under the HTTP root."""
        return f"{self.root}/dicomweb"

    def command(self) -> list[str]:
        """Write ``config.toml``; return ``dicomnode serve --config config.toml``."""
        threads = f"threads = {self.http_threads}\n" if self.http_threads else ""
        self.config.write_text(
            "[node]\n"
            f'ae_title = "{self.ae_title}"\n'
            f'data_dir = "{self.data_dir}"\n'
            "[dimse]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.dimse_port}\n"
            "[http]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.http_port}\n"
            f"{threads}"
            "[logging]\n"
            'level = "WARNING"\n'
            "[analysis]\n"
            f"enabled = {str(self.analysis).lower()}\n"
        )
        return [*self.tools.dicomnode, "serve", "--config", str(self.config)]

    def env(self) -> dict[str, str]:
        """:func:`child_env` plus the snapshot's ``PYTHONPATH``, if any."""
        return child_env(self.tools.dicomnode_env)

    def ready(self) -> bool:
        """``GET /healthz`` answers 200."""
        return requests.get(f"{self.root}/healthz", timeout=2).status_code == 200

    def after_start(self) -> None:
        """Create a bearer token with ``dicomnode token create`` and put it on the session."""
        proc = subprocess.run(
            [
                *self.tools.dicomnode,
                "token",
                "create",
                "--config",
                str(self.config),
                "--scope",
                "dicomweb.read dicomweb.write",
                "--subject",
                "bench",
                "--expires",
                "2h",
            ],
            capture_output=True,
            text=True,
            env=self.env(),
            check=False,
        )
        token = proc.stdout.strip().splitlines()[-1].strip() if proc.stdout.strip() else ""
        if proc.returncode != 0 or not token:
            raise ServerError(f"dicomnode token create failed: {proc.stderr.strip()}")
        self.session.headers["Authorization"] = f"Bearer {token}"

    def describe(self) -> str:
        """How dicomnode runs."""
        how = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(self.tools.dicomnode))
        snapshot = (
            ", from a copy of the source taken at the start" if self.tools.dicomnode_env else ""
        )
        threads = self.http_threads or "default (8)"
        return (
            f"`{how} serve --config CONFIG.toml`: SQLite index and blob files in a temporary "
            f"data_dir, DIMSE and HTTP on 127.0.0.1, HTTP threads {threads}, log level "
            f"WARNING, analysis {'on' if self.analysis else 'off'} ([analysis] enabled = "
            f"{str(self.analysis).lower()}), other settings default{snapshot}; bearer token from "
            "`dicomnode token create` on every request"
        )

    def problems(self) -> list[str]:
        """JSON log lines at WARNING or worse, and other lines that look like errors."""
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").splitlines()
            bad = []
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    level = str(record.get("level", record.get("levelname", ""))).upper()
                    if level in {"WARNING", "WARN", "ERROR", "CRITICAL", "FATAL"}:
                        bad.append(line)
                elif any(k in line.lower() for k in ("traceback", "error", "exception")):
                    bad.append(line)
            return bad
        return []


class OrthancServer(Server):
    """Orthanc in the foreground with the DICOMweb plugin and a temporary configuration."""

    name = "orthanc"
    label = "Orthanc"
    ae_title = "ORTHANC"

    def __init__(self, tools: Tools, workdir: Path) -> None:
        super().__init__(tools, workdir)
        self.system: dict[str, Any] = {}
        self.plugin: dict[str, Any] = {}

    @property
    def dicomweb(self) -> str:
        """``/dicom-web`` under the HTTP root."""
        return f"{self.root}/dicom-web"

    def command(self) -> list[str]:
        """Write ``orthanc.json``; return ``Orthanc orthanc.json``."""
        storage = self.workdir / "storage"
        index = self.workdir / "index"
        tmp = self.workdir / "tmp"
        for d in (storage, index, tmp):
            d.mkdir(exist_ok=True)
        config = {
            "Name": "dicomweb-bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(index),
            "TemporaryDirectory": str(tmp),
            "Plugins": [self.tools.orthanc_plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dimse_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "SaveJobs": False,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return [self.tools.orthanc, str(path)]

    def ready(self) -> bool:
        """``GET /system`` answers and the DICOMweb plugin is loaded."""
        resp = requests.get(f"{self.root}/system", timeout=2)
        if resp.status_code != 200:
            return False
        self.system = resp.json()
        plugin = requests.get(f"{self.root}/plugins/dicom-web", timeout=2)
        if plugin.status_code != 200:
            raise ServerError(f"Orthanc's DICOMweb plugin is not loaded:\n{self.tail()}")
        self.plugin = plugin.json()
        return True

    def statistics(self) -> dict[str, Any]:
        """Orthanc's ``/statistics``."""
        resp = self.session.get(f"{self.root}/statistics", timeout=60)
        resp.raise_for_status()
        return dict(resp.json())

    def describe(self) -> str:
        """How Orthanc runs."""
        return (
            f"`Orthanc CONFIG.json` in the foreground, plugin `{self.tools.orthanc_plugin}`, "
            '`"DicomWeb": {"Enable": true, "Root": "/dicom-web/"}` (other DicomWeb options '
            "default, e.g. StudiesMetadata Full: /metadata reads every file), SQLite index, "
            "StorageCompression false and SyncStorageArea true (defaults), "
            "HttpThreadsCount default (50), AuthenticationEnabled false, "
            "RemoteAccessAllowed false"
        )

    def version(self) -> str:
        """Orthanc and plugin versions as the server reports them."""
        return (
            f"Orthanc {self.system.get('Version', '?')} (DB schema "
            f"{self.system.get('DatabaseVersion', '?')}), DICOMweb plugin "
            f"{self.plugin.get('Version', '?')}"
        )

    def problems(self) -> list[str]:
        """Orthanc error lines (``E`` prefix), and warning lines (``W``; Orthanc logs its
        start-up and shut-down messages at that level) that mention an error or failure."""
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").splitlines()
            return [
                line
                for line in lines
                if re.match(r"^E\d{4} ", line)
                or (re.match(r"^W\d{4} ", line) and re.search(r"(?i)error|fail|exception", line))
            ]
        return []


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One timed repetition of one measure on one server."""

    seconds: float
    #: Response body bytes (requests) or bytes sent (STOW).
    nbytes: int
    #: Items the answer held (studies, parts, instances); -1 when not counted.
    items: int
    ok: bool
    note: str = ""


@dataclass
class Block:
    """All repetitions of one measure on one server, and the CPU used meanwhile."""

    measure: str
    server: str
    samples: list[Sample] = field(default_factory=list)
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    wall_s: float = 0.0
    warmup: str = ""
    #: Repetitions measured again because other processes disturbed them.
    retries: int = 0


@dataclass(frozen=True)
class MeasureSpec:
    """How to describe a measure in the report."""

    title: str
    kind: str  # "latency" or "throughput"
    unit: str
    expected: str


def describe_tags(tags: set[str]) -> str:
    """``{"00100010"}`` -> ``"PatientName (00100010)"``, sorted; ``"none"`` if empty."""
    if not tags:
        return "none"
    names = []
    for tag in sorted(tags):
        try:
            keyword = keyword_for_tag(int(tag, 16))
        except ValueError:
            keyword = ""
        names.append(f"{keyword or '?'} ({tag})")
    return ", ".join(names)


def strip_bulk(value: Any) -> Any:
    """A DICOM JSON attribute without BulkDataURI/InlineBinary (which legitimately differ)."""
    if isinstance(value, dict):
        return {
            k: strip_bulk(v) for k, v in value.items() if k not in ("BulkDataURI", "InlineBinary")
        }
    if isinstance(value, list):
        return [strip_bulk(v) for v in value]
    return value


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def multipart_bodies(body: bytes, content_type: str) -> list[bytes] | None:
    """The part bodies of a multipart/related message (RFC 2046), or None without a
    boundary parameter."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        return None
    delimiter = b"--" + match.group(1).encode()
    pieces = body.split(b"\r\n" + delimiter)
    # The first piece starts with the first delimiter itself (no CRLF before it).
    pieces[0] = pieces[0].removeprefix(delimiter)
    parts = []
    for piece in pieces:
        if piece.startswith(b"--"):  # close delimiter
            break
        _, sep, content = piece.partition(b"\r\n\r\n")
        if sep:
            parts.append(content)
    return parts


def dataset_digest(data: bytes) -> tuple[str, str, str, str]:
    """(SOPInstanceUID, SHA-1 of the pixel data, SHA-1 of the bytes after the file meta
    group, "Modality SOP class name") of a Part 10 file.

    Servers that received an instance by C-STORE write their own file meta information,
    so whole files differ; the data set that follows it should not.
    """
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    pixels = hashlib.sha1(ds.get("PixelData", b"") or b"").hexdigest()
    meta_end = 132
    if data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00":
        # (0002,0000) UL FileMetaInformationGroupLength: 12-byte element, then the group.
        meta_end = 144 + int.from_bytes(data[140:144], "little")
    sop_class = getattr(ds.get("SOPClassUID"), "name", "?")
    kind = f"{ds.get('Modality', '?')} {sop_class}"
    return str(ds.SOPInstanceUID), pixels, hashlib.sha1(data[meta_end:]).hexdigest(), kind


class Bench:
    """The timed measurements over a set of running servers."""

    def __init__(
        self,
        corpus: Corpus,
        servers: list[Server],
        args: argparse.Namespace,
        py_spy: str | None = None,
    ) -> None:
        self.corpus = corpus
        self.servers = servers
        self.args = args
        self.py_spy = py_spy
        #: Studies each server holds beyond the corpus (STOW-RS runs and warm-ups).
        self.extra_studies: dict[str, int] = {s.name: 0 for s in servers}
        self.blocks: list[Block] = []
        self.problems: list[str] = []
        self.rng = random.Random(args.seed)
        self.stow_source: StowSource | None = None
        self.stow_studies: dict[str, list[str]] = {s.name: [] for s in servers}
        self.big_digests: dict[str, tuple[str, str, str, str]] | None = None
        #: Body length of each server's warm-up WADO-RS answer.
        self.wado_bytes: dict[str, int] = {}
        self._big_sops: set[str] | None = None
        #: Last parsed answer per (measure, server), for comparing the servers' answers.
        self.answers: dict[tuple[str, str], Any] = {}

    # ---- individual requests ---------------------------------------------------------

    def qido(self, server: Server, params: dict[str, str]) -> tuple[float, requests.Response]:
        """Timed ``GET /studies?params`` (whole body read)."""
        started = time.perf_counter()
        resp = server.session.get(
            f"{server.dicomweb}/studies",
            params=params,
            headers={"Accept": DICOM_JSON},
            timeout=120,
        )
        _ = resp.content
        return time.perf_counter() - started, resp

    def qido_patient(self, server: Server, patient_id: str) -> Sample:
        """QIDO-RS study search by PatientID; exactly the patient's one study must come back."""
        seconds, resp = self.qido(server, {"PatientID": patient_id})
        expected = self.corpus.patients[patient_id]
        if resp.status_code != 200:
            return Sample(seconds, len(resp.content), -1, False, f"HTTP {resp.status_code}")
        body = resp.json()
        self.answers[("qido_patient", server.name)] = body
        uids = [item.get("0020000D", {}).get("Value", [None])[0] for item in body]
        ok = uids == [expected]
        note = "" if ok else f"PatientID={patient_id}: got {uids[:3]}, wanted [{expected}]"
        return Sample(seconds, len(resp.content), len(body), ok, note)

    def qido_all(self, server: Server) -> Sample:
        """QIDO-RS study search with no filter and ``limit=100``."""
        seconds, resp = self.qido(server, {"limit": str(self.args.qido_limit)})
        if resp.status_code != 200:
            return Sample(seconds, len(resp.content), -1, False, f"HTTP {resp.status_code}")
        body = resp.json()
        self.answers[("qido_all", server.name)] = body
        held = len(self.corpus.patients) + 1 + self.extra_studies[server.name]
        wanted = min(self.args.qido_limit, held)
        distinct = len({item.get("0020000D", {}).get("Value", [None])[0] for item in body})
        ok = len(body) == wanted == distinct
        note = "" if ok else f"{len(body)} studies ({distinct} distinct), wanted {wanted}"
        return Sample(seconds, len(resp.content), len(body), ok, note)

    def wado(self, server: Server, validate: bool = False) -> Sample:
        """WADO-RS retrieval of the large study, as stored, reading the whole body.

        With ``validate`` the body is kept and its parts counted (untimed warm-up);
        otherwise it is read in 1 MiB chunks and only its length kept.
        """
        url = f"{server.dicomweb}/studies/{self.corpus.big_study_uid}"
        started = time.perf_counter()
        with server.session.get(
            url, headers={"Accept": WADO_ACCEPT}, stream=True, timeout=600
        ) as resp:
            if validate:
                body = resp.content
                nbytes = len(body)
            else:
                nbytes = 0
                for chunk in resp.iter_content(chunk_size=1 << 20):
                    nbytes += len(chunk)
            seconds = time.perf_counter() - started
            status, content_type = resp.status_code, resp.headers.get("Content-Type", "")
        if status != 200:
            return Sample(seconds, nbytes, -1, False, f"HTTP {status}")
        expected = len(self.corpus.big_files)
        if not validate:
            # The warm-up checked the content; the same answer must come back (the
            # boundary may differ, so allow a little slack per part).
            warm = self.wado_bytes.get(server.name, nbytes)
            ok = abs(nbytes - warm) <= 100 * expected
            note = "" if ok else f"{nbytes} bytes, warm-up answer had {warm}"
            return Sample(seconds, nbytes, -1, ok, note)
        bodies = multipart_bodies(body, content_type) or []
        if self.big_digests is None:
            self.big_digests = {
                d[0]: d for d in (dataset_digest(p.read_bytes()) for p in self.corpus.big_files)
            }
        self.wado_bytes[server.name] = nbytes
        sent = self.big_digests
        got = {d[0]: d for d in (dataset_digest(b) for b in bodies)}
        common = set(got) & set(sent)
        extra = sorted(set(got) - set(sent))
        missing = len(set(sent) - set(got))
        pixels_differ = sum(1 for k in common if got[k][1] != sent[k][1])
        bytes_differ = sum(1 for k in common if got[k][2] != sent[k][2])
        ok = len(bodies) == len(got) == expected and not extra and not missing
        ok = ok and pixels_differ == 0
        verdict = f"{len(common)} of the {expected} instances sent"
        if bytes_differ == 0:
            verdict += " (data sets byte-identical to the files)"
        else:
            verdict += f" ({bytes_differ} with other data set bytes, {pixels_differ} other pixels)"
        if missing:
            verdict += f", {missing} missing"
        if extra:
            kinds = Counter(got[k][3] for k in extra)
            verdict += f", {len(extra)} other: " + ", ".join(f"{n}x {k}" for k, n in kinds.items())
        note = f"{len(bodies)} parts: {verdict}; {nbytes} bytes"
        return Sample(seconds, nbytes, len(bodies), ok, note)

    def metadata(self, server: Server) -> Sample:
        """WADO-RS ``/metadata`` of the large study (whole body read, then checked)."""
        url = f"{server.dicomweb}/studies/{self.corpus.big_study_uid}/metadata"
        started = time.perf_counter()
        resp = server.session.get(url, headers={"Accept": DICOM_JSON}, timeout=600)
        _ = resp.content
        seconds = time.perf_counter() - started
        if resp.status_code != 200:
            return Sample(seconds, len(resp.content), -1, False, f"HTTP {resp.status_code}")
        body = resp.json()
        sops = {item.get("00080018", {}).get("Value", [None])[0] for item in body}
        studies = {item.get("0020000D", {}).get("Value", [None])[0] for item in body}
        sent = self.big_sops()
        expected = len(sent)
        ok = len(body) == expected and sops == sent
        ok = ok and studies == {self.corpus.big_study_uid}
        attrs = statistics.median(len(item) for item in body) if body else 0
        note = f"{len(body)} instances, median {attrs:.0f} attributes each"
        if sops != sent:
            extra = [i for i in body if i.get("00080018", {}).get("Value", [None])[0] not in sent]
            kinds = Counter(str(i.get("00080060", {}).get("Value", ["?"])[0]) for i in extra)
            note += (
                f"; {len(sent - sops)} of those sent missing, {len(extra)} other ("
                + ", ".join(f"{n}x {k}" for k, n in kinds.items())
                + ")"
            )
        self.answers[("metadata", server.name)] = body
        return Sample(seconds, len(resp.content), len(body), ok, note)

    def big_sops(self) -> set[str]:
        """SOP Instance UIDs of the large study's files."""
        if self._big_sops is None:
            self._big_sops = {
                str(pydicom.dcmread(p, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
                for p in self.corpus.big_files
            }
        return self._big_sops

    def stow(self, server: Server, label: str) -> Sample:
        """STOW-RS of the STOW instances under new UIDs (:meth:`stow_prepare`,
        :meth:`stow_send`, :meth:`stow_check` in one go)."""
        study_uid, bodies = self.stow_prepare(label)
        seconds, responses = self.stow_send(server, bodies)
        return self.stow_check(server, study_uid, seconds, responses)

    def stow_prepare(self, label: str) -> tuple[str, list[tuple[str, bytes]]]:
        """(StudyInstanceUID, request bodies) of the STOW instances under new UIDs, in
        batches of ``--stow-batch`` (built before the clock starts)."""
        if self.stow_source is None:
            self.stow_source = StowSource(self.corpus.big_files, self.args.stow_instances)
        return self.stow_source.bodies(self.args.stow_batch, label)

    def stow_send(
        self, server: Server, bodies: list[tuple[str, bytes]]
    ) -> tuple[float, list[requests.Response]]:
        """POST every body to ``/studies``, one after the other; (seconds, responses)."""
        responses = []
        started = time.perf_counter()
        for content_type, body in bodies:
            resp = server.session.post(
                f"{server.dicomweb}/studies",
                data=body,
                headers={"Content-Type": content_type, "Accept": DICOM_JSON},
                timeout=600,
            )
            _ = resp.content
            responses.append(resp)
        return time.perf_counter() - started, responses

    def stow_check(
        self, server: Server, study_uid: str, seconds: float, responses: list[requests.Response]
    ) -> Sample:
        """Check each STOW answer's status and ReferencedSOPSequence, and that a QIDO-RS
        search for the new study's instances finds them all."""
        assert self.stow_source is not None
        sent = self.args.stow_instances
        referenced = failed = 0
        notes = []
        for resp in responses:
            if resp.status_code != 200:
                notes.append(f"HTTP {resp.status_code}: {resp.text[:200]}")
            with contextlib.suppress(ValueError):
                answer = resp.json()
                referenced += len(answer.get("00081199", {}).get("Value", []))
                failed += len(answer.get("00081198", {}).get("Value", []))
        self.stow_studies[server.name].append(study_uid)
        self.extra_studies[server.name] += 1
        found = server.session.get(
            f"{server.dicomweb}/studies/{study_uid}/instances",
            headers={"Accept": DICOM_JSON},
            timeout=120,
        )
        stored = len(found.json()) if found.status_code == 200 else -1
        ok = not notes and referenced == sent and failed == 0 and stored == sent
        if not ok:
            notes.append(f"referenced {referenced}, failed {failed}, found {stored} of {sent}")
        return Sample(seconds, self.stow_source.part_bytes, stored, ok, "; ".join(notes[:3]))

    # ---- blocks ------------------------------------------------------------------------

    def run_measure(self, measure: str, repeats: int) -> None:
        """Warm up, then time ``repeats`` repetitions on every server, alternating which
        server goes first; CPU is accounted per server over the whole measure."""
        servers = self.servers
        ops: dict[str, Callable[[Server, int], Sample]] = {
            "qido_patient": lambda s, i: self.qido_patient(s, patient_ids[i]),
            "qido_all": lambda s, i: self.qido_all(s),
            "wado": lambda s, i: self.wado(s),
            "metadata": lambda s, i: self.metadata(s),
        }
        patient_ids = self.rng.sample(
            sorted(self.corpus.patients), k=min(repeats + 1, len(self.corpus.patients))
        )
        while len(patient_ids) < repeats + 1:
            patient_ids.append(self.rng.choice(sorted(self.corpus.patients)))
        blocks = {s.name: Block(measure, s.name) for s in servers}
        # Untimed warm-up, also the most thorough check of the answer.
        for server in servers:
            if measure == "wado":
                warm = self.wado(server, validate=True)
            elif measure == "stow":
                warm = self.stow(server, "warmup")
            else:
                warm = ops[measure](server, repeats)
            blocks[server.name].warmup = warm.note or f"{warm.items} items"
            if not warm.ok:
                self.problems.append(f"{server.label} {measure} warm-up: {warm.note}")
        wait_for_idle_cpu(self.args.quiet_cores, self.args.quiet_block_timeout)
        meters = {s.name: CpuMeter({x.name: x.pid for x in servers}) for s in servers}
        failures: dict[tuple[str, str], list[int]] = {}
        for rep in range(repeats):
            order = servers if rep % 2 == 0 else list(reversed(servers))
            for server in order:
                meter = meters[server.name]
                block = blocks[server.name]
                for attempt in range(self.args.disturbed_retries + 1):
                    if measure == "stow":
                        # Only the POSTs are timed and metered, not building or checking.
                        label = f"{rep + 1:02d}" + (f"r{attempt}" if attempt else "")
                        study_uid, bodies = self.stow_prepare(label)
                        meter.start()
                        seconds, responses = self.stow_send(server, bodies)
                        other, by_server, client, wall = meter.stop()
                        sample = self.stow_check(server, study_uid, seconds, responses)
                    else:
                        meter.start()
                        sample = ops[measure](server, rep)
                        other, by_server, client, wall = meter.stop()
                    # Everything but this server and this script, the other server included.
                    other += sum(v for n, v in by_server.items() if n != server.name)
                    # 10 ms clock ticks: a few ticks of noise are not a disturbance.
                    limit = max(self.args.max_other * wall, 0.05)
                    if other <= limit or attempt == self.args.disturbed_retries:
                        break
                    block.retries += 1
                    log(
                        f"  {measure} {server.name} repetition {rep + 1} disturbed (other "
                        f"processes used {other:.2f} CPU s in {wall:.2f} s); repeating it"
                    )
                block.samples.append(sample)
                block.server_cpu_s += by_server[server.name]
                block.client_cpu_s += client
                block.other_cpu_s += other
                block.wall_s += wall
                if not sample.ok:
                    failures.setdefault((server.label, sample.note), []).append(rep + 1)
        for (label, note), reps in failures.items():
            self.problems.append(
                f"{label} {measure}, repetition(s) {', '.join(map(str, reps))} of {repeats}: {note}"
            )
        for server in servers:
            block = blocks[server.name]
            self.blocks.append(block)
            secs = [s.seconds for s in block.samples]
            log(
                f"{measure:12s} {server.name:9s} median {statistics.median(secs) * 1e3:9.1f} ms"
                f"  p95 {percentile(secs, 95) * 1e3:9.1f} ms  ({len(secs)} runs, other CPU "
                f"{block.other_cpu_s:.2f} s)"
            )

    def compare_answers(self) -> list[str]:
        """How the two servers' answers differ (attributes returned; metadata values of one
        instance), for the report. Differences are not necessarily errors."""
        out: list[str] = []
        names = [s.name for s in self.servers]
        if len(names) != 2:
            return out
        a, b = names
        for measure in ("qido_patient", "qido_all"):
            left, right = self.answers.get((measure, a)), self.answers.get((measure, b))
            if not left or not right:
                continue
            keys_a = {k for item in left for k in item}
            keys_b = {k for item in right for k in item}
            out.append(
                f"{measure}: {a} returns {len(keys_a)} attributes, {b} {len(keys_b)}; only "
                f"{a}: {describe_tags(keys_a - keys_b)}; only {b}: "
                f"{describe_tags(keys_b - keys_a)}"
            )
        left, right = self.answers.get(("metadata", a)), self.answers.get(("metadata", b))
        if left and right:

            def by_sop(body: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
                return {i.get("00080018", {}).get("Value", [""])[0]: i for i in body}

            sop_a, sop_b = by_sop(left), by_sop(right)
            common = sorted(set(sop_a) & set(sop_b))
            if common:
                x, y = sop_a[common[0]], sop_b[common[0]]
                differing = sorted(
                    k for k in set(x) & set(y) if strip_bulk(x[k]) != strip_bulk(y[k])
                )
                examples = "; ".join(
                    f"{k}: {json.dumps(x[k])[:80]} vs {json.dumps(y[k])[:80]}"
                    for k in differing[:4]
                )
                out.append(
                    f"metadata of one instance: {a} {len(x)} attributes, {b} {len(y)}; only "
                    f"{a}: {describe_tags(set(x) - set(y))}; only {b}: "
                    f"{describe_tags(set(y) - set(x))}; values differ (BulkDataURI and "
                    f"InlineBinary ignored) in {len(differing)}"
                    + (f", e.g. {examples}" if examples else "")
                )
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """Studies (QIDO-RS, paged with limit/offset) and large-study instances per server."""
        out: dict[str, dict[str, int]] = {}
        for server in self.servers:
            studies = 0
            uids: set[str] = set()
            page = 500
            while True:
                resp = server.session.get(
                    f"{server.dicomweb}/studies",
                    params={"limit": str(page), "offset": str(studies)},
                    headers={"Accept": DICOM_JSON},
                    timeout=300,
                )
                resp.raise_for_status()
                body = resp.json() if resp.content.strip() else []
                uids |= {item.get("0020000D", {}).get("Value", [""])[0] for item in body}
                studies += len(body)
                if len(body) < page:
                    break
            if len(uids) != studies:
                self.problems.append(
                    f"{server.label}: paging /studies with limit/offset gave {studies} "
                    f"studies but only {len(uids)} distinct StudyInstanceUIDs"
                )
            resp = server.session.get(
                f"{server.dicomweb}/studies/{self.corpus.big_study_uid}/instances",
                headers={"Accept": DICOM_JSON},
                timeout=300,
            )
            resp.raise_for_status()
            out[server.name] = {"studies": studies, "big_instances": len(resp.json())}
            if isinstance(server, OrthancServer):
                stats = server.statistics()
                out[server.name]["orthanc_studies"] = int(stats["CountStudies"])
                out[server.name]["orthanc_instances"] = int(stats["CountInstances"])
        return out


# --------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------


#: Innermost functions of threads waiting, which py-spy does not always see as idle.
_IDLE_FUNCTIONS = {
    "Condition.wait (threading.py)",
    "Event.wait (threading.py)",
    "Thread.join (threading.py)",
    "Thread._wait_for_tstate_lock (threading.py)",
    "_PollLikeSelector.select (selectors.py)",
    "SelectSelector.select (selectors.py)",
    "poll (waitress/wasyncore.py)",
    "socket.accept (socket.py)",
}
#: Source of an innermost line that blocks or sleeps: such samples are idle, not work.
_IDLE_SOURCE = re.compile(r"\bsleep\(|\.wait\(|\bselect\(|\.poll\(|\.accept\(|\.acquire\(")
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
#: Thread start-up frames present in every sample; left out.
_STARTUP = {
    "Thread._bootstrap (threading.py)",
    "Thread._bootstrap_inner (threading.py)",
    "Thread.run (threading.py)",
}
#: Request plumbing (HTTP server, WSGI framework) on the stack of every request: left
#: out of the inclusive table, which would otherwise start with ten frames at ~100 %.
_PLUMBING = re.compile(r"\((waitress|flask|werkzeug)/")


@dataclass
class Profile:
    """Summary of py-spy collapsed stacks (percentages of the busy samples)."""

    what: str
    requests: int
    seconds: float
    busy: int
    idle: int
    inclusive: list[tuple[str, float, float]]
    by_self: list[tuple[str, float, float]]
    raw: Path


def _short_file(file: str) -> str:
    """``.../site-packages/pkg/mod.py`` -> ``pkg/mod.py``; the snapshot's paths likewise."""
    for marker in ("site-packages/", "/dicomnode/"):
        if marker in file:
            rest = file.split(marker, 1)[1]
            return rest if marker == "site-packages/" else f"dicomnode/{rest}"
    return Path(file).name if file.startswith("/") and "/lib/python" in file else file


def _is_idle_line(file: str, line: int, search_paths: Sequence[str]) -> bool:
    """Whether ``file:line`` (py-spy names files relative to their ``sys.path`` entry)
    is a call that blocks or sleeps."""
    for base in (*search_paths, *sys.path):
        path = os.path.join(base, file)
        if os.path.isfile(path):
            return bool(_IDLE_SOURCE.search(linecache.getline(path, line)))
    return False


def summarize_collapsed(
    raw: Path, what: str, requests_done: int, seconds: float, search_paths: Sequence[str] = ()
) -> Profile:
    """Hottest functions (inclusive and self) in py-spy's raw collapsed stacks.

    Samples whose innermost frame waits (a known waiting function, or a source line
    calling sleep/wait/select/accept/acquire) count as idle and are dropped.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    idle_lines: dict[tuple[str, int], bool] = {}
    busy = idle = 0
    for text in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = text.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames: list[str] = []
        leaf: tuple[str, int] | None = None
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            if frame.startswith(("process ", "thread ")) or match is None:
                continue
            name = f"{match['name']} ({_short_file(match['file'])})"
            if name in _STARTUP:
                continue
            frames.append(name)
            leaf = (match["file"], int(match["line"])) if match["line"] else None
        if leaf is not None and leaf not in idle_lines:
            idle_lines[leaf] = _is_idle_line(leaf[0], leaf[1], search_paths)
        if not frames or frames[-1] in _IDLE_FUNCTIONS or (leaf and idle_lines[leaf]):
            idle += count
            continue
        busy += count
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
    rows = [
        (fn, 100.0 * n / max(busy, 1), 100.0 * own[fn] / max(busy, 1))
        for fn, n in inclusive.items()
    ]
    by_self = sorted(rows, key=lambda r: (-r[2], -r[1]))[:12]
    rows = [r for r in rows if not _PLUMBING.search(r[0])]
    rows.sort(key=lambda r: (-r[1], -r[2]))
    return Profile(what, requests_done, seconds, busy, idle, rows[:15], by_self, raw)


def profile_dicomnode(bench: Bench, server: DicomnodeServer, out_dir: Path) -> list[Profile]:
    """py-spy ``record`` dicomnode while metadata and QIDO requests run (untimed)."""
    if bench.py_spy is None:
        log("py-spy not found; no profile (pip install py-spy)")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    patients = sorted(bench.corpus.patients)
    runs: list[tuple[str, Callable[[int], Sample]]] = [
        ("metadata", lambda i: bench.metadata(server)),
        ("qido_patient", lambda i: bench.qido_patient(server, patients[i % len(patients)])),
        ("qido_all", lambda i: bench.qido_all(server)),
    ]
    profiles = []
    for what, op in runs:
        raw = out_dir / f"{what}.txt"
        raw.unlink(missing_ok=True)
        spy = subprocess.Popen(
            [
                bench.py_spy,
                "record",
                "--format",
                "raw",
                "-r",
                str(PROFILE_RATE),
                "-p",
                str(server.pid),
                "-o",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=(out_dir / f"{what}.py-spy.log").open("wb"),
        )
        time.sleep(1.5)  # let py-spy attach
        started = time.monotonic()
        done = 0
        while time.monotonic() - started < bench.args.profile_seconds or done < 2:
            op(done)
            done += 1
        seconds = time.monotonic() - started
        time.sleep(0.3)
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
        if raw.exists():
            snapshot = server.tools.dicomnode_env.get("PYTHONPATH", "")
            profiles.append(summarize_collapsed(raw, what, done, seconds, [snapshot]))
            log(f"profiled {what}: {done} requests in {seconds:.1f} s -> {raw}")
        else:
            log(f"py-spy wrote no profile for {what}; see {out_dir / (what + '.py-spy.log')}")
    return profiles


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def measure_specs(args: argparse.Namespace, corpus: Corpus) -> dict[str, MeasureSpec]:
    """Titles, kinds and expected answers of the measures."""
    big = len(corpus.big_files)
    return {
        "qido_patient": MeasureSpec(
            "QIDO-RS /studies?PatientID=X (1 match)", "latency", "ms", "1 study"
        ),
        "qido_all": MeasureSpec(
            f"QIDO-RS /studies?limit={args.qido_limit} (no filter)",
            "latency",
            "ms",
            f"{args.qido_limit} studies",
        ),
        "wado": MeasureSpec(
            f"WADO-RS /studies/{{big}} ({big} instances, as stored)",
            "throughput",
            "MB/s",
            f"{big} parts",
        ),
        "metadata": MeasureSpec(
            f"WADO-RS /studies/{{big}}/metadata ({big} instances)",
            "latency",
            "ms",
            f"{big} instances",
        ),
        "stow": MeasureSpec(
            f"STOW-RS {args.stow_instances} CT 512x512, {args.stow_batch}/request",
            "throughput",
            "instances/s",
            f"{args.stow_instances} stored",
        ),
    }


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds with sensible precision."""
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def render_report(
    info: dict[str, str],
    args: argparse.Namespace,
    corpus: Corpus,
    servers: list[Server],
    bench: Bench,
    extra: dict[str, Any],
    profiles: list[Profile],
) -> str:
    """Markdown section for one run."""
    specs = measure_specs(args, corpus)
    by_key = {(b.measure, b.server): b for b in bench.blocks}
    orthanc = next((s for s in servers if isinstance(s, OrthancServer)), None)
    lines = [
        f"## DICOMweb benchmark, run of {info['date']}",
        "",
        "Produced by `bench/dicomweb.py`; see `bench/README.md`.",
        "",
        "### Machine",
        "",
        f"- nproc: {info['nproc']}; CPU: {info['cpu']}; RAM: {info['ram']}; kernel "
        f"{info['kernel']}",
        f"- Python {info['python']}, pydicom {info['pydicom']}, requests {info['requests']}, "
        f"waitress {info['waitress']}",
        f"- dicomnode {info['dicomnode']}",
        f"- {orthanc.version() if orthanc else 'Orthanc not run'} (Debian packages orthanc "
        f"{info['orthanc_deb']}, orthanc-dicomweb {info['plugin_deb']}); dcmtk {info['dcmtk']}",
        f"- 1-minute load average: {extra['load_start']:.2f} when the timed runs started "
        f"(after waiting {extra['waited']:.0f} s for no `store_ingest.py` and a load below "
        f"{args.max_load}), {extra['load_end']:.2f} at the end",
        "",
        "### Method",
        "",
        f"- Archive, generated into `{args.work_dir}` and loaded into both servers with dcmtk "
        "`/usr/bin/storescu -aet BENCH -aec AET +sd +r -nh 127.0.0.1 PORT DIR` "
        f"(one association, `TCP_NODELAY=1`): {len(corpus.patients)} studies x "
        f"{args.instances_per_study} CT instances of {SMALL_SIZE}x{SMALL_SIZE} "
        f"({corpus.small_bytes / 1e6:.1f} MB), one patient per study with distinct PatientID, "
        "varied PatientName/StudyDate; plus one CT study (one series) of "
        f"{len(corpus.big_files)} instances of {BIG_SIZE}x{BIG_SIZE}, 16-bit, Explicit VR "
        f"Little Endian ({corpus.big_bytes / 1e6:.1f} MB, "
        f"{corpus.big_bytes / len(corpus.big_files) / 1e3:.1f} kB per file).",
        "- Load (C-STORE, informational, machine not checked for quiet): "
        + "; ".join(f"{name} {secs:.1f} s" for name, secs in extra["load_seconds"].items())
        + ".",
        "- Counts after loading (QIDO-RS /studies paged with limit/offset; "
        "/studies/{big}/instances): "
        + "; ".join(
            f"{name}: {c['studies']} studies, {c['big_instances']} instances in the big study"
            + (
                f" (/statistics: {c['orthanc_studies']} studies, {c['orthanc_instances']} "
                "instances)"
                if "orthanc_studies" in c
                else ""
            )
            for name, c in extra["counts"].items()
        )
        + f"; expected {len(corpus.patients) + 1} studies.",
        "- Servers, both running throughout with the whole archive loaded, over HTTP/1.1 on "
        "127.0.0.1:",
    ]
    lines += [f"  - {s.label}: {s.describe()}" for s in servers]
    lines += [
        "- Client: this script, one `requests.Session` (keep-alive) per server, on the same "
        "2 cores as the server; `Accept-Encoding: identity` (no gzip: Orthanc would compress "
        "answers by default when asked, dicomnode does not). Each measure: one untimed "
        "warm-up request per server (its answer checked in full), then the repetitions, "
        "alternating which server goes first; "
        "wall-clock time from sending the request to having read the whole response body. "
        "Before each measure the script waits until the machine is idle (other CPU < "
        f"{args.quiet_cores} cores) and no `store_ingest.py` runs.",
        f"- QIDO-RS: {args.qido_repeats} repetitions each; PatientID search with a different "
        "random patient per repetition (the same sequence for both servers), answer must be "
        f"exactly that patient's study; `limit={args.qido_limit}` answer must hold "
        f"{args.qido_limit} studies. Accept: `application/dicom+json`. No wildcards "
        "(Orthanc's DICOMweb 1.7 does not decode `%2A` in query strings).",
        f"- WADO-RS: {args.repeats} repetitions; `GET /studies/{{big}}` with Accept "
        f"`{WADO_ACCEPT}`, body read with `iter_content(1 MiB)`; MB/s = body bytes / 10^6 / "
        "seconds. The warm-up answer is parsed: its parts must be the instances sent, with "
        "the same pixel data (each part's SOP Instance UID, SHA-1 of the pixel data and of "
        "the data set after the file meta group compared with the files); the timed answers "
        "must have the warm-up answer's length.",
        f"- Metadata: {args.repeats} repetitions; `GET /studies/{{big}}/metadata`, Accept "
        "`application/dicom+json`; every answer parsed afterwards and checked to hold every "
        "instance of the study once.",
        f"- STOW-RS: {args.repeats} repetitions; the first {args.stow_instances} instances "
        "of the big study re-encoded under a new study/series/SOP Instance UID and PatientID "
        "for every repetition (bodies built before the clock starts), POSTed to `/studies` as "
        f'`multipart/related; type="application/dicom"` with {args.stow_batch} instance(s) '
        "per request; instances/s = instances / seconds. Afterwards the answers' "
        "ReferencedSOPSequence and a QIDO-RS `/studies/{new}/instances` must list all of them. "
        "Both servers fsync each stored file (Orthanc's SyncStorageArea default, dicomnode "
        "always).",
        "- CPU: user+system seconds of the server's process group, of this script, and of "
        "everything else (machine total minus those and kernel threads; the other server "
        "counts as else), summed over the timed repetitions. A repetition during which "
        f"everything else used more than {args.max_other} cores on average (and over 0.05 "
        f"CPU s) is measured again, at most {args.disturbed_retries} times (column "
        "'repeated'); the last attempt counts.",
        "",
        "### Results",
        "",
        "Latency medians (p95) in ms; throughput medians. Ratio = dicomnode / Orthanc of "
        "the medians (of time for latency, of rate for throughput).",
        "",
        "| measure | dicomnode | Orthanc | ratio dicomnode/Orthanc | faster |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    detail_lines = []
    for measure in MEASURES:
        node, ref = by_key.get((measure, "dicomnode")), by_key.get((measure, "orthanc"))
        if node is None and ref is None:
            continue
        spec = specs[measure]

        def cell(block: Block | None, spec: MeasureSpec = spec, measure: str = measure) -> str:
            if block is None or not block.samples:
                return "n/a"
            secs = [s.seconds for s in block.samples]
            if spec.kind == "latency":
                text = fmt_ms(statistics.median(secs))
                if measure.startswith("qido"):
                    text += f" ({fmt_ms(percentile(secs, 95))})"
                return text
            return f"{rate(block, measure):.0f} {spec.unit} ({statistics.median(secs):.2f} s)"

        ratio_text = faster = "n/a"
        if node is not None and ref is not None and node.samples and ref.samples:
            if spec.kind == "latency":
                ratio = statistics.median(s.seconds for s in node.samples) / statistics.median(
                    s.seconds for s in ref.samples
                )
            else:
                ratio = rate(node, measure) / rate(ref, measure)
            ratio_text = f"{ratio:.2f}"
            slower_by = ratio if spec.kind == "latency" else 1 / ratio
            if abs(slower_by - 1) < 0.05:
                faster = "about equal"
            elif slower_by > 1:
                faster = f"Orthanc, {slower_by:.1f}x"
            else:
                faster = f"dicomnode, {1 / slower_by:.1f}x"
        lines.append(f"| {spec.title} | {cell(node)} | {cell(ref)} | {ratio_text} | {faster} |")
        for block in (node, ref):
            if block is None or not block.samples:
                continue
            n = len(block.samples)
            secs = [s.seconds for s in block.samples]
            size = statistics.median(s.nbytes for s in block.samples)
            ok = sum(1 for s in block.samples if s.ok)
            detail_lines.append(
                f"| {spec.title} | {block.server} | {n} | {fmt_ms(min(secs))} / "
                f"{fmt_ms(statistics.median(secs))} / {fmt_ms(max(secs))} | "
                f"{size / 1e3:,.1f} | {block.server_cpu_s / n:.3f} | "
                f"{block.client_cpu_s / n:.3f} | {max(block.other_cpu_s, 0.0):.2f} | "
                f"{block.retries} | {ok}/{n} | "
                f"{block.warmup[:200]} |"
            )
    lines += [
        "",
        "Details: time min / median / max in ms, response (or, for STOW, request) size in kB, "
        "CPU seconds per repetition of the server and of the client, other CPU seconds over "
        "the kept repetitions, repetitions measured again because they were disturbed, "
        "repetitions whose answer checked out, and the warm-up answer.",
        "",
        "| measure | server | runs | min / median / max ms | kB | server CPU s | client CPU s "
        "| other CPU s | repeated | correct | warm-up answer |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *detail_lines,
    ]
    if extra.get("comparison"):
        lines += ["", "### How the answers differ (last answers of each measure)", ""]
        lines += [f"- {c}" for c in extra["comparison"]]
    lines += ["", "### Problems", ""]
    problems = list(bench.problems)
    for server in servers:
        found = extra.get("server_problems", {}).get(server.label, [])
        if found:
            problems.append(f"{server.label} log: {len(found)} warning/error line(s), e.g.:")
            problems += [f"  `{p[:300]}`" for p in found[:5]]
    problems += extra.get("notes", [])
    if problems:
        lines += [p if p.startswith("  ") else f"- {p}" for p in problems]
    else:
        lines.append(
            "None: every answer checked out (counts, UIDs, parts), no warning or error lines "
            "in either server's log."
        )
    for profile in profiles:
        lines += [
            "",
            f"### dicomnode profile: {profile.what} (py-spy, untimed)",
            "",
            f"`py-spy record --format raw -r {PROFILE_RATE} -p PID` over {profile.requests} "
            f"requests in {profile.seconds:.1f} s ({profile.seconds / profile.requests * 1e3:.0f}"
            f" ms per request under the profiler); {profile.busy} busy samples, "
            f"{profile.idle} waiting samples dropped; raw stacks in `{profile.raw}`.",
            "",
            "Inclusive share (request plumbing of waitress/flask/werkzeug left out):",
            "",
            "| function | inclusive % | self % |",
            "| --- | ---: | ---: |",
        ]
        lines += [f"| `{fn}` | {inc:.1f} | {own:.1f} |" for fn, inc, own in profile.inclusive]
        lines += ["", "By self time:", "", "| function | self % | inclusive % |"]
        lines += ["| --- | ---: | ---: |"]
        lines += [f"| `{fn}` | {own:.1f} | {inc:.1f} |" for fn, inc, own in profile.by_self]
    lines.append("")
    return "\n".join(lines)


def rate(block: Block, measure: str) -> float:
    """Median throughput of a block: MB/s for WADO, instances/s for STOW."""
    if measure == "wado":
        return statistics.median(s.nbytes / 1e6 / s.seconds for s in block.samples)
    return statistics.median(max(s.items, 0) / s.seconds for s in block.samples)


def append_report(out: Path, section: str) -> None:
    """Append ``section`` to ``out``, leaving what is there untouched."""
    text = out.read_text() if out.exists() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    out.write_text(text + ("\n" if text else "") + section)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--studies", type=int, default=1000, help="small studies")
    parser.add_argument("--instances-per-study", type=int, default=2, help="64x64 CT per study")
    parser.add_argument(
        "--big-instances", type=int, default=500, help="512x512 CT instances in the big study"
    )
    parser.add_argument("--stow-instances", type=int, default=200, help="instances per STOW run")
    parser.add_argument("--stow-batch", type=int, default=10, help="instances per STOW request")
    parser.add_argument("--qido-repeats", type=int, default=30, help="QIDO-RS repetitions")
    parser.add_argument(
        "--repeats", type=int, default=5, help="repetitions of WADO-RS, metadata and STOW-RS"
    )
    parser.add_argument("--qido-limit", type=int, default=100, help="limit of the unfiltered QIDO")
    parser.add_argument(
        "--measures",
        default=",".join(MEASURES),
        help="comma-separated subset of " + ",".join(MEASURES),
    )
    parser.add_argument("--seed", type=int, default=20250101, help="data and patient choice seed")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="where data and server storage go (not the repository)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "bench" / "RESULTS.md", help="report to append to"
    )
    parser.add_argument("--no-report", action="store_true", help="print the section only")
    parser.add_argument("--orthanc-plugin", default=None, help="path of libOrthancDicomWeb.so")
    parser.add_argument(
        "--dicomnode-cmd",
        default=None,
        help="command line that runs dicomnode; None: the dicomnode script on PATH",
    )
    parser.add_argument(
        "--snapshot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run dicomnode from a copy of its source taken at the start",
    )
    parser.add_argument(
        "--dicomnode-threads", type=int, default=None, help="dicomnode [http] threads"
    )
    parser.add_argument(
        "--dicomnode-analysis",
        action="store_true",
        help="leave dicomnode's automatic analysis on (it adds derived SEG/SR instances to "
        "CT studies and runs in the background during the measurements)",
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=0.8,
        help="before the timed runs, wait until the 1-minute load average is below this",
    )
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=1200.0,
        help="longest wait (s) for no store_ingest.py and a low load before the timed runs",
    )
    parser.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        help="before each measure, wait until other work uses fewer cores than this",
    )
    parser.add_argument(
        "--quiet-block-timeout",
        type=float,
        default=300.0,
        help="longest wait (s) for an idle machine before each measure",
    )
    parser.add_argument(
        "--max-other",
        type=float,
        default=0.1,
        help="repeat a repetition during which other processes used more than this many "
        "cores on average (and over 0.05 CPU s)",
    )
    parser.add_argument(
        "--disturbed-retries",
        type=int,
        default=3,
        help="how often to repeat a disturbed repetition before keeping it anyway",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="after timing, profile dicomnode with py-spy during metadata and QIDO requests",
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=8.0, help="seconds of requests per profile"
    )
    parser.add_argument("--keep", action="store_true", help="keep the servers' storage")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate, load, measure, report."""
    args = parse_args(argv)
    measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    unknown = set(measures) - set(MEASURES)
    if unknown:
        raise SystemExit(f"unknown measure(s) {sorted(unknown)}; choose from {MEASURES}")
    tools = Tools.discover(args.orthanc_plugin, args.dicomnode_cmd)
    source = dicomnode_source() if not args.dicomnode_cmd else None
    source_note = describe_source(source) if source else "source not found"
    source_hash = tree_hash(source) if source else ""
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if source and args.snapshot:
        root = snapshot_source(source, args.work_dir)
        tools = Tools(
            tools.storescu,
            tools.orthanc,
            tools.orthanc_plugin,
            [sys.executable, "-m", "dicomnode.cli"],
            tools.py_spy,
            {"PYTHONPATH": str(root)},
        )
        log(f"running dicomnode from a snapshot of its source in {root}")

    # SIGTERM -> SystemExit, so that the finally block below stops the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # One run at a time per work directory: two would share the data and the cores.
    lock = (args.work_dir / "run.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another dicomweb.py run holds {args.work_dir / 'run.lock'}; waiting for it")
        fcntl.flock(lock, fcntl.LOCK_EX)

    # Generating and loading the data takes a core or two for a while: do not do it under
    # another benchmark either.
    if other_benchmark_running():
        log("store_ingest.py is running; waiting for it to finish before generating data")
        started = time.monotonic()
        while other_benchmark_running() and time.monotonic() - started < args.quiet_timeout:
            time.sleep(10)
    corpus = generate(
        args.work_dir
        / f"data-{args.studies}x{args.instances_per_study}-{args.big_instances}-{args.seed}",
        args.studies,
        args.instances_per_study,
        args.big_instances,
        args.seed,
    )
    info = machine_info(tools)
    info["dicomnode"] += f", {source_note}"
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.work_dir))
    servers: list[Server] = [
        DicomnodeServer(
            tools, scratch / "dicomnode", args.dicomnode_threads, args.dicomnode_analysis
        ),
        OrthancServer(tools, scratch / "orthanc"),
    ]
    extra: dict[str, Any] = {"notes": []}
    profiles: list[Profile] = []
    failed = False
    try:
        for server in servers:
            server.start()
            log(f"{server.name} up: HTTP {server.http_port}, DIMSE {server.dimse_port}")
        warm_page_cache(sorted(corpus.small_dir.iterdir()) + corpus.big_files)
        extra["load_seconds"] = {}
        for server in servers:
            total = 0.0
            for directory in (corpus.small_dir, corpus.big_dir):
                seconds, rc = server.store(directory)
                total += seconds
                if rc != 0:
                    extra["notes"].append(
                        f"storescu into {server.label} ({directory.name}) exited with {rc}; "
                        f"see {server.workdir / 'storescu.log'}"
                    )
            extra["load_seconds"][server.label] = total
            log(f"loaded {server.name} in {total:.1f} s")
        bench = Bench(corpus, servers, args, tools.py_spy)
        counts = bench.counts()
        extra["counts"] = counts
        want = {"studies": len(corpus.patients) + 1, "big_instances": len(corpus.big_files)}
        for name, c in counts.items():
            for key, value in want.items():
                if c[key] != value:
                    extra["notes"].append(f"{name}: {key} = {c[key]}, expected {value}")
            if "orthanc_instances" in c:
                expected = corpus.small_instances + len(corpus.big_files)
                if c["orthanc_instances"] != expected:
                    extra["notes"].append(
                        f"Orthanc stores {c['orthanc_instances']} instances, expected {expected}"
                    )
        log(f"counts after loading: {counts}")

        extra["waited"] = wait_for_quiet_machine(args.max_load, args.quiet_timeout)
        extra["load_start"] = load_average()
        log(f"timed runs start; load average {extra['load_start']:.2f}")
        for measure in measures:
            repeats = args.qido_repeats if measure.startswith("qido") else args.repeats
            bench.run_measure(measure, repeats)
            for server in servers:
                if not server.alive():
                    raise ServerError(f"{server.name} died during {measure}:\n{server.tail()}")
        extra["load_end"] = load_average()
        extra["comparison"] = bench.compare_answers()
        log(f"timed runs done; load average {extra['load_end']:.2f}")
        if args.profile is not None:
            node = servers[0]
            assert isinstance(node, DicomnodeServer)
            profiles = profile_dicomnode(bench, node, args.profile)
    except BaseException:
        failed = True
        raise
    finally:
        for server in servers:
            server.stop()
        # Read the logs before their directories go.
        extra["server_problems"] = {server.label: server.problems() for server in servers}
        if any(extra["server_problems"].values()):
            failed = True  # keep the directories, logs included
            extra["notes"].append(f"The servers' directories and logs are kept in `{scratch}`.")
        if failed or args.keep:
            log(f"server directories kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    if source and not args.snapshot and tree_hash(source) != source_hash:
        extra["notes"].append(
            "The dicomnode source changed during the run, so the numbers may mix versions."
        )
    section = render_report(info, args, corpus, servers, bench, extra, profiles)
    print(section)
    if not args.no_report:
        append_report(args.out, section)
        log(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
