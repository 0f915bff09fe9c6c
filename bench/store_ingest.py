#!/usr/bin/env python3
"""C-STORE ingest benchmark: dcmtk ``storescu`` into storescp, Orthanc and dicomnode.

The benchmark generates a synthetic CT series set once (512x512, 16-bit MONOCHROME2,
Explicit VR Little Endian, unique UIDs, one patient and study, a few series) into a
temporary directory outside the repository, then sends it with dcmtk ``storescu``

* over one association (one ``storescu`` process), and
* over N parallel associations (N ``storescu`` processes, each sending 1/N of the files),

into each receiver. Every repetition starts the receiver afresh with an empty storage
directory, waits until it answers ``echoscu``, times only the ``storescu`` run(s), and
then checks how many instances the receiver stored. The results (medians over the
repetitions) are written as a Markdown section to ``bench/RESULTS.md``.

It is a hand-run tool; see ``bench/README.md``. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import json
import linecache
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
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
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

#: Bump when the generated data changes, so that cached data sets are regenerated.
GENERATOR_VERSION = 1
ROWS = COLUMNS = 512
CALLING_AET = "BENCH"
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "dicomnode-bench"
REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_RECEIVERS = ("storescp", "orthanc", "dicomnode")
PROFILE_RATE = 200  # py-spy samples per second
START_ATTEMPTS = 3  # tries to start a receiver (a free port may be taken meanwhile)

#: Progress output on stderr.
log = make_log("bench")


# --------------------------------------------------------------------------------------
# Tools and environment
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    """Absolute paths of the external programs the benchmark drives.

    dcmtk is looked up in ``/usr/bin`` first on purpose: pynetdicom installs Python
    ``storescu``/``storescp``/``echoscu`` scripts that shadow dcmtk on ``PATH``.
    """

    storescu: str
    storescp: str
    echoscu: str
    orthanc: str
    dicomnode: list[str]
    py_spy: str | None
    #: Extra environment for dicomnode (``PYTHONPATH`` of a source snapshot).
    dicomnode_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def discover(cls, dicomnode_cmd: str | None = None) -> Tools:
        """Find the tools, preferring dcmtk in /usr/bin over anything on PATH."""

        def dcmtk(name: str) -> str:
            for candidate in (Path("/usr/bin") / name, Path("/usr/local/bin") / name):
                if candidate.is_file() and os.access(candidate, os.X_OK):
                    return str(candidate)
            found = shutil.which(name)
            if found is None:
                raise SystemExit(f"dcmtk tool {name!r} not found (apt-get install dcmtk)")
            return found

        orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if dicomnode_cmd:
            dicomnode = dicomnode_cmd.split()
        else:
            script = Path(sysconfig.get_path("scripts")) / "dicomnode"
            dicomnode = [str(script)] if script.exists() else ["dicomnode"]
        return cls(
            storescu=dcmtk("storescu"),
            storescp=dcmtk("storescp"),
            echoscu=dcmtk("echoscu"),
            orthanc=orthanc,
            dicomnode=dicomnode,
            py_spy=shutil.which("py-spy"),
        )


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
    dcmtk = first_line([tools.storescu, "--version"]).strip("$ ").removeprefix("dcmtk: ")
    return {
        "date": first_line(["date", "-u"]),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pydicom": package_version("pydicom"),
        "pynetdicom": package_version("pynetdicom"),
        "dcmtk": dcmtk,
        "orthanc": first_line([tools.orthanc, "--version"]),
        "dicomnode": package_version("dicomnode"),
    }


# --------------------------------------------------------------------------------------
# Data set generation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSet:
    """A generated set of DICOM files on disk."""

    root: Path
    files: list[Path]
    total_bytes: int

    def split_dir(self, parts: int) -> list[Path]:
        """Directories of symlinks splitting the files into ``parts`` contiguous chunks.

        Each directory is handed to one ``storescu +sd`` process.
        """
        base = self.root / f"split-{parts}"
        dirs = [base / f"part{k}" for k in range(parts)]
        marker = base / "complete"
        if marker.exists():
            return dirs
        shutil.rmtree(base, ignore_errors=True)
        for d in dirs:
            d.mkdir(parents=True)
        chunk = -(-len(self.files) // parts)
        for index, path in enumerate(self.files):
            (dirs[index // chunk] / path.name).symlink_to(path)
        marker.touch()
        return dirs


def make_dataset(
    index: int,
    pixels: np.ndarray,
    study_uid: str,
    series_uid: str,
    series_number: int,
    instance_number: int,
    frame_uid: str,
) -> Dataset:
    """Build one CT Image Storage instance around ``pixels``."""
    sop_uid = generate_uid()
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
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250101"
    ds.StudyTime = ds.SeriesTime = "090000"
    ds.ContentTime = f"{90000 + index % 5000:06d}"
    ds.AccessionNumber = "BENCH0001"
    ds.Modality = "CT"
    ds.Manufacturer = "dicomnode-bench"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "C-STORE ingest benchmark"
    ds.SeriesDescription = f"Synthetic axial {series_number}"
    ds.PatientName = "BENCH^CT"
    ds.PatientID = "BENCH-CT-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    z = -float(instance_number)
    ds.ImagePositionPatient = ["-250.0", "-250.0", f"{z:.1f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:.1f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLUMNS
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
    ds.PixelData = pixels.tobytes()
    return ds


def generate(root: Path, count: int, series: int, seed: int) -> DataSet:
    """Generate (or reuse) ``count`` CT instances under ``root``.

    A ``manifest.json`` records the parameters; a matching manifest means the files
    are reused as they are.
    """
    manifest_path = root / "manifest.json"
    params = {"version": GENERATOR_VERSION, "count": count, "series": series, "seed": seed}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("params") == params:
            files = [root / name for name in manifest["files"]]
            if all(f.exists() for f in files):
                return DataSet(root, files, int(manifest["total_bytes"]))
    shutil.rmtree(root, ignore_errors=True)
    files_dir = root / "files"
    files_dir.mkdir(parents=True)

    rng = np.random.default_rng(seed)
    grid = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float32)
    grid_yx = (grid[0], grid[1])
    study_uid = generate_uid()
    frame_uid = generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    per_series = -(-count // series)
    files: list[Path] = []
    total = 0
    started = time.perf_counter()
    for index in range(count):
        s, n = divmod(index, per_series)
        pixels = phantom_slice(float(n), rng, grid_yx)
        ds = make_dataset(index, pixels, study_uid, series_uids[s], s + 1, n + 1, frame_uid)
        path = files_dir / f"ct{index:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
        files.append(path)
    manifest = {
        "params": params,
        "files": [str(f.relative_to(root)) for f in files],
        "total_bytes": total,
        "study_uid": study_uid,
        "series_uids": series_uids,
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    log(f"generated {count} files ({total / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
    return DataSet(root, files, total)


def warm_page_cache(data: DataSet) -> None:
    """Read every file once so that the first timed run does not hit the disk."""
    for path in data.files:
        with path.open("rb") as fh:
            while fh.read(1 << 20):
                pass


# --------------------------------------------------------------------------------------
# Receivers
# --------------------------------------------------------------------------------------


def group_cpu_seconds(pgid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process group ``pgid`` (Linux only).

    Sums every live (or zombie) member's own and reaped children's times, so forked
    workers (storescp ``--fork``, multiprocessing) are counted too.
    """
    user, system = group_cpu_ticks(pgid)
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def children_cpu_seconds() -> float:
    """User+system CPU seconds of this process's waited-for children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(max_busy_cores: float, timeout: float, window: float = 1.0) -> float:
    """Wait until the machine is nearly idle; return the last busy-core level seen.

    On a 2-core machine shared with other work (test suites, builds) the timings are
    only meaningful when nothing else runs. Waits until the busy CPU over ``window``
    seconds falls below ``max_busy_cores`` cores, for at most ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        before, started = system_busy_seconds(), time.monotonic()
        time.sleep(window)
        busy = (system_busy_seconds() - before) / (time.monotonic() - started)
        if busy <= max_busy_cores or time.monotonic() >= deadline:
            if busy > max_busy_cores:
                log(f"  machine still busy ({busy:.2f} cores); measuring anyway")
            return busy
        if not announced:
            log(f"  machine busy ({busy:.2f} cores in use); waiting for it to calm down")
            announced = True


class ReceiverError(RuntimeError):
    """A receiver failed to start or misbehaved."""


class Receiver(abc.ABC):
    """A C-STORE SCP started fresh, with empty storage, for every repetition."""

    #: Short name used on the command line and in the report.
    name: str = ""
    #: AE title the receiver answers to.
    ae_title: str = ""
    #: Seconds to wait for the receiver to answer C-ECHO after start.
    start_timeout: float = 60.0

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.port = 0
        self.workdir = Path()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path()

    @abc.abstractmethod
    def command(self) -> list[str]:
        """Prepare configuration under ``self.workdir`` and return the command line."""

    @abc.abstractmethod
    def count_stored(self) -> int:
        """Number of instances the receiver has stored so far."""

    def description(self) -> str:
        """One line about how the receiver is run (for the report)."""
        return ""

    def env(self) -> dict[str, str]:
        """Environment of the receiver process."""
        return child_env()

    def problems(self) -> list[str]:
        """Suspicious lines from the receiver's log (errors, tracebacks)."""
        return []

    @contextlib.contextmanager
    def running(self, workdir: Path) -> Iterator[Receiver]:
        """Start the receiver in ``workdir``, wait for C-ECHO, stop it on exit."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / f"{self.name}.log"
        cmd = self.command()
        with self.log_path.open("wb") as log_fh:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                env=self.env(),
                start_new_session=True,
            )
        try:
            self.wait_for_echo()
            yield self
        finally:
            self.stop()

    def wait_for_echo(self) -> None:
        """Poll ``echoscu`` until the receiver answers or ``start_timeout`` expires."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ReceiverError(
                    f"{self.name} exited with {self.proc.returncode} before answering "
                    f"C-ECHO; log tail:\n{self.log_tail()}"
                )
            rc = subprocess.run(
                [
                    self.tools.echoscu,
                    "-aet",
                    CALLING_AET,
                    "-aec",
                    self.ae_title,
                    "-to",
                    "2",
                    "-ta",
                    "5",
                    "127.0.0.1",
                    str(self.port),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=child_env(),
                check=False,
            ).returncode
            if rc == 0:
                if self.proc.poll() is not None:
                    raise ReceiverError(
                        f"{self.name} exited but something answered C-ECHO on port "
                        f"{self.port} (port taken by another program?); log tail:\n"
                        f"{self.log_tail()}"
                    )
                return
            time.sleep(0.2)
        raise ReceiverError(f"{self.name} did not answer C-ECHO in {self.start_timeout:.0f} s")

    def stop(self) -> None:
        """Terminate the receiver (SIGTERM, then SIGKILL after 20 s)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            log(f"{self.name} ignored SIGTERM; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of the receiver's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class StorescpReceiver(Receiver):
    """dcmtk ``storescp`` writing one file per instance into a directory.

    ``--fork`` gives each association its own process, so parallel associations are
    served concurrently (single-process storescp serves them one after the other).
    """

    name = "storescp"
    ae_title = "STORESCP"

    def command(self) -> list[str]:
        """``storescp --fork -od DIR PORT``."""
        self.out_dir = self.workdir / "store"
        self.out_dir.mkdir()
        return [
            self.tools.storescp,
            "--fork",
            "-aet",
            self.ae_title,
            "-dhl",
            "-od",
            str(self.out_dir),
            str(self.port),
        ]

    def count_stored(self) -> int:
        """Regular files in the output directory."""
        return sum(1 for p in self.out_dir.iterdir() if p.is_file())

    def description(self) -> str:
        """How storescp is run."""
        return "`storescp --fork -dhl -od DIR` (default max PDU 16384, no fsync)"


class OrthancReceiver(Receiver):
    """Orthanc in the foreground with a temporary JSON configuration."""

    name = "orthanc"
    ae_title = "ORTHANC"

    def __init__(self, tools: Tools, sync_storage: bool = True) -> None:
        super().__init__(tools)
        self.sync_storage = sync_storage
        self.http_port = 0

    def command(self) -> list[str]:
        """Write ``orthanc.json`` and return ``Orthanc orthanc.json``."""
        self.http_port = free_port()
        storage = self.workdir / "storage"
        storage.mkdir()
        config = {
            "Name": "bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "TemporaryDirectory": str(self.workdir),
            "StorageCompression": False,
            "SyncStorageArea": self.sync_storage,
            "MaximumStorageCacheSize": 128,
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomThreadsCount": 4,
            "SaveJobs": False,
            "StableAge": 3600,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return [self.tools.orthanc, str(path)]

    def count_stored(self) -> int:
        """``CountInstances`` from the REST API's ``/statistics``."""
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as resp:
            return int(json.load(resp)["CountInstances"])

    def description(self) -> str:
        """How Orthanc is run."""
        return (
            "`Orthanc CONFIG.json`, no plugins, SQLite index, StorageCompression false, "
            f"SyncStorageArea {str(self.sync_storage).lower()} "
            f"({'fsync after each file' if self.sync_storage else 'no fsync'}), "
            "DicomThreadsCount 4, MaximumPduLength 16384 (default)"
        )

    def problems(self) -> list[str]:
        """Orthanc error lines (``E`` prefix)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if line.startswith("E")]


class DicomnodeReceiver(Receiver):
    """``dicomnode serve --config CONFIG.toml`` with a temporary data directory."""

    name = "dicomnode"
    ae_title = "DICOMNODE"

    def __init__(self, tools: Tools, max_associations: int = 16, processes: int = 1) -> None:
        super().__init__(tools)
        self.max_associations = max_associations
        self.processes = processes
        self.data_dir = Path()

    def command(self) -> list[str]:
        """Write ``config.toml`` and return ``dicomnode serve --config config.toml``."""
        self.data_dir = self.workdir / "data"
        http_port = free_port()
        toml = (
            "[node]\n"
            f'ae_title = "{self.ae_title}"\n'
            f'data_dir = "{self.data_dir}"\n'
            "[dimse]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f"max_associations = {self.max_associations}\n"
            f"processes = {self.processes}\n"
            "[http]\n"
            'host = "127.0.0.1"\n'
            f"port = {http_port}\n"
        )
        path = self.workdir / "config.toml"
        path.write_text(toml)
        return [*self.tools.dicomnode, "serve", "--config", str(path)]

    def env(self) -> dict[str, str]:
        """:func:`child_env` plus the snapshot's ``PYTHONPATH``, if any."""
        return child_env() | self.tools.dicomnode_env

    def wait_for_echo(self) -> None:
        """C-ECHO, then the ``ready`` log line (logged once every DIMSE process serves)."""
        super().wait_for_echo()
        deadline = time.monotonic() + self.start_timeout
        while '"event": "ready"' not in self.log_path.read_text(errors="replace"):
            if time.monotonic() > deadline or self.proc is None or self.proc.poll() is not None:
                raise ReceiverError(f"dicomnode did not log ready; log tail:\n{self.log_tail()}")
            time.sleep(0.2)

    def count_stored(self) -> int:
        """``.dcm`` files under ``data_dir/blobs`` (recursively)."""
        blobs = self.data_dir / "blobs"
        if not blobs.exists():
            return 0
        return sum(1 for _ in blobs.rglob("*.dcm"))

    def description(self) -> str:
        """How dicomnode is run."""
        how = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(self.tools.dicomnode))
        snapshot = (
            ", from a copy of the source taken at the start" if self.tools.dicomnode_env else ""
        )
        return (
            f"`{how} serve --config CONFIG.toml` (max_associations "
            f"{self.max_associations}, processes {self.processes}, DIMSE and HTTP on "
            "127.0.0.1, other settings "
            f"default{snapshot})"
        )

    def problems(self) -> list[str]:
        """JSON log lines at WARNING or worse, and non-JSON lines that look like errors."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        bad = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                level = str(record.get("level", "")).upper()
                if level in {"WARNING", "WARN", "ERROR", "CRITICAL", "FATAL"}:
                    bad.append(line)
            elif any(k in line.lower() for k in ("traceback", "error", "exception")):
                bad.append(line)
        return bad


def make_receiver(name: str, tools: Tools, args: argparse.Namespace) -> Receiver:
    """Receiver object for ``name``."""
    if name == "storescp":
        return StorescpReceiver(tools)
    if name == "orthanc":
        return OrthancReceiver(tools, sync_storage=not args.orthanc_no_sync)
    if name == "dicomnode":
        return DicomnodeReceiver(tools, processes=args.dicomnode_processes)
    raise SystemExit(f"unknown receiver {name!r}; choose from {', '.join(ALL_RECEIVERS)}")


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One timed repetition."""

    receiver: str
    associations: int
    repetition: int
    seconds: float
    sent: int
    stored: int
    stored_after_settle: int
    receiver_cpu_s: float
    receiver_sys_s: float
    storescu_cpu_s: float
    other_cpu_s: float
    storescu_failures: int
    problems: list[str] = field(default_factory=list)


def run_storescu(
    tools: Tools, receiver: Receiver, dirs: list[Path], log_dir: Path
) -> tuple[float, int]:
    """Run one ``storescu`` per directory concurrently; return (wall seconds, failures)."""
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    started = time.perf_counter()
    for k, directory in enumerate(dirs):
        log_fh = (log_dir / f"storescu-{k}.log").open("wb")
        logs.append(log_fh)
        procs.append(
            subprocess.Popen(
                [
                    tools.storescu,
                    "-aet",
                    CALLING_AET,
                    "-aec",
                    receiver.ae_title,
                    "+sd",
                    "+r",
                    "-nh",
                    "127.0.0.1",
                    str(receiver.port),
                    str(directory),
                ],
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env(),
            )
        )
    failures = 0
    for proc in procs:
        if proc.wait() != 0:
            failures += 1
    seconds = time.perf_counter() - started
    for fh in logs:
        fh.close()
    return seconds, failures


def first_error(logs: Iterator[Path]) -> str:
    """First line mentioning an error (``E:`` or ``F:`` in dcmtk's logs) in ``logs``."""
    for path in sorted(logs):
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(("E:", "F:")) or "error" in line.lower():
                    return f"{path.name}: {line.strip()}"
    return "none found"


def settle_count(receiver: Receiver, expected: int, timeout: float) -> int:
    """Poll the stored count until it reaches ``expected`` or ``timeout`` expires."""
    deadline = time.monotonic() + timeout
    count = receiver.count_stored()
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        count = receiver.count_stored()
    return count


class StorageArea:
    """Where each run's receiver keeps what it stores.

    ``fresh-ext4``: every run gets a new ext4 filesystem (mkfs defaults, so with a
    journal, as on a server) made in a sparse image file under the work directory and
    mounted through a loop device with direct I/O (needs root), so that every receiver
    starts on the same empty disk. On this machine's root filesystem (ext4 without a
    journal) what earlier runs did changed the cost of every file a later run created:
    after a run's 1000 files were deleted, creating a file in that part of the disk took
    0.14-0.16 ms instead of 0.007-0.009 ms (the kernel's time went to ext4's
    ``recently_deleted``), and with every run's files kept instead, storescp's later runs
    took 1.0-1.7 s where its first took 0.63 s. ``directory``: a folder under the work
    directory, deleted after the run.
    """

    IMAGE_BYTES = 4 * 2**30

    def __init__(self, kind: str, scratch: Path) -> None:
        if kind == "auto":
            kind = "fresh-ext4" if _can_mount_images() else "directory"
        self.kind = kind
        self.scratch = scratch
        self._devices: dict[Path, str] = {}  # mounted directory -> its loop device

    def create(self, prefix: str) -> Path:
        """An empty storage directory for one run."""
        directory = Path(tempfile.mkdtemp(prefix=prefix, dir=self.scratch))
        if self.kind == "fresh-ext4":
            image = directory.with_suffix(".img")
            with image.open("wb") as f:
                f.truncate(self.IMAGE_BYTES)
            try:
                subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
                device = subprocess.run(
                    ["losetup", "--direct-io=on", "--find", "--show", str(image)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                self._devices[directory] = device
                subprocess.run(["mount", device, str(directory)], check=True)
            except (OSError, subprocess.CalledProcessError):
                self.release(directory)
                raise
        return directory

    def release(self, directory: Path, keep: bool = False) -> None:
        """Done with ``directory``: delete it, or with ``keep`` leave it (or its image)."""
        if self.kind == "fresh-ext4":
            image = directory.with_suffix(".img")
            device = self._devices.pop(directory, None)
            if device:
                subprocess.run(["umount", str(directory)], check=False, capture_output=True)
                subprocess.run(["losetup", "--detach", device], check=False)
            if keep:
                log(f"  its storage is kept in {image} (mount -o loop {image} DIR)")
                return
            image.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                directory.rmdir()
        elif not keep:
            shutil.rmtree(directory, ignore_errors=True)

    def describe(self, creation_ms: float) -> str:
        where = (
            f"a new ext4 filesystem (mkfs.ext4 defaults, so with a journal; a "
            f"{self.IMAGE_BYTES // 2**30} GiB image on the {filesystem_type(self.scratch)} "
            "disk, mounted through a loop device with direct I/O) for each run"
            if self.kind == "fresh-ext4"
            else f"a folder under `{self.scratch.parent}` ({filesystem_type(self.scratch)}) "
            "for each run, deleted after it"
        )
        return (
            f"{where}; creating an empty file there took {creation_ms:.3f} ms before the "
            "first run (see `StorageArea` in bench/store_ingest.py)"
        )


def _can_mount_images() -> bool:
    tools = ("mkfs.ext4", "losetup", "mount", "umount")
    return os.geteuid() == 0 and all(shutil.which(tool) for tool in tools)


def file_creation_ms(storage: StorageArea, count: int = 500) -> float:
    """Mean milliseconds to create an empty file in a new storage directory."""
    folder = storage.create("creation-probe-")
    try:
        started = time.perf_counter()
        for n in range(count):
            os.close(os.open(folder / f"{n}.probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return (time.perf_counter() - started) / count * 1000
    finally:
        storage.release(folder)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts), or "unknown"."""
    resolved = str(path.resolve()) + "/"
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1].rstrip("/") + "/" if len(fields) > 2 else ""
            if mount and resolved.startswith(mount) and len(mount) > len(best):
                best, kind = mount, fields[2]
    return kind


def run_once(
    tools: Tools,
    receiver: Receiver,
    data: DataSet,
    associations: int,
    repetition: int,
    storage: StorageArea,
    keep: bool = False,
    quiet_cores: float = 0.3,
    quiet_timeout: float = 300.0,
) -> Sample:
    """Start ``receiver`` fresh, send the data set, verify, stop; return the sample.

    Before the timed run it waits (see :func:`wait_for_quiet`) for the machine to be
    idle. ``other_cpu_s`` is the CPU that neither the receiver nor storescu nor this
    script used during the run: anything above a few tenths of a second means other
    work disturbed the measurement.
    """
    dirs = data.split_dir(associations)
    workdir = storage.create(f"{receiver.name}-{associations}-{repetition}-")
    try:
        with receiver.running(workdir):
            assert receiver.proc is not None
            if quiet_timeout > 0:
                wait_for_quiet(quiet_cores, quiet_timeout)
            user_before, sys_before = group_cpu_seconds(receiver.proc.pid)
            system_before = system_busy_seconds()
            kernel_before = kernel_threads_cpu_seconds()
            children_before = children_cpu_seconds()
            own_before = time.process_time()
            seconds, failures = run_storescu(tools, receiver, dirs, workdir)
            user_after, sys_after = group_cpu_seconds(receiver.proc.pid)
            receiver_sys = sys_after - sys_before
            cpu = user_after - user_before + receiver_sys
            storescu_cpu = children_cpu_seconds() - children_before
            other_cpu = (
                system_busy_seconds()
                - system_before
                - (kernel_threads_cpu_seconds() - kernel_before)
                - cpu
                - storescu_cpu
                - (time.process_time() - own_before)
            )
            stored = receiver.count_stored()
            settled = (
                stored
                if stored >= len(data.files)
                else settle_count(receiver, len(data.files), timeout=30.0)
            )
            exited = receiver.proc.poll() if receiver.proc is not None else None
        problems = receiver.problems()
        if exited is not None:
            problems.append(f"{receiver.name} exited with {exited} during the run")
        if failures:
            problems.append(
                f"{failures} storescu process(es) exited non-zero; first error: "
                f"{first_error(workdir.glob('storescu-*.log'))}"
            )
        sample = Sample(
            receiver.name,
            associations,
            repetition,
            seconds,
            len(data.files),
            stored,
            settled,
            cpu,
            receiver_sys,
            storescu_cpu,
            max(other_cpu, 0.0),
            failures,
            problems,
        )
        if problems or settled != len(data.files):
            keep = True
            log(
                f"  problems kept in {workdir}: {len(problems)} log line(s), "
                f"stored {stored}/{settled} of {len(data.files)}"
            )
        return sample
    except ReceiverError:
        keep = True
        log(f"  receiver failed; its directory is kept: {workdir}")
        raise
    finally:
        storage.release(workdir, keep)
        os.sync()


def is_disturbed(sample: Sample, max_other: float) -> bool:
    """Whether other processes used more than ``max_other`` cores (and 0.1 s) in the run."""
    return sample.other_cpu_s > max(max_other * sample.seconds, 0.1)


def measure(
    tools: Tools,
    receiver: Receiver,
    data: DataSet,
    associations: int,
    repetition: int,
    storage: StorageArea,
    args: argparse.Namespace,
) -> Sample:
    """:func:`run_once`, retried when the receiver fails to start or the run was disturbed.

    A run counts as disturbed when other processes used more than ``args.max_other``
    cores on average during it; after ``args.disturbed_retries`` retries the last
    sample is kept (its "other CPU" shows the disturbance in the report).
    """
    start_failures = disturbed = 0
    while True:
        try:
            sample = run_once(
                tools,
                receiver,
                data,
                associations,
                repetition,
                storage,
                keep=args.keep,
                quiet_cores=args.quiet_cores,
                quiet_timeout=args.quiet_timeout,
            )
        except ReceiverError as e:
            start_failures += 1
            log(f"{receiver.name}: {e}")
            if start_failures >= START_ATTEMPTS:
                raise
            continue
        if not is_disturbed(sample, args.max_other) or disturbed >= args.disturbed_retries:
            return sample
        disturbed += 1
        log(
            f"  disturbed: other processes used {sample.other_cpu_s:.2f} CPU s in "
            f"{sample.seconds:.2f} s; repeating the run"
        )


def profile_dicomnode(
    tools: Tools,
    data: DataSet,
    scratch: Path,
    out_dir: Path,
    rate: int = PROFILE_RATE,
) -> Path | None:
    """Send the data set over one association while ``py-spy record`` samples dicomnode.

    Writes py-spy's collapsed stacks (``profile.txt``, readable by speedscope and
    flamegraph tools) into ``out_dir`` and returns its path. This run is not timed.
    """
    if tools.py_spy is None:
        log("py-spy not found; skipping the profile (pip install py-spy)")
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    receiver = DicomnodeReceiver(tools)
    workdir = Path(tempfile.mkdtemp(prefix="dicomnode-profile-", dir=scratch))
    raw = out_dir / "profile.txt"
    try:
        with receiver.running(workdir):
            assert receiver.proc is not None
            spy = subprocess.Popen(
                [
                    tools.py_spy,
                    "record",
                    "--pid",
                    str(receiver.proc.pid),
                    "--rate",
                    str(rate),
                    "--subprocesses",
                    "--threads",
                    "--format",
                    "raw",
                    "-o",
                    str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=(out_dir / "py-spy.log").open("wb"),
            )
            time.sleep(1.0)
            seconds, _ = run_storescu(tools, receiver, data.split_dir(1), workdir)
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
            log(f"profiled run: {len(data.files) / seconds:.0f} instances/s under py-spy")
        return raw
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


#: Thread start-up frames present in every sample; left out of the summary.
_STARTUP_FRAMES = (
    "Thread._bootstrap (threading.py)",
    "Thread._bootstrap_inner (threading.py)",
    "Thread.run (threading.py)",
)
#: Innermost functions of threads blocked waiting, which py-spy does not always
#: recognise as idle (e.g. waitress workers in ``Condition.wait``).
_IDLE_FUNCTIONS = (
    "Condition.wait (threading.py)",
    "Event.wait (threading.py)",
    "Thread.join (threading.py)",
    "Thread._wait_for_tstate_lock (threading.py)",
    "_PollLikeSelector.select (selectors.py)",
    "SelectSelector.select (selectors.py)",
    "socket.accept (socket.py)",
)
#: Source of an innermost line that blocks or sleeps (e.g. pynetdicom's reactor loops
#: calling ``time.sleep``): such samples are idle time, not work.
_IDLE_SOURCE = re.compile(r"\bsleep\(|\.wait\(|\bselect\(|\.accept\(|\.acquire\(")
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _is_idle_line(file: str, line: int, search_paths: Sequence[str]) -> bool:
    """Whether ``file:line`` (as py-spy names it) is a sleeping or blocking call."""
    for base in ("", *search_paths):
        path = os.path.join(base, file) if base else file
        if os.path.isfile(path):
            return bool(_IDLE_SOURCE.search(linecache.getline(path, line)))
    return False


@dataclass
class Profile:
    """Summary of py-spy collapsed stacks (percentages of the busy samples)."""

    busy_samples: int
    idle_samples: int
    #: ``(function, inclusive %, self %)``, by inclusive share, hottest first.
    functions: list[tuple[str, float, float]]
    #: ``(function, inclusive %, self %)``, by self share, hottest first.
    by_self: list[tuple[str, float, float]]
    #: ``(thread name, % of busy samples)``, busiest first.
    threads: list[tuple[str, float]]


def summarize_collapsed(raw: Path, top: int = 15, search_paths: Sequence[str] = ()) -> Profile:
    """Hottest functions in py-spy's collapsed stacks (``--threads``, with line numbers).

    Samples whose innermost frame waits or sleeps (a known blocking function, or a line
    of source in ``search_paths`` calling ``sleep``/``wait``/``select``/...) are counted
    as idle and dropped; thread start-up frames are ignored. Frames are merged per
    function. Inclusive counts a function once per sample even when it recurses;
    percentages are of the remaining (busy) samples.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    idle_lines: dict[tuple[str, int], bool] = {}
    busy = idle = 0
    for text in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = text.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread = "?"
        frames: list[str] = []
        leaf: tuple[str, int] | None = None
        for frame in stack.split(";"):
            if frame.startswith("thread "):
                thread = frame.split(":", 1)[-1].strip().split("@", 1)[0]
                continue
            match = _FRAME.match(frame)
            if frame.startswith("process ") or match is None:
                continue
            function = f"{match['name']} ({match['file']})"
            if function in _STARTUP_FRAMES:
                continue
            frames.append(function)
            leaf = (match["file"], int(match["line"])) if match["line"] else None
        if leaf is not None and leaf not in idle_lines:
            idle_lines[leaf] = _is_idle_line(*leaf, search_paths)
        if not frames or frames[-1] in _IDLE_FUNCTIONS or (leaf and idle_lines[leaf]):
            idle += count
            continue
        busy += count
        threads[thread] += count
        for function in set(frames):
            inclusive[function] += count
        own[frames[-1]] += count
    if busy == 0:
        return Profile(0, idle, [], [], [])
    rows = [(fn, 100.0 * n / busy, 100.0 * own[fn] / busy) for fn, n in inclusive.items()]
    by_self = sorted(rows, key=lambda r: (-r[2], -r[1]))[:top]
    rows.sort(key=lambda r: (-r[1], -r[2]))
    thread_rows = [(name, 100.0 * n / busy) for name, n in threads.most_common()]
    return Profile(busy, idle, rows[:top], by_self, thread_rows)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


@dataclass
class Summary:
    """Medians for one receiver and mode."""

    receiver: str
    associations: int
    seconds: float
    inst_per_s: float
    mb_per_s: float
    cpu_s: float
    sys_s: float
    storescu_cpu_s: float
    other_cpu_max_s: float
    stored_ok: str
    runs: list[float]


def summarize(samples: list[Sample], data: DataSet) -> list[Summary]:
    """Median per (receiver, associations)."""
    keys = sorted(
        {(s.receiver, s.associations) for s in samples},
        key=lambda k: (ALL_RECEIVERS.index(k[0]) if k[0] in ALL_RECEIVERS else 99, k[1]),
    )
    out = []
    for receiver, assoc in keys:
        group = [s for s in samples if s.receiver == receiver and s.associations == assoc]
        seconds = statistics.median(s.seconds for s in group)
        ok = sum(1 for s in group if s.stored == s.sent)
        out.append(
            Summary(
                receiver,
                assoc,
                seconds,
                statistics.median(s.sent / s.seconds for s in group),
                statistics.median(data.total_bytes / 1e6 / s.seconds for s in group),
                statistics.median(s.receiver_cpu_s for s in group),
                statistics.median(s.receiver_sys_s for s in group),
                statistics.median(s.storescu_cpu_s for s in group),
                max(s.other_cpu_s for s in group),
                f"{ok}/{len(group)}",
                [s.seconds for s in group],
            )
        )
    return out


def render_report(
    info: dict[str, str],
    args: argparse.Namespace,
    data: DataSet,
    receivers: list[Receiver],
    samples: list[Sample],
    profile: Profile | None,
    notes: Sequence[str] = (),
) -> str:
    """Markdown section for one benchmark run."""
    summaries = summarize(samples, data)
    lines = [f"## Run of {info['date']}", ""]
    lines += [
        "### Machine",
        "",
        f"- nproc: {info['nproc']}; CPU: {info['cpu']}; RAM: {info['ram']}; "
        f"kernel {info['kernel']}",
        f"- Python {info['python']}, pydicom {info['pydicom']}, pynetdicom {info['pynetdicom']}, "
        f"dicomnode {info['dicomnode']}",
        f"- dcmtk: {info['dcmtk']}; Orthanc: {info['orthanc']}",
        "",
        "### Method",
        "",
        f"- Data: {len(data.files)} synthetic CT Image Storage instances, 512x512, "
        "MONOCHROME2, BitsAllocated 16 / BitsStored 12, Explicit VR Little Endian, "
        f"one patient and study, {args.series} series, noisy phantom pixel data; "
        f"{data.total_bytes / 1e6:.1f} MB in total "
        f"({data.total_bytes / len(data.files) / 1e3:.1f} kB per file), page-cached.",
        "- Sender: dcmtk `storescu -aet BENCH -aec <AET> +sd +r -nh 127.0.0.1 PORT DIR`, "
        f"either one process (1 association) or {args.parallel} processes each sending "
        f"1/{args.parallel} of the files ({args.parallel} parallel associations).",
        "- Every process runs with `TCP_NODELAY=1` (Debian's dcmtk and Orthanc only "
        "disable Nagle's algorithm when it is set).",
        f"- Each receiver is started fresh with an empty storage directory for each of "
        f"{args.repeats} repetitions per mode (runs interleaved across receivers), "
        "waited for with `echoscu`, and stopped afterwards; `sync` between runs.",
        f"- Storage: {info.get('storage', 'not recorded')}.",
        "- Time: wall clock of the storescu run(s) only. MB = 10^6 bytes of the files "
        "sent. Receiver CPU = user+system CPU seconds of the receiver's process group "
        "during the storescu run(s) (system part in brackets), storescu CPU = the same "
        "for the storescu process(es); "
        "both share the machine's cores. Other CPU = the machine's user+system CPU seconds "
        "during the run used neither by them nor by kernel threads (i.e. other work on the "
        "machine; should be ~0). Before each "
        f"run the script waits (up to {args.quiet_timeout:.0f} s) until the machine uses "
        f"fewer than {args.quiet_cores} cores, and a run during which other processes "
        f"used more than {args.max_other} cores on average (and over 0.1 CPU s) is "
        "repeated (at most "
        f"{args.disturbed_retries} times).",
        "- Stored count checked after each run: storescp files in its output directory, "
        "Orthanc `/statistics` CountInstances, dicomnode `.dcm` files under "
        "`data_dir/blobs`.",
        "- Receivers:",
    ]
    lines += [f"  - {r.name}: {r.description()}" for r in receivers]
    lines += [
        "",
        "### Results (medians)",
        "",
        "| receiver | associations | seconds | instances/s | MB/s | receiver CPU s (sys) | "
        "storescu CPU s | other CPU s (max) | all stored | runs (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in summaries:
        runs = ", ".join(f"{x:.2f}" for x in s.runs)
        lines.append(
            f"| {s.receiver} | {s.associations} | {s.seconds:.2f} | {s.inst_per_s:.0f} | "
            f"{s.mb_per_s:.0f} | {s.cpu_s:.2f} ({s.sys_s:.2f}) | {s.storescu_cpu_s:.2f} | "
            f"{s.other_cpu_max_s:.2f} | {s.stored_ok} | {runs} |"
        )
    by_key = {(s.receiver, s.associations): s for s in summaries}
    ratio_lines = []
    for assoc in sorted({s.associations for s in summaries}):
        node = by_key.get(("dicomnode", assoc))
        if node is None:
            continue
        for other in ("storescp", "orthanc"):
            ref = by_key.get((other, assoc))
            if ref is not None:
                ratio_lines.append(
                    f"| {assoc} | dicomnode / {other} | {node.inst_per_s / ref.inst_per_s:.2f} |"
                )
    if ratio_lines:
        lines += [
            "",
            "### Ratios (median instances/s)",
            "",
            "| associations | ratio | value |",
            "| ---: | --- | ---: |",
            *ratio_lines,
        ]
    problem_samples = [
        s for s in samples if s.problems or s.stored_after_settle != s.sent or s.stored != s.sent
    ]
    disturbed = [s for s in samples if is_disturbed(s, args.max_other)]
    lines += ["", "### Problems", ""]
    lines += [f"- {note}" for note in notes]
    if disturbed:
        runs = "; ".join(
            f"{s.receiver} {s.associations} assoc. run {s.repetition} "
            f"({s.other_cpu_s:.2f} CPU s in {s.seconds:.2f} s)"
            for s in disturbed
        )
        lines.append(
            f"- Other processes on the machine still used CPU during {len(disturbed)} of "
            f"{len(samples)} runs after the retries: {runs}. The medians damp this."
        )
    if not problem_samples and not notes and not disturbed:
        lines.append(
            "None: every run stored every instance, no storescu failures, "
            "no error lines in the receivers' logs."
        )
    for s in problem_samples:
        lines.append(
            f"- {s.receiver}, {s.associations} association(s), run {s.repetition}: stored "
            f"{s.stored} right after storescu, {s.stored_after_settle} after waiting, "
            f"of {s.sent}; {len(s.problems)} log line(s), e.g.:"
        )
        for p in s.problems[:3]:
            lines.append(f"  - `{p[:300]}`")
    if profile is not None and profile.functions:
        lines += [
            "",
            "### dicomnode profile (py-spy, 1 association, separate untimed run)",
            "",
            f"{profile.busy_samples} busy samples at {PROFILE_RATE} Hz over all threads "
            f"({profile.idle_samples} samples of threads waiting or sleeping dropped). "
            "Busy samples per thread: "
            + ", ".join(f"{name} {share:.0f}%" for name, share in profile.threads[:5])
            + ".",
            "",
            "| function | inclusive % | self % |",
            "| --- | ---: | ---: |",
        ]
        lines += [f"| `{fn}` | {inc:.1f} | {own:.1f} |" for fn, inc, own in profile.functions]
        lines += [
            "",
            "By self time:",
            "",
            "| function | self % | inclusive % |",
            "| --- | ---: | ---: |",
        ]
        lines += [f"| `{fn}` | {own:.1f} | {inc:.1f} |" for fn, inc, own in profile.by_self]
    lines.append("")
    return "\n".join(lines)


def write_report(out: Path, section: str, append: bool) -> None:
    """Write or append ``section`` to ``out`` under a common title."""
    title = (
        "# C-STORE ingest benchmark\n\n"
        "Produced by `bench/store_ingest.py`; see `bench/README.md`.\n\n"
    )
    if append and out.exists():
        text = out.read_text().rstrip("\n") + "\n\n" + section
    else:
        text = title + section
    out.write_text(text)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000, help="instances to send")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per receiver and mode")
    parser.add_argument(
        "--receivers",
        default=",".join(ALL_RECEIVERS),
        help="comma-separated subset of " + ",".join(ALL_RECEIVERS),
    )
    parser.add_argument(
        "--parallel", type=int, default=4, help="storescu processes in the parallel mode"
    )
    parser.add_argument(
        "--modes",
        default="1,parallel",
        help="comma-separated association counts; 'parallel' = --parallel",
    )
    parser.add_argument("--series", type=int, default=5, help="series in the data set")
    parser.add_argument("--seed", type=int, default=20250101, help="pixel-noise seed")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "bench" / "RESULTS.md", help="Markdown report"
    )
    parser.add_argument(
        "--append",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append a section to --out instead of overwriting it",
    )
    parser.add_argument("--no-report", action="store_true", help="print the section only")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="where data and receiver storage go (not the repository)",
    )
    parser.add_argument(
        "--dicomnode-cmd",
        default=None,
        help="command line that runs dicomnode; None means the dicomnode script beside this Python",
    )
    parser.add_argument(
        "--orthanc-no-sync",
        action="store_true",
        help="run Orthanc with SyncStorageArea false instead of true (no fsync per file)",
    )
    parser.add_argument(
        "--dicomnode-processes",
        type=int,
        default=1,
        help="dimse.processes of dicomnode (its DIMSE processes: the main one and N-1 workers)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="after timing, profile one dicomnode 1-association run with "
        "py-spy into DIR and add the hottest functions to the report",
    )
    parser.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        help="before each timed run, wait until the machine uses fewer cores than this",
    )
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=300.0,
        help="longest wait for a quiet machine, in seconds (0: do not wait)",
    )
    parser.add_argument(
        "--max-other",
        type=float,
        default=0.1,
        help="repeat a run in which other processes used more than this many cores",
    )
    parser.add_argument(
        "--disturbed-retries",
        type=int,
        default=3,
        help="how often to repeat a disturbed run before keeping it anyway",
    )
    parser.add_argument(
        "--snapshot",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run dicomnode from a copy of its source taken at the start (for benchmarking "
        "while the working tree is being edited)",
    )
    parser.add_argument("--keep", action="store_true", help="keep receivers' storage dirs")
    parser.add_argument(
        "--storage",
        choices=("auto", "fresh-ext4", "directory"),
        default="auto",
        help="each run's storage: a new loop-mounted ext4 (needs root; 'auto' picks it when "
        "it can) or a folder under --work-dir; see StorageArea",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the report."""
    args = parse_args(argv)
    names = [n.strip() for n in args.receivers.split(",") if n.strip()]
    modes = sorted(
        {
            args.parallel if m.strip() == "parallel" else int(m)
            for m in args.modes.split(",")
            if m.strip()
        }
    )
    tools = Tools.discover(args.dicomnode_cmd)
    source = dicomnode_source() if "dicomnode" in names and not args.dicomnode_cmd else None
    source_note = describe_source(source) if source else "source not found"
    source_hash = tree_hash(source) if source else ""
    if source and args.snapshot:
        root = snapshot_source(source, args.work_dir)
        tools = replace(
            tools,
            dicomnode=[sys.executable, "-m", "dicomnode.cli"],
            dicomnode_env={"PYTHONPATH": str(root)},
        )
        log(f"running dicomnode from a snapshot of its source in {root}")
    receivers = [make_receiver(n, tools, args) for n in names]

    # Turn SIGTERM into SystemExit so that the receivers' finally blocks stop them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    args.work_dir.mkdir(parents=True, exist_ok=True)
    data = generate(
        args.work_dir / f"data-{args.count}-{args.series}", args.count, args.series, args.seed
    )
    warm_page_cache(data)
    os.sync()
    scratch = Path(tempfile.mkdtemp(prefix="runs-", dir=args.work_dir))
    info = machine_info(tools)
    info["dicomnode"] += f", {source_note}"
    storage = StorageArea(args.storage, scratch)
    info["storage"] = storage.describe(file_creation_ms(storage))
    log(
        f"{len(data.files)} files, {data.total_bytes / 1e6:.1f} MB; receivers {names}; "
        f"modes {modes}; {args.repeats} repetitions"
    )

    samples: list[Sample] = []
    try:
        for rep in range(1, args.repeats + 1):
            for receiver in receivers:
                for assoc in modes:
                    sample = measure(tools, receiver, data, assoc, rep, storage, args)
                    samples.append(sample)
                    log(
                        f"{receiver.name:9s} assoc={assoc} rep={rep}: {sample.seconds:6.2f} s "
                        f"{sample.sent / sample.seconds:7.1f} inst/s, stored {sample.stored}"
                        f"/{sample.sent}, CPU s receiver {sample.receiver_cpu_s:.2f} "
                        f"storescu {sample.storescu_cpu_s:.2f} other {sample.other_cpu_s:.2f}"
                    )
        profile = None
        if args.profile is not None and "dicomnode" in names:
            raw = profile_dicomnode(tools, data, scratch, args.profile)
            if raw is not None and raw.exists():
                snapshot = tools.dicomnode_env.get("PYTHONPATH", "")
                profile = summarize_collapsed(raw, search_paths=[snapshot, *sys.path])
    finally:
        # Runs with problems keep their directories (logs, storage); drop the rest.
        with contextlib.suppress(OSError):
            scratch.rmdir()

    notes = []
    if source and not args.snapshot and tree_hash(source) != source_hash:
        notes.append(
            "The dicomnode source changed while the benchmark ran, so its numbers mix "
            "versions; use --snapshot."
        )
    section = render_report(info, args, data, receivers, samples, profile, notes)
    print(section)
    if not args.no_report:
        write_report(args.out, section, args.append)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
