"""Builds the pynetdicom AE from the settings and runs it: start, drain, stop."""

from __future__ import annotations

import contextlib
import copy
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.core.model import Source
from dicomnode.governance import audit_events
from dicomnode.scp.connection import NodeRequestHandler, PduBounds, install, prepare, readable
from dicomnode.scp.handlers import HANDLERS, DimseContext, store
from dicomnode.scp.limits import SenderLimits
from dicomnode.scp.proxy import HEADER_TIMEOUT, ProxyGate
from dicomnode.scp.storelane import StoreRequest

log = logging.getLogger("dicomnode.scp")

TLS_HANDSHAKE_RECORD = b"\x16"  # a TLS record's content type byte: handshake (RFC 8446 5.1)
SENDER_LIMIT_STATUS = 0xA700  # Refused: Out of Resources (PS3.4 B.2.3): modalities retry later
QUERY_RETRIEVE = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)

# Stored as received, in any of these: uncompressed, deflate, JPEG, JPEG-LS, JPEG 2000, RLE, ...
STORAGE_TRANSFER_SYNTAXES = list(ALL_TRANSFER_SYNTAXES)


class _DeferredHandshakeContext(ssl.SSLContext):
    """Wraps sockets without the TLS handshake. pynetdicom wraps each accepted socket in its
    accept loop, so a client that connects and says nothing would stop every other connection;
    deferred, the handshake runs on the association's first read, in its own thread and
    bounded by the network timeout (see `connection.prepare`)."""

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def _server_ssl_context(ctx: DimseContext) -> ssl.SSLContext | None:
    tls = ctx.settings.dimse.tls
    if tls is None:
        return None
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        context.load_verify_locations(tls.ca_file)
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif ctx.admission.asks_for_certificates:  # AE titles bound to certificates: ask for one
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


class _NodeAE(AE):
    """The node's AE. Its associations, as pynetdicom counts them against
    ``maximum_associations``, are those it opened and those whose A-ASSOCIATE-RQ has been
    read: a connection that has not asked for an association yet (idle, or slow) holds no
    association slot. Such connections are bounded by ``max_pending_connections`` instead
    (`_Server.take`), their PDUs by ``pdu_bounds`` (`connection.PduBounds`)."""

    pdu_bounds: PduBounds | None = None
    on_pdu_refused: Callable[[str], None] | None = None
    listen_backlog: int = 64
    max_pending_connections: int = 32

    @property
    def active_associations(self) -> list[Any]:
        return [
            assoc
            for assoc in super().active_associations
            if not assoc.is_acceptor or getattr(assoc, "association_requested", False)
        ]


def build_ae(ctx: DimseContext) -> AE:
    """The node's AE: Verification, Storage for every storage SOP class pynetdicom knows
    (also in the SCP role, for C-GET), and Patient/Study Root Query/Retrieve."""
    dimse = ctx.settings.dimse
    ae = _NodeAE(ae_title=ctx.settings.node.ae_title)
    ae.pdu_bounds = PduBounds(
        max_pdu=dimse.max_pdu,
        max_associate_pdu=dimse.max_associate_pdu,
        pdu_timeout=dimse.pdu_timeout,
        min_transfer_rate=dimse.min_transfer_rate,
    )
    ae.listen_backlog = dimse.listen_backlog
    ae.max_pending_connections = dimse.max_pending_connections
    ae.maximum_associations = dimse.max_associations
    ae.maximum_pdu_size = dimse.max_pdu
    ae.acse_timeout = dimse.acse_timeout
    ae.dimse_timeout = dimse.store_timeout  # bounds each C-STORE sub-operation of C-MOVE/C-GET
    ae.network_timeout = dimse.network_timeout
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(
            context.abstract_syntax, STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
        )
    for sop_class in QUERY_RETRIEVE:
        ae.add_supported_context(sop_class)
    if dimse.require_known_peers:
        ae.require_calling_aet = [p.ae_title for p in ctx.settings.peers]
    return ae


HandOff = Callable[[socket.socket, Any, int], bool]  # (connection, address, own load) -> handed?


class _SupportedContexts(list[PresentationContext]):
    """The server's supported presentation contexts. pynetdicom deep-copies them for every
    association it accepts, and copy.deepcopy of the node's ~170 storage contexts costs ~40 ms
    of CPU (more with several associations starting at once). A context holds UIDs, flags and
    one list of transfer syntaxes, so a copy of each with a list of its own is a deep copy."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the node's connection handling, and the choice of
    which process serves an accepted connection: `hand_off` (set by the app when the node runs
    DIMSE worker processes) may pass it to another process; the others are `take`n here. TLS
    is set up in the connection's own thread (`transport`), so that a raw connection can be
    handed over and a silent one holds up no other."""

    listens = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts = _SupportedContexts(self.contexts)
        self.hand_off: HandOff | None = None
        self.proxy_gate: ProxyGate | None = None  # reads balancers' PROXY headers first
        self.store_function: Any = None
        self._pending = 0  # connections taken whose association has not started yet
        self._pending_lock = threading.Lock()
        self.refused_connections = 0  # closed at once for max_pending_connections
        self._refusal_logged = -10.0

    def server_bind(self) -> None:
        if self.listens:
            super().server_bind()

    def server_activate(self) -> None:
        self.request_queue_size = getattr(self.ae, "listen_backlog", self.request_queue_size)
        if self.listens:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        return self.socket.accept()

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.proxy_gate is not None:
            self.proxy_gate.admit(request, client_address, self.dispatch)
        else:
            self.dispatch(request, client_address)

    def dispatch(self, request: Any, client_address: Any) -> None:
        """Hand a connection to a worker process or take it here."""
        if self.hand_off is not None and self.hand_off(request, client_address, self.load()):
            return
        self.take(request, client_address)

    def take(self, request: socket.socket, client_address: Any) -> None:
        """Serve a connection here (one this server accepted, or one handed to it), unless
        ``max_pending_connections`` connections wait for their association already: then it
        is closed at once."""
        limit = getattr(self.ae, "max_pending_connections", None)
        if limit is not None and self.pending_connections() >= limit:
            self._refuse_connection(request, client_address, limit)
            return
        with self._pending_lock:
            self._pending += 1
        super().process_request(request, client_address)

    def transport(self, request: socket.socket) -> socket.socket | None:
        """The connection as its association reads it (in the connection's thread): with TLS
        configured, wrapped in TLS when the client's first byte opens a TLS handshake record
        (0x16), else plain TCP, which `handlers.on_requested` accepts from
        ``dimse.plain_networks`` only. None (the connection closed) when nothing arrives
        within the ACSE timeout."""
        if not self.ssl_context:
            return request
        try:
            arrived = readable(request, self.ae.acse_timeout or 30.0)
            first = request.recv(1, socket.MSG_PEEK) if arrived else b""
        except OSError:
            first = b""
        if not first:
            with contextlib.suppress(OSError):
                request.close()
            return None
        if first == TLS_HANDSHAKE_RECORD:
            return self.ssl_context.wrap_socket(request, server_side=True)
        return request

    def start_association(self, assoc: Any | None) -> None:
        """Start the association of a taken connection (None: it failed before it had one).
        The connection stops counting as pending as its association starts counting as
        active, so that `load` counts it once, never twice or not at all."""
        with self._pending_lock:
            try:
                if assoc is not None:
                    assoc.start()
            finally:
                self._pending -= 1

    def pending_connections(self) -> int:
        """Connections taken here whose A-ASSOCIATE-RQ has not been read yet."""
        with self._pending_lock:
            waiting = self._pending
            threads = list(self.active_associations)
        return waiting + sum(1 for a in threads if not getattr(a, "association_requested", False))

    def _refuse_connection(self, request: socket.socket, client_address: Any, limit: int) -> None:
        """Count the refusal, then close: whoever sees the connection closed sees it counted."""
        try:
            self._count_refused_connection(client_address, limit)
        finally:
            with contextlib.suppress(OSError):
                request.close()

    def _count_refused_connection(self, client_address: Any, limit: int) -> None:
        now = time.monotonic()
        self.refused_connections += 1
        if now - self._refusal_logged >= 10:  # a flood of connections is not a flood of lines
            self._refusal_logged = now
            log.warning(
                "closed a connection from %s: %d connections wait for their association "
                "already (dimse.max_pending_connections); %d closed so far",
                client_address[0],
                limit,
                self.refused_connections,
                extra={"event": "connection_refused", "address": str(client_address[0])},
            )
        report = getattr(self.ae, "on_pdu_refused", None)
        if report is not None:
            report("too_many_connections")

    def load(self) -> int:
        """Connections this process serves now (associations, and those about to be)."""
        with self._pending_lock:
            return len(self.active_associations) + self._pending


class _HandedServer(_Server):
    """A server that does not listen: it serves the connections another process accepted
    and handed to it (a DIMSE worker process)."""

    listens = False


class DimseServer:
    """The node's DIMSE server: listening on the configured address, or (`listen=False`, in a
    DIMSE worker process) serving connections handed to it with `take`."""

    def __init__(self, ctx: DimseContext, listen: bool = True) -> None:
        self.ctx = ctx
        self.ae = build_ae(ctx)
        self.listen = listen
        self.hand_off: HandOff | None = None
        self._server: Any = None
        dimse = ctx.settings.dimse
        self.limits = SenderLimits(dimse.sender_objects_per_minute, dimse.sender_bytes_per_hour)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> int:
        """Listen on the configured address (or get ready to take connections); returns the
        port (useful when configured as 0). Raises UnsupportedPynetdicom (naming the supported
        version) when the installed pynetdicom is not the one the node's connection handling
        was written for."""
        install()
        dimse = self.ctx.settings.dimse
        handlers: list[Any] = [(evt.EVT_CONN_OPEN, prepare)]
        for event, handler in HANDLERS:
            bound = partial(handler, ctx=self.ctx)
            if event is evt.EVT_C_STORE:
                bound = partial(self._store_event_within_limits, bound)
            handlers.append((event, bound))
        self._server = self.ae.make_server(
            (dimse.host, dimse.port),
            evt_handlers=handlers,
            ssl_context=_server_ssl_context(self.ctx),
            server_class=_Server if self.listen else _HandedServer,
            request_handler=NodeRequestHandler,
        )
        self._server.store_function = self._store_within_limits
        self.ae.on_pdu_refused = self._count_refusal
        self._server.hand_off = self.hand_off
        if self.listen and dimse.proxy_protocol_from:
            self._server.proxy_gate = ProxyGate(
                dimse.proxy_protocol_from,
                dimse.max_pending_connections,
                HEADER_TIMEOUT,
                self._count_refusal,
            )
        if self.listen:
            threading.Thread(
                target=self._server.serve_forever, name="dimse-accept", daemon=True
            ).start()
        return self.port

    def _store_within_limits(self, assoc: Any, request: StoreRequest) -> int | Dataset:
        """The store lane's store function: `handlers.store` for a sender within its limits."""
        refused = self._over_sender_limit(assoc, len(request.dataset))
        return refused if refused is not None else store(assoc, request, ctx=self.ctx)

    def _store_event_within_limits(self, handle: Any, event: evt.Event) -> int | Dataset:
        """The EVT_C_STORE handler (C-STOREs pynetdicom decodes) for a sender within limits."""
        dataset = event.request.DataSet
        size = dataset.getbuffer().nbytes if dataset is not None else 0
        refused = self._over_sender_limit(event.assoc, size)
        return refused if refused is not None else handle(event)

    def _over_sender_limit(self, assoc: Any, size: int) -> Dataset | None:
        """None when the sender may store `size` more bytes now (counted), else the status to
        answer; the sender's first refusal in a window is logged and audited."""
        caller = assoc.requestor.ae_title.strip()
        address = str(assoc.requestor.address)
        refusal = self.limits.admit(caller, address, size)
        if refusal is None:
            return None
        metrics = self.ctx.metrics
        metrics.add("dicomnode_store_failures_total", reason="sender_limit")
        metrics.add("dicomnode_dimse_requests_total", service="store", status="0xA700")
        if refusal.alert:
            log.warning(
                "C-STOREs from %s at %s refused: %s (dimse.sender_* limits)",
                caller,
                address,
                refusal.reason,
                extra={
                    "event": "sender_limit",
                    "caller": caller,
                    "address": address,
                    "reason": refusal.reason,
                },
            )
            audit_log = self.ctx.egress.audit
            if audit_log is not None and audit_log.source is not None:
                sender = Source("dimse", caller, address)
                now = datetime.now(UTC)
                audit_log.submit(
                    lambda: audit_events.refused(
                        sender, "store", f"sender limit: {refusal.reason}", now, audit_log.source
                    )
                )
        status = Dataset()
        status.Status = SENDER_LIMIT_STATUS
        status.ErrorComment = f"sender limit: {refusal.reason}"[:64]
        return status

    def _count_refusal(self, reason: str) -> None:
        """A connection ended for a PDU refused (`connection.PduRefused`) or closed at once."""
        self.ctx.metrics.add("dicomnode_associations_total", outcome=f"refused_{reason}")

    def take(self, connection: socket.socket, address: Any) -> None:
        """Serve a connection accepted by another process."""
        self._server.take(connection, address)

    def load(self) -> int:
        return self._server.load() if self._server else 0

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def stop(self, drain_timeout: float) -> None:
        """Stop accepting, let open associations finish for up to `drain_timeout` s, then abort."""
        if self._server is None:
            return
        if self.listen:
            socketserver.TCPServer.shutdown(self._server)
        self._server.server_close()
        deadline = time.monotonic() + drain_timeout
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.active_associations():
            log.warning(
                "aborting %d associations still open after draining", self.active_associations()
            )
            # Closing the connection ends an association whatever its state, even one whose
            # peer stopped inside a PDU; an A-ABORT would wait for the reader it is stuck in.
            for assoc in self._server.active_associations:
                with contextlib.suppress(AttributeError, OSError):
                    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
            deadline = time.monotonic() + 5
            while self.active_associations() and time.monotonic() < deadline:
                time.sleep(0.05)
        self._server = None
