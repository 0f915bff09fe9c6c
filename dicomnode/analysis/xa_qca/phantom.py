"""A synthetic coronary angiogram with known ground truth, for measuring `qca.analyze_frame`.

What it draws (the phantom specification of the analysis brief, section 6.2):

- a 512x512 frame at 0.25 mm per pixel (any size and spacing can be asked for);
- one main vessel, a smooth random curve 70-95 mm long whose lumen diameter tapers linearly
  from 3.2-4.2 mm (proximal) to 2.2-2.9 mm (distal), narrowed by one (or more) cosine-shaped
  stenoses 6-14 mm long of a chosen %DS (30, 50, 70 or 80 by default);
- 0-3 side branches 1.2-2.2 mm wide, none leaving the main vessel within one lesion length of
  a lesion and none passing near one in projection (branch overlap is a separate test class);
  every branch is shorter than the main vessel's parts on either side of its origin, so that
  the main vessel is the longest path through the tree;
- circular lumens: each pixel holds the chord length of the ray through the lumen,
  2 sqrt(r^2 - d^2), where d is the distance to the nearest centerline point and r the lumen
  radius there, computed on a 3x3 supersampled grid;
- Beer-Lambert attenuation (mu = 0.12 / mm of iodinated lumen) over a low-frequency
  "anatomical" background (a linear gradient, broad blobs and smoothed noise at three scales),
  a Gaussian PSF (sigma 0.8 px), signal-dependent Gaussian noise (2% of the local signal; 4% is
  the stress case) and 10-bit quantisation, MONOCHROME2 (vessels dark).

The lumen profile is the union of discs perpendicular to the centerline, so the true diameter
at arc length s, measured perpendicular to the centerline, is exactly 2 r(s); the ground-truth
mask holds the pixels whose 3x3 sub-samples are at least half inside a lumen.

`xa_cine` renders a run of frames with a gamma-variate contrast bolus and small rigid and scale
motion (for frame selection), and `xa_dataset` wraps frames as an X-Ray Angiographic Image
instance whose ImagerPixelSpacing, DistanceSourceToDetector and DistanceSourceToPatient give the
phantom's spacing at the isocenter. Everything is deterministic by seed (NumPy and SciPy only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from scipy.spatial import cKDTree

from dicomnode.analysis.xa_qca.phantom_shapes import (
    _background,
    _band,
    _bump,
    _chord_field,
    _crossing_line,
    _main_curve,
    _place_branches,
    _place_lesions,
    _resample,
)

if TYPE_CHECKING:
    from dicomnode.analysis.xa_qca.model import QcaResult

XA_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.12.1"
MU_PER_MM = 0.12  # attenuation of the iodinated lumen, 1/mm
SUPERSAMPLE = 3
PSF_SIGMA_PX = 0.8
DEFAULT_PERCENT_DS = (30.0, 50.0, 70.0, 80.0)
MAX_LEVEL = 1023  # 10-bit
_CENTERLINE_STEP_PX = 0.05


@dataclass(frozen=True)
class TrueStenosis:
    """One stenosis as drawn. Positions are arc lengths from the proximal end of the main
    vessel; the MLD point is the narrowest point of the drawn lumen."""

    center_mm: float  # centre of the cosine narrowing
    length_mm: float  # full extent of the narrowing (where the lumen departs from the taper)
    nominal_percent: float  # depth of the cosine relative to the local reference
    percent_diameter_stenosis: float  # 100 (1 - MLD / RVD), RVD the taper at the MLD point
    mld_mm: float
    reference_diameter_mm: float  # interpolated (tapering) reference at the MLD point
    mld_position_mm: float
    mld_index: int  # index into PhantomTruth.centerline_px
    mld_point_px: tuple[float, float]  # (row, column)
    length_90_mm: float  # length over which the lumen is below 0.9 x the reference


@dataclass(frozen=True, eq=False)
class PhantomTruth:
    """Ground truth of one phantom. Arrays along the main vessel share one index and run from
    the proximal (wide) end to the distal end in steps of `step_mm`."""

    centerline_px: np.ndarray  # (n, 2) float, (row, column)
    arc_mm: np.ndarray  # (n,)
    diameter_mm: np.ndarray  # (n,) true lumen diameter
    reference_mm: np.ndarray  # (n,) the healthy taper (interpolated reference)
    stenoses: tuple[TrueStenosis, ...]
    branch_centerlines_px: tuple[np.ndarray, ...]  # (m, 2) each, (row, column), from the origin
    branch_diameters_mm: tuple[np.ndarray, ...]
    lumen_mask: np.ndarray  # bool, all vessels
    main_mask: np.ndarray  # bool, main vessel only
    step_mm: float

    @property
    def length_mm(self) -> float:
        return float(self.arc_mm[-1])


@dataclass(frozen=True, eq=False)
class XaPhantom:
    """One synthetic frame: stored values as an XA detector would give them (uint16, 10 bits
    used, MONOCHROME2), the pixel spacing at the isocenter and the ground truth."""

    image: np.ndarray
    pixel_spacing_mm: float
    truth: PhantomTruth
    seed: int
    noise: float


@dataclass(frozen=True, eq=False)
class XaCine:
    """A synthetic run: frames (n, rows, columns) uint16, the relative contrast of each frame
    (bolus curve, peak 1) and the index of the maximum-contrast frame. `truth` is the geometry
    without motion (motion is small: a few pixels and at most 2% scale)."""

    frames: np.ndarray
    contrast: np.ndarray
    max_contrast_frame: int
    pixel_spacing_mm: float
    truth: PhantomTruth


@dataclass(frozen=True, eq=False)
class _Geometry:
    truth: PhantomTruth
    chord_ss_mm: np.ndarray  # supersampled chord length through all lumens, mm
    background: np.ndarray  # attenuation of the anatomy (line integral, native grid)


# --- geometry ------------------------------------------------------------------------------


def _true_stenoses(
    lesions: list[tuple[float, float, float]],
    arc: np.ndarray,
    diameter: np.ndarray,
    reference: np.ndarray,
    center_px: np.ndarray,
    step_mm: float,
) -> list[TrueStenosis]:
    """What an analysis should find for each placed stenosis."""
    stenoses = []
    for center, les_len, pct in lesions:
        window = np.abs(arc - center) <= les_len / 2
        idx = np.flatnonzero(window)[np.argmin(diameter[window])]
        below = window & (diameter < 0.9 * reference)
        stenoses.append(
            TrueStenosis(
                center_mm=float(center),
                length_mm=float(les_len),
                nominal_percent=pct,
                percent_diameter_stenosis=float(100 * (1 - diameter[idx] / reference[idx])),
                mld_mm=float(diameter[idx]),
                reference_diameter_mm=float(reference[idx]),
                mld_position_mm=float(arc[idx]),
                mld_index=int(idx),
                mld_point_px=(float(center_px[idx, 0]), float(center_px[idx, 1])),
                length_90_mm=float(below.sum() * step_mm),
            )
        )
    return stenoses


def _geometry(
    seed: int,
    size: int,
    spacing_mm: float,
    percent_ds: Sequence[float] | None,
    n_branches: int | None,
    crossing: bool = False,
) -> _Geometry:
    rng = np.random.default_rng(seed)
    size_mm = size * spacing_mm
    length = rng.uniform(70.0, 95.0)
    length = min(length, 0.85 * size_mm)
    curve_mm = _main_curve(rng, length, size_mm, margin_mm=6.0)
    step_mm = _CENTERLINE_STEP_PX * spacing_mm
    curve_mm = _resample(curve_mm, step_mm)
    arc = np.arange(len(curve_mm)) * step_mm
    arc[-1] = np.sum(np.hypot(*np.diff(curve_mm, axis=0).T))
    length = float(arc[-1])

    d_prox, d_dist = rng.uniform(3.2, 4.2), rng.uniform(2.2, 2.9)
    reference = d_prox + (d_dist - d_prox) * arc / length
    if percent_ds is None:
        percent_ds = (DEFAULT_PERCENT_DS[seed % len(DEFAULT_PERCENT_DS)],)
    lesions = _place_lesions(rng, length, percent_ds)
    narrowing = np.zeros_like(arc)
    for center, les_len, pct in lesions:
        narrowing = np.maximum(narrowing, pct / 100 * _bump(arc, center, les_len))
    diameter = reference * (1 - narrowing)

    center_px = curve_mm / spacing_mm
    stenoses = _true_stenoses(lesions, arc, diameter, reference, center_px, step_mm)

    # side branches
    tangent = np.gradient(curve_mm, axis=0)
    tangent /= np.hypot(*tangent.T)[:, None]
    wanted = int(rng.integers(0, 4)) if n_branches is None else n_branches
    branches = _place_branches(
        rng, wanted, curve_mm, tangent, arc, reference, lesions, size_mm, step_mm
    )

    # rasterise on the supersampled grid, only near the centerlines
    ss = SUPERSAMPLE
    coords = (np.arange(size * ss) + 0.5) / ss - 0.5  # native pixel coordinates of sub-samples
    rr, cc = np.meshgrid(coords, coords, indexing="ij")
    points_ss = np.column_stack([rr.ravel(), cc.ravel()])
    chord = np.zeros(len(points_ss))
    main_inside = np.zeros(len(points_ss), dtype=bool)
    any_inside = np.zeros(len(points_ss), dtype=bool)
    branch_lines, branch_diams = [], []
    vessels = [(center_px, diameter / spacing_mm / 2, True)]
    for pts, b_d0 in branches:
        b_px = pts / spacing_mm
        b_r = b_d0 * np.linspace(1.0, 0.7, len(pts)) / spacing_mm / 2
        vessels.append((b_px, b_r, False))
        branch_lines.append(b_px)
        branch_diams.append(b_r * 2 * spacing_mm)
    crossing_chord = np.zeros(len(points_ss))
    if crossing:  # a vessel of another branch lying over the lesion in projection
        i0 = stenoses[0].mld_index
        line_px, radius_px = _crossing_line(
            rng, i0, curve_mm, tangent, size_mm, step_mm, spacing_mm
        )
        band = _band(line_px, radius_px, size, ss)
        crossing_chord, inside = _chord_field(points_ss, band, line_px, radius_px)
        any_inside |= inside
        branch_lines.append(line_px)
        branch_diams.append(radius_px * 2 * spacing_mm)
    for line_px, radius_px, is_main in vessels:
        band = _band(line_px, radius_px, size, ss)
        c, inside = _chord_field(points_ss, band, line_px, radius_px)
        chord = np.maximum(chord, c)  # junctions: one lumen, not two
        any_inside |= inside
        if is_main:
            main_inside |= inside

    chord += crossing_chord  # overlapping vessels add up along the ray

    def _native_fraction(flags: np.ndarray) -> np.ndarray:
        return flags.reshape(size, ss, size, ss).mean(axis=(1, 3))

    lumen_mask = _native_fraction(any_inside) >= 0.5
    main_mask = _native_fraction(main_inside) >= 0.5

    background = _background(rng, size)
    truth = PhantomTruth(
        centerline_px=center_px,
        arc_mm=arc,
        diameter_mm=diameter,
        reference_mm=reference,
        stenoses=tuple(stenoses),
        branch_centerlines_px=tuple(branch_lines),
        branch_diameters_mm=tuple(branch_diams),
        lumen_mask=lumen_mask,
        main_mask=main_mask,
        step_mm=step_mm,
    )
    return _Geometry(truth, (chord * spacing_mm).reshape(size * ss, size * ss), background)


def _expose(
    rng: np.random.Generator,
    chord_ss_mm: np.ndarray,
    background: np.ndarray,
    contrast: float,
    noise: float,
) -> np.ndarray:
    """Beer-Lambert, PSF, pixel integration, signal-dependent noise, 10-bit quantisation."""
    size = background.shape[0]
    ss = SUPERSAMPLE
    vessel = np.exp(-MU_PER_MM * contrast * chord_ss_mm)
    vessel = ndimage.gaussian_filter(vessel, PSF_SIGMA_PX * ss)
    vessel = vessel.reshape(size, ss, size, ss).mean(axis=(1, 3))
    anatomy = ndimage.gaussian_filter(np.exp(-background), PSF_SIGMA_PX)
    signal = 900.0 * anatomy * vessel
    noisy = signal * (1 + noise * rng.normal(size=signal.shape))
    return np.clip(np.rint(noisy), 0, MAX_LEVEL).astype(np.uint16)


# --- public API -----------------------------------------------------------------------------


def xa_phantom(
    seed: int,
    size: int = 512,
    pixel_spacing_mm: float = 0.25,
    noise: float = 0.02,
    percent_ds: Sequence[float] | None = None,
    n_branches: int | None = None,
    crossing: bool = False,
) -> XaPhantom:
    """One synthetic angiographic frame with its ground truth.

    `percent_ds` gives the nominal depth of each stenosis (default: one stenosis of
    30, 50, 70 or 80% chosen by ``seed % 4``); `n_branches` defaults to 0-3 drawn from the seed.
    `noise` is the standard deviation of the noise relative to the local signal.
    `crossing` lays a 2-3 mm vessel of another branch across the (first) lesion in projection:
    the documented-failure class of 2-D QCA (its chord adds to the lesion's); it is listed
    with the branches in the truth and is part of the lumen mask.
    """
    geometry = _geometry(seed, size, pixel_spacing_mm, percent_ds, n_branches, crossing)
    rng = np.random.default_rng([seed, 1])
    image = _expose(rng, geometry.chord_ss_mm, geometry.background, 1.0, noise)
    return XaPhantom(image, pixel_spacing_mm, geometry.truth, seed, noise)


def xa_cine(
    seed: int,
    n_frames: int = 30,
    size: int = 512,
    pixel_spacing_mm: float = 0.25,
    noise: float = 0.02,
    contrast: Sequence[float] | None = None,
) -> XaCine:
    """A run of frames: the phantom's vessels filled by a gamma-variate bolus (peak somewhere in
    the middle half of the run), with small cardiac-like translation, rotation and scaling.
    The anatomy does not move; only the opacified vessels do. `contrast` replaces the bolus
    curve with the given relative contrast per frame (0 = no iodine, 1 = full)."""
    geometry = _geometry(seed, size, pixel_spacing_mm, None, None)
    rng = np.random.default_rng([seed, 2])
    if contrast is not None:
        bolus = np.asarray(contrast, dtype=float)
        n_frames = len(bolus)
    else:
        t = np.arange(n_frames, dtype=float)
        t0 = rng.uniform(0.0, 0.2) * n_frames
        t_peak = rng.uniform(0.35, 0.7) * n_frames
        alpha = rng.uniform(2.0, 4.0)
        u = np.clip((t - t0) / (t_peak - t0), 0.0, None)
        bolus = np.where(u > 0, u**alpha * np.exp(alpha * (1 - u)), 0.0)
    # frames are rendered on the native grid (the sub-pixel chord averaged per pixel): the run
    # is for frame selection, where the per-frame cost matters more than sub-pixel exactness
    ss = SUPERSAMPLE
    chord = geometry.chord_ss_mm.reshape(size, ss, size, ss).mean(axis=(1, 3))
    anatomy = ndimage.gaussian_filter(np.exp(-geometry.background), PSF_SIGMA_PX)
    centre = np.array([size / 2, size / 2])
    phase = rng.uniform(0, 2 * np.pi)
    frames = np.empty((n_frames, size, size), dtype=np.uint16)
    for f in range(n_frames):
        beat = np.sin(2 * np.pi * f / 12.0 + phase)
        shift = np.array([2.0, 1.5]) * beat
        scale = 1 + 0.02 * beat
        rot = np.deg2rad(1.0 * beat)
        matrix = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]]) / scale
        offset = centre - matrix @ (centre + shift)
        moved = ndimage.affine_transform(chord, matrix, offset, order=1)
        vessel = ndimage.gaussian_filter(np.exp(-MU_PER_MM * bolus[f] * moved), PSF_SIGMA_PX)
        signal = 900.0 * anatomy * vessel
        noisy = signal * (1 + noise * rng.normal(size=signal.shape))
        frames[f] = np.clip(np.rint(noisy), 0, MAX_LEVEL).astype(np.uint16)
    return XaCine(frames, bolus, int(np.argmax(bolus)), pixel_spacing_mm, geometry.truth)


def xa_dataset(
    frames: np.ndarray,
    pixel_spacing_mm: float,
    *,
    distance_source_to_detector_mm: float = 1000.0,
    distance_source_to_patient_mm: float = 800.0,
    representative_frame_number: int | None = None,
    patient_id: str = "PHANTOM",
    study_uid: str | None = None,
) -> Dataset:
    """Frames (rows, columns) or (n, rows, columns) as an X-Ray Angiographic Image instance.

    The phantom's spacing is the spacing at the isocenter, so ImagerPixelSpacing (at the
    detector) is spacing x SID / SOD; no PixelSpacing is written (uncalibrated, as an XA
    modality sends it). `representative_frame_number` is 1-based, as in DICOM.
    """
    frames = np.asarray(frames)
    multi = frames.ndim == 3
    n, rows, columns = frames.shape if multi else (1, *frames.shape)
    magnification = distance_source_to_detector_mm / distance_source_to_patient_mm
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = XA_IMAGE_STORAGE
    ds.SOPClassUID = XA_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = patient_id, "Phantom^Coronary"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "XA", 1, 1
    ds.Manufacturer = "dicomnode phantom"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.BodyPartExamined = "HEART"
    ds.PatientOrientation = ""
    ds.PositionerMotion = "STATIC"
    ds.KVP = 80
    ds.ImagerPixelSpacing = [
        f"{pixel_spacing_mm * magnification:.10g}",
        f"{pixel_spacing_mm * magnification:.10g}",
    ]
    ds.DistanceSourceToDetector = f"{distance_source_to_detector_mm:.10g}"
    ds.DistanceSourceToPatient = f"{distance_source_to_patient_mm:.10g}"
    ds.PositionerPrimaryAngle, ds.PositionerSecondaryAngle = 0, 0
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 10, 9, 0
    ds.PixelIntensityRelationship = "LIN"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.LossyImageCompression = "00"
    if multi:
        ds.NumberOfFrames = n
        ds.FrameTime = 66.7
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.CineRate = 15
    if representative_frame_number is not None:
        ds.RepresentativeFrameNumber = int(representative_frame_number)
    ds.PixelData = frames.astype(np.uint16).tobytes()
    return ds


# --- scoring an analysis against the truth --------------------------------------------------


@dataclass(frozen=True)
class Score:
    """How one `QcaResult` compares with its phantom's truth. Errors are measured minus true;
    lesion errors compare the (first) true stenosis with the reported lesion nearest to it and
    are None when no lesion was reported within one lesion length of it."""

    seed: int
    nominal_percent: float
    true_percent: float
    true_mld_mm: float
    dice: float  # lumen mask (all vessels) against the truth's
    reported_lesions: int
    false_lesions: int  # reported more than one lesion length away from every true stenosis
    percent_ds_error: float | None
    mld_error_mm: float | None
    reference_error_mm: float | None
    location_error_mm: float | None  # distance of the MLD points
    length_error_mm: float | None  # against the length below 90% of the true reference
    healthy_bias_mm: float | None  # median diameter error away from lesions and vessel ends
    healthy_mae_mm: float | None


def score(phantom: XaPhantom, result: QcaResult) -> Score:
    """Compare an analysis of `phantom.image` (calibrated) with the phantom's truth: the first
    true stenosis against the reported lesion nearest to it (within one lesion length)."""
    truth = phantom.truth
    spacing = phantom.pixel_spacing_mm
    found, mask = result.lumen_mask, truth.lumen_mask
    dice = 2.0 * float((found & mask).sum()) / max(float(found.sum() + mask.sum()), 1.0)
    true = truth.stenoses[0]
    false_lesions = 0
    for lesion in result.lesions:
        near = [
            np.hypot(
                lesion.point_px[0] - st.mld_point_px[0], lesion.point_px[1] - st.mld_point_px[1]
            )
            * spacing
            <= st.length_mm
            for st in truth.stenoses
        ]
        false_lesions += not any(near)
    errors: dict[str, float | None] = dict.fromkeys(
        ("ds", "mld", "ref", "loc", "len", "bias", "mae"), None
    )
    if result.status == "ok" and result.diameter_mm is not None:
        dist, nearest = cKDTree(truth.centerline_px).query(result.centerline_px)
        arc = truth.arc_mm[nearest]
        healthy = (dist < 2.0) & (arc > 0.05 * truth.length_mm) & (arc < 0.95 * truth.length_mm)
        for st in truth.stenoses:
            healthy &= np.abs(arc - st.center_mm) > st.length_mm
        if healthy.any():
            diff = result.diameter_mm[healthy] - truth.diameter_mm[nearest[healthy]]
            errors["bias"] = float(np.median(diff))
            errors["mae"] = float(np.mean(np.abs(diff)))
    matched = [
        les
        for les in result.lesions
        if np.hypot(les.point_px[0] - true.mld_point_px[0], les.point_px[1] - true.mld_point_px[1])
        * spacing
        <= true.length_mm
    ]
    if matched and matched[0].mld_mm is not None:
        lesion = min(
            matched,
            key=lambda les: np.hypot(
                les.point_px[0] - true.mld_point_px[0], les.point_px[1] - true.mld_point_px[1]
            ),
        )
        errors["ds"] = lesion.percent_diameter_stenosis - true.percent_diameter_stenosis
        errors["mld"] = lesion.mld_mm - true.mld_mm
        errors["ref"] = lesion.reference_diameter_mm - true.reference_diameter_mm
        errors["loc"] = float(
            np.hypot(
                lesion.point_px[0] - true.mld_point_px[0], lesion.point_px[1] - true.mld_point_px[1]
            )
            * spacing
        )
        errors["len"] = lesion.length_mm - true.length_90_mm
    return Score(
        seed=phantom.seed,
        nominal_percent=true.nominal_percent,
        true_percent=true.percent_diameter_stenosis,
        true_mld_mm=true.mld_mm,
        dice=dice,
        reported_lesions=len(result.lesions),
        false_lesions=false_lesions,
        percent_ds_error=errors["ds"],
        mld_error_mm=errors["mld"],
        reference_error_mm=errors["ref"],
        location_error_mm=errors["loc"],
        length_error_mm=errors["len"],
        healthy_bias_mm=errors["bias"],
        healthy_mae_mm=errors["mae"],
    )
