"""Ingest through HAProxy to 1, 2 and 3 `dicomnode serve` processes on one PostgreSQL (blobs
in SeaweedFS over S3), the filesystem store against the S3 store on one node, and
the parts that bound a larger cluster: ledger appends/s from several processes, PostgreSQL
connections per node, and the blob store's time per call (from the nodes' own metrics).

Run: ``python bench/scale_out.py [--runs 3] [--objects 400] [--senders 8]``; appends a
section to ``bench/SCALING.md``. Needs Debian's haproxy, dcmtk and PostgreSQL (initdb,
pg_ctl), like ``tests/test_scale_out.py``, whose cluster set-up it uses.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import child_env, first_line, free_port, make_log  # noqa: E402

from tests.conftest import send_concurrently  # noqa: E402
from tests.factory import write_series  # noqa: E402
from tests.realclients.seaweedfs import SeaweedFS, start_seaweedfs  # noqa: E402
from tests.test_scale_out import Cluster, start_cluster  # noqa: E402

log = make_log("scale-out")
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class Postgres:
    """A throwaway PostgreSQL (fsync on: the figures are for a durable index)."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="dicomnode-bench-pg-"))
        self.sockets = self.base / "sock"
        self.sockets.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres")
            shutil.chown(self.sockets, "postgres")
        self.port = free_port()
        tool = str(PG_BIN / "initdb") if (PG_BIN / "initdb").exists() else "initdb"
        subprocess.run(
            as_postgres([tool, "-D", str(self.base / "data"), "-U", "postgres"])
            + ["--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        options = f"-k {self.sockets} -p {self.port} -c listen_addresses='' -c max_connections=200"
        self.pg_ctl(["-o", options, "-l", str(self.base / "log"), "-w", "start"])
        self.created = 0

    def pg_ctl(self, args: list[str]) -> None:
        tool = str(PG_BIN / "pg_ctl") if (PG_BIN / "pg_ctl").exists() else "pg_ctl"
        subprocess.run(
            as_postgres([tool, "-D", str(self.base / "data"), *args]),
            check=True,
            capture_output=True,
        )

    def create_database(self) -> str:
        import psycopg

        self.created += 1
        name = f"bench_{os.getpid()}_{self.created}"
        with psycopg.connect(
            host=str(self.sockets), port=self.port, user="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@/{name}?host={self.sockets}&port={self.port}"

    def connections(self, database_url: str) -> int:
        import psycopg

        name = database_url.split("/")[3].split("?")[0]
        with psycopg.connect(
            host=str(self.sockets), port=self.port, user="postgres", autocommit=True
        ) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)
            ).fetchone()
        return int(row[0])

    def stop(self) -> None:
        self.pg_ctl(["-m", "fast", "stop"])
        shutil.rmtree(self.base, ignore_errors=True)


def scrape(port: int) -> dict[tuple[str, str], float]:
    """(metric name, label text without node) -> value, from a node's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match:
            labels = re.sub(r'node="[^"]*",?', "", match.group(2) or "")
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def stop_cluster(cluster: Cluster) -> None:
    cluster.balancer.stop()
    for node in cluster.nodes:
        if node.process.poll() is None:
            node.terminate(signal.SIGTERM, timeout=60)


def ingest_once(
    pg: Postgres, nodes: int, folders: list[Path], work: Path, s3: SeaweedFS | None
) -> dict[str, float]:
    """One cluster of `nodes` (blobs in `s3`, else a local folder), one timed send of every
    folder through HAProxy."""
    cluster = start_cluster(work, pg.create_database(), nodes, s3)
    try:
        idle_connections = pg.connections(cluster.database_url)
        started = time.monotonic()
        send_concurrently(cluster.balancer.dimse_port, folders)
        seconds = time.monotonic() - started
        busy_connections = pg.connections(cluster.database_url)
        stored = cluster.count("SELECT count(*) FROM instances")
        store_calls = store_seconds = 0.0
        for node in cluster.nodes:
            samples = scrape(node.http_port)
            for (name, labels), value in samples.items():
                if name == "dicomnode_object_store_requests_total" and "place" in labels:
                    store_calls += value
                if name == "dicomnode_object_store_seconds_total" and "place" in labels:
                    store_seconds += value
    finally:
        stop_cluster(cluster)
    return {
        "seconds": seconds,
        "per_second": stored / seconds,
        "stored": stored,
        "connections_idle": idle_connections,
        "connections_busy": busy_connections,
        "store_ms": 1000 * store_seconds / store_calls if store_calls else float("nan"),
    }


def _append_for(database_url: str, seconds: float, counts: multiprocessing.Queue) -> None:
    from dicomnode.archive import Archive

    folder = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    archive = Archive(folder, database_url)
    done, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        archive.ledger.record("bench", "bench", "ok", {"n": done})
        done += 1
    archive.close()
    counts.put(done)


def ledger_appends(pg: Postgres, processes: int, seconds: float = 6.0) -> float:
    """Appends/s to one ledger from `processes` processes at once (PostgreSQL, advisory lock)."""
    database_url = pg.create_database()
    _append_for(database_url, 0.1, multiprocessing.Queue())  # migrate first
    counts: multiprocessing.Queue = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=_append_for, args=(database_url, seconds, counts))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    total = sum(counts.get(timeout=seconds + 120) for _ in workers)
    for worker in workers:
        worker.join()
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--objects", type=int, default=400, help="per run, over all senders")
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument(
        "--setups", default="filesystem:1,s3:1,s3:2,s3:3", help="store:nodes, comma separated"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "SCALING.md")
    args = parser.parse_args()
    os.environ.update(child_env())
    work = Path(tempfile.mkdtemp(prefix="dicomnode-bench-scale-"))
    folders = [work / "in" / f"s{i}" for i in range(args.senders)]
    for i, folder in enumerate(folders):
        write_series(folder, args.objects // args.senders, patient_id=f"BENCH{i}", size=64)
    pg = Postgres()
    s3 = start_seaweedfs(work / "seaweedfs")
    setups = [(store, int(n)) for store, n in (x.split(":") for x in args.setups.split(","))]
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    failed: list[str] = []
    try:
        for run in range(args.runs):
            for store, nodes in setups:
                log(f"run {run + 1}/{args.runs}: {store}, {nodes} node(s)")
                where = work / f"r{run}-{store}-{nodes}"
                try:
                    result = ingest_once(pg, nodes, folders, where, s3 if store == "s3" else None)
                except Exception as e:  # e.g. a node slower to start than START_SECONDS
                    log(f"  run failed, left out: {str(e)[:200]}")
                    failed.append(f"{store}:{nodes} run {run + 1}: {str(e)[:120]}")
                    continue
                log(f"  {result['per_second']:.0f} objects/s ({result['seconds']:.1f} s)")
                results.setdefault((store, nodes), []).append(result)
        appends = {p: ledger_appends(pg, p) for p in (1, 4)}
    finally:
        s3.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    write_report(args, results, appends, failed)


def write_report(
    args: argparse.Namespace,
    results: dict[tuple[str, int], list[dict[str, float]]],
    appends: dict,
    failed: list[str],
) -> None:
    def median(setup: tuple[str, int], key: str) -> float:
        return statistics.median(r[key] for r in results[setup])

    lines = [
        "",
        f"## Run of {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{first_line(['uname', '-sr'])}; load average at the end: {os.getloadavg()[0]:.1f}; "
        f"{first_line(['/usr/sbin/haproxy', '-v'])[:40]}; PostgreSQL 15 (fsync on).",
        f"Ingest: {args.senders} storescu associations at once through HAProxy "
        f"(TCP, leastconn, PROXY v2), {args.objects} CT objects of 64x64 per run, "
        f"{args.runs} runs, medians; blobs in SeaweedFS (S3, fsync per PUT) or a local folder.",
        "",
        "| store | nodes | objects/s | seconds | per-run objects/s | PostgreSQL connections idle / "
        "after ingest | blob store `place` ms/call |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setup in results:
        runs = ", ".join(f"{r['per_second']:.0f}" for r in results[setup])
        lines.append(
            f"| {setup[0]} | {setup[1]} | {median(setup, 'per_second'):.0f} | "
            f"{median(setup, 'seconds'):.1f} | {runs} | "
            f"{median(setup, 'connections_idle'):.0f} / {median(setup, 'connections_busy'):.0f}"
            f" | {median(setup, 'store_ms'):.2f} |"
        )
    lines += [
        "",
        "Ledger appends/s (this code's `Ledger.record`, one transaction each, PostgreSQL "
        "advisory lock): " + ", ".join(f"{p} process(es): {v:.0f}/s" for p, v in appends.items()),
        "",
        *(["Runs left out: " + "; ".join(failed), ""] if failed else []),
    ]
    with args.out.open("a", encoding="utf-8") as out:
        out.write("\n".join(lines))
    log(f"appended to {args.out}")


if __name__ == "__main__":
    main()
