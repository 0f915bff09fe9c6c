"""The OHIF viewer 3.13.2 as a hospital deploys it: the npm package's built `dist/` with its
shipped default app-config (only the DICOMweb URLs changed), behind a reverse proxy that adds
a bearer token, in Debian's headless Chromium driven by Playwright (never `playwright
install`)."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "realclients"  # .gitignore'd; .ci/run fills it
OHIF_VERSION = "3.13.2"
SHIPPED_DICOMWEB_ROOT = "https://d14fa38qiwhyfd.cloudfront.net/dicomweb"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def ohif_dist(version: str = OHIF_VERSION) -> Path:
    """The built viewer (`package/dist` of `npm pack @ohif/app@VERSION`), fetched with npm
    into the cache folder the first time."""
    folder = CACHE / f"ohif-{version}"
    dist = folder / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    tarball = CACHE / f"ohif-app-{version}.tgz"
    if not tarball.is_file():
        npm = shutil.which("npm")
        assert npm, "npm is required to fetch the OHIF viewer (.ci/run installs it)"
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "pack", f"@ohif/app@{version}", "--pack-destination", str(CACHE)],
            check=True,
            capture_output=True,
            timeout=600,
        )
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+
            archive.extractall(partial, filter="data")
        else:
            names = [m.name for m in archive.getmembers()]
            assert all(n.startswith("package/") and ".." not in n for n in names), names[:5]
            archive.extractall(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return dist


def app_config(dist: Path, dicomweb_root: str) -> bytes:
    """OHIF's shipped default `app-config.js` with its DICOMweb server's URLs (wadoUriRoot,
    qidoRoot, wadoRoot) pointed at `dicomweb_root`; every other setting as shipped."""
    shipped = (dist / "app-config.js").read_text()
    assert shipped.count(SHIPPED_DICOMWEB_ROOT) == 3, "OHIF's shipped app-config has changed"
    assert "omitQuotationForMultipartRequest: true" in shipped
    return shipped.replace(SHIPPED_DICOMWEB_ROOT, dicomweb_root).encode()


# --- reading what the viewer shows ----------------------------------------------------------

# For each image point (column, row; pixel centres at +0.5), the canvas pixel that shows it, the
# exact image position of that canvas pixel's centre (for a bilinear reference) and its colour;
# with the displayed image's id and the viewport's properties (VOI range).
SAMPLE_JS = """(points) => {
  if (!window.cornerstone) return null;
  const element = cornerstone.getEnabledElements()[0];
  if (!element) return null;
  const viewport = element.viewport;
  const imageId = viewport.getCurrentImageId && viewport.getCurrentImageId();
  if (!imageId || !viewport.getImageData || !viewport.getImageData()) return null;
  const context = viewport.canvas.getContext('2d');
  const ratio = window.devicePixelRatio || 1;
  const samples = points.map(([x, y]) => {
    const world = cornerstone.utilities.imageToWorldCoords(imageId, [x + 0.5, y + 0.5]);
    const onCanvas = viewport.worldToCanvas(world);
    const px = Math.floor(onCanvas[0] * ratio), py = Math.floor(onCanvas[1] * ratio);
    const centre = viewport.canvasToWorld([(px + 0.5) / ratio, (py + 0.5) / ratio]);
    const image = cornerstone.utilities.worldToImageCoords(imageId, centre);
    const d = context.getImageData(px, py, 1, 1).data;
    return {image: [image[0], image[1]], rgb: [d[0], d[1], d[2]]};
  });
  return {imageId, samples, properties: viewport.getProperties()};
}"""


def window_to_grey(values, center: float, width: float):
    """DICOM linear VOI (PS3.3 C.11.2.1.2.1) to 0..255."""
    import numpy as np

    lower = center - 0.5 - (width - 1) / 2
    return np.clip((np.asarray(values, dtype=float) - lower) / (width - 1), 0, 1) * 255


def bilinear(image, x: float, y: float):
    """`image` (rows, columns[, channels]) at continuous image position (x, y), pixel centres
    at +0.5 (as cornerstone's image coordinates)."""
    import numpy as np

    u, v = x - 0.5, y - 0.5
    rows, columns = image.shape[:2]
    c0 = int(np.clip(np.floor(u), 0, columns - 1))
    r0 = int(np.clip(np.floor(v), 0, rows - 1))
    c1, r1 = min(c0 + 1, columns - 1), min(r0 + 1, rows - 1)
    fu, fv = float(np.clip(u - c0, 0, 1)), float(np.clip(v - r0, 0, 1))
    top = image[r0, c0] * (1 - fu) + image[r0, c1] * fu
    bottom = image[r1, c0] * (1 - fu) + image[r1, c1] * fu
    return top * (1 - fv) + bottom * fv
