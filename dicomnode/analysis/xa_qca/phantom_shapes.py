"""Shapes of the synthetic XA phantom (`dicomnode.analysis.xa_qca.phantom`): the main vessel's
curve, stenosis and side-branch placement, a crossing vessel, the chord length through a
lumen on the supersampled grid, and the anatomy in the background. Deterministic by the
generator passed in."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.spatial import cKDTree


def _resample(points: np.ndarray, step: float) -> np.ndarray:
    """Points along a polyline at equal arc-length steps (the last point kept)."""
    seg = np.hypot(*np.diff(points, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.arange(0.0, arc[-1], step)
    s = np.append(s, arc[-1]) if arc[-1] - s[-1] > 1e-9 else s
    return np.column_stack([np.interp(s, arc, points[:, 0]), np.interp(s, arc, points[:, 1])])


def _main_curve(rng: np.random.Generator, length_mm: float, size_mm: float, margin_mm: float):
    """A smooth curve of the given arc length (mm coordinates, row/column) inside the field."""
    for _ in range(200):
        angle = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.sin(angle), np.cos(angle)])
        normal = np.array([-direction[1], direction[0]])
        knots = 5
        t = np.linspace(0.0, 1.0, knots)
        offsets = rng.uniform(-0.14, 0.14, knots) * length_mm
        offsets -= np.linspace(offsets[0], offsets[-1], knots)  # endpoints on the chord
        chord = length_mm * 0.8
        control = np.outer(t * chord, direction) + np.outer(offsets, normal)
        spline = CubicSpline(t, control, bc_type="natural")
        dense = spline(np.linspace(0.0, 1.0, 4000))
        arc = np.sum(np.hypot(*np.diff(dense, axis=0).T))
        dense *= length_mm / arc
        # curvature radius must stay well above the lumen radius
        d1 = np.gradient(dense, axis=0)
        d2 = np.gradient(d1, axis=0)
        speed = np.hypot(*d1.T)
        curvature = np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]) / speed**3
        if curvature.max() > 1 / 12.0:
            continue
        low, high = dense.min(axis=0), dense.max(axis=0)
        extent = high - low
        if np.any(extent > size_mm - 2 * margin_mm):
            continue
        shift = rng.uniform(margin_mm - low, size_mm - margin_mm - high)
        return dense + shift
    raise RuntimeError("could not place the main vessel; is the field of view too small?")


def _bump(s: np.ndarray, center: float, length: float) -> np.ndarray:
    """Cosine narrowing shape: 1 at the centre, 0 at and beyond +-length/2."""
    inside = np.abs(s - center) < length / 2
    return np.where(inside, 0.5 * (1 + np.cos(2 * np.pi * (s - center) / length)), 0.0)


def _branch(
    rng: np.random.Generator,
    origin: np.ndarray,
    tangent: np.ndarray,
    length_mm: float,
) -> np.ndarray:
    angle = np.deg2rad(rng.uniform(30, 70)) * rng.choice([-1.0, 1.0])
    c, s = np.cos(angle), np.sin(angle)
    start_dir = np.array([c * tangent[0] - s * tangent[1], s * tangent[0] + c * tangent[1]])
    bend = rng.uniform(-0.012, 0.012)  # curvature, 1/mm
    n = 400
    ds = length_mm / (n - 1)
    heading = np.arctan2(start_dir[0], start_dir[1]) + bend * ds * np.arange(n)
    steps = np.column_stack([np.sin(heading), np.cos(heading)]) * ds
    return origin + np.vstack([[0.0, 0.0], np.cumsum(steps[:-1], axis=0)])


def _chord_field(
    points_ss: np.ndarray,
    band: np.ndarray,
    centerline_px: np.ndarray,
    radius_px: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Chord length (px) and the inside flag at supersample points (only those in `band`)."""
    tree = cKDTree(centerline_px)
    dist, idx = tree.query(points_ss[band])
    r = radius_px[idx]
    inside = dist < r
    chord = np.zeros(len(points_ss))
    flag = np.zeros(len(points_ss), dtype=bool)
    chord[np.flatnonzero(band)[inside]] = 2 * np.sqrt(r[inside] ** 2 - dist[inside] ** 2)
    flag[np.flatnonzero(band)[inside]] = True
    return chord, flag


def _place_lesions(
    rng: np.random.Generator, length: float, percent_ds: Sequence[float]
) -> list[tuple[float, float, float]]:
    """The stenoses along the main vessel, apart from each other: (centre, length, nominal %)."""
    lesions: list[tuple[float, float, float]] = []  # (centre, length, nominal %)
    for pct in percent_ds:
        for _ in range(500):
            les_len = rng.uniform(6.0, 14.0)
            center = (
                rng.uniform(0.35, 0.65) * length
                if not lesions
                else rng.uniform(0.15, 0.85) * length
            )
            if all(abs(center - c) > les_len + ln for c, ln, _ in lesions):
                lesions.append((center, les_len, float(pct)))
                break
        else:
            raise RuntimeError("could not place the stenoses apart from each other")
    return lesions


def _place_branches(
    rng: np.random.Generator,
    wanted: int,
    curve_mm: np.ndarray,
    tangent: np.ndarray,
    arc: np.ndarray,
    reference: np.ndarray,
    lesions: list[tuple[float, float, float]],
    size_mm: float,
    step_mm: float,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Side branches (mm points, origin diameter) clear of the lesions, the main vessel and
    each other."""
    length = float(arc[-1])
    branches: list[tuple[np.ndarray, np.ndarray]] = []
    main_tree = cKDTree(curve_mm)
    lesion_pts = np.vstack(
        [curve_mm[np.abs(arc - c) <= ln] for c, ln, _ in lesions]
    )  # the lesion +-1 lesion length
    lesion_tree = cKDTree(lesion_pts)
    for _ in range(wanted):
        for _attempt in range(300):
            s0 = rng.uniform(0.1, 0.9) * length
            if any(abs(s0 - c) < 1.5 * ln for c, ln, _ in lesions):
                continue
            room = min(s0, length - s0) - 8.0
            if room < 12.0:
                continue
            b_len = rng.uniform(12.0, min(35.0, room))
            i0 = int(np.searchsorted(arc, s0))
            pts = _branch(rng, curve_mm[i0], tangent[i0], b_len)
            b_d0 = rng.uniform(1.2, 2.2)
            if np.any(pts < 4.0) or np.any(pts > size_mm - 4.0):
                continue
            # away from the main vessel except near its origin
            from_origin = np.hypot(*(pts - pts[0]).T)
            far = from_origin > reference[i0] / 2 + b_d0 + 2.0
            d_main, _ = main_tree.query(pts[far])
            if np.any(d_main < reference.max() / 2 + b_d0 / 2 + 1.5):
                continue
            d_les, _ = lesion_tree.query(pts)
            if np.any(d_les < reference.max() / 2 + b_d0 / 2 + 3.0):
                continue
            if any(cKDTree(other).query(pts)[0].min() < 4.0 for other, _d in branches):
                continue
            branches.append((_resample(pts, step_mm), b_d0))
            break
    return branches


def _crossing_line(
    rng: np.random.Generator,
    i0: int,
    curve_mm: np.ndarray,
    tangent: np.ndarray,
    size_mm: float,
    step_mm: float,
    spacing_mm: float,
) -> tuple[np.ndarray, np.ndarray]:
    """A straight vessel crossing the main one at index `i0` (centerline px, radius px)."""
    angle = np.deg2rad(rng.uniform(40, 90)) * rng.choice([-1.0, 1.0])
    t = tangent[i0]
    direction = np.array(
        [
            np.cos(angle) * t[0] - np.sin(angle) * t[1],
            np.sin(angle) * t[0] + np.cos(angle) * t[1],
        ]
    )
    half = rng.uniform(15.0, 20.0)
    line = curve_mm[i0] + np.outer(np.linspace(-half, half, 800), direction)
    line = line[np.all((line > 2.0) & (line < size_mm - 2.0), axis=1)]
    line_px = _resample(line, step_mm) / spacing_mm
    radius_px = np.full(len(line_px), rng.uniform(2.0, 3.0) / spacing_mm / 2)
    return line_px, radius_px


def _band(line_px: np.ndarray, radius_px: np.ndarray, size: int, ss: int) -> np.ndarray:
    """Supersample points within a vessel's largest radius + 2 px of its centerline."""
    raster = np.zeros((size, size), dtype=bool)
    ij = np.clip(np.rint(line_px).astype(int), 0, size - 1)
    raster[ij[:, 0], ij[:, 1]] = True
    near = ndimage.distance_transform_edt(~raster) <= radius_px.max() + 2.0
    return np.repeat(np.repeat(near, ss, axis=0), ss, axis=1).ravel()


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Line integral of the anatomy: a linear gradient, two broad blobs and smoothed noise at
    three scales (sigma 48, 20 and 8 px for a 512 frame)."""
    scale = size / 512
    y, x = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    field = 0.3 * (np.cos(angle) * x + np.sin(angle) * y)
    for _ in range(2):
        cy, cx = rng.uniform(0.1, 0.9, 2)
        width = rng.uniform(0.12, 0.25)
        field += rng.uniform(0.15, 0.35) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width**2))
    for sigma_px, amplitude in ((48, 0.10), (20, 0.035), (8, 0.012)):
        noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma_px * scale)
        field += amplitude * noise / noise.std()
    return field - field.min()
