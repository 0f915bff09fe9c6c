"""The node's DIMSE services, driven by the dcmtk command-line tools a hospital uses.

Each test starts a node (on SQLite and on PostgreSQL) and talks to it only through dcmtk:
echoscu, storescu, findscu, movescu, getscu, and a dcmtk storescp as the C-MOVE destination.
The node's AE title is DICOMNODE; the configured peers are:

- WORKSTATION: may echo, store, find, move and get;
- STORESCP: a dcmtk storescp that C-MOVE sends to;
- VIEWER (in the refusal test): may do everything but C-FIND.

Any other caller may only echo and store.
"""

from __future__ import annotations

import re
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from time import sleep
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt

from dicomnode.config import Peer
from dicomnode.core.model import Level
from tests.conftest import WORKSTATION, read_folder, run_dcmtk
from tests.factory import make_ct, write_series

if TYPE_CHECKING:
    from dicomnode.serve import Node

pytestmark = pytest.mark.dcmtk

NODE_AE = "DICOMNODE"
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

# Statuses (PS3.4 Annex C, PS3.7 Annex C) as the node answers them.
SUCCESS = 0x0000
PENDING = 0xFF00
REFUSED_NOT_AUTHORIZED = 0x0124
MOVE_DESTINATION_UNKNOWN = 0xA801
CANNOT_UNDERSTAND = 0xC000
UNABLE_TO_PROCESS_MOVE = 0xC514

# Bundled pydicom files, one per transfer syntax, each with the UIDs and Patient ID the node
# requires (file name -> transfer syntax it is in). MR_small*.dcm and SC_rgb_rle*.dcm share a
# SOP Instance UID with their siblings, so only one of each family is used.
BUNDLED = {
    "CT_small.dcm": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "rtplan.dcm": "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "SC_rgb_small_odd_big_endian.dcm": "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "SC_rgb_rle.dcm": "1.2.840.10008.1.2.5",  # RLE Lossless
}

KEY_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "PatientID",
    "PatientName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
)


# --- running dcmtk ----------------------------------------------------------------------


def dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess:
    return run_dcmtk(tool, *args)


def node_address(node: Node) -> list[str]:
    return ["-aec", NODE_AE, "127.0.0.1", str(node.dimse.port)]


@dataclass
class DimseResult:
    """What a dcmtk SCU reported (run with -d): every DIMSE status it received, the final
    response's sub-operation counts, the Error Comment, and the data sets it wrote."""

    process: subprocess.CompletedProcess
    datasets: list[Dataset] = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.process.stdout + self.process.stderr

    @property
    def statuses(self) -> list[int]:
        return [
            int(s, 16) for s in re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", self.output)
        ]

    @property
    def final_status(self) -> int:
        assert self.statuses, f"no DIMSE status in the output:\n{self.output}"
        return self.statuses[-1]

    def suboperations(self, kind: str) -> int:
        """The last reported `kind` (Completed, Failed, Warning) sub-operation count."""
        found = re.findall(rf"{kind} Suboperations\s*:\s*(\w+)", self.output)
        assert found, f"no {kind} sub-operation count in the output:\n{self.output}"
        return 0 if found[-1] == "none" else int(found[-1])

    @property
    def error_comment(self) -> str:
        found = re.findall(r"\(0000,0902\) LO \[([^\]]*)\]", self.output)
        return found[-1] if found else ""

    def values(self, keyword: str) -> list[str]:
        """`keyword` of every answer, as text, sorted."""
        return sorted(str(ds.get(keyword, "")) for ds in self.datasets)


def keys(level: str, *extra: str) -> list[str]:
    """findscu/movescu/getscu `-k` options: the level, then each KEYWORD=VALUE or KEYWORD."""
    args = ["-k", f"QueryRetrieveLevel={level}"]
    for key in extra:
        args += ["-k", key]
    return args


def findscu(
    node: Node, out: Path, root: str, level: str, *query: str, aet: str = "WORKSTATION"
) -> DimseResult:
    """C-FIND with `root` "-P" (Patient Root) or "-S" (Study Root); each answer is written as
    a file (-X) into a fresh folder and read back with pydicom."""
    out.mkdir(parents=True, exist_ok=True)
    result = dcmtk(
        "findscu", "-d", root, "-aet", aet, "-X", "-od", str(out),
        *keys(level, *query), *node_address(node),
    )  # fmt: skip
    return DimseResult(result, read_folder(out))


def movescu(
    node: Node, root: str, level: str, *query: str, to: str, aet: str = "WORKSTATION"
) -> DimseResult:
    result = dcmtk(
        "movescu", "-d", root, "-aet", aet, "-aem", to, *keys(level, *query), *node_address(node)
    )
    return DimseResult(result)


def getscu(
    node: Node, out: Path, root: str, level: str, *query: str, aet: str = "WORKSTATION"
) -> DimseResult:
    out.mkdir(parents=True, exist_ok=True)
    result = dcmtk(
        "getscu", "-d", root, "-aet", aet, "-od", str(out), *keys(level, *query),
        *node_address(node),
    )  # fmt: skip
    return DimseResult(result, read_folder(out))


def storescu(
    node: Node, *paths: Path, aet: str = "WORKSTATION", options: list[str] = ()
) -> DimseResult:
    """C-STORE every file in `paths` (folders are scanned) in one association."""
    result = dcmtk(
        "storescu", "-d", "+sd", "+r", "-aet", aet, *options,
        *node_address(node), *map(str, paths),
    )  # fmt: skip
    return DimseResult(result)


# --- test data --------------------------------------------------------------------------


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta information: the data set."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    # preamble and "DICM" (132), the group length element (12), then the group it counts
    return path.read_bytes()[132 + 12 + meta.FileMetaInformationGroupLength :]


def as_dcmtk_sends(source: Path, target: Path) -> Path:
    """`source` rewritten by dcmtk's dcmconv in the encoding storescu puts on the wire (same
    transfer syntax, no group lengths, explicit lengths, no trailing padding), so that the
    data set the node stored can be compared with it byte for byte."""
    target.parent.mkdir(parents=True, exist_ok=True)
    converted = dcmtk("dcmconv", "-g", "+e", "-p", str(source), str(target))
    assert converted.returncode == 0, converted.stderr
    return target


def same_content(a: Dataset, b: Dataset) -> bool:
    """Every element of `a` and `b` has the same value, group lengths and trailing padding
    aside (an encoding matter that dcmtk drops when it sends)."""

    def content(ds: Dataset) -> dict:
        return {
            e.tag: e.value
            for e in ds
            if e.tag.element != 0 and e.keyword != "DataSetTrailingPadding"
        }

    return content(a) == content(b)


def storescu_profile(path: Path, files: list[Path]) -> list[str]:
    """storescu options (-xf) that propose, for each file, its SOP class in exactly its own
    transfer syntax, so that storescu sends every file as it is, compressed or not."""
    pairs = sorted(
        {
            (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
            for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)
        }
    )
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for n, ts in enumerate(syntaxes):
        lines += [f"[TS{n}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[AsStored]"]
    for n, (sop_class, ts) in enumerate(pairs, 1):
        lines.append(f"PresentationContext{n} = {sop_class}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[AsStored]", "PresentationContexts = AsStored"]
    path.write_text("\n".join(lines) + "\n")
    return ["-xf", str(path), "AsStored"]


@dataclass
class Sample:
    """Four studies of three patients, stored in the node through storescu."""

    studies: dict[str, str]  # label -> StudyInstanceUID
    series: dict[str, str]  # label -> SeriesInstanceUID
    files: dict[str, list[Path]]  # series label -> its files


PATIENTS = {
    "jane": dict(
        patient_id="PAT001", patient_name="Doe^Jane", PatientBirthDate="19700101", PatientSex="F"
    ),
    "john": dict(
        patient_id="PAT002", patient_name="Smith^John", PatientBirthDate="19651224", PatientSex="M"
    ),
    "hong": dict(
        patient_id="KOR001",
        patient_name="홍^길동",
        PatientBirthDate="19800505",
        PatientSex="M",
        SpecificCharacterSet="ISO_IR 192",
    ),
}
# study label -> patient, (StudyDate, StudyTime, AccessionNumber, StudyDescription),
# and its series as (series label, Modality, number of instances)
STUDIES = {
    "A1": ("jane", ("20240315", "101500", "ACC001", "CT CHEST"), [("A1-CT", "CT", 3),
                                                                  ("A1-MR", "MR", 2)]),
    "A2": ("jane", ("20230101", "080000", "ACC002", "CT HEAD"), [("A2-CT", "CT", 1)]),
    "B1": ("john", ("20240401", "143000", "ACC003", "MR KNEE"), [("B1-MR", "MR", 2)]),
    "C1": ("hong", ("20220505", "093000", "ACC004", "CT ABDOMEN"), [("C1-CT", "CT", 1)]),
}  # fmt: skip


def write_sample(folder: Path) -> Sample:
    folder.mkdir(parents=True)
    sample = Sample({}, {}, {})
    seed = 0
    for study_label, (patient, (date, time, accession, description), series) in STUDIES.items():
        study_uid = sample.studies[study_label] = generate_uid()
        for number, (series_label, modality, count) in enumerate(series, 1):
            series_uid = sample.series[series_label] = generate_uid()
            sample.files[series_label] = []
            for instance in range(1, count + 1):
                seed += 1
                ds = make_ct(
                    **PATIENTS[patient],
                    study_uid=study_uid,
                    series_uid=series_uid,
                    instance_number=instance,
                    size=16,
                    seed=seed,
                    StudyDate=date,
                    StudyTime=time,
                    AccessionNumber=accession,
                    StudyDescription=description,
                    Modality=modality,
                    SeriesNumber=number,
                    SeriesDescription=f"{modality} SERIES {number}",
                )
                path = folder / f"{ds.SOPInstanceUID}.dcm"
                ds.save_as(path, enforce_file_format=True)
                sample.files[series_label].append(path)
    return sample


def store_sample(node: Node, tmp_path: Path) -> Sample:
    sample = write_sample(tmp_path / "sample")
    stored = storescu(node, tmp_path / "sample")
    assert stored.process.returncode == 0, stored.output
    assert node.archive.counts() == {"patients": 3, "studies": 4, "series": 5, "instances": 9}
    return sample


def assert_same_instance(received: Dataset, sent: Dataset) -> None:
    """`received` carries the same key attributes, pixels and every other element as `sent`."""
    for keyword in KEY_ATTRIBUTES:
        assert received.get(keyword) == sent.get(keyword), keyword
    assert received.PixelData == sent.PixelData
    assert received == sent


def peers(*extra: Peer) -> list[Peer]:
    return [WORKSTATION, *extra]


# --- C-ECHO -----------------------------------------------------------------------------


def test_echoscu_gets_success(start_node):
    node = start_node(peers())

    echo = dcmtk("echoscu", "-v", *node_address(node))

    assert echo.returncode == 0, echo.stderr
    assert "Received Echo Response (Success)" in echo.stdout + echo.stderr


# --- C-STORE ----------------------------------------------------------------------------


def test_storescu_files_are_stored_as_received_in_every_transfer_syntax(start_node, tmp_path):
    """A folder of generated CT images, a deflated image and pydicom's sample files in eight
    transfer syntaxes, sent as they are: the node keeps each data set byte for byte as it
    arrived, in its transfer syntax, and indexes every patient, study, series and image."""
    node = start_node(peers())
    made = tmp_path / "made"
    generated = write_series(made, 3, "GEN001", size=16)
    deflated = make_ct("DFL001", size=16, seed=42)
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    generated.append(made / "deflated.dcm")
    deflated.save_as(generated[-1], enforce_file_format=True)
    upload = tmp_path / "upload"
    files = [as_dcmtk_sends(path, upload / path.name) for path in generated]
    files += [as_dcmtk_sends(TEST_FILES / name, upload / name) for name in BUNDLED]

    sent = storescu(node, upload, options=storescu_profile(tmp_path / "as-stored.cfg", files))

    assert sent.process.returncode == 0, sent.output
    assert sent.statuses == [SUCCESS] * len(files), sent.output
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert node.archive.counts() == {
        "patients": len({h.PatientID for h in headers}),
        "studies": len({h.StudyInstanceUID for h in headers}),
        "series": len({h.SeriesInstanceUID for h in headers}),
        "instances": len(files),
    }
    originals = generated + [TEST_FILES / name for name in BUNDLED]
    for sent_file, original_file in zip(files, originals, strict=True):
        original = pydicom.dcmread(original_file)
        [instance] = node.archive.find_instances(
            Level.IMAGE, (("SOPInstanceUID", original.SOPInstanceUID),)
        )
        blob = node.archive.blob_file(instance)
        stored = pydicom.dcmread(blob)
        ts = original.file_meta.TransferSyntaxUID
        assert ts == BUNDLED.get(original_file.name, ts)
        assert instance.transfer_syntax_uid == ts, original_file.name
        assert stored.file_meta.TransferSyntaxUID == ts, original_file.name
        if ts.is_deflated:
            # A deflated stream of odd length travels with one pad byte; the node keeps it.
            inflated = [
                zlib.decompress(dataset_bytes(f), -zlib.MAX_WBITS) for f in (blob, sent_file)
            ]
            assert inflated[0] == inflated[1]
            assert dataset_bytes(blob) in (
                dataset_bytes(sent_file),
                dataset_bytes(sent_file) + b"\0",
            )
        else:
            assert dataset_bytes(blob) == dataset_bytes(sent_file), original_file.name
        assert same_content(stored, original), original_file.name
        if "PixelData" in original:
            assert stored.PixelData == original.PixelData, original_file.name


# --- C-FIND -----------------------------------------------------------------------------


def test_findscu_patient_root_at_every_level(start_node, tmp_path):
    """Patient Root: PATIENT, then STUDY, SERIES and IMAGE of one patient."""
    node = start_node(peers())
    sample = store_sample(node, tmp_path)
    out = tmp_path / "find"

    patients = findscu(
        node, out, "-P", "PATIENT", "PatientID=PAT001", "PatientName", "PatientBirthDate",
        "PatientSex", "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances",
    )  # fmt: skip
    assert patients.statuses == [PENDING, SUCCESS], patients.output
    [jane] = patients.datasets
    assert jane.QueryRetrieveLevel == "PATIENT"
    assert jane.PatientID == "PAT001"
    assert jane.PatientName == "Doe^Jane"
    assert jane.PatientBirthDate == "19700101"  # universal matching returns the value
    assert jane.PatientSex == "F"
    assert jane.NumberOfPatientRelatedStudies == 2
    assert jane.NumberOfPatientRelatedInstances == 6

    studies = findscu(
        node, out, "-P", "STUDY", "PatientID=PAT001", "StudyInstanceUID", "StudyDate",
        "AccessionNumber", "StudyDescription",
    )  # fmt: skip
    assert studies.final_status == SUCCESS
    assert studies.values("StudyInstanceUID") == sorted(
        [sample.studies["A1"], sample.studies["A2"]]
    )
    assert studies.values("AccessionNumber") == ["ACC001", "ACC002"]
    assert studies.values("StudyDescription") == ["CT CHEST", "CT HEAD"]

    series = findscu(
        node, out, "-P", "SERIES", "PatientID=PAT001", f"StudyInstanceUID={sample.studies['A1']}",
        "SeriesInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances",
    )  # fmt: skip
    assert series.final_status == SUCCESS
    by_modality = {ds.Modality: ds for ds in series.datasets}
    assert sorted(by_modality) == ["CT", "MR"]
    assert by_modality["CT"].SeriesInstanceUID == sample.series["A1-CT"]
    assert by_modality["CT"].NumberOfSeriesRelatedInstances == 3
    assert by_modality["MR"].SeriesInstanceUID == sample.series["A1-MR"]
    assert by_modality["MR"].NumberOfSeriesRelatedInstances == 2

    images = findscu(
        node, out, "-P", "IMAGE", "PatientID=PAT001", f"StudyInstanceUID={sample.studies['A1']}",
        f"SeriesInstanceUID={sample.series['A1-CT']}", "SOPInstanceUID", "SOPClassUID",
        "InstanceNumber",
    )  # fmt: skip
    assert images.final_status == SUCCESS
    sent = [pydicom.dcmread(p) for p in sample.files["A1-CT"]]
    assert images.values("SOPInstanceUID") == sorted(ds.SOPInstanceUID for ds in sent)
    assert images.values("InstanceNumber") == ["1", "2", "3"]
    assert {str(ds.SOPClassUID) for ds in images.datasets} == {str(sent[0].SOPClassUID)}


def test_findscu_study_root_at_every_level(start_node, tmp_path):
    """Study Root: STUDY with the computed attributes, then SERIES and IMAGE."""
    node = start_node(peers())
    sample = store_sample(node, tmp_path)
    out = tmp_path / "find"
    a1 = sample.studies["A1"]

    studies = findscu(
        node, out, "-S", "STUDY", f"StudyInstanceUID={a1}", "PatientID", "PatientName",
        "StudyDate", "StudyTime", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    )  # fmt: skip
    assert studies.statuses == [PENDING, SUCCESS], studies.output
    [study] = studies.datasets
    assert study.StudyInstanceUID == a1
    assert study.PatientID == "PAT001"
    assert study.PatientName == "Doe^Jane"
    assert study.StudyDate == "20240315"
    assert study.StudyTime == "101500"
    assert list(study.ModalitiesInStudy) == ["CT", "MR"]
    assert study.NumberOfStudyRelatedSeries == 2
    assert study.NumberOfStudyRelatedInstances == 5

    series = findscu(
        node, out, "-S", "SERIES", f"StudyInstanceUID={a1}", "Modality=MR", "SeriesInstanceUID",
        "SeriesDescription", "NumberOfSeriesRelatedInstances",
    )  # fmt: skip
    assert series.final_status == SUCCESS
    [mr] = series.datasets
    assert mr.SeriesInstanceUID == sample.series["A1-MR"]
    assert mr.SeriesDescription == "MR SERIES 2"
    assert mr.NumberOfSeriesRelatedInstances == 2

    images = findscu(
        node, out, "-S", "IMAGE", f"StudyInstanceUID={a1}",
        f"SeriesInstanceUID={sample.series['A1-MR']}", "SOPInstanceUID", "InstanceNumber",
        "Rows", "Columns",
    )  # fmt: skip
    assert images.final_status == SUCCESS
    assert images.values("SOPInstanceUID") == sorted(
        pydicom.dcmread(p).SOPInstanceUID for p in sample.files["A1-MR"]
    )
    assert images.values("Rows") == ["16", "16"]
    assert images.values("Columns") == ["16", "16"]


def test_findscu_matching(start_node, tmp_path):
    """Every kind of matching PS3.4 C.2.2.2 defines, each answered with exactly the entities it
    names; a query that matches nothing gets no answers and Success."""
    node = start_node(peers())
    sample = store_sample(node, tmp_path)
    out = tmp_path / "find"
    s = sample.studies

    def patients(*query: str) -> list[str]:
        found = findscu(node, out, "-P", "PATIENT", "PatientID", *query)
        assert found.final_status == SUCCESS, found.output
        return found.values("PatientID")

    def studies(*query: str) -> list[str]:
        found = findscu(node, out, "-S", "STUDY", "StudyInstanceUID", *query)
        assert found.final_status == SUCCESS, found.output
        return found.values("StudyInstanceUID")

    def uids(*labels: str) -> list[str]:
        return sorted(s[label] for label in labels)

    # single value, wildcards and case-insensitive person names
    assert patients("PatientID=PAT002") == ["PAT002"]
    assert patients("PatientID=PAT00?") == ["PAT001", "PAT002"]
    assert patients("PatientName=*") == ["KOR001", "PAT001", "PAT002"]
    assert patients("PatientName=Do*") == ["PAT001"]
    assert patients("PatientName=doe^jane") == ["PAT001"]
    assert patients("PatientName=SMITH^JOHN") == ["PAT002"]
    assert patients("PatientName=*^J?hn") == ["PAT002"]
    assert studies("AccessionNumber=ACC00*") == uids("A1", "A2", "B1", "C1")
    assert studies("StudyDescription=CT*") == uids("A1", "A2", "C1")
    assert studies("StudyDescription=ct*") == []  # other strings are case-sensitive
    # a list of UIDs
    assert studies(f"StudyInstanceUID={s['A1']}\\{s['B1']}") == uids("A1", "B1")
    # dates: single, A-B, A-, -B
    assert studies("StudyDate=20240315") == uids("A1")
    assert studies("StudyDate=20240101-20241231") == uids("A1", "B1")
    assert studies("StudyDate=20240320-") == uids("B1")
    assert studies("StudyDate=-20230601") == uids("A2", "C1")
    # times: a range, and a single value naming a whole minute
    assert studies("StudyTime=090000-120000") == uids("A1", "C1")
    assert studies("StudyTime=-0900") == uids("A2")
    assert studies("StudyTime=1430") == uids("B1")
    # computed attributes
    assert studies("ModalitiesInStudy=MR") == uids("A1", "B1")
    assert studies("ModalitiesInStudy=CT\\MR") == uids("A1", "A2", "B1", "C1")
    # several keys at once: all must match
    assert studies("PatientID=PAT001", "StudyDate=20240101-") == uids("A1")

    # dates take no wildcards (C.2.2.2.4): refused with a failure that says why
    bad = findscu(node, out, "-S", "STUDY", "StudyDate=2024*")
    assert bad.statuses == [CANNOT_UNDERSTAND], bad.output
    assert "StudyDate" in bad.error_comment
    assert bad.datasets == []

    # universal matching: an empty key matches everything and returns the stored value
    universal = findscu(
        node, out, "-S", "STUDY", f"StudyInstanceUID={s['B1']}", "StudyDescription",
        "ReferringPhysicianName", "PatientBirthDate", "ModalitiesInStudy",
    )  # fmt: skip
    [b1] = universal.datasets
    assert b1.StudyDescription == "MR KNEE"
    assert b1.ReferringPhysicianName == "Kim^Minsu"
    assert b1.PatientBirthDate == "19651224"
    assert b1.ModalitiesInStudy == "MR"

    # nothing matches: no answers, and the final status is still Success
    for level, query in (
        ("PATIENT", "PatientID=NOBODY"),
        ("STUDY", "StudyDate=19000101"),
        ("SERIES", "Modality=US"),
        ("IMAGE", "SOPInstanceUID=1.2.3.4"),
    ):
        none = findscu(node, out, "-P", level, query)
        assert none.statuses == [SUCCESS], none.output
        assert none.datasets == []


def test_findscu_korean_patient_name_round_trips(start_node, tmp_path):
    """A patient stored in UTF-8 (ISO_IR 192) is found by a Korean name and answered in
    UTF-8, so that findscu's answer decodes to the same name."""
    node = start_node(peers())
    store_sample(node, tmp_path)
    out = tmp_path / "find"

    for name in ("홍^길동", "홍*"):
        found = findscu(
            node, out, "-P", "PATIENT", "SpecificCharacterSet=ISO_IR 192", f"PatientName={name}",
            "PatientID",
        )  # fmt: skip
        assert found.final_status == SUCCESS, found.output
        [hong] = found.datasets
        assert hong.SpecificCharacterSet == "ISO_IR 192"
        assert hong.PatientName == "홍^길동"
        assert hong.PatientID == "KOR001"

    study_root = findscu(node, out, "-S", "STUDY", "PatientName", "PatientID=KOR001")
    [study] = study_root.datasets
    assert study.PatientName == "홍^길동"


# --- C-MOVE and C-GET -------------------------------------------------------------------


def sent_instances(sample: Sample, *series_labels: str) -> dict[str, Dataset]:
    """The instances of `series_labels` as they were sent, by SOP Instance UID."""
    datasets = [pydicom.dcmread(p) for label in series_labels for p in sample.files[label]]
    return {ds.SOPInstanceUID: ds for ds in datasets}


def assert_received(received: list[Dataset], expected: dict[str, Dataset]) -> None:
    by_uid = {ds.SOPInstanceUID: ds for ds in received}
    assert len(received) == len(by_uid), "an instance arrived twice"
    assert sorted(by_uid) == sorted(expected)
    for uid, ds in by_uid.items():
        assert_same_instance(ds, expected[uid])


def test_movescu_to_a_storescp_at_study_series_and_image_level(start_node, storescp, tmp_path):
    """C-MOVE to a configured peer: every matching instance arrives there, unchanged."""
    destination = storescp()
    node = start_node(peers(destination.peer))
    sample = store_sample(node, tmp_path)

    study = movescu(
        node, "-S", "STUDY", f"StudyInstanceUID={sample.studies['A1']}", to=destination.ae_title
    )
    assert study.final_status == SUCCESS, study.output
    assert study.suboperations("Completed") == 5
    assert study.suboperations("Failed") == 0
    assert_received(destination.received(), sent_instances(sample, "A1-CT", "A1-MR"))

    series = movescu(
        node, "-S", "SERIES", f"StudyInstanceUID={sample.studies['A1']}",
        f"SeriesInstanceUID={sample.series['A1-CT']}", to=destination.ae_title,
    )  # fmt: skip
    assert series.final_status == SUCCESS, series.output
    assert series.suboperations("Completed") == 3
    assert_received(destination.received(), sent_instances(sample, "A1-CT"))

    [one] = sample.files["B1-MR"][:1]
    uid = pydicom.dcmread(one).SOPInstanceUID
    image = movescu(
        node, "-S", "IMAGE", f"StudyInstanceUID={sample.studies['B1']}",
        f"SeriesInstanceUID={sample.series['B1-MR']}", f"SOPInstanceUID={uid}",
        to=destination.ae_title,
    )  # fmt: skip
    assert image.final_status == SUCCESS, image.output
    assert image.suboperations("Completed") == 1
    assert_received(destination.received(), {uid: pydicom.dcmread(one)})

    patient = movescu(node, "-P", "PATIENT", "PatientID=KOR001", to=destination.ae_title)
    assert patient.final_status == SUCCESS, patient.output
    received = destination.received()
    assert_received(received, sent_instances(sample, "C1-CT"))
    assert received[0].PatientName == "홍^길동"


def test_movescu_decompresses_for_a_storescp_without_codecs(start_node, storescp, tmp_path):
    """A JPEG 2000 and an RLE image, stored compressed, moved to a storescp that accepts only
    uncompressed transfer syntaxes (its default): they arrive decompressed, same pixels."""
    destination = storescp()
    node = start_node(peers(destination.peer))
    names = ("JPEG2000.dcm", "SC_rgb_rle.dcm")
    upload = tmp_path / "upload"
    files = [as_dcmtk_sends(TEST_FILES / name, upload / name) for name in names]
    sent = storescu(node, upload, options=storescu_profile(tmp_path / "as-stored.cfg", files))
    assert sent.statuses == [SUCCESS, SUCCESS], sent.output
    originals = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f) for f in files)}
    stored = node.archive.find_instances(Level.IMAGE, ())
    assert sorted(i.transfer_syntax_uid for i in stored) == sorted(BUNDLED[n] for n in names)

    study_uids = "\\".join(ds.StudyInstanceUID for ds in originals.values())
    moved = movescu(node, "-S", "STUDY", f"StudyInstanceUID={study_uids}", to=destination.ae_title)

    assert moved.final_status == SUCCESS, moved.output
    assert moved.suboperations("Completed") == 2
    received = {ds.SOPInstanceUID: ds for ds in destination.received()}
    assert sorted(received) == sorted(originals)
    for uid, ds in received.items():
        original = originals[uid]
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        for keyword in KEY_ATTRIBUTES:
            assert ds.get(keyword) == original.get(keyword), keyword
        assert ds.pixel_array.shape == original.pixel_array.shape
        assert np.array_equal(ds.pixel_array, original.pixel_array)
    # the archive still holds them compressed, as received
    again = node.archive.find_instances(Level.IMAGE, ())
    assert sorted(i.transfer_syntax_uid for i in again) == sorted(BUNDLED[n] for n in names)


class FlakyDestination:
    """A move destination (a pynetdicom storage SCP) that, the first time it is sent
    `flaky_uid`, either drops the association or answers only after `stall` seconds."""

    def __init__(self, flaky_uid: str, how: str, stall: float = 0.0) -> None:
        self.flaky_uid, self.how, self.stall = flaky_uid, how, stall
        self.received: list[str] = []  # SOP Instance UIDs, in arrival order
        ae = AE("FLAKY")
        ae.supported_contexts = StoragePresentationContexts
        handlers = [(evt.EVT_C_STORE, self.on_store)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.peer = Peer("flaky", "FLAKY", "127.0.0.1", self.server.server_address[1], ("store",))

    def on_store(self, event: evt.Event) -> int:
        uid = event.request.AffectedSOPInstanceUID
        first_time = uid not in self.received
        self.received.append(uid)
        if uid == self.flaky_uid and first_time:
            if self.how == "drops the association":
                event.assoc.abort()
            else:
                sleep(self.stall)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("how", ["drops the association", "answers too late"])
def test_a_lost_move_sub_operation_is_resent_on_a_new_association(start_node, tmp_path, how):
    """A C-STORE sub-operation whose response does not come (the destination dropped the
    association, or did not answer within dimse.store_timeout) is sent again on a new
    association; the move then completes with no failure and the rest follow."""
    sample = write_sample(tmp_path / "sample")
    ct_files = sample.files["A1-CT"]
    flaky_uid = pydicom.dcmread(ct_files[1]).SOPInstanceUID
    destination = FlakyDestination(flaky_uid, how, stall=4.0)
    try:
        node = start_node(peers(destination.peer), store_timeout=1.5)
        assert storescu(node, tmp_path / "sample").process.returncode == 0

        moved = movescu(
            node, "-S", "SERIES", f"StudyInstanceUID={sample.studies['A1']}",
            f"SeriesInstanceUID={sample.series['A1-CT']}", to="FLAKY",
        )  # fmt: skip
    finally:
        destination.stop()

    assert moved.final_status == SUCCESS, moved.output
    assert moved.suboperations("Completed") == 3
    assert moved.suboperations("Failed") == 0
    expected = sorted(pydicom.dcmread(f).SOPInstanceUID for f in ct_files)
    assert sorted(set(destination.received)) == expected
    assert destination.received.count(flaky_uid) == 2, destination.received


def test_getscu_study(start_node, tmp_path):
    """C-GET: the instances come back on the caller's own association, unchanged."""
    node = start_node(peers())
    sample = store_sample(node, tmp_path)

    got = getscu(node, tmp_path / "get", "-S", "STUDY", f"StudyInstanceUID={sample.studies['A1']}")

    assert got.process.returncode == 0, got.output
    assert got.final_status == SUCCESS, got.output
    assert got.suboperations("Completed") == 5
    assert got.suboperations("Failed") == 0
    assert_received(got.datasets, sent_instances(sample, "A1-CT", "A1-MR"))


# --- refusals ---------------------------------------------------------------------------


def test_unknown_move_destination_is_refused_and_nothing_is_sent(start_node, storescp, tmp_path):
    destination = storescp()
    node = start_node(peers(destination.peer))
    sample = store_sample(node, tmp_path)
    before = node.archive.counts()

    # NOWHERE is not a configured peer: the node refuses before it connects anywhere
    moved = movescu(node, "-S", "STUDY", f"StudyInstanceUID={sample.studies['A1']}", to="NOWHERE")

    assert moved.statuses == [MOVE_DESTINATION_UNKNOWN], moved.output
    assert destination.received() == []
    assert node.archive.counts() == before


def test_callers_get_only_the_services_they_are_allowed(start_node, storescp, tmp_path):
    """An unconfigured caller (STRANGER) may echo and store but not query or retrieve; VIEWER,
    configured without "find", may retrieve but not query. Refusals change nothing."""
    destination = storescp()
    viewer = Peer("viewer", "VIEWER", "127.0.0.1", 0, ("echo", "store", "move", "get"))
    node = start_node(peers(destination.peer, viewer))
    sample = store_sample(node, tmp_path)
    a1 = f"StudyInstanceUID={sample.studies['A1']}"

    # STRANGER: echo and store work
    echo = dcmtk("echoscu", "-v", "-aet", "STRANGER", *node_address(node))
    assert "Received Echo Response (Success)" in echo.stdout + echo.stderr
    extra = write_series(tmp_path / "stranger", 1, "STR001", size=16)
    stored = storescu(node, *extra, aet="STRANGER")
    assert stored.statuses == [SUCCESS], stored.output
    before = node.archive.counts()
    assert before["instances"] == 10

    # ... but C-FIND, C-MOVE and C-GET fail, with nothing found, sent or received
    found = findscu(node, tmp_path / "find", "-S", "STUDY", "PatientID", aet="STRANGER")
    assert found.statuses == [REFUSED_NOT_AUTHORIZED], found.output
    assert "STRANGER may not use FIND" in found.error_comment
    assert found.datasets == []

    # pynetdicom takes no status from the node before it names the destination, so a refused
    # C-MOVE is answered "Failed: Unable to process" (0xC514), without an Error Comment.
    moved = movescu(node, "-S", "STUDY", a1, to=destination.ae_title, aet="STRANGER")
    assert moved.statuses == [UNABLE_TO_PROCESS_MOVE], moved.output
    assert destination.received() == []

    got = getscu(node, tmp_path / "get", "-S", "STUDY", a1, aet="STRANGER")
    assert got.statuses == [REFUSED_NOT_AUTHORIZED], got.output
    assert "STRANGER may not use GET" in got.error_comment
    assert got.suboperations("Completed") == 0
    assert got.datasets == []

    # VIEWER: C-FIND is refused, C-GET works
    found = findscu(node, tmp_path / "find", "-S", "STUDY", "PatientID", aet="VIEWER")
    assert found.statuses == [REFUSED_NOT_AUTHORIZED], found.output
    assert "VIEWER may not use FIND" in found.error_comment
    assert found.datasets == []
    got = getscu(node, tmp_path / "get", "-S", "STUDY", a1, aet="VIEWER")
    assert got.final_status == SUCCESS, got.output
    assert_received(got.datasets, sent_instances(sample, "A1-CT", "A1-MR"))

    assert node.archive.counts() == before


def test_each_association_gets_a_deep_copy_of_the_supported_contexts():
    """pynetdicom copies the server's contexts for every association; the node's quick copy
    must be as independent as copy.deepcopy's, or one negotiation could change the next."""
    import copy

    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from dicomnode.scp.server import _SupportedContexts

    ae = AE()
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1"], scp_role=True)
    original = _SupportedContexts(ae.supported_contexts)
    duplicate = copy.deepcopy(original)
    duplicate[0].context_id = 7
    duplicate[0].transfer_syntax.append("1.2.840.10008.1.2")  # the copy's own list
    assert original[0].context_id is None
    assert original[0].transfer_syntax == ["1.2.840.10008.1.2.1"]
    assert duplicate[0].abstract_syntax == CTImageStorage and duplicate[0].scp_role is True
