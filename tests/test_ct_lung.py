"""The built-in ct-lung analyzer, measured on synthetic chest CTs with known regions, and its
DICOM output (SEG + TID 1500 Comprehensive 3D SR) read back and validated with dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomnode.analysis.ct_lung import CtLung
from dicomnode.analysis.ct_lung.phantom import chest_phantom, phantom_series
from dicomnode.analysis.ct_lung.segmentation import body_mask, lung_mask, region_stats
from dicomnode.analysis.plugin import AnalysisContext, InputUnit, deterministic_uid
from tests.conftest import dicomweb_client, run_dcmtk, wait_until

SEEDS = range(12)


def dice(found: np.ndarray, truth: np.ndarray) -> float:
    return 2.0 * float((found & truth).sum()) / float(found.sum() + truth.sum())


@pytest.fixture(scope="module")
def measured() -> list[dict[str, float]]:
    rows = []
    for seed in SEEDS:
        phantom = chest_phantom(seed)
        body = body_mask(phantom.volume_hu)
        lungs = lung_mask(phantom.volume_hu, body)
        found = region_stats(phantom.volume_hu, lungs, phantom.voxel_ml)
        truth = region_stats(phantom.volume_hu, phantom.lungs, phantom.voxel_ml)
        rows.append(
            {
                "seed": seed,
                "body_dice": dice(body, phantom.body),
                "lung_dice": dice(lungs, phantom.lungs),
                "volume_error_pct": 100 * (found.volume_ml - truth.volume_ml) / truth.volume_ml,
                "mean_hu_error": found.mean_hu - truth.mean_hu,
            }
        )
    print("\nct-lung on 12 chest phantoms (35 HU noise, 0.7 voxel blur):")
    for row in rows:
        print(
            "  "
            + "  ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            )
        )
    return rows


def test_lung_and_body_masks_overlap_the_truth(measured):
    assert min(r["lung_dice"] for r in measured) >= 0.97
    assert min(r["body_dice"] for r in measured) >= 0.97


def test_lung_volume_within_two_percent(measured):
    assert max(abs(r["volume_error_pct"]) for r in measured) <= 2.0


def test_lung_attenuation_within_two_hu(measured):
    assert max(abs(r["mean_hu_error"]) for r in measured) <= 2.0


def _run(tmp_path: Path, seed: int = 7):
    phantom = chest_phantom(seed)
    series = phantom_series(phantom)
    paths = []
    for ds in series:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    unit = InputUnit(
        series[0].SeriesInstanceUID,
        series[0].StudyInstanceUID,
        "PHANTOM",
        paths[::-1],  # any order: the analyzer sorts along the slice normal
        [ds.SOPInstanceUID for ds in series],
    )
    context = AnalysisContext(
        params={},
        uid=lambda role: deterministic_uid("ct-lung", "test", unit.key, role),
        deadline=datetime.now(UTC),
        workdir=tmp_path,
    )
    return phantom, series, CtLung().analyze(unit, context)


def _written(ds) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_seg_and_sr_round_trip_and_validate(tmp_path):
    phantom, series, result = _run(tmp_path)
    seg_ds, sr_ds = result.datasets
    seg = hd.seg.segread(BytesIO(_written(seg_ds)))
    assert [s.segment_label for s in seg.SegmentSequence] == ["Body", "Lungs"]
    assert seg.StudyInstanceUID == series[0].StudyInstanceUID
    lungs = seg.get_volume(segment_numbers=[2], combine_segments=True).array.astype(bool)
    assert lungs.sum() == pytest.approx(phantom.lungs.sum(), rel=0.02)
    sr = hd.sr.srread(BytesIO(_written(sr_ds)))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    volumes = {
        g.tracking_identifier: next(
            m.value for m in g.get_measurements() if m.name.value == "118565006"
        )
        for g in groups
    }
    assert volumes["Lungs"] == pytest.approx(result.summary["lungs_volume_ml"], abs=0.01)
    truth_ml = phantom.lungs.sum() * phantom.voxel_ml
    assert abs(volumes["Lungs"] - truth_ml) / truth_ml <= 0.02
    assert "RESEARCH USE" in seg.ContentDescription


def test_outputs_carry_their_provenance(tmp_path):
    """Each output names dicomnode as its Processing Equipment (DCM 109102, CID 7005) with the
    analyzer as model and both versions, and its algorithm by name and version."""
    _, _, result = _run(tmp_path)
    seg_ds, sr_ds = (pydicom.dcmread(BytesIO(_written(ds))) for ds in result.datasets)
    for ds in (seg_ds, sr_ds):
        (ours,) = [i for i in ds.ContributingEquipmentSequence if i.Manufacturer == "dicomnode"]
        purpose = ours.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
        assert ours.ManufacturerModelName == "ct-lung"
        assert list(ours.SoftwareVersions) == ["ct-lung 1.0.0", "dicomnode 0.1.0"]
        assert (ds.Manufacturer, ds.ManufacturerModelName) == ("dicomnode", "ct-lung")
        assert ds.ContentQualification == "RESEARCH"
    for segment in seg_ds.SegmentSequence:
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (
            "dicomnode-ct-lung",
            "1.0.0",
        )
    sr = hd.sr.srread(BytesIO(_written(sr_ds)))
    for group in sr.content.get_volumetric_roi_measurement_groups():
        texts = {
            item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
            for item in group[0].ContentSequence
            if item.ValueType == "TEXT"
        }
        assert texts["Algorithm Name"] == "dicomnode-ct-lung"
        assert texts["Algorithm Version"] == "1.0.0"


def test_outputs_pass_dciodvfy(tmp_path):
    assert shutil.which("dciodvfy"), "dciodvfy (dicom3tools) is required; .ci/run installs it"
    _, _, result = _run(tmp_path)
    for ds in result.datasets:
        path = tmp_path / f"out-{ds.Modality}.dcm"
        path.write_bytes(_written(ds))
        report = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, timeout=120
        )
        errors = [
            line
            for line in (report.stdout + report.stderr).splitlines()
            if line.startswith("Error")
        ]
        assert errors == [], errors


def test_end_to_end_storescu_then_seg_and_sr_in_qido(start_node, tmp_path):
    """A CT series sent with storescu is analysed by the built-in plugin, found through its entry
    point, and its SEG and SR appear in the study over QIDO-RS."""
    node = start_node(
        extra="[analysis]\nworkers = 1\nsweep_interval = 0.1\n"
        '[analysis.analyzers."ct-lung"]\nquiet_period = 0.5\n'
    )
    assert "ct-lung" in node.analysis.analyzers
    series = phantom_series(chest_phantom(3, slices=20, size=96))
    folder = tmp_path / "ct"
    folder.mkdir()
    for ds in series:
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    sent = run_dcmtk(
        "storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.dimse.port), "+sd", str(folder)
    )
    assert sent.returncode == 0, sent.stderr
    client = dicomweb_client(node)
    study = series[0].StudyInstanceUID

    def outputs():
        found = client.search_for_series(study, search_filters={"Modality": "SEG\\SR"})
        return found if len(found) == 2 else None

    found = wait_until(outputs, 60, "the SEG and SR of ct-lung")
    assert sorted(s["00080060"]["Value"][0] for s in found) == ["SEG", "SR"]
    (job,) = node.analysis.jobs.list(study_uid=study)
    assert job.state == "done" and job.analyzer == "ct-lung"
    assert pydicom.uid.UID(job.as_dict()["outputs"][0]).is_valid
    provenance = job.as_dict()["summary"]["provenance"]
    assert provenance == {
        "analyzer": "ct-lung",
        "analyzer_version": "1.0.0",
        "code_version": "dicomnode 0.1.0",
        "parameters": {},
        "inputs": job.as_dict()["inputs"],
    }
    assert sorted(provenance["inputs"]) == sorted(ds.SOPInstanceUID for ds in series)


def test_a_series_that_is_not_a_volume_is_skipped_not_failed(start_node):
    """Two slices without geometry (as make_ct writes them) are no lung volume: the job ends
    "skipped" with the reason, and is not retried."""
    from dicomnode.core.model import Source
    from tests.factory import make_ct

    node = start_node(extra="[analysis]\nworkers = 0\n")
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for number in (1, 2):
        buffer = BytesIO()
        make_ct(
            study_uid=study,
            series_uid=series,
            instance_number=number,
            size=8,
            BodyPartExamined="CHEST",
        ).save_as(buffer, enforce_file_format=True)
        node.intake.receive_part10(buffer.getvalue(), Source("dimse", "CT"))
    (job_id,) = node.analysis.request(study)
    job = node.analysis.run_one()
    assert (job.id, job.state, job.attempts) == (job_id, "skipped", 1)
    assert "at least 3 slices" in job.as_dict()["summary"]["skipped"]
    assert node.analysis.run_one() is None
