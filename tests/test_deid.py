"""De-identification by PS3.15 Annex E (dicomnode.governance.deid), read as a specification.

Each test builds DICOM in code (or reads pydicom's bundled CT_small.dcm), de-identifies it and
checks what came out. The regressions of other libraries listed in the governance research
brief (section 1.5) have one test each, named after what they check.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.governance import deid
from dicomnode.governance.deid import (
    OPTIONS,
    DeidProfile,
    conformance_statement,
    deidentify,
    remap_uid,
)

KEY = b"node-secret-for-tests-0123456789"
OTHER_KEY = b"another-node-secret-9876543210ab"
BASIC = DeidProfile("basic")
REFERENCE = Path(__file__).resolve().parents[2] / "shared/reference"
REFERENCE_TABLE = REFERENCE / "ps3.15-annex-e-confidentiality-profile.json"
if not REFERENCE_TABLE.exists():  # CI lays shared/ beside the clone, sessions beside worktrees
    REFERENCE_TABLE = Path("/work/shared/reference/ps3.15-annex-e-confidentiality-profile.json")

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def ct_small() -> Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def item(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def all_values(ds: Dataset) -> list[tuple[int, str]]:
    """(tag, value) of every non-sequence element at every depth."""
    found = []
    for elem in ds.iterall():
        if elem.VR != "SQ":
            found.append((int(elem.tag), str(elem.value)))
    return found


def all_text(ds: Dataset) -> str:
    return "\n".join(value for _, value in all_values(ds))


# --- the table ---------------------------------------------------------------------------

REFERENCE_COLUMNS = {
    "basicProfile": None,
    "rtnSafePrivOpt": "safe-private",
    "rtnUIDsOpt": "uids",
    "rtnDevIdOpt": "device",
    "rtnInstIdOpt": "institution",
    "rtnPatCharsOpt": "patient-chars",
    "rtnLongFullDatesOpt": "full-dates",
    "rtnLongModifDatesOpt": "modified-dates",
    "cleanDescOpt": "descriptors",
    "cleanStructContOpt": "structured",
    "cleanGraphOpt": "graphics",
}
REFERENCE_PATTERNS = {
    "(GGGG,EEEE) WHERE GGGG IS ODD": "odd-group",
    "(50XX,XXXX)": "50xxxxxx",
    "(60XX,3000)": "60xx3000",
    "(60XX,4000)": "60xx4000",
}


def _reference_tag(text: str) -> str:
    return REFERENCE_PATTERNS.get(text) or text.strip("()").replace(",", "")


def test_our_table_has_every_reference_row_with_the_same_action_in_every_column(capsys):
    reference = json.loads(REFERENCE_TABLE.read_text())
    ours = {entry.tag: entry for entry in deid.TABLE}
    theirs = {_reference_tag(row["tag"]): row for row in reference}
    assert sorted(ours) == sorted(theirs)  # every reference row is ours, and vice versa
    compared = 0
    mismatches = []
    for tag, row in theirs.items():
        entry = ours[tag]
        if entry.in_std_iod != (row["stdCompIOD"] == "Y"):
            mismatches.append((tag, "stdCompIOD"))
        for column, option in REFERENCE_COLUMNS.items():
            mine = entry.basic if option is None else entry.options.get(option)
            if mine != row.get(column):
                mismatches.append((tag, column, mine, row.get(column)))
            compared += 1
    assert mismatches == []
    with capsys.disabled():
        print(
            f"\nTable E.1-1: {len(theirs)} attributes x {len(REFERENCE_COLUMNS)} columns = "
            f"{compared} actions compared with the reference, all equal"
        )
    assert len(theirs) == 621 and compared == 621 * 11
    assert deid.EDITION == "2024b"


def test_the_table_covers_private_curve_and_overlay_repeating_groups():
    assert deid.table_action(0x00091001, BASIC) == "X"  # any odd group
    assert deid.table_action(0x00290010, BASIC) == "X"  # a private creator too
    assert deid.table_action(0x50023000, BASIC) == "X"  # curve data (50xx,xxxx)
    assert deid.table_action(0x60043000, BASIC) == "X"  # overlay data (60xx,3000)
    assert deid.table_action(0x601E4000, BASIC) == "X"  # overlay comments (60xx,4000)
    assert deid.table_action(0x60040010, BASIC) is None  # overlay rows: not in the table
    graphics = DeidProfile("graphics", frozenset({"clean-graphics"}))
    assert deid.table_action(0x60023000, graphics) == "C"
    safe = DeidProfile("safe", frozenset({"retain-safe-private"}))
    assert deid.table_action(0x70531000, safe) == "C"


def test_options_override_the_basic_profile_and_the_most_protective_option_wins():
    dates_and_device = DeidProfile(
        "p", frozenset({"retain-device-identity", "retain-longitudinal-modified-dates"})
    )
    # Date of Last Detector Calibration: device identity says K, modified dates says C.
    assert deid.table_action(0x0018700C, BASIC) == "X/D"
    assert deid.table_action(0x0018700C, dates_and_device) == "C"
    assert deid.table_action(0x00081030, DeidProfile("d", {"clean-descriptors"})) == "C"


def test_profiles_are_validated_with_a_clear_error():
    with pytest.raises(ValueError, match="unknown option.*retain-everything"):
        DeidProfile("x", frozenset({"retain-everything"}))
    with pytest.raises(ValueError, match="exclude each other"):
        DeidProfile(
            "x",
            frozenset({"retain-longitudinal-full-dates", "retain-longitudinal-modified-dates"}),
        )
    with pytest.raises(ValueError, match="name"):
        DeidProfile("", frozenset())
    with pytest.raises(ValueError, match="options"):
        DeidProfile("x", "retain-uids")
    assert DeidProfile("x", {"retain-uids"}).options == frozenset({"retain-uids"})
    with pytest.raises(ValueError, match="key"):
        deidentify(ct_small(), BASIC, b"short")
    with pytest.raises(ValueError, match="key"):
        remap_uid("1.2.3", "not bytes")  # type: ignore[arg-type]


# --- every depth -------------------------------------------------------------------------


def nested_dataset() -> Dataset:
    """PHI three levels down in sequences Table E.1-1 does not list."""
    deepest = item(
        PatientName="Deep^Patient",
        OperatorsName="Deep^Operator",
        ReferencedSOPClassUID=CT_IMAGE,
        ReferencedSOPInstanceUID="1.2.826.0.1.3680043.2.1143.555.1",
        StudyDate="20230405",
    )
    level2 = item(ValueType="CONTAINER")
    level2.ContentTemplateSequence = Sequence([item(TemplateIdentifier="1500")])
    level2.add_new(0x00409220, "SQ", Sequence([deepest]))  # Real World Value Mapping Item
    level1 = item(Manufacturer="ACME")
    level1.add_new(0x00409096, "SQ", Sequence([level2]))  # Real World Value Mapping Sequence
    ds = ct_small()
    ds.OperatorsName = "Top^Operator"
    ds.ContributingEquipmentSequence = Sequence([level1])  # unlisted: K, so recursed into
    ds.ReferencedImageSequence = Sequence(
        [item(ReferencedSOPClassUID=CT_IMAGE, ReferencedSOPInstanceUID=ds.SOPInstanceUID)]
    )
    return ds


def test_attributes_three_sequences_deep_are_cleaned_and_their_uids_remapped_consistently():
    ds = nested_dataset()
    original_sop = ds.SOPInstanceUID
    result = deidentify(ds, BASIC, KEY)
    out = result.dataset
    deepest = out.ContributingEquipmentSequence[0][0x00409096].value[0][0x00409220].value[0]
    assert deepest.get("PatientName", "") == ""  # Z
    assert "OperatorsName" not in deepest or deepest.OperatorsName in ("", "DEIDENTIFIED")
    assert "StudyDate" in deepest and deepest.StudyDate == ""
    assert deepest.ReferencedSOPClassUID == CT_IMAGE  # a class, not an instance: kept
    assert deepest.ReferencedSOPInstanceUID == result.uid_map["1.2.826.0.1.3680043.2.1143.555.1"]
    assert out.ContributingEquipmentSequence[0].Manufacturer == "ACME"  # unlisted: kept
    text = all_text(out)
    for phi in ("Deep^Patient", "Deep^Operator", "Top^Operator", "20230405", original_sop):
        assert phi not in text
    assert out.SOPInstanceUID == result.uid_map[original_sop]


# --- private attributes -----------------------------------------------------------------


def with_private(ds: Dataset) -> Dataset:
    philips = ds.private_block(0x7053, "Philips PET Private Group", create=True)
    philips.add_new(0x00, "DS", "0.000123")  # SUV factor: safe
    philips.add_new(0x01, "LO", "PATIENT SECRET")  # not in Table E.3.10-1
    unknown = ds.private_block(0x0009, "ACME SECRET STUFF", create=True)
    unknown.add_new(0x00, "LO", "Doe^John")
    return ds


def test_private_attributes_are_removed_by_the_basic_profile():
    out = deidentify(with_private(ct_small()), BASIC, KEY).dataset
    assert [e.tag for e in out if e.tag.is_private] == []


def test_safe_private_attributes_are_kept_only_with_the_option_and_unknown_creators_removed():
    profile = DeidProfile("safe", frozenset({"retain-safe-private"}))
    out = deidentify(with_private(ct_small()), profile, KEY).dataset
    block = out.private_block(0x7053, "Philips PET Private Group")
    assert block[0x00].value == "0.000123"
    assert 0x70531001 not in out  # same creator, element not listed as safe
    with pytest.raises(KeyError):
        out.private_block(0x0009, "ACME SECRET STUFF")
    assert "PATIENT SECRET" not in all_text(out) and "Doe^John" not in all_text(out)


# --- compound actions and IOD conformance -------------------------------------------------


def dciodvfy_errors(ds: Dataset, path: Path) -> set[str]:
    ds.save_as(path, enforce_file_format=True)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    assert any(line.strip() for line in lines), "dciodvfy printed nothing"
    return {line.strip() for line in lines if line.startswith("Error")}


needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools")


def ct_with_compound_attributes() -> Dataset:
    ds = ct_small()
    ds.InstitutionName = "Seoul General"  # X/Z/D, Type 3 in CT
    ds.OperatorsName = "Kim^Operator"  # X/Z/D, Type 3
    ds.ProtocolName = "Chest for Kim"  # X/D, Type 3
    ds.SeriesDate, ds.SeriesTime = "20040119", "072731"  # X/D, Type 3
    ds.AcquisitionDate = "20040119"  # X/Z, Type 3
    ds.StationName = "CT-ROOM-7"  # X/Z/D, Type 3
    ds.DeviceSerialNumber = "SN12345"  # X/Z/D, Type 3 in the CT IOD
    ds.ContentDate, ds.ContentTime = "20040119", "072731"  # Z/D, Type 2
    ds.ContrastBolusAgent = "Iohexol for Kim"  # Z/D, Type 2
    ds.ReferencedStudySequence = Sequence(  # X/Z, Type 3
        [item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID="1.2.3")]
    )
    return ds


@needs_dciodvfy
def test_ct_type3_compound_attributes_are_removed_type2_emptied_and_dciodvfy_finds_no_new_error(
    tmp_path,
):
    ds = ct_with_compound_attributes()
    before = dciodvfy_errors(ds, tmp_path / "in.dcm")
    out = deidentify(ds, BASIC, KEY).dataset
    for keyword in (
        "InstitutionName",
        "OperatorsName",
        "ProtocolName",
        "SeriesDate",
        "SeriesTime",
        "AcquisitionDate",
        "StationName",
        "DeviceSerialNumber",
        "ReferencedStudySequence",
    ):
        assert keyword not in out, keyword
    for keyword in ("ContentDate", "ContentTime", "ContrastBolusAgent"):
        assert keyword in out and out[keyword].value in ("", None), keyword
    after = dciodvfy_errors(out, tmp_path / "out.dcm")
    assert after - before == set()


def segmentation_of_ct() -> Dataset:
    """A DICOM SEG made by highdicom from CT_small: its ContentDate, ContentTime and Device
    Serial Number are Type 1 (coded Z/D and X/Z/D)."""
    import highdicom as hd
    import numpy as np

    ct = ct_small()
    mask = np.zeros((1, ct.Rows, ct.Columns), dtype=np.uint8)
    mask[0, 10:20, 10:20] = 1
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologic"),
        segmented_property_type=hd.sr.CodedConcept("4147007", "SCT", "Mass"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=[ct],
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ACME",
        manufacturer_model_name="Segmenter",
        software_versions="1",
        device_serial_number="SN-SEG-42",
    )
    return pydicom.dcmread(io.BytesIO(_bytes(seg)))


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@needs_dciodvfy
def test_seg_type1_compound_attributes_get_dummies_and_dciodvfy_finds_no_new_error(tmp_path):
    seg = segmentation_of_ct()
    assert seg.DeviceSerialNumber == "SN-SEG-42" and seg.ContentDate
    before = dciodvfy_errors(seg, tmp_path / "in.dcm")
    out = deidentify(seg, BASIC, KEY).dataset
    assert out.DeviceSerialNumber == "DEIDENTIFIED"  # X/Z/D, Type 1: dummy, not removed
    assert out.ContentDate == "19000101" and out.ContentTime == "000000"  # Z/D, Type 1
    derivation = out.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    # X/Z/U*, Type 2 in SEG: kept with its UIDs replaced, since an empty one would leave the
    # Common Instance Reference Module naming a series that nothing references (dciodvfy).
    source = derivation.SourceImageSequence[0]
    assert source.ReferencedSOPInstanceUID == remap_uid(ct_small().SOPInstanceUID, KEY)
    ref = out.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]  # unlisted: recursed
    assert ref.ReferencedSOPInstanceUID == remap_uid(ct_small().SOPInstanceUID, KEY)
    after = dciodvfy_errors(out, tmp_path / "out.dcm")
    assert after - before == set(), after - before


@pytest.mark.parametrize(
    ("action", "by_type"),
    [
        ("Z/D", {"1": "D", "2": "Z", "3": "Z"}),
        ("X/Z", {"1": "Z", "2": "Z", "3": "X"}),
        ("X/D", {"1": "D", "2": "D", "3": "X"}),
        ("X/Z/D", {"1": "D", "2": "Z", "3": "X"}),
        ("X/Z/U*", {"1": "U", "2": "U", "3": "X"}),  # see the SEG test above
    ],
)
def test_compound_actions_resolve_by_attribute_type(action, by_type):
    for kind, expected in by_type.items():
        assert deid.resolve_compound(action, kind) == expected


def test_attribute_types_come_from_the_iod_and_unknown_ones_take_the_protective_dummy():
    enhanced_ct, ct = "enhanced-ct-image", "ct-image"
    assert deid.attribute_type(enhanced_ct, (0x00181000,)) == "1"  # Device Serial Number
    assert deid.attribute_type(ct, (0x00181000,)) == "3"
    assert deid.attribute_type(ct, (0x00100020,)) == "2"  # Patient ID
    assert deid.attribute_type(ct, (0x00081072, 0x00080080)) == "1"  # Institution in operator
    assert deid.attribute_type(ct, (0x22000005,)) == "3"
    # Not tabulated anywhere at this depth: Type 1, so X/D gives a dummy, never a removal that
    # could break a required attribute.
    assert deid.attribute_type(ct, (0x00091010, 0x00181030)) in ("1", "2")
    assert deid.attribute_type(None, (0x00081010,)) in ("1", "2", "3")


# --- marks and file meta ------------------------------------------------------------------


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_marks_and_cid_7050_codes_for_each_option(option):
    profile = DeidProfile(f"with {option}", frozenset({option}))
    out = deidentify(ct_small(), profile, KEY).dataset
    assert out.PatientIdentityRemoved == "YES"
    codes = [
        (i.CodeValue, i.CodingSchemeDesignator) for i in out.DeidentificationMethodCodeSequence
    ]
    assert codes == [("113100", "DCM"), (OPTIONS[option], "DCM")]
    meanings = [i.CodeMeaning for i in out.DeidentificationMethodCodeSequence]
    assert meanings[0] == "Basic Application Confidentiality Profile"
    assert meanings[1].endswith("Option")
    assert f"with {option}" in out.DeidentificationMethod[0]
    expected = {
        "retain-longitudinal-full-dates": "UNMODIFIED",
        "retain-longitudinal-modified-dates": "MODIFIED",
    }.get(option, "REMOVED")
    assert out.LongitudinalTemporalInformationModified == expected
    assert ("BurnedInAnnotation" in out) == (option == "clean-pixel-data")
    if option == "clean-pixel-data":
        assert out.BurnedInAnnotation == "NO"
    assert ("RecognizableVisualFeatures" in out) == (option == "clean-recognizable-visual-features")
    if option == "clean-recognizable-visual-features":
        assert out.RecognizableVisualFeatures == "NO"


def test_file_meta_is_rebuilt_and_no_preamble_content_leaks(tmp_path):
    ds = ct_small()
    ds.preamble = b"PATIENT Doe^John MRN 12345".ljust(128, b"\0")
    ds.file_meta.SourceApplicationEntityTitle = "HOSPITAL_PACS"
    ds.file_meta.ImplementationVersionName = "VENDOR_1"
    original_sop = ds.SOPInstanceUID
    result = deidentify(ds, BASIC, KEY)
    meta = result.dataset.file_meta
    assert meta.MediaStorageSOPInstanceUID == result.dataset.SOPInstanceUID != original_sop
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert meta.ImplementationClassUID == deid.IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName.startswith("DICOMNODE_")
    assert "SourceApplicationEntityTitle" not in meta
    path = tmp_path / "out.dcm"
    result.dataset.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    assert raw[:128] == b"\0" * 128 and raw[128:132] == b"DICM"
    assert b"Doe^John" not in raw and b"HOSPITAL_PACS" not in raw
    assert original_sop.encode() not in raw


def test_the_input_dataset_is_not_changed():
    ds = nested_dataset()
    before = _bytes(ds)
    deidentify(ds, DeidProfile("all", frozenset(OPTIONS) - {"retain-longitudinal-full-dates"}), KEY)
    assert _bytes(ds) == before


# --- keyed UIDs and pseudonyms -------------------------------------------------------------


def test_same_input_key_and_scope_give_the_same_uids_and_pseudonym():
    first = deidentify(ct_small(), BASIC, KEY, scope="recipient-a")
    again = deidentify(ct_small(), BASIC, KEY, scope="recipient-a")
    assert first.uid_map == again.uid_map and first.uid_map
    assert first.patient_pseudonym == again.patient_pseudonym == first.dataset.PatientID
    assert first.dataset.PatientID != ct_small().PatientID


def test_another_key_or_scope_gives_other_uids_and_pseudonym():
    base = deidentify(ct_small(), BASIC, KEY, scope="a")
    other_key = deidentify(ct_small(), BASIC, OTHER_KEY, scope="a")
    other_scope = deidentify(ct_small(), BASIC, KEY, scope="b")
    for other in (other_key, other_scope):
        assert set(other.uid_map) == set(base.uid_map)
        assert not set(other.uid_map.values()) & set(base.uid_map.values())
        assert other.patient_pseudonym != base.patient_pseudonym


def test_replacement_uids_are_valid_2_25_uids_and_keyed():
    uid = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    new = remap_uid(uid, KEY)
    assert new.startswith("2.25.") and len(new) <= 64 and new.replace(".", "").isdigit()
    assert pydicom.uid.UID(new).is_valid
    # An unkeyed hash of the original would let anyone confirm it; ours differs per key.
    assert remap_uid(uid, OTHER_KEY) != new
    import hashlib

    assert str(int(hashlib.md5(uid.encode()).hexdigest(), 16)) not in new
    assert str(int(hashlib.sha256(uid.encode()).hexdigest()[:32], 16)) not in new


def test_retain_uids_keeps_them():
    ds = ct_small()
    out = deidentify(ds, DeidProfile("uids", {"retain-uids"}), KEY)
    assert out.dataset.SOPInstanceUID == ds.SOPInstanceUID
    assert out.dataset.StudyInstanceUID == ds.StudyInstanceUID
    assert out.uid_map == {}


# --- dates --------------------------------------------------------------------------------


def study_of(patient_id: str, study_date: str, birth: str = "19600202") -> Dataset:
    ds = ct_small()
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.AcquisitionDateTime = f"{study_date}101010.5+0900"
    return ds


def _day(text: str):
    from datetime import date

    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def test_modified_dates_keep_the_interval_between_two_studies_of_one_patient():
    profile = DeidProfile("dates", {"retain-longitudinal-modified-dates"})
    first = deidentify(study_of("P1", "20200110"), profile, KEY)
    second = deidentify(study_of("P1", "20230301"), profile, KEY)
    other_patient = deidentify(study_of("P2", "20200110"), profile, KEY)
    a, b = first.dataset, second.dataset
    assert first.date_shift_days == second.date_shift_days != 0
    assert other_patient.date_shift_days != first.date_shift_days
    assert a.StudyDate != "20200110" and b.StudyDate != "20230301"  # absolute dates differ
    assert (_day(b.StudyDate) - _day(a.StudyDate)).days == (
        _day("20230301") - _day("20200110")
    ).days
    assert a.SeriesDate == a.StudyDate == a.ContentDate
    assert a.AcquisitionDateTime == a.StudyDate + "101010.5+0900"  # time of day kept
    assert (_day(a.StudyDate) - _day("20200110")).days == first.date_shift_days
    assert a.PatientBirthDate == ""  # Z in every column
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"


def test_full_dates_keep_them_and_the_basic_profile_removes_or_empties_them():
    full = deidentify(
        study_of("P1", "20200110"), DeidProfile("f", {"retain-longitudinal-full-dates"}), KEY
    )
    assert full.dataset.StudyDate == "20200110" and full.dataset.SeriesDate == "20200110"
    assert full.date_shift_days == 0
    basic = deidentify(study_of("P1", "20200110"), BASIC, KEY).dataset
    assert basic.StudyDate == ""  # Z
    assert "SeriesDate" not in basic  # X/D, Type 3 in CT
    assert "AcquisitionDateTime" not in basic  # X/Z/D, Type 3 in CT
    assert "20200110" not in all_text(basic)


# --- the burned-in text gate --------------------------------------------------------------


def ultrasound(flag: str | None = None) -> Dataset:
    ds = ct_small()
    ds.SOPClassUID = US_IMAGE
    ds.Modality = "US"
    if flag is not None:
        ds.BurnedInAnnotation = flag
    return ds


def test_an_ultrasound_image_without_the_flag_is_held_unless_pixels_were_cleaned():
    held = deidentify(ultrasound(), BASIC, KEY)
    assert held.held and "US" in held.held and "missing" in held.held
    cleaned = deidentify(ultrasound(), DeidProfile("px", {"clean-pixel-data"}), KEY)
    assert cleaned.held is None and cleaned.dataset.BurnedInAnnotation == "NO"


def test_burned_in_yes_is_held_a_plain_ct_is_not_and_projection_images_need_the_flag():
    ct = ct_small()
    assert deidentify(ct, BASIC, KEY).held is None
    ct.BurnedInAnnotation = "YES"
    assert "YES" in deidentify(ct, BASIC, KEY).held
    dx = ct_small()
    dx.Modality = "DX"
    assert "DX" in deidentify(dx, BASIC, KEY).held
    dx.BurnedInAnnotation = "NO"
    assert deidentify(dx, BASIC, KEY).held is None
    assert deidentify(ultrasound("NO"), BASIC, KEY).held  # US: the flag is not trusted
    report = Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    report.Modality = "SR"
    assert deidentify(report, BASIC, KEY).held is None  # no pixels, nothing burned in


# --- conformance statement ----------------------------------------------------------------


def test_conformance_statement_lists_removed_replaced_inserted_options_and_uid_scope():
    profile = DeidProfile("research", {"retain-longitudinal-modified-dates", "retain-safe-private"})
    statement = conformance_statement(profile)
    json.dumps(statement)  # plain data
    names = lambda key: {row["name"] for row in statement[key]}  # noqa: E731
    assert "Patient's Address" in names("removed")
    assert "Patient's Name" in names("replaced_with_zero_length")
    assert "SOP Instance UID" in names("uid_replaced")
    assert "Study Date" in names("cleaned")  # modified dates
    assert "Institution Name" in {row["name"] for row in statement["resolved_by_type"]}
    assert "Person Name" in names("replaced_with_dummy")
    assert statement["options"] == sorted(profile.options)
    assert [m["code"] for m in statement["methods"]] == ["113100", "113107", "113111"]
    assert "PatientIdentityRemoved" in statement["inserted_attributes"]
    assert "scope" in statement["uid_scope"] and "HMAC-SHA256" in statement["uid_scope"]
    assert "does not clean pixel data" in statement["pixel_data"]
    assert "2024b" in statement["standard"]
    assert statement["table_sha256"] == deid.TABLE_SHA256 and len(deid.TABLE_SHA256) == 64
    assert "Table E.3.10-1" in statement["private_attributes"]
    total = sum(
        len(statement[k])
        for k in ("removed", "replaced_with_zero_length", "replaced_with_dummy", "uid_replaced",
                  "kept", "cleaned", "resolved_by_type")
    )  # fmt: skip
    assert total == len(deid.TABLE)


# --- regressions of other libraries --------------------------------------------------------


def test_deid_102_phi_inside_a_sequence_is_replaced():
    ds = ct_small()
    ds.RequestAttributesSequence = Sequence([item(RequestedProcedureID="RP-Kim-1")])  # X
    ds.ProcedureCodeSequence = Sequence(  # unlisted sequence: its items still follow the table
        [item(CodeValue="X1", CodingSchemeDesignator="99L", CodeMeaning="CT", PatientName="Kim")]
    )
    out = deidentify(ds, BASIC, KEY).dataset
    assert "RequestAttributesSequence" not in out
    assert out.ProcedureCodeSequence[0].PatientName == ""
    assert out.ProcedureCodeSequence[0].CodeValue == "X1"


def test_deid_153_uids_in_referenced_series_sequences_are_remapped_like_the_top_level():
    first, second = ct_small(), ct_small()
    second.SOPInstanceUID = "1.2.826.0.1.3680043.2.1143.7.2"
    second.ReferencedSeriesSequence = Sequence(  # unlisted: recursed into
        [
            item(
                SeriesInstanceUID=first.SeriesInstanceUID,
                ReferencedInstanceSequence=Sequence(
                    [
                        item(
                            ReferencedSOPClassUID=CT_IMAGE,
                            ReferencedSOPInstanceUID=first.SOPInstanceUID,
                        )
                    ]
                ),
            )
        ]
    )
    out_first = deidentify(first, BASIC, KEY).dataset
    ref = deidentify(second, BASIC, KEY).dataset.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == out_first.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == out_first.SOPInstanceUID


def test_deid_259_sequences_are_processed_not_passed_untouched_and_uids_not_dropped():
    ds = ct_small()
    ds.ContributingEquipmentSequence = Sequence(
        [item(InstitutionName="Seoul General", Manufacturer="ACME", OperatorsName="Lee^Op")]
    )
    ds.ReferencedImageSequence = Sequence(
        [item(ReferencedSOPClassUID=CT_IMAGE, ReferencedSOPInstanceUID="1.2.3.4.5")]
    )
    out = deidentify(ds, DeidProfile("uids", {"retain-uids"}), KEY).dataset
    kept = out.ContributingEquipmentSequence[0]
    assert kept.Manufacturer == "ACME" and kept.get("InstitutionName") in (None, "", "DEIDENTIFIED")
    assert "Seoul General" not in all_text(out) and "Lee^Op" not in all_text(out)
    # Retain UIDs keeps the reference sequence (K) with its UIDs, instead of dropping them.
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "1.2.3.4.5"


def test_pymedphys_922_listed_attributes_in_nested_unlisted_sequences_are_found():
    ds = nested_dataset()
    out = deidentify(ds, BASIC, KEY).dataset
    found = {keyword_for_tag(tag): value for tag, value in all_values(out)}
    assert found.get("PatientName") in ("", None)
    assert "Deep^Operator" not in found.values()


def test_fo_dicom_610_sequences_coded_x_are_removed_not_kept_empty():
    ds = ct_small()
    ds.OtherPatientIDsSequence = Sequence([item(PatientID="OTHER-1", IssuerOfPatientID="H")])
    ds.ReferringPhysicianIdentificationSequence = Sequence([item(InstitutionName="Clinic")])
    ds.IconImageSequence = Sequence([item(Rows=8, Columns=8)])
    out = deidentify(ds, BASIC, KEY).dataset
    for keyword in ("OtherPatientIDsSequence", "ReferringPhysicianIdentificationSequence",
                    "IconImageSequence"):  # fmt: skip
        assert keyword not in out


def test_fo_dicom_1214_patient_identity_removed_and_method_code_sequence_are_added():
    out = deidentify(ct_small(), BASIC, KEY).dataset
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.DeidentificationMethod


def test_kitware_41_directory_records_of_a_dicomdir_are_de_identified():
    image = ct_small()
    record_patient = item(DirectoryRecordType="PATIENT", PatientName="Doe^John", PatientID="MRN7")
    record_study = item(
        DirectoryRecordType="STUDY",
        StudyDate="20040119",
        StudyTime="072730",
        StudyDescription="Chest of John",
        StudyInstanceUID=image.StudyInstanceUID,
        AccessionNumber="ACC-77",
    )
    record_image = item(
        DirectoryRecordType="IMAGE",
        ReferencedSOPClassUIDInFile=CT_IMAGE,
        ReferencedSOPInstanceUIDInFile=image.SOPInstanceUID,
    )
    directory = Dataset()
    directory.FileSetID = "SET"
    directory.DirectoryRecordSequence = Sequence([record_patient, record_study, record_image])
    directory.file_meta = FileMetaDataset()
    directory.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    directory.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.2.1143.9"
    directory.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = deidentify(directory, BASIC, KEY).dataset
    records = out.DirectoryRecordSequence
    text = all_text(out)
    for phi in ("Doe^John", "MRN7", "20040119", "Chest of John", "ACC-77", image.SOPInstanceUID):
        assert phi not in text
    assert records[0].PatientID == deid.patient_pseudonym("MRN7", KEY)
    image_out = deidentify(image, BASIC, KEY).dataset
    assert records[1].StudyInstanceUID == image_out.StudyInstanceUID
    assert records[2].ReferencedSOPInstanceUIDInFile == image_out.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == remap_uid(
        "1.2.826.0.1.3680043.2.1143.9", KEY
    )


def test_idiscore_147_file_meta_elements_are_not_left_with_original_values():
    ds = ct_small()
    ds.file_meta.SourceApplicationEntityTitle = "SOURCE_AE"
    ds.file_meta.SendingApplicationEntityTitle = "SENDER_AE"
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3.999"
    ds.file_meta.PrivateInformation = b"Doe^John"
    original = ds.file_meta.MediaStorageSOPInstanceUID
    meta = deidentify(ds, BASIC, KEY).dataset.file_meta
    values = {str(e.value) for e in meta}
    assert not {"SOURCE_AE", "SENDER_AE", "1.2.3.999", original} & values
    assert "PrivateInformation" not in meta and "SendingApplicationEntityTitle" not in meta


def test_clean_descriptors_keeps_the_text_without_the_identifiers_found_in_the_object():
    ds = ct_small()
    ds.PatientName = "Smith^Jane"
    ds.StudyDescription = "CT chest abdomen pelvis - 55F Dr. Smith"
    out = deidentify(ds, DeidProfile("desc", {"clean-descriptors"}), KEY).dataset
    assert out.StudyDescription.startswith("CT chest abdomen pelvis")
    assert "Smith" not in out.StudyDescription
    assert "StudyDescription" not in deidentify(ds, BASIC, KEY).dataset  # X without the option


def test_a_dummy_sequence_replaces_text_it_holds_even_where_the_table_does_not_list_it():
    ds = ct_small()
    ds.add_new(0x00401101, "SQ", Sequence(  # Person Identification Code Sequence: D
        [item(CodeValue="EMP-4711", CodingSchemeDesignator="HOSP", CodeMeaning="Kim Nurse")]
    ))  # fmt: skip
    out = deidentify(ds, BASIC, KEY).dataset
    code = out[0x00401101].value[0]
    assert code.CodeValue == "DEIDENTIFIED" and code.CodeMeaning == "DEIDENTIFIED"


# --- property: nothing the table protects survives, at any depth ----------------------------

_PROTECTED_LEAVES = []
_CONTAINERS = [0x0018A001, 0x00081115, 0x00400260]  # unlisted sequences: recursed into
for _entry in deid.TABLE:
    if _entry.tag in deid._PATTERNS or _entry.tag[:4] in ("0000", "0002"):
        continue
    _tag = int(_entry.tag, 16)
    try:
        _vr = dictionary_VR(_tag).split(" ")[0]
    except KeyError:
        continue
    if _vr == "SQ":
        _CONTAINERS.append(_tag)
    elif _vr in ("DA", "DT", "TM", "UI", "PN", "LO", "SH", "ST", "LT", "UT", "UC", "AE", "CS",
                 "DS", "IS", "US", "AS", "UR"):  # fmt: skip
        _PROTECTED_LEAVES.append((_tag, _vr))


def _value_for(vr: str, n: int) -> str | int:
    """A distinctive value of `vr` that no dummy equals."""
    if vr == "DA":
        return f"{2000 + n % 20}{1 + n % 12:02d}{1 + n % 28:02d}"
    if vr == "DT":
        return f"{2000 + n % 20}0102{n % 24:02d}3000"
    if vr == "TM":
        return f"{1 + n % 23:02d}{n % 60:02d}17"
    if vr == "UI":
        return f"1.2.826.0.1.3680043.2.1143.{n + 1}"
    if vr in ("DS", "IS"):
        return str(n + 7)
    if vr == "US":
        return n % 60000 + 1
    if vr == "AS":
        return f"{n % 99 + 1:03d}Y"
    if vr == "CS":
        return f"CS{n}"[:16]
    if vr == "AE":
        return f"AE{n}"[:16]
    if vr == "UR":
        return f"http://h{n}.example/x"
    if vr == "PN":
        return f"Name{n}^Given{n}"
    return f"V{n:06d}"[:16]


@st.composite
def _datasets(draw, depth: int = 0) -> Dataset:
    ds = Dataset()
    for tag, vr in draw(st.lists(st.sampled_from(_PROTECTED_LEAVES), min_size=4, max_size=30)):
        ds.add_new(tag, vr, _value_for(vr, draw(st.integers(0, 10**6))))
    if depth < 3:
        for container in draw(st.lists(st.sampled_from(_CONTAINERS), max_size=2)):
            children = draw(st.lists(_datasets(depth + 1), min_size=1, max_size=2))
            ds.add_new(container, "SQ", Sequence(children))
    return ds


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=_datasets(),
    options=st.frozensets(
        st.sampled_from(sorted(set(OPTIONS) - {"retain-longitudinal-full-dates"}))
    ),
    sop_class=st.sampled_from([CT_IMAGE, US_IMAGE, "1.2.840.10008.5.1.4.1.1.88.33", "1.9.9"]),
)
def test_no_attribute_the_table_protects_keeps_its_value_anywhere(body, options, sop_class):
    body.SOPClassUID = sop_class
    profile = DeidProfile("random", options)
    out = deidentify(body, profile, KEY).dataset
    survived = set(all_values(out))
    leaks = []
    for elem in body.iterall():
        if elem.VR == "SQ" or elem.value in (None, ""):
            continue
        action = deid.table_action(elem.tag, profile)
        if action is None or action in ("K", "C"):
            continue  # kept or cleaned by an option: not protected by a removal or dummy
        if (int(elem.tag), str(elem.value)) in survived:
            leaks.append((keyword_for_tag(elem.tag), action, elem.value))
    assert leaks == []
