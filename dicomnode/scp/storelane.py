"""The store lane: C-STORE requests of an accepted association gathered from its P-DATA-TF PDUs
and served on the DUL thread, without pynetdicom's DIMSE message and primitive objects,
service class and events (see `dicomnode.scp.connection`, which installs it). Every other
message goes to pynetdicom unchanged, replayed from its first PDU."""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

log = logging.getLogger("dicomnode.scp")

_COMMAND, _LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)
C_STORE_RQ, C_STORE_RSP, NO_DATA_SET = 0x0001, 0x8001, 0x0101
P_DATA_TF_TYPE = 0x04
HANDLER_FAILED = 0xC211  # pynetdicom's status for a C-STORE handler that raised


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE request as the store lane hands it over: the command fields the node uses
    (UIDs as received, less padding) and the data set bytes exactly as they arrived."""

    context_id: int
    transfer_syntax: str
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    dataset: bytes
    after: list[Callable[[], None]] = field(default_factory=list)  # once the answer is sent


StoreFunction = Callable[[Any, StoreRequest], "int | Dataset"]  # (association, request) -> status


PresentationValues = list[tuple[int, Any]]  # (context id, control header + fragment)


class StoreLane:
    """Receives the P-DATA of one accepted association in place of pynetdicom's DIMSE
    provider: C-STORE requests are gathered and served here, on the DUL thread; every other
    message goes to pynetdicom unchanged (replayed from its first PDU)."""

    def __init__(self, assoc: Any, store: StoreFunction) -> None:
        self.assoc = assoc
        self.store = store
        self.to_pynetdicom = assoc.dimse.receive_primitive
        self._delegating = False  # pynetdicom is decoding the current message
        self._held: list[PresentationValues] = []  # PDUs of a message whose command is incomplete
        self._command = bytearray()
        self._request: dict[str, Any] | None = None  # the C-STORE being gathered
        self._fragments: list[Any] = []

    def receive(self, primitive: Any) -> None:
        """A P-DATA indication from pynetdicom's state machine."""
        self.receive_values(primitive.presentation_data_value_list)

    def receive_values(self, values: PresentationValues) -> None:
        """The presentation data values of one P-DATA-TF PDU."""
        if self._delegating:
            self._delegate(values)
            return
        self._held.append(values)
        for context_id, data in values:
            header = data[0]
            if header & _COMMAND and self._request is not None:
                self._reset()  # a new command inside a data set: the sender gave up on it
                self._held.append(values)
            if self._request is None:
                if not header & _COMMAND:
                    self._hand_over()  # a data set without a command: pynetdicom's to refuse
                    return
                self._command += data[1:]
                if header & _LAST:
                    self._request = self._store_request(context_id)
                    if self._request is None:
                        self._hand_over()
                        return
                    self._held = []
            else:
                self._fragments.append(data[1:])
                if header & _LAST:
                    self._serve()
                    return

    def abandon(self) -> None:
        """The connection is gone: drop the message being gathered."""
        self._reset()

    def _reset(self) -> None:
        self._held = []
        self._command = bytearray()
        self._request = None
        self._fragments = []

    def _hand_over(self) -> None:
        held = self._held
        self._reset()
        self._delegating = True
        for values in held:
            self._delegate(values)

    def _delegate(self, values: PresentationValues) -> None:
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[cx, bytes(data)] for cx, data in values]
        self.to_pynetdicom(primitive)
        self._delegating = self.assoc.dimse.message is not None

    def _store_request(self, context_id: int) -> dict[str, Any] | None:
        """The command's fields when it is a C-STORE request the lane serves, else None."""
        fields = _command_fields(bytes(self._command))
        if fields is None or _us(fields.get(0x0100)) != C_STORE_RQ:
            return None
        message_id = _us(fields.get(0x0110))
        sop_class = _ui(fields.get(0x0002))
        if message_id is None or not sop_class or _us(fields.get(0x0800)) == NO_DATA_SET:
            return None
        context = self.assoc._accepted_cx.get(context_id)
        if context is None or self.assoc._sent_release:
            return None
        if uid_to_service_class(sop_class) is not StorageServiceClass:
            return None
        return {
            "context_id": context_id,
            "transfer_syntax": str(context.transfer_syntax[0]),
            "message_id": message_id,
            "sop_class_uid": sop_class,
            "sop_instance_uid": _ui(fields.get(0x1000)),
        }

    def _serve(self) -> None:
        fields = self._request or {}
        request = StoreRequest(dataset=b"".join(self._fragments), **fields)
        self._reset()
        try:
            status = self.store(self.assoc, request)
        except Exception:
            log.exception("C-STORE failed unexpectedly")
            status = HANDLER_FAILED
        if not self.assoc.is_established:
            run_all(request.after)
            return
        self._send_command(request.context_id, c_store_response(request, status))
        idle_work = getattr(self.assoc.dul.socket, "idle_work", None)
        if idle_work is None:
            run_all(request.after)
        else:
            idle_work.extend(request.after)  # done once the answer has gone

    def _send_command(self, context_id: int, command: bytes) -> None:
        """Send `command` in P-DATA-TF PDUs no longer than the peer accepts: straight to the
        socket when nothing else waits to be sent (this runs on the DUL thread, and P-DATA in
        Sta6 leaves the state as it is), else through pynetdicom's queue."""
        dul = self.assoc.dul
        peer_limit = self.assoc.requestor.maximum_length  # 0: no limit
        limit = peer_limit - 6 if peer_limit and peer_limit > 6 else len(command)
        direct = dul.state_machine.current_state == "Sta6" and dul.to_provider_queue.empty()
        for start in range(0, len(command), limit):
            chunk = command[start : start + limit]
            header = _COMMAND | (_LAST if start + limit >= len(command) else 0)
            if direct:
                item = struct.pack(">IBB", len(chunk) + 2, context_id, header) + chunk
                dul.socket.send(struct.pack(">BBI", P_DATA_TF_TYPE, 0, len(item)) + item)
            else:
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, bytes([header]) + chunk))
                dul.send_pdu(pdata)


def run_all(work: list[Callable[[], None]]) -> None:
    for item in work:
        try:
            item()
        except Exception:
            log.exception("reporting a stored object failed")


def _command_fields(data: bytes) -> dict[int, bytes] | None:
    """The elements of an encoded command set (implicit VR little endian, group 0000) by
    element number, or None when it is not one."""
    fields: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if group != 0 or offset + length > len(data):
            return None
        fields[element] = data[offset : offset + length]
        offset += length
    return fields if offset == len(data) else None


def presentation_values(body: memoryview) -> PresentationValues | None:
    """The (context id, control header + fragment) items of a P-DATA-TF PDU's body (PS3.8
    9.3.5), as views of it; None when the items do not fill it exactly."""
    view = body
    values: PresentationValues = []
    offset = 0
    while offset < len(body):
        if offset + 6 > len(body):
            return None
        length = int.from_bytes(view[offset : offset + 4], "big")
        end = offset + 4 + length
        if length < 2 or end > len(body):
            return None
        values.append((body[offset + 4], view[offset + 5 : end]))
        offset = end
    return values or None


def _us(value: bytes | None) -> int | None:
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def _ui(value: bytes | None) -> str:
    return value.decode("latin-1").rstrip("\x00 ") if value else ""


def c_store_response(request: StoreRequest, status: int | Dataset) -> bytes:
    """The C-STORE-RSP command set for `request` (PS3.7 9.3.1.2), with the Status and, for a
    status data set, its Error Comment."""
    code = int(status.Status) if isinstance(status, Dataset) else int(status)
    comment = str(status.get("ErrorComment", "")) if isinstance(status, Dataset) else ""
    elements = [
        (0x0002, _padded(request.sop_class_uid.encode("latin-1"), b"\x00")),
        (0x0100, struct.pack("<H", C_STORE_RSP)),
        (0x0120, struct.pack("<H", request.message_id)),
        (0x0800, struct.pack("<H", NO_DATA_SET)),
        (0x0900, struct.pack("<H", code)),
    ]
    if comment:
        elements.append((0x0902, _padded(comment[:64].encode("ascii", "replace"), b" ")))
    if request.sop_instance_uid:
        elements.append((0x1000, _padded(request.sop_instance_uid.encode("latin-1"), b"\x00")))
    body = b"".join(struct.pack("<HHI", 0, tag, len(value)) + value for tag, value in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _padded(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value
