"""QCA's geometry and lumen model: the pixel graph and its paths, centerline resampling, the
blurred circular-lumen profile and its Levenberg-Marquardt fit, the interpolated reference
and the painted lumen mask (used by `dicomnode.analysis.xa_qca.qca`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage, signal
from scipy.sparse import coo_matrix
from scipy.spatial import cKDTree


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


_PROFILE_STEP = 0.5  # px between samples along a profile
_SIGMA_CANDIDATES = (0.5, 0.7, 0.9, 1.1, 1.3, 1.6, 2.0)


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
