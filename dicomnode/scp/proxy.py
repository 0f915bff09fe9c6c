"""PROXY protocol version 2 on the DIMSE listener: the modality's address behind a balancer.

A TCP load balancer (HAProxy ``send-proxy-v2``) opens its own connection to the node, so the
node would see the balancer's address. With ``[dimse] proxy_protocol_from`` listing the
balancers, each connection from one of them must start with a PROXY v2 header naming the
modality's address; the node reads it before the connection is handed to a DIMSE worker
process, and logs, the ledger and audit messages name that address. A listed balancer's
connection without a valid header within `HEADER_TIMEOUT`, a header longer than
`MAX_HEADER_BODY`, or a truncated one, is closed. A connection from anyone else is not read
here: its first bytes go to the DICOM upper layer, which aborts on a PROXY signature (not a
PDU type), so an unlisted sender cannot claim another address.

Format (haproxy.org proxy-protocol.txt, section 2.2): a 12-byte signature, a version/command
byte, a family/protocol byte, a 2-byte big-endian length of what follows (addresses, TLVs).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from dicomnode.core.addresses import AddressSet

log = logging.getLogger("dicomnode.scp")

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED_LENGTH = 16  # signature, version/command, family/protocol, length
MAX_HEADER_BODY = 1024  # addresses (at most 216 bytes, AF_UNIX) and TLVs a balancer sends
HEADER_TIMEOUT = 5.0  # seconds a listed balancer has to send the whole header
_COMMANDS = {0x20: "local", 0x21: "proxy"}
_INET, _INET6, _UNIX = 0x1, 0x2, 0x3
_ADDRESS_LENGTH = {_INET: 12, _INET6: 36, _UNIX: 216}


class ProxyHeaderError(Exception):
    """A PROXY v2 header that is missing, malformed, too long, truncated or too slow."""


@dataclass(frozen=True)
class ProxyHeader:
    """What a balancer said about a connection: ``command`` "proxy" (with the original
    ``source`` and ``destination``) or "local" (the balancer's own connection, e.g. a health
    check: no addresses). ``source`` is None for "local" and for families other than IP."""

    command: str
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def parse_fixed(fixed: bytes) -> int:
    """Check the 16 fixed bytes; return the length of the rest (ProxyHeaderError if bad)."""
    if len(fixed) != FIXED_LENGTH or not fixed.startswith(SIGNATURE):
        raise ProxyHeaderError("no PROXY protocol v2 signature")
    if fixed[12] not in _COMMANDS:
        raise ProxyHeaderError(f"unknown PROXY version/command byte 0x{fixed[12]:02x}")
    family, length = fixed[13] >> 4, struct.unpack("!H", fixed[14:16])[0]
    if length > MAX_HEADER_BODY:
        raise ProxyHeaderError(f"PROXY header length {length} over {MAX_HEADER_BODY}")
    if _COMMANDS[fixed[12]] == "proxy" and length < _ADDRESS_LENGTH.get(family, 0):
        raise ProxyHeaderError(f"PROXY header length {length} too short for its addresses")
    return length


def parse_header(fixed: bytes, body: bytes) -> ProxyHeader:
    """The header made of the 16 fixed bytes and the `body` their length announced."""
    if len(body) != parse_fixed(fixed):
        raise ProxyHeaderError("PROXY header body does not match its length")
    command = _COMMANDS[fixed[12]]
    family = fixed[13] >> 4
    if command == "local" or family not in (_INET, _INET6):
        return ProxyHeader(command)  # UNSPEC or UNIX: no IP address to report
    size = 4 if family == _INET else 16
    source = ipaddress.ip_address(body[:size])
    destination = ipaddress.ip_address(body[size : 2 * size])
    source_port, destination_port = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    return ProxyHeader(command, (str(source), source_port), (str(destination), destination_port))


def read_header(connection: socket.socket, timeout: float = HEADER_TIMEOUT) -> ProxyHeader:
    """Read exactly one PROXY v2 header from `connection` within `timeout` seconds in all,
    however slowly the bytes come (ProxyHeaderError otherwise); nothing after it is read."""
    deadline = time.monotonic() + timeout
    fixed = _read_exactly(connection, FIXED_LENGTH, deadline)
    return parse_header(fixed, _read_exactly(connection, parse_fixed(fixed), deadline))


def _read_exactly(connection: socket.socket, size: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProxyHeaderError(f"PROXY header incomplete after {len(data)} bytes (timeout)")
        connection.settimeout(left)
        try:
            chunk = connection.recv(size - len(data))
        except TimeoutError:
            continue
        except OSError as e:
            raise ProxyHeaderError(f"connection failed while reading PROXY header: {e}") from None
        if not chunk:
            raise ProxyHeaderError(f"connection closed after {len(data)} bytes of PROXY header")
        data += chunk
    return bytes(data)


Dispatch = Callable[[socket.socket, Any], None]


class ProxyGate:
    """Reads the PROXY header of connections from the listed balancers, each in a thread of
    its own (the accept loop never waits for one), then passes the connection on with the
    address the header names. At most `max_reading` headers are read at once; beyond, a
    balancer's connection is closed (the balancer retries it elsewhere)."""

    def __init__(
        self,
        trusted: Iterable[str],
        max_reading: int = 32,
        timeout: float = HEADER_TIMEOUT,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.trusted = AddressSet(trusted)
        self.timeout = timeout
        self.on_refused = on_refused
        self._reading = threading.BoundedSemaphore(max_reading)

    def trusts(self, address: Any) -> bool:
        """Whether `address` (a socket address tuple) is a listed balancer."""
        return bool(address) and address[0] in self.trusted

    def admit(self, connection: socket.socket, address: Any, dispatch: Dispatch) -> None:
        """Dispatch `connection` now (not from a balancer) or once its header is read."""
        if not self.trusts(address):
            dispatch(connection, address)
            return
        if not self._reading.acquire(blocking=False):
            self._refuse(connection, address, "too many PROXY headers being read")
            return
        threading.Thread(
            target=self._read_then_dispatch,
            args=(connection, address, dispatch),
            name="proxy-header",
            daemon=True,
        ).start()

    def _read_then_dispatch(
        self, connection: socket.socket, address: Any, dispatch: Dispatch
    ) -> None:
        try:
            previous = connection.gettimeout()
            header = read_header(connection, self.timeout)
            connection.settimeout(previous)
        except ProxyHeaderError as e:
            self._refuse(connection, address, str(e))
            return
        finally:
            self._reading.release()
        dispatch(connection, header.source or address)

    def _refuse(self, connection: socket.socket, address: Any, reason: str) -> None:
        log.warning(
            "closed a connection from balancer %s: %s",
            address[0],
            reason,
            extra={"event": "proxy_header_refused", "address": str(address[0]), "reason": reason},
        )
        if self.on_refused is not None:
            self.on_refused("proxy_header")
        with contextlib.suppress(OSError):
            connection.close()
