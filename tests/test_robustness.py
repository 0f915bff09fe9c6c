"""The node against what a hospital network sends it: malformed and hostile objects, broken
PDU streams, many concurrent senders, TLS, and callers it does not know."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import ssl
import struct
import subprocess
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification

from dicomnode.archive import Archive
from dicomnode.config import Peer, read_settings
from dicomnode.core.model import Level
from dicomnode.serve import Node
from tests.conftest import (
    DCMTK_ENV,
    associate_rq,
    dcmtk_tool,
    send_concurrently,
    wait_until,
    write_config,
)
from tests.factory import make_ct, write_series

# --- helpers ----------------------------------------------------------------------------


def http_status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        return json.loads(response.read())


def made_ahead(path: Path) -> bool:
    """An empty temporary file the node made for its next object after answering a C-STORE."""
    return path.parent.name == "tmp" and path.suffix == ".part" and path.stat().st_size == 0


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder below `root` (the SQLite index files and the empty temporary
    files made ahead aside), files with a hash."""
    entries = {}
    for path in root.rglob("*"):
        if path.name.startswith("index.sqlite") or (path.is_file() and made_ahead(path)):
            continue
        key = str(path.relative_to(root))
        entries[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return entries


def blob_files(data_dir: Path) -> list[Path]:
    root = data_dir / "blobs"
    return sorted(p for p in root.rglob("*") if p.is_file() and root / "tmp" not in p.parents)


def part10(path: Path, dataset: Dataset, affected_uid: str | None = None) -> Path:
    """Write `dataset` as a Part 10 file whose meta names `affected_uid` (default: the data
    set's own SOP Instance UID); pynetdicom's chunked sending takes the C-STORE request's
    Affected SOP Instance UID from there, whatever the data set says."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = affected_uid or dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    body = Dataset({tag: element for tag, element in dataset.items() if tag.group != 2})
    buffer.write(encode(body, False, True))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def chunked_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send files as they are, with the request's UIDs taken from their file meta."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def scu(calling: str = "TESTSCU") -> AE:
    ae = AE(calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae


def store(port: int, *items: Dataset | Path, calling: str = "TESTSCU", **kwargs) -> list:
    """C-STORE each item in one association; returns the response status data sets."""
    assoc = scu(calling).associate("127.0.0.1", port, ae_title="DICOMNODE", **kwargs)
    assert assoc.is_established, "association not established"
    try:
        return [assoc.send_c_store(item) for item in items]
    finally:
        assoc.release()


def is_failure(status: Dataset) -> bool:
    code = status.Status
    return 0xC000 <= code <= 0xCFFF or code == 0xA900


# --- 6. bad input over DIMSE ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_bad_objects_are_refused_and_leave_the_archive_unchanged(
    start_node, tmp_path, chunked_sending
):
    node = start_node()
    port = node.dimse.port
    study, series = generate_uid(), generate_uid()
    original = make_ct(study_uid=study, series_uid=series, size=16, seed=1)
    original_path = part10(tmp_path / "in" / "original.dcm", original)
    [status] = store(port, original_path)
    assert status.Status == 0x0000

    no_sop_uid = make_ct(size=16)
    del no_sop_uid.SOPInstanceUID
    traversal = make_ct(size=16, sop_uid="1.2.3/../../x", study_uid="../../etc")
    traversal_study = make_ct(size=16, study_uid="../../../../../../../tmp/dicomnode-escape")
    no_patient_id = make_ct(size=16)
    del no_patient_id.PatientID
    empty_patient_id = make_ct(size=16, PatientID="")
    other_uid = make_ct(size=16)
    bad = {
        "no SOPInstanceUID": part10(tmp_path / "in" / "a.dcm", no_sop_uid, generate_uid()),
        "traversal UIDs in request and data set": part10(tmp_path / "in" / "b.dcm", traversal),
        "traversal UID in data set only": part10(
            tmp_path / "in" / "c.dcm", traversal, generate_uid()
        ),
        "traversal StudyInstanceUID": part10(tmp_path / "in" / "d.dcm", traversal_study),
        "no PatientID": part10(tmp_path / "in" / "e.dcm", no_patient_id),
        "empty PatientID": part10(tmp_path / "in" / "f.dcm", empty_patient_id),
    }
    mismatch = part10(tmp_path / "in" / "g.dcm", other_uid, generate_uid())
    conflicting = make_ct(study_uid=study, series_uid=series, size=16, seed=2)
    conflicting.SOPInstanceUID = original.SOPInstanceUID
    conflict = part10(tmp_path / "in" / "h.dcm", conflicting)
    [blob] = blob_files(tmp_path / "data")
    blob_bytes = blob.read_bytes()

    counts = node.archive.counts()
    before = snapshot(tmp_path)
    *refusals, mismatched, conflicted, resent = store(
        port, *bad.values(), mismatch, conflict, original_path
    )
    for what, status in zip(bad, refusals, strict=True):
        assert is_failure(status), f"{what}: status 0x{status.Status:04X}"
        assert status.get("ErrorComment"), f"{what}: no Error Comment"
    assert mismatched.Status == 0xA900, "SOPInstanceUID differs from the request's"
    assert conflicted.Status == 0x0111, "different object under a stored UID"
    assert resent.Status == 0x0000, "an identical re-send succeeds"

    assert node.archive.counts() == counts
    assert snapshot(tmp_path) == before
    assert blob.read_bytes() == blob_bytes
    assert not Path("/tmp/dicomnode-escape").exists()
    tmp = tmp_path / "data" / "blobs" / "tmp"
    assert all(made_ahead(p) for p in tmp.iterdir()), "a refused object left bytes in tmp/"

    [status] = store(port, make_ct(size=16))  # the node still takes a good object
    assert status.Status == 0x0000
    assert node.archive.counts()["instances"] == counts["instances"] + 1


# --- 7. a truncated PDU stream ---------------------------------------------------------------


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        assert chunk, "connection closed before a PDU arrived"
        header += chunk
    pdu_type, length = header[0], struct.unpack(">I", header[2:6])[0]
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "connection closed inside a PDU"
        body += chunk
    return pdu_type, body


def store_pdus(dataset: Dataset) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE request for `dataset` on context 1."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = dataset.SOPClassUID
    request.AffectedSOPInstanceUID = dataset.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(encode(dataset, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(1, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


@pytest.mark.parametrize("cut", ["inside the data set", "inside the command"])
def test_a_truncated_pdu_stream_stores_nothing_and_the_node_goes_on(start_node, tmp_path, cut):
    node = start_node()
    port = node.dimse.port
    counts = node.archive.counts()
    before = snapshot(tmp_path / "data")
    dataset = make_ct(size=32)
    pdus = store_pdus(dataset)
    assert len(pdus) >= 2  # the command, then the data set

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(associate_rq(port))
        pdu_type, _ = read_pdu(sock)
        assert pdu_type == 0x02, "A-ASSOCIATE-AC expected"
        if cut == "inside the data set":
            sock.sendall(b"".join(pdus[:-1]))
            last = pdus[-1]
        else:
            last = pdus[0]
        # The PDU header declares more bytes than follow: send half of them, then hang up.
        declared = struct.unpack(">I", last[2:6])[0]
        sock.sendall(last[:6] + last[6 : 6 + declared // 2])
    wait_until(lambda: node.dimse.active_associations() == 0, 30, "the broken association to end")

    assert node.archive.counts() == counts
    assert snapshot(tmp_path / "data") == before
    [status] = store(port, make_ct(size=16))
    assert status.Status == 0x0000
    assert node.archive.counts()["instances"] == counts["instances"] + 1


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Read until the other end closes the connection; False when it is still open after
    `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_a_peer_that_stops_inside_a_pdu_is_dropped_after_the_network_timeout(start_node, tmp_path):
    """A modality that dies mid-transfer without closing its connection (power loss, a
    firewall dropping the flow) must not hold an association slot forever."""
    node = start_node(network_timeout=2)
    port = node.dimse.port
    counts = node.archive.counts()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(associate_rq(port))
        assert read_pdu(sock)[0] == 0x02
        command, *_ = store_pdus(make_ct(size=32))
        sock.sendall(command[:16])  # a PDU header and a few bytes, then silence
        wait_until(
            lambda: node.dimse.active_associations() == 0, 20, "the stalled association to end"
        )
        assert closed_by_peer(sock, 10), "the node kept the stalled connection open"
    assert node.archive.counts() == counts
    [status] = store(port, make_ct(size=16))
    assert status.Status == 0x0000


def test_garbage_and_silent_connections_are_closed(start_node):
    node = start_node(acse_timeout=1, network_timeout=2)
    port = node.dimse.port
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as garbage,
        socket.create_connection(("127.0.0.1", port), timeout=10) as silent,
    ):
        garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        [status] = store(port, make_ct(size=16))  # served while the two are open
        assert status.Status == 0x0000
        assert closed_by_peer(silent, 10), "a connection that never associates stays open"
        assert closed_by_peer(garbage, 10), "a connection that sent garbage stays open"
    wait_until(lambda: node.dimse.active_associations() == 0, 10, "connections to end")
    assert node.archive.counts()["instances"] == 1


def test_sigterm_ends_associations_still_open_after_the_drain_timeout(
    serve_node, tmp_path, database_url
):
    """drain_timeout bounds a shutdown: an idle association and a peer stalled inside a PDU are
    ended when it expires, and the process exits 0 well before network_timeout."""
    config = write_config(tmp_path / "drain.toml", tmp_path / "data", database_url)
    config.write_text(
        config.read_text().replace("drain_timeout = 10", "drain_timeout = 1\nnetwork_timeout = 120")
    )
    node = serve_node(config=config)
    port = node.dimse_port
    idle = scu().associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert idle.is_established
    with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
        stalled.sendall(associate_rq(port))
        assert read_pdu(stalled)[0] == 0x02
        stalled.sendall(store_pdus(make_ct(size=32))[0][:16])
        wait_until(
            lambda: http_status(node.http_port)["active_associations"] == 2,
            10,
            "both associations to be open",
        )
        node.process.send_signal(signal.SIGTERM)
        try:
            code = node.process.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail("dicomnode serve still runs 15 s after SIGTERM with drain_timeout = 1")
        assert code == 0
        assert closed_by_peer(stalled, 5)
    wait_until(lambda: not idle.is_alive(), 10, "the idle association to be ended by the node")
    assert not idle.is_established
    outcomes = sorted(e["outcome"] for e in node.log_events("association"))
    assert outcomes == ["aborted", "aborted"]


def test_associations_beyond_max_associations_are_rejected_until_one_ends(start_node):
    node = start_node(max_associations=2)
    port = node.dimse.port
    first = scu("FIRST").associate("127.0.0.1", port, ae_title="DICOMNODE")
    second = scu("SECOND").associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert first.is_established and second.is_established
    try:
        third = scu("THIRD").associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert third.is_rejected
        first.release()
        wait_until(lambda: node.dimse.active_associations() == 1, 10, "the first to end")
        [status] = store(port, make_ct(size=16), calling="THIRD")
        assert status.Status == 0x0000
    finally:
        for assoc in (first, second):
            if assoc.is_established:
                assoc.release()


# --- 8. load -------------------------------------------------------------------------------


def test_eight_concurrent_senders_of_200_instances_all_land(serve_node, tmp_path, database_url):
    node = serve_node()
    port = node.dimse_port
    folders = [tmp_path / "in" / f"s{i}" for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda folder: write_series(folder, 200, size=16), folders))
    send_concurrently(port, folders)
    assert node.terminate() == 0
    associations = node.log_events("association")
    assert len(associations) == 8
    assert sorted(a["store"] for a in associations) == [200] * 8

    data_dir = tmp_path / "data"
    assert len(blob_files(data_dir)) == 1600
    archive = Archive(data_dir, database_url)
    try:
        counts = archive.counts()
    finally:
        archive.close()
    assert counts["instances"] == 1600
    assert counts["series"] == 8


# --- 9. TLS --------------------------------------------------------------------------------


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def issue(folder: Path, ca: tuple[Path, Path], name: str, extensions: str) -> tuple[Path, Path]:
    """A key and a certificate for `name`, signed by `ca`."""
    key, csr, cert, ext = (folder / f"{name}.{suffix}" for suffix in ("key", "csr", "pem", "ext"))
    ext.write_text(extensions)
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext,
    )  # fmt: skip
    return cert, key


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA certificate and its key."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "hospital-ca")
    server = issue(
        folder,
        ca,
        "localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    client = issue(folder, ca, "workstation", "extendedKeyUsage=clientAuth\n")
    # A client certificate from a CA the node does not trust.
    stranger = issue(
        folder, make_ca(folder, "other-ca"), "stranger", "extendedKeyUsage=clientAuth\n"
    )
    return {
        "ca": ca[0],
        "server_cert": server[0],
        "server_key": server[1],
        "client_cert": client[0],
        "client_key": client[1],
        "stranger_cert": stranger[0],
        "stranger_key": stranger[1],
    }


@pytest.fixture
def tls_node(tmp_path: Path, database_url: str) -> Iterator:
    nodes: list[Node] = []

    def start(tls_lines: list[str], **dimse: object) -> Node:
        # A connection that fails before its A-ASSOCIATE-RQ (as a failed TLS handshake does)
        # is held by pynetdicom for the ACSE timeout.
        dimse.setdefault("acse_timeout", 2)
        config = write_config(tmp_path / "tls.toml", tmp_path / "data", database_url, **dimse)
        with config.open("a") as f:
            f.write("[dimse.tls]\n" + "\n".join(tls_lines) + "\n")
        node = Node(read_settings(config))
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def client_context(pki: dict[str, Path], cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if cert:
        context.load_cert_chain(pki[f"{cert}_cert"], pki[f"{cert}_key"])
    return context


def tls_associate(port: int, context: ssl.SSLContext | None, hostname: str = "localhost"):
    tls_args = (context, hostname) if context else None
    return scu().associate("127.0.0.1", port, ae_title="DICOMNODE", tls_args=tls_args)


def test_tls_echo_and_store_and_plain_tcp_refused(tls_node, pki):
    node = tls_node([f'cert_file = "{pki["server_cert"]}"', f'key_file = "{pki["server_key"]}"'])
    port = node.dimse.port

    assoc = tls_associate(port, client_context(pki))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(make_ct(size=16)).Status == 0x0000
    finally:
        assoc.release()
    assert node.archive.counts()["instances"] == 1

    plain = tls_associate(port, None)
    assert not plain.is_established
    # A client that does not trust the node's CA refuses the node.
    untrusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    assert not tls_associate(port, untrusting).is_established
    wait_until(lambda: node.dimse.active_associations() == 0, 30, "failed associations to end")
    assert node.archive.counts()["instances"] == 1


def test_tls_with_required_client_certificates(tls_node, pki, tmp_path):
    node = tls_node(
        [
            f'cert_file = "{pki["server_cert"]}"',
            f'key_file = "{pki["server_key"]}"',
            f'ca_file = "{pki["ca"]}"',
            "require_client_cert = true",
        ]
    )
    port = node.dimse.port

    assoc = tls_associate(port, client_context(pki, "client"))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(make_ct(size=16)).Status == 0x0000
    finally:
        assoc.release()

    # dcmtk's storescu, as a hospital's own tooling would connect.
    files = write_series(tmp_path / "in", 3, size=16)
    storescu = subprocess.run(
        [dcmtk_tool("storescu"), "-aec", "DICOMNODE", "+tls", pki["client_key"], pki["client_cert"]]
        + ["+cf", pki["ca"], "127.0.0.1", str(port), *files],
        capture_output=True,
        text=True,
        timeout=60,
        env=DCMTK_ENV,
    )
    assert storescu.returncode == 0, storescu.stdout + storescu.stderr
    assert node.archive.counts()["instances"] == 4

    for context in (client_context(pki), client_context(pki, "stranger")):
        assoc = tls_associate(port, context)
        if assoc.is_established:  # TLS 1.3 reports a refused client cert on the first read
            try:
                assert assoc.send_c_echo().get("Status") != 0x0000
            finally:
                assoc.abort()
        assert not assoc.is_established
    assert not tls_associate(port, None).is_established
    wait_until(lambda: node.dimse.active_associations() == 0, 30, "failed associations to end")
    assert node.archive.counts()["instances"] == 4


def test_a_silent_client_does_not_block_the_tls_port(tls_node, pki):
    """The TLS handshake of one connection must not hold up every other connection: a port
    scanner or a load balancer's TCP check connects and says nothing."""
    node = tls_node(
        [f'cert_file = "{pki["server_cert"]}"', f'key_file = "{pki["server_key"]}"'],
        network_timeout=2,
    )
    port = node.dimse.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        ae = scu()
        ae.acse_timeout = ae.connection_timeout = 10
        assoc = ae.associate(
            "127.0.0.1", port, ae_title="DICOMNODE", tls_args=(client_context(pki), "localhost")
        )
        assert assoc.is_established, "a TLS association waits for a silent client"
        try:
            assert assoc.send_c_store(make_ct(size=16)).Status == 0x0000
        finally:
            assoc.release()
        assert closed_by_peer(silent, 10), "the silent client's connection stays open"
    wait_until(lambda: node.dimse.active_associations() == 0, 10, "connections to end")


# --- 10. known peers only --------------------------------------------------------------------


def test_require_known_peers_rejects_unknown_callers(start_node):
    peers = [
        Peer("workstation", "WORKSTATION", "127.0.0.1", 0, ("echo", "store")),
        Peer("viewer", "VIEWER", "127.0.0.1", 0, ("echo",)),
    ]
    node = start_node(peers=peers, require_known_peers=True)
    port = node.dimse.port

    stranger = scu("STRANGER").associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert stranger.is_rejected
    assert not stranger.is_established

    [status] = store(port, make_ct(size=16, sop_uid="1.2.3.4.5"), calling="WORKSTATION")
    assert status.Status == 0x0000

    viewer = scu("VIEWER").associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert viewer.is_established
    try:
        assert viewer.send_c_echo().Status == 0x0000
        refused = viewer.send_c_store(make_ct(size=16))
        assert refused.Status == 0x0124, "a peer not allowed to store: refused, not authorized"
        assert refused.get("ErrorComment")
    finally:
        viewer.release()

    echo = subprocess.run(
        [dcmtk_tool("echoscu"), "-aet", "STRANGER", "-aec", "DICOMNODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=DCMTK_ENV,
    )
    assert echo.returncode != 0
    assert "reject" in (echo.stdout + echo.stderr).lower()
    counts = node.archive.counts()
    assert counts["instances"] == 1
    [instance] = node.archive.find_instances(Level.PATIENT, ())
    assert instance.sop_instance_uid == "1.2.3.4.5"
