"""Person names with several component groups (PS3.5 6.2: alphabetic=ideographic=phonetic).

QIDO-RS answers split a name into Alphabetic, Ideographic and Phonetic (PS3.18 F.2.2), and a
search on one group (``홍^길동``, ``Hong^Gildong``, ``Hong*``) finds the name over QIDO-RS
(dicomweb-client) and over C-FIND (a pynetdicom SCU and dcmtk's findscu), case-insensitively.
Runs on SQLite and PostgreSQL (the group of a name is computed in SQL on each).
"""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP
from io import BytesIO
from pathlib import Path
from xml.etree import ElementTree

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicomnode.config import Peer
from dicomnode.core.model import Source
from dicomnode.serve import Node
from tests.conftest import (
    dicomweb_client,
    dicomweb_url,
    run_dcmtk,
    start_module_node,
    token_for,
)
from tests.factory import make_ct

FINDER = Peer("finder", "FINDER", "127.0.0.1", 0, ("find",))
# Patient ID -> name as stored
PATIENTS = {
    "K1": "Hong^Gildong=洪^吉洞=홍^길동",
    "K2": "Hong^Minsu",
    "K3": "Kim^Jisoo=金^智秀=김^지수",
    "K4": "Lee^Suna=李^順娥=이^길동",  # the same phonetic given name as K1
    "K5": "=朴^英姬=박^영희",  # no alphabetic group
    "K6": "Hong^Gildong=",  # a trailing empty group
}
# search value -> Patient IDs it finds
SEARCHES = {
    "Hong^Gildong": {"K1", "K6"},
    "hong^gildong": {"K1", "K6"},
    "HONG^GILDONG": {"K1", "K6"},
    "홍^길동": {"K1"},
    "洪^吉洞": {"K1"},
    "Hong*": {"K1", "K2", "K6"},
    "hong^g*": {"K1", "K6"},
    "*^길동": {"K1", "K4"},
    "?^길동": {"K1", "K4"},
    "박*": {"K5"},
    "Hong^Gildong=洪^吉洞=홍^길동": {"K1"},
    "=洪^吉洞": {"K1"},
    "==이^길동": {"K4"},
    "Hong*=*=홍*": {"K1"},
    "Hong^Gildong=金*": set(),
    # A wildcard stays within one component group: it does not run from one group into another.
    "Hong*길동": set(),
    "*=*": {"K1", "K2", "K3", "K4", "K5", "K6"},
    "Kim^Jisoo\\홍^길동": {"K1", "K3"},
}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def node(request, tmp_path_factory):
    node = start_module_node(request, tmp_path_factory, "person-names", [FINDER])
    for patient_id, name in PATIENTS.items():
        ds = make_ct(patient_id, name, SpecificCharacterSet="ISO_IR 192")
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        node.intake.receive_part10(buffer.getvalue(), Source("cli"))
    yield node
    node.stop()


def qido_rows(node: Node, name: str) -> list[dict]:
    return dicomweb_client(node, ("dicomweb.read",)).search_for_studies(
        search_filters={"PatientName": name}
    )


def cfind_names(node: Node, name: str) -> dict[str, str]:
    """Patient ID -> Patient Name of the studies a pynetdicom C-FIND finds."""
    ae = AE("FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    assert assoc.is_established
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 192"
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = name
    identifier.PatientID = ""
    found = {}
    try:
        for status, answer in assoc.send_c_find(
            identifier, StudyRootQueryRetrieveInformationModelFind
        ):
            assert status.Status in (0x0000, 0xFF00), hex(status.Status)
            if status.Status == 0xFF00:
                found[str(answer.PatientID)] = str(answer.PatientName)
    finally:
        assoc.release()
    return found


@pytest.mark.parametrize("name", list(SEARCHES))
def test_qido_finds_a_name_by_any_component_group(node, name):
    found = {row["00100020"]["Value"][0] for row in qido_rows(node, name)}
    assert found == SEARCHES[name]


@pytest.mark.parametrize("name", list(SEARCHES))
def test_cfind_finds_a_name_by_any_component_group(node, name):
    found = cfind_names(node, name)
    assert set(found) == SEARCHES[name]
    for patient_id, returned in found.items():
        # The whole name, every group, comes back (an empty trailing group is not kept).
        assert returned == PATIENTS[patient_id].rstrip("=")


def test_qido_answers_split_a_name_into_its_groups(node):
    """PS3.18 F.2.2, as WADO-RS metadata of the same instance does it."""
    names = {
        row["00100020"]["Value"][0]: row["00100010"]["Value"][0] for row in qido_rows(node, "*")
    }
    assert names["K1"] == {
        "Alphabetic": "Hong^Gildong",
        "Ideographic": "洪^吉洞",
        "Phonetic": "홍^길동",
    }
    assert names["K2"] == {"Alphabetic": "Hong^Minsu"}
    assert names["K5"] == {"Ideographic": "朴^英姬", "Phonetic": "박^영희"}
    assert names["K6"] == {"Alphabetic": "Hong^Gildong"}
    client = dicomweb_client(node, ("dicomweb.read",))
    study = qido_rows(node, "홍^길동")[0]["0020000D"]["Value"][0]
    metadata = client.retrieve_study_metadata(study)[0]
    assert metadata["00100010"]["Value"][0] == names["K1"]


def test_findscu_finds_a_name_by_its_phonetic_group(node, tmp_path: Path):
    """dcmtk's findscu, as a modality or workstation would ask."""
    for name, expected in (("홍^길동", {"K1"}), ("Hong*", {"K1", "K2", "K6"})):
        out = tmp_path / f"out{len(expected)}"
        out.mkdir()
        result = run_dcmtk(
            "findscu", "-S", "-aet", "FINDER", "-aec", "DICOMNODE", "-X", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", "SpecificCharacterSet=ISO_IR 192",
            "-k", f"PatientName={name}", "-k", "PatientID",
            "127.0.0.1", str(node.dimse.port),
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        answers = [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]
        assert {str(a.PatientID) for a in answers} == expected
        for answer in answers:
            assert str(answer.PatientName) == PATIENTS[str(answer.PatientID)].rstrip("=")


def test_a_patient_id_keeps_its_wildcards(node):
    """Patient ID is matched as C-FIND matches it (PS3.4 C.2.2.2.4), over both services."""
    client = dicomweb_client(node, ("dicomweb.read",))
    rows = client.search_for_studies(search_filters={"PatientID": "K?"})
    assert {row["00100020"]["Value"][0] for row in rows} == set(PATIENTS)
    assert set(cfind_names(node, "*")) == set(PATIENTS)
    ae = AE("FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = "K*"
    try:
        answers = [
            a
            for status, a in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            )
            if status.Status == 0xFF00
        ]
    finally:
        assoc.release()
    assert {str(a.PatientID) for a in answers} == set(PATIENTS)


def test_qido_answers_in_xml_carry_the_groups(node):
    """multipart/related; type="application/dicom+xml" (PS3.18 10.6.3.3, required): one PS3.19
    document per match, the name in its three groups; an Accept it cannot meet is a 406."""
    headers = {"Authorization": f"Bearer {token_for(node, ('dicomweb.read',))}"}
    url = f"{dicomweb_url(node)}/studies"
    response = requests.get(
        url,
        params={"PatientName": "홍^길동"},
        headers={**headers, "Accept": 'multipart/related; type="application/dicom+xml"'},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("multipart/related")
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + response.content)
    documents = [part.get_payload(decode=True) for part in message.iter_parts()]
    assert len(documents) == 1
    ns = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"
    name = ElementTree.fromstring(documents[0]).find(
        f"{ns}DicomAttribute[@tag='00100010']/{ns}PersonName"
    )
    groups = {
        group: "^".join(part.text for part in name.find(f"{ns}{group}"))
        for group in ("Alphabetic", "Ideographic", "Phonetic")
    }
    assert groups == {"Alphabetic": "Hong^Gildong", "Ideographic": "洪^吉洞", "Phonetic": "홍^길동"}
    refused = requests.get(url, headers={**headers, "Accept": "image/png"}, timeout=30)
    assert refused.status_code == 406 and refused.json()["error"] == "NotAcceptable"
