#!/usr/bin/env python3
"""WADO-RS single-frame retrieval with the frame table recorded at ingest (the header and the
asked frame read by byte range) vs without it (instances.frame_table NULL: the whole object
read, as before), on the filesystem store and on an S3-compatible one (SeaweedFS on
loopback), in the same run.

    .venv/bin/python bench/frame_ranges.py [--frames 300] [--frame 100] [--repeat 11]

Makes one native multi-frame object (`frames` 512x512 16-bit CT-like slices) and the same
pixels RLE Lossless encoded, starts two `dicomnode serve` nodes (SQLite index; blobs on the
filesystem, or in a SeaweedFS bucket), sends both objects to each with dcmtk storescu, then per
repetition asks every (store, object, with/without table) for frame `frame`, interleaved: the
bench sets or clears the instance's frame_table in the node's index between requests (not
timed), times one GET on a kept-alive connection (body read whole), checks that the body holds
the frame's bytes, and reads the node's peak RSS for that request (VmHWM, reset before it).
Medians and the ratio without/with go to bench/RESULTS-frame-ranges.md with the machine and
the date. Everything runs on 127.0.0.1; client, nodes and SeaweedFS share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import requests  # noqa: E402
from common import child_env, make_log, phantom_slice  # noqa: E402
from object_store import machine, start_node  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import generate_fragmented_frames  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    generate_uid,
)

from tests.realclients.seaweedfs import SeaweedFS, start_seaweedfs  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS-frame-ranges.md"
STORES = ("filesystem", "s3")
VARIANTS = ("table", "whole")  # (a) frame table as ingested, (b) frame_table NULL
ACCEPT = {
    "native": 'multipart/related; type="application/octet-stream"',
    "rle": 'multipart/related; type="image/dicom-rle"',  # as stored: nothing decoded
}
log = make_log("frames")


@dataclass
class Node:
    store: str
    folder: Path
    process: subprocess.Popen
    session: requests.Session
    root: str

    @property
    def index(self) -> Path:
        return self.folder / "index.sqlite"


@dataclass
class TestObject:
    name: str
    path: Path
    study: str
    series: str
    instance: str
    frame: bytes  # frame `--frame` as it is sent back (native pixels or the RLE bitstream)


def make_objects(folder: Path, frames: int, wanted: int) -> list[TestObject]:
    """A native multi-frame object and the same pixels RLE Lossless encoded, in one series."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    grid = tuple(np.mgrid[0:512, 0:512].astype(np.float32))
    pixels = np.stack([phantom_slice(float(z), rng, grid) for z in range(frames)])
    study, series = generate_uid(), generate_uid()
    objects = []
    for name in ("native", "rle"):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName = "BENCH", "Bench^Frames"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.StudyDate, ds.InstanceNumber = "OT", "20261207", len(objects) + 1
        ds.NumberOfFrames, ds.Rows, ds.Columns = frames, 512, 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        frame = pixels[wanted - 1].tobytes()
        if name == "rle":
            ds.compress(RLELossless, encoding_plugin="pylibjpeg")
            fragmented = generate_fragmented_frames(ds.PixelData, number_of_frames=frames)
            frame = next(b"".join(f) for n, f in enumerate(fragmented, 1) if n == wanted)
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        objects.append(TestObject(name, path, study, series, ds.SOPInstanceUID, frame))
    return objects


def ready_line(folder: Path) -> dict:
    """The node's "ready" log record."""
    for line in (folder / "serve.log").read_text(errors="replace").splitlines():
        if '"event": "ready"' in line:
            return json.loads(line)
    raise SystemExit(f"no ready line in {folder / 'serve.log'}")


def token(folder: Path) -> str:
    """A bearer token from `dicomnode token create` with the node's config."""
    done = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "token", "create", "--config"]
        + [str(folder / "node.toml"), "--scope", "dicomweb.read", "--subject", "bench"]
        + ["--expires", "2h"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"token create failed: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1].strip()


def open_node(work: Path, store: str, server: SeaweedFS) -> Node:
    folder = work / store
    process, _ = start_node(folder, store, server)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token(folder)}"
    root = f"http://127.0.0.1:{ready_line(folder)['http_port']}/dicomweb"
    return Node(store, folder, process, session, root)


def send(node: Node, obj: TestObject) -> float:
    """dcmtk storescu of one object to the node (RLE proposed for the RLE one, which goes as
    stored); the wall-clock seconds."""
    port = ready_line(node.folder)["dimse_port"]
    propose = ["-xr"] if obj.name == "rle" else []
    started = time.monotonic()
    done = subprocess.run(
        ["/usr/bin/storescu", *propose, "-aet", "BENCH", "-aec", "DICOMNODE", "-nh", "127.0.0.1"]
        + [str(port), str(obj.path)],
        capture_output=True,
        text=True,
        env=child_env(),
        check=False,
    )
    if done.returncode != 0 or "E:" in done.stderr:  # a refused store still exits 0
        raise SystemExit(f"storescu failed: {done.stderr[-2000:]}")
    return time.monotonic() - started


def frame_table(node: Node, uid: str) -> str:
    with sqlite3.connect(node.index, timeout=30) as conn:
        row = conn.execute(
            "SELECT frame_table FROM instances WHERE sop_instance_uid = ?", (uid,)
        ).fetchone()
    if row is None or not row[0]:
        raise SystemExit(f"{node.store}: no frame table indexed for {uid}")
    return str(row[0])


def set_frame_table(node: Node, uid: str, table: str | None) -> None:
    with sqlite3.connect(node.index, timeout=30) as conn:
        conn.execute(
            "UPDATE instances SET frame_table = ? WHERE sop_instance_uid = ?", (table, uid)
        )


def reset_peak_rss(pid: int) -> None:
    """Set VmHWM back to the current RSS (Linux: 5 > /proc/PID/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def rss_mib(pid: int, field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def retrieve(node: Node, obj: TestObject, frame: int) -> tuple[float, float]:
    """Time one GET of frame `frame`; (seconds, how far the node's RSS rose above what it was
    before, at its peak, in MiB)."""
    url = (
        f"{node.root}/studies/{obj.study}/series/{obj.series}/instances/{obj.instance}"
        f"/frames/{frame}"
    )
    reset_peak_rss(node.process.pid)
    before = rss_mib(node.process.pid, "VmRSS")
    started = time.perf_counter()
    response = node.session.get(url, headers={"Accept": ACCEPT[obj.name]}, timeout=300)
    body = response.content
    seconds = time.perf_counter() - started
    rise = rss_mib(node.process.pid, "VmHWM") - before
    if response.status_code != 200 or obj.frame not in body:
        raise SystemExit(f"{node.store} {obj.name}: {response.status_code} {body[:300]!r}")
    return seconds, rise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--frame", type=int, default=100, help="the frame asked for (1-based)")
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--output", type=Path, default=RESULTS, help="results file (appended)")
    args = parser.parse_args()
    command = " ".join([".venv/bin/python bench/frame_ranges.py", *sys.argv[1:]])
    work = Path(tempfile.mkdtemp(prefix="dicomnode-bench-frames-"))
    began = datetime.now(UTC)
    about = machine()
    loads = [os.getloadavg()[0]]
    times: dict[tuple[str, str, str], list[float]] = {}
    peaks: dict[tuple[str, str, str], list[float]] = {}
    resident: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    ingest: dict[tuple[str, str], float] = {}
    nodes: list[Node] = []
    server = None
    try:
        log(f"making {args.frames}-frame objects")
        objects = make_objects(work / "files", args.frames, args.frame)
        sizes = {o.name: o.path.stat().st_size for o in objects}
        server = start_seaweedfs(work / "seaweedfs")
        nodes = [open_node(work, store, server) for store in STORES]
        tables = {}
        for node in nodes:
            for obj in objects:
                ingest[(node.store, obj.name)] = send(node, obj)
                tables[(node.store, obj.name)] = frame_table(node, obj.instance)
                log(f"{node.store} {obj.name}: stored in {ingest[(node.store, obj.name)]:.1f} s")
        cases = [(n, o, v) for n in nodes for o in objects for v in VARIANTS]
        for repetition in range(-1, args.repeat):  # -1: a warm-up, not counted
            order = cases if repetition % 2 else cases[::-1]
            for node, obj, variant in order:
                table = tables[(node.store, obj.name)] if variant == "table" else None
                set_frame_table(node, obj.instance, table)
                seconds, rise = retrieve(node, obj, args.frame)
                if repetition >= 0:
                    key = (node.store, obj.name, variant)
                    times.setdefault(key, []).append(seconds)
                    peaks.setdefault(key, []).append(rise)
                    resident.setdefault(node.store, []).append(rss_mib(node.process.pid, "VmRSS"))
            loads.append(os.getloadavg()[0])
            log(f"repetition {repetition + 1}/{args.repeat} done (load {loads[-1]:.1f})")
        for node in nodes:
            for obj in objects:
                set_frame_table(node, obj.instance, tables[(node.store, obj.name)])
    finally:
        for node in nodes:
            node.process.send_signal(signal.SIGTERM)
            node.process.wait(60)
        if server is not None:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)
    write_results(args, command, began, about, loads, sizes, ingest, times, peaks, resident)


def write_results(
    args: argparse.Namespace,
    command: str,
    began: datetime,
    about: str,
    loads: list[float],
    sizes: dict[str, int],
    ingest: dict[tuple[str, str], float],
    times: dict[tuple[str, str, str], list[float]],
    peaks: dict[tuple[str, str, str], list[float]],
    resident: dict[str, list[float]],
) -> None:
    rows = []
    for name in ACCEPT:
        for store in STORES:
            with_table = statistics.median(times[(store, name, "table")])
            for variant in VARIANTS:
                key = (store, name, variant)
                median = statistics.median(times[key])
                ratio = f"{median / with_table:.1f}" if variant == "whole" else "1"
                rows.append(
                    f"| {name} | {store} | {'(a) table' if variant == 'table' else '(b) whole'} "
                    f"| {median * 1000:.1f} | {ratio} | {statistics.median(peaks[key]):.0f} "
                    f"| {max(peaks[key]):.0f} | "
                    + ", ".join(f"{t * 1000:.0f}" for t in times[key])
                    + " |"
                )
    stored = ", ".join(f"{s} {n} {t:.1f} s" for (s, n), t in ingest.items())
    section = "\n".join(
        [
            f"## Run of {began:%Y-%m-%d %H:%M} UTC",
            "",
            "### Machine",
            "",
            about,
            f"- load average (1 min) during the run: {min(loads):.1f} to {max(loads):.1f}, "
            "the machine shared with a test-suite run",
            "",
            "### Method",
            "",
            f"- `{command}`",
            f"- Objects: {args.frames} frames of 512x512 16-bit CT-like pixels (Multi-frame "
            f"Grayscale Word SC), native Explicit VR Little Endian "
            f"({sizes['native'] / 2**20:.1f} MiB) and the same pixels RLE Lossless "
            f"({sizes['rle'] / 2**20:.1f} MiB, one fragment per frame), sent with storescu "
            f"({stored}).",
            "- Two `dicomnode serve` nodes (SQLite index; blobs on the filesystem, or in a "
            "SeaweedFS bucket on loopback), both running through the run.",
            f"- Each of {args.repeat} repetitions (after one warm-up) asks every (object, store, "
            "variant) for frame "
            f"{args.frame} once, in one order and the next repetition in reverse: (a) with the "
            "frame table indexed at ingest (header and frame by byte range), (b) with "
            "instances.frame_table set to NULL just before (the whole object read, as before "
            "the table existed). One GET on a kept-alive requests session with a bearer token, "
            "timed to the body read whole; native frames asked as application/octet-stream, "
            "RLE as image/dicom-rle (as stored, not decoded); every body checked to hold the "
            "frame's bytes.",
            "- RSS rise: the node process's peak RSS during the request (VmHWM, reset by "
            "`5 > /proc/PID/clear_refs` just before) minus its RSS just before; the node's "
            "RSS between requests was "
            + ", ".join(
                f"{store} {min(values):.0f} to {max(values):.0f} MiB"
                for store, values in resident.items()
            )
            + ".",
            "",
            "### Results (medians)",
            "",
            "| object | store | variant | ms | (b)/(a) | RSS rise MiB | max RSS rise MiB | "
            "runs (ms) |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
            *rows,
            "",
        ]
    )
    head = "# WADO-RS frames: frame table (byte ranges) vs the whole object\n\n"
    head += "Produced by `bench/frame_ranges.py`.\n\n"
    old = args.output.read_text() if args.output.exists() else head
    args.output.write_text(old.rstrip() + "\n\n" + section)
    print(section)


if __name__ == "__main__":
    main()
