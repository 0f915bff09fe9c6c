"""The built-in `xa-qca` analyzer: classical quantitative coronary analysis (`qca`) of one
X-ray angiography instance, written back as

- a binary DICOM SEG on the analysed frame: segment 1 "Coronary artery lumen" (every traced
  vessel), then one "Stenotic lesion" segment per lesion (the lumen along the lesion);
- a TID 1500 measurement report (Comprehensive SR) with one planar ROI group for the analysed
  vessel (its centerline as a POLYLINE on the frame, its length) and one per lesion: the
  lesion's centerline as a POLYLINE on the frame, finding Stenosis at Coronary artery, %DS,
  MLD, the interpolated reference diameter at the MLD, the lesion
  length, and its position along the centerline (TID 3218: the MLD site and the lesion's
  borders, in mm from the proximal end of the analysed segment). Each group shares its
  tracking UID with its SEG segment and names the frame, mm per pixel and the calibration
  method (CID 3452) in its algorithm parameters.

An uncalibrated image (no usable PixelSpacing, or ImagerPixelSpacing without the source
distances) gets %DS only, a "calibration=none" parameter saying so and a warning in the job.
A run without an opacified vessel is NotApplicable (the job is skipped, not failed).
Research use only: the accuracy figures come from synthetic phantoms (bench/QCA_RESULTS.md).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.analysis import provenance
from dicomnode.analysis.fits import CORONARY_ANGIOGRAPHY
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
from dicomnode.analysis.xa_qca.model import Lesion, QcaParams, QcaResult
from dicomnode.analysis.xa_qca.qca import (
    ALGORITHM_NAME,
    ALGORITHM_VERSION,
    DatasetAnalysis,
    analyze_dataset,
)

XA_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.12.1"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

MILLIMETRE = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
LUMEN_SEGMENT = 1  # SEG segment number of the coronary lumen; lesion k is segment 1 + k

# Settings a site may tune under [analysis.analyzers.xa-qca] params: every QcaParams field
# except the one the image header decides (PixelIntensityRelationship).
TUNABLE = tuple(
    f.name for f in dataclasses.fields(QcaParams) if f.name != "pixel_intensity_relationship"
)


def qca_params(params: Mapping[str, Any]) -> QcaParams:
    """QcaParams from a site's `params` table; a key or value that does not fit raises
    ValueError naming it."""
    defaults = QcaParams()
    values: dict[str, Any] = {}
    for key, value in params.items():
        if key not in TUNABLE:
            raise ValueError(
                f"analysis.analyzers.xa-qca.params: unknown parameter {key!r} "
                f"(known: {', '.join(TUNABLE)})"
            )
        default = getattr(defaults, key)
        where = f"analysis.analyzers.xa-qca.params.{key}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where}: expected true or false, got {value!r}")
        elif isinstance(default, tuple):
            if (
                not isinstance(value, (list, tuple))
                or not value
                or not all(_positive_number(v) for v in value)
            ):
                raise ValueError(f"{where}: expected a list of positive numbers, got {value!r}")
            value = tuple(float(v) for v in value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: expected a whole number >= 0, got {value!r}")
        elif not _positive_number(value) and not (value == 0 and key.startswith("min_")):
            raise ValueError(f"{where}: expected a positive number, got {value!r}")
        else:
            value = float(value)
        values[key] = value
    return dataclasses.replace(defaults, **values)


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


class XaQca(Analyzer):
    """One X-Ray Angiographic Image instance (a cine run, or a single frame) is one unit,
    analysed as soon as it is received. Enhanced XA (1.2.840.10008.5.1.4.1.1.12.1.1) is not
    selected: its calibration and frame attributes live in functional groups, which the core's
    `calibration_from_dataset` and `frames_from_dataset` do not read."""

    name = "xa-qca"
    version = "1.0.0"
    selector = Selector(sop_class_uids=frozenset({XA_IMAGE_STORAGE}), modalities=frozenset({"XA"}))
    fit = CORONARY_ANGIOGRAPHY  # minimum data: only coronary angiograms (site-tunable)
    unit = "instance"
    completion = "on-receipt"
    output_sop_classes = frozenset({SEGMENTATION_STORAGE, COMPREHENSIVE_SR})
    criteria = OutputCriteria(
        output="a DICOM Segmentation (SEG) of the coronary lumen and of each stenotic lesion "
        "on the analysed frame, and a TID 1500 measurement report (Comprehensive SR)",
        measures="for the traced coronary segment of one X-ray angiography run: per stenosis, "
        "percent diameter stenosis (%DS), minimal lumen diameter (MLD), the interpolated "
        "reference diameter, the lesion length and its position along the vessel",
        method="classical quantitative coronary analysis: vessel enhancement (Hessian "
        "vesselness), the centreline as the cheapest path through the vessel, diameters by "
        "fitting a circular lumen's profile across it, an interpolated reference line through "
        "the diameters (PS3.17 T.4.2); a narrowing of at least the configured percentage is a "
        "lesion. Calibration from the image's pixel spacing. No trained model",
        limits="only coronary angiograms, one frame of a run; without calibration only %DS "
        "is given; overlapping vessels, foreshortening and poor opacification mislead it; "
        "accuracy measured on synthetic phantoms only: research use only, not a medical device",
    )

    def analyze(self, unit: InputUnit, context: AnalysisContext) -> AnalysisResult:
        params = qca_params(context.params)
        (path,) = unit.paths
        source = pydicom.dcmread(path)
        if int(source.get("SamplesPerPixel", 1)) != 1:
            raise NotApplicable("the run is not monochrome (SamplesPerPixel is not 1)")
        analysis = analyze_dataset(source, params)
        result = analysis.result
        if result.status != "ok":
            raise NotApplicable(f"frame {analysis.frame_number}: {result.reason}")
        frames = [analysis.frame_number] if "NumberOfFrames" in source else None
        seg = self._segmentation(source, analysis, frames, context)
        report = self._report(source, seg, analysis, frames, params, context)
        warnings = [w for w in result.warnings if not w.startswith("uncalibrated")]
        if not result.calibrated:
            warnings.insert(0, UNCALIBRATED)
        summary = {
            "frame_number": analysis.frame_number,
            "frame_choice": analysis.frame_choice,
            "calibration": _calibration_text(analysis),
            "mm_per_pixel": result.mm_per_pixel,
            "segment_length_mm": _round(result.segment_length_mm, 1),
            "lesions": result.summary()["lesions"],
        }
        return AnalysisResult([seg, report], summary, warnings)

    # --- SEG --------------------------------------------------------------------------------

    def _segmentation(
        self,
        source: Dataset,
        analysis: DatasetAnalysis,
        frames: list[int] | None,
        context: AnalysisContext,
    ) -> hd.seg.Segmentation:
        result = analysis.result
        algorithm = provenance.seg_algorithm(
            self,
            codes.DCM.MultiScaleResolutionFiltering,
            {"frame": str(analysis.frame_number), "calibration": _calibration_text(analysis)},
        )
        descriptions = [
            hd.seg.SegmentDescription(
                segment_number=LUMEN_SEGMENT,
                segment_label="Coronary artery lumen",
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=codes.SCT.CoronaryArtery,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=context.uid("vessel"),
                tracking_id="Analysed vessel",
            )
        ]
        masks = [result.lumen_mask]
        for lesion in result.lesions:
            mask = result.lesion_mask(lesion)
            if not mask.any():
                continue
            descriptions.append(
                hd.seg.SegmentDescription(
                    segment_number=len(masks) + 1,
                    segment_label=f"Stenotic lesion {lesion.number}",
                    segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                    segmented_property_type=codes.SCT.Stenosis,
                    algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                    algorithm_identification=algorithm,
                    tracking_uid=context.uid(f"lesion-{lesion.number}"),
                    tracking_id=f"Lesion {lesion.number}",
                )
            )
            masks.append(mask)
        return segmentation_of_frame(
            source,
            frames[0] if frames else None,
            np.stack(masks, axis=-1).astype(np.uint8),
            descriptions,
            series_instance_uid=context.uid("seg-series"),
            series_number=9911,
            sop_instance_uid=context.uid("seg"),
            instance_number=1,
            manufacturer=provenance.MANUFACTURER,
            manufacturer_model_name=self.name,
            software_versions=provenance.software_versions(self),
            device_serial_number="0",
            series_description=f"Coronary lumen ({RESEARCH_USE})"[:64],
            content_label="XAQCA",
            content_description=RESEARCH_USE,
            content_qualification="RESEARCH",
            contributing_equipment=[provenance.contributing_equipment(self)],
        )

    # --- SR ---------------------------------------------------------------------------------

    def _report(
        self,
        source: Dataset,
        seg: hd.seg.Segmentation,
        analysis: DatasetAnalysis,
        frames: list[int] | None,
        params: QcaParams,
        context: AnalysisContext,
    ) -> hd.sr.ComprehensiveSR:
        result = analysis.result
        region_source = hd.sr.SourceImageForRegion(
            source.SOPClassUID, source.SOPInstanceUID, referenced_frame_numbers=frames
        )
        measured_on = [
            hd.sr.SourceImageForMeasurement(
                source.SOPClassUID, source.SOPInstanceUID, referenced_frame_numbers=frames
            )
        ]
        parameters = self._parameters(analysis, params)
        groups = [
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=context.uid("vessel"), identifier="Analysed vessel"
                ),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=result.centerline_polyline(),
                    source_image=region_source,
                ),
                finding_type=codes.SCT.CoronaryArtery,
                finding_sites=[hd.sr.FindingSite(codes.SCT.CoronaryArtery)],
                algorithm_id=provenance.sr_algorithm(self, parameters),
                measurements=(
                    [
                        hd.sr.Measurement(
                            name=codes.DCM.LengthLuminalSegment,
                            value=round(result.segment_length_mm, 2),
                            unit=MILLIMETRE,
                            referenced_images=measured_on,
                        )
                    ]
                    if result.segment_length_mm is not None
                    else None
                ),
            )
        ]
        for lesion in result.lesions:
            lesion_parameters = list(parameters)
            if lesion.branch_at_lesion:
                lesion_parameters.append(
                    "caveat=a side branch leaves or another vessel crosses this lesion in "
                    "projection; its %DS and MLD are unreliable (a limit of 2-D QCA)"
                )
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=context.uid(f"lesion-{lesion.number}"),
                        identifier=f"Lesion {lesion.number}",
                    ),
                    referenced_region=hd.sr.ImageRegion(
                        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                        graphic_data=_lesion_polyline(result, lesion),
                        source_image=region_source,
                    ),
                    finding_type=codes.SCT.Stenosis,
                    finding_sites=[hd.sr.FindingSite(codes.SCT.CoronaryArtery)],
                    algorithm_id=provenance.sr_algorithm(self, lesion_parameters),
                    measurements=_lesion_measurements(result, lesion, measured_on),
                )
            )
        observer = provenance.device_observer(self, context.uid("device"))
        content = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=hd.sr.CodedConcept("33367005", "SCT", "Coronary angiography"),
            imaging_measurements=groups,
        )
        return hd.sr.ComprehensiveSR(
            evidence=[source, seg],
            content=content,
            series_instance_uid=context.uid("sr-series"),
            series_number=9912,
            sop_instance_uid=context.uid("sr"),
            instance_number=1,
            manufacturer=provenance.MANUFACTURER,
            is_complete=True,
            contributing_equipment=[provenance.contributing_equipment(self)],
            manufacturer_model_name=self.name,
            software_versions=provenance.software_versions(self),
            content_qualification="RESEARCH",
            series_description=f"Coronary QCA ({RESEARCH_USE})"[:64],
        )

    def _parameters(self, analysis: DatasetAnalysis, params: QcaParams) -> list[str]:
        """TID 4019 Algorithm Parameters (TEXT): what a reader needs to trust the numbers."""
        result = analysis.result
        tuned = {
            k: v for k, v in dataclasses.asdict(params).items() if v != getattr(QcaParams(), k)
        }
        out = [
            f"frame={analysis.frame_number} ({analysis.frame_choice})",
            f"calibration={_calibration_text(analysis)}",
            (
                f"mm_per_px={result.mm_per_pixel:.5g}"
                if result.mm_per_pixel is not None
                else "mm_per_px=none (uncalibrated: %DS only, no mm measurements)"
            ),
            f"core={ALGORITHM_NAME} {ALGORITHM_VERSION}",
            f"intended_use={RESEARCH_USE}",
        ]
        if tuned:
            out.append(f"site_params={json.dumps(tuned, sort_keys=True, default=list)}")
        return out


UNCALIBRATED = (
    "uncalibrated: the image has no usable pixel spacing (a calibrated PixelSpacing, or "
    "ImagerPixelSpacing with DistanceSourceToPatient and DistanceSourceToDetector), so only "
    "%DS is reported and no mm measurements"
)


def _calibration_text(analysis: DatasetAnalysis) -> str:
    """How mm were obtained: the CID 3452 code when one applies, and the rule used."""
    calibration = analysis.calibration
    if calibration is None:
        return "none (uncalibrated: %DS only)"
    if calibration.code is None:
        return calibration.description
    value, scheme, meaning = calibration.code
    return f'({value}, {scheme}, "{meaning}") {calibration.description}'


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def _lesion_polyline(result: QcaResult, lesion: Lesion) -> np.ndarray:
    """The lesion's part of the centerline, at least two points."""
    start = max(0, min(lesion.start_index, len(result.centerline_px) - 2))
    stop = max(lesion.end_index + 1, start + 2)
    return result.centerline_polyline(start, stop)


# TID 3214 codes MLD and the reference diameter as one concept, (397413000, SCT, "Vessel lumen
# diameter"), told apart by a Derivation (minimum) and a Measurement Method (interpolated local
# reference). Viewers that show only the concept name's Code Meaning (OHIF draws "meaning: value
# unit") would show two "Vessel lumen diameter" lines. The code stays the template's; its Code
# Meaning, a human-readable text that is not matched on (PS3.3 8.3), carries the modifier too,
# and each item says the same in its TID 300 "Equivalent Meaning of Concept Name" (121050, DCM).
MLD_NAME = hd.sr.CodedConcept("397413000", "SCT", "Vessel lumen diameter, minimum (MLD)")
REFERENCE_DIAMETER_NAME = hd.sr.CodedConcept(
    "397413000", "SCT", "Vessel lumen diameter, interpolated reference"
)


def _with_equivalent_meaning(measurement: hd.sr.Measurement, text: str) -> hd.sr.Measurement:
    """`measurement` with a TID 300 Equivalent Meaning of Concept Name (HAS CONCEPT MOD TEXT):
    the concept name and its modifiers in words."""
    item = measurement[0]
    item.ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.EquivalentMeaningOfConceptName,
            value=text,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    return measurement


def _lesion_measurements(
    result: QcaResult,
    lesion: Lesion,
    measured_on: list[hd.sr.SourceImageForMeasurement],
) -> list[hd.sr.Measurement]:
    """%DS always; with calibration also MLD, the interpolated reference diameter at the MLD,
    the lesion length and the TID 3218 positions along the centerline (mm from the proximal
    end of the analysed segment): the MLD site and the lesion's proximal and distal borders,
    which are the ends of the lesion's POLYLINE."""
    out = [
        hd.sr.Measurement(
            name=codes.SCT.LumenDiameterStenosis,
            value=round(lesion.percent_diameter_stenosis, 2),
            unit=PERCENT,
            referenced_images=measured_on,
        )
    ]
    if lesion.mld_mm is None:
        return out
    start_mm = float(result.arc_px[lesion.start_index]) * result.mm_per_pixel
    end_mm = float(result.arc_px[lesion.end_index]) * result.mm_per_pixel
    out += [
        _with_equivalent_meaning(
            hd.sr.Measurement(
                name=MLD_NAME,
                value=round(lesion.mld_mm, 3),
                unit=MILLIMETRE,
                derivation=codes.SCT.Minimum,
                referenced_images=measured_on,
            ),
            "Minimum lumen diameter (MLD)",
        ),
        _with_equivalent_meaning(
            hd.sr.Measurement(
                name=REFERENCE_DIAMETER_NAME,
                value=round(lesion.reference_diameter_mm, 3),
                unit=MILLIMETRE,
                method=codes.DCM.InterpolatedLocalReference,
                referenced_images=measured_on,
            ),
            "Reference vessel diameter at the MLD site (interpolated)",
        ),
        hd.sr.Measurement(
            name=codes.SCT.StenoticLesionLength,
            value=round(lesion.length_mm, 2),
            unit=MILLIMETRE,
            referenced_images=measured_on,
        ),
        hd.sr.Measurement(
            name=codes.DCM.SiteOfLumenMinimum,
            value=round(lesion.position_mm, 2),
            unit=MILLIMETRE,
            referenced_images=measured_on,
        ),
        hd.sr.Measurement(
            name=codes.DCM.PositionOfProximalBorder,
            value=round(start_mm, 2),
            unit=MILLIMETRE,
            referenced_images=measured_on,
        ),
        hd.sr.Measurement(
            name=codes.DCM.PositionOfDistalBorder,
            value=round(end_mm, 2),
            unit=MILLIMETRE,
            referenced_images=measured_on,
        ),
    ]
    return out


# the stand-in's differences from its XA: no pixels, a single frame, and no PixelSpacing
# (highdicom would make a Pixel Measures functional group from it; `pixel_measures_of` writes
# that group from the XA's own spacing after the SEG is built)
_NOT_IN_STAND_IN = frozenset(
    {"PixelData", "NumberOfFrames", "FrameIncrementPointer", "PixelSpacing"}
)


def segmentation_of_frame(
    source: Dataset,
    frame_number: int | None,
    pixel_array: np.ndarray,
    segment_descriptions: list[hd.seg.SegmentDescription],
    **kwargs: Any,
) -> hd.seg.Segmentation:
    """A binary SEG of one frame of an X-ray angiography instance.

    `pixel_array` is (rows, columns, segments); `frame_number` is the 1-based frame of a
    multi-frame source (None for a single-frame one); `kwargs` go to `hd.seg.Segmentation`.

    highdicom 0.28 cannot build this directly: a multi-frame source without a Frame of
    Reference raises "Only a single frame is supported when the source image has no Frame of
    Reference UID" (ImagingDataCommons/highdicom#284; #200 is the same for XA cines), and a
    single-frame XA fails because the XA IOD is a multi-frame IOD. The workaround, validated
    with dciodvfy (analysis brief, section 3.2):

    1. build the SEG against a single-frame Secondary Capture stand-in that carries deep
       copies of the XA's attributes, without PixelData, NumberOfFrames,
       FrameIncrementPointer and PixelSpacing (highdicom's tested single-frame, no Frame of
       Reference path);
    2. point the references back at the XA: each frame's DerivationImageSequence >
       SourceImageSequence gets the XA's SOP class and ReferencedFrameNumber = the analysed
       frame (the mapping of SEG frames to source frames when there is no Frame of Reference,
       highdicom#159); the root SourceImageSequence and ReferencedSeriesSequence get the XA's
       SOP class only (a frame number there makes dciodvfy warn);
    3. set PatientOrientation (Type 2C, which highdicom omits) from the source.

    Replace this with a direct `hd.seg.Segmentation(source_images=[source], ...)` once
    highdicom supports multi-frame sources without a Frame of Reference.
    """
    stand_in = Dataset()
    for element in source:
        if element.keyword not in _NOT_IN_STAND_IN:
            stand_in.add(copy.deepcopy(element))
    stand_in.SOPClassUID = SECONDARY_CAPTURE
    seg = hd.seg.Segmentation(
        source_images=[stand_in],
        pixel_array=pixel_array[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions,
        **kwargs,
    )
    source_class = source.SOPClassUID
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for derivation in frame.DerivationImageSequence:
            for item in derivation.SourceImageSequence:
                item.ReferencedSOPClassUID = source_class
                if frame_number is not None:
                    item.ReferencedFrameNumber = frame_number
    for item in seg.get("SourceImageSequence", []):
        item.ReferencedSOPClassUID = source_class
    for series in seg.ReferencedSeriesSequence:
        for item in series.ReferencedInstanceSequence:
            item.ReferencedSOPClassUID = source_class
    seg.PatientOrientation = source.get("PatientOrientation", "")
    measures = pixel_measures_of(source)
    if measures is not None:
        seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence = [measures]
    return seg


def pixel_measures_of(source: Dataset) -> Dataset | None:
    """The SEG's Pixel Measures item (PS3.3 C.7.6.16.2.1) for a projection image, claiming no
    calibration the source does not. The SEG is in the XA's pixel grid, so its PixelSpacing is
    the XA's own: its PixelSpacing when it has one (the modality's or a site's calibration),
    else its ImagerPixelSpacing (at the detector, as the XA states it, with no magnification
    correction: a viewer measures the SEG exactly as it measures the XA; the isocenter estimate
    the analysis may use is recorded with its method in the SR, not here). A projection has no
    slice: SliceThickness is the nominal one-pixel layer (the row spacing) that highdicom's
    reader requires; no SpacingBetweenSlices. Viewers need the item (OHIF reads it on load).
    None when the XA has neither spacing: the group is then left out (it is conditional in the
    SEG IOD), since an item without PixelSpacing is one highdicom cannot read back."""
    spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    if spacing is None or len(spacing) != 2:
        return None
    item = Dataset()
    item.PixelSpacing = copy.deepcopy(spacing)
    item.SliceThickness = spacing[0]
    return item
