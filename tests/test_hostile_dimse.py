"""Hostile DIMSE peers (issue 18, items 2, 4 and 11): PDUs that announce more than they may,
peers that send too slowly or not at all, and a sender that stores too much. Each test checks
the node's answer, that nothing stored changed where nothing should, and that a well-behaved
client is served during the attack. Loopback only; every loop is bounded.

The two fuzz tests take a few seconds to ~40 s in CI; for a longer run by hand multiply their
examples: ``DICOMNODE_FUZZ_SCALE=50 python -m pytest tests/test_hostile_dimse.py -k fuzz``."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import threading
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomnode.scp.connection import FIRST_ALLOCATION, PduBounds, PduRefused, _WakeableSocket
from dicomnode.scp.limits import SenderLimits
from tests.conftest import associate_rq, run_dcmtk, wait_until
from tests.factory import make_ct

A_ABORT = 0x07
MiB = 1024 * 1024
FUZZ_SCALE = int(os.environ.get("DICOMNODE_FUZZ_SCALE", "1"))  # longer fuzzing by hand


@pytest.fixture
def database_url(tmp_path) -> str:
    """These tests are about the connection, not the index: SQLite only."""
    return f"sqlite:///{tmp_path / 'index.sqlite'}"


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """`field` (VmRSS: now, VmHWM: the peak) of process `pid`, from /proc, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        lines = status.read().splitlines()
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def echo(port: int, calling: str = "GOODSCU") -> bool:
    """A C-ECHO by dcmtk's echoscu, the well-behaved client."""
    args = ["-aet", calling, "-aec", "DICOMNODE", "-to", "10", "127.0.0.1", str(port)]
    done = run_dcmtk("echoscu", *args, timeout=30)
    return done.returncode == 0


def answer_of(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the node sends on `sock` until it closes it (at most `within` seconds), and
    how long that took."""
    started = time.monotonic()
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the node kept the connection open for {within} s") from None
    return received, time.monotonic() - started


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


# --- item 2: a PDU longer than allowed --------------------------------------------------------


def test_a_six_byte_header_announcing_4_gib_is_aborted_in_bounded_memory(serve_node):
    """`01 00 FF FF FF FF` made the node allocate the announced 4 GiB before any byte of the
    body came (6 GB RSS with two connections). It is answered with an A-ABORT at once; the
    node's peak RSS grows by less than 256 MiB over 20 such connections, two at a time, and a
    well-behaved echo is served between them."""
    node = serve_node()
    pid = node.process.pid
    wait_until(lambda: echo(node.dimse_port), 20, "the node to answer an echo")
    before = rss_bytes(pid)
    for _round in range(10):
        attackers = [connect(node.dimse_port) for _ in range(2)]
        for sock in attackers:
            sock.sendall(bytes.fromhex("0100FFFFFFFF"))
        assert echo(node.dimse_port), "a well-behaved echo failed during the attack"
        for sock in attackers:
            received, seconds = answer_of(sock, 10)
            sock.close()
            assert received[:1] == bytes([A_ABORT]) and len(received) == 10, received
            assert received[8] == 2, "the A-ABORT's source is the service provider"
            assert seconds < 5
    peak = rss_bytes(pid, "VmHWM")
    growth = peak - before
    print(f"node RSS before {before / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB")
    assert growth < 256 * MiB, f"RSS grew by {growth / MiB:.0f} MiB"
    assert echo(node.dimse_port)


def test_an_associate_request_over_max_associate_pdu_is_aborted_before_its_body(start_node):
    node = start_node(max_associate_pdu=4096)
    sock = connect(node.dimse.port)
    sock.sendall(struct.pack(">BBI", 0x01, 0, 4097))  # no body follows: none is waited for
    received, seconds = answer_of(sock, 10)
    assert received[:1] == bytes([A_ABORT]) and received[9] == 0x06  # invalid-PDU-parameter
    assert seconds < 2
    assert node.metrics.value("dicomnode_associations_total", outcome="refused_pdu_too_large")
    assert echo(node.dimse.port)


def test_a_p_data_tf_over_the_negotiated_maximum_is_aborted_and_nothing_is_stored(start_node):
    node = start_node(max_pdu=16384)
    counts = node.archive.counts()
    sock = connect(node.dimse.port)
    sock.sendall(associate_rq(node.dimse.port))
    header = sock.recv(6)
    assert header[0] == 0x02, "the association was not accepted"
    sock.recv(struct.unpack(">I", header[2:6])[0], socket.MSG_WAITALL)
    sock.sendall(struct.pack(">BBI", 0x04, 0, 16385) + b"\x00" * 64)
    received, _seconds = answer_of(sock, 10)
    assert received[:1] == bytes([A_ABORT])
    wait_until(lambda: node.dimse.active_associations() == 0, 20, "the association to end")
    assert node.archive.counts() == counts
    assert echo(node.dimse.port)


def test_a_data_set_in_pdus_of_the_negotiated_maximum_is_stored(start_node):
    """The bound is the negotiated maximum itself: storescu's PDUs of exactly max_pdu pass."""
    node = start_node(max_pdu=16384)
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.send_c_store(make_ct(size=128)).Status == 0x0000
    assoc.release()


# --- item 4: slots a stranger can hold ---------------------------------------------------------


def test_slow_senders_are_aborted_at_their_deadline_and_hold_no_association_slot(start_node):
    """16 connections sending an A-ASSOCIATE-RQ at 4 bytes/s held every association slot (each
    read got a byte, so no timeout fired). Now a PDU must arrive within pdu_timeout plus its
    length at min_transfer_rate; echoes are served while the attack runs, and every slow
    connection is aborted once its deadline has passed."""
    node = start_node(max_associations=2, pdu_timeout=3, min_transfer_rate=16384)
    request = associate_rq(node.dimse.port)
    attackers = [connect(node.dimse.port) for _ in range(16)]
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        for byte in request[:40]:  # bounded: 40 bytes, 10 s at most
            if stop.is_set():
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return
            stop.wait(0.25)

    threads = [threading.Thread(target=trickle, args=(s,), daemon=True) for s in attackers]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    served = sum(echo(node.dimse.port) for _ in range(3))
    assert served == 3, "well-behaved echoes were refused during the slow attack"
    for sock in attackers:
        received, _seconds = answer_of(sock, 15)
        assert received[:1] == bytes([A_ABORT]), received
    elapsed = time.monotonic() - started
    stop.set()
    assert 3 <= elapsed < 12, f"slow connections ended after {elapsed:.1f} s (pdu_timeout 3)"
    assert node.metrics.value("dicomnode_associations_total", outcome="refused_pdu_too_slow") == 16
    wait_until(lambda: node.dimse.load() == 0, 20, "the slow connections' threads to end")


def test_idle_connections_do_not_count_as_associations(start_node):
    """Five connections that say nothing, with max_associations = 2: an echo is still served
    (idle connections counted as associations, and the echo was rejected)."""
    node = start_node(max_associations=2)
    idle = [connect(node.dimse.port) for _ in range(5)]
    wait_until(lambda: node.dimse.load() >= 5, 10, "the idle connections to be taken")
    assert echo(node.dimse.port)
    assert echo(node.dimse.port)
    for sock in idle:
        sock.close()


def test_max_associations_still_bounds_associations(start_node):
    """Two open associations fill max_associations = 2: a third is rejected (transient)."""
    node = start_node(max_associations=2)
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE") for _ in range(2)]
    assert all(a.is_established for a in held)
    third = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    assert third.is_rejected
    for assoc in held:
        assoc.release()
    assert echo(node.dimse.port)


def test_connections_beyond_max_pending_connections_are_closed_at_once(start_node):
    node = start_node(max_pending_connections=3)
    idle = [connect(node.dimse.port) for _ in range(3)]
    wait_until(lambda: node.dimse.load() >= 3, 10, "the idle connections to be taken")
    extra = connect(node.dimse.port)
    received, seconds = answer_of(extra, 10)
    assert received == b"", received
    assert seconds < 5, f"closed after {seconds:.1f} s, not at once (acse_timeout is 30 s)"
    assert node.metrics.value(
        "dicomnode_associations_total", outcome="refused_too_many_connections"
    )
    for sock in idle:
        sock.close()
    wait_until(lambda: node.dimse.load() == 0, 20, "the idle connections to end")
    assert echo(node.dimse.port)


def test_the_listen_backlog_is_the_setting(start_node):
    """The kernel shows a listening socket's backlog as its Send-Q."""
    node = start_node(listen_backlog=37)
    listing = subprocess.run(
        ["ss", "-ltnH", f"sport = :{node.dimse.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing[2] == "37", listing


# --- item 11: per-sender limits ------------------------------------------------------------------


def store_all(port: int, calling: str, datasets: list) -> list[int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def test_a_sender_over_its_objects_per_minute_is_refused_with_a700_and_alerted(start_node, caplog):
    node = start_node(sender_objects_per_minute=3)
    caplog.set_level(logging.WARNING, logger="dicomnode.scp")
    stranger = [make_ct(patient_id=f"S{i}", size=16) for i in range(5)]
    assert store_all(node.dimse.port, "STRANGER", stranger) == [0, 0, 0, 0xA700, 0xA700]
    # another sender is not affected, and the modality's retry after the window succeeds
    assert store_all(node.dimse.port, "CTSCANNER", [make_ct(patient_id="CT1", size=16)]) == [0]
    assert node.archive.counts()["instances"] == 4
    assert node.metrics.value("dicomnode_store_failures_total", reason="sender_limit") == 2
    alerts = [r for r in caplog.records if getattr(r, "event", "") == "sender_limit"]
    assert len(alerts) == 1 and alerts[0].caller == "STRANGER"

    def audited() -> list[str]:
        spooled = node.settings.node.data_dir.rglob("*.xml")
        return [t for p in spooled if "sender limit" in (t := p.read_text(errors="replace"))]

    [alert] = wait_until(audited, 20, "the security alert in the audit spool")
    assert "STRANGER" in alert and "objects per minute" in alert


def test_a_sender_over_its_bytes_per_hour_is_refused(start_node):
    probe = make_ct(patient_id="B0", size=64)
    size = len(encode(probe, True, True))  # implicit VR little endian, as it is sent
    node = start_node(sender_bytes_per_hour=int(size * 2.5))
    objects = [make_ct(patient_id=f"B{i}", size=64) for i in range(3)]
    assert store_all(node.dimse.port, "BIGSENDER", objects) == [0, 0, 0xA700]
    assert node.archive.counts()["instances"] == 2


def test_no_sender_limit_with_zero(start_node):
    node = start_node(sender_objects_per_minute=0, sender_bytes_per_hour=0)
    objects = [make_ct(patient_id=f"Z{i}", size=16) for i in range(5)]
    assert store_all(node.dimse.port, "ANYSCU", objects) == [0] * 5


# --- fuzzing the PDU reader ----------------------------------------------------------------------

FUZZ_BOUNDS = PduBounds(
    max_pdu=16384, max_associate_pdu=4096, pdu_timeout=0.2, min_transfer_rate=1 << 20
)


def reader_over(data: bytes) -> tuple[_WakeableSocket, socket.socket]:
    """A PDU reader whose peer sent `data` and closed its side."""
    ours, theirs = socket.socketpair()
    theirs.sendall(data)
    theirs.shutdown(socket.SHUT_WR)
    reader = _WakeableSocket.__new__(_WakeableSocket)
    reader.socket = ours
    reader.bounds = FUZZ_BOUNDS
    return reader, theirs


pdu_headers = st.builds(
    lambda kind, length: struct.pack(">BBI", kind, 0, length),
    st.integers(0, 9),
    st.one_of(st.integers(0, 20000), st.integers(0, 0xFFFFFFFF), st.just(0xFFFFFFFF)),
)
streams = st.lists(
    st.one_of(pdu_headers, st.binary(max_size=2048), pdu_headers.map(lambda h: h + bytes(64))),
    max_size=8,
).map(b"".join)


@settings(
    max_examples=300 * FUZZ_SCALE,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=streams, state=st.sampled_from(["Sta2", "Sta6", "Sta13"]))
def test_fuzz_the_pdu_reader_refuses_or_reads_within_bounds(data: bytes, state: str):
    """Any byte stream: each PDU read is whole and within its limit, or refused, or the end
    of the stream; nothing else is raised, and memory stays within twice what arrived plus
    the first allocation."""
    reader, theirs = reader_over(data)
    tracemalloc.start()
    try:
        for _ in range(len(data) + 1):
            try:
                pdu = reader.read_pdu(state)
            except PduRefused as refused:
                assert refused.reason in ("pdu_too_large", "pdu_too_slow")
                break
            if pdu is None:
                break
            if pdu[0] in range(1, 8):
                length = int.from_bytes(pdu[2:6], "big")
                assert len(pdu) == 6 + length <= 6 + FUZZ_BOUNDS.limit(pdu[0], state)
            else:
                assert len(pdu) == 6
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        reader.socket.close()
        theirs.close()
    assert peak < 2 * len(data) + FIRST_ALLOCATION + 64 * 1024, peak


def test_fuzz_the_live_node_survives_any_stream_and_keeps_serving(start_node, monkeypatch, caplog):
    """Random PDU streams (before and after an A-ASSOCIATE-RQ) sent to the running node: the
    node closes each connection within a bounded time, no thread dies of an exception (nor
    does pynetdicom's DUL loop catch one), every connection's threads end within the ACSE
    timeout, the node's RSS stays within 256 MiB of where it started, and an echo is served
    after."""
    node = start_node(max_associate_pdu=4096, max_pdu=16384, pdu_timeout=1, acse_timeout=5)
    escaped: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    before = rss_bytes(os.getpid())
    request = associate_rq(node.dimse.port)

    @settings(max_examples=150 * FUZZ_SCALE, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=streams, associate_first=st.booleans())
    def attack(data: bytes, associate_first: bool) -> None:
        sock = connect(node.dimse.port)
        try:
            try:
                sock.sendall((request if associate_first else b"") + data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the node refused and closed before all was sent
            answer_of(sock, 10)  # the node must close the connection within 10 s
        finally:
            sock.close()

    attack()
    wait_until(lambda: node.dimse.load() == 0, 30, "every fuzzing connection to end")
    assert escaped == []
    caught = [r.getMessage() for r in caplog.records if "Exception in DUL" in r.getMessage()]
    assert caught == []
    assert rss_bytes(os.getpid()) - before < 256 * MiB
    assert echo(node.dimse.port)


def test_sender_limits_slide_per_sender_and_alert_once_per_window():
    """The windows slide: a refused sender is admitted again once its oldest objects have left
    the minute (bytes: the hour); senders count apart; one alert per sender and window."""
    now = [1000.0]
    limits = SenderLimits(objects_per_minute=2, bytes_per_hour=1000, clock=lambda: now[0])
    assert limits.admit("CT", "10.0.0.1", 10) is None
    now[0] += 30
    assert limits.admit("CT", "10.0.0.1", 10) is None
    first = limits.admit("CT", "10.0.0.1", 10)
    assert first is not None and first.alert and "objects per minute" in first.reason
    again = limits.admit("CT", "10.0.0.1", 10)
    assert again is not None and not again.alert
    assert limits.admit("CT", "10.0.0.2", 10) is None  # another address is another sender
    now[0] += 31  # the first object has left the minute
    assert limits.admit("CT", "10.0.0.1", 10) is None
    assert limits.admit("MR", "10.0.0.1", 990) is None
    over = limits.admit("MR", "10.0.0.1", 20)
    assert over is not None and "bytes per hour" in over.reason
    now[0] += 3600
    assert limits.admit("MR", "10.0.0.1", 990) is None
