"""Body and lung masks of a CT volume by Hounsfield thresholds and morphology.

After Hu, Hoffman and Reinhardt (IEEE TMI 20(6), 2001): the body is the largest connected
region above -500 HU with its holes filled slice by slice; the lungs are the regions below
-400 HU inside the body that do not touch the volume's border, the two largest kept and
closed. Volumes come from voxel counts and the voxel size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BODY_THRESHOLD_HU = -500.0
LUNG_THRESHOLD_HU = -400.0


@dataclass(frozen=True)
class RegionStats:
    """One region's volume and attenuation."""

    voxels: int
    volume_ml: float
    mean_hu: float
    sd_hu: float


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask)
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def body_mask(volume_hu: np.ndarray) -> np.ndarray:
    """The patient's body: the largest region above -500 HU, holes filled in each slice."""
    body = _largest_component(volume_hu > BODY_THRESHOLD_HU)
    return np.stack([ndimage.binary_fill_holes(axial) for axial in body])


def lung_mask(volume_hu: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Air-like regions inside the body that do not touch the volume's border: the two largest,
    closed to include the vessels within them."""
    candidates = (volume_hu < LUNG_THRESHOLD_HU) & body
    labels, count = ndimage.label(candidates)
    if count == 0:
        return np.zeros_like(candidates)
    border = np.zeros_like(candidates)
    border[:, 0, :] = border[:, -1, :] = border[:, :, 0] = border[:, :, -1] = True
    touching = set(np.unique(labels[border & candidates])) - {0}
    sizes = ndimage.sum_labels(candidates, labels, index=np.arange(1, count + 1))
    order = [i + 1 for i in np.argsort(sizes)[::-1] if (i + 1) not in touching]
    lungs = np.isin(labels, order[:2])
    structure = ndimage.generate_binary_structure(3, 1)
    closed = ndimage.binary_closing(lungs, structure=structure, iterations=2, border_value=0)
    return np.stack([ndimage.binary_fill_holes(axial) for axial in closed]) & body


def region_stats(volume_hu: np.ndarray, mask: np.ndarray, voxel_ml: float) -> RegionStats:
    values = volume_hu[mask]
    if values.size == 0:
        return RegionStats(0, 0.0, float("nan"), float("nan"))
    return RegionStats(
        int(values.size), float(values.size * voxel_ml), float(values.mean()), float(values.std())
    )
