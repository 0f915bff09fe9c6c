"""Helpers shared by the hand-run benchmarks ``store_ingest.py`` and ``dicomweb.py``.

The scripts are run as ``python bench/SCRIPT.py``, which puts ``bench/`` first on
``sys.path``, so they import this module as ``common``. See ``bench/README.md``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------
# Output and environment
# --------------------------------------------------------------------------------------


def make_log(prefix: str) -> Callable[[str], None]:
    """A ``log(message)`` function printing ``[PREFIX HH:MM:SS] message`` on stderr."""

    def log(message: str) -> None:
        """Progress message on stderr."""
        print(f"[{prefix} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return log


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: this one's, ``TCP_NODELAY=1`` and ``extra``.

    Debian's dcmtk and Orthanc only disable Nagle's algorithm when ``TCP_NODELAY`` is
    set; without it every C-STORE waits ~40 ms for a delayed ACK.
    """
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra or {})
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def first_line(cmd: Sequence[str]) -> str:
    """First non-empty output line of ``cmd``, or ``"unknown"``."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


def package_version(name: str) -> str:
    """Installed version of a Python distribution, or ``"not installed"``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------
# The dicomnode source under test
# --------------------------------------------------------------------------------------


def dicomnode_source() -> Path | None:
    """Directory of the ``dicomnode`` package this Python would import, if any."""
    spec = importlib.util.find_spec("dicomnode")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def tree_hash(package: Path) -> str:
    """Short content hash of a source tree (paths and bytes, ``__pycache__`` left out)."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(package)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def describe_source(package: Path) -> str:
    """Git commit and content hash of the dicomnode source, for the report."""
    repo = package.parent
    commit = first_line(["git", "-C", str(repo), "log", "-1", "--format=%h %s"])
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--", package.name],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    state = " plus uncommitted changes" if dirty else ""
    return f"source tree {tree_hash(package)} (commit {commit}{state})"


def snapshot_source(package: Path, work_dir: Path) -> Path:
    """Copy the package to ``work_dir/snapshot-HASH/`` and return that directory.

    Running the copy (``PYTHONPATH`` first on the path, ahead of an editable install)
    keeps every repetition on the same code while someone edits the working tree.
    """
    root = work_dir / f"snapshot-{tree_hash(package)}"
    if not (root / package.name).exists():
        shutil.copytree(package, root / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


# --------------------------------------------------------------------------------------
# CPU accounting (Linux /proc)
# --------------------------------------------------------------------------------------


def system_busy_seconds() -> float:
    """User+nice+system CPU seconds of the whole machine since boot (all cores, Linux).

    Interrupt and softirq time (much of it loopback networking on behalf of the
    benchmark itself) and steal time are left out.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = (int(v) for v in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def group_cpu_ticks(pgid: int) -> tuple[int, int]:
    """(user, system) CPU clock ticks of the process group ``pgid`` (Linux only).

    Sums every live (or zombie) member's own and reaped children's times, so forked
    workers (storescp ``--fork``, multiprocessing) are counted too. Divide by
    ``os.sysconf("SC_CLK_TCK")`` for seconds.
    """
    user = system = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # state, ppid, pgrp, ...
            user += int(fields[11]) + int(fields[13])  # utime, cutime
            system += int(fields[12]) + int(fields[14])  # stime, cstime
    return user, system


def kernel_threads_cpu_seconds() -> float:
    """CPU seconds of kernel threads (kthreadd and its children: writeback, journal...)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError, ValueError):
            continue
        if pid == 2 or int(fields[1]) == 2:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------
# Synthetic pixel data
# --------------------------------------------------------------------------------------


def phantom_slice(
    z: float, rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """A crude CT-like axial slice (stored values = HU + 1024, 12 bits used).

    ``grid`` is ``np.mgrid`` over 512x512 (float32), whose shape the slice takes. Air
    around an elliptic body of soft tissue, two lungs whose size varies with ``z``, a
    spine, a table, and Gaussian noise, so the pixel data is not trivially compressible.
    """
    yy, xx = grid
    hu = np.full(yy.shape, -1000.0, dtype=np.float32)
    body = ((xx - 256) / 200) ** 2 + ((yy - 250) / 150) ** 2 <= 1.0
    hu[body] = 40.0
    lung_r = 60 + 25 * np.sin(z / 40.0)
    for cx in (180, 332):
        lung = ((xx - cx) / lung_r) ** 2 + ((yy - 230) / (lung_r * 1.3)) ** 2 <= 1.0
        hu[lung] = -820.0
    spine = (xx - 256) ** 2 + (yy - 345) ** 2 <= 22**2
    hu[spine] = 700.0
    hu[(yy > 410) & (yy < 418) & (np.abs(xx - 256) < 230)] = 300.0
    hu += rng.normal(0.0, 18.0, size=hu.shape).astype(np.float32)
    return np.clip(hu + 1024.0, 0, 4095).astype("<u2")
