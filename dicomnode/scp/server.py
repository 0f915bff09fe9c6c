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
from functools import partial
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
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

from dicomnode.scp.connection import NodeRequestHandler, prepare
from dicomnode.scp.handlers import HANDLERS, DimseContext, store

log = logging.getLogger("dicomnode.scp")

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

# The node logs what happens itself: pynetdicom's own debug logging of every PDU and DIMSE
# message (formatted whether or not anything is logged) and of identifiers costs time.
_config.LOG_HANDLER_LEVEL = "none"
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False


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
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return context


def build_ae(ctx: DimseContext) -> AE:
    """The node's AE: Verification, Storage for every storage SOP class pynetdicom knows
    (also in the SCP role, for C-GET), and Patient/Study Root Query/Retrieve."""
    dimse = ctx.settings.dimse
    ae = AE(ae_title=ctx.settings.node.ae_title)
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
    is set up when a connection is taken, so that a raw connection can be handed over."""

    listens = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts = _SupportedContexts(self.contexts)
        self.hand_off: HandOff | None = None
        self.store_function: Any = None
        self._pending = 0  # connections taken whose association has not started yet
        self._pending_lock = threading.Lock()

    def server_bind(self) -> None:
        if self.listens:
            super().server_bind()

    def server_activate(self) -> None:
        if self.listens:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        return self.socket.accept()

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.hand_off is not None and self.hand_off(request, client_address, self.load()):
            return
        self.take(request, client_address)

    def take(self, request: socket.socket, client_address: Any) -> None:
        """Serve a connection here (one this server accepted, or one handed to it)."""
        if self.ssl_context:
            request = self.ssl_context.wrap_socket(request, server_side=True)
        with self._pending_lock:
            self._pending += 1
        super().process_request(request, client_address)

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

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> int:
        """Listen on the configured address (or get ready to take connections); returns the
        port (useful when configured as 0)."""
        dimse = self.ctx.settings.dimse
        handlers: list[Any] = [(evt.EVT_CONN_OPEN, prepare)]
        handlers += [(event, partial(handler, ctx=self.ctx)) for event, handler in HANDLERS]
        self._server = self.ae.make_server(
            (dimse.host, dimse.port),
            evt_handlers=handlers,
            ssl_context=_server_ssl_context(self.ctx),
            server_class=_Server if self.listen else _HandedServer,
            request_handler=NodeRequestHandler,
        )
        self._server.store_function = partial(store, ctx=self.ctx)
        self._server.hand_off = self.hand_off
        if self.listen:
            threading.Thread(
                target=self._server.serve_forever, name="dimse-accept", daemon=True
            ).start()
        return self.port

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
