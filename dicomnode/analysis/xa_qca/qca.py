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
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage
from scipy.sparse.csgraph import dijkstra

from dicomnode.analysis.xa_qca.lumen import (
    _SIGMA_CANDIDATES,
    _Fit,
    _fit_profiles,
    _Graph,
    _graph,
    _normals,
    _paint,
    _path,
    _Profiles,
    _profiles,
    _reference,
    _robust_smooth,
    _smooth_resample,
    _trim,
)
from dicomnode.analysis.xa_qca.model import Calibration, QcaParams, QcaResult
from dicomnode.analysis.xa_qca.vessel import _branches, _bridge_gaps, _lesions, _Traced

ALGORITHM_NAME = "xa-qca-classical"
ALGORITHM_VERSION = "0.1.1"  # bump when results can change
GEOMETRIC_ISOCENTER = ("122486", "DCM", "Geometric Isocenter")  # CID 3452 calibration method
CALIBRATION_OBJECT_USED = ("122488", "DCM", "Calibration Object Used")  # CID 3452
INTERPOLATED_REFERENCE = ("122490", "DCM", "Interpolated Local Reference")  # CID 3465


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


# --- the analysis ---------------------------------------------------------------------------


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


def _vessel_region(
    p: np.ndarray, t: np.ndarray, ts: np.ndarray, noise_s: float, mm: float, params: QcaParams
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray] | str:
    """The vessel region (gaps bridged), the vesselness, the vessel's contrast level and the
    contrast relative to it; or why there is no vessel."""
    v = vesselness(t, [s / mm for s in params.vesselness_sigmas_mm])
    # the region is cut from a tighter top-hat (anatomy wider than the widest lumen goes)
    ts_narrow = ndimage.gaussian_filter(_tophat(p, int(round(params.region_tophat_mm / mm))), 1.0)
    region = ts_narrow > params.region_snr * noise_s
    strong = v > 0.3
    labels, n_labels = ndimage.label(region, structure=np.ones((3, 3)))
    if n_labels == 0 or not strong.any():
        return "nothing tubular stands out of the noise"
    seeded = np.unique(labels[strong & region])
    seeded = seeded[seeded > 0]
    if len(seeded) == 0:
        return "nothing tubular stands out of the noise"
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
    return component, v, level, relative


@dataclass(frozen=True, eq=False)
class _MainVessel:
    """The main vessel's path through the region, before its lumen is measured."""

    graph: _Graph
    dt: np.ndarray  # distance to the region's edge
    node_relative: np.ndarray  # ts / level per graph node
    main_nodes: list[int]
    main_pixels: np.ndarray
    cnr: float


def _main_vessel(
    component: np.ndarray,
    v: np.ndarray,
    ts: np.ndarray,
    relative: np.ndarray,
    noise_s: float,
    mm: float,
    params: QcaParams,
) -> _MainVessel | tuple[str, float]:
    """The longest well-opacified path through the region, on the lumen's ridge; or why it is
    not a vessel (with the contrast-to-noise measured so far)."""
    shape = ts.shape
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
        return (
            f"the longest vessel path is {dist[end_b] * mm:.1f} mm "
            f"(< {params.min_vessel_length_mm:g} mm)",
            0.0,
        )
    _, pred = dijkstra(graph.centred, directed=False, indices=end_a, return_predecessors=True)
    main_nodes = _trim(_path(pred, end_b), graph, ts, 0.25)
    main_pixels = graph.pixels[main_nodes].astype(float)
    trimmed_mm = float(np.sum(np.hypot(*np.diff(main_pixels, axis=0).T))) * mm
    if trimmed_mm < params.min_vessel_length_mm:
        return (
            f"the opacified part of the longest path is {trimmed_mm:.1f} mm "
            f"(< {params.min_vessel_length_mm:g} mm)",
            0.0,
        )
    on_path = (graph.pixels[main_nodes, 0], graph.pixels[main_nodes, 1])
    cnr = float(np.median(ts[on_path]) / noise_s)
    tubularity = float(np.median(v[on_path]))
    if tubularity < params.min_tubularity:
        return (
            f"the best path is not tubular (median vesselness {tubularity:.2f} "
            f"< {params.min_tubularity:g}); anatomy, not an opacified vessel",
            cnr,
        )
    if cnr < params.min_contrast_to_noise:
        return (
            f"contrast-to-noise along the best path is {cnr:.1f} "
            f"(< {params.min_contrast_to_noise:g})",
            cnr,
        )
    return _MainVessel(graph, dt, node_relative, main_nodes, main_pixels, cnr)


def _frame_psf(prof: _Profiles, r_init: np.ndarray, r_max: float) -> float:
    """The frame's PSF: the width whose model fits the wider half of the vessel best."""
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
    return round(psf, 2)


def _fit_main(
    coeffs: np.ndarray,
    component: np.ndarray,
    points: np.ndarray,
    prof: _Profiles,
    r_init: np.ndarray,
    r_max: float,
    half: float,
    psf: float,
) -> tuple[np.ndarray, _Fit, float]:
    """The main vessel's lumen fit: free, then with the contrast per unit chord fixed, then
    again on the centerline moved to the fitted lumen centres. Returns the recentred points,
    the last fit and the contrast (amplitude)."""
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
    return points, fit, amplitude


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
    found = _vessel_region(p, t, ts, noise_s, mm, params)
    if isinstance(found, str):
        return _no_vessel(shape, found, calibrated, spacing, warnings)
    component, v, level, relative = found
    main = _main_vessel(component, v, ts, relative, noise_s, mm, params)
    if isinstance(main, tuple):
        return _no_vessel(shape, main[0], calibrated, spacing, warnings, main[1])
    graph, dt, node_relative = main.graph, main.dt, main.node_relative
    main_nodes, cnr = main.main_nodes, main.cnr

    # --- diameter profile of the main vessel
    coeffs = ndimage.spline_filter(p.astype(np.float64), order=3)
    r_max = params.max_diameter_mm / mm / 2 * 1.5
    points = _smooth_resample(main.main_pixels, sigma=2.0)
    r_init = np.clip(ndimage.map_coordinates(dt, points.T, order=1) - 0.5, 0.5, r_max)
    half = float(min(2 * r_init.max() + 6, 2 * r_max + 6))
    prof = _profiles(coeffs, component, points, r_init, half)
    psf = _frame_psf(prof, r_init, r_max)
    points, fit, amplitude = _fit_main(coeffs, component, points, prof, r_init, r_max, half, psf)

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
