"""DICOMweb as a PACS or a script uses it: dicomweb-client (and raw HTTP where the exact headers
or body matter) against a real node on loopback, on SQLite and on PostgreSQL.

STOW-RS stores and answers per part; QIDO-RS searches at every level; WADO-RS gives back what
was stored (as stored or decompressed), its metadata with bulk data, frames, rendered images
and thumbnails; DELETE removes rows and blobs; bad requests get a 4xx and change nothing.
"""

from __future__ import annotations

import http.client
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import openjpeg
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)
from requests import HTTPError

from tests.conftest import ALL_SCOPES, dicomweb_client, dicomweb_url, token_for
from tests.factory import make_ct, part10

MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC Image
JPEG2000 = "1.2.840.10008.1.2.4.91"
DUPLICATE_SOP_INSTANCE = 0x0111
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

# --- helpers ----------------------------------------------------------------------------


def as_file(ds: Dataset) -> Dataset:
    """`ds` as a PACS would read it from disk: a Part 10 file with preamble and file meta
    (dicomweb-client writes a data set as it is; one made in memory has no preamble)."""
    return pydicom.dcmread(BytesIO(part10(ds)))


def ct(**attributes: object) -> Dataset:
    """A small CT instance (8x8 unless `size` says otherwise), ready to send."""
    attributes.setdefault("size", 8)
    return as_file(make_ct(**attributes))


def bundled(name: str) -> Dataset:
    """A file bundled with pydicom (never downloaded: the tests stay on loopback)."""
    path = Path(pydicom.data.__file__).parent / "test_files" / name
    assert path.is_file(), f"{name} is not bundled with this pydicom"
    return pydicom.dcmread(path)


def multiframe(
    frames: int = 5, size: int = 32, transfer_syntax: str | None = None, **attributes: object
) -> tuple[Dataset, np.ndarray]:
    """A Multi-frame Grayscale Word SC instance with random 12-bit frames; and its frames."""
    ds = make_ct(size=size, **attributes)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_WORD_SC
    ds.Modality = "OT"
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 100
    pixels = np.random.default_rng(frames * size).integers(
        0, 4096, (frames, size, size), dtype=np.uint16
    )
    ds.PixelData = pixels.tobytes()
    if transfer_syntax is not None:
        ds.compress(transfer_syntax)
    return as_file(ds), pixels


def value(result: dict, keyword: str) -> object:
    """The first value of `keyword` in a DICOM JSON object (None when absent or empty)."""
    entry = result.get(f"{tag_for_keyword(keyword):08X}")
    if not entry or not entry.get("Value"):
        return None
    first = entry["Value"][0]
    return first["Alphabetic"] if isinstance(first, dict) and "Alphabetic" in first else first


def values(results: list[dict], keyword: str) -> list:
    return [value(r, keyword) for r in results]


def has(result: dict, keyword: str) -> bool:
    return f"{tag_for_keyword(keyword):08X}" in result


def headers_for(node, scopes=ALL_SCOPES, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(node, scopes)}", **extra}


def get(node, path: str, scopes=ALL_SCOPES, **headers: str) -> requests.Response:
    """GET `path` (below /dicomweb, query string included as written) with a token."""
    return requests.get(
        dicomweb_url(node) + path, headers=headers_for(node, scopes, **headers), timeout=30
    )


def delete(node, path: str, scopes=ALL_SCOPES) -> requests.Response:
    return requests.delete(dicomweb_url(node) + path, headers=headers_for(node, scopes), timeout=30)


def post(node, path: str, body: bytes, content_type: str) -> requests.Response:
    return requests.post(
        dicomweb_url(node) + path,
        data=body,
        headers=headers_for(node, **{"Content-Type": content_type}),
        timeout=30,
    )


def raw_request(node, method: str, path: str) -> int:
    """The status of a request whose path is sent byte for byte (no client normalises `..`)."""
    connection = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=30)
    try:
        connection.request(method, path, headers=headers_for(node))
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


BOUNDARY = "dicomnode-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def multipart(parts: list[bytes], part_type: str = "application/dicom") -> bytes:
    """A complete multipart/related body with one part per item of `parts`."""
    body = b""
    for part in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def stow(node, datasets: list[Dataset], study: str | None = None) -> requests.Response:
    path = f"/studies/{study}" if study else "/studies"
    return post(node, path, multipart([part10(ds) for ds in datasets]), STOW_TYPE)


def blob_files(node) -> dict[str, bytes]:
    """Every stored blob file (relative path -> content)."""
    root = node.archive.blobs.root
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*.dcm")
        if p.relative_to(root).parts[0] != "tmp"
    }


def snapshot(node) -> tuple[dict[str, int], dict[str, bytes]]:
    return node.archive.counts(), blob_files(node)


def sequence_uids(response: Dataset, keyword: str) -> list[str]:
    return [item.ReferencedSOPInstanceUID for item in response.get(keyword, [])]


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(BytesIO(data))
    image.load()
    return image


def http_status(error: pytest.ExceptionInfo) -> int:
    return error.value.response.status_code


@pytest.fixture
def node(start_node):
    return start_node()


@pytest.fixture
def client(node):
    return dicomweb_client(node)


# --- STOW-RS ----------------------------------------------------------------------------


def test_stow_stores_generated_and_compressed_instances(node, client):
    study, series = generate_uid(), generate_uid()
    generated = [
        ct(study_uid=study, series_uid=series, instance_number=n, seed=n) for n in (1, 2, 3)
    ]
    jpeg2000, rle = bundled("JPEG2000.dcm"), bundled("SC_rgb_rle.dcm")
    sent = [*generated, jpeg2000, rle]

    answer = client.store_instances(sent)

    assert "FailedSOPSequence" not in answer
    referenced = {item.ReferencedSOPInstanceUID: item for item in answer.ReferencedSOPSequence}
    assert set(referenced) == {ds.SOPInstanceUID for ds in sent}
    for ds in sent:
        item = referenced[ds.SOPInstanceUID]
        assert item.ReferencedSOPClassUID == ds.SOPClassUID
        assert item.RetrieveURL == (
            f"{dicomweb_url(node)}/studies/{ds.StudyInstanceUID}"
            f"/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        )
    assert node.archive.counts() == {"patients": 3, "studies": 3, "series": 3, "instances": 5}

    # The RetrieveURL is a working WADO-RS address.
    url = referenced[jpeg2000.SOPInstanceUID].RetrieveURL.removeprefix(dicomweb_url(node))
    assert get(node, url).status_code == 200


def test_stow_of_a_large_study_in_chunked_transfer_encoding(node, client):
    """dicomweb-client sends bodies over its chunk size with Transfer-Encoding: chunked."""
    study = generate_uid()
    sent = [ct(study_uid=study, instance_number=n, size=64) for n in range(1, 6)]
    client.set_chunk_size(4096)

    answer = client.store_instances(sent)

    assert sequence_uids(answer, "ReferencedSOPSequence") == [ds.SOPInstanceUID for ds in sent]
    assert node.archive.counts()["instances"] == 5
    retrieved = {ds.SOPInstanceUID: ds.PixelData for ds in client.retrieve_study(study)}
    assert retrieved == {ds.SOPInstanceUID: ds.PixelData for ds in sent}


def test_stow_answers_200_with_every_instance_referenced(node):
    study = generate_uid()
    sent = [ct(study_uid=study, instance_number=n) for n in (1, 2)]

    response = stow(node, sent, study)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/dicom+json"
    answer = Dataset.from_json(response.json())
    assert answer.RetrieveURL == f"{dicomweb_url(node)}/studies/{study}"
    assert sequence_uids(answer, "ReferencedSOPSequence") == [ds.SOPInstanceUID for ds in sent]


def test_stow_to_a_study_refuses_an_instance_of_another_study(node, client):
    study = generate_uid()
    stranger = ct()  # a study of its own

    with pytest.raises(HTTPError) as refused:
        client.store_instances([stranger], study_instance_uid=study)
    assert http_status(refused) == 409
    answer = Dataset.from_json(refused.value.response.json())
    (failure,) = answer.FailedSOPSequence
    assert failure.ReferencedSOPInstanceUID == stranger.SOPInstanceUID
    assert failure.FailureReason == DOES_NOT_MATCH
    assert "ReferencedSOPSequence" not in answer
    assert node.archive.counts()["instances"] == 0

    member = ct(study_uid=study)
    response = stow(node, [member, stranger], study)  # mixed: one stored, one refused
    assert response.status_code == 202
    answer = Dataset.from_json(response.json())
    assert sequence_uids(answer, "ReferencedSOPSequence") == [member.SOPInstanceUID]
    assert sequence_uids(answer, "FailedSOPSequence") == [stranger.SOPInstanceUID]
    assert answer.FailedSOPSequence[0].FailureReason == DOES_NOT_MATCH
    assert node.archive.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}
    stranger_study = {"StudyInstanceUID": stranger.StudyInstanceUID}
    assert client.search_for_studies(search_filters=stranger_study) == []


def test_identical_resend_succeeds_and_stores_nothing_new(node, client):
    sent = [ct(instance_number=n) for n in (1, 2)]
    client.store_instances(sent)
    before = snapshot(node)

    response = stow(node, sent)

    assert response.status_code == 200
    answer = Dataset.from_json(response.json())
    assert sequence_uids(answer, "ReferencedSOPSequence") == [ds.SOPInstanceUID for ds in sent]
    assert snapshot(node) == before


def test_different_object_under_a_stored_sop_instance_uid_is_refused(node, client):
    original = ct(seed=1)
    client.store_instances([original])
    before = snapshot(node)
    impostor = ct(
        seed=2,
        sop_uid=original.SOPInstanceUID,
        study_uid=original.StudyInstanceUID,
        series_uid=original.SeriesInstanceUID,
    )
    assert impostor.PixelData != original.PixelData

    with pytest.raises(HTTPError) as refused:
        client.store_instances([impostor])

    assert http_status(refused) == 409
    (failure,) = Dataset.from_json(refused.value.response.json()).FailedSOPSequence
    assert failure.FailureReason == DUPLICATE_SOP_INSTANCE == 273
    assert failure.ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert snapshot(node) == before
    kept = client.retrieve_instance(
        original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID
    )
    assert kept.PixelData == original.PixelData


# --- QIDO-RS ----------------------------------------------------------------------------


@dataclass
class Catalog:
    """Three studies of two patients; A has a CT series of three and a PT series of one."""

    a: str
    b: str
    c: str
    a_ct: str
    a_pt: str
    b_mr: str
    c_ct: str
    instances: dict[str, list[str]]  # series -> SOP Instance UIDs in InstanceNumber order


@pytest.fixture
def catalog(client) -> Catalog:
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    a_ct, a_pt, b_mr, c_ct = (generate_uid() for _ in range(4))
    jane = {"patient_id": "PAT001", "patient_name": "Doe^Jane"}
    john = {"patient_id": "PAT002", "patient_name": "Smith^John", "PatientSex": "M"}
    study_a = {**jane, "StudyDate": "20240315", "AccessionNumber": "ACC001"}
    study_b = {**john, "StudyDate": "20240401", "AccessionNumber": "ACC002"}
    study_b["StudyDescription"] = "MR BRAIN"
    study_c = {**jane, "StudyDate": "20230110", "AccessionNumber": "ACC003"}
    study_c["StudyDescription"] = "CT ABDOMEN"
    plan = [  # study, series, modality, instances, attributes
        (a, a_ct, "CT", 3, study_a),
        (a, a_pt, "PT", 1, study_a),
        (b, b_mr, "MR", 2, study_b),
        (c, c_ct, "CT", 1, study_c),
    ]
    datasets, instances = [], {}
    for series_number, (study, series, modality, count, attributes) in enumerate(plan, 1):
        for number in range(1, count + 1):
            ds = ct(
                study_uid=study,
                series_uid=series,
                instance_number=number,
                Modality=modality,
                SeriesNumber=series_number,
                **attributes,
            )
            datasets.append(ds)
            instances.setdefault(series, []).append(ds.SOPInstanceUID)
    answer = client.store_instances(datasets)
    assert len(answer.ReferencedSOPSequence) == 7
    return Catalog(a, b, c, a_ct, a_pt, b_mr, c_ct, instances)


def study_uids(results: list[dict]) -> list[str]:
    return values(results, "StudyInstanceUID")


def test_search_for_studies_matches_by_keyword_tag_wildcard_date_and_uid_list(client, catalog):
    a, b, c = catalog.a, catalog.b, catalog.c

    def found(**filters: str) -> set[str]:
        return set(study_uids(client.search_for_studies(search_filters=filters)))

    assert study_uids(client.search_for_studies()) == [a, b, c]  # in the order stored
    assert found(PatientID="PAT001") == {a, c}
    assert found(**{"00100020": "PAT002"}) == {b}  # a tag instead of the keyword
    assert found(PatientName="doe*") == {a, c}  # PN matching ignores case
    assert found(PatientName="Sm?th^John") == {b}
    assert found(AccessionNumber="ACC00*") == {a, b, c}
    assert found(StudyDate="20240315") == {a}
    assert found(StudyDate="20240101-20241231") == {a, b}
    assert found(StudyDate="-20231231") == {c}
    assert found(StudyDate="20240401-") == {b}
    assert found(StudyInstanceUID=f"{a},{c}") == {a, c}  # PS3.18 8.3.4.1 uid-list-match
    assert found(StudyInstanceUID=f"{a}\\{b}") == {a, b}  # the C-FIND form
    assert found(ModalitiesInStudy="PT") == {a}
    assert found(PatientID="PAT001", StudyDate="20240101-") == {a}  # filters combine
    assert found(PatientID="NOBODY") == set()


def test_study_results_carry_patient_study_and_computed_attributes(node, client, catalog):
    results = {value(r, "StudyInstanceUID"): r for r in client.search_for_studies()}
    a = results[catalog.a]
    assert value(a, "PatientName") == "Doe^Jane"
    assert value(a, "PatientID") == "PAT001"
    assert value(a, "StudyDate") == "20240315"
    assert value(a, "AccessionNumber") == "ACC001"
    assert a[f"{tag_for_keyword('ModalitiesInStudy'):08X}"]["Value"] == ["CT", "PT"]
    assert value(a, "NumberOfStudyRelatedSeries") == 2
    assert value(a, "NumberOfStudyRelatedInstances") == 4
    assert value(a, "RetrieveURL") == f"{dicomweb_url(node)}/studies/{catalog.a}"
    assert value(results[catalog.b], "StudyDescription") == "MR BRAIN"


def test_search_for_series_in_a_study_and_across_studies(node, client, catalog):
    in_a = client.search_for_series(catalog.a)
    assert values(in_a, "SeriesInstanceUID") == [catalog.a_ct, catalog.a_pt]
    assert values(in_a, "Modality") == ["CT", "PT"]
    assert values(in_a, "NumberOfSeriesRelatedInstances") == [3, 1]
    assert value(in_a[0], "RetrieveURL") == (
        f"{dicomweb_url(node)}/studies/{catalog.a}/series/{catalog.a_ct}"
    )

    everywhere = client.search_for_series()
    assert values(everywhere, "SeriesInstanceUID") == [
        catalog.a_ct,
        catalog.a_pt,
        catalog.b_mr,
        catalog.c_ct,
    ]
    by_modality = client.search_for_series(search_filters={"Modality": "CT"})
    assert values(by_modality, "SeriesInstanceUID") == [catalog.a_ct, catalog.c_ct]
    by_tag = client.search_for_series(search_filters={"00080060": "MR"})
    assert values(by_tag, "SeriesInstanceUID") == [catalog.b_mr]
    # Attributes of the levels above filter too.
    of_john = client.search_for_series(search_filters={"PatientID": "PAT002"})
    assert values(of_john, "SeriesInstanceUID") == [catalog.b_mr]
    assert client.search_for_series(catalog.b, search_filters={"Modality": "CT"}) == []


def test_search_for_instances_at_every_path(client, catalog):
    in_series = client.search_for_instances(catalog.a, catalog.a_ct)
    assert values(in_series, "SOPInstanceUID") == catalog.instances[catalog.a_ct]
    assert values(in_series, "InstanceNumber") == [1, 2, 3]
    assert set(values(in_series, "AvailableTransferSyntaxUID")) == {ExplicitVRLittleEndian}

    in_study = client.search_for_instances(catalog.a)
    assert values(in_study, "SOPInstanceUID") == (
        catalog.instances[catalog.a_ct] + catalog.instances[catalog.a_pt]
    )

    everywhere = client.search_for_instances()
    assert len(everywhere) == 7
    second = catalog.instances[catalog.a_ct][1]
    by_uid = client.search_for_instances(search_filters={"SOPInstanceUID": second})
    assert values(by_uid, "SOPInstanceUID") == [second]
    by_number = client.search_for_instances(catalog.a, search_filters={"00200013": "2"})
    assert values(by_number, "SOPInstanceUID") == [second]
    mr = client.search_for_instances(search_filters={"Modality": "MR"})
    assert values(mr, "SOPInstanceUID") == catalog.instances[catalog.b_mr]


def test_includefield_adds_attributes_by_keyword_tag_or_all(client, catalog):
    plain = client.search_for_series(catalog.a)
    assert not has(plain[0], "PatientName") and not has(plain[0], "StudyDescription")

    listed = client.search_for_series(catalog.a, fields=["PatientName", "00081030"])
    assert values(listed, "PatientName") == ["Doe^Jane", "Doe^Jane"]
    assert values(listed, "StudyDescription") == ["CT CHEST", "CT CHEST"]

    everything = client.search_for_series(catalog.a, fields=["all"])[0]
    for keyword in (
        "PatientID",
        "PatientBirthDate",
        "StudyDate",
        "AccessionNumber",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
    ):
        assert has(everything, keyword), keyword
    assert value(everything, "AccessionNumber") == "ACC001"

    studies = client.search_for_studies(fields=["all"])
    assert values(studies, "StudyInstanceUID") == [catalog.a, catalog.b, catalog.c]
    assert values(studies, "SOPClassesInStudy") == ["1.2.840.10008.5.1.4.1.1.2"] * 3
    assert has(studies[0], "NumberOfPatientRelatedStudies")


def test_patient_related_counts_in_study_results(client, catalog):
    studies = client.search_for_studies(fields=["NumberOfPatientRelatedStudies"])
    # Jane Doe has studies A and C, John Smith has B.
    assert values(studies, "NumberOfPatientRelatedStudies") == [2, 1, 2]


def test_study_counts_in_series_results(client, catalog):
    series = client.search_for_series(
        search_filters={"StudyInstanceUID": catalog.a},
        fields=["NumberOfStudyRelatedInstances", "ModalitiesInStudy"],
    )
    assert series and all(has(s, "NumberOfStudyRelatedInstances") for s in series)
    total = len(client.search_for_instances(study_instance_uid=catalog.a))
    assert set(values(series, "NumberOfStudyRelatedInstances")) == {total}


def test_a_repeated_query_key_is_a_list(node, client, catalog):
    response = requests.get(
        f"{dicomweb_url(node)}/studies?StudyInstanceUID={catalog.a}&StudyInstanceUID={catalog.b}",
        headers={"Authorization": f"Bearer {token_for(node, ('dicomweb.read',))}"},
        timeout=30,
    )
    found = [s["0020000D"]["Value"][0] for s in response.json()]
    assert sorted(found) == sorted([catalog.a, catalog.b])


def test_limit_and_offset_page_through_results(node, client, catalog):
    everything = values(client.search_for_instances(), "SOPInstanceUID")
    pages = [
        values(client.search_for_instances(limit=3, offset=offset), "SOPInstanceUID")
        for offset in (0, 3, 6, 9)
    ]
    assert [len(p) for p in pages] == [3, 3, 1, 0]
    assert sum(pages, []) == everything
    assert values(client.search_for_studies(limit=1, offset=1), "StudyInstanceUID") == [catalog.b]
    # dicomweb-client can fetch the remaining pages itself.
    assert (
        values(client.search_for_instances(limit=2, get_remaining=True), "SOPInstanceUID")
        == everything
    )
    for bad in ("limit=-1", "offset=-2", "limit=ten"):
        assert get(node, f"/instances?{bad}").status_code == 400, bad


def test_fuzzymatching_is_answered_with_a_warning_header(node, catalog):
    response = get(node, "/studies?PatientName=Doe^Jane&fuzzymatching=true")
    assert response.status_code == 200
    assert response.headers["Warning"].startswith("299 ")
    assert "fuzzymatching" in response.headers["Warning"]
    assert {value(r, "StudyInstanceUID") for r in response.json()} == {catalog.a, catalog.c}
    assert "Warning" not in get(node, "/studies?fuzzymatching=false").headers


def test_empty_result_is_200_with_an_empty_array(node, catalog):
    for path in (
        "/studies?PatientID=NOBODY",
        f"/studies/{catalog.b}/series?Modality=CT",
        f"/studies/{generate_uid()}/instances",
    ):
        response = get(node, path)
        assert response.status_code == 200, path
        assert response.headers["Content-Type"] == "application/dicom+json"
        assert response.json() == [], path


def test_percent_encoded_wildcard_in_the_query_string(node, catalog):
    response = get(node, "/studies?PatientName=Doe%2A&StudyDate=20240101%2D")
    assert response.status_code == 200
    assert [value(r, "StudyInstanceUID") for r in response.json()] == [catalog.a]
    series = get(node, "/series?SeriesInstanceUID=&Modality=%2AT")  # empty = universal
    assert [value(r, "Modality") for r in series.json()] == ["CT", "PT", "CT"]


def test_unknown_query_attribute_is_400(node, catalog):
    for query in ("NotAnAttribute=1", "ZZZZ0010=1", "00991234=x", "includefield=Bogus"):
        response = get(node, f"/studies?{query}")
        assert response.status_code == 400, query
        assert response.json()["status"] == 400


# --- WADO-RS: instances -----------------------------------------------------------------


def assert_same_instance(received: Dataset, sent: Dataset) -> None:
    for keyword in (
        "SOPInstanceUID",
        "SOPClassUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "PatientID",
        "PatientName",
        "StudyDate",
        "Rows",
        "Columns",
        "BitsAllocated",
        "InstanceNumber",
    ):
        assert received.get(keyword) == sent.get(keyword), keyword
    assert received.PixelData == sent.PixelData


def test_retrieve_study_series_and_instance_return_what_was_stored(client):
    study, first, second = generate_uid(), generate_uid(), generate_uid()
    sent = {
        ds.SOPInstanceUID: ds
        for ds in [ct(study_uid=study, series_uid=first, instance_number=n) for n in (1, 2)]
        + [ct(study_uid=study, series_uid=second, instance_number=3)]
    }
    client.store_instances(list(sent.values()))
    client.store_instances([ct()])  # another study, never part of the answers below

    whole = client.retrieve_study(study)
    assert sorted(ds.SOPInstanceUID for ds in whole) == sorted(sent)
    for ds in whole:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert_same_instance(ds, sent[ds.SOPInstanceUID])

    series = client.retrieve_series(study, first)
    assert sorted(ds.SOPInstanceUID for ds in series) == sorted(
        uid for uid, ds in sent.items() if ds.SeriesInstanceUID == first
    )
    third = next(ds for ds in sent.values() if ds.SeriesInstanceUID == second)
    one = client.retrieve_instance(study, second, third.SOPInstanceUID)
    assert_same_instance(one, third)

    with pytest.raises(HTTPError) as missing:
        client.retrieve_instance(study, second, generate_uid())
    assert http_status(missing) == 404


def test_compressed_instances_come_as_stored_or_decompressed(client):
    jpeg2000, rle = bundled("JPEG2000.dcm"), bundled("SC_rgb_rle.dcm")
    client.store_instances([jpeg2000, rle])

    def fetch(ds: Dataset, *media_types) -> Dataset:
        return client.retrieve_instance(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, media_types=media_types
        )

    for original in (jpeg2000, rle):
        stored_syntax = original.file_meta.TransferSyntaxUID
        as_stored = fetch(original, ("application/dicom", "*"))
        assert as_stored.file_meta.TransferSyntaxUID == stored_syntax
        assert as_stored.PixelData == original.PixelData  # the very same encapsulated bytes

        own_syntax = fetch(original, ("application/dicom", stored_syntax))
        assert own_syntax.PixelData == original.PixelData

        # No transfer syntax named: explicit VR little endian, the PS3.18 default (note that
        # dicomweb-client itself asks for "*" unless told otherwise).
        for decompressed in (
            fetch(original, "application/dicom"),
            fetch(original, ("application/dicom", ExplicitVRLittleEndian)),
        ):
            assert decompressed.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert not decompressed.file_meta.TransferSyntaxUID.is_compressed
            assert np.array_equal(decompressed.pixel_array, original.pixel_array)
            assert decompressed.SOPInstanceUID == original.SOPInstanceUID
            assert decompressed.PatientID == original.PatientID

    # QIDO says how each is stored.
    (row,) = client.search_for_instances(search_filters={"SOPInstanceUID": jpeg2000.SOPInstanceUID})
    assert value(row, "AvailableTransferSyntaxUID") == JPEG2000

    # JPEG baseline cannot be made from a JPEG 2000 object here.
    with pytest.raises(HTTPError) as refused:
        fetch(jpeg2000, ("application/dicom", JPEGBaseline8Bit))
    assert http_status(refused) == 406


# --- WADO-RS: metadata and bulk data ----------------------------------------------------


def with_sequences(ds: Dataset) -> Dataset:
    """`ds` with a coded sequence and an icon image whose pixels are bulk data."""
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTCHEST", "L", "CT Chest"
    second = Dataset()
    second.CodeValue, second.CodingSchemeDesignator, second.CodeMeaning = "CTABD", "L", "Abdomen"
    ds.ProcedureCodeSequence = Sequence([code, second])
    icon = Dataset()
    icon.Rows = icon.Columns = 48
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = bytes(range(256)) * 9  # 2304 bytes, over the bulk data threshold
    ds.IconImageSequence = Sequence([icon])
    return ds


def test_metadata_at_every_level_with_bulk_data_uris(node, client):
    study, first, second = generate_uid(), generate_uid(), generate_uid()
    sent = [
        ct(study_uid=study, series_uid=first, instance_number=1, size=16),
        ct(study_uid=study, series_uid=first, instance_number=2, size=16),
        as_file(with_sequences(make_ct(study_uid=study, series_uid=second, size=16))),
    ]
    client.store_instances(sent)
    by_uid = {ds.SOPInstanceUID: ds for ds in sent}

    study_metadata = client.retrieve_study_metadata(study)
    assert sorted(value(m, "SOPInstanceUID") for m in study_metadata) == sorted(by_uid)
    series_metadata = client.retrieve_series_metadata(study, first)
    assert sorted(value(m, "SOPInstanceUID") for m in series_metadata) == sorted(
        ds.SOPInstanceUID for ds in sent[:2]
    )
    coded = sent[2]
    instance_metadata = client.retrieve_instance_metadata(study, second, coded.SOPInstanceUID)

    for metadata in study_metadata:
        original = by_uid[value(metadata, "SOPInstanceUID")]
        assert value(metadata, "PatientName") == "Doe^Jane"
        assert value(metadata, "Rows") == 16
        pixel_data = metadata["7FE00010"]
        assert set(pixel_data) == {"vr", "BulkDataURI"}
        assert pixel_data["BulkDataURI"] == (
            f"{dicomweb_url(node)}/studies/{study}/series/{original.SeriesInstanceUID}"
            f"/instances/{original.SOPInstanceUID}/bulkdata/7FE00010"
        )
        assert client.retrieve_bulkdata(pixel_data["BulkDataURI"]) == [original.PixelData]

    # A sequence comes with its items; bulk data inside an item has a URI of its own.
    codes = instance_metadata["00081032"]
    assert codes["vr"] == "SQ"
    assert [item["00080100"]["Value"] for item in codes["Value"]] == [["CTCHEST"], ["CTABD"]]
    (icon,) = instance_metadata["00880200"]["Value"]
    assert value(icon, "Rows") == 48
    icon_uri = icon["7FE00010"]["BulkDataURI"]
    assert icon_uri.endswith(f"/instances/{coded.SOPInstanceUID}/bulkdata/00880200/0/7FE00010")
    assert client.retrieve_bulkdata(icon_uri) == [coded.IconImageSequence[0].PixelData]

    # A script can rebuild the data set from metadata plus bulk data.
    rebuilt = Dataset.from_json(
        instance_metadata,
        bulk_data_uri_handler=lambda uri: bytes(client.retrieve_bulkdata(uri)[0]),
    )
    assert rebuilt.ProcedureCodeSequence[1].CodeMeaning == "Abdomen"
    assert rebuilt.PixelData == coded.PixelData
    assert rebuilt.IconImageSequence[0].PixelData == coded.IconImageSequence[0].PixelData

    with pytest.raises(HTTPError) as missing:
        client.retrieve_bulkdata(pixel_data["BulkDataURI"].replace("7FE00010", "00181030"))
    assert http_status(missing) == 404

    # The second answer comes from the metadata cached beside each blob, and is the same.
    assert client.retrieve_study_metadata(study) == study_metadata
    cached = list((node.settings.node.data_dir / "blobs").rglob("*.metadata.json"))
    assert len(cached) == len(sent)


# --- WADO-RS: frames --------------------------------------------------------------------


def test_frames_of_a_multiframe_instance(client):
    ds, pixels = multiframe()
    client.store_instances([ds])
    where = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)

    assert client.retrieve_instance_frames(*where, frame_numbers=[2, 4]) == [
        pixels[1].tobytes(),
        pixels[3].tobytes(),
    ]
    assert client.retrieve_instance_frames(*where, frame_numbers=[5, 1]) == [
        pixels[4].tobytes(),
        pixels[0].tobytes(),
    ]
    octets = client.retrieve_instance_frames(
        *where, frame_numbers=[3], media_types=("application/octet-stream",)
    )
    assert octets == [pixels[2].tobytes()]

    for missing in ([6], [0], [2, 9]):
        with pytest.raises(HTTPError) as refused:
            client.retrieve_instance_frames(*where, frame_numbers=missing)
        assert http_status(refused) == 404, missing


@pytest.mark.parametrize(
    ("transfer_syntax", "media_type"),
    [(JPEG2000Lossless, "image/jp2"), (RLELossless, "image/dicom-rle")],
)
def test_compressed_frames_come_decompressed_or_as_stored(
    node, client, transfer_syntax, media_type
):
    ds, pixels = multiframe(transfer_syntax=transfer_syntax)
    client.store_instances([ds])
    where = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    stored = [b"".join(f) for f in generate_fragmented_frames(ds.PixelData, number_of_frames=5)]

    # By default the frames come decompressed, as little endian pixel values.
    assert client.retrieve_instance_frames(*where, frame_numbers=[2, 4]) == [
        pixels[1].tobytes(),
        pixels[3].tobytes(),
    ]
    # Asking for the compressed media type gives the stored bitstream of each frame.
    compressed = client.retrieve_instance_frames(
        *where, frame_numbers=[2, 4], media_types=(media_type,)
    )
    assert compressed == [stored[1], stored[3]]
    if transfer_syntax == JPEG2000Lossless:
        assert np.array_equal(openjpeg.decode(compressed[0]), pixels[1])

    path = f"/studies/{where[0]}/series/{where[1]}/instances/{where[2]}/frames/1"
    response = get(node, path, Accept=f'multipart/related; type="{media_type}"')
    assert response.headers["Content-Type"].startswith(f'multipart/related; type="{media_type}"')
    assert f"transfer-syntax={transfer_syntax}".encode() in response.content

    # A compressed form other than the stored one cannot be produced.
    refused = get(node, path, Accept='multipart/related; type="image/jpeg"')
    assert refused.status_code == 406


def test_frames_of_a_single_frame_compressed_instance(client):
    original = bundled("JPEG2000.dcm")
    client.store_instances([original])
    where = (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)

    (native,) = client.retrieve_instance_frames(*where, frame_numbers=[1])
    assert native == original.pixel_array.tobytes()
    (as_stored,) = client.retrieve_instance_frames(
        *where, frame_numbers=[1], media_types=("image/jp2",)
    )
    assert as_stored == b"".join(next(generate_fragmented_frames(original.PixelData)))
    with pytest.raises(HTTPError) as missing:
        client.retrieve_instance_frames(*where, frame_numbers=[2])
    assert http_status(missing) == 404


# --- WADO-RS: rendered images and thumbnails --------------------------------------------


def constant_ct(stored_value: int, rows: int = 20, columns: int = 40, **attributes) -> Dataset:
    """A CT image whose every pixel is `stored_value` (Rescale Intercept -1024)."""
    ds = make_ct(**attributes)
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = np.full((rows, columns), stored_value, dtype=np.uint16).tobytes()
    return as_file(ds)


def test_rendered_instance_as_jpeg_and_png_scaled_into_a_viewport(client):
    ds = ct(size=1)
    ds.Rows, ds.Columns = 20, 40  # not square: scaling must keep the aspect ratio
    ds.PixelData = np.arange(800, dtype=np.uint16).reshape(20, 40).tobytes()
    client.store_instances([ds])
    where = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)

    jpeg = decode_image(client.retrieve_instance_rendered(*where, media_types=("image/jpeg",)))
    assert (jpeg.format, jpeg.size, jpeg.mode) == ("JPEG", (40, 20), "L")
    png = decode_image(client.retrieve_instance_rendered(*where, media_types=("image/png",)))
    assert (png.format, png.size) == ("PNG", (40, 20))
    # Without a window the full range is used: darkest top-left, brightest bottom-right.
    grey = np.asarray(png)
    assert grey[0, 0] == 0 and grey[-1, -1] == 255

    small = client.retrieve_instance_rendered(
        *where, media_types=("image/png",), params={"viewport": "20,20"}
    )
    assert decode_image(small).size == (20, 10)
    wide = client.retrieve_instance_rendered(
        *where, media_types=("image/jpeg",), params={"viewport": "10,100"}
    )
    assert decode_image(wide).size == (10, 5)


def test_window_center_and_width_set_the_grey_levels(client):
    ds = constant_ct(1500)  # 1500 stored = 476 HU after the rescale
    client.store_instances([ds])

    def grey(window: str) -> np.ndarray:
        data = client.retrieve_instance_rendered(
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID,
            media_types=("image/png",),
            params={"window": window},
        )
        return np.asarray(decode_image(data))

    centred = grey("476,200")
    assert centred.shape == (20, 40)
    assert np.all(np.abs(centred.astype(int) - 128) <= 1)  # the centre value is mid-grey
    assert np.all(grey("300,200") == 255)  # above the window: white
    assert np.all(grey("700,200") == 0)  # below the window: black
    assert np.all(np.abs(grey("426,200").astype(int) - 191) <= 1)  # three quarters up


def test_rendered_frame_of_a_multiframe_instance(node, client):
    ds, pixels = multiframe(frames=3, size=16)
    client.store_instances([ds])
    where = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    center, width = 2000, 4000

    for frame in (1, 3):
        data = client.retrieve_instance_frames_rendered(
            *where,
            frame_numbers=[frame],
            media_types=("image/png",),
            params={"window": f"{center},{width}"},
        )
        expected = np.clip((pixels[frame - 1] - (center - width / 2)) / width, 0, 1) * 255
        assert np.array_equal(np.asarray(decode_image(data)), expected.astype(np.uint8))

    path = f"/studies/{where[0]}/series/{where[1]}/instances/{where[2]}/frames/4/rendered"
    assert get(node, path).status_code in (400, 404)  # there is no frame 4


def test_thumbnails_of_study_series_and_instance_fit_128(node, client):
    study, series = generate_uid(), generate_uid()
    sent = [
        constant_ct(
            1000 + 500 * n,
            rows=150,
            columns=300,
            study_uid=study,
            series_uid=series,
            instance_number=n,
        )
        for n in (1, 2, 3)
    ]
    client.store_instances(sent)
    instance = sent[0]
    paths = [
        f"/studies/{study}/thumbnail",
        f"/studies/{study}/series/{series}/thumbnail",
        f"/studies/{study}/series/{series}/instances/{instance.SOPInstanceUID}/thumbnail",
    ]
    for path in paths:
        response = get(node, path, Accept="image/jpeg")
        assert response.status_code == 200, path
        assert response.headers["Content-Type"] == "image/jpeg"
        image = decode_image(response.content)
        assert (image.format, image.size) == ("JPEG", (128, 64)), path
    png = get(node, paths[0], Accept="image/png")
    assert decode_image(png.content).format == "PNG"
    assert get(node, f"/studies/{generate_uid()}/thumbnail").status_code == 404


# --- DELETE -----------------------------------------------------------------------------


def test_delete_instance_series_and_study(node, client):
    study, first, second = generate_uid(), generate_uid(), generate_uid()
    doomed = [ct(study_uid=study, series_uid=first, instance_number=n) for n in (1, 2, 3)]
    doomed.append(ct(study_uid=study, series_uid=second, instance_number=4))
    other = ct(patient_id="PAT002", patient_name="Other^Pat")
    client.store_instances([*doomed, other])
    other_blobs = {k: v for k, v in blob_files(node).items() if other.StudyInstanceUID in k}
    assert len(other_blobs) == 1
    assert node.archive.counts() == {"patients": 2, "studies": 2, "series": 3, "instances": 5}

    # One instance.
    gone = doomed[0]
    before = set(blob_files(node))
    response = delete(node, f"/studies/{study}/series/{first}/instances/{gone.SOPInstanceUID}")
    assert response.status_code == 200 and response.json()["deleted"] == 1
    assert len(before - set(blob_files(node))) == 1
    assert gone.SOPInstanceUID not in values(
        client.search_for_instances(study, first), "SOPInstanceUID"
    )
    with pytest.raises(HTTPError) as missing:
        client.retrieve_instance(study, first, gone.SOPInstanceUID)
    assert http_status(missing) == 404
    assert node.archive.counts() == {"patients": 2, "studies": 2, "series": 3, "instances": 4}

    # A series: gone from QIDO and WADO.
    client.delete_series(study, first)
    assert values(client.search_for_series(study), "SeriesInstanceUID") == [second]
    with pytest.raises(HTTPError) as missing:
        client.retrieve_series(study, first)
    assert http_status(missing) == 404
    assert node.archive.counts() == {"patients": 2, "studies": 2, "series": 2, "instances": 2}

    # The study, and with it the patient that has nothing else.
    assert delete(node, f"/studies/{study}").json()["deleted"] == 1
    assert values(client.search_for_studies(), "StudyInstanceUID") == [other.StudyInstanceUID]
    assert client.search_for_studies(search_filters={"PatientID": "PAT001"}) == []
    with pytest.raises(HTTPError) as missing:
        client.retrieve_study_metadata(study)
    assert http_status(missing) == 404
    assert node.archive.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}
    assert blob_files(node) == other_blobs
    assert not (node.archive.blobs.root / study).exists()

    # The other study is untouched and still served.
    kept = client.retrieve_study(other.StudyInstanceUID)
    assert [ds.PixelData for ds in kept] == [other.PixelData]
    assert delete(node, f"/studies/{study}").status_code == 404


def test_delete_needs_the_delete_scope_and_a_matching_path(node, client):
    a, b = ct(), ct()
    client.store_instances([a, b])
    before = snapshot(node)

    read_write = ("dicomweb.read", "dicomweb.write")
    assert delete(node, f"/studies/{a.StudyInstanceUID}", scopes=read_write).status_code == 403
    # A series named under the wrong study is not found, and nothing goes.
    wrong = f"/studies/{b.StudyInstanceUID}/series/{a.SeriesInstanceUID}"
    assert delete(node, wrong).status_code == 404
    assert delete(node, "/studies/1.2.3..4").status_code == 400
    assert snapshot(node) == before


# --- bad input --------------------------------------------------------------------------


@pytest.fixture
def stored_one(node, client) -> Dataset:
    ds = ct()
    client.store_instances([ds])
    return ds


def assert_refused_unchanged(node, response: requests.Response, status: int, before) -> None:
    assert response.status_code == status, response.text
    assert snapshot(node) == before
    assert list(node.archive.blobs.tmp.iterdir()) == []  # no partial write left behind


def test_truncated_multipart_body_is_400_and_stores_nothing(node, stored_one):
    before = snapshot(node)
    body = multipart([part10(ct()), part10(ct())])
    cut = body[: body.rindex(f"--{BOUNDARY}--".encode())]  # both parts, no closing boundary
    assert_refused_unchanged(node, post(node, "/studies", cut, STOW_TYPE), 400, before)
    midway = body[: len(body) // 2]  # cut inside the first part
    assert_refused_unchanged(node, post(node, "/studies", midway, STOW_TYPE), 400, before)


def test_wrong_boundary_in_content_type_is_400(node, stored_one):
    before = snapshot(node)
    body = multipart([part10(ct())])
    wrong = 'multipart/related; type="application/dicom"; boundary=not-the-one'
    assert_refused_unchanged(node, post(node, "/studies", body, wrong), 400, before)
    none = 'multipart/related; type="application/dicom"'
    assert_refused_unchanged(node, post(node, "/studies", body, none), 400, before)


def test_non_dicom_part_fails_with_a_failure_reason(node, stored_one):
    before = snapshot(node)
    response = post(node, "/studies", multipart([b"this is not DICOM at all\n" * 10]), STOW_TYPE)
    assert_refused_unchanged(node, response, 409, before)
    (failure,) = Dataset.from_json(response.json()).FailedSOPSequence
    assert failure.FailureReason == CANNOT_UNDERSTAND

    # One bad part does not spoil the good one beside it.
    good = ct()
    mixed = post(node, "/studies", multipart([b"junk", part10(good)]), STOW_TYPE)
    assert mixed.status_code == 202
    answer = Dataset.from_json(mixed.json())
    assert sequence_uids(answer, "ReferencedSOPSequence") == [good.SOPInstanceUID]
    assert len(answer.FailedSOPSequence) == 1
    assert node.archive.counts()["instances"] == before[0]["instances"] + 1


def test_content_type_not_multipart_is_415(node, stored_one):
    before = snapshot(node)
    data = part10(ct())
    for content_type in ("application/dicom", "application/octet-stream", ""):
        response = post(node, "/studies", data, content_type)
        assert_refused_unchanged(node, response, 415, before)
    # multipart/related, but of DICOM JSON parts: not what STOW-RS here takes.
    json_parts = f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'
    response = post(node, "/studies", multipart([b"[{}]"], "application/dicom+json"), json_parts)
    assert_refused_unchanged(node, response, 415, before)


def test_invalid_uid_in_the_path_is_400(node, stored_one):
    before = snapshot(node)
    study, series = stored_one.StudyInstanceUID, stored_one.SeriesInstanceUID
    for method, path, status in [
        ("GET", "/dicomweb/studies/1.2.3..4/series", 400),
        ("GET", "/dicomweb/studies/1.2.3..4", 400),
        ("GET", f"/dicomweb/studies/{study}/series/../metadata", 400),
        ("GET", f"/dicomweb/studies/{study}/series/{series}/instances/1.2.x/metadata", 400),
        ("GET", "/dicomweb/studies/..;/series", 400),
        ("POST", "/dicomweb/studies/1.2.3..4", 400),
        ("DELETE", f"/dicomweb/studies/{study}/series/..", 400),
        # An encoded slash is decoded before routing: no route has that shape.
        ("GET", f"/dicomweb/studies/{study}/series/..%2F..%2Fkeys/instances", 404),
    ]:
        assert raw_request(node, method, path) == status, (method, path)
    assert snapshot(node) == before


@pytest.fixture
def small_part_node(start_node):
    """A node whose [http] max_part_bytes is 20000."""
    return start_node(http={"max_part_bytes": 20000})


def test_part_over_max_part_bytes_is_413_and_stores_nothing(small_part_node):
    node = small_part_node
    assert node.settings.http.max_part_bytes == 20000
    fits = ct(size=64)  # 8 KiB of pixels
    assert stow(node, [fits]).status_code == 200
    before = snapshot(node)

    too_big = ct(size=128)  # 32 KiB of pixels
    assert len(part10(too_big)) > 20000
    response = stow(node, [ct(size=8), too_big])
    assert_refused_unchanged(node, response, 413, before)
    assert "20000" in response.json()["detail"]
