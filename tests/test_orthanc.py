"""Debian's Orthanc 1.10 with its DICOMweb plugin against the node, as a hospital PACS would
connect: a DICOMweb client of the node (QIDO-RS, WADO-RS retrieve and STOW-RS through its
`/dicom-web/servers/node/...` routes, with a bearer token in the server's HttpHeaders) and a
DIMSE peer both ways (Orthanc C-STOREs to the node and C-FINDs it; the node C-MOVEs to
Orthanc at Orthanc's request)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from dicomnode.config import Peer, read_settings
from dicomnode.serve import Node
from tests.conftest import dicomweb_client, free_port, token_for, wait_until, write_config
from tests.factory import make_ct, part10
from tests.realclients.orthanc import AE_TITLE, Orthanc, start_orthanc

pytestmark = pytest.mark.orthanc


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[tuple[Node, Orthanc]]:
    """The node, with Orthanc as a peer, and Orthanc, with the node as modality and DICOMweb
    server."""
    folder = tmp_path_factory.mktemp("orthanc")
    orthanc_dicom_port = free_port()
    peer = Peer(
        "orthanc", AE_TITLE, "127.0.0.1", orthanc_dicom_port, ("echo", "store", "find", "move")
    )
    config = write_config(
        folder / "node.toml", folder / "data", f"sqlite:///{folder / 'index.sqlite'}", [peer]
    )
    node = Node(read_settings(config))
    node.start()
    try:
        token = token_for(node, ("dicomweb.read", "dicomweb.write"), "orthanc", 3600)
        orthanc = start_orthanc(
            folder / "orthanc",
            node.settings.node.ae_title,
            node.dimse.port,
            f"http://127.0.0.1:{node.http_port}/dicomweb",
            token,
            dicom_port=orthanc_dicom_port,
        )
        try:
            yield node, orthanc
        finally:
            orthanc.stop()
    finally:
        node.stop()


def study(patient_id: str, count: int = 3, **attributes) -> list[Dataset]:
    study_uid, series_uid = generate_uid(), generate_uid()
    return [
        make_ct(patient_id, study_uid=study_uid, series_uid=series_uid, instance_number=n,
                size=64, **attributes)
        for n in range(1, count + 1)
    ]  # fmt: skip


def upload(orthanc: Orthanc, datasets: list[Dataset]) -> list[str]:
    """Orthanc ids of `datasets`, uploaded through its REST API."""
    return [orthanc.post("/instances", data=part10(ds)).json()["ID"] for ds in datasets]


def orthanc_instance(orthanc: Orthanc, sop_uid: str) -> Dataset | None:
    found = orthanc.post(
        "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}
    ).json()
    if not found:
        return None
    return pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{found[0]}/file").content))


def assert_same_pixels(received: Dataset, sent: Dataset) -> None:
    assert received.SOPInstanceUID == sent.SOPInstanceUID
    assert received.PatientID == sent.PatientID
    assert np.array_equal(received.pixel_array, sent.pixel_array)


def test_orthanc_queries_the_node_over_qido(pair):
    node, orthanc = pair
    sent = study("ORTHANC-QIDO")
    dicomweb_client(node).store_instances(sent)
    studies = orthanc.post(
        "/dicom-web/servers/node/qido",
        {"Uri": "/studies", "Arguments": {"PatientID": "ORTHANC-QIDO"}},
    ).json()
    # Orthanc answers in its own JSON (a tag's "Value" is the string)
    assert [s["0020000D"]["Value"] for s in studies] == [sent[0].StudyInstanceUID]
    instances = orthanc.post(
        "/dicom-web/servers/node/qido",
        {"Uri": f"/studies/{sent[0].StudyInstanceUID}/instances"},
    ).json()
    assert sorted(i["00080018"]["Value"] for i in instances) == sorted(
        ds.SOPInstanceUID for ds in sent
    )


@pytest.mark.parametrize("syntax", [None, JPEG2000Lossless, RLELossless])
def test_orthanc_retrieves_a_study_from_the_node_over_wado(pair, syntax):
    node, orthanc = pair
    sent = study(f"ORTHANC-WADO-{syntax or 'NATIVE'}")
    if syntax:
        for ds in sent:
            ds.compress(syntax)
    dicomweb_client(node).store_instances(sent)
    orthanc.post(
        "/dicom-web/servers/node/retrieve",
        {"Resources": [{"Study": sent[0].StudyInstanceUID}]},
    )
    for ds in sent:
        received = orthanc_instance(orthanc, ds.SOPInstanceUID)
        assert received is not None, ds.SOPInstanceUID
        assert_same_pixels(received, ds)


def test_orthanc_stores_to_the_node_over_stow(pair):
    node, orthanc = pair
    sent = study("ORTHANC-STOW")
    ids = upload(orthanc, sent)
    answer = orthanc.post("/dicom-web/servers/node/stow", {"Resources": ids}).json()
    assert answer is not None
    client = dicomweb_client(node)
    for ds in sent:
        received = client.retrieve_instance(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        assert_same_pixels(received, ds)


def test_orthanc_c_stores_to_the_node_and_c_finds_it(pair):
    node, orthanc = pair
    sent = study("ORTHANC-DIMSE", PatientName="Kim^Jisoo")
    ids = upload(orthanc, sent)
    orthanc.post("/modalities/node/store", {"Resources": ids, "Synchronous": True})
    client = dicomweb_client(node)
    received = client.retrieve_study(sent[0].StudyInstanceUID)
    assert sorted(r.SOPInstanceUID for r in received) == sorted(ds.SOPInstanceUID for ds in sent)
    by_uid = {r.SOPInstanceUID: r for r in received}
    for ds in sent:
        assert_same_pixels(by_uid[ds.SOPInstanceUID], ds)

    query = orthanc.post(
        "/modalities/node/query",
        {"Level": "Study", "Query": {"PatientID": "ORTHANC-DIMSE", "PatientName": "",
                                     "StudyInstanceUID": "", "NumberOfStudyRelatedInstances": ""}},
    ).json()  # fmt: skip
    answers = orthanc.get(f"/queries/{query['ID']}/answers?expand&simplify").json()
    assert len(answers) == 1
    (answer,) = answers
    assert answer["StudyInstanceUID"] == sent[0].StudyInstanceUID
    assert answer["PatientName"] == "Kim^Jisoo"
    assert answer["NumberOfStudyRelatedInstances"] == str(len(sent))


def test_the_node_c_moves_a_study_to_orthanc(pair):
    node, orthanc = pair
    sent = study("ORTHANC-MOVE", count=2)
    dicomweb_client(node).store_instances(sent)
    assert orthanc_instance(orthanc, sent[0].SOPInstanceUID) is None
    # Orthanc asks the node (C-MOVE SCP) to send the study to Orthanc's own AE
    orthanc.post(
        "/modalities/node/move",
        {"Level": "Study", "Resources": [{"StudyInstanceUID": sent[0].StudyInstanceUID}],
         "TargetAet": AE_TITLE, "Synchronous": True},
    )  # fmt: skip
    for ds in sent:
        received = wait_until(
            lambda ds=ds: orthanc_instance(orthanc, ds.SOPInstanceUID), 30, "the moved instance"
        )
        assert_same_pixels(received, ds)
