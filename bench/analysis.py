"""Speed of the built-in analyzers and the latency of write-back (hand-run, not a test).

    python bench/analysis.py                                  # print the report
    python bench/analysis.py --write bench/ANALYSIS_RESULTS.md

Three measurements:

1. xa-qca per 512x512 frame: the whole plugin (`XaQca.analyze`: read the instance, choose
   the frame, analyse it, build the SEG and the SR) on single-frame phantom instances, and
   on a 30-frame cine (frame choice included), in this process pinned to one core with
   single-threaded numerical libraries;
2. ct-lung per 100-slice 512x512 CT series (`CtLung.analyze`, same pinning);
3. latency: a real node (in this process: DIMSE, HTTP, one analysis worker, SQLite) is sent
   an XA cine, or a 100-slice CT series, with dcmtk's storescu; the time from storescu's
   exit (the last instance received and stored) until the SR is listed by QIDO-RS. The CT
   slices carry ImagesInAcquisition, so their unit completes on the announced count instead
   of a quiet period. The node runs on every core (no pinning).
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import child_env, describe_source, dicomnode_source, first_line, make_log  # noqa: E402

from dicomnode.analysis.ct_lung import CtLung  # noqa: E402
from dicomnode.analysis.ct_lung.phantom import chest_phantom, phantom_series  # noqa: E402
from dicomnode.analysis.plugin import AnalysisContext, InputUnit, deterministic_uid  # noqa: E402
from dicomnode.analysis.xa_qca.analyzer import XaQca  # noqa: E402
from dicomnode.analysis.xa_qca.phantom import xa_cine, xa_dataset, xa_phantom  # noqa: E402

log = make_log("analysis")
CT_SPACING_MM = (3.0, 0.7, 0.7)  # slice, row, column: a 358 mm field of view at 512x512


# --- environment -------------------------------------------------------------------------


def lscpu_model() -> str:
    for line in output_lines(["lscpu"]):
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def output_lines(cmd: list[str]) -> list[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return []


def machine(load_at_start: tuple[float, float, float]) -> list[str]:
    load, now = load_at_start, os.getloadavg()
    source = dicomnode_source()
    return [
        f"- CPU: {lscpu_model()}; cores (nproc): {os.cpu_count()}; "
        f"RAM: {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB; "
        f"kernel {platform.release()}",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, "
        f"{first_line(['storescu', '--version']).strip('$ ').removeprefix('dcmtk: ')}",
        f"- {describe_source(source) if source else 'dicomnode source not found'}",
        f"- load average (1, 5, 15 min) when the run started: {load[0]:.2f}, {load[1]:.2f}, "
        f"{load[2]:.2f}; when it ended: {now[0]:.2f}, {now[1]:.2f}, {now[2]:.2f} (the machine "
        "is shared with other jobs, so figures are medians)",
    ]


def pin_to_one_core() -> tuple[set[int], str]:
    """Pin this process to one CPU; returns the previous affinity and what was done."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    return before, f"pinned to CPU {cpu}; OMP/OpenBLAS/MKL threads = 1"


# --- 1 and 2: analysis time ---------------------------------------------------------------


def run_plugin(analyzer, datasets: list, folder: Path) -> tuple[float, float, object]:
    """Write `datasets` as one unit's files and time `analyzer.analyze` (wall, CPU)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    key = (
        datasets[0].SOPInstanceUID if analyzer.unit == "instance" else datasets[0].SeriesInstanceUID
    )
    unit = InputUnit(
        key,
        datasets[0].StudyInstanceUID,
        "PHANTOM",
        paths,
        [ds.SOPInstanceUID for ds in datasets],
    )
    context = AnalysisContext(
        {},
        lambda role: deterministic_uid(analyzer.name, "bench", key, role),
        datetime.now(UTC),
        folder,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    result = analyzer.analyze(unit, context)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def bench_xa(seeds: int, work: Path) -> dict[str, object]:
    rows = []
    for seed in range(seeds):
        phantom = xa_phantom(seed)
        ds = xa_dataset(phantom.image, phantom.pixel_spacing_mm)
        wall, cpu, result = run_plugin(XaQca(), [ds], work / f"xa{seed}")
        lesions = len(result.summary["lesions"])
        log(f"xa seed {seed}: {wall:.2f} s wall, {cpu:.2f} s CPU, {lesions} lesion(s)")
        rows.append((wall, cpu))
    cine = xa_cine(0, n_frames=30)
    ds = xa_dataset(cine.frames, cine.pixel_spacing_mm)
    cine_wall, cine_cpu, _ = run_plugin(XaQca(), [ds], work / "cine")
    log(f"xa 30-frame cine: {cine_wall:.2f} s wall, {cine_cpu:.2f} s CPU")
    return {
        "frames": len(rows),
        "wall": statistics.median(r[0] for r in rows),
        "cpu": statistics.median(r[1] for r in rows),
        "max_wall": max(r[0] for r in rows),
        "cine_wall": cine_wall,
        "cine_cpu": cine_cpu,
    }


def bench_ct(runs: int, work: Path) -> dict[str, object]:
    rows = []
    for seed in range(runs):
        series = phantom_series(chest_phantom(seed, slices=100, size=512, spacing_mm=CT_SPACING_MM))
        wall, cpu, result = run_plugin(CtLung(), series, work / f"ct{seed}")
        log(f"ct seed {seed}: {wall:.2f} s wall, {cpu:.2f} s CPU, lungs {result.summary}")
        rows.append((wall, cpu))
    return {
        "runs": len(rows),
        "wall": statistics.median(r[0] for r in rows),
        "cpu": statistics.median(r[1] for r in rows),
    }


# --- 3: latency through a running node -----------------------------------------------------


def start_node(data_dir: Path):
    """A node in this process on free loopback ports, SQLite, one analysis worker."""
    from dicomnode.config import read_settings
    from dicomnode.serve import Node

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    config = data_dir.parent / "node.toml"
    config.write_text(
        "\n".join(
            [
                "[node]",
                'ae_title = "DICOMNODE"',
                f'data_dir = "{data_dir}"',
                "[dimse]",
                'host = "127.0.0.1"',
                "port = 0",
                "[http]",
                'host = "127.0.0.1"',
                "port = 0",
                "[database]",
                f'url = "sqlite:///{data_dir.parent / "index.sqlite"}"',
                "[logging]",
                'level = "WARNING"',
                "[analysis]",
                "workers = 1",
                "sweep_interval = 0.1",
            ]
        )
        + "\n"
    )
    node = Node(read_settings(config))
    node.start()
    return node


def qido_sr_listed(node) -> Callable[[str], bool]:
    import requests

    from dicomnode.archive.keys import shared_signing_key
    from dicomnode.dicomweb.auth import issue_token

    key = shared_signing_key(node.settings.database_url)
    token = issue_token(key, node.settings.auth, "bench", ["dicomweb.read"], 3600)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    base = f"http://127.0.0.1:{node.http_port}/dicomweb"

    def listed(study: str) -> bool:
        answer = session.get(
            f"{base}/studies/{study}/series", params={"Modality": "SR"}, timeout=30
        )
        return answer.status_code == 200 and bool(answer.content) and len(answer.json()) > 0

    return listed


def send_and_wait(node, listed, folder: Path, study: str, timeout: float = 300) -> float:
    storescu = shutil.which("storescu") or "storescu"
    sent = subprocess.run(
        [storescu, "-aec", "DICOMNODE", "127.0.0.1", str(node.dimse.port), "+sd", str(folder)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
    )
    received = time.perf_counter()
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed: {sent.stderr[-2000:]}")
    while time.perf_counter() - received < timeout:
        if listed(study):
            return time.perf_counter() - received
        time.sleep(0.02)
    raise RuntimeError(f"no SR in QIDO-RS after {timeout} s")


def bench_latency(xa_runs: int, ct_runs: int, work: Path) -> dict[str, object]:
    node = start_node(work / "node" / "data")
    try:
        listed = qido_sr_listed(node)
        xa_times, ct_times = [], []
        for run in range(xa_runs):
            cine = xa_cine(100 + run, n_frames=30)
            ds = xa_dataset(cine.frames, cine.pixel_spacing_mm)
            folder = work / f"send-xa{run}"
            folder.mkdir()
            ds.save_as(folder / "cine.dcm", enforce_file_format=True)
            seconds = send_and_wait(node, listed, folder, ds.StudyInstanceUID)
            log(f"latency xa run {run}: {seconds:.2f} s")
            xa_times.append(seconds)
        for run in range(ct_runs):
            series = phantom_series(
                chest_phantom(100 + run, slices=100, size=512, spacing_mm=CT_SPACING_MM)
            )
            folder = work / f"send-ct{run}"
            folder.mkdir()
            for ds in series:
                ds.ImagesInAcquisition = len(series)
                ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            seconds = send_and_wait(node, listed, folder, series[0].StudyInstanceUID)
            log(f"latency ct run {run}: {seconds:.2f} s")
            ct_times.append(seconds)
    finally:
        node.stop()
    return {
        "xa_runs": len(xa_times),
        "xa": statistics.median(xa_times) if xa_times else None,
        "xa_all": xa_times,
        "ct_runs": len(ct_times),
        "ct": statistics.median(ct_times) if ct_times else None,
        "ct_all": ct_times,
    }


# --- report ------------------------------------------------------------------------------


def report(
    started: datetime, load: tuple[float, float, float], took: float, pinned: str, xa, ct, latency
) -> list[str]:
    def listing(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    # judged on CPU time: on a shared machine the wall time of a pinned process also counts
    # the time its core spent on other jobs
    verdict = "meets" if xa["cpu"] < 2.0 else "misses"
    return [
        f"## Run of {started:%Y-%m-%d %H:%M} UTC (took {took:.0f} s)",
        "",
        "### Machine",
        "",
        *machine(load),
        f"- analysis timings (1, 2): {pinned}; latency (3): the node used every core",
        "",
        "### Results (medians)",
        "",
        "| measurement | runs | median wall s | median CPU s | target |",
        "|---|---:|---:|---:|---|",
        f"| xa-qca plugin, one 512x512 frame (read, analyse, SEG + SR) | {xa['frames']} "
        f"| {xa['wall']:.2f} | {xa['cpu']:.2f} | < 2 s per frame on one core: {verdict} (CPU) |",
        f"| xa-qca plugin, 30-frame 512x512 cine (frame choice included) | 1 "
        f"| {xa['cine_wall']:.2f} | {xa['cine_cpu']:.2f} | brief: <= 30 s per 60-frame cine |",
        f"| ct-lung plugin, 100-slice 512x512 CT series (read, segment, SEG + SR) | {ct['runs']} "
        f"| {ct['wall']:.2f} | {ct['cpu']:.2f} | none set |",
        f"| latency: storescu of one 30-frame XA cine done -> SR listed by QIDO-RS "
        f"| {latency['xa_runs']} | {latency['xa']:.2f} | - | none set |",
        f"| latency: storescu of a 100-slice CT series done -> SR listed by QIDO-RS "
        f"| {latency['ct_runs']} | {latency['ct']:.2f} | - | none set |",
        "",
        f"Slowest single XA frame: {xa['max_wall']:.2f} s. Every latency run (s): XA "
        f"{listing(latency['xa_all'])}; CT {listing(latency['ct_all'])}.",
        "",
        "### Method",
        "",
        "- XA: single-frame 512x512 phantom instances (0.25 mm/px, 2% noise, seeds "
        f"0-{xa['frames'] - 1}; `dicomnode/analysis/xa_qca/phantom.py`), each written to a "
        "file and given to `XaQca.analyze` as a job would; the time covers reading the file, "
        "the analysis and building the SEG and the SR (not writing them back). The frames run "
        "one after the other in one process, as in a node, so the lumen-model tables that "
        "depend only on the PSF candidates and the pixel spacing are built once; the first "
        "frame also pays for building them and for the libraries' first use. The cine is "
        "`xa_cine(0, n_frames=30)`.",
        f"- CT: `chest_phantom(seed, slices=100, size=512, spacing_mm={CT_SPACING_MM})`, "
        "100 files given to `CtLung.analyze` (body and lung masks, 2-segment SEG of 100 "
        "frames, Comprehensive 3D SR).",
        "- Latency: an in-process `Node` (DIMSE + HTTP + one analysis worker, SQLite, "
        "sweep interval 0.1 s) on loopback; dcmtk storescu sends the study; the clock starts "
        "when storescu exits (every instance stored) and stops when "
        "`GET /dicomweb/studies/{uid}/series?Modality=SR` lists the SR (polled every 20 ms). "
        "XA units are analysed on receipt; the CT slices carry ImagesInAcquisition = 100, so "
        "the series completes on its count (no quiet period).",
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xa-seeds", type=int, default=12)
    parser.add_argument("--ct-runs", type=int, default=3)
    parser.add_argument("--latency-xa", type=int, default=5)
    parser.add_argument("--latency-ct", type=int, default=3)
    parser.add_argument("--write", type=Path, help="append the report to this Markdown file")
    args = parser.parse_args()
    started, clock, load = datetime.now(UTC), time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-analysis-") as tmp:
        work = Path(tmp)
        before, pinned = pin_to_one_core()
        xa = bench_xa(args.xa_seeds, work)
        ct = bench_ct(args.ct_runs, work)
        os.sched_setaffinity(0, before)
        latency = bench_latency(args.latency_xa, args.latency_ct, work)
    lines = report(started, load, time.perf_counter() - clock, pinned, xa, ct, latency)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        header = (
            "# Analysis speed and write-back latency\n\n"
            "Produced by `bench/analysis.py --write bench/ANALYSIS_RESULTS.md`.\n\n"
        )
        existing = args.write.read_text() if args.write.exists() else header
        args.write.write_text(existing + ("\n" if not existing.endswith("\n\n") else "") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
