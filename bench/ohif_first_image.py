"""OHIF's first image from page load: dicomnode vs Orthanc serving the same study.

Run by hand: ``python bench/ohif_first_image.py [--runs 5] [--out bench/RESULTS-ohif.md]``.

Both servers get the same studies (a 512x512 CT series from the ct-lung phantom and a 30-frame
512x512 XA cine from the QCA phantom): dicomnode as `dicomnode serve` (analysis off, so that no
analysis competes for the cores) and Debian's Orthanc 1.10 with its DICOMweb plugin. OHIF 3.13.2
(the npm build, shipped app-config with only the URLs changed) is served by the same static
server and reverse proxy for both (tests/realclients/proxy.py; for dicomnode it adds a bearer
token). Each run opens a fresh browser context (empty cache) in Debian's headless Chromium and
measures, inside the page, the time from navigation start to the first animation frame in which
the viewport shows an image (a non-black pixel in its canvas). Runs alternate between the
servers; the medians of `--runs` runs per server and study go to the results file, with every
request's status checked (none may be 4xx/5xx).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import requests  # noqa: E402

from dicomnode.analysis.ct_lung.phantom import chest_phantom, phantom_series  # noqa: E402
from dicomnode.analysis.xa_qca.phantom import xa_cine, xa_dataset  # noqa: E402
from dicomnode.config import read_settings  # noqa: E402
from tests.conftest import dicomweb_client, serve, token_for, write_config  # noqa: E402
from tests.factory import part10  # noqa: E402
from tests.realclients.ohif import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    OHIF_VERSION,
    app_config,
    ohif_dist,
)
from tests.realclients.orthanc import start_orthanc  # noqa: E402
from tests.realclients.proxy import ViewerServer  # noqa: E402

NO_ANALYSIS = (
    '[analysis.analyzers."ct-lung"]\nenabled = false\n'
    '[analysis.analyzers."xa-qca"]\nenabled = false\n'
)

# true in the first animation frame whose viewport canvas shows a non-black pixel at its centre
FIRST_IMAGE_JS = """() => {
  if (!window.cornerstone) return false;
  const element = cornerstone.getEnabledElements()[0];
  if (!element) return false;
  const viewport = element.viewport;
  if (!viewport.getImageData || !viewport.getImageData()) return false;
  const canvas = viewport.canvas;
  const d = canvas.getContext('2d').getImageData(canvas.width >> 1, canvas.height >> 1, 1, 1).data;
  if (d[0] + d[1] + d[2] === 0) return false;
  window.__firstImageMs = performance.now();
  return true;
}"""


class NodeForBench:
    """A `dicomnode serve` process; `settings` and `http_port` as token_for and dicomweb_client
    read them."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        config = write_config(
            folder / "node.toml",
            folder / "data",
            f"sqlite:///{folder / 'index.sqlite'}",
            extra=NO_ANALYSIS,
        )
        self.served = serve(config, folder / "node.log")
        self.http_port = self.served.http_port
        self.dimse_port = self.served.dimse_port
        self.settings = read_settings(config)

    def stop(self) -> None:
        self.served.terminate()


def machine() -> str:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout
    orthanc = subprocess.run(["/usr/sbin/Orthanc", "--version"], capture_output=True, text=True)
    return (
        f"nproc {os.cpu_count()}; CPU {cpu}; kernel {platform.release()}; "
        f"Python {platform.python_version()}; {chromium.strip()}; "
        f"{orthanc.stdout.splitlines()[0] if orthanc.stdout else 'Orthanc ?'}; OHIF {OHIF_VERSION}"
    )


def source_revision() -> str:
    head = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head[:90] + (" (plus uncommitted changes of the shared tree)" if dirty else "")


def first_image_ms(browser, url: str, timeout_s: float = 120.0) -> tuple[float, list[str]]:
    """Milliseconds from navigation start to the first image, and any 4xx/5xx responses."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    page = context.new_page()
    errors: list[str] = []
    page.on(
        "response",
        lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None,
    )
    try:
        page.goto(url)
        page.wait_for_function(FIRST_IMAGE_JS, polling="raf", timeout=timeout_s * 1000)
        return float(page.evaluate("() => window.__firstImageMs")), errors
    finally:
        context.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ct-slices", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS-ohif.md")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ohif-bench-"))
    log = lambda message: print(f"[ohif-bench {time.strftime('%H:%M:%S')}] {message}")  # noqa: E731

    log("making the studies")
    ct = phantom_series(
        chest_phantom(5, slices=args.ct_slices, size=512, spacing_mm=(2.5, 0.7, 0.7)),
        patient_id="BENCH-CT",
    )
    for ds in ct:
        ds.WindowCenter, ds.WindowWidth = -300, 1600
    cine = xa_cine(4, n_frames=30)
    xa = xa_dataset(cine.frames, cine.pixel_spacing_mm, patient_id="BENCH-XA")
    studies = {"CT series": ct, "XA cine": [xa]}

    node = NodeForBench(folder / "node")
    token = token_for(node, ("dicomweb.read", "dicomweb.write"), "ohif-bench", 24 * 3600)
    orthanc = start_orthanc(
        folder / "orthanc",
        "DICOMNODE",
        node.dimse_port,
        f"http://127.0.0.1:{node.http_port}/dicomweb",
        token,
    )
    dist = ohif_dist()
    servers = {}
    try:
        client = dicomweb_client(node)
        for name, datasets in studies.items():
            log(f"storing the {name} ({len(datasets)} instances) in both")
            client.store_instances(datasets)
            for ds in datasets:
                answer = requests.post(f"{orthanc.url}/instances", data=part10(ds), timeout=120)
                answer.raise_for_status()
        servers["dicomnode"] = ViewerServer(
            dist,
            f"http://127.0.0.1:{node.http_port}/dicomweb",
            authorization=lambda: f"Bearer {token}",
            overrides={"/app-config.js": app_config(dist, "/dicomweb")},
        ).start()
        servers["orthanc"] = ViewerServer(
            dist,
            f"{orthanc.url}/dicom-web",
            overrides={"/app-config.js": app_config(dist, "/dicomweb")},
        ).start()

        from playwright.sync_api import sync_playwright

        times: dict[tuple[str, str], list[float]] = {}
        errors: list[str] = []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for name, datasets in studies.items():
                url = f"/viewer?StudyInstanceUIDs={datasets[0].StudyInstanceUID}"
                for server in servers:  # one warm-up each (the OS page cache, the JIT)
                    first_image_ms(browser, servers[server].url + url)
                for run in range(args.runs):
                    for server in servers if run % 2 == 0 else reversed(servers):
                        ms, bad = first_image_ms(browser, servers[server].url + url)
                        errors += [f"{server} {name}: {b}" for b in bad]
                        times.setdefault((name, server), []).append(ms)
                        log(f"{name} {server} run {run + 1}: {ms:.0f} ms")
            browser.close()
    finally:
        for server in servers.values():
            server.stop()
        orthanc.stop()
        node.stop()
        shutil.rmtree(folder, ignore_errors=True)

    write_results(args, studies, times, errors)
    return 1 if any(e.startswith("dicomnode") for e in errors) else 0


def write_results(args, studies, times, errors) -> None:
    lines = [
        f"## Run of {datetime.now(UTC).strftime('%a %b %d %H:%M:%S UTC %Y')}",
        "",
        f"- Machine: {machine()}",
        f"- Source: {source_revision()}",
        f"- Studies: CT series of {len(studies['CT series'])} slices 512x512 (16-bit, explicit VR "
        "little endian, windowed -300/1600); XA cine of 30 frames 512x512 (16-bit, 10 stored).",
        "- Method: see the docstring of `bench/ohif_first_image.py`; one warm-up per server and "
        f"study, then {args.runs} runs each, alternating the order; ms from navigation start.",
        "- 4xx/5xx: every response the page got is checked (below).",
        f"- Load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
        "(the machine is shared; other work on it widens the spread of the runs).",
        "",
        "| study | server | median ms | runs (ms) | dicomnode / Orthanc |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    for name in studies:
        node = statistics.median(times[(name, "dicomnode")])
        orthanc = statistics.median(times[(name, "orthanc")])
        for server, median in (("dicomnode", node), ("orthanc", orthanc)):
            runs = ", ".join(f"{t:.0f}" for t in times[(name, server)])
            ratio = f"{node / orthanc:.2f}" if server == "dicomnode" else ""
            lines.append(f"| {name} | {server} | {median:.0f} | {runs} | {ratio} |")
    lines.append("")
    for server in ("dicomnode", "orthanc"):
        mine = [e.split(": ", 1)[1] for e in errors if e.startswith(server)]
        kinds = sorted({e.split(" ")[0] + " " + e.rsplit("/", 1)[-1].split("?")[0] for e in mine})
        lines.append(f"- {server}: {len(mine)} responses 4xx/5xx" + (f" ({kinds})" if mine else ""))
    header = (
        "# OHIF first image: dicomnode vs Orthanc\n\nProduced by `bench/ohif_first_image.py`.\n"
    )
    previous = args.out.read_text() if args.out.exists() else header
    if not previous.startswith("# OHIF"):
        previous = header + previous
    head, _, rest = previous.partition("\n## ")
    body = "\n".join(lines) + "\n"
    args.out.write_text(head.rstrip("\n") + "\n\n" + body + ("\n## " + rest if rest else ""))
    print(body)


if __name__ == "__main__":
    sys.exit(main())
