#!/usr/bin/env python3
"""C-STORE ingest into one `dicomnode serve` with its blobs on the filesystem vs in an
S3-compatible bucket (SeaweedFS on loopback, bucket fsync=true), in the same run.

    .venv/bin/python bench/object_store.py [--count 300] [--repeat 3] [--associations 1 4]

Generates `count` synthetic 512x512 16-bit CT objects once, then for each repetition and each
association count runs the two stores interleaved: a fresh node (SQLite index, empty data
folder; for S3 a fresh key prefix in one SeaweedFS bucket) is started, dcmtk `storescu` sends
every file (N processes each sending 1/N of them), only the storescu run is timed, and the
instances indexed are counted. Medians go to bench/RESULTS-object-store.md with the machine
and the date. Everything runs on 127.0.0.1; client, node and SeaweedFS share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from tests.realclients.seaweedfs import SeaweedFS, start_seaweedfs, weed_binary  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS-object-store.md"
STORES = ("filesystem", "s3")


def make_files(folder: Path, count: int) -> list[Path]:
    """`count` CT objects of one study in `folder` (512x512 noise, 525 kB each)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    paths = []
    for number in range(1, count + 1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName = "BENCH", "Bench^Object"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.StudyDate, ds.InstanceNumber = "CT", "20261207", number
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
        path = folder / f"{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storage_section(store: str, server: SeaweedFS) -> str:
    if store == "filesystem":
        return ""
    return "\n".join(
        [
            "[storage]",
            'backend = "s3"',
            f'endpoint = "{server.endpoint}"',
            'bucket = "dicomnode"',
            f'prefix = "bench-{uuid.uuid4().hex[:12]}"',
            f'credentials_file = "{server.credentials_file}"',
        ]
    )


def start_node(folder: Path, store: str, server: SeaweedFS) -> tuple[subprocess.Popen, int]:
    """`dicomnode serve` with a fresh data folder; returns it and its DIMSE port."""
    folder.mkdir(parents=True)
    config = folder / "node.toml"
    config.write_text(
        "\n".join(
            [
                "[node]",
                f'data_dir = "{folder / "data"}"',
                "min_free_bytes = 0",
                "[dimse]",
                'host = "127.0.0.1"',
                "port = 0",
                "max_associations = 16",
                "[http]",
                'host = "127.0.0.1"',
                "port = 0",
                "[database]",
                f'url = "sqlite:///{folder / "index.sqlite"}"',
                storage_section(store, server),
            ]
        )
        + "\n"
    )
    log = folder / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if '"event": "ready"' in line:
                return process, int(json.loads(line)["dimse_port"])
        if process.poll() is not None:
            raise SystemExit(f"serve exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    raise SystemExit("serve did not get ready")


def send(port: int, files: list[Path], associations: int) -> float:
    """storescu over `associations` parallel processes; the wall-clock seconds."""
    parts = [files[i::associations] for i in range(associations)]
    started = time.monotonic()
    senders = [
        subprocess.Popen(
            ["storescu", "-aet", "BENCH", "-aec", "DICOMNODE", "-nh", "127.0.0.1", str(port)]
            + [str(p) for p in part],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        for part in parts
    ]
    failed = [s.communicate()[1] for s in senders if s.wait() != 0]
    elapsed = time.monotonic() - started
    if failed:
        raise SystemExit(f"storescu failed: {failed[0][-2000:]!r}")
    return elapsed


def indexed(folder: Path) -> int:
    with sqlite3.connect(folder / "index.sqlite") as conn:
        return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2**30
    weed = subprocess.run([weed_binary(), "version"], capture_output=True, text=True).stdout
    import obstore

    commit = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    ).stdout.strip()
    return "\n".join(
        [
            f"- nproc: {os.cpu_count()}; CPU: {cpu}; RAM: {memory:.1f} GiB; "
            f"kernel {platform.release()}; load average before: {os.getloadavg()[0]:.1f}",
            f"- Python {platform.python_version()}, obstore {obstore.__version__}, "
            f"SeaweedFS {weed.split()[2] if weed else '?'} (weed server on loopback, "
            "bucket fsync=true), dcmtk storescu",
            f"- source: {commit[:100]}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dicomnode-bench-s3-"))
    began = datetime.now(UTC)
    about = machine()
    runs: dict[tuple[str, int], list[float]] = {}
    complete: dict[tuple[str, int], int] = {}
    try:
        files = make_files(work / "files", args.count)
        size = sum(p.stat().st_size for p in files)
        server = start_seaweedfs(work / "seaweedfs")
        try:
            for repetition in range(args.repeat):
                for associations in args.associations:
                    for store in STORES:
                        folder = work / f"{store}-{associations}-{repetition}"
                        process, port = start_node(folder, store, server)
                        try:
                            seconds = send(port, files, associations)
                        finally:
                            process.send_signal(signal.SIGTERM)
                            process.wait(60)
                        runs.setdefault((store, associations), []).append(seconds)
                        ok = indexed(folder) == len(files)
                        complete[(store, associations)] = (
                            complete.get((store, associations), 0) + ok
                        )
                        print(f"{store} x{associations}: {seconds:.2f} s", file=sys.stderr)
        finally:
            server.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(args, began, about, size, runs, complete)


def write_results(
    args: argparse.Namespace,
    began: datetime,
    about: str,
    size: int,
    runs: dict[tuple[str, int], list[float]],
    complete: dict[tuple[str, int], int],
) -> None:
    rows = []
    for associations in args.associations:
        base = statistics.median(runs[("filesystem", associations)])
        for store in STORES:
            times = runs[(store, associations)]
            median = statistics.median(times)
            rows.append(
                f"| {store} | {associations} | {median:.2f} | {args.count / median:.0f} | "
                f"{size / 1e6 / median:.0f} | {median / base:.2f} | "
                f"{complete[(store, associations)]}/{len(times)} | "
                + ", ".join(f"{t:.2f}" for t in times)
                + " |"
            )
    section = "\n".join(
        [
            f"## Run of {began:%Y-%m-%d %H:%M} UTC",
            "",
            "### Machine",
            "",
            about,
            "",
            "### Method",
            "",
            f"- {args.count} synthetic CT objects (512x512, 16-bit, Explicit VR Little Endian), "
            f"{size / 1e6:.1f} MB, page-cached; one study.",
            "- Per repetition and association count, the two stores interleaved; each run a fresh "
            "`dicomnode serve` (SQLite index, empty data folder; S3: a fresh key prefix in one "
            "SeaweedFS bucket with fsync=true, so both stores sync every object before success).",
            "- Time: wall clock of the storescu process(es) only; N associations = N storescu "
            "processes each sending 1/N of the files. All stored = the index counted every "
            "object after the run.",
            "",
            "### Results (medians)",
            "",
            "| store | associations | seconds | instances/s | MB/s | vs filesystem | all stored "
            "| runs (s) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            *rows,
            "",
        ]
    )
    head = "# C-STORE ingest: filesystem vs S3-compatible object store\n\n"
    head += "Produced by `bench/object_store.py`.\n\n"
    old = RESULTS.read_text() if RESULTS.exists() else head
    RESULTS.write_text(old.rstrip() + "\n\n" + section)
    print(section)


if __name__ == "__main__":
    main()
