"""How the node's DIMSE connections run: event-driven where pynetdicom polls.

pynetdicom 3 runs two threads per association that hand work to each other through queues
they poll: the DUL thread (socket and state machine) sleeps a millisecond whenever it finds
nothing to do, and the association thread sleeps a millisecond between looks for a complete
DIMSE message. A C-STORE therefore waits on up to three such sleeps (the request seen, the
request served, the response sent), and on a busy machine each sleep lasts as long as the
scheduler makes it. For every connection the node accepts or opens, `prepare` changes that:

- the DUL thread reads at once when bytes wait (a non-blocking peek), else waits in ``select``
  on its socket and on a wake-up socket that is poked whenever a primitive is queued for it, so
  it reads what arrives and sends what is queued at once, and sleeps for real when there is
  nothing; its socket stays blocking with the network timeout set in the kernel, so a read is
  one system call;
- on an accepted association, C-STORE requests take a lane of their own (`StoreLane`): the
  DUL thread reads each P-DATA-TF PDU of the established association itself (no PDU and
  primitive objects, no state machine step: P-DATA in Sta6 leaves the state as it is),
  gathers the request's fragments, reads the few command fields it needs, hands the data set
  to the node's store function at once and encodes and sends the response directly, without
  pynetdicom's DIMSE message and primitive objects, service class and events (which cost more
  than filing the object). The peer waits for the response anyway: a C-STORE is
  never one of several operations in flight, as the node offers no asynchronous operations
  window. Anything else (another command, a C-STORE on a context or SOP class that is not
  plain storage, a message during release) is replayed into pynetdicom and served by the
  association thread as before, which now blocks until a message, a release or an abort
  arrives instead of polling;
- on an association the node opens to send C-STOREs (forwarding, shares, C-MOVE
  sub-operations), the association thread never takes a message off the DIMSE queue: in
  pynetdicom 3.0.4 it could take the response a sender waits for (a race between pausing the
  reactor and its look at the queue) and the sender then waited for its whole DIMSE timeout.

Every PDU is read by `_WakeableSocket.read_pdu`, within bounds (`PduBounds`): a PDU longer
than the negotiated maximum (P-DATA-TF once associated) or than ``max_associate_pdu`` (any
other PDU, and every PDU before the association is negotiated) is refused before its body is
read, a PDU that does not arrive within ``pdu_timeout`` plus its length at ``min_transfer_rate``
is refused, and memory is allocated as bytes arrive (never for a length a peer merely
announces). A refused PDU gets an A-ABORT and the connection is closed.

This leans on pynetdicom internals, so it is pinned to the minor version it was written for
(`SUPPORTED_PYNETDICOM`, and in setup.cfg). Importing this module changes nothing in pynetdicom:
`install` checks the installed version (refusing another with a message naming the supported
one) and changes pynetdicom's module-level state, once, when the DIMSE server starts or the
node first opens an association; `prepare` changes each connection. tests/test_connection.py
drives the receive path with hand-built PDU streams (values cut and packed every legal way,
malformed ones, a small peer PDU limit); the DIMSE tests drive it with dcmtk and pynetdicom.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynetdicom
from pynetdicom import _config as pynetdicom_config
from pynetdicom import dul as pynetdicom_dul
from pynetdicom import evt
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicomnode.scp.storelane import (
    P_DATA_TF_TYPE,
    StoreFunction,
    StoreLane,
    StoreRequest,
    presentation_values,
    run_all,
)

log = logging.getLogger("dicomnode.scp")

SUPPORTED_PYNETDICOM = "3.0"  # the minor version whose internals this module changes
__all__ = ["StoreRequest"]  # handlers and the server import the request type from here too

IDLE_WAIT = 0.5  # seconds a waiting thread sleeps before looking at its flags again
_WAKE = (None, None)  # put on the DIMSE queue to wake the association thread
PDU_TYPES = range(0x01, 0x08)  # A-ASSOCIATE-RQ ... A-ABORT (PS3.8 9.3)
FIRST_ALLOCATION = 1 << 20  # bytes allocated for a PDU before more of it has arrived
UNASSOCIATED_STATES = ("Sta1", "Sta2", "Sta3", "Sta4", "Sta5")  # before a negotiated maximum
TOO_LARGE, TOO_SLOW = "pdu_too_large", "pdu_too_slow"
DONTWAIT = socket.MSG_DONTWAIT
_ABORT_REASON = {TOO_LARGE: 0x06, TOO_SLOW: 0x00}  # invalid-PDU-parameter value; not specified
_LOCAL_EVENTS = ("Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15")  # from the user


@dataclass(frozen=True)
class PduBounds:
    """Limits on the PDUs a connection reads (see ``[dimse]`` in config/dicomnode.toml).

    max_pdu: largest P-DATA-TF once associated, as the node negotiated it (0: no limit; memory
    still grows only with the bytes that arrive). max_associate_pdu: largest PDU of any other
    type, and of any type before the association is negotiated. A PDU must arrive within
    pdu_timeout seconds of its first byte plus its length at min_transfer_rate bytes/s."""

    max_pdu: int = 0
    max_associate_pdu: int = 256 * 1024
    pdu_timeout: float = 30.0
    min_transfer_rate: int = 16 * 1024

    def limit(self, pdu_type: int, state: str) -> int:
        """The largest length a PDU of `pdu_type` may announce in state `state`."""
        if pdu_type == P_DATA_TF_TYPE and state not in UNASSOCIATED_STATES:
            return self.max_pdu or 0xFFFFFFFF
        return self.max_associate_pdu

    def deadline(self, started: float, length: int) -> float:
        """When a PDU of `length` bytes whose first byte came at `started` must be whole."""
        return started + self.pdu_timeout + length / max(self.min_transfer_rate, 1)


class PduRefused(Exception):
    """A PDU the node will not read: too large (`TOO_LARGE`) or too slow (`TOO_SLOW`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _WakeableSocket(AssociationSocket):
    """An AssociationSocket whose readiness check waits for data or a wake-up."""

    _wake_r: socket.socket
    _wake_w: socket.socket
    bounds: PduBounds
    idle_work: list[Callable[[], None]]  # to do once nothing waits to be sent
    closing_work: list[Callable[[], None]]  # to do when the connection closes

    @property
    def ready(self) -> bool:
        self._do_idle_work()  # asked only when nothing waits to be sent: the answer is out
        dul = self.assoc.dul
        if self.socket is None or self._is_connected is False:
            time.sleep(0.001)  # closed: pynetdicom's poll until the thread is stopped
            return False
        if (
            dul._kill_thread
            or dul.state_machine.current_state == "Sta13"  # closing: do not linger
            or not dul.to_provider_queue.empty()
            or not dul.event_queue.empty()  # the state machine has work: do not wait for bytes
            or (isinstance(self.socket, ssl.SSLSocket) and self.socket.pending())
        ):
            return bool(super().ready)
        if self._has_data():
            return True
        try:
            readable, _, _ = select.select([self.socket, self._wake_r], [], [], IDLE_WAIT)
        except (OSError, ValueError):
            return bool(super().ready)  # lets pynetdicom report the closed connection
        if self._wake_r in readable:
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)
        return self.socket in readable

    def _has_data(self) -> bool:
        """Whether bytes wait to be read, asked without waiting (cheaper than a select, and
        mostly true while a data set arrives). Never for TLS, whose bytes are not the data."""
        if isinstance(self.socket, ssl.SSLSocket):
            return False
        try:
            return bool(self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return False  # nothing yet, or a failure the select and the read will meet

    def read_pdu(self, state: str) -> bytearray | None:
        """The next PDU, header and body, read in state `state` within `bounds`; None when the
        connection closes before it is whole. Raises PduRefused for a PDU over its limit or
        slower than its deadline, OSError when the connection fails. An unknown PDU type is
        returned after its header only (pynetdicom refuses it without reading on)."""
        started = time.monotonic()
        header = self._read(6, started + self.bounds.pdu_timeout)
        if len(header) < 6:
            return None
        length = int.from_bytes(header[2:6], "big")
        if header[0] not in PDU_TYPES:
            return header
        limit = self.bounds.limit(header[0], state)
        if length > limit:
            raise PduRefused(
                TOO_LARGE, f"PDU type 0x{header[0]:02X} of {length} bytes (limit {limit})"
            )
        body = self._read(length, self.bounds.deadline(started, length), header)
        return body if len(body) == 6 + length else None

    def _read(self, count: int, deadline: float, before: bytearray | None = None) -> bytearray:
        """`count` bytes after `before` (fewer only when the connection closes), in a buffer
        that grows as they arrive: at most FIRST_ALLOCATION, then twice what has arrived."""
        buffer = before if before is not None else bytearray()
        start = len(buffer)
        end = start + count
        buffer += bytes(min(count, FIRST_ALLOCATION))
        read = start
        while read < end:
            if read == len(buffer):
                buffer += bytes(min(end - read, read))
            with memoryview(buffer) as view, view[read:] as rest:
                got = self._recv_into(rest, deadline)
            if not got:
                del buffer[read:]
                break
            read += got
        return buffer

    def _recv_into(self, view: memoryview, deadline: float) -> int:
        """Read what has arrived into `view`, waiting for bytes at most until `deadline` (then
        PduRefused) and at most the network timeout (then TimeoutError, as a blocking read
        bounded by it raised before)."""
        sock = self.socket
        if isinstance(sock, ssl.SSLSocket):
            if sock.pending():
                return int(sock.recv_into(view))
        else:
            try:
                return sock.recv_into(view, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        remaining = deadline - time.monotonic()
        assoc = getattr(self, "assoc", None)
        silence = assoc.network_timeout if assoc is not None else None
        if silence is not None and 0 < silence < remaining:
            if not readable(sock, silence):  # a peer that stopped: as a timed-out read
                raise TimeoutError(f"no byte for {silence} s inside a PDU")
        elif remaining <= 0 or not readable(sock, remaining):
            raise PduRefused(TOO_SLOW, "a PDU arrived slower than its deadline allows")
        return int(sock.recv_into(view))

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _do_idle_work(self) -> None:
        if self.idle_work:
            work, self.idle_work = self.idle_work, []
            run_all(work)

    def close(self) -> None:
        super().close()
        self._do_idle_work()
        run_all(self.closing_work)
        self.closing_work = []
        self._wake_r.close()
        self._wake_w.close()


class _DimseQueue(queue.Queue):
    """The DIMSE message queue of an accepted association, which can be woken: a release or
    an abort arrived for the association thread (`_WAKE` is queued)."""

    def wake(self) -> None:
        self.put(_WAKE)


class _NoZeroSleep:
    """The `time` module as pynetdicom's DUL thread sees it: ``sleep(0)`` returns at once.

    A wakeable DUL thread runs with a loop delay of 0, and pynetdicom's loop sleeps that long
    after every turn that put no event on its queue, which is every P-DATA-TF PDU the store
    lane reads. ``time.sleep(0)`` still gives up the GIL, so with two associations in one
    process each PDU handed the GIL to the other association's thread, which could keep it for
    the whole switch interval (5 ms). The thread blocks in ``select`` when it has nothing to
    do (and sleeps once its connection is closed), so skipping the zero sleep never makes it
    spin; other delays sleep as before."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class UnsupportedPynetdicom(RuntimeError):
    """The installed pynetdicom is not the minor version the node's connection handling was
    written for."""


def check_pynetdicom(version: str | None = None) -> None:
    """Raise UnsupportedPynetdicom unless `version` (default: the installed pynetdicom's) is
    of the minor version `SUPPORTED_PYNETDICOM`."""
    version = version if version is not None else str(pynetdicom.__version__)
    if version.split(".")[:2] != SUPPORTED_PYNETDICOM.split("."):
        raise UnsupportedPynetdicom(
            f"pynetdicom {version} is installed, but dicomnode's DIMSE connection handling "
            f"(dicomnode/scp/connection.py) changes pynetdicom internals and supports only "
            f"pynetdicom {SUPPORTED_PYNETDICOM}.x: install it with "
            f"pip install 'pynetdicom>={SUPPORTED_PYNETDICOM},<3.1'"
        )


_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Check the pynetdicom version (UnsupportedPynetdicom) and, once per process, change
    pynetdicom's module-level state: its DUL threads skip zero sleeps (`_NoZeroSleep`), and it
    neither logs every PDU and DIMSE message (formatted whether or not anything is logged) nor
    the identifiers of requests and responses: the node logs what happens itself."""
    global _installed
    with _install_lock:
        if _installed:
            return
        check_pynetdicom()
        pynetdicom_dul.time = _NoZeroSleep()  # type: ignore[assignment]
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"
        pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
        pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
        _installed = True


def installed() -> bool:
    """Whether `install` has changed pynetdicom in this process."""
    return _installed


def _make_wakeable(assoc: Any) -> _WakeableSocket:
    """Swap the association's socket for the wakeable kind and let its DUL thread block."""
    sock = assoc.dul.socket
    sock.__class__ = _WakeableSocket
    sock._wake_r, sock._wake_w = socket.socketpair()
    sock.bounds = getattr(assoc.ae, "pdu_bounds", None) or PduBounds(
        max_pdu=assoc.ae.maximum_pdu_size or 0
    )
    sock._wake_r.setblocking(False)
    sock._wake_w.setblocking(False)
    sock.idle_work = []
    sock.closing_work = []
    dul = assoc.dul
    dul._run_loop_delay = 0  # it waits in select instead
    send_pdu, stop_dul, kill_dul = dul.send_pdu, dul.stop_dul, dul.kill_dul

    def send_and_wake(primitive: Any) -> None:
        send_pdu(primitive)
        sock.wake()

    def stop_and_wake() -> bool:
        dul._run_loop_delay = 0.001  # pynetdicom's own wait for the thread to end
        if dul.state_machine.current_state == "Sta1":
            dul._kill_thread = True
            sock.wake()
        return bool(stop_dul())

    def kill_and_wake() -> None:
        kill_dul()
        sock.wake()
        if assoc.is_acceptor and not getattr(assoc, "association_requested", False):
            # The connection ended before its A-ASSOCIATE-RQ: the association thread, which
            # waits for one up to the ACSE timeout (its connection counting as pending that
            # long), reads this as "none came" and ends.
            dul.to_user_queue.put(None)

    dul.send_pdu, dul.stop_dul, dul.kill_dul = send_and_wake, stop_and_wake, kill_and_wake
    _read_within_bounds(assoc, sock, None)
    _drop_late_primitives(dul)
    return sock


def _serve_accepted(assoc: Any, store: StoreFunction | None) -> None:
    """The wakeable DUL thread, the store lane (with a store function) and a blocking
    association thread."""
    dimse = assoc.dimse
    sock = _make_wakeable(assoc)
    if store is not None:
        lane = StoreLane(assoc, store)
        dimse.receive_primitive = lane.receive
        sock.closing_work.append(lane.abandon)
        _read_within_bounds(assoc, sock, lane)
    messages = _DimseQueue()
    dimse.msg_queue = messages
    to_user = assoc.dul.to_user_queue
    put_for_user = to_user.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put_for_user(item, block, timeout)
        messages.wake()

    to_user.put = put_and_wake

    def get_msg(block: bool = False) -> Any:
        wait = dimse.dimse_timeout if block else IDLE_WAIT
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = messages.get(timeout=remaining)
            except queue.Empty:
                return None, None
            if item is not _WAKE or not block:
                return item  # _WAKE is (None, None): the reactor looks at its flags
            # a sender waits for a response: a wake-up is not one

    dimse.get_msg = get_msg


def _read_within_bounds(assoc: Any, sock: _WakeableSocket, lane: StoreLane | None) -> None:
    """The DUL thread reads every PDU with `sock.read_pdu` (within its bounds) in place of
    pynetdicom's reader, and decodes it as pynetdicom does. While the association is
    established (Sta6, where a P-DATA-TF only hands its data to DIMSE), a well-formed P-DATA-TF
    goes to the store lane (when there is one) without pynetdicom's PDU and primitive objects.
    A refused PDU ends the connection (`_refuse`)."""
    dul = assoc.dul

    def read_pdu_data() -> None:
        state = dul.state_machine.current_state
        try:
            pdu = sock.read_pdu(state)
        except PduRefused as refused:
            _refuse(assoc, sock, refused)
            return
        except OSError:
            pdu = None
        if pdu is None:
            dul.event_queue.put("Evt17")  # the connection closed, as pynetdicom reports it
            return
        if pdu[0] not in PDU_TYPES:
            log.warning("unknown PDU type 0x%02X from %s", pdu[0], _peer(assoc))
            dul.event_queue.put("Evt19")
            return
        if lane is not None and pdu[0] == P_DATA_TF_TYPE and state == "Sta6":
            values = presentation_values(memoryview(pdu)[6:])
            if values is not None:
                lane.receive_values(values)
                return
        if pdu[0] == 0x01:
            assoc.association_requested = True  # counts against max_associations from now
        try:
            decoded, event = dul._decode_pdu(pdu)
        except Exception as e:
            log.warning("undecodable PDU from %s: %s", _peer(assoc), e)
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(decoded)

    dul._read_pdu_data = read_pdu_data


def _drop_late_primitives(dul: Any) -> None:
    """A primitive the association thread queued for a connection that is closing already
    (Sta13, Sta1: say an A-ASSOCIATE-AC for a request the peer followed with an invalid PDU)
    is dropped. pynetdicom's state machine raised for it, which ended the DUL thread with an
    exception instead of letting the connection close."""
    machine = dul.state_machine
    do_action = machine.do_action

    def do_action_or_drop(event: str) -> None:
        state = machine.current_state
        if event in _LOCAL_EVENTS and (event, state) not in TRANSITION_TABLE:
            with contextlib.suppress(queue.Empty, IndexError):
                dul.to_provider_queue.get(block=False)
            log.debug("dropped %s in %s: the connection is closing", event, state)
            return
        do_action(event)

    machine.do_action = do_action_or_drop


def _refuse(assoc: Any, sock: _WakeableSocket, refused: PduRefused) -> None:
    """Answer a refused PDU: an A-ABORT (source: service provider), the connection closed,
    and the association ended as for a closed connection."""
    log.warning(
        "refused a PDU from %s: %s",
        _peer(assoc),
        refused,
        extra={"event": "pdu_refused", "reason": refused.reason, "address": _peer(assoc)},
    )
    report = getattr(assoc.ae, "on_pdu_refused", None)
    if report is not None:
        try:
            report(refused.reason)
        except Exception:
            log.exception("reporting a refused PDU failed")
    abort = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, _ABORT_REASON[refused.reason]])
    raw = sock.socket
    if raw is not None:
        with contextlib.suppress(OSError, ValueError):  # never waits for a peer that stopped
            raw.sendall(abort) if isinstance(raw, ssl.SSLSocket) else raw.send(abort, DONTWAIT)
        with contextlib.suppress(OSError, ValueError):
            raw.shutdown(socket.SHUT_RDWR)
    assoc.dul.event_queue.put("Evt17")  # as for a closed connection


def _peer(assoc: Any) -> str:
    raw = getattr(assoc.dul.socket, "socket", None)
    try:
        host, port = raw.getpeername()[:2] if raw is not None else ("?", 0)
    except OSError:
        host, port = assoc.requestor.address or "?", assoc.requestor.port or 0
    return f"{host}:{port}"


def readable(sock: socket.socket, timeout: float) -> bool:
    """Whether `sock` has bytes (or its end) to read within `timeout` seconds."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(max(1, int(timeout * 1000))))


def _send_only(assoc: Any) -> None:
    """The association thread of an association the node opened never takes a message: the
    node only sends requests on them, and every message is a response somebody waits for."""
    dimse = assoc.dimse
    get_msg = dimse.get_msg

    def responses_for_senders_only(block: bool = False) -> Any:
        return get_msg(block=True) if block else (None, None)

    dimse.get_msg = responses_for_senders_only


def _bound_calls(sock: socket.socket, timeout: float | None) -> None:
    """Bound every blocking call on `sock` by `timeout` seconds. A plain socket stays blocking
    with the bound set in the kernel (SO_RCVTIMEO/SO_SNDTIMEO: a call that times out raises
    OSError), so that a read is one system call, not a poll and then a read as with
    ``settimeout``; a TLS socket takes ``settimeout``."""
    if timeout is None or isinstance(sock, ssl.SSLSocket):
        sock.settimeout(timeout)
        return
    sock.settimeout(None)
    seconds = int(timeout)
    bound = struct.pack("ll", seconds, int((timeout - seconds) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)


def prepare(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for every connection the node accepts or opens: Nagle off (each
    C-STORE would otherwise wait ~40 ms for a delayed ACK), every blocking socket call bounded
    by the network timeout (pynetdicom leaves accepted sockets without one, so a peer that
    stops inside a PDU would hold the association, and the node's shutdown, forever), and the
    event-driven threads described above."""
    assoc = event.assoc
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _bound_calls(sock, assoc.network_timeout)
    if isinstance(assoc.dul.socket, _WakeableSocket):
        return
    _make_wakeable(assoc)
    if assoc.is_requestor:
        _send_only(assoc)


class NodeRequestHandler(RequestHandler):
    """Accepts a connection for the node's server (`server._Server`): the server chooses its
    transport (`transport`: TLS or plain TCP), the association gets the node's connection
    handling before its threads start (so its queues can be swapped safely), C-STOREs go to
    the server's ``store_function`` (when set), and the server starts the association
    (`start_association`, which keeps its count of connections exact)."""

    def handle(self) -> None:
        assoc = None
        try:
            self.request = self.server.transport(self.request)  # TLS or plain; None: closed
            if self.request is not None:
                assoc = self._create_association()
                _serve_accepted(assoc, self.server.store_function)
                evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        except BaseException:
            self.server.start_association(None)
            raise
        self.server.start_association(assoc)
