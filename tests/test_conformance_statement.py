"""docs/conformance-statement.md is true of the running node.

Its tables are parsed and each row is checked against a node on loopback, as a peer would see
it: every listed SOP class and transfer syntax is proposed (pynetdicom, dcmtk echoscu and
storescu) and must be accepted in the listed role; a sample of unlisted ones must be rejected;
the association parameters and extended negotiation are read from the A-ASSOCIATE-AC; the node
as Storage SCU is watched from a C-MOVE destination; C-FIND keys and character sets are asked
for; every DICOMweb route and media type is requested over HTTP. Nothing is compared with the
constants the code reads (pynetdicom's lists, the node's settings).
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
from io import BytesIO
from pathlib import Path

import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.config import Peer, read_settings
from dicomnode.core.model import Source
from dicomnode.serve import Node
from tests.conftest import dicomweb_url, free_port, run_dcmtk, token_for, write_config
from tests.factory import make_ct
from tests.test_robustness import issue, make_ca

DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance-statement.md"
CALLER = "CONFORMANCE"
DESTINATION = "MOVEDEST"
MAX_CONTEXTS = 128  # presentation context IDs are odd numbers 1-255


# --- the statement's tables ---------------------------------------------------------------


def table(number: str) -> list[dict[str, str]]:
    """The rows of "Table {number}." of the statement, each a dict by column heading."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(f"**Table {number}."))
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if not line.strip() and rows:
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    heading, _rule, *body = rows
    assert all(len(row) == len(heading) for row in body), f"Table {number}: ragged row"
    return [dict(zip(heading, row, strict=True)) for row in body]


def test_the_tables_are_there():
    """The test below means something only if the statement lists what a peer needs."""
    assert len(table("A-1")) > 100 and len(table("3-3")) >= 4 and len(table("4-1")) >= 20
    assert len(table("3-1")) == 7 and len(table("4-2")) > 20


# --- the node -----------------------------------------------------------------------------


class Destination:
    """A pynetdicom Storage SCP as C-MOVE destination that records what the node proposes."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proposed: list[tuple[str, tuple[str, ...]]] = []
        self.received: dict[str, str] = {}  # SOP Instance UID -> transfer syntax it came in
        self.lock = threading.Lock()
        ae = AE(DESTINATION)
        ae.add_supported_context(CTImageStorage, [RLELossless, "1.2.840.10008.1.2.1"])

        def requested(event: evt.Event) -> None:
            with self.lock:
                for cx in event.assoc.requestor.requested_contexts:
                    self.proposed.append((str(cx.abstract_syntax), tuple(cx.transfer_syntax)))

        def stored(event: evt.Event) -> int:
            with self.lock:
                self.received[str(event.dataset.SOPInstanceUID)] = event.context.transfer_syntax
            return 0x0000

        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_REQUESTED, requested), (evt.EVT_C_STORE, stored)],
        )


@pytest.fixture(scope="module")
def destination():
    dest = Destination()
    yield dest
    dest.server.shutdown()


def part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def node(tmp_path_factory, destination):
    folder = tmp_path_factory.mktemp("conformance")
    peers = [
        Peer("conformance", CALLER, "127.0.0.1", 0, ("echo", "store", "find", "move", "get")),
        Peer("destination", DESTINATION, "127.0.0.1", destination.port, ("store",)),
    ]
    url = f"sqlite:///{folder / 'index.sqlite'}"
    node = Node(read_settings(write_config(folder / "node.toml", folder / "data", url, peers)))
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def stored(node):
    """One uncompressed CT instance with a value in every key of Table 3-7 that the factory
    leaves empty; returns it."""
    ds = make_ct(
        "CONF1",
        "Conform^Ance",
        IssuerOfPatientID="HOSPITAL",
        TimezoneOffsetFromUTC="+0100",
        SeriesDate="20240315",
        SeriesTime="101600",
        BodyPartExamined="CHEST",
        Laterality="R",
        ProtocolName="CHEST ROUTINE",
        PerformedProcedureStepStartDate="20240315",
        PerformedProcedureStepStartTime="101000",
        InstitutionName="General Hospital",
        StationName="CT01",
        Manufacturer="Acme",
        ContentDate="20240315",
        ContentTime="101700",
        AcquisitionDateTime="20240315101650",
        NumberOfFrames=1,
    )
    node.intake.receive_part10(part10(ds), Source("cli"))
    return ds


# --- DIMSE: SOP classes, transfer syntaxes, roles -----------------------------------------


def associate(node: Node, contexts: list, **options) -> object:
    ae = AE(CALLER)
    ae.acse_timeout = 30
    return ae.associate(
        "127.0.0.1", node.dimse.port, contexts=contexts, ae_title="DICOMNODE", **options
    )


def negotiate(node: Node, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
    """Propose each (SOP class, transfer syntax) pair as its own presentation context, 127 to an
    association; whether the node accepted each."""
    accepted: dict[tuple[str, str], bool] = {}
    for start in range(0, len(pairs), MAX_CONTEXTS - 1):
        batch = pairs[start : start + MAX_CONTEXTS - 1]
        # Verification last, so that an association whose other contexts are all rejected
        # is still accepted and its answers can be read.
        contexts = [build_context(sop, ts) for sop, ts in batch]
        assoc = associate(node, [*contexts, build_context("1.2.840.10008.1.1")])
        assert assoc.is_established, "the node rejected a whole association"
        try:
            results = {cx.context_id: cx for cx in assoc.accepted_contexts}
            for n, (sop, ts) in enumerate(batch):
                cx = results.get(2 * n + 1)
                accepted[(sop, ts)] = cx is not None and cx.transfer_syntax == [ts]
        finally:
            assoc.release()
    return accepted


def scp_classes() -> list[str]:
    return [r["SOP Class UID"] for r in table("3-1") + table("A-1") if r["SCP"] == "Yes"]


def test_every_listed_sop_class_and_transfer_syntax_is_accepted(node):
    storage = [r["SOP Class UID"] for r in table("A-1")]
    storage_syntaxes = [r["UID"] for r in table("3-3") if r["SCP accepts"] == "Yes"]
    other = [r["SOP Class UID"] for r in table("3-1") if r["SCP"] == "Yes"]
    other_syntaxes = [r["UID"] for r in table("3-4")]
    pairs = [(s, t) for s in storage for t in storage_syntaxes]
    pairs += [(s, t) for s in other for t in other_syntaxes]
    accepted = negotiate(node, pairs)
    refused = [pair for pair, ok in accepted.items() if not ok]
    assert not refused, f"{len(refused)} listed pairs refused, e.g. {refused[:5]}"


UNLISTED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.31": "Modality Worklist Information Model - FIND",
    "1.2.840.10008.3.1.2.3.3": "Modality Performed Procedure Step",
    "1.2.840.10008.1.20.1": "Storage Commitment Push Model",
    "1.2.840.10008.5.1.4.1.2.4.2": "Composite Instance Root Retrieve - MOVE",
    "1.2.840.10008.5.1.4.1.2.3.1": "Patient/Study Only Query/Retrieve - FIND (retired)",
    "1.2.826.0.1.3680043.8.498.4242": "a private SOP class",
}


def test_a_sample_of_unlisted_ones_is_rejected(node):
    listed = set(scp_classes())
    assert not listed & set(UNLISTED_SOP_CLASSES)
    private_syntax = "1.2.826.0.1.3680043.8.498.4243"
    jpeg_baseline = "1.2.840.10008.1.2.4.50"
    assert jpeg_baseline not in {r["UID"] for r in table("3-4")}
    pairs = [(sop, "1.2.840.10008.1.2.1") for sop in UNLISTED_SOP_CLASSES]
    pairs += [
        (CTImageStorage, private_syntax),
        (StudyRootQueryRetrieveInformationModelFind, jpeg_baseline),
    ]
    accepted = negotiate(node, pairs)
    assert not any(accepted.values()), [p for p, ok in accepted.items() if ok]


def test_echoscu_and_storescu_are_answered(node, tmp_path):
    """dcmtk as a modality: C-ECHO, and C-STORE of a CT in a listed compressed syntax (RLE),
    which the node keeps as it arrived."""
    echo = run_dcmtk(
        "echoscu", "-aet", CALLER, "-aec", "DICOMNODE", "127.0.0.1", str(node.dimse.port)
    )
    assert echo.returncode == 0, echo.stdout + echo.stderr
    ds = make_ct("CONF2", "Store^Scu", size=16)
    ds.compress(RLELossless)
    path = tmp_path / "rle.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert RLELossless in {r["UID"] for r in table("3-3") if r["SCP accepts"] == "Yes"}
    sent = run_dcmtk(
        "storescu",
        "-xr",
        "-aet",
        CALLER,
        "-aec",
        "DICOMNODE",
        "127.0.0.1",
        str(node.dimse.port),
        str(path),
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    headers = {"Authorization": f"Bearer {token_for(node, ('dicomweb.read',))}"}
    rows = requests.get(
        f"{dicomweb_url(node)}/studies/{ds.StudyInstanceUID}/instances",
        params={"includefield": "AvailableTransferSyntaxUID"},
        headers=headers,
        timeout=30,
    ).json()
    assert rows[0]["00083002"]["Value"] == [RLELossless]


def user_items(node: Node, contexts: list, ext_neg: list) -> list:
    """The user information items of the node's A-ASSOCIATE-AC to a request carrying
    `ext_neg`, as received."""
    assoc = associate(node, contexts, ext_neg=ext_neg)
    assert assoc.is_established
    assoc.release()
    return list(assoc.acceptor.primitive.user_information)


def test_association_parameters(node):
    rows = {r["Parameter"]: r["Value"] for r in table("3-2")}
    ae = AE(CALLER)
    contexts = [build_context("1.2.840.10008.1.1")]
    assoc = ae.associate("127.0.0.1", node.dimse.port, contexts=contexts, ae_title="ANYTHING")
    assert rows["Called AE Title"].startswith("any") and assoc.is_established
    try:
        acceptor = assoc.acceptor
        assert acceptor.implementation_class_uid == rows["Implementation Class UID"]
        assert acceptor.implementation_version_name == rows["Implementation Version Name"]
        assert str(acceptor.maximum_length) == rows["Maximum PDU length received"].split()[0]
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert rows["Application Context Name"] == "1.2.840.10008.3.1.1.1"


def test_the_association_limit(node):
    """Table 3-2: beyond the listed number, an association is rejected as the text says."""
    rows = {r["Parameter"]: r["Value"] for r in table("3-2")}
    limit = int(rows["Maximum associations"].split()[0])
    contexts = [build_context("1.2.840.10008.1.1")]
    held = [associate(node, contexts) for _ in range(limit)]
    try:
        assert all(a.is_established for a in held)
        extra = associate(node, contexts)
        assert extra.is_rejected
        # rejected-transient (2), service provider presentation related (3), local limit (2)
        answer = extra.acceptor.primitive
        assert (answer.result, answer.result_source, answer.diagnostic) == (2, 3, 2)
    finally:
        for a in held:
            a.release()


def test_extended_negotiation(node):
    rows = {r["Item"]: r["Support"] for r in table("3-5")}
    ext = SOPClassExtendedNegotiation()
    ext.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
    ext.service_class_application_information = b"\x01\x01\x01\x01"
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid = CTImageStorage
    common.service_class_uid = "1.2.840.10008.4.2"
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"someone"
    identity.positive_response_requested = True
    role = build_role(CTImageStorage, scu_role=False, scp_role=True)
    contexts = [
        build_context(StudyRootQueryRetrieveInformationModelFind),
        build_context(CTImageStorage),
    ]
    items = user_items(node, contexts, [ext, common, window, identity, role])
    kinds = {type(item) for item in items}
    expected = {
        "SOP Class Extended Negotiation": SOPClassExtendedNegotiation,
        "SOP Class Common Extended Negotiation": SOPClassCommonExtendedNegotiation,
        "Asynchronous Operations Window": AsynchronousOperationsWindowNegotiation,
        "User Identity Negotiation": UserIdentityNegotiation,
    }
    for item, kind in expected.items():
        assert rows[item].startswith("Not supported (no reply")
        assert kind not in kinds, f"the node answered {item}"
    assert rows["SCP/SCU Role Selection"].startswith("Accepted for the Storage SOP classes")
    roles = [i for i in items if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
    assert [(r.sop_class_uid, r.scp_role) for r in roles] == [(CTImageStorage, True)]


def test_as_storage_scu_the_node_proposes_what_the_statement_says(node, stored, destination):
    """3.2.2.2 and Table 3-3's SCU column, watched from a C-MOVE destination."""
    rle = make_ct("CONF3", "Move^Me", size=16)
    rle.compress(RLELossless)
    node.intake.receive_part10(part10(rle), Source("cli"))
    always = {r["UID"] for r in table("3-3") if r["SCU proposes"] == "Always"}
    assert always == {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
    for study in (stored.StudyInstanceUID, rle.StudyInstanceUID):
        ae = AE(CALLER)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study
        statuses = [
            s.Status
            for s, _ in assoc.send_c_move(
                identifier, DESTINATION, StudyRootQueryRetrieveInformationModelMove
            )
        ]
        assoc.release()
        assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    with destination.lock:
        proposals = list(destination.proposed)
        received = dict(destination.received)
    ct = [set(ts) for sop, ts in proposals if sop == CTImageStorage]
    assert always in ct  # one context with both uncompressed syntaxes, every time
    assert {RLELossless} in ct  # and the stored syntax when it is neither
    assert not any(set(ts) - always - {RLELossless} for ts in ct)
    assert received[str(rle.SOPInstanceUID)] == RLELossless
    assert received[str(stored.SOPInstanceUID)] in always


# --- Query/Retrieve keys and character sets -----------------------------------------------


def cfind(
    node: Node, identifier: Dataset, model: str = StudyRootQueryRetrieveInformationModelFind
) -> list[Dataset]:
    ae = AE(CALLER)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        answers = []
        for status, answer in assoc.send_c_find(identifier, model):
            assert status.Status in (0x0000, 0xFF00), hex(status.Status)
            if status.Status == 0xFF00:
                answers.append(answer)
        return answers
    finally:
        assoc.release()


COMPUTED_NOT_MATCHED = {
    "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances",
    "AvailableTransferSyntaxUID", "InstanceAvailability",
}  # fmt: skip


@pytest.mark.parametrize("level", ["PATIENT", "STUDY", "SERIES", "IMAGE"])
def test_every_listed_key_is_returned_and_matched(node, stored, level):
    keys = next(r["Keys"] for r in table("3-7") if r["Level"] == level).split(", ")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    identifier.PatientID = "CONF1"
    for key in keys:
        setattr(identifier, key, identifier.get(key, ""))
    answers = cfind(node, identifier, PatientRootQueryRetrieveInformationModelFind)
    assert len(answers) == 1
    answer = answers[0]
    empty = [k for k in keys if k not in answer or answer[k].value in (None, "")]
    assert not empty, f"keys returned empty: {empty}"
    for key in keys:
        if key in COMPUTED_NOT_MATCHED:
            continue
        value = answer[key].value
        asked = Dataset()
        asked.QueryRetrieveLevel = level
        asked.PatientID = "CONF1"
        setattr(asked, key, value)
        assert len(cfind(node, asked, PatientRootQueryRetrieveInformationModelFind)) == 1, key
        if key == "PatientID":
            continue
        wrong = Dataset()
        wrong.QueryRetrieveLevel = level
        wrong.PatientID = "NOBODY"
        setattr(wrong, key, value)
        assert cfind(node, wrong, PatientRootQueryRetrieveInformationModelFind) == [], key


def charset_value(term: str) -> str | list[str]:
    """Specific Character Set for `term`: an ISO 2022 code extension comes after the default
    repertoire (an empty first value), as a modality writes it."""
    return ["", term] if term.startswith("ISO 2022") else term


@pytest.mark.parametrize("row", range(len(table("5-1"))))
def test_character_sets(node, row):
    spec = table("5-1")[row]
    patient_id = f"CS{row}"
    ds = make_ct(patient_id, spec["Name"], SpecificCharacterSet=charset_value(spec["Stored in"]))
    node.intake.receive_part10(part10(ds), Source("cli"))
    asked = Dataset()
    asked.SpecificCharacterSet = charset_value(spec["Queried in"])
    asked.QueryRetrieveLevel = "STUDY"
    asked.PatientID = patient_id
    group = (
        next(g for g in spec["Name"].split("=") if g and not g.isascii())
        if not spec["Name"].isascii()
        else spec["Name"]
    )
    asked.PatientName = group
    answers = cfind(node, asked)
    assert [str(a.PatientName) for a in answers] == [spec["Name"].rstrip("=")]
    charset = answers[0].get("SpecificCharacterSet")
    assert charset == ("ISO_IR 192" if not spec["Name"].isascii() else None)


# --- DICOMweb ----------------------------------------------------------------------------


def headers(node: Node, scopes: tuple[str, ...], **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(node, scopes)}", **extra}


def multipart_body(datasets: list[Dataset]) -> tuple[bytes, str]:
    boundary = "conformance-boundary"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part10(ds) + b"\r\n"
        for ds in datasets
    )
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def route_url(node: Node, route: str, ds: Dataset) -> str:
    path = (
        route.replace("{study}", ds.StudyInstanceUID)
        .replace("{series}", ds.SeriesInstanceUID)
        .replace("{instance}", ds.SOPInstanceUID)
        .replace("{frames}", "1")
        .replace("{frame}", "1")
        .replace("{tag}", "7FE00010")
    )
    return dicomweb_url(node) + path


@pytest.mark.parametrize("row", range(len(table("4-1"))))
def test_every_route_is_served_with_its_scope(node, stored, row):
    spec = table("4-1")[row]
    method, scope, success = spec["Method"], spec["Scope"], int(spec["Success"])
    ds = stored
    body, content_type = b"", None
    if method in ("POST", "DELETE"):
        ds = make_ct(f"ROUTE{row}", "Route^Test", size=8)
        if method == "DELETE":
            node.intake.receive_part10(part10(ds), Source("cli"))
        body, content_type = multipart_body([ds]) if method == "POST" else (b"", None)
    url = route_url(node, spec["Route"], ds)
    extra = {"Content-Type": content_type} if content_type else {}
    anonymous = requests.request(method, url, data=body, headers=extra, timeout=60)
    assert anonymous.status_code == 401 and "Bearer" in anonymous.headers["WWW-Authenticate"]
    others = tuple(s for s in ("dicomweb.read", "dicomweb.write", "dicomweb.delete") if s != scope)
    wrong = requests.request(
        method, url, data=body, headers=headers(node, others, **extra), timeout=60
    )
    assert wrong.status_code == 403, wrong.text[:300]
    answer = requests.request(
        method, url, data=body, headers=headers(node, (scope,), **extra), timeout=60
    )
    assert answer.status_code == success, answer.text[:300]


# Rows of Table 4-2 that depend on the WADO media-type work under way (dicomweb/media.py,
# wado.py) at the time of writing: when that work changes what the node serves, these rows of
# the statement (and nothing else) are expected to change with it.
DEPENDS_ON_MEDIA_WORK = {
    ("Instance", 'multipart/related; type="application/octet-stream"'),
    ("Study (instances)", 'multipart/related; type="application/octet-stream"'),
    ("Instance", "application/dicom"),
    ("Study (instances)", "application/dicom"),
    ("Instance metadata", 'multipart/related; type="application/dicom+xml"'),
    ("Study metadata", 'multipart/related; type="application/dicom+xml"'),
    ("Frames", 'multipart/related; type="application/octet-stream"; transfer-syntax=*'),
    ("Frames", "application/octet-stream"),
    ("Instance rendered", "image/gif"),
    ("Series rendered", 'multipart/related; type="image/jpeg"'),
    ("Study rendered", 'multipart/related; type="image/jpeg"'),
}

RESOURCE_ROUTES = {
    "Study (instances)": "/studies/{study}",
    "Series (instances)": "/studies/{study}/series/{series}",
    "Instance": "/studies/{study}/series/{series}/instances/{instance}",
    "Study metadata": "/studies/{study}/metadata",
    "Instance metadata": "/studies/{study}/series/{series}/instances/{instance}/metadata",
    "Frames": "/studies/{study}/series/{series}/instances/{instance}/frames/1",
    "Pixel Data bulkdata": (
        "/studies/{study}/series/{series}/instances/{instance}/bulkdata/7FE00010"
    ),
    "Instance rendered": "/studies/{study}/series/{series}/instances/{instance}/rendered",
    "Frame rendered": "/studies/{study}/series/{series}/instances/{instance}/frames/1/rendered",
    "Series rendered": "/studies/{study}/series/{series}/rendered",
    "Study rendered": "/studies/{study}/rendered",
    "Instance thumbnail": "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
    "Frame thumbnail": "/studies/{study}/series/{series}/instances/{instance}/frames/1/thumbnail",
    "Series thumbnail": "/studies/{study}/series/{series}/thumbnail",
    "Study thumbnail": "/studies/{study}/thumbnail",
    "QIDO-RS search": "/studies",
}


def media_type_of(content_type: str) -> str:
    """``type/subtype`` and, for multipart, its ``type`` parameter, as the statement writes it."""
    main = content_type.split(";")[0].strip().lower()
    related = re.search(r'type="?([^";]+)"?', content_type[len(main) :])
    return (
        f'{main}; type="{related.group(1)}"' if main.startswith("multipart/") and related else main
    )


@pytest.mark.parametrize("row", range(len(table("4-2"))))
def test_every_media_type_is_answered_as_listed(node, stored, row):
    spec = table("4-2")[row]
    resource, media_type, served = spec["Resource"], spec["Media type"], spec["Served"]
    status, _, answer_type = served.partition(" ")
    if resource == "STOW-RS request body":
        ds = make_ct(f"MEDIA{row}", "Media^Type", size=8)
        body, multipart = multipart_body([ds])
        content_type = multipart if media_type.startswith("multipart/") else media_type
        if not media_type.startswith("multipart/"):
            body = part10(ds)
        response = requests.post(
            f"{dicomweb_url(node)}/studies",
            data=body,
            headers=headers(node, ("dicomweb.write",), **{"Content-Type": content_type}),
            timeout=60,
        )
    else:
        url = route_url(node, RESOURCE_ROUTES[resource], stored)
        response = requests.get(
            url, headers=headers(node, ("dicomweb.read",), Accept=media_type), timeout=60
        )
    assert response.status_code == int(status), (response.status_code, response.text[:300])
    if answer_type:
        assert media_type_of(response.headers["Content-Type"]) == answer_type
    elif response.status_code == 406:
        assert response.json()["status"] == 406  # a JSON reason naming what can be sent


def test_media_rows_named_as_depending_on_other_work_exist():
    """The marked rows are rows of the statement (so they can be found and adjusted)."""
    rows = {(r["Resource"], r["Media type"]) for r in table("4-2")}
    assert rows >= DEPENDS_ON_MEDIA_WORK


@pytest.mark.parametrize("offered", ["uncompressed", "rle"])
def test_cget_sends_as_stored_or_decompressed(node, offered):
    """3.2.5 Query/Retrieve - GET: sub-operations over the caller's association, in its SCP
    role; as stored when the caller accepted the stored syntax, else Explicit VR Little
    Endian."""
    rle = make_ct(f"CGET-{offered}", "Get^Me", size=16)
    rle.compress(RLELossless)
    node.intake.receive_part10(part10(rle), Source("cli"))
    syntaxes = [RLELossless] if offered == "rle" else ["1.2.840.10008.1.2.1"]
    ae = AE(CALLER)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, syntaxes)
    received: dict[str, str] = {}

    def stored(event: evt.Event) -> int:
        received[str(event.dataset.SOPInstanceUID)] = event.context.transfer_syntax
        return 0x0000

    assoc = ae.associate(
        "127.0.0.1",
        node.dimse.port,
        ae_title="DICOMNODE",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, stored)],
    )
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = rle.StudyInstanceUID
    try:
        statuses = [
            s.Status
            for s, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
        ]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert received == {str(rle.SOPInstanceUID): syntaxes[0]}


def test_tls_as_described(tmp_path):
    """3.3: DICOM TLS 1.2 or later with the node's certificate; plain TCP (from outside
    `[dimse] plain_networks`) gets an A-ASSOCIATE-RJ."""
    ca = make_ca(tmp_path, "hospital-ca")
    server = issue(
        tmp_path, ca, "localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )  # fmt: skip
    pki = {"server_cert": server[0], "server_key": server[1]}
    config = write_config(
        tmp_path / "tls.toml", tmp_path / "data", f"sqlite:///{tmp_path / 'i.sqlite'}",
        acse_timeout=2,
    )  # fmt: skip
    with config.open("a") as f:
        f.write(
            f'[dimse.tls]\ncert_file = "{pki["server_cert"]}"\nkey_file = "{pki["server_key"]}"\n'
        )
    tls_node = Node(read_settings(config))
    tls_node.start()
    try:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca[0]))
            context.minimum_version = context.maximum_version = version
            ae = AE(CALLER)
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate(
                "127.0.0.1", tls_node.dimse.port, ae_title="DICOMNODE",
                tls_args=(context, "localhost"),
            )  # fmt: skip
            assert assoc.is_established, version
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
        plain = AE(CALLER)
        plain.add_requested_context("1.2.840.10008.1.1")
        assert not plain.associate("127.0.0.1", tls_node.dimse.port).is_established
    finally:
        tls_node.stop()


def store_status(node: Node, ds: Dataset, calling: str = CALLER) -> int:
    ae = AE(calling)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds).Status
    finally:
        assoc.release()


def test_cstore_statuses_as_listed(node):
    """Table 3-6, the statuses a peer can provoke; a caller not configured may store and echo
    (3.2.2.1, require_known_peers is off by default) but not query."""
    listed = {r["Status"] for r in table("3-6")}
    assert {"0x0000", "0x0111", "0xC000"} <= listed
    ds = make_ct("STATUS1", "Status^One", size=8)
    assert store_status(node, ds, calling="STRANGER") == 0x0000
    assert store_status(node, ds) == 0x0000  # the same object again: success, nothing new
    changed = make_ct("STATUS1", "Status^Changed", size=8, sop_uid=ds.SOPInstanceUID)
    assert store_status(node, changed) == 0x0111
    anonymous = make_ct("", "No^Id", size=8)
    del anonymous.PatientID
    assert store_status(node, anonymous) == 0xC000
    ae = AE("STRANGER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = "*"
    try:
        found = [
            s.Status
            for s, _ in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
        ]
    finally:
        assoc.release()
    assert found == [0x0124] and "0x0124" in {r["Status"] for r in table("3-8")}


def test_query_and_retrieve_failures_as_listed(node, stored):
    """Table 3-8's 0xA900 for a level the model has not, 3.2.5's 0xA801 for an unknown C-MOVE
    destination."""
    assert "0xA900" in {r["Status"] for r in table("3-8")}
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "PATIENT"  # Study Root has no PATIENT level
    identifier.PatientID = "CONF1"
    ae = AE(CALLER)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    try:
        found = [
            s.Status
            for s, _ in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
        ]
        move = Dataset()
        move.QueryRetrieveLevel = "STUDY"
        move.StudyInstanceUID = stored.StudyInstanceUID
        moved = [
            s.Status
            for s, _ in assoc.send_c_move(
                move, "NOWHERE", StudyRootQueryRetrieveInformationModelMove
            )
        ]
    finally:
        assoc.release()
    assert found == [0xA900]
    assert moved == [0xA801]


def test_an_oversized_pdu_before_association_is_aborted(node):
    """3.2.2: a PDU announcing more than 256 KiB before the association is agreed gets an
    A-ABORT (service provider, invalid PDU parameter value) before its body is read."""
    text = DOC.read_text(encoding="utf-8")
    assert "longer than 256 KiB (`max_associate_pdu`)" in text
    with socket.create_connection(("127.0.0.1", node.dimse.port), timeout=30) as raw:
        raw.sendall(b"\x01\x00" + (256 * 1024 + 1).to_bytes(4, "big") + b"\x00\x01")
        answer = b""
        while len(answer) < 10:
            chunk = raw.recv(10 - len(answer))
            if not chunk:
                break
            answer += chunk
    # A-ABORT: type 07, length 4, two reserved bytes, source 2 (service provider), reason 6
    assert answer == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
