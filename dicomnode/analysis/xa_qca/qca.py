"""Classical quantitative coronary analysis (QCA) of one X-ray angiography frame.

`analyze_frame(image, pixel_spacing_mm, params) -> QcaResult` runs the chain on one frame:

1. line-integral domain ``P = -log(I)`` (Beer-Lambert: iodine becomes bright ridges whose
   height is proportional to the chord through the lumen); grey-opening top-hats remove the
   anatomy wider than the widest lumen;
2. multiscale Hessian (Frangi) vesselness, written with `scipy.ndimage` Gaussian derivatives;
3. vessel region: the smoothed top-hat above a noise-derived threshold, the connected part
   that holds the most strongly tubular pixels (a narrow stenosis stays connected);
4. main vessel: the longest geodesic path through the region (two Dijkstra sweeps, ends
   restricted to well-opacified pixels; the longest path through the skeleton, without
   skeletonising), then the cheapest path between those ends on a cost that falls towards the
   ridge of ``P``, i.e. the lumen's centre; side branches are traced from it the same way;
5. diameter profile: intensity profiles of ``P`` perpendicular to the smoothed centerline,
   every pixel, each fitted by Levenberg-Marquardt with a circular lumen's chord profile
   ``2 sqrt(r^2 - x^2)`` blurred by a Gaussian PSF, on a linear background. The PSF width is
   fitted once per frame; the contrast per unit chord is then fixed to its median over the
   wider half of the vessel (the densitometric constraint that keeps small lumens stable);
   radius, centre and background remain free per profile (the background slope is pulled
   towards its neighbours', so that a branch leaving on one side does not eat into the
   lumen). Sub-pixel, and free of the inward bias of maximum-gradient edges;
6. interpolated reference diameter: a robust straight line through the diameter profile
   (points 10% below or 15% above it excluded until stable, 5% ignored at each end; PS3.17
   Annex T.4.2 "Interpolated Reference");
7. lesions: local maxima of ``1 - D / D_ref`` inside 8-92% of the vessel, at least
   `QcaParams.min_stenosis_percent`, at most `QcaParams.max_lesions`; each gets %DS, %AS, MLD,
   the reference at the MLD point, its length (where D < 0.9 D_ref) and location, and a flag
   when a traced branch (or a vessel crossing in projection) meets it;
8. lumen mask: the fitted lumen of every traced vessel, painted around its centerline.

Without a pixel spacing the frame is analysed at `QcaParams.nominal_spacing_mm`, only %DS
and %AS are reported (every mm value is None) and the result says so (`QcaResult.calibrated`,
`QcaResult.warnings`). A frame without an opacified vessel gives ``status == "no-vessel"``
and a reason, not an exception.

`choose_frame` picks the frame of a run (RepresentativeFrameNumber, else the most opacified),
`calibration_from_dataset` derives mm per pixel from an XA header, and `analyze_dataset` does
all three for one XA instance. Research use only: the accuracy was measured on synthetic
phantoms whose image formation matches the lumen model (bench/QCA_RESULTS.md); real
angiograms add overlap, foreshortening, non-circular lumens, catheters and motion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage, signal
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra
from scipy.spatial import cKDTree

Status = Literal["ok", "no-vessel"]

ALGORITHM_NAME = "xa-qca-classical"
ALGORITHM_VERSION = "0.1.1"  # bump when results can change
GEOMETRIC_ISOCENTER = ("122486", "DCM", "Geometric Isocenter")  # CID 3452 calibration method
CALIBRATION_OBJECT_USED = ("122488", "DCM", "Calibration Object Used")  # CID 3452
INTERPOLATED_REFERENCE = ("122490", "DCM", "Interpolated Local Reference")  # CID 3465


# --- parameters and results -----------------------------------------------------------------


@dataclass(frozen=True)
class QcaParams:
    """Tunable settings. Lengths are in mm and converted with the frame's spacing (or with
    `nominal_spacing_mm` when the frame is uncalibrated)."""

    pixel_intensity_relationship: Literal["LIN", "LOG"] = "LIN"  # LOG: already -log scaled
    vessels_dark: bool = True  # MONOCHROME2 angiograms: iodine is dark
    nominal_spacing_mm: float = 0.25  # assumed when no calibration is given
    tophat_mm: float = 10.0  # opening size of the background removal
    region_tophat_mm: float = 6.0  # tighter opening for finding the vessel region
    vesselness_sigmas_mm: tuple[float, ...] = (0.25, 0.375, 0.5, 0.75, 1.0, 1.25)
    region_snr: float = 4.0  # region threshold on the smoothed top-hat, in noise units
    min_vessel_length_mm: float = 15.0  # shorter main paths mean "no vessel found"
    max_gap_mm: float = 6.0  # tubular regions this close to the vessel are joined to it
    bridge_snr: float = 2.0  # ... if the joining path's median contrast reaches this x noise
    min_contrast_to_noise: float = 4.0  # median ridge height / noise along the main path
    min_tubularity: float = 0.35  # median vesselness along the main path
    max_branches: int = 5
    min_branch_length_mm: float = 5.0  # beyond the parent lumen's edge
    min_branch_diameter_mm: float = 0.6  # median fitted diameter of a traced branch
    min_branch_tubularity: float = 0.05  # median vesselness along a branch (thin: low)
    max_diameter_mm: float = 6.0
    reference_trim: float = 0.05  # fraction ignored at each end for the reference line
    search_margin: float = 0.08  # MLD searched inside [margin, 1 - margin] of the vessel
    min_stenosis_percent: float = 20.0
    max_lesions: int = 3
    lesion_border_fraction: float = 0.9  # lesion ends where D returns to this x reference
    branch_margin_mm: float = 1.5  # a branch this close to a lesion flags it


@dataclass(frozen=True)
class Calibration:
    """Millimetres per pixel at the vessel, and how they were obtained."""

    row_mm: float
    column_mm: float
    method: Literal["pixel-spacing", "isocenter"]
    description: str  # e.g. "ImagerPixelSpacing x DistanceSourceToPatient / ..."
    code: tuple[str, str, str] | None  # CID 3452 calibration method, when one applies

    @property
    def mm_per_pixel(self) -> float:
        """The isotropic spacing used for measurement (mean of row and column spacing)."""
        return (self.row_mm + self.column_mm) / 2


@dataclass(frozen=True)
class Lesion:
    """One stenosis on the main vessel. Indices point into the `QcaResult` arrays along the
    centerline; positions are arc lengths from its proximal end. The mm values are None when
    the frame is uncalibrated."""

    number: int  # 1 = most severe
    mld_index: int
    start_index: int
    end_index: int
    point_px: tuple[float, float]  # (row, column) of the MLD point
    position_px: float
    percent_diameter_stenosis: float
    percent_area_stenosis: float  # circular lumen: 1 - (MLD / reference)^2
    mld_px: float
    reference_diameter_px: float
    length_px: float
    position_mm: float | None
    mld_mm: float | None
    reference_diameter_mm: float | None
    length_mm: float | None
    # a traced side branch leaves the main vessel within the lesion (or within
    # QcaParams.branch_margin_mm of it): a bifurcation lesion, or another vessel crossing it
    # in projection; 2-D QCA cannot measure either reliably
    branch_at_lesion: bool = False


@dataclass(frozen=True, eq=False)
class QcaResult:
    """What `analyze_frame` found. With ``status == "no-vessel"`` the arrays are empty, there
    are no lesions and `reason` says why."""

    status: Status
    reason: str
    calibrated: bool
    mm_per_pixel: float | None
    shape: tuple[int, int]
    lumen_mask: np.ndarray  # bool, the frame's shape: every traced vessel
    centerline_px: np.ndarray  # (n, 2) float (row, column), proximal to distal, 1 px steps
    arc_px: np.ndarray  # (n,) arc length from the proximal end
    diameter_px: np.ndarray  # (n,) fitted lumen diameter (smoothed)
    reference_px: np.ndarray  # (n,) interpolated reference diameter
    lesions: tuple[Lesion, ...]
    branch_centerlines_px: tuple[np.ndarray, ...]
    contrast_to_noise: float
    psf_sigma_px: float
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def segment_length_px(self) -> float:
        return float(self.arc_px[-1]) if len(self.arc_px) else 0.0

    @property
    def segment_length_mm(self) -> float | None:
        return None if self.mm_per_pixel is None else self.segment_length_px * self.mm_per_pixel

    @property
    def diameter_mm(self) -> np.ndarray | None:
        return None if self.mm_per_pixel is None else self.diameter_px * self.mm_per_pixel

    @property
    def reference_mm(self) -> np.ndarray | None:
        return None if self.mm_per_pixel is None else self.reference_px * self.mm_per_pixel

    def centerline_polyline(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The centerline (or a part of it) as (column, row) pairs for an SR SCOORD POLYLINE
        on the analysed frame. DICOM puts 0.0\\0.0 at the top-left corner of the top-left
        pixel, so a pixel's centre (an integer index here) is at index + 0.5."""
        part = self.centerline_px[start:stop]
        return np.column_stack([part[:, 1] + 0.5, part[:, 0] + 0.5])

    def lesion_mask(self, lesion: Lesion) -> np.ndarray:
        """The lumen pixels nearest to the lesion's part of the main centerline."""
        rows, cols = np.nonzero(self.lumen_mask)
        out = np.zeros(self.shape, dtype=bool)
        if not len(rows):
            return out
        _, nearest = cKDTree(self.centerline_px).query(np.column_stack([rows, cols]))
        reach = self.diameter_px[nearest] / 2 + 1.5
        dist = np.hypot(
            rows - self.centerline_px[nearest, 0], cols - self.centerline_px[nearest, 1]
        )
        keep = (nearest >= lesion.start_index) & (nearest <= lesion.end_index) & (dist <= reach)
        out[rows[keep], cols[keep]] = True
        return out

    def summary(self) -> dict[str, object]:
        """Machine-readable key results for logs and job records."""
        return {
            "status": self.status,
            "reason": self.reason,
            "calibrated": self.calibrated,
            "mm_per_pixel": self.mm_per_pixel,
            "segment_length_mm": self.segment_length_mm,
            "lesions": [
                {
                    "number": les.number,
                    "percent_diameter_stenosis": round(les.percent_diameter_stenosis, 1),
                    "mld_mm": None if les.mld_mm is None else round(les.mld_mm, 2),
                    "reference_diameter_mm": (
                        None
                        if les.reference_diameter_mm is None
                        else round(les.reference_diameter_mm, 2)
                    ),
                    "length_mm": None if les.length_mm is None else round(les.length_mm, 1),
                    "point_px": [round(v, 1) for v in les.point_px],
                }
                for les in self.lesions
            ],
            "warnings": list(self.warnings),
        }


# --- calibration and frame choice -----------------------------------------------------------


def _pair(value: object) -> tuple[float, float] | None:
    try:
        row, column = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(row) and np.isfinite(column) and row > 0 and column > 0):
        return None
    return row, column


def _positive(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def calibration_from_dataset(ds: Dataset) -> Calibration | None:
    """Millimetres per pixel for measuring vessels in an XA image, or None.

    Order (analysis brief, section 3.1): PixelSpacing, when the modality calibrated the image
    (PixelSpacingCalibrationType given, or PixelSpacing different from ImagerPixelSpacing:
    PS3.3 10.7.1.1; a FIDUCIAL calibration is "Calibration Object Used", CID 3452); else
    ImagerPixelSpacing (at the detector) scaled to the isocenter by DistanceSourceToPatient /
    DistanceSourceToDetector (PS3.3 C.8.7.1.1; "Geometric Isocenter"); else None (no mm
    measurements). A PixelSpacing equal to ImagerPixelSpacing without a calibration type is
    the detector's spacing, not a calibration, and is not used as one.
    """
    spacing = _pair(ds.get("PixelSpacing"))
    imager = _pair(ds.get("ImagerPixelSpacing"))
    calibration_type = str(ds.get("PixelSpacingCalibrationType", "") or "").upper()
    if spacing is not None and (calibration_type or imager is None or spacing != imager):
        code = CALIBRATION_OBJECT_USED if calibration_type == "FIDUCIAL" else None
        described = f"PixelSpacing ({calibration_type})" if calibration_type else "PixelSpacing"
        return Calibration(*spacing, "pixel-spacing", described, code)
    sod = _positive(ds.get("DistanceSourceToPatient"))
    sid = _positive(ds.get("DistanceSourceToDetector"))
    if imager is None or sod is None or sid is None or sod > sid:
        return None
    factor = sod / sid
    return Calibration(
        imager[0] * factor,
        imager[1] * factor,
        "isocenter",
        f"ImagerPixelSpacing x DistanceSourceToPatient / DistanceSourceToDetector "
        f"({sod:g} / {sid:g})",
        GEOMETRIC_ISOCENTER,
    )


def _line_integral(image: np.ndarray, params: QcaParams) -> np.ndarray:
    """Vessels as positive line integrals of attenuation (bright ridges)."""
    data = np.asarray(image, dtype=np.float64)
    if params.pixel_intensity_relationship == "LOG":
        p = -data if params.vessels_dark else data
    else:
        floor = max(float(data.max()) * 1e-3, 1e-6)
        p = (
            -np.log(np.maximum(data, floor))
            if params.vessels_dark
            else np.log(np.maximum(data, floor))
        )
    return p.astype(np.float32)


def _tophat(p: np.ndarray, size_px: int) -> np.ndarray:
    size_px = max(3, size_px | 1)
    background = ndimage.grey_opening(ndimage.gaussian_filter(p, 1.0), size=(size_px, size_px))
    return p - background


def _hessian_ridges(t: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale-normalised Hessian eigenvalues (l1 small, l2 large in magnitude) at one scale."""
    hrr = ndimage.gaussian_filter(t, sigma, order=(2, 0)) * sigma**2
    hcc = ndimage.gaussian_filter(t, sigma, order=(0, 2)) * sigma**2
    hrc = ndimage.gaussian_filter(t, sigma, order=(1, 1)) * sigma**2
    half_trace = (hrr + hcc) / 2
    root = np.sqrt(((hrr - hcc) / 2) ** 2 + hrc**2)
    a, b = half_trace + root, half_trace - root
    swap = np.abs(a) > np.abs(b)
    l1 = np.where(swap, b, a)
    l2 = np.where(swap, a, b)
    return l1, l2


def vesselness(t: np.ndarray, sigmas_px: Sequence[float], beta: float = 0.5) -> np.ndarray:
    """Frangi vesselness of bright ridges (Frangi et al. 1998), maximum over scales; the
    structure term's c is half the largest Hessian norm over all scales."""
    responses = []
    norms = []
    for sigma in sigmas_px:
        l1, l2 = _hessian_ridges(t, float(sigma))
        s2 = l1**2 + l2**2
        rb2 = np.where(l2 != 0, (l1 / np.where(l2 != 0, l2, 1)) ** 2, 0)
        responses.append((np.exp(-rb2 / (2 * beta**2)), s2, l2 < 0))
        norms.append(float(np.sqrt(s2.max())))
    c = 0.5 * max(norms)
    out = np.zeros(t.shape, dtype=np.float32)
    if c <= 0:
        return out
    for blob, s2, bright in responses:
        v = blob * (1 - np.exp(-s2 / (2 * c**2)))
        np.maximum(out, np.where(bright, v, 0).astype(np.float32), out=out)
    return out


def _noise_sigma(t: np.ndarray) -> float:
    """Standard deviation of white noise, from the median absolute deviation of a high-pass."""
    high = t - ndimage.gaussian_filter(t, 1.0)
    mad = float(np.median(np.abs(high - np.median(high))))
    # n - G1 * n has std 0.872 sigma for white noise
    return 1.4826 * mad / 0.872


def frame_opacification(frame: np.ndarray, params: QcaParams | None = None) -> float:
    """How much opacified vessel a frame shows: the summed ridge strength of the top-hat image
    above a noise-derived level, on a 2x downsampled frame. Not normalised per frame, so
    frames of one run can be compared."""
    params = params or QcaParams()
    data = np.asarray(frame, dtype=np.float64)
    h, w = (data.shape[0] // 2) * 2, (data.shape[1] // 2) * 2
    small = data[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    p = _line_integral(small, params)
    t = _tophat(p, int(round(params.tophat_mm / params.nominal_spacing_mm / 2)))
    noise = _noise_sigma(t)
    strength = np.zeros(t.shape, dtype=np.float32)
    for sigma in (1.0, 2.0):
        l1, l2 = _hessian_ridges(t, sigma)
        ridge = np.where(l2 < 0, -l2, 0) * np.exp(-((l1 / np.where(l2 != 0, l2, 1)) ** 2) / 0.5)
        np.maximum(strength, ridge.astype(np.float32), out=strength)
    # pure noise gives a scale-normalised second derivative with a standard deviation of
    # 0.244 noise / sigma; count ridges above ~2.5 of those at sigma = 1
    level = 0.6 * noise
    return float(strength[strength > level].sum())


def choose_frame(
    frames: np.ndarray | Sequence[np.ndarray],
    representative_frame_number: int | None = None,
    params: QcaParams | None = None,
) -> int:
    """The 0-based index of the frame to analyse.

    `representative_frame_number` is DICOM's 1-based RepresentativeFrameNumber; when it is
    given and names an existing frame, it wins. Otherwise the frame with the most opacified
    vessel (`frame_opacification`) is chosen; ties go to the earlier frame.
    """
    n = len(frames)
    if n == 0:
        raise ValueError("frames: no frames to choose from")
    if representative_frame_number is not None and 1 <= int(representative_frame_number) <= n:
        return int(representative_frame_number) - 1
    if n == 1:
        return 0
    scores = [frame_opacification(frames[i], params) for i in range(n)]
    return int(np.argmax(scores))


# --- vessel region and centerlines ----------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Graph:
    """8-connected pixel graph of a region."""

    index: np.ndarray  # (rows, cols) node index or -1
    pixels: np.ndarray  # (n, 2) row, col
    step: coo_matrix  # step lengths
    centred: coo_matrix  # step lengths x node cost (ridge seeking)


def _graph(region: np.ndarray, node_cost: np.ndarray) -> _Graph:
    index = np.full(region.shape, -1, dtype=np.int64)
    pixels = np.argwhere(region)
    index[pixels[:, 0], pixels[:, 1]] = np.arange(len(pixels))
    sources, targets, lengths = [], [], []
    rows, cols = region.shape
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = index[0 : rows - dr, max(0, -dc) : cols - max(0, dc)]
        b = index[dr:rows, max(0, dc) : cols - max(0, -dc)]
        both = (a >= 0) & (b >= 0)
        sources.append(a[both])
        targets.append(b[both])
        lengths.append(np.full(int(both.sum()), np.hypot(dr, dc)))
    src, dst, length = np.concatenate(sources), np.concatenate(targets), np.concatenate(lengths)
    n = len(pixels)
    cost = node_cost[pixels[:, 0], pixels[:, 1]]
    centred = length * (cost[src] + cost[dst]) / 2
    return _Graph(
        index,
        pixels,
        coo_matrix((length, (src, dst)), shape=(n, n)).tocsr(),
        coo_matrix((centred, (src, dst)), shape=(n, n)).tocsr(),
    )


def _path(predecessors: np.ndarray, end: int) -> list[int]:
    path = [end]
    while predecessors[path[-1]] >= 0:
        path.append(int(predecessors[path[-1]]))
    return path[::-1]


def _trim(nodes: list[int], graph: _Graph, ts: np.ndarray, fraction: float) -> list[int]:
    """The path without its faint ends (below `fraction` of its median contrast)."""
    pix = graph.pixels[nodes]
    values = ts[pix[:, 0], pix[:, 1]]
    strong = np.flatnonzero(values >= fraction * np.median(values))
    if len(strong) == 0:
        return nodes
    return nodes[strong[0] : strong[-1] + 1]


def _smooth_resample(points: np.ndarray, sigma: float, step: float = 1.0) -> np.ndarray:
    """A pixel chain as a smooth curve sampled every `step` pixels."""
    if len(points) < 3:
        return points.astype(float)
    seg = np.hypot(*np.diff(points, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.linspace(0.0, arc[-1], max(2, int(round(arc[-1] / 0.5)) + 1))
    pts = np.column_stack([np.interp(s, arc, points[:, 0]), np.interp(s, arc, points[:, 1])])
    pts = ndimage.gaussian_filter1d(pts, sigma / 0.5, axis=0, mode="nearest")
    seg = np.hypot(*np.diff(pts, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.arange(0.0, arc[-1] + 1e-9, step)
    return np.column_stack([np.interp(s, arc, pts[:, 0]), np.interp(s, arc, pts[:, 1])])


def _normals(points: np.ndarray) -> np.ndarray:
    tangent = np.gradient(points, axis=0)
    tangent /= np.maximum(np.hypot(*tangent.T), 1e-12)[:, None]
    return np.column_stack([-tangent[:, 1], tangent[:, 0]])


# --- the lumen model and its fit ------------------------------------------------------------

_LUT_STEP = 0.05  # px, in both radius and offset


@lru_cache(maxsize=16)  # 7 PSF candidates + recent fitted PSFs; ~5 MB each
def _lut(sigma: float, r_max: float, u_max: float) -> np.ndarray:
    """F(u; r): a circular lumen's chord profile 2 sqrt(r^2 - u^2) convolved with a Gaussian
    of `sigma` px, tabulated over r in [0, r_max] and u in [-u_max, u_max] (steps of
    `_LUT_STEP`), stacked with its derivatives along r and u: shape (n_r, n_u, 3). The chord
    is integrated exactly over each cell, then convolved with the Gaussian's exact transfer
    function by FFT."""
    h = _LUT_STEP
    n_u = int(np.ceil(u_max / h))
    pad = int(np.ceil((r_max + 6 * sigma) / h))
    n = 2 * (n_u + pad) + 1
    n_fft = 1 << int(np.ceil(np.log2(n)))
    u = (np.arange(n) - (n_u + pad)) * h
    radii = np.arange(0.0, r_max + h / 2, h)[:, None]
    edges = np.concatenate([u - h / 2, [u[-1] + h / 2]])[None, :]
    clipped = np.clip(edges, -radii, radii)
    safe = np.where(radii > 0, radii, 1.0)
    antiderivative = clipped * np.sqrt(np.maximum(radii**2 - clipped**2, 0)) + radii**2 * (
        np.arcsin(clipped / safe)
    )
    cells = np.diff(antiderivative, axis=1) / h
    freq = np.fft.rfftfreq(n_fft, d=h)
    transfer = np.exp(-2 * (np.pi * sigma * freq) ** 2)
    table = np.fft.irfft(np.fft.rfft(cells, n_fft, axis=1) * transfer, n_fft, axis=1)
    table = table[:, pad : pad + 2 * n_u + 1]
    return np.stack(
        [table, np.gradient(table, h, axis=0), np.gradient(table, h, axis=1)], axis=-1
    ).astype(np.float32)


def _lookup(table: np.ndarray, u: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Bilinear look-up of (F, dF/dr, dF/du) at (u, r); shape (..., 3). The table's middle
    column is u = 0. (`np.take` on the flattened table gathers about twice as fast as
    indexing it with two index arrays.)"""
    n_r, n_u, _ = table.shape
    fr = np.clip(r / _LUT_STEP, 0, n_r - 1.000001)
    fu = np.clip(u / _LUT_STEP + (n_u - 1) / 2, 0, n_u - 1.000001)
    ir, iu = fr.astype(np.int64), fu.astype(np.int64)
    wr, wu = (fr - ir)[..., None], (fu - iu)[..., None]
    flat = table.reshape(-1, 3)
    index = ir * n_u + iu
    low = np.take(flat, index, axis=0) * (1 - wu) + np.take(flat, index + 1, axis=0) * wu
    high = (
        np.take(flat, index + n_u, axis=0) * (1 - wu) + np.take(flat, index + n_u + 1, axis=0) * wu
    )
    return low * (1 - wr) + high * wr


@dataclass(frozen=True, eq=False)
class _Fit:
    amplitude: np.ndarray
    radius: np.ndarray
    centre: np.ndarray
    slope: np.ndarray  # background slope across the vessel
    cost: np.ndarray  # weighted sum of squared residuals per profile


def _fit_profiles(
    y: np.ndarray,
    weights: np.ndarray,
    x: np.ndarray,
    sigma: float,
    r_init: np.ndarray,
    r_max: float,
    amplitude: float | None,
    iterations: int = 25,
    slope_prior: np.ndarray | None = None,
) -> _Fit:
    """Levenberg-Marquardt fit, all profiles at once, of
    ``y(x) = a F(x - c; r, sigma) + b0 + b1 x`` (a fixed when `amplitude` is given).

    `slope_prior` pulls b1 towards the given slopes with the weight of the profile's own data:
    where a branch leaves, one side of the profile has no background to fit, and a free slope
    would eat into the lumen."""
    # the table's extent, in 4 px steps so that later frames reuse it (lru_cache)
    u_max = float(np.ceil((np.abs(x).max() + 4.0) / 4.0) * 4.0)
    table = _lut(round(float(sigma), 3), round(float(r_max), 2), round(u_max, 2))
    n, m = y.shape
    free_a = amplitude is None
    r = np.clip(r_init.astype(float), 0.3, r_max)
    c = np.zeros(n)
    ones = np.ones((n, m))
    xs = np.broadcast_to(x, (n, m))
    f0 = _lookup(table, xs, np.broadcast_to(r[:, None], (n, m)))[..., 0]
    # start: amplitude (if free) and background by weighted linear least squares
    if free_a:
        design = np.stack([f0, ones, xs], axis=-1)
        target = y
    else:
        design = np.stack([ones, xs], axis=-1)
        target = y - float(amplitude) * f0
    dw = design * weights[..., None]
    normal = np.matmul(dw.transpose(0, 2, 1), design) + 1e-9 * np.eye(design.shape[-1])
    sol = np.linalg.solve(normal, np.matmul(dw.transpose(0, 2, 1), target[..., None]))[..., 0]
    if free_a:
        a, b0, b1 = np.maximum(sol[:, 0], 1e-6), sol[:, 1], sol[:, 2]
    else:
        a, b0, b1 = np.full(n, float(amplitude)), sol[:, 0], sol[:, 1]
    prior_weight = np.sum(weights * x**2, axis=1) if slope_prior is not None else np.zeros(n)
    prior = slope_prior if slope_prior is not None else np.zeros(n)

    def residual_and_jacobian(a, r, c, b0, b1):
        f = _lookup(table, xs - c[:, None], np.broadcast_to(r[:, None], (n, m)))
        model = a[:, None] * f[..., 0] + b0[:, None] + b1[:, None] * x
        cols = [a[:, None] * f[..., 1], -a[:, None] * f[..., 2], ones, xs]
        if free_a:
            cols.insert(0, f[..., 0])
        return y - model, np.stack(cols, axis=-1)

    def total_cost(res, b1):
        return np.sum(weights * res**2, axis=1) + prior_weight * (prior - b1) ** 2

    lam = np.full(n, 1e-2)
    res, jac = residual_and_jacobian(a, r, c, b0, b1)
    cost = total_cost(res, b1)
    k = jac.shape[-1]
    eye = np.eye(k)
    for _ in range(iterations):
        jw = (jac * weights[:, :, None]).transpose(0, 2, 1)
        jtj = np.matmul(jw, jac)
        jtr = np.matmul(jw, res[..., None])[..., 0]
        jtj[:, -1, -1] += prior_weight
        jtr[:, -1] += prior_weight * (prior - b1)
        diag = np.einsum("nii->ni", jtj)
        system = jtj + lam[:, None, None] * (diag[:, :, None] * eye + 1e-9 * eye)
        step = np.linalg.solve(system, jtr[..., None])[..., 0]
        parts = list(step.T)
        na = np.maximum(a + parts.pop(0), 1e-6) if free_a else a
        nr = np.clip(r + parts[0], 0.0, r_max)
        nc = np.clip(c + parts[1], -u_max / 3, u_max / 3)
        nb0, nb1 = b0 + parts[2], b1 + parts[3]
        new_res, new_jac = residual_and_jacobian(na, nr, nc, nb0, nb1)
        new_cost = total_cost(new_res, nb1)
        better = new_cost < cost
        lam = np.where(better, lam * 0.3, lam * 10)
        a = np.where(better, na, a)
        r = np.where(better, nr, r)
        c = np.where(better, nc, c)
        b0 = np.where(better, nb0, b0)
        b1 = np.where(better, nb1, b1)
        res = np.where(better[:, None], new_res, res)
        jac = np.where(better[:, None, None], new_jac, jac)
        cost = np.where(better, new_cost, cost)
    return _Fit(a, r, c, b1, cost)


# --- the analysis ---------------------------------------------------------------------------

_PROFILE_STEP = 0.5  # px between samples along a profile
_SIGMA_CANDIDATES = (0.5, 0.7, 0.9, 1.1, 1.3, 1.6, 2.0)


def _spacing(value: float | Sequence[float] | None) -> tuple[float | None, list[str]]:
    if value is None:
        return None, ["uncalibrated: no pixel spacing, so only %DS and %AS are reported"]
    if isinstance(value, (int, float, np.floating)):
        pair = (float(value), float(value))
    else:
        pair = _pair(value)
        if pair is None:
            raise ValueError(f"pixel_spacing_mm: expected a positive number or pair, got {value!r}")
    if not all(np.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"pixel_spacing_mm: expected a positive number, got {value!r}")
    warnings = []
    if abs(pair[0] - pair[1]) > 0.01 * max(pair):
        warnings.append(f"anisotropic pixel spacing {pair}; measured with their mean")
    return (pair[0] + pair[1]) / 2, warnings


def _no_vessel(shape, reason, calibrated, spacing, warnings, cnr=0.0) -> QcaResult:
    empty2 = np.zeros((0, 2))
    empty = np.zeros(0)
    return QcaResult(
        status="no-vessel",
        reason=f"no vessel found: {reason}",
        calibrated=calibrated,
        mm_per_pixel=spacing,
        shape=shape,
        lumen_mask=np.zeros(shape, dtype=bool),
        centerline_px=empty2,
        arc_px=empty,
        diameter_px=empty,
        reference_px=empty,
        lesions=(),
        branch_centerlines_px=(),
        contrast_to_noise=float(cnr),
        psf_sigma_px=float("nan"),
        warnings=tuple(warnings),
    )


@dataclass(frozen=True, eq=False)
class _Profiles:
    values: np.ndarray  # (n, m)
    weights: np.ndarray  # (n, m)
    x: np.ndarray  # (m,)


def _profiles(
    coeffs: np.ndarray,
    region: np.ndarray,
    points: np.ndarray,
    r_init: np.ndarray,
    half_px: float,
) -> _Profiles:
    """Perpendicular intensity profiles at each centerline point, with weights that drop
    samples beyond 2 r + 5 px of the centre and samples that fall in another structure."""
    normals = _normals(points)
    x = np.arange(-half_px, half_px + 1e-9, _PROFILE_STEP)
    coords = points[:, None, :] + x[None, :, None] * normals[:, None, :]
    values = ndimage.map_coordinates(
        coeffs, [coords[..., 0], coords[..., 1]], order=3, prefilter=False, mode="nearest"
    )
    inside = ndimage.map_coordinates(
        region.astype(np.float32), [coords[..., 0], coords[..., 1]], order=0, mode="constant"
    ).astype(bool)
    j = np.arange(len(x))
    centre = len(x) // 2
    outside = ~inside
    left = np.where(outside & (j < centre), j, -1).max(axis=1)
    right = np.where(outside & (j > centre), j, len(x)).min(axis=1)
    # the run of region samples around the centre, made symmetric: where a branch leaves,
    # the run reaches further on one side, and that part belongs to the branch
    reach = np.minimum(centre - left, right - centre) * _PROFILE_STEP + 2.0
    own = (j > left[:, None]) & (j < right[:, None]) & (np.abs(x)[None, :] <= reach[:, None])
    near = np.abs(x)[None, :] <= (2 * r_init + 5)[:, None]
    weights = (near & (outside | own)).astype(float)
    return _Profiles(values, weights, x)


def _robust_smooth(d: np.ndarray, window: int = 11) -> np.ndarray:
    """Savitzky-Golay (quadratic) smoothing with outliers replaced first; unbiased at the
    bottom of a smooth narrowing, unlike a median or moving average."""
    if len(d) < window + 2:
        return d.copy()
    smooth = signal.savgol_filter(d, window, 2, mode="interp")
    dev = d - smooth
    mad = 1.4826 * np.median(np.abs(dev - np.median(dev))) + 1e-9
    cleaned = np.where(np.abs(dev) > 3 * mad, smooth, d)
    return signal.savgol_filter(cleaned, window, 2, mode="interp")


def _reference(arc: np.ndarray, d: np.ndarray, trim: float) -> np.ndarray:
    """Robust straight-line interpolated reference (PS3.17 T.4.2): points 10% below or 15%
    above the line are excluded until the set stops changing."""
    length = arc[-1]
    use = (arc >= trim * length) & (arc <= (1 - trim) * length)
    keep = use.copy()
    line = np.full_like(d, np.median(d[use]))
    for _ in range(20):
        if keep.sum() < 5:
            break
        coef = np.polyfit(arc[keep], d[keep], 1)
        line = np.polyval(coef, arc)
        rel = d / np.maximum(line, 1e-9) - 1
        new = use & (rel > -0.10) & (rel < 0.15)
        if np.array_equal(new, keep):
            break
        keep = new
    return np.maximum(line, 1e-6)


def _paint(shape, segments: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Lumen mask: pixels closer to a centerline point than that point's radius."""
    mask = np.zeros(shape, dtype=bool)
    for points, radius in segments:
        if len(points) < 2:
            continue
        # densify to 0.25 px
        seg = np.hypot(*np.diff(points, axis=0).T)
        arc = np.concatenate([[0.0], np.cumsum(seg)])
        s = np.arange(0.0, arc[-1] + 1e-9, 0.25)
        dense = np.column_stack([np.interp(s, arc, points[:, 0]), np.interp(s, arc, points[:, 1])])
        rad = np.interp(s, arc, radius)
        reach = float(rad.max()) + 1
        lo = np.maximum(np.floor(dense.min(axis=0) - reach), 0).astype(int)
        hi = np.minimum(np.ceil(dense.max(axis=0) + reach) + 1, shape).astype(int)
        rr, cc = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]]
        pix = np.column_stack([rr.ravel(), cc.ravel()])
        dist, idx = cKDTree(dense).query(pix, distance_upper_bound=reach)
        ok = np.isfinite(dist)
        inside = np.zeros(len(pix), dtype=bool)
        inside[ok] = dist[ok] < rad[idx[ok]]
        mask[pix[inside, 0], pix[inside, 1]] = True
    return mask


def _bridge_gaps(
    component: np.ndarray,
    labels: np.ndarray,
    others: list[int],
    relative: np.ndarray,
    ts: np.ndarray,
    noise_s: float,
    mm: float,
    params: QcaParams,
) -> np.ndarray:
    """Join to the vessel region the other tubular regions that lie within
    `QcaParams.max_gap_mm` of it, through the cheapest ridge-following path across the gap,
    when that path carries some iodine: a very tight stenosis can fall below the region
    threshold and cut the vessel in two."""
    component = component.copy()
    others = list(others)
    max_gap = params.max_gap_mm / mm
    for _ in range(3):
        if not others:
            break
        to_region, nearest = ndimage.distance_transform_edt(~component, return_indices=True)
        gaps = [(float(to_region[labels == label].min()), label) for label in others]
        gap, label = min(gaps)
        if gap > max_gap:
            break
        others.remove(label)
        other = labels == label
        far_end = np.unravel_index(int(np.argmin(np.where(other, to_region, np.inf))), ts.shape)
        near_end = (int(nearest[0][far_end]), int(nearest[1][far_end]))
        margin = int(gap) + 10
        lo = np.maximum(np.minimum(far_end, near_end) - margin, 0)
        hi = np.minimum(np.maximum(far_end, near_end) + margin + 1, ts.shape)
        window = np.zeros(ts.shape, dtype=bool)
        window[lo[0] : hi[0], lo[1] : hi[1]] = True
        local = _graph(window, 1.0 / np.maximum(relative, 0.02) ** 2)
        start = int(local.index[near_end])
        _, pred = dijkstra(local.centred, directed=False, indices=start, return_predecessors=True)
        path = local.pixels[_path(pred, int(local.index[far_end]))]
        if np.median(ts[path[:, 0], path[:, 1]]) < params.bridge_snr * noise_s:
            continue
        bridge = np.zeros(ts.shape, dtype=bool)
        bridge[path[:, 0], path[:, 1]] = True
        component |= ndimage.binary_dilation(bridge) | other
    return component


def analyze_frame(
    image: np.ndarray,
    pixel_spacing_mm: float | Sequence[float] | None,
    params: QcaParams | None = None,
) -> QcaResult:
    """Quantitative coronary analysis of one angiographic frame (see the module docstring).

    `image` holds the frame's values after the Modality LUT, MONOCHROME2 (vessels dark; invert
    MONOCHROME1 first or set `QcaParams.vessels_dark`). `pixel_spacing_mm` is the spacing at
    the vessel (see `calibration_from_dataset`), or None when uncalibrated.
    """
    params = params or QcaParams()
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < 32:
        raise ValueError(f"image: expected one 2-D frame of at least 32x32, got {image.shape}")
    shape = (int(image.shape[0]), int(image.shape[1]))
    spacing, warnings = _spacing(pixel_spacing_mm)
    calibrated = spacing is not None
    mm = spacing if spacing is not None else params.nominal_spacing_mm

    p = _line_integral(image, params)
    t = _tophat(p, int(round(params.tophat_mm / mm)))
    noise = _noise_sigma(t)
    ts = ndimage.gaussian_filter(t, 1.0)
    noise_s = noise * 0.282  # white noise through a sigma = 1 px Gaussian
    if not np.isfinite(noise) or float(ts.max()) <= 0:
        return _no_vessel(shape, "the frame has no contrast", calibrated, spacing, warnings)
    if noise_s <= 0:
        noise_s = float(np.abs(ts).max()) * 1e-3
    v = vesselness(t, [s / mm for s in params.vesselness_sigmas_mm])
    # the region is cut from a tighter top-hat (anatomy wider than the widest lumen goes)
    ts_narrow = ndimage.gaussian_filter(_tophat(p, int(round(params.region_tophat_mm / mm))), 1.0)
    region = ts_narrow > params.region_snr * noise_s
    strong = v > 0.3
    labels, n_labels = ndimage.label(region, structure=np.ones((3, 3)))
    if n_labels == 0 or not strong.any():
        return _no_vessel(
            shape, "nothing tubular stands out of the noise", calibrated, spacing, warnings
        )
    seeded = np.unique(labels[strong & region])
    seeded = seeded[seeded > 0]
    if len(seeded) == 0:
        return _no_vessel(
            shape, "nothing tubular stands out of the noise", calibrated, spacing, warnings
        )
    seed_weight = ndimage.sum(np.maximum(ts, 0) * strong, labels, seeded)
    main_label = seeded[int(np.argmax(seed_weight))]
    component = labels == main_label
    # vessel contrast level: path ends must be well opacified (not faint anatomy touching the
    # vessel), and the path cost falls towards the bright ridge (the lumen's centre)
    level = float(np.percentile(ts[component & strong], 90))
    relative = np.clip(ts / level, 0.0, 1.0)
    others = [
        int(label)
        for label, weight in zip(seeded, seed_weight, strict=True)
        if label != main_label and weight >= 0.05 * seed_weight.max()
    ]
    component = _bridge_gaps(component, labels, others, relative, ts, noise_s, mm, params)
    dt = ndimage.distance_transform_edt(component)
    graph = _graph(component, 1.0 / np.maximum(relative, 0.02) ** 2)
    node_relative = relative[graph.pixels[:, 0], graph.pixels[:, 1]]
    can_end = node_relative >= 0.3

    score = np.where(component, ts * v, -np.inf)
    start = int(graph.index[np.unravel_index(int(np.argmax(score)), shape)])
    dist = dijkstra(graph.step, directed=False, indices=start)
    end_a = int(np.argmax(np.where(np.isfinite(dist) & can_end, dist, -1)))
    dist = dijkstra(graph.step, directed=False, indices=end_a)
    end_b = int(np.argmax(np.where(np.isfinite(dist) & can_end, dist, -1)))
    if dist[end_b] * mm < params.min_vessel_length_mm:
        return _no_vessel(
            shape,
            f"the longest vessel path is {dist[end_b] * mm:.1f} mm "
            f"(< {params.min_vessel_length_mm:g} mm)",
            calibrated,
            spacing,
            warnings,
        )
    _, pred = dijkstra(graph.centred, directed=False, indices=end_a, return_predecessors=True)
    main_nodes = _trim(_path(pred, end_b), graph, ts, 0.25)
    main_pixels = graph.pixels[main_nodes].astype(float)
    trimmed_mm = float(np.sum(np.hypot(*np.diff(main_pixels, axis=0).T))) * mm
    if trimmed_mm < params.min_vessel_length_mm:
        return _no_vessel(
            shape,
            f"the opacified part of the longest path is {trimmed_mm:.1f} mm "
            f"(< {params.min_vessel_length_mm:g} mm)",
            calibrated,
            spacing,
            warnings,
        )
    on_path = (graph.pixels[main_nodes, 0], graph.pixels[main_nodes, 1])
    cnr = float(np.median(ts[on_path]) / noise_s)
    tubularity = float(np.median(v[on_path]))
    if tubularity < params.min_tubularity:
        return _no_vessel(
            shape,
            f"the best path is not tubular (median vesselness {tubularity:.2f} "
            f"< {params.min_tubularity:g}); anatomy, not an opacified vessel",
            calibrated,
            spacing,
            warnings,
            cnr,
        )
    if cnr < params.min_contrast_to_noise:
        return _no_vessel(
            shape,
            f"contrast-to-noise along the best path is {cnr:.1f} "
            f"(< {params.min_contrast_to_noise:g})",
            calibrated,
            spacing,
            warnings,
            cnr,
        )

    # --- diameter profile of the main vessel
    coeffs = ndimage.spline_filter(p.astype(np.float64), order=3)
    r_max = params.max_diameter_mm / mm / 2 * 1.5
    points = _smooth_resample(main_pixels, sigma=2.0)
    r_init = np.clip(ndimage.map_coordinates(dt, points.T, order=1) - 0.5, 0.5, r_max)
    half = float(min(2 * r_init.max() + 6, 2 * r_max + 6))
    prof = _profiles(coeffs, component, points, r_init, half)

    # the frame's PSF: the width whose model fits the wider half of the vessel best
    wide = np.flatnonzero(r_init >= np.median(r_init))[::2][:80]
    costs = []
    for sigma in _SIGMA_CANDIDATES:
        fit = _fit_profiles(
            prof.values[wide], prof.weights[wide], prof.x, sigma, r_init[wide], r_max, None, 15
        )
        costs.append(float(np.sum(fit.cost)))
    best = int(np.argmin(costs))
    psf = _SIGMA_CANDIDATES[best]
    if 0 < best < len(costs) - 1:
        s0, s1, s2 = _SIGMA_CANDIDATES[best - 1 : best + 2]
        c0, c1, c2 = costs[best - 1 : best + 2]
        denom = (s0 - s1) * (s0 - s2) * (s1 - s2)
        qa = (s2 * (c1 - c0) + s1 * (c0 - c2) + s0 * (c2 - c1)) / denom
        qb = (s2**2 * (c0 - c1) + s1**2 * (c2 - c0) + s0**2 * (c1 - c2)) / denom
        if qa > 0:
            psf = float(np.clip(-qb / (2 * qa), s0, s2))
    psf = round(psf, 2)

    free = _fit_profiles(prof.values, prof.weights, prof.x, psf, r_init, r_max, None)
    healthy = free.radius >= np.median(free.radius)
    amplitude = float(np.median(free.amplitude[healthy]))
    fit = _fit_profiles(prof.values, prof.weights, prof.x, psf, free.radius, r_max, amplitude)
    # recentre on the fitted lumen centres and measure again
    normals = _normals(points)
    centred = points + np.clip(fit.centre, -3, 3)[:, None] * normals
    points = _smooth_resample(centred, sigma=2.0)
    r_init = np.interp(
        np.linspace(0, 1, len(points)), np.linspace(0, 1, len(fit.radius)), fit.radius
    )
    slope = np.interp(
        np.linspace(0, 1, len(points)),
        np.linspace(0, 1, len(fit.slope)),
        ndimage.median_filter(fit.slope, size=21, mode="nearest"),
    )
    prof = _profiles(coeffs, component, points, np.maximum(r_init, 0.5), half)
    fit = _fit_profiles(
        prof.values, prof.weights, prof.x, psf, r_init, r_max, amplitude, slope_prior=slope
    )

    diameter = _robust_smooth(2 * fit.radius)
    n = len(diameter)
    k = max(2, n // 5)
    if diameter[:k].mean() < diameter[-k:].mean():  # proximal = the wider end
        points, diameter = points[::-1].copy(), diameter[::-1].copy()
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(points, axis=0).T))])
    reference = _reference(arc, diameter, params.reference_trim)

    # side branches (and vessels crossing in projection, which look the same from here)
    traced = _Traced(
        graph, dt, ts, v, level, node_relative, coeffs, component, psf, amplitude, r_max, half, mm
    )
    branches = _branches(traced, main_nodes, points, diameter, params)
    crowded = np.zeros(n, dtype=bool)
    margin = int(round(params.branch_margin_mm / mm))
    for _, _, attach in branches:
        if attach is not None:
            crowded[max(0, attach - margin) : attach + margin + 1] = True
    lesions = _lesions(arc, points, diameter, reference, crowded, params, spacing)
    for lesion in lesions:
        if lesion.branch_at_lesion:
            warnings.append(
                f"lesion {lesion.number}: a side branch leaves or another vessel crosses it "
                "in projection; its %DS and MLD are unreliable (a limit of 2-D QCA)"
            )
    segments = [(points, np.maximum(diameter / 2, 0.0))] + [(b[0], b[1]) for b in branches]
    lumen = _paint(shape, segments)
    return QcaResult(
        status="ok",
        reason="",
        calibrated=calibrated,
        mm_per_pixel=spacing,
        shape=shape,
        lumen_mask=lumen,
        centerline_px=points,
        arc_px=arc,
        diameter_px=diameter,
        reference_px=reference,
        lesions=lesions,
        branch_centerlines_px=tuple(b[0] for b in branches),
        contrast_to_noise=cnr,
        psf_sigma_px=float(psf),
        warnings=tuple(warnings),
    )


def _lesions(
    arc: np.ndarray,
    points: np.ndarray,
    diameter: np.ndarray,
    reference: np.ndarray,
    crowded: np.ndarray,
    params: QcaParams,
    spacing: float | None,
) -> tuple[Lesion, ...]:
    length = arc[-1]
    window = (arc >= params.search_margin * length) & (arc <= (1 - params.search_margin) * length)
    stenosis = 1 - diameter / reference
    peaks, _ = signal.find_peaks(
        np.where(window, stenosis, -1.0), height=params.min_stenosis_percent / 100
    )
    peaks = sorted(peaks, key=lambda i: -stenosis[i])
    found: list[tuple[int, int, int]] = []
    border = params.lesion_border_fraction
    for peak in peaks:
        if any(s <= peak <= e for s, e, _ in found):
            continue
        start = peak
        while start > 0 and diameter[start - 1] < border * reference[start - 1]:
            start -= 1
        end = peak
        while end < len(arc) - 1 and diameter[end + 1] < border * reference[end + 1]:
            end += 1
        inside = np.flatnonzero(window[start : end + 1]) + start
        if len(inside) == 0:
            continue
        mld = int(inside[np.argmin(diameter[inside])])
        if 100 * (1 - diameter[mld] / reference[mld]) < params.min_stenosis_percent:
            continue
        found.append((start, end, mld))
        if len(found) >= params.max_lesions:
            break
    found.sort(key=lambda f: -(1 - diameter[f[2]] / reference[f[2]]))
    out = []
    for number, (start, end, mld) in enumerate(found, start=1):
        ratio = diameter[mld] / reference[mld]
        length_px = float(arc[end] - arc[start])

        def mm(value: float) -> float | None:
            return None if spacing is None else float(value * spacing)

        out.append(
            Lesion(
                number=number,
                mld_index=mld,
                start_index=int(start),
                end_index=int(end),
                point_px=(float(points[mld, 0]), float(points[mld, 1])),
                position_px=float(arc[mld]),
                percent_diameter_stenosis=float(100 * (1 - ratio)),
                percent_area_stenosis=float(100 * (1 - ratio**2)),
                mld_px=float(diameter[mld]),
                reference_diameter_px=float(reference[mld]),
                length_px=length_px,
                position_mm=mm(arc[mld]),
                mld_mm=mm(diameter[mld]),
                reference_diameter_mm=mm(reference[mld]),
                length_mm=mm(length_px),
                branch_at_lesion=bool(crowded[start : end + 1].any()),
            )
        )
    return tuple(out)


@dataclass(frozen=True, eq=False)
class _Traced:
    """What the main-vessel analysis leaves for tracing and fitting the side branches."""

    graph: _Graph
    dt: np.ndarray  # distance to the region's edge
    ts: np.ndarray  # smoothed top-hat of the line integral
    v: np.ndarray  # vesselness
    level: float  # the vessel's contrast level in ts
    node_relative: np.ndarray  # ts / level per graph node
    coeffs: np.ndarray  # spline coefficients of the line integral
    component: np.ndarray  # the vessel region
    psf: float
    amplitude: float
    r_max: float
    half: float  # profile half-length, px
    mm: float  # mm per pixel (nominal when uncalibrated)


def _branches(
    traced: _Traced,
    main_nodes: list[int],
    main_points: np.ndarray,
    main_diameter: np.ndarray,
    params: QcaParams,
) -> list[tuple[np.ndarray, np.ndarray, int | None]]:
    """Side branches: repeatedly the farthest point of the vessel region from the traced tree,
    joined to it by a ridge-following path, fitted like the main vessel (same PSF and
    contrast). Each comes with the main-centerline index where it leaves the main vessel (None
    when it leaves another branch)."""
    graph, dt, ts, v = traced.graph, traced.dt, traced.ts, traced.v
    r_max, half, psf, amplitude = traced.r_max, traced.half, traced.psf, traced.amplitude
    mm, coeffs, component = traced.mm, traced.coeffs, traced.component
    tree = list(main_nodes)
    on_main = set(main_nodes)
    out: list[tuple[np.ndarray, np.ndarray, int | None]] = []
    main_tree = cKDTree(main_points)
    min_len = params.min_branch_length_mm / mm
    for _ in range(params.max_branches):
        dist, _, sources = dijkstra(
            graph.step, directed=False, indices=tree, min_only=True, return_predecessors=True
        )
        dist = np.where(np.isfinite(dist) & (traced.node_relative >= 0.12), dist, -1)
        tip = int(np.argmax(dist))
        attach = int(sources[tip])
        attach_px = graph.pixels[attach]
        if dist[tip] - dt[attach_px[0], attach_px[1]] < min_len:
            break
        _, pred, _ = dijkstra(
            graph.centred, directed=False, indices=tree, min_only=True, return_predecessors=True
        )
        nodes = _path(pred, tip)
        tree += nodes
        attach_index = (
            int(main_tree.query(graph.pixels[nodes[0]])[1]) if nodes[0] in on_main else None
        )
        nodes = _trim(nodes, graph, ts, 0.25)
        pix = graph.pixels[nodes]
        if (
            len(nodes) < 5
            or np.median(ts[pix[:, 0], pix[:, 1]]) < 0.12 * traced.level
            or np.median(v[pix[:, 0], pix[:, 1]]) < params.min_branch_tubularity
        ):
            continue
        points = _smooth_resample(pix.astype(float), sigma=1.5)
        d_main, i_main = main_tree.query(points)
        outside = d_main > main_diameter[i_main] / 2 + 1.0
        if outside.sum() < 5:
            continue
        first = int(np.argmax(outside))
        points = points[first:]
        r_init = np.clip(ndimage.map_coordinates(dt, points.T, order=1) - 0.5, 0.5, r_max)
        prof = _profiles(coeffs, component, points, r_init, half)
        fit = _fit_profiles(prof.values, prof.weights, prof.x, psf, r_init, r_max, amplitude)
        radius = _robust_smooth(fit.radius, window=7)
        if 2 * np.median(radius) * mm < params.min_branch_diameter_mm:
            continue
        out.append((points, np.maximum(radius, 0.0), attach_index))
    return out


# --- one call for an XA instance ------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DatasetAnalysis:
    """`analyze_dataset`'s answer: which frame was analysed (0-based index and DICOM's 1-based
    frame number), how it was calibrated (None: uncalibrated) and what was found."""

    frame_index: int
    frame_number: int
    frame_choice: Literal["representative", "most-opacified", "single-frame"]
    calibration: Calibration | None
    result: QcaResult


def frames_from_dataset(ds: Dataset) -> tuple[np.ndarray, QcaParams]:
    """The instance's frames as (n, rows, columns) float values after the Modality LUT, with
    MONOCHROME1 turned into MONOCHROME2 (vessels dark), and the `QcaParams` fields that the
    header decides (PixelIntensityRelationship LIN or LOG; DISP is treated as LOG)."""
    from pydicom.pixels import apply_modality_lut

    pixels = np.asarray(ds.pixel_array)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("SamplesPerPixel: XA QCA needs monochrome frames")
    frames = pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[None, ...]
    values = np.asarray(apply_modality_lut(frames, ds), dtype=np.float64)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        values = float(2 ** int(ds.get("BitsStored", 16)) - 1) - values
    relationship = str(ds.get("PixelIntensityRelationship", "LIN")).upper()
    params = QcaParams(pixel_intensity_relationship="LIN" if relationship == "LIN" else "LOG")
    if relationship != "LIN" and str(ds.get("PixelIntensityRelationshipSign", "1")) == "-1":
        values = -values  # higher values meant less X-ray intensity; make vessels low again
    return values, params


def analyze_dataset(ds: Dataset, params: QcaParams | None = None) -> DatasetAnalysis:
    """Choose the frame (RepresentativeFrameNumber, else the most opacified), calibrate it
    (`calibration_from_dataset`) and run `analyze_frame` on it. Header-derived settings
    (intensity relationship) override those of `params`."""
    frames, from_header = frames_from_dataset(ds)
    base = params or QcaParams()
    params = QcaParams(
        **{
            **base.__dict__,
            "pixel_intensity_relationship": from_header.pixel_intensity_relationship,
        }
    )
    representative = ds.get("RepresentativeFrameNumber")
    representative = int(representative) if representative not in (None, "") else None
    index = choose_frame(frames, representative, params)
    if len(frames) == 1:
        how: Literal["representative", "most-opacified", "single-frame"] = "single-frame"
    elif representative is not None and index == representative - 1:
        how = "representative"
    else:
        how = "most-opacified"
    calibration = calibration_from_dataset(ds)
    spacing = None if calibration is None else (calibration.row_mm, calibration.column_mm)
    result = analyze_frame(frames[index], spacing, params)
    return DatasetAnalysis(index, index + 1, how, calibration, result)
