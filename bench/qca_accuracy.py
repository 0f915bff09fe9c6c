"""Accuracy and speed of the xa-qca image-analysis core on synthetic angiograms.

    python bench/qca_accuracy.py                      # per-seed table, seeds 0-11, 0.25 mm, 2%
    python bench/qca_accuracy.py --noise 0.04 --seeds 24
    python bench/qca_accuracy.py --write bench/QCA_RESULTS.md   # the full report

The process pins itself to one CPU core and single-threaded numerical libraries, so that the
time per frame is the time on one core. The phantom, its truth and the scoring are in
dicomnode/analysis/xa_qca/phantom.py; the targets are those of the analysis brief (6.2).
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicomnode.analysis.xa_qca.phantom import Score, score, xa_cine, xa_phantom  # noqa: E402
from dicomnode.analysis.xa_qca.qca import analyze_frame, choose_frame  # noqa: E402


def pin_to_one_core() -> str:
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    except (AttributeError, OSError):
        return "not pinned (no sched_setaffinity)"


def run(seeds, noise: float, spacing: float, crossing: bool = False):
    rows = []
    for seed in seeds:
        phantom = xa_phantom(seed, pixel_spacing_mm=spacing, noise=noise, crossing=crossing)
        wall, cpu = time.perf_counter(), time.process_time()
        result = analyze_frame(phantom.image, phantom.pixel_spacing_mm)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        flagged = any(les.branch_at_lesion for les in result.lesions)
        rows.append((score(phantom, result), wall, cpu, flagged))
    return rows


def _f(value: float | None, digits: int = 3, sign: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def table(rows) -> list[str]:
    lines = [
        "| seed | nominal %DS | true %DS | true MLD mm | Dice | %DS error | MLD error mm "
        "| RVD error mm | location error mm | length error mm | healthy bias mm "
        "| lesions (false) | s (wall) | s (CPU) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, wall, cpu, _ in rows:
        lines.append(
            f"| {s.seed} | {s.nominal_percent:.0f} | {s.true_percent:.1f} | {s.true_mld_mm:.2f} "
            f"| {s.dice:.3f} | {_f(s.percent_ds_error, 2)} | {_f(s.mld_error_mm)} "
            f"| {_f(s.reference_error_mm)} | {_f(s.location_error_mm, 2, False)} "
            f"| {_f(s.length_error_mm, 2)} | {_f(s.healthy_bias_mm)} "
            f"| {s.reported_lesions} ({s.false_lesions}) | {wall:.2f} | {cpu:.2f} |"
        )
    return lines


def _abs(scores: list[Score], name: str) -> np.ndarray:
    return np.array([abs(getattr(s, name)) for s in scores if getattr(s, name) is not None])


def summary(rows) -> dict[str, str]:
    scores = [r[0] for r in rows]
    found = [s for s in scores if s.percent_ds_error is not None]
    ds, mld = _abs(scores, "percent_ds_error"), _abs(scores, "mld_error_mm")
    ref, loc = _abs(scores, "reference_error_mm"), _abs(scores, "location_error_mm")
    length = _abs(scores, "length_error_mm")
    bias = [s.healthy_bias_mm for s in scores if s.healthy_bias_mm is not None]
    mae = [s.healthy_mae_mm for s in scores if s.healthy_mae_mm is not None]
    dice = [s.dice for s in scores]

    def stat(values, fmt, *parts):
        if len(values) == 0:
            return "-"
        out = []
        for part in parts:
            if part == "mean":
                out.append(f"mean {np.mean(values):{fmt}}")
            elif part == "min":
                out.append(f"min {np.min(values):{fmt}}")
            elif part == "max":
                out.append(f"max {np.max(values):{fmt}}")
            elif part == "p90":
                out.append(f"p90 {np.percentile(values, 90):{fmt}}")
        return ", ".join(out)

    return {
        "cases": str(len(scores)),
        "cases with a lesion reported": f"{len(found)} / {len(scores)}",
        "false lesions reported": str(sum(s.false_lesions for s in scores)),
        "lesions flagged 'branch at lesion'": str(sum(r[3] for r in rows)),
        "lumen Dice": stat(dice, ".3f", "mean", "min"),
        "%DS abs. error (points)": stat(ds, ".2f", "mean", "p90", "max"),
        "MLD abs. error (mm)": stat(mld, ".3f", "mean", "p90", "max"),
        "MLD error, signed mean (mm)": (
            f"{np.mean([s.mld_error_mm for s in found]):+.3f}" if found else "-"
        ),
        "RVD abs. error (mm)": stat(ref, ".3f", "mean", "p90"),
        "healthy-segment diameter (mm)": (
            f"median bias {np.median(bias):+.3f}, MAE {np.mean(mae):.3f}" if bias else "-"
        ),
        "MLD location error (mm)": stat(loc, ".2f", "mean", "p90", "max"),
        "lesion length abs. error vs 90%-of-reference length (mm)": stat(
            length, ".2f", "mean", "max"
        ),
        "time per frame, median (s, wall / CPU)": (
            f"{statistics.median(r[1] for r in rows):.2f} / "
            f"{statistics.median(r[2] for r in rows):.2f}"
        ),
    }


def summary_lines(title: str, rows) -> list[str]:
    lines = [f"**{title}**", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary(rows).items()]
    return lines + [""]


def frame_choice(seeds) -> list[str]:
    lines = [
        "| cine seed | maximum-contrast frame | chosen frame | difference | s for 30 frames |",
        "|---:|---:|---:|---:|---:|",
    ]
    diffs = []
    for seed in seeds:
        cine = xa_cine(seed)
        start = time.perf_counter()
        chosen = choose_frame(cine.frames, None)
        seconds = time.perf_counter() - start
        diffs.append(chosen - cine.max_contrast_frame)
        lines.append(
            f"| {seed} | {cine.max_contrast_frame} | {chosen} | {diffs[-1]:+d} | {seconds:.2f} |"
        )
    within = sum(abs(d) <= 1 for d in diffs)
    return lines + ["", f"Within one frame of the maximum: {within} / {len(diffs)}.", ""]


def machine() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        ram = f"{pages:.1f} GiB"
    except (ValueError, OSError):
        ram = "unknown"
    try:
        here = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "-C", str(here), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        commit += " plus uncommitted changes" if dirty else ""
    except OSError:
        commit = "unknown"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return [
        f"- nproc: {os.cpu_count()}; CPU: {cpu}; RAM: {ram}; kernel {platform.release()}",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, SciPy {scipy.__version__}",
        f"- source tree: commit {commit}",
        f"- load average when the run started: {load} (the machine is shared)",
    ]


def write_report(path: Path) -> None:
    pinned = pin_to_one_core()
    started = datetime.now(UTC)
    head = machine()
    main = run(range(12), 0.02, 0.25)
    held_out = run(range(12, 48), 0.02, 0.25)
    stress = run(range(12), 0.04, 0.25)
    coarse = run(range(12), 0.02, 0.35)
    crossing = run(range(12), 0.02, 0.25, crossing=True)
    cines = frame_choice(range(12))
    finished = datetime.now(UTC)
    s = summary(main)
    lines = [
        "# xa-qca accuracy and speed on synthetic angiograms",
        "",
        "Produced by `bench/qca_accuracy.py --write bench/QCA_RESULTS.md`.",
        "",
        f"## Run of {started:%Y-%m-%d %H:%M} UTC (took {(finished - started).seconds} s)",
        "",
        "### Machine",
        "",
        *head,
        f"- the benchmark process ran on one core ({pinned}; OMP/OpenBLAS/MKL threads = 1)",
        "",
        "### Method",
        "",
        "- Phantom (`dicomnode/analysis/xa_qca/phantom.py`, the brief's section 6.2): 512x512,",
        "  one main vessel 70-95 mm tapering 3.2-4.2 -> 2.2-2.9 mm, one cosine stenosis of",
        "  nominal %DS 30/50/70/80 (seed % 4), 6-14 mm long at 35-65% of the length, 0-3 side",
        "  branches of 1.2-2.2 mm none within one lesion length of the lesion, circular lumens",
        "  (chord length, 3x3 supersampling), Beer-Lambert mu = 0.12/mm, low-frequency anatomy,",
        "  Gaussian PSF 0.8 px, signal-dependent noise, 10-bit.",
        "- Analysis: `analyze_frame(image, spacing)` with default `QcaParams`, calibrated.",
        "  Errors are measured minus true, for the most severe reported lesion against the true",
        "  stenosis. Location error = distance between the reported and true MLD points. Length",
        "  is compared with the true length below 90% of the true reference (the analyser's",
        "  border definition). Healthy segment = the main vessel away from its ends (5%) and",
        "  more than one lesion length from the lesion.",
        "- Time = `analyze_frame` only (phantom generation excluded), wall clock and process",
        "  CPU time on one core; median over the seeds.",
        "",
        "### Acceptance targets (0.25 mm/px, 2% noise, seeds 0-11; same set as the test)",
        "",
        "| metric | target | measured |",
        "|---|---|---|",
        f"| lumen Dice | mean >= 0.92, every case >= 0.88 | {s['lumen Dice']} |",
        "| %DS abs. error | mean <= 5, p90 <= 10, none > 15 points "
        f"| {s['%DS abs. error (points)']} |",
        f"| MLD abs. error | mean <= 0.15 mm, p90 <= 0.30 mm | {s['MLD abs. error (mm)']} |",
        f"| RVD abs. error | <= 0.15 mm in >= 90% of cases | {s['RVD abs. error (mm)']} |",
        "| healthy-segment diameter | |median bias| <= 0.10 mm, MAE <= 0.20 mm "
        f"| {s['healthy-segment diameter (mm)']} |",
        f"| lesion location | within 2 mm | {s['MLD location error (mm)']} |",
        "| time per 512x512 frame (one core) | < 2 s (task); <= 10 s (brief) "
        f"| {s['time per frame, median (s, wall / CPU)']} (median wall / CPU) |",
        "",
        "### Per seed (0.25 mm/px, 2% noise)",
        "",
        *table(main),
        "",
        *summary_lines("0.25 mm/px, 2% noise, seeds 0-11 (the test set)", main),
        *summary_lines("0.25 mm/px, 2% noise, seeds 12-47 (held out: never tuned on)", held_out),
        *summary_lines(
            "Stress: 0.25 mm/px, 4% noise, seeds 0-11 (brief: Dice >= 0.90, %DS mean <= 8)",
            stress,
        ),
        *summary_lines("0.35 mm/px, 2% noise, seeds 0-11 (no target)", coarse),
        *summary_lines(
            "Documented failure class: a 2-3 mm vessel crossing the lesion in projection, "
            "seeds 0-11",
            crossing,
        ),
        "### Frame choice (30-frame cine, gamma-variate bolus, small rigid/scale motion)",
        "",
        *cines,
        "### Reading these numbers",
        "",
        "- They are self-consistent: the analyser's lumen model (a circular lumen's chord",
        "  profile blurred by a Gaussian, Beer-Lambert, a locally linear background) is the",
        "  phantom's image formation. Real angiograms add non-circular lumens, foreshortening,",
        "  overlap, catheters, motion blur, scatter and veiling glare, and classical methods",
        "  do much worse there (brief, sections 2.2-2.4). Do not quote these as clinical accuracy.",
        "- A vessel crossing the lesion in projection under-estimates %DS badly; the analysis",
        "  flags such lesions (`Lesion.branch_at_lesion` and a warning) when it traces the",
        "  crossing vessel, but a crossing that hides the narrowing completely leaves nothing",
        "  to flag.",
        "",
    ]
    path.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.02)
    parser.add_argument("--spacing", type=float, default=0.25)
    parser.add_argument("--crossing", action="store_true")
    parser.add_argument("--write", type=Path, help="run every configuration, write the report")
    args = parser.parse_args()
    if args.write:
        write_report(args.write)
        return
    print(pin_to_one_core())
    rows = run(range(args.start, args.start + args.seeds), args.noise, args.spacing, args.crossing)
    print("\n".join(table(rows)))
    print()
    print("\n".join(summary_lines("summary", rows)))


if __name__ == "__main__":
    main()
