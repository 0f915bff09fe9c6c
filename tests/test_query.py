"""Query matching (PS3.4 C.2.2.2), the engine behind C-FIND and QIDO-RS.

A fixed archive of generated studies is searched with hand-written cases for each matching
kind and with Hypothesis-generated queries whose answers are compared with a plain-Python
reading of the standard's rules. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import fnmatch
import random
from dataclasses import dataclass
from io import BytesIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from dicomnode.archive import Archive
from dicomnode.archive.received import from_part10
from dicomnode.core.errors import InvalidInput, InvalidUID
from dicomnode.core.model import Level, Query, Source
from tests.conftest import open_archive
from tests.factory import make_ct

NAMES = ["Doe^Jane", "Doe^John", "Park^Jisoo", "O'Neil^Sean", "Kim^Minsu", "doe^jim", "홍^길동"]
MODALITIES = ["CT", "MR", "PT", "SEG", "SR"]
DATES = ["20230101", "20230615", "20240101", "20240315", "20241231", "20250704"]
TIMES = ["000000", "083000", "101500.5", "120000", "235959"]


@dataclass(frozen=True)
class Record:
    """One generated instance's attributes, as the reference matcher sees them."""

    patient_id: str
    patient_name: str
    study_uid: str
    study_date: str
    study_time: str
    accession: str
    series_uid: str
    modality: str
    series_number: int
    sop_uid: str
    instance_number: int


def _generate(rng: random.Random) -> list[Record]:
    records = []
    for p, name in enumerate(NAMES):
        patient_id = f"P{p:03d}"
        for _s in range(rng.randint(1, 3)):
            study = (
                generate_uid(),
                rng.choice(DATES),
                rng.choice(TIMES),
                f"A{rng.randint(0, 99):02d}",
            )
            for n in range(rng.randint(1, 3)):
                series_uid, modality = generate_uid(), rng.choice(MODALITIES)
                for i in range(rng.randint(1, 3)):
                    records.append(
                        Record(
                            patient_id,
                            name,
                            *study,
                            series_uid,
                            modality,
                            n + 1,
                            generate_uid(),
                            i + 1,
                        )
                    )
    return records


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def searched(request, tmp_path_factory):
    """(archive, records): one generated archive per back end, searched by every test here."""
    folder = tmp_path_factory.mktemp("query")
    url = (
        f"sqlite:///{folder / 'index.sqlite'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres").create_database()
    )
    archive = open_archive(folder / "data", url)
    records = _generate(random.Random(1573))
    for r in records:
        ds = make_ct(
            r.patient_id,
            r.patient_name,
            study_uid=r.study_uid,
            series_uid=r.series_uid,
            sop_uid=r.sop_uid,
            instance_number=r.instance_number,
            size=8,
            StudyDate=r.study_date,
            StudyTime=r.study_time,
            AccessionNumber=r.accession,
            Modality=r.modality,
            SeriesNumber=r.series_number,
            SpecificCharacterSet="ISO_IR 192",
        )
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        archive.store(from_part10(buffer.getvalue()), Source("cli"))
    yield archive, records
    archive.close()


def uids(archive: Archive, level: Level, **filters: str) -> set[str]:
    key = {
        Level.PATIENT: "PatientID",
        Level.STUDY: "StudyInstanceUID",
        Level.SERIES: "SeriesInstanceUID",
    }
    keyword = key.get(level, "SOPInstanceUID")
    return {row[keyword] for row in archive.search(Query.build(level, filters))}


def test_universal_matching_returns_everything_and_the_value(searched):
    archive, records = searched
    rows = archive.search(Query.build(Level.STUDY, {"PatientName": ""}, ["PatientName"]))
    assert {r["StudyInstanceUID"] for r in rows} == {r.study_uid for r in records}
    assert all(r["PatientName"] for r in rows)


def test_single_value_and_wildcards(searched):
    archive, records = searched
    assert uids(archive, Level.PATIENT, PatientID="P001") == {"P001"}
    assert uids(archive, Level.PATIENT, PatientName="Doe^J*") == {
        r.patient_id
        for r in records
        if r.patient_name.lower().startswith("doe^j")  # PN folds case
    }
    assert uids(archive, Level.PATIENT, PatientID="P00?") == {r.patient_id for r in records}
    assert uids(archive, Level.PATIENT, PatientName="NOBODY*") == set()


def test_person_names_match_case_insensitively_and_in_korean(searched):
    archive, records = searched
    expected = {r.patient_id for r in records if r.patient_name.lower().startswith("doe^")}
    assert uids(archive, Level.PATIENT, PatientName="DOE^*") == expected
    korean = {r.patient_id for r in records if r.patient_name == "홍^길동"}
    assert korean and uids(archive, Level.PATIENT, PatientName="홍^길동") == korean


def test_uid_lists(searched):
    archive, records = searched
    wanted = {records[0].study_uid, records[-1].study_uid}
    assert uids(archive, Level.STUDY, StudyInstanceUID="\\".join(wanted)) == wanted


def test_date_ranges(searched):
    archive, records = searched
    studies = {(r.study_uid, r.study_date) for r in records}
    assert uids(archive, Level.STUDY, StudyDate="20240101-20241231") == {
        u for u, d in studies if "20240101" <= d <= "20241231"
    }
    assert uids(archive, Level.STUDY, StudyDate="20240315-") == {
        u for u, d in studies if d >= "20240315"
    }
    assert uids(archive, Level.STUDY, StudyDate="-20230615") == {
        u for u, d in studies if d <= "20230615"
    }
    assert uids(archive, Level.STUDY, StudyDate="20240315") == {
        u for u, d in studies if d == "20240315"
    }


def test_time_values_name_their_whole_span(searched):
    archive, records = searched
    studies = {(r.study_uid, r.study_time) for r in records}
    assert uids(archive, Level.STUDY, StudyTime="10") == {
        u for u, t in studies if t.startswith("10")
    }
    assert uids(archive, Level.STUDY, StudyTime="0800-1200") == {
        u for u, t in studies if "080000" <= t <= "120059.999999"
    }


def test_modalities_in_study_and_counts(searched):
    archive, records = searched
    rows = archive.search(
        Query.build(
            Level.STUDY,
            {"ModalitiesInStudy": "MR"},
            ["ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"],
        )
    )
    expected = {r.study_uid for r in records if r.modality == "MR"}
    assert {row["StudyInstanceUID"] for row in rows} == expected
    for row in rows:
        mine = [r for r in records if r.study_uid == row["StudyInstanceUID"]]
        assert row["ModalitiesInStudy"].split("\\") == sorted({r.modality for r in mine})
        assert row["NumberOfStudyRelatedSeries"] == len({r.series_uid for r in mine})
        assert row["NumberOfStudyRelatedInstances"] == len(mine)


def test_patient_and_series_counts(searched):
    archive, records = searched
    (patient,) = archive.search(
        Query.build(
            Level.PATIENT,
            {"PatientID": "P000"},
            [
                "NumberOfPatientRelatedStudies",
                "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances",
            ],
        )
    )
    mine = [r for r in records if r.patient_id == "P000"]
    assert patient["NumberOfPatientRelatedStudies"] == len({r.study_uid for r in mine})
    assert patient["NumberOfPatientRelatedSeries"] == len({r.series_uid for r in mine})
    assert patient["NumberOfPatientRelatedInstances"] == len(mine)
    series = archive.search(Query.build(Level.SERIES, {}, ["NumberOfSeriesRelatedInstances"]))
    for row in series:
        assert row["NumberOfSeriesRelatedInstances"] == sum(
            r.series_uid == row["SeriesInstanceUID"] for r in records
        )


def test_relational_keys_and_instance_level(searched):
    archive, records = searched
    target = records[0]
    rows = archive.search(
        Query.build(
            Level.IMAGE,
            {"StudyInstanceUID": target.study_uid, "InstanceNumber": "1"},
            ["SOPClassUID", "AvailableTransferSyntaxUID", "PatientName"],
        )
    )
    expected = {
        r.sop_uid for r in records if r.study_uid == target.study_uid and r.instance_number == 1
    }
    assert {r["SOPInstanceUID"] for r in rows} == expected
    assert all(r["AvailableTransferSyntaxUID"] == "1.2.840.10008.1.2.1" for r in rows)
    assert all(r["PatientName"] == target.patient_name for r in rows)


def test_keys_the_index_does_not_hold_come_back_empty(searched):
    archive, _ = searched
    rows = archive.search(Query.build(Level.STUDY, {}, ["StudyComments"], limit=1))
    assert rows and rows[0]["StudyComments"] is None


def test_limit_and_offset_page_through_results(searched):
    archive, records = searched
    everything = [r["StudyInstanceUID"] for r in archive.search(Query.build(Level.STUDY))]
    pages = [
        r["StudyInstanceUID"]
        for offset in range(0, len(everything), 4)
        for r in archive.search(Query.build(Level.STUDY, limit=4, offset=offset))
    ]
    assert pages == everything and len(set(everything)) == len({r.study_uid for r in records})


@pytest.mark.parametrize(
    ("filters", "error"),
    [
        ({"StudyDate": "2024-01-01-2025"}, InvalidInput),
        ({"StudyDate": "yesterday"}, InvalidInput),
        ({"InstanceNumber": "one"}, InvalidInput),
        ({"StudyInstanceUID": "1.2.3/../x"}, InvalidUID),
    ],
)
def test_malformed_match_values_are_refused(searched, filters, error):
    archive, _ = searched
    with pytest.raises(error):
        archive.search(Query.build(Level.IMAGE, filters))


# --- Property: the SQL engine agrees with a plain reading of the rules --------------------


def _wildcard(pattern: str, value: str, fold: bool) -> bool:
    if fold:
        pattern, value = pattern.lower(), value.lower()
    translated = pattern.replace("[", "[[]")
    return fnmatch.fnmatchcase(value, translated)


def _reference_match(record: Record, filters: dict[str, str]) -> bool:
    for keyword, value in filters.items():
        if keyword == "PatientName" and not _wildcard(value, record.patient_name, fold=True):
            return False
        if keyword == "PatientID" and not _wildcard(value, record.patient_id, fold=False):
            return False
        if keyword == "AccessionNumber" and not _wildcard(value, record.accession, fold=False):
            return False
        if keyword == "StudyDate":
            low, _, high = value.partition("-") if "-" in value else (value, "", value)
            if (low and record.study_date < low) or (high and record.study_date > high):
                return False
        if keyword == "ModalitiesInStudy" and value not in _modalities[record.study_uid]:
            return False
    return True


_modalities: dict[str, set[str]] = {}

name_patterns = st.sampled_from(["Doe^*", "*^J*", "KIM^MINSU", "*", "?oe^J*", "홍*", "p*", "*s*"])
id_patterns = st.sampled_from(["P000", "P00?", "P*", "*1", "X*"])
accessions = st.integers(0, 99).map(lambda n: f"A{n:02d}") | st.sampled_from(["A1*", "A?5", "*"])
dates = st.sampled_from(DATES + ["20200101", "20991231"])
date_values = (
    dates
    | st.tuples(dates, dates).map(lambda d: f"{min(d)}-{max(d)}")
    | dates.map(lambda d: f"{d}-")
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    filters=st.fixed_dictionaries(
        {},
        optional={
            "PatientName": name_patterns,
            "PatientID": id_patterns,
            "AccessionNumber": accessions,
            "StudyDate": date_values,
            "ModalitiesInStudy": st.sampled_from(MODALITIES),
        },
    )
)
def test_study_search_agrees_with_the_reference_rules(searched, filters):
    archive, records = searched
    _modalities.clear()
    for r in records:
        _modalities.setdefault(r.study_uid, set()).add(r.modality)
    expected = {r.study_uid for r in records if _reference_match(r, filters)}
    assert uids(archive, Level.STUDY, **filters) == expected
