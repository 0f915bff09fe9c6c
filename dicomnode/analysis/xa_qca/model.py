"""QCA's settings and answers: `QcaParams`, `Calibration`, `Lesion` and `QcaResult` (see
`dicomnode.analysis.xa_qca.qca` for the analysis that fills them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.spatial import cKDTree

Status = Literal["ok", "no-vessel"]


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
