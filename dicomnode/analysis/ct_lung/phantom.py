"""A synthetic chest CT with known regions: an elliptical-cylinder body (40 HU), two ellipsoid
lungs (-850 HU) with soft-tissue vessels inside them, a trachea (air, not lung), a spine ring
(700 HU), the scanner's blur (partial volume at every edge) and Gaussian noise. The masks it
returns are the truth that segmentation is measured against; a lung's vessels belong to it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage


@dataclass(frozen=True)
class ChestPhantom:
    volume_hu: np.ndarray  # (slices, rows, columns), float32
    body: np.ndarray
    lungs: np.ndarray
    spacing_mm: tuple[float, float, float]  # (slice, row, column)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000.0


def chest_phantom(
    seed: int,
    slices: int = 40,
    size: int = 128,
    spacing_mm: tuple[float, float, float] = (5.0, 2.5, 2.5),
    noise_hu: float = 35.0,
    blur_voxels: float = 0.7,
) -> ChestPhantom:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(
        np.arange(slices) * spacing_mm[0],
        (np.arange(size) - size / 2 + 0.5) * spacing_mm[1],
        (np.arange(size) - size / 2 + 0.5) * spacing_mm[2],
        indexing="ij",
    )
    half_width = size * spacing_mm[2] / 2
    body_a, body_b = half_width * rng.uniform(0.78, 0.88), half_width * rng.uniform(0.55, 0.65)
    body = (x / body_a) ** 2 + (y / body_b) ** 2 <= 1
    length = slices * spacing_mm[0]
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        cx = side * body_a * rng.uniform(0.42, 0.5)
        rx, ry = body_a * rng.uniform(0.28, 0.34), body_b * rng.uniform(0.55, 0.65)
        cz, rz = length * rng.uniform(0.45, 0.55), length * rng.uniform(0.32, 0.4)
        lungs |= ((x - cx) / rx) ** 2 + (y / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1
    lungs &= body
    vessels = np.zeros_like(body)
    for _ in range(6):  # soft-tissue vessels running along z through the lungs
        vx, vy = rng.uniform(-body_a * 0.6, body_a * 0.6), rng.uniform(-body_b * 0.4, body_b * 0.4)
        vessels |= np.hypot(x - vx, y - vy) <= rng.uniform(2.0, 4.0)
    vessels &= lungs
    trachea = (np.hypot(x, y + body_b * 0.35) <= 7.0) & ~lungs & body
    spine_r = np.hypot(x, y - body_b * 0.62)
    spine = (spine_r <= body_b * 0.18) & (spine_r >= body_b * 0.1)
    volume = np.full(body.shape, -1000.0, dtype=np.float32)
    volume[body] = 40.0
    volume[spine & body & ~lungs] = 700.0
    volume[lungs] = -850.0
    volume[vessels] = 40.0
    volume[trachea] = -1000.0
    volume = ndimage.gaussian_filter(volume, blur_voxels)
    volume += rng.normal(0, noise_hu, volume.shape).astype(np.float32)
    return ChestPhantom(volume.astype(np.float32), body, lungs, spacing_mm)


def phantom_series(
    phantom: ChestPhantom,
    patient_id: str = "PHANTOM",
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> list[Dataset]:
    """The phantom as a CT series: one CT Image per slice, with its geometry (Frame of
    Reference, positions, orientation, spacing) and HU stored through RescaleIntercept."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference = generate_uid()
    slice_mm, row_mm, column_mm = phantom.spacing_mm
    slices, rows, columns = phantom.volume_hu.shape
    stored = np.clip(np.rint(phantom.volume_hu + 1024), 0, 4095).astype(np.uint16)
    datasets = []
    for index in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.PatientID, ds.PatientName = patient_id, "Phantom^Chest"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "", "1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, index + 1
        ds.Manufacturer = "dicomnode phantom"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "CHEST"
        ds.ImagePositionPatient = [-columns * column_mm / 2, -rows * row_mm / 2, index * slice_mm]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [row_mm, column_mm]
        ds.SliceThickness = slice_mm
        ds.KVP, ds.AcquisitionNumber, ds.PatientOrientation = 120, 1, ""
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = stored[index].tobytes()
        datasets.append(ds)
    return datasets
