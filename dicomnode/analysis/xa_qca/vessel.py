"""QCA's vessel tree: bridging a gap cut by a tight stenosis, tracing and fitting the side
branches, and finding the lesions on the main vessel's diameter profile (used by
`dicomnode.analysis.xa_qca.qca`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal
from scipy.sparse.csgraph import dijkstra
from scipy.spatial import cKDTree

from dicomnode.analysis.xa_qca.lumen import (
    _fit_profiles,
    _Graph,
    _graph,
    _path,
    _profiles,
    _robust_smooth,
    _smooth_resample,
    _trim,
)
from dicomnode.analysis.xa_qca.model import Lesion, QcaParams


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
