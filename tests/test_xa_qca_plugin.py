"""The built-in xa-qca analyzer as a plugin: its DICOM SEG and TID 1500 SR read back with
highdicom and measured against the phantoms' ground truth, validated with dciodvfy, delivered
end to end (storescu in, C-FIND and QIDO-RS out), and retried after a kill -9 mid-job.

The accuracy table is printed (run with ``-s`` to see it)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.analysis.plugin import (
    AnalysisContext,
    AnalysisResult,
    InputUnit,
    NotApplicable,
    deterministic_uid,
)
from dicomnode.analysis.xa_qca.analyzer import (
    COMPREHENSIVE_SR,
    SEGMENTATION_STORAGE,
    XA_IMAGE_STORAGE,
    XaQca,
    qca_params,
)
from dicomnode.analysis.xa_qca.phantom import XaPhantom, xa_cine, xa_dataset, xa_phantom
from dicomnode.analysis.xa_qca.qca import calibration_from_dataset
from dicomnode.archive.index import Index, create_index_engine
from dicomnode.archive.jobs import JobStore
from dicomnode.core.model import Level
from tests.conftest import (
    WORKSTATION,
    ServeProcess,
    dicomweb_client,
    run_dcmtk,
    serve,
    wait_until,
    write_config,
)

SEEDS = range(12)  # %DS 30, 50, 70, 80 three times each (seed % 4)
PROCESSING_EQUIPMENT = "109102"  # DCM, CID 7005
REPO = Path(__file__).resolve().parent.parent


# --- running the analyzer and reading its outputs back ------------------------------------


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def analyze(
    ds: Dataset, folder: Path, params: dict | None = None, analyzer: XaQca | None = None
) -> AnalysisResult:
    """Run the plugin on one XA instance written to `folder`, as a job would."""
    folder.mkdir(parents=True, exist_ok=True)
    path = _write(ds, folder / f"{ds.SOPInstanceUID}.dcm")
    unit = InputUnit(ds.SOPInstanceUID, ds.StudyInstanceUID, ds.PatientID, [path], [path.stem])
    context = AnalysisContext(
        params=params or {},
        uid=lambda role: deterministic_uid("xa-qca", "test", unit.key, role),
        deadline=datetime.now(UTC),
        workdir=folder,
    )
    return (analyzer or XaQca()).analyze(unit, context)


@dataclasses.dataclass(frozen=True, eq=False)
class Outputs:
    seg: hd.seg.Segmentation
    sr: hd.sr.ComprehensiveSR
    seg_path: Path
    sr_path: Path


def read_back(result: AnalysisResult, folder: Path) -> Outputs:
    """Write the SEG and SR to bytes (and files, for dciodvfy) and read them with highdicom."""
    seg_ds, sr_ds = result.datasets
    assert seg_ds.SOPClassUID == SEGMENTATION_STORAGE and sr_ds.SOPClassUID == COMPREHENSIVE_SR
    seg_path, sr_path = folder / "seg.dcm", folder / "sr.dcm"
    seg_path.write_bytes(_bytes(seg_ds))
    sr_path.write_bytes(_bytes(sr_ds))
    return Outputs(
        hd.seg.segread(BytesIO(seg_path.read_bytes())),
        hd.sr.srread(BytesIO(sr_path.read_bytes())),
        seg_path,
        sr_path,
    )


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's errors and warnings for one file."""
    assert shutil.which("dciodvfy"), "dciodvfy (dicom3tools) is required; .ci/run installs it"
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (report.stdout + report.stderr).splitlines()
    return (
        [line for line in lines if line.startswith("Error")],
        [line for line in lines if line.startswith("Warning")],
    )


def assert_valid(outputs: Outputs) -> None:
    for path in (outputs.seg_path, outputs.sr_path):
        errors, _ = dciodvfy(path)
        assert errors == [], (path.name, errors)


def groups(sr: hd.sr.ComprehensiveSR) -> dict[str, object]:
    """The SR's planar ROI groups by tracking identifier ("Analysed vessel", "Lesion 1"...)."""
    return {g.tracking_identifier: g for g in sr.content.get_planar_roi_measurement_groups()}


def values(group) -> dict[str, float]:
    """A group's measurements: "%DS", "MLD", "reference", and the other concepts' meanings."""
    out = {}
    for m in group.get_measurements():
        key = m.name.meaning
        if m.name.value == "397413000":
            key = "MLD" if m.derivation is not None else "reference"
            assert (m.derivation or m.method).value == ("255605001" if key == "MLD" else "122490")
        elif m.name.value == "408715008":
            key = "%DS"
        assert key not in out, key
        assert m.unit.value == ("%" if key == "%DS" else "mm"), (key, m.unit)
        out[key] = float(m.value)
    return out


def parameters(group) -> dict[str, str]:
    """The group's TID 4019 Algorithm Parameters, "name=value" TEXT items."""
    texts = [
        item.TextValue
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT"
        and item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"
    ]
    return dict(text.split("=", 1) for text in texts)


def region_frames(group) -> list[int] | None:
    (image,) = group.roi.ContentSequence
    (reference,) = image.ReferencedSOPSequence
    assert reference.ReferencedSOPClassUID == XA_IMAGE_STORAGE
    frames = reference.get("ReferencedFrameNumber")
    return None if frames is None else [int(f) for f in np.atleast_1d(frames)]


def seg_frames(seg: hd.seg.Segmentation) -> set[int | None]:
    """The source frame numbers every SEG frame derives from (None: no frame number)."""
    found = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for derivation in frame.DerivationImageSequence:
            for item in derivation.SourceImageSequence:
                assert item.ReferencedSOPClassUID == XA_IMAGE_STORAGE
                number = item.get("ReferencedFrameNumber")
                found.add(None if number is None else int(number))
    return found


def mld_point_px(group, mm_per_px: float) -> np.ndarray:
    """The MLD site read from the report: along the lesion's POLYLINE (which starts at the
    proximal border) by Site of Lumen Minimum - Position of Proximal Border; (row, column)."""
    measured = values(group)
    polyline = group.roi.value  # (column, row), pixel centres at +0.5
    steps = np.hypot(*np.diff(polyline, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    along = (
        measured["Site of Lumen Minimum"] - measured["Position of Proximal Border"]
    ) / mm_per_px
    column = np.interp(along, arc, polyline[:, 0]) - 0.5
    row = np.interp(along, arc, polyline[:, 1]) - 0.5
    return np.array([row, column])


def contributing(ds: Dataset) -> Dataset:
    """dicomnode's item of the ContributingEquipmentSequence (highdicom adds its own, and one
    for the source's acquisition equipment)."""
    (ours,) = [
        item for item in ds.ContributingEquipmentSequence if item.Manufacturer == "dicomnode"
    ]
    (purpose,) = ours.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == (PROCESSING_EQUIPMENT, "DCM")
    return ours


# --- accuracy through the plugin, on 12 phantoms -----------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    phantom: XaPhantom
    xa: Dataset
    result: AnalysisResult
    outputs: Outputs
    dice: float
    errors: dict[str, float]


def _two_frame_run(phantom: XaPhantom) -> Dataset:
    """The phantom as frame 2 of a run whose frame 1 holds no iodine (frame choice must pick
    frame 2)."""
    frames = np.stack([np.full_like(phantom.image, 700), phantom.image])
    return xa_dataset(frames, phantom.pixel_spacing_mm)


def _case(seed: int, folder: Path) -> Case:
    phantom = xa_phantom(seed)
    xa = _two_frame_run(phantom)
    result = analyze(xa, folder)
    outputs = read_back(result, folder)
    lumen = outputs.seg.get_pixels_by_source_frame(
        xa.SOPInstanceUID, source_frame_numbers=[2], segment_numbers=[1]
    )[0, :, :, 0].astype(bool)
    truth = phantom.truth
    dice = 2.0 * float((lumen & truth.lumen_mask).sum()) / (lumen.sum() + truth.lumen_mask.sum())
    true = truth.stenoses[0]
    lesion = groups(outputs.sr)["Lesion 1"]
    measured = values(lesion)
    spacing = float(parameters(lesion)["mm_per_px"])
    point = mld_point_px(lesion, spacing)
    errors = {
        "%DS": measured["%DS"] - true.percent_diameter_stenosis,
        "MLD": measured["MLD"] - true.mld_mm,
        "reference": measured["reference"] - true.reference_diameter_mm,
        "length": measured["Stenotic Lesion Length"] - true.length_90_mm,
        "location": float(np.hypot(*(point - np.asarray(true.mld_point_px)))) * spacing,
    }
    return Case(phantom, xa, result, outputs, dice, errors)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[Case]:
    out = [_case(seed, tmp_path_factory.mktemp(f"seed{seed}")) for seed in SEEDS]
    print(
        "\nxa-qca plugin on 12 phantoms (512x512, 0.25 mm/px, 2% noise), read back from its "
        "SEG and SR; errors = reported - true:"
    )
    print("seed  %DS   Dice    d%DS    dMLD   dRef  dLength  loc mm  lesions")
    for case in out:
        e = case.errors
        print(
            f"{case.phantom.seed:4d} {case.phantom.truth.stenoses[0].nominal_percent:4.0f} "
            f"{case.dice:6.3f} {e['%DS']:+7.2f} {e['MLD']:+7.3f} {e['reference']:+6.3f} "
            f"{e['length']:+7.2f} {e['location']:7.2f} {len(case.result.summary['lesions']):7d}"
        )
    return out


def test_lumen_dice_read_back_from_the_seg(cases):
    dice = [c.dice for c in cases]
    print(f"lumen Dice from the SEG: mean {np.mean(dice):.4f}, min {min(dice):.4f}")
    assert np.mean(dice) >= 0.92, dice
    assert min(dice) >= 0.88, dice


def test_measurements_read_back_from_the_sr_meet_the_targets(cases):
    errors = {k: np.abs([c.errors[k] for c in cases]) for k in cases[0].errors}
    for key, found in errors.items():
        print(f"|{key} error|: mean {found.mean():.3f}, max {found.max():.3f}")
    assert errors["%DS"].mean() <= 5.0 and errors["%DS"].max() <= 15.0, errors["%DS"]
    assert errors["MLD"].mean() <= 0.15, errors["MLD"]
    assert np.mean(errors["reference"] <= 0.15) >= 0.9, errors["reference"]
    assert errors["length"].mean() <= 1.5, errors["length"]
    assert errors["location"].max() <= 2.0, errors["location"]


def test_every_seg_and_sr_passes_dciodvfy(cases):
    for case in cases:
        assert_valid(case.outputs)


def test_report_structure_references_and_tracking(cases):
    case = cases[1]
    seg, sr, xa = case.outputs.seg, case.outputs.sr, case.xa
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == xa.StudyInstanceUID
    assert seg.SeriesInstanceUID not in (xa.SeriesInstanceUID, sr.SeriesInstanceUID)
    (lumen, *lesion_segments) = seg.SegmentSequence
    assert lumen.SegmentLabel == "Coronary artery lumen"
    assert lumen.SegmentedPropertyTypeCodeSequence[0].CodeValue == "41801008"
    assert lumen.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    family = lumen.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodingSchemeDesignator) == ("123106", "DCM")
    assert [s.SegmentLabel for s in lesion_segments] == ["Stenotic lesion 1"]
    # the analysed frame (2) is what the SEG and every SR reference point at
    assert seg_frames(seg) == {2}
    assert "ReferencedFrameNumber" not in seg.SourceImageSequence[0]
    assert seg.PatientOrientation == xa.PatientOrientation
    found = groups(sr)
    assert set(found) == {"Analysed vessel", "Lesion 1"}
    for group in found.values():
        assert region_frames(group) == [2]
        assert group.roi.GraphicType == "POLYLINE"
        for measurement in group.get_measurements():
            (image,) = measurement.referenced_images
            assert int(image.ReferencedSOPSequence[0].ReferencedFrameNumber) == 2
    lesion = found["Lesion 1"]
    assert lesion.finding_type.value == "415582006"
    assert lesion.finding_sites[0].value.value == "41801008"
    # the SR groups and the SEG segments share tracking UIDs
    tracking = {s.TrackingUID: s.TrackingID for s in seg.SegmentSequence}
    assert tracking == {g.tracking_uid: name for name, g in found.items()}
    # the XA and the SEG are the SR's evidence
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in [
            *sr.get("CurrentRequestedProcedureEvidenceSequence", []),
            *sr.get("PertinentOtherEvidenceSequence", []),
        ]
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {seg.SOPInstanceUID, xa.SOPInstanceUID}
    params = parameters(lesion)
    assert params["frame"] == "2 (most-opacified)"
    assert params["calibration"].startswith('(122486, DCM, "Geometric Isocenter")')
    assert float(params["mm_per_px"]) == pytest.approx(0.25)
    assert "RESEARCH USE ONLY" in params["intended_use"]
    assert measured_positions_are_ordered(values(lesion))
    assert "RESEARCH USE ONLY" in seg.SeriesDescription and "RESEARCH USE ONLY" in (
        sr.SeriesDescription
    )
    assert seg.ContentQualification == sr.ContentQualification == "RESEARCH"
    summary = case.result.summary
    assert summary["frame_number"] == 2 and summary["mm_per_pixel"] == pytest.approx(0.25)
    assert case.result.warnings == []


def measured_positions_are_ordered(measured: dict[str, float]) -> bool:
    proximal, site, distal = (
        measured["Position of Proximal Border"],
        measured["Site of Lumen Minimum"],
        measured["Position of Distal Border"],
    )
    return proximal <= site <= distal and distal - proximal == pytest.approx(
        measured["Stenotic Lesion Length"], abs=0.02
    )


def test_outputs_carry_their_provenance(cases):
    case = cases[0]
    for ds in (case.outputs.seg, case.outputs.sr):
        ours = contributing(ds)
        assert ours.Manufacturer == "dicomnode" and ours.ManufacturerModelName == "xa-qca"
        assert list(ours.SoftwareVersions) == ["xa-qca 1.0.0", "dicomnode 0.1.0"]
        assert "RESEARCH USE ONLY" in ours.ContributionDescription
        assert ds.Manufacturer == "dicomnode" and ds.ManufacturerModelName == "xa-qca"
    algorithm = case.outputs.seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("dicomnode-xa-qca", "1.0.0")
    assert "frame" in algorithm.AlgorithmParameters
    items = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
        for item in groups(case.outputs.sr)["Lesion 1"][0].ContentSequence
        if item.ValueType == "TEXT"
    }
    assert items["Algorithm Name"] == "dicomnode-xa-qca" and items["Algorithm Version"] == "1.0.0"


def test_a_rerun_gives_the_same_uids(cases, tmp_path):
    case = cases[3]
    again = analyze(case.xa, tmp_path)
    assert [ds.SOPInstanceUID for ds in again.datasets] == [
        ds.SOPInstanceUID for ds in case.result.datasets
    ]
    assert [ds.SeriesInstanceUID for ds in again.datasets] == [
        ds.SeriesInstanceUID for ds in case.result.datasets
    ]


# --- cines, single frames, calibration -----------------------------------------------------


def test_cine_with_a_representative_frame_is_analysed_on_that_frame(tmp_path):
    cine = xa_cine(1, n_frames=12)
    # the frame before the most opacified one (1-based number = its 0-based index + 1), so
    # that the automatic choice would differ
    frame = cine.max_contrast_frame
    ds = xa_dataset(cine.frames, cine.pixel_spacing_mm, representative_frame_number=frame)
    result = analyze(ds, tmp_path)
    outputs = read_back(result, tmp_path)
    assert result.summary["frame_choice"] == "representative"
    assert result.summary["frame_number"] == frame
    assert seg_frames(outputs.seg) == {frame}
    assert {tuple(region_frames(g)) for g in groups(outputs.sr).values()} == {(frame,)}
    assert result.summary["lesions"], result.summary
    assert_valid(outputs)


def test_cine_without_a_representative_frame_uses_the_most_opacified_one(tmp_path):
    cine = xa_cine(2, n_frames=12)
    ds = xa_dataset(cine.frames, cine.pixel_spacing_mm)
    result = analyze(ds, tmp_path)
    outputs = read_back(result, tmp_path)
    chosen = result.summary["frame_number"]
    print(f"cine: chose frame {chosen}, maximum contrast at frame {cine.max_contrast_frame + 1}")
    assert result.summary["frame_choice"] == "most-opacified"
    assert abs(chosen - (cine.max_contrast_frame + 1)) <= 1
    assert seg_frames(outputs.seg) == {chosen}
    assert {tuple(region_frames(g)) for g in groups(outputs.sr).values()} == {(chosen,)}
    assert_valid(outputs)


def test_single_frame_instance_is_referenced_without_frame_numbers(cases, tmp_path):
    phantom = cases[5].phantom
    ds = xa_dataset(phantom.image, phantom.pixel_spacing_mm)
    assert "NumberOfFrames" not in ds
    result = analyze(ds, tmp_path)
    outputs = read_back(result, tmp_path)
    assert result.summary["frame_choice"] == "single-frame"
    assert seg_frames(outputs.seg) == {None}
    assert all(region_frames(g) is None for g in groups(outputs.sr).values())
    lumen = outputs.seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1])
    from_run = cases[5].outputs.seg.get_pixels_by_source_frame(
        cases[5].xa.SOPInstanceUID, [2], segment_numbers=[1]
    )
    assert np.array_equal(lumen, from_run)  # the same frame gives the same mask
    assert_valid(outputs)


def test_uncalibrated_run_reports_percent_stenosis_only_and_says_so(cases, tmp_path):
    case = cases[2]
    ds = _two_frame_run(case.phantom)
    del ds.ImagerPixelSpacing
    assert calibration_from_dataset(ds) is None
    result = analyze(ds, tmp_path)
    outputs = read_back(result, tmp_path)
    found = groups(outputs.sr)
    lesion = found["Lesion 1"]
    assert values(lesion) == {
        "%DS": pytest.approx(values(groups(case.outputs.sr)["Lesion 1"])["%DS"])
    }
    assert values(found["Analysed vessel"]) == {}
    params = parameters(lesion)
    assert params["calibration"].startswith("none (uncalibrated")
    assert params["mm_per_px"].startswith("none (uncalibrated: %DS only")
    assert result.warnings[0].startswith("uncalibrated:") and "only %DS" in result.warnings[0]
    assert result.summary["mm_per_pixel"] is None
    assert result.summary["lesions"][0]["mld_mm"] is None
    assert_valid(outputs)


def test_modality_calibration_scales_every_mm_value_and_leaves_percent_stenosis(cases, tmp_path):
    """A fiducial calibration saying 0.2 mm per pixel (not 0.25), with every mm-denominated
    setting scaled alike so that the analysis in pixels is the same: every mm value in the
    report scales by 0.8 and %DS does not change."""
    case = cases[4]
    ds = _two_frame_run(case.phantom)
    ds.PixelSpacing = [0.2, 0.2]
    ds.PixelSpacingCalibrationType = "FIDUCIAL"
    defaults = dataclasses.asdict(qca_params({}))
    scaled_params = {
        key: [v * 0.8 for v in value] if isinstance(value, tuple) else value * 0.8
        for key, value in defaults.items()
        if key.endswith("_mm")
    }
    result = analyze(ds, tmp_path, scaled_params)
    outputs = read_back(result, tmp_path)
    lesion = groups(outputs.sr)["Lesion 1"]
    params = parameters(lesion)
    assert params["calibration"].startswith('(122488, DCM, "Calibration Object Used")')
    assert float(params["mm_per_px"]) == pytest.approx(0.2)
    scaled, original = values(lesion), values(groups(case.outputs.sr)["Lesion 1"])
    assert scaled["%DS"] == pytest.approx(original["%DS"], abs=0.01)
    assert set(scaled) == set(original)
    for key in set(original) - {"%DS"}:  # reported to 0.01 mm or better
        assert scaled[key] == pytest.approx(original[key] * 0.8, abs=0.011), key
    assert_valid(outputs)


def test_pixel_spacing_equal_to_imager_pixel_spacing_is_not_a_calibration():
    ds = xa_dataset(np.zeros((8, 8), np.uint16), 0.25)  # ImagerPixelSpacing 0.3125, SOD/SID 0.8
    ds.PixelSpacing = list(ds.ImagerPixelSpacing)
    calibration = calibration_from_dataset(ds)
    assert calibration.method == "isocenter" and calibration.mm_per_pixel == pytest.approx(0.25)
    del ds.DistanceSourceToPatient
    assert calibration_from_dataset(ds) is None  # the detector's spacing, not the vessel's
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    assert calibration_from_dataset(ds).mm_per_pixel == pytest.approx(0.3125)


# --- parameters, no vessel -----------------------------------------------------------------


def test_site_parameters_reach_the_analysis_and_are_recorded(cases, tmp_path):
    case = cases[0]  # a 30% stenosis
    result = analyze(case.xa, tmp_path, {"min_stenosis_percent": 60, "max_lesions": 2})
    outputs = read_back(result, tmp_path)
    found = groups(outputs.sr)
    assert list(found) == ["Analysed vessel"] and result.summary["lesions"] == []
    recorded = json.loads(parameters(found["Analysed vessel"])["site_params"])
    assert recorded == {"min_stenosis_percent": 60.0, "max_lesions": 2}
    assert_valid(outputs)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"no_such_setting": 1}, "unknown parameter 'no_such_setting'"),
        ({"max_lesions": "three"}, "params.max_lesions"),
        ({"vesselness_sigmas_mm": []}, "params.vesselness_sigmas_mm"),
        ({"tophat_mm": -1}, "params.tophat_mm"),
        ({"vessels_dark": "yes"}, "params.vessels_dark"),
        ({"pixel_intensity_relationship": "LOG"}, "unknown parameter"),
    ],
)
def test_bad_parameters_are_refused_with_the_key_named(params, named):
    with pytest.raises(ValueError, match=named):
        qca_params(params)


def test_tunable_parameters_convert():
    params = qca_params({"vesselness_sigmas_mm": [0.3, 1], "min_stenosis_percent": 0})
    assert params.vesselness_sigmas_mm == (0.3, 1.0) and params.min_stenosis_percent == 0.0


def test_a_run_without_a_vessel_is_not_applicable(tmp_path):
    blank = np.full((3, 256, 256), 700, dtype=np.uint16)
    with pytest.raises(NotApplicable, match="frame 1: no vessel found"):
        analyze(xa_dataset(blank, 0.25), tmp_path)


# --- end to end ----------------------------------------------------------------------------


def test_end_to_end_storescu_then_seg_and_sr_in_cfind_and_qido(start_node, tmp_path):
    """A cine sent with storescu is analysed on receipt by the built-in plugin (found through
    its entry point); its SEG and SR are a new series each in the same study, seen by C-FIND
    and by QIDO-RS, and the job records the provenance."""
    node = start_node([WORKSTATION], extra="[analysis]\nworkers = 1\nsweep_interval = 0.1\n")
    assert "xa-qca" in node.analysis.analyzers
    cine = xa_cine(4, n_frames=8)
    xa = xa_dataset(cine.frames, cine.pixel_spacing_mm)
    path = _write(xa, tmp_path / "cine.dcm")
    sent = run_dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.dimse.port), str(path))
    assert sent.returncode == 0, sent.stderr
    study = xa.StudyInstanceUID
    client = dicomweb_client(node)

    def outputs():
        found = client.search_for_series(study, search_filters={"Modality": "SEG\\SR"})
        return found if len(found) == 2 else None

    found = wait_until(outputs, 90, "the SEG and SR of xa-qca in QIDO-RS")
    by_modality = {s["00080060"]["Value"][0]: s["0020000E"]["Value"][0] for s in found}
    assert sorted(by_modality) == ["SEG", "SR"]
    assert xa.SeriesInstanceUID not in by_modality.values()

    answers = tmp_path / "find"
    answers.mkdir()
    find = run_dcmtk(
        "findscu", "-S", "-aet", "WORKSTATION", "-aec", "DICOMNODE", "-X", "-od", str(answers),
        "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}",
        "-k", "SeriesInstanceUID", "-k", "Modality", "-k", "SeriesDescription",
        "127.0.0.1", str(node.dimse.port),
    )  # fmt: skip
    assert find.returncode == 0, find.stderr
    series = [pydicom.dcmread(p) for p in sorted(answers.iterdir())]
    by_cfind = {ds.Modality: ds for ds in series}
    assert sorted(by_cfind) == ["SEG", "SR", "XA"]
    assert by_cfind["SEG"].SeriesInstanceUID == by_modality["SEG"]
    assert "RESEARCH USE ONLY" in by_cfind["SR"].SeriesDescription

    (job,) = node.analysis.jobs.list(study_uid=study)
    record = job.as_dict()
    assert (job.state, job.reason, job.analyzer) == ("done", "on-receipt", "xa-qca")
    provenance = record["summary"]["provenance"]
    assert provenance["inputs"] == [xa.SOPInstanceUID] == record["inputs"]
    assert provenance["analyzer"] == "xa-qca" and provenance["analyzer_version"] == "1.0.0"
    assert provenance["code_version"] == "dicomnode 0.1.0" and provenance["parameters"] == {}
    (sr,) = node.archive.find_instances(Level.SERIES, (("SeriesInstanceUID", by_modality["SR"]),))
    stored = hd.sr.srread(node.archive.blob_file(sr))
    assert set(groups(stored)) >= {"Analysed vessel", "Lesion 1"}
    assert sorted(record["outputs"]) == sorted(
        i.sop_instance_uid
        for uid in by_modality.values()
        for i in node.archive.find_instances(Level.SERIES, (("SeriesInstanceUID", uid),))
    )


# --- kill -9 during a job ------------------------------------------------------------------


class GatedXaQca(XaQca):
    """xa-qca that first waits until the file named by its `gate` parameter exists: a job
    that is reliably still running when the test kills its process. Registered for the
    `dicomnode serve` process under test only (see `_plugin_path`)."""

    name = "xa-qca-gated"

    def analyze(self, unit: InputUnit, context: AnalysisContext) -> AnalysisResult:
        params = dict(context.params)
        gate = Path(params.pop("gate"))
        while not gate.exists():
            if datetime.now(UTC) >= context.deadline:
                raise TimeoutError("the gate never opened")
            time.sleep(0.05)
        return super().analyze(unit, dataclasses.replace(context, params=params))


def _plugin_path(folder: Path) -> Path:
    """A folder holding the metadata of an installed distribution that registers GatedXaQca
    under the dicomnode.analyzers entry-point group (what `pip install` of a plugin wheel
    writes), for PYTHONPATH."""
    info = folder / "dicomnode_test_plugins-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: dicomnode-test-plugins\nVersion: 0.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[dicomnode.analyzers]\nxa-qca-gated = tests.test_xa_qca_plugin:GatedXaQca\n"
    )
    return folder


def test_kill_9_during_a_job_then_restart_retries_it_and_files_one_result(tmp_path, database_url):
    gate = tmp_path / "gate"
    timeout, grace = 20, 2  # a dead worker's job is claimed again after its lease: their sum
    config = write_config(
        tmp_path / "serve.toml",
        tmp_path / "data",
        database_url,
        extra=(
            "[analysis]\nworkers = 1\nsweep_interval = 0.1\nretry_backoff = 0\n"
            f"lease_grace = {grace}\n"
            '[analysis.analyzers."xa-qca"]\nenabled = false\n'
            '[analysis.analyzers."ct-lung"]\nenabled = false\n'
            f'[analysis.analyzers."xa-qca-gated"]\ntimeout = {timeout}\n'
            f"params = {{ gate = {json.dumps(str(gate))} }}\n"
        ),
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(_plugin_path(tmp_path / "plugins")), str(REPO)]),
    }
    phantom = xa_phantom(6)
    xa = _two_frame_run(phantom)
    path = _write(xa, tmp_path / "run.dcm")
    jobs = JobStore(Index(create_index_engine(database_url)))
    processes: list[ServeProcess] = []
    try:
        first = serve(config, tmp_path / "first.log", env)
        processes.append(first)
        sent = run_dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(first.dimse_port),
                         str(path))  # fmt: skip
        assert sent.returncode == 0, sent.stderr

        def running():
            found = jobs.list(study_uid=xa.StudyInstanceUID)
            return found if found and found[0].state == "running" else None

        (job,) = wait_until(running, 60, "the gated job to be running")
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(30)
        assert jobs.get(job.id).state == "running"  # as the dead worker left it
        gate.touch()

        second = serve(config, tmp_path / "second.log", env)
        processes.append(second)

        def done():
            found = jobs.get(job.id)
            return found if found.state in ("done", "failed", "skipped") else None

        finished = wait_until(done, timeout + grace + 90, "the job to be claimed again and done")
        assert finished.state == "done", finished.error
        assert finished.attempts == 2 and finished.claimed_by != job.claimed_by
        assert second.terminate() == 0
    finally:
        for process in processes:
            if process.process.poll() is None:
                process.terminate(signal.SIGKILL)

    from dicomnode.archive import Archive

    archive = Archive(tmp_path / "data", database_url)
    try:
        filed = archive.find_instances(Level.STUDY, (("StudyInstanceUID", xa.StudyInstanceUID),))
        classes = sorted(i.sop_class_uid for i in filed)
        assert classes == sorted([XA_IMAGE_STORAGE, SEGMENTATION_STORAGE, COMPREHENSIVE_SR])
        assert len(jobs.list(study_uid=xa.StudyInstanceUID)) == 1
        assert sorted(json.loads(finished.outputs)) == sorted(
            i.sop_instance_uid for i in filed if i.sop_class_uid != XA_IMAGE_STORAGE
        )
        seg = [i for i in filed if i.sop_class_uid == SEGMENTATION_STORAGE][0]
        assert contributing(pydicom.dcmread(archive.blob_file(seg))).ManufacturerModelName == (
            "xa-qca-gated"
        )
    finally:
        archive.close()
