"""The built-in `ct-lung` analyzer: body and lung masks of a CT series, written back as a DICOM
SEG (two segments) and a TID 1500 measurement report (Comprehensive 3D SR) with each region's
volume and mean and standard deviation of its attenuation. Research use only."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage

from dicomnode.analysis import provenance
from dicomnode.analysis.ct_lung.segmentation import RegionStats, body_mask, lung_mask, region_stats
from dicomnode.analysis.fits import CHEST_CT
from dicomnode.analysis.plugin import (
    AnalysisContext,
    AnalysisResult,
    Analyzer,
    InputUnit,
    NotApplicable,
    OutputCriteria,
    Selector,
)
from dicomnode.analysis.provenance import RESEARCH_USE

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
HOUNSFIELD = hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
CUBIC_CM = hd.sr.CodedConcept("cm3", "UCUM", "cubic centimeter")


def load_volume(paths: list) -> tuple[list[Dataset], np.ndarray, float]:
    """The series' slices (sorted along the slice normal), its volume in HU and the voxel size
    in mL; raises NotApplicable for a series that is not one regular stack."""
    slices = [pydicom.dcmread(p) for p in paths]
    if len(slices) < 3:
        raise NotApplicable(f"a volume needs at least 3 slices, got {len(slices)}")
    if any(
        "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds for ds in slices
    ):
        raise NotApplicable("the slices carry no patient geometry (position, orientation)")
    normal = np.cross(*np.reshape(np.asarray(slices[0].ImageOrientationPatient, float), (2, 3)))
    slices.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    positions = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))) for ds in slices]
    gaps = np.diff(positions)
    if np.any(gaps <= 0) or np.ptp(gaps) > 0.01 * np.mean(gaps):
        raise NotApplicable(
            "the slices are not evenly spaced; this analyzer needs one regular stack"
        )
    volume = np.stack(
        [
            ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
            for ds in slices
        ]
    ).astype(np.float32)
    row_mm, column_mm = (float(v) for v in slices[0].PixelSpacing)
    return slices, volume, row_mm * column_mm * float(np.mean(gaps)) / 1000.0


class CtLung(Analyzer):
    name = "ct-lung"
    version = "1.0.0"
    selector = Selector(sop_class_uids=frozenset({CTImageStorage}), modalities=frozenset({"CT"}))
    fit = CHEST_CT  # minimum data: only chest CTs (site-tunable)
    unit = "series"
    output_sop_classes = frozenset({SEGMENTATION_STORAGE, COMPREHENSIVE_3D_SR})
    criteria = OutputCriteria(
        output="a DICOM Segmentation (SEG) with two segments, body and lungs, and a TID 1500 "
        "measurement report (Comprehensive 3D SR), added to the CT study",
        measures="the volume (mL) of the body and of the lungs in one chest CT series, and the "
        "mean and standard deviation of their attenuation (HU)",
        method="fixed Hounsfield thresholds and morphology (after Hu, Hoffman and Reinhardt, "
        "IEEE TMI 2001): the body is the largest region above -500 HU, its holes filled; the "
        "lungs are the two largest regions below -400 HU inside it that do not touch the "
        "border of the volume; volumes are voxel counts times the voxel size. No trained model",
        limits="only chest CTs of one evenly spaced stack of at least 3 slices (others are not "
        "processed); airways, pleural effusion, consolidation or motion change the masks; not "
        "validated on patients: research use only, not a medical device",
    )

    def analyze(self, unit: InputUnit, context: AnalysisContext) -> AnalysisResult:
        slices, volume, voxel_ml = load_volume(list(unit.paths))
        body = body_mask(volume)
        lungs = lung_mask(volume, body)
        stats = {
            "body": region_stats(volume, body, voxel_ml),
            "lungs": region_stats(volume, lungs, voxel_ml),
        }
        seg = self._segmentation(slices, body, lungs, context)
        report = self._report(slices, seg, stats, context)
        summary = {
            f"{name}_{field}": round(getattr(value, field), 3)
            for name, value in stats.items()
            for field in ("volume_ml", "mean_hu", "sd_hu")
        }
        warnings = [] if lungs.any() else ["no lung region found"]
        return AnalysisResult([seg, report], summary, warnings)

    def _segmentation(
        self, slices: list[Dataset], body: np.ndarray, lungs: np.ndarray, context: AnalysisContext
    ) -> hd.seg.Segmentation:
        descriptions = [
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=concept,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=provenance.seg_algorithm(
                    self, codes.DCM.MorphologicalOperations
                ),
                tracking_uid=context.uid(f"segment-{number}"),
                tracking_id=label,
            )
            for number, label, concept in (
                (1, "Body", codes.SCT.EntireBody),
                (2, "Lungs", codes.SCT.Lung),
            )
        ]
        seg = hd.seg.Segmentation(
            source_images=slices,
            pixel_array=np.stack([body, lungs], axis=-1).astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=context.uid("seg-series"),
            series_number=9901,
            sop_instance_uid=context.uid("seg"),
            instance_number=1,
            manufacturer=provenance.MANUFACTURER,
            manufacturer_model_name=self.name,
            software_versions=provenance.software_versions(self),
            device_serial_number="0",
            series_description=f"Lung segmentation ({RESEARCH_USE})"[:64],
            content_label="LUNG",
            content_description=RESEARCH_USE,
            content_qualification="RESEARCH",
            contributing_equipment=[provenance.contributing_equipment(self)],
        )
        return seg

    def _report(
        self,
        slices: list[Dataset],
        seg: hd.seg.Segmentation,
        stats: dict[str, RegionStats],
        context: AnalysisContext,
    ) -> hd.sr.Comprehensive3DSR:
        groups = []
        for number, (name, site) in enumerate(
            (("body", codes.SCT.EntireBody), ("lungs", codes.SCT.Lung)), start=1
        ):
            value = stats[name]
            measurements = [
                hd.sr.Measurement(name=codes.SCT.Volume, value=value.volume_ml, unit=CUBIC_CM)
            ]
            if value.voxels:
                measurements += [
                    hd.sr.Measurement(
                        name=codes.DCM.AttenuationCoefficient,
                        value=value.mean_hu,
                        unit=HOUNSFIELD,
                        derivation=codes.SCT.Mean,
                    ),
                    hd.sr.Measurement(
                        name=codes.DCM.AttenuationCoefficient,
                        value=value.sd_hu,
                        unit=HOUNSFIELD,
                        derivation=codes.SCT.StandardDeviation,
                    ),
                ]
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=context.uid(f"segment-{number}"), identifier=name.capitalize()
                    ),
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=seg.SOPClassUID,
                        sop_instance_uid=seg.SOPInstanceUID,
                        segment_number=number,
                        source_series=hd.sr.SourceSeriesForSegmentation(
                            slices[0].SeriesInstanceUID
                        ),
                    ),
                    finding_type=site,
                    algorithm_id=provenance.sr_algorithm(self),
                    finding_sites=[hd.sr.FindingSite(site)],
                    measurements=measurements,
                )
            )
        observer = provenance.device_observer(self, context.uid("device"))
        content = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=hd.sr.CodedConcept(
                "77477000", "SCT", "Computerized axial tomography"
            ),
            imaging_measurements=groups,
        )
        return hd.sr.Comprehensive3DSR(
            evidence=[*slices, seg],
            content=content,
            series_instance_uid=context.uid("sr-series"),
            series_number=9902,
            sop_instance_uid=context.uid("sr"),
            instance_number=1,
            manufacturer=provenance.MANUFACTURER,
            manufacturer_model_name=self.name,
            software_versions=provenance.software_versions(self),
            content_qualification="RESEARCH",
            series_description=f"Lung measurements ({RESEARCH_USE})"[:64],
            is_complete=True,
            contributing_equipment=[provenance.contributing_equipment(self)],
        )
