"""The node behind a load balancer: PROXY protocol v2 on the DIMSE listener, X-Forwarded-For
on HTTP, each honoured from the configured balancers only.

The balancer (real HAProxy, or a raw socket playing one) connects from 127.0.0.2; clients
connect from 127.0.0.1. What the node records (association log lines, audit messages, ledger
entries) must name the client, never the balancer, and a header from anyone else must not
move the address."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicomnode.scp.proxy import (
    HEADER_TIMEOUT,
    SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse_header,
    read_header,
)
from tests.conftest import WORKSTATION, associate_rq, dcmtk_tool, token_for, wait_until
from tests.factory import write_series
from tests.realclients.haproxy import SOURCE, Backend, start_haproxy

BALANCER = SOURCE  # 127.0.0.2


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """These tests are about addresses, not the index: SQLite only."""
    return f"sqlite:///{tmp_path / 'index.sqlite'}"


def proxy_v2(source: str, source_port: int, dest: str = "127.0.0.1", dest_port: int = 104) -> bytes:
    """A PROXY v2 header for a TCP/IPv4 connection from `source`:`source_port`."""
    addresses = socket.inet_aton(source) + socket.inet_aton(dest)
    body = addresses + struct.pack("!HH", source_port, dest_port)
    return SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def connect_from(address: str, port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(address, 0))
    s.settimeout(15)
    return s


def answer(s: socket.socket) -> bytes:
    """The next PDU the node sends (whole), or b"" when it closed the connection."""
    try:
        head = s.recv(6, socket.MSG_WAITALL)
        if len(head) < 6:
            return b""
        return head + s.recv(struct.unpack("!I", head[2:6])[0], socket.MSG_WAITALL)
    except ConnectionResetError:
        return b""


# --- the header parser ----------------------------------------------------------------------


def test_a_header_names_the_source_and_destination():
    header = proxy_v2("10.1.2.3", 40123, "10.9.9.9", 11112)
    parsed = parse_header(header[:16], header[16:])
    assert parsed == ProxyHeader("proxy", ("10.1.2.3", 40123), ("10.9.9.9", 11112))


def test_an_ipv6_header_and_a_local_one():
    body = socket.inet_pton(socket.AF_INET6, "fd00::7") + bytes(16) + struct.pack("!HH", 5, 6)
    fixed = SIGNATURE + bytes([0x21, 0x21]) + struct.pack("!H", len(body))
    assert parse_header(fixed, body).source == ("fd00::7", 5)
    local = SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])
    assert parse_header(local, b"") == ProxyHeader("local")


@pytest.mark.parametrize(
    "fixed, words",
    [
        (b"\x01\x00\x00\x00\x00\x44" + bytes(10), "signature"),  # an A-ASSOCIATE-RQ
        (SIGNATURE + bytes([0x11, 0x11, 0, 12]), "version/command"),  # version 1
        (SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]), "over"),  # 65535 bytes announced
        (SIGNATURE + bytes([0x21, 0x11, 0, 4]), "too short"),  # IPv4 needs 12
    ],
)
def test_a_malformed_header_is_refused(fixed, words):
    with pytest.raises(ProxyHeaderError, match=words):
        parse_header(fixed, b"")


def test_reading_stops_at_the_header_and_is_bounded_in_time():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(proxy_v2("10.0.0.1", 7) + b"\x01\x00PDU")
        assert read_header(ours, 2).source == ("10.0.0.1", 7)
        assert ours.recv(5) == b"\x01\x00PDU"  # the association's bytes are left unread
        theirs.sendall(SIGNATURE + bytes([0x21, 0x11, 0, 12]) + b"\x0a")  # 11 bytes missing
        started = time.monotonic()
        with pytest.raises(ProxyHeaderError, match="timeout"):
            read_header(ours, 0.5)
        assert time.monotonic() - started < 2


# --- the node's DIMSE listener --------------------------------------------------------------


@pytest.fixture
def proxied_node(start_node):
    return start_node(proxy_protocol_from=[BALANCER])


def test_a_listed_balancer_names_the_modality(proxied_node, caplog):
    caplog.set_level(logging.INFO, logger="dicomnode")
    port = proxied_node.dimse.port
    with connect_from(BALANCER, port) as s:
        s.sendall(proxy_v2("10.20.30.40", 50123) + associate_rq(port))
        assert answer(s)[:1] == b"\x02"  # A-ASSOCIATE-AC
        s.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
        assert answer(s)[:1] == b"\x06"

    def logged() -> list:
        return [r for r in caplog.records if getattr(r, "event", None) == "association"]

    [record] = wait_until(logged, 10, "the association's log line")
    assert record.address == "10.20.30.40:50123"


@pytest.mark.parametrize(
    "opening, closed_within",
    [
        (b"", HEADER_TIMEOUT + 3),  # says nothing at all
        (associate_rq(104), 3),  # no PROXY header: an association straight away
        (SIGNATURE + bytes([0x21, 0x11, 0, 200]) + bytes(12), HEADER_TIMEOUT + 3),  # lies
        (SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]), 3),  # longer than any balancer sends
        (SIGNATURE + bytes([0x13, 0x11, 0, 12]) + bytes(12), 3),  # unknown command
    ],
    ids=["silent", "no-header", "lying-length", "too-long", "bad-command"],
)
def test_a_listed_balancer_without_a_valid_header_is_closed(proxied_node, opening, closed_within):
    port = proxied_node.dimse.port
    started = time.monotonic()
    with connect_from(BALANCER, port) as s:
        s.settimeout(closed_within + 5)
        s.sendall(opening)
        assert answer(s) == b""  # closed, not associated
    assert time.monotonic() - started < closed_within
    refused = proxied_node.metrics.value(
        "dicomnode_associations_total", outcome="refused_proxy_header"
    )
    assert refused == 1


def test_a_truncated_header_is_refused_at_once_and_others_are_served_meanwhile(proxied_node):
    port = proxied_node.dimse.port
    slow = connect_from(BALANCER, port)
    slow.sendall(SIGNATURE[:8])  # and then nothing: holds one header reader
    try:
        with connect_from(BALANCER, port) as s:
            s.sendall(SIGNATURE + bytes([0x21, 0x11, 0, 12]) + bytes(5))
            s.shutdown(socket.SHUT_WR)  # the rest never comes
            started = time.monotonic()
            assert answer(s) == b""
            assert time.monotonic() - started < 3
        with connect_from("127.0.0.1", port) as s:  # a modality not behind the balancer
            s.sendall(associate_rq(port))
            assert answer(s)[:1] == b"\x02"
    finally:
        slow.close()


def test_a_header_from_an_unlisted_address_is_not_believed(proxied_node, caplog):
    caplog.set_level(logging.INFO, logger="dicomnode")
    port = proxied_node.dimse.port
    with connect_from("127.0.0.1", port) as s:
        s.sendall(proxy_v2("10.66.66.66", 1) + associate_rq(port))
        reply = answer(s)
        assert reply[:1] != b"\x02"  # never associated: the upper layer aborts (0x07) or closes
    time.sleep(0.5)
    assert "10.66.66.66" not in caplog.text


# --- through HAProxy ------------------------------------------------------------------------


def audit_spool_text(data_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (data_dir / "audit-spool").glob("*.xml"))


def test_storescu_through_haproxy_is_recorded_under_its_own_address(start_node, tmp_path):
    node = start_node(
        [WORKSTATION], proxy_protocol_from=[BALANCER], http={"trusted_proxies": [BALANCER]}
    )
    balancer = start_haproxy(tmp_path / "haproxy", [Backend("n1", node.dimse.port, node.http_port)])
    try:
        write_series(tmp_path / "in", 3, patient_id="PROXIED")
        sent = subprocess.run(
            [dcmtk_tool("storescu"), "-aec", "DICOMNODE", "-aet", "MODALITY"]
            + ["127.0.0.1", str(balancer.dimse_port), "+sd", str(tmp_path / "in")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert node.archive.counts()["instances"] == 3

        # a C-FIND through the balancer: a disclosure, ledgered with the requester's address
        ae = AE(ae_title=WORKSTATION.ae_title)  # a configured peer at 127.0.0.1
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", balancer.dimse_port, ae_title="DICOMNODE")
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = "PROXIED"
        query.StudyInstanceUID = ""
        answers = assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        statuses = [status.Status for status, _ in answers if status]
        assoc.release()
        assert statuses  # answered, allowed or refused: either way a ledger entry

        # a QIDO-RS through the balancer's HTTP side: X-Forwarded-For from a trusted proxy
        connection = http.client.HTTPConnection("127.0.0.1", balancer.http_port, timeout=30)
        connection.request(
            "GET",
            "/dicomweb/studies?PatientID=PROXIED",
            headers={"Authorization": f"Bearer {token_for(node)}"},
        )
        assert connection.getresponse().status == 200
        connection.close()

        def ledgered() -> list[dict]:
            details = [json.loads(e.detail) for e in node.archive.ledger.entries()]
            return [d for d in details if "address" in d and "protocol" in d]

        entries = wait_until(
            lambda: {"dimse", "dicomweb"} <= {e["protocol"] for e in ledgered()} and ledgered(),
            10,
            "ledger entries of the C-FIND and the QIDO-RS",
        )
        assert {e["address"] for e in entries} == {"127.0.0.1"}  # the client, not 127.0.0.2

        spool = wait_until(
            lambda: "MODALITY" in (t := audit_spool_text(tmp_path / "data")) and t,
            10,
            "the received-instances audit message",
        )
        assert "127.0.0.1" in spool
        assert BALANCER not in spool
    finally:
        balancer.stop()


def test_forwarded_for_is_honoured_from_trusted_proxies_only(start_node):
    node = start_node(http={"trusted_proxies": [BALANCER]})
    token = token_for(node)

    def qido_from(source: str, forwarded: str) -> None:
        connection = http.client.HTTPConnection(
            "127.0.0.1", node.http_port, timeout=30, source_address=(source, 0)
        )
        connection.request(
            "GET",
            "/dicomweb/studies?PatientID=NOBODY",
            headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": forwarded},
        )
        assert connection.getresponse().status in (200, 204)
        connection.close()

    qido_from("127.0.0.1", "10.6.6.6")  # a client forging the header: ignored
    qido_from(BALANCER, "10.7.7.7")  # the trusted proxy: believed
    qido_from(BALANCER, "10.6.6.6, 10.8.8.8")  # a forged entry before the real client
    qido_from(BALANCER, "not-an-address")  # malformed: the proxy's own address stands

    details = [json.loads(e.detail) for e in node.archive.ledger.entries()]
    addresses = [d["address"] for d in details if d.get("protocol") == "dicomweb"]
    assert addresses == ["127.0.0.1", "10.7.7.7", "10.8.8.8", BALANCER]
