"""Hostile QIDO-RS parameters and C-FIND keys get a 400 (or a DICOM failure status) with a
clear reason and no internals, before any SQL runs; the node goes on answering.

Found by the hostile-input review (issue 18, item 9): a 50k-character value answered 500 with
the SQL statement (SQLite's LIKE pattern limit), an ``offset`` of 2**63 answered 500 (the
database's integer range). Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from io import BytesIO

import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicomnode.config import Peer
from dicomnode.core.model import Source
from dicomnode.serve import Node
from tests.conftest import dicomweb_url, start_module_node, token_for
from tests.factory import make_ct

FINDER = Peer("finder", "FINDER", "127.0.0.1", 0, ("find",))
INTERNALS = ("select", "sqlite", "psycopg", "traceback", "overflow", "sql:", "python")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def node(request, tmp_path_factory):
    node = start_module_node(request, tmp_path_factory, "qido-limits", [FINDER])
    for number in range(3):
        ds = make_ct(f"L{number}", f"Doe^Jane{number}", SeriesNumber=number + 1)
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        node.intake.receive_part10(buffer.getvalue(), Source("cli"))
    yield node
    node.stop()


def get(node: Node, path: str, params: dict[str, str]) -> requests.Response:
    headers = {"Authorization": f"Bearer {token_for(node, ('dicomweb.read',))}"}
    return requests.get(f"{dicomweb_url(node)}{path}", params=params, headers=headers, timeout=60)


REFUSED = {
    "a 60k-character wildcard value": ("/studies", {"PatientName": "a*" * 30_000}),
    "a 60k-character value": ("/studies", {"StudyDescription": "x" * 60_000}),
    "a 2k-character UID": ("/studies", {"StudyInstanceUID": "1." * 1000 + "1"}),
    "1001 UIDs": ("/studies", {"StudyInstanceUID": ",".join(["1.2.3"] * 1001)}),
    "101 name patterns": ("/studies", {"PatientName": "\\".join(["Doe*"] * 101)}),
    "offset 2**63": ("/studies", {"offset": str(2**63)}),
    "offset of 5000 digits": ("/studies", {"offset": "9" * 5000}),
    "negative offset": ("/studies", {"offset": "-1"}),
    "negative limit": ("/studies", {"limit": "-5"}),
    "non-numeric limit": ("/studies", {"limit": "ten"}),
    "limit in exponent form": ("/studies", {"limit": "1e3"}),
    "limit with underscores": ("/studies", {"limit": "1_000"}),
    "limit in Arabic-Indic digits": ("/studies", {"limit": "\u0661\u0662"}),
    "empty offset": ("/studies", {"offset": ""}),
    "a series number beyond 64 bits": ("/series", {"SeriesNumber": "9" * 25}),
    "a series number beyond 32 bits": ("/series", {"SeriesNumber": "4294967296"}),
    "an unknown 60k-character attribute": ("/studies", {"x" * 60_000: "1"}),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_hostile_parameter_is_a_400_with_a_reason(node, case):
    path, params = REFUSED[case]
    response = get(node, path, params)
    assert response.status_code == 400, response.text[:500]
    body = response.json()
    assert body["status"] == 400 and body["error"] == "InvalidInput"
    assert len(response.content) < 2000  # the reason quotes at most the start of a value
    assert not any(word in body["detail"].lower() for word in INTERNALS), body["detail"]
    assert get(node, "/studies", {}).status_code == 200  # and the node goes on answering


SERVED = {
    "offset 2**63 - 1": ({"offset": str(2**63 - 1)}, 0),
    "offset past the end": ({"offset": "3"}, 0),
    "a huge limit is capped": ({"limit": "9" * 40}, 3),
    "limit with leading zeros": ({"limit": "0002"}, 2),
    "limit 0": ({"limit": "0"}, 0),
    "100 name patterns": ({"PatientName": "\\".join(f"Doe^Jane{n}*" for n in range(100))}, 3),
    "1000 UIDs": ({"StudyInstanceUID": ",".join(generate_uid() for _ in range(1000))}, 0),
}


@pytest.mark.parametrize("case", list(SERVED))
def test_a_bounded_parameter_is_served(node, case):
    params, count = SERVED[case]
    response = get(node, "/studies", params)
    assert response.status_code == 200, response.text[:500]
    assert len(response.json()) == count


def cfind_status(node: Node, **keys: str) -> Dataset:
    ae = AE("FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    try:
        statuses = [
            status
            for status, _ in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            )
        ]
    finally:
        assoc.release()
    return statuses[-1]


@pytest.mark.parametrize(
    "keys",
    [{"PatientName": "a*" * 30_000}, {"StudyID": "9" * 60_000}, {"PatientID": "P" * 2000}],
    ids=["wildcard name", "long value", "long patient id"],
)
def test_cfind_refuses_a_hostile_key_with_cannot_understand(node, keys):
    status = cfind_status(node, **keys)
    assert status.Status == 0xC000, hex(status.Status)
    comment = str(status.get("ErrorComment", "")).lower()
    assert "too long" in comment and not any(word in comment for word in INTERNALS)
    assert cfind_status(node, PatientID="L*").Status == 0x0000
