"""The node's own DIMSE receive path (dicomnode/scp/connection.py) against hand-built PDU
streams: how a P-DATA-TF may legally be cut (several values in one PDU, a data set in many
small fragments, a C-ECHO between two C-STOREs), what the node must refuse (values that do not
fill their PDU), and the peer's maximum PDU length for what the node sends back."""

from __future__ import annotations

import socket
import struct
import threading
from io import BytesIO

import pytest
from pynetdicom import Association
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import Verification

from dicomnode.core.model import Level
from tests.conftest import associate_rq, wait_until
from tests.factory import make_ct

A_ASSOCIATE_AC, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x02, 0x04, 0x05, 0x06, 0x07
COMMAND, LAST = 0x01, 0x02


class RawPeer:
    """A DICOM peer written out by hand: it sends exactly the bytes a test gives it."""

    def __init__(self, port: int, max_length: int = 16384, timeout: float = 20) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(associate_rq(port, max_length))
        pdu_type, _ = self.read_pdu()
        assert pdu_type == A_ASSOCIATE_AC

    def read_pdu(self) -> tuple[int, bytes]:
        header = self._read(6)
        return header[0], self._read(struct.unpack(">I", header[2:6])[0])

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            assert chunk, "the node closed the connection"
            data += chunk
        return data

    def read_command(self) -> tuple[list[int], object]:
        """The next command the node sends: the lengths of the PDUs it came in, and the
        command set decoded."""
        lengths, command = [], b""
        while True:
            pdu_type, body = self.read_pdu()
            assert pdu_type == P_DATA_TF, f"PDU type {pdu_type:#x} instead of P-DATA-TF"
            lengths.append(len(body))
            for _context, header, data in values_of(body):
                assert header & COMMAND
                command += data
                if header & LAST:
                    return lengths, decode(BytesIO(command), True, True)

    def release(self) -> None:
        self.sock.sendall(bytes([A_RELEASE_RQ, 0]) + struct.pack(">I", 4) + b"\0\0\0\0")
        assert self.read_pdu()[0] == A_RELEASE_RP
        self.sock.close()


def p_data_tf(*values: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context id, message control header, fragment) values."""
    items = b"".join(
        struct.pack(">IBB", len(data) + 2, context, header) + data
        for context, header, data in values
    )
    return struct.pack(">BBI", P_DATA_TF, 0, len(items)) + items


def values_of(body: bytes) -> list[tuple[int, int, bytes]]:
    values, offset = [], 0
    while offset < len(body):
        length = struct.unpack(">I", body[offset : offset + 4])[0]
        values.append((body[offset + 4], body[offset + 5], body[offset + 6 : offset + 4 + length]))
        offset += 4 + length
    return values


def command_bytes(message: object) -> bytes:
    """The encoded command set of a pynetdicom DIMSE message."""
    return b"".join(data[1:] for _cx, data in message_values(message) if data[0] & COMMAND)


def message_values(message: object) -> list[tuple[int, bytes]]:
    return [
        pdv
        for primitive in message.encode_msg(1, 0)
        for pdv in primitive.presentation_data_value_list
    ]


def store_request(dataset: object, message_id: int = 1) -> bytes:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = dataset.SOPClassUID
    request.AffectedSOPInstanceUID = dataset.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(b"")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return command_bytes(message)


def echo_request(message_id: int) -> bytes:
    request = C_ECHO()
    request.MessageID = message_id
    request.AffectedSOPClassUID = Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(request)
    return command_bytes(message)


def fragments(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


def test_the_association_is_accepted_without_waiting_for_bytes_while_events_are_queued(
    start_node, monkeypatch
):
    """Reading the A-ASSOCIATE-RQ queues its event behind the connection's own; the DUL
    thread must act on both before it waits for more bytes. With the wait made longer than the
    peer's patience (it was 0.5 s per association), an association that is accepted at all
    was accepted without it, and so is an echo and a release on it."""
    monkeypatch.setattr("dicomnode.scp.connection.IDLE_WAIT", 60.0)
    node = start_node()
    for message_id in (1, 2):
        peer = RawPeer(node.dimse.port, timeout=10)
        peer.sock.sendall(p_data_tf((3, COMMAND | LAST, echo_request(message_id))))
        _lengths, response = peer.read_command()
        assert response.Status == 0x0000
        peer.release()


def test_a_starting_association_counts_once_in_the_load_that_spreads_connections(
    start_node, monkeypatch
):
    """With DIMSE worker processes, each connection goes to the process serving the fewest.
    A connection counts as pending until its association starts, then as active: asked while
    the association starts, the count must not see it twice (it did, and sent the next
    connections elsewhere: 3 of 4 associations in one process of two)."""
    node = start_node()
    answers: list[int] = []
    start = Association.start

    def start_then_ask_the_load(assoc: Association) -> None:
        start(assoc)  # the association is active from here
        looker = threading.Thread(target=lambda: answers.append(node.dimse.load()))
        looker.start()
        looker.join(0.5)  # the answer comes now, or once the start is counted

    monkeypatch.setattr(Association, "start", start_then_ask_the_load)
    peers = []
    for _ in range(2):
        peers.append(RawPeer(node.dimse.port))
        wait_until(lambda: len(answers) >= len(peers), 10, "the load asked during the start")
    for peer in peers:
        peer.release()

    assert answers == [1, 2]


def test_a_data_set_in_many_small_fragments_and_shared_pdus_is_stored_byte_for_byte(start_node):
    """PS3.8 lets a sender cut a data set anywhere and put several values in one PDU; the
    node reassembles them in order."""
    node = start_node()
    dataset = make_ct(size=64)
    encoded = encode(dataset, False, True)
    pieces = fragments(encoded, 997)  # an odd size: fragments end mid-element
    data_values = [(1, LAST if i == len(pieces) - 1 else 0, p) for i, p in enumerate(pieces)]
    command = store_request(dataset)

    peer = RawPeer(node.dimse.port)
    # The command and the first three fragments share one PDU, then five fragments per PDU.
    stream = p_data_tf((1, COMMAND | LAST, command), *data_values[:3])
    for start in range(3, len(data_values), 5):
        stream += p_data_tf(*data_values[start : start + 5])
    peer.sock.sendall(stream)
    _lengths, response = peer.read_command()
    peer.release()

    assert response.Status == 0x0000
    [stored] = node.archive.find_instances(
        Level.IMAGE, (("SOPInstanceUID", dataset.SOPInstanceUID),)
    )
    filed = node.archive.blob_file(stored).read_bytes()
    assert filed.endswith(encoded), "the data set was not filed exactly as it arrived"


def test_a_c_echo_between_two_c_stores_is_answered_and_both_objects_are_filed(start_node):
    node = start_node()
    first, second = make_ct(size=16), make_ct(size=16)
    peer = RawPeer(node.dimse.port)
    statuses = []
    for message_id, message in ((1, first), (2, None), (3, second)):
        if message is None:
            peer.sock.sendall(p_data_tf((3, COMMAND | LAST, echo_request(message_id))))
        else:
            peer.sock.sendall(
                p_data_tf(
                    (1, COMMAND | LAST, store_request(message, message_id)),
                    (1, LAST, encode(message, False, True)),
                )
            )
        _lengths, response = peer.read_command()
        statuses.append((response.MessageIDBeingRespondedTo, response.Status))
    peer.release()

    assert statuses == [(1, 0x0000), (2, 0x0000), (3, 0x0000)]
    for dataset in (first, second):
        assert node.archive.find_instances(
            Level.IMAGE, (("SOPInstanceUID", dataset.SOPInstanceUID),)
        )


def test_the_c_store_response_respects_the_peers_maximum_pdu_length(start_node):
    node = start_node()
    dataset = make_ct(size=16)
    peer = RawPeer(node.dimse.port, max_length=64)
    peer.sock.sendall(
        p_data_tf(
            (1, COMMAND | LAST, store_request(dataset)),
            *[(1, 0, piece) for piece in fragments(encode(dataset, False, True), 40)[:-1]],
        )
    )
    # (the sender's own PDUs may be larger than 64 bytes: the limit is the node's to keep)
    peer.sock.sendall(p_data_tf((1, LAST, fragments(encode(dataset, False, True), 40)[-1])))
    lengths, response = peer.read_command()
    peer.release()

    assert response.Status == 0x0000
    assert len(lengths) > 1 and max(lengths) <= 64, lengths


@pytest.mark.parametrize(
    "broken",
    [
        "an item longer than its PDU",
        "an item shorter than its header",
        "bytes after the last item",
    ],
)
def test_p_data_whose_items_do_not_fill_the_pdu_aborts_and_stores_nothing(start_node, broken):
    node = start_node()
    counts = node.archive.counts()
    dataset = make_ct(size=16)
    command = store_request(dataset)
    good = p_data_tf((1, COMMAND | LAST, command))
    body = bytearray(good[6:])
    if broken == "an item longer than its PDU":
        struct.pack_into(">I", body, 0, len(body) + 10)
    elif broken == "an item shorter than its header":
        struct.pack_into(">I", body, 0, 1)
    else:
        body += b"\x00\x00"
    peer = RawPeer(node.dimse.port)
    peer.sock.sendall(struct.pack(">BBI", P_DATA_TF, 0, len(body)) + body)

    peer.sock.settimeout(20)
    received = b""
    try:
        while chunk := peer.sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    peer.sock.close()
    assert not received or received[0] == A_ABORT, "no A-ABORT for a malformed P-DATA-TF"
    wait_until(lambda: node.dimse.active_associations() == 0, 20, "the association to end")
    assert node.archive.counts() == counts


# --- pynetdicom: the supported version, and its changes installed when the server starts ----

PROBE = """
import dataclasses, json, time
import pynetdicom, pynetdicom.dul
from pynetdicom import _config
import dicomnode.scp.connection as connection
import dicomnode.scp.server, dicomnode.scp.scu, dicomnode.serve, dicomnode.compose
from dicomnode.config import read_settings
from dicomnode.core.metrics import Metrics
from dicomnode.scp import DimseContext, DimseServer

def state():
    return {
        "plain_time": pynetdicom.dul.time is time,
        "log_handler_level": _config.LOG_HANDLER_LEVEL,
        "log_identifiers": [_config.LOG_REQUEST_IDENTIFIERS, _config.LOG_RESPONSE_IDENTIFIERS],
        "installed": connection.installed(),
    }

imported = state()
settings = read_settings(None)
settings = dataclasses.replace(
    settings, dimse=dataclasses.replace(settings.dimse, host="127.0.0.1", port=0)
)
server = DimseServer(DimseContext(settings, None, None, Metrics()))
port = server.start()
started = state()
server.stop(1)
print(json.dumps({"imported": imported, "started": started, "port": port}))
"""


def test_importing_the_node_leaves_pynetdicom_untouched_and_starting_the_server_installs(
    tmp_path,
):
    """In a fresh interpreter: importing the DIMSE modules (and the node, and compose) changes
    none of pynetdicom's module-level state; starting the DIMSE server installs the node's
    changes (no zero sleeps in DUL threads, pynetdicom's own PDU and identifier logging off)."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["imported"] == {
        "plain_time": True,
        "log_handler_level": "standard",
        "log_identifiers": [True, True],
        "installed": False,
    }
    assert seen["started"] == {
        "plain_time": False,
        "log_handler_level": "none",
        "log_identifiers": [False, False],
        "installed": True,
    }
    assert seen["port"] > 0


def loopback_server() -> object:
    """A DIMSE server of the default settings on a free loopback port (not started)."""
    import dataclasses

    from dicomnode.config import read_settings
    from dicomnode.core.metrics import Metrics
    from dicomnode.scp import DimseContext, DimseServer

    settings = read_settings(None)
    dimse = dataclasses.replace(settings.dimse, host="127.0.0.1", port=0)
    return DimseServer(
        DimseContext(dataclasses.replace(settings, dimse=dimse), None, None, Metrics())
    )


@pytest.mark.parametrize("version", ["3.1.0", "2.0.2", "4.0.0", "3.10.1"])
def test_an_unsupported_pynetdicom_is_refused_naming_the_supported_version(monkeypatch, version):
    import pynetdicom

    from dicomnode.scp import connection

    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    monkeypatch.setattr(pynetdicom, "__version__", version)
    monkeypatch.setattr(connection, "_installed", False)
    server = loopback_server()
    with pytest.raises(connection.UnsupportedPynetdicom) as refused:
        server.start()
    message = str(refused.value)
    assert f"pynetdicom {version} is installed" in message
    assert f"supports only pynetdicom {connection.SUPPORTED_PYNETDICOM}.x" in message
    assert not connection.installed()
    assert server._server is None  # refused before it listened


@pytest.mark.parametrize("version", ["3.0.0", "3.0.4", "3.0.9.dev0"])
def test_the_supported_minor_version_passes_the_check(version):
    from dicomnode.scp import connection

    connection.check_pynetdicom(version)  # raises for any other minor version


def test_setup_cfg_pins_the_supported_minor_version():
    import configparser
    from pathlib import Path

    from dicomnode.scp import connection

    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    requirements = setup["options"]["install_requires"].split()
    major, minor = connection.SUPPORTED_PYNETDICOM.split(".")
    assert f"pynetdicom>={major}.{minor},<{major}.{int(minor) + 1}" in requirements
