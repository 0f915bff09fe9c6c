"""Minimum data: the built-in analyzers process only units that fit them clinically (body part,
anatomic region codes, protocol, image type), by rules the site can tune; a unit that does not
fit is not processed, and the job listing (CLI and /analysis/jobs) says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
from pydicom.dataset import Dataset

from dicomnode.analysis.ct_lung.phantom import chest_phantom, phantom_series
from dicomnode.analysis.fits import CHEST_CT, CORONARY_ANGIOGRAPHY
from dicomnode.analysis.xa_qca.phantom import xa_cine, xa_dataset
from dicomnode.config import ConfigError, read_settings
from tests.conftest import dicomweb_client, run_dcmtk, token_for

ANALYSIS = '[analysis]\nworkers = 0\n[analysis.analyzers."xa-qca"]\nenabled = {xa}\n'


def ct_series(folder: Path, **attributes: object) -> list[Dataset]:
    """A small CT volume (the ct-lung phantom) with `attributes` set on every slice (None
    removes one), written to `folder`."""
    series = phantom_series(chest_phantom(5, slices=12, size=64))
    folder.mkdir()
    for ds in series:
        for keyword, value in attributes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return series


def send(node, folder: Path) -> None:
    sent = run_dcmtk(
        "storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.dimse.port), "+sd", str(folder)
    )
    assert sent.returncode == 0, sent.stderr


def run_study(node, study: str):
    """Queue the study's units (the explicit "commit") and run each job."""
    job_ids = node.analysis.request(study)
    assert job_ids
    jobs = [node.analysis.run_one() for _ in job_ids]
    assert node.analysis.run_one() is None
    return jobs


def results(node, study: str) -> list[str]:
    found = dicomweb_client(node).search_for_series(study, search_filters={"Modality": "SEG\\SR"})
    return sorted(s["00080060"]["Value"][0] for s in found)


def jobs_cli(node) -> str:
    listed = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "jobs", "list"]
        + ["--config", str(node.settings.source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    return listed.stdout


def test_a_head_ct_gets_no_lung_seg_or_sr_and_the_job_listing_says_why(start_node, tmp_path):
    node = start_node(extra=ANALYSIS.format(xa="false"))
    head = ct_series(tmp_path / "head", BodyPartExamined="HEAD", ProtocolName="HEAD ROUTINE")
    send(node, tmp_path / "head")
    study = head[0].StudyInstanceUID
    (job,) = run_study(node, study)
    assert job.state == "not-applicable" and job.attempts == 0 and job.outputs is None
    assert job.error.startswith("not a chest CT: BodyPartExamined HEAD, ProtocolName")
    assert results(node, study) == []  # nothing written into the hospital's study

    line = next(line for line in jobs_cli(node).splitlines() if line.split()[0] == str(job.id))
    assert "not-applicable" in line and "why: not a chest CT: BodyPartExamined HEAD" in line
    listed = requests.get(
        f"http://127.0.0.1:{node.http_port}/analysis/jobs",
        params={"study": study},
        headers={"Authorization": f"Bearer {token_for(node)}"},
        timeout=30,
    ).json()
    assert [(j["state"], j["summary"]["not_applicable"]) for j in listed] == [
        ("not-applicable", job.error)
    ]
    # a retry asks again (and the unit still does not fit)
    node.analysis.jobs.retry(job.id, job.finished_at)
    assert node.analysis.run_one().state == "not-applicable"


def test_a_chest_ct_still_gets_its_seg_and_sr(start_node, tmp_path):
    node = start_node(extra=ANALYSIS.format(xa="false"))
    chest = ct_series(tmp_path / "chest")  # BodyPartExamined CHEST
    send(node, tmp_path / "chest")
    (job,) = run_study(node, chest[0].StudyInstanceUID)
    assert job.state == "done", job.error
    assert results(node, chest[0].StudyInstanceUID) == ["SEG", "SR"]


def test_a_chest_ct_named_only_by_its_anatomic_region_code_fits(tmp_path):
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "51185008", "SCT", "Chest"
    header = Dataset()
    header.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    header.AnatomicRegionSequence = [region]
    assert CHEST_CT.misfit(header) == ""
    header.ProtocolName = "Routine Thorax"
    del header.AnatomicRegionSequence
    assert CHEST_CT.misfit(header) == ""
    header.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert CHEST_CT.misfit(header).startswith("ImageType LOCALIZER is never analysed")
    assert CHEST_CT.misfit(Dataset()).startswith(
        "not a chest CT: no body part, anatomic region or protocol"
    )


def test_a_site_rule_widening_the_fit_works(start_node, tmp_path):
    default = start_node(extra=ANALYSIS.format(xa="false"))
    whole = ct_series(tmp_path / "whole", BodyPartExamined="WHOLEBODY")
    send(default, tmp_path / "whole")
    (refused,) = run_study(default, whole[0].StudyInstanceUID)
    assert refused.state == "not-applicable" and "BodyPartExamined WHOLEBODY" in refused.error

    widened = start_node(
        extra=ANALYSIS.format(xa="false")
        + '[analysis.analyzers."ct-lung"]\nbody_parts = ["CHEST", "LUNG", "THORAX", "WHOLEBODY"]\n'
    )
    (job,) = run_study(widened, whole[0].StudyInstanceUID)  # the same archive, a new node
    assert job.state == "done", job.error
    assert results(widened, whole[0].StudyInstanceUID) == ["SEG", "SR"]


def test_a_cerebral_angiogram_gets_no_coronary_qca(start_node, tmp_path):
    node = start_node(extra=ANALYSIS.format(xa="true"))
    cine = xa_cine(2, n_frames=4)
    xa = xa_dataset(cine.frames, cine.pixel_spacing_mm)
    xa.BodyPartExamined = "HEAD"
    folder = tmp_path / "xa"
    folder.mkdir()
    xa.save_as(folder / "xa.dcm", enforce_file_format=True)
    send(node, folder)
    job = node.analysis.run_one()  # xa-qca runs on receipt
    assert job.analyzer == "xa-qca" and job.state == "not-applicable"
    assert job.error.startswith("not a coronary angiogram: BodyPartExamined HEAD")
    assert results(node, xa.StudyInstanceUID) == []


def test_coronary_angiograms_fit_by_body_part_or_region_code():
    header = Dataset()
    header.BodyPartExamined = "CORONARY ARTERY"
    assert CORONARY_ANGIOGRAPHY.misfit(header) == ""
    header.BodyPartExamined = "HEART"
    assert CORONARY_ANGIOGRAPHY.misfit(header) == ""
    del header.BodyPartExamined
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator = "41801008", "SCT"
    header.AnatomicRegionSequence = [region]
    assert CORONARY_ANGIOGRAPHY.misfit(header) == ""
    region.CodeValue = "12738006"  # brain
    assert CORONARY_ANGIOGRAPHY.misfit(header).startswith(
        "not a coronary angiogram: anatomic region SCT:12738006"
    )


def test_fit_settings_are_checked(tmp_path):
    from tests.conftest import write_config

    config = write_config(
        tmp_path / "node.toml",
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'index.db'}",
        [],
        extra='[analysis.analyzers."ct-lung"]\nbody_parts = "CHEST"\n',
    )
    with pytest.raises(ConfigError, match="body_parts"):
        read_settings(config)
