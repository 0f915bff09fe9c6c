"""The HTTP server (waitress) with limits a slow or hostile client cannot sit out.

Waitress reads each request whole before a worker thread serves it, so slow clients hold
connections, not threads; but it stops accepting at its connection limit, and it closes only
connections idle for ``channel_timeout``: a client sending one byte every few seconds (slow
loris) is never idle. Here, besides waitress's own limits (``[http] connection_limit``,
``backlog``, ``channel_timeout``, ``threads``), a connection is closed when:

- its request line and headers are not all in ``header_timeout`` seconds after the connection
  opened or its previous request was read (an idle connection that never sends counts too);
- its request body arrives slower than ``min_upload_rate`` bytes/s over any window of
  ``header_timeout`` seconds;
- it does not read its answer: with at least 256 KiB waiting to be sent, fewer than
  ``min_upload_rate`` bytes/s go out over such a window (a slow reader holds a worker thread
  once waitress has 16 MiB of its answer buffered);
- its client address already holds ``max_connections_per_client`` connections (refused at
  once; 0: no such limit, for a node behind a proxy).
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

from dicomnode.config import HttpSettings

log = logging.getLogger("dicomnode.http")

MAINTENANCE_SECONDS = 1  # how often slow connections are looked for
STALLED_ANSWER_BYTES = 256 * 1024  # an answer this far ahead of its client may be stalled


class GuardedChannel(HTTPChannel):
    """A waitress connection that keeps what the server needs to find a slow client: since
    when it waits for the request being read (None: idle between requests, which waitress's
    channel_timeout governs) and how many bytes arrived in the current window."""

    def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Any, map: Any = None):
        super().__init__(server, sock, addr, adj, map=map)
        self.waiting_since: float | None = time.monotonic()  # a new connection owes a request
        self.window_start = self.waiting_since
        self.window_bytes = 0
        self.sent_bytes = 0  # of answers, counted by send() (on any thread)
        self.send_window: tuple[float, int] | None = None  # (since, sent_bytes then)

    def received(self, data: bytes) -> bool:
        if self.waiting_since is None:  # the first bytes of a request
            self.waiting_since = self.window_start = time.monotonic()
            self.window_bytes = 0
        self.window_bytes += len(data)
        result = super().received(data)
        if self.request is None:  # every byte went into whole requests
            self.waiting_since = None
        return bool(result)

    def send(self, data: bytes, do_close: bool = True) -> int:
        sent = super().send(data, do_close=do_close)
        self.sent_bytes += sent
        return sent

    def too_slow(self, now: float, header_timeout: float, min_rate: float) -> str:
        """Why this connection is to be closed (empty: it is not)."""
        if self.requests:
            return self._not_reading(now, header_timeout, min_rate)
        if self.waiting_since is None:
            return ""  # idle between requests
        request = self.request
        if request is None or not request.headers_finished:
            if now - self.waiting_since > header_timeout:
                return "request headers not received in time"
            return ""
        elapsed = now - self.window_start
        if elapsed >= header_timeout:
            if self.window_bytes < min_rate * elapsed:
                return "request body arriving too slowly"
            self.window_start, self.window_bytes = now, 0
        return ""

    def _not_reading(self, now: float, window: float, min_rate: float) -> str:
        """While a request is served: the client does not read its answer (slow read) when
        at least STALLED_ANSWER_BYTES wait to be sent and fewer than `min_rate` bytes/s went
        out over `window` seconds. Such a client holds a worker thread (waitress blocks the
        application once 16 MiB wait), so it is closed, which frees the thread."""
        if self.total_outbufs_len < STALLED_ANSWER_BYTES:
            self.send_window = None  # the application's time, or a client keeping up
            return ""
        if self.send_window is None:
            self.send_window = (now, self.sent_bytes)
            return ""
        since, sent_then = self.send_window
        if now - since < window:
            return ""
        if self.sent_bytes - sent_then < min_rate * (now - since):
            return "answer not read by the client"
        self.send_window = (now, self.sent_bytes)
        return ""


class GuardedServer(TcpWSGIServer):
    """waitress's TCP server closing connections that are too slow, and refusing connections
    beyond the per-client limit."""

    channel_class = GuardedChannel

    def __init__(self, *args: Any, http: HttpSettings, **kw: Any) -> None:
        self.http = http
        super().__init__(*args, **kw)

    def handle_accept(self) -> None:
        limit = self.http.max_connections_per_client
        if not limit:
            super().handle_accept()
            return
        try:
            accepted = self.accept()
        except OSError:
            return
        if accepted is None:
            return
        conn, addr = accepted
        held = Counter(_host(c.addr) for c in self.active_channels.values())
        if held[_host(addr)] >= limit:
            log.warning(
                "HTTP connection refused: %s holds %d connections",
                _host(addr),
                held[_host(addr)],
                extra={"event": "http_connection_refused", "address": _host(addr)},
            )
            conn.close()
            return
        try:
            self.set_socket_options(conn)
        except OSError:
            conn.close()
            return
        self.channel_class(self, conn, self.fix_addr(addr), self.adj, map=self._map)

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle connections, after channel_timeout
        moment = time.monotonic()
        for channel in list(self.active_channels.values()):
            if not isinstance(channel, GuardedChannel) or channel.will_close:
                continue
            why = channel.too_slow(moment, self.http.header_timeout, self.http.min_upload_rate)
            if why:
                log.info(
                    "HTTP connection closed: %s",
                    why,
                    extra={"event": "http_slow_client", "address": _host(channel.addr)},
                )
                # at once: will_close waits for the socket to be writable, which a client
                # that reads nothing never makes it; a blocked worker thread is woken up
                channel.handle_close()


def _host(addr: Any) -> str:
    return str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)


def create_http_server(app: Any, http: HttpSettings) -> Any:
    """The node's HTTP server on `http.host`:`http.port`, not yet running (call .run())."""
    adj = Adjustments(
        host=http.host,
        port=http.port,
        threads=http.threads,
        ident="dicomnode",
        max_request_body_size=http.max_request_bytes,
        # request bodies up to 8 MiB (a STOW-RS request of ten CT slices) stay in memory
        # instead of going through a temporary file; larger ones are still spooled to disk
        inbuf_overflow=8 * 1024 * 1024,
        connection_limit=http.connection_limit,
        backlog=http.backlog,
        channel_timeout=http.channel_timeout,
        cleanup_interval=MAINTENANCE_SECONDS,
        asyncore_use_poll=True,  # select() cannot watch descriptors past 1023
        # X-Forwarded-For reaches the app, which believes it from trusted proxies only
        # (dicomweb.proxy); waitress would drop it, trusting no proxy itself
        clear_untrusted_proxy_headers=not http.trusted_proxies,
    )
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    connections: dict = {}
    servers = [
        GuardedServer(
            app, connections, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo, http=http
        )
        for sockinfo in adj.listen
    ]
    if len(servers) == 1:
        return servers[0]
    listening = [(s.effective_host, s.effective_port) for s in servers]
    return MultiSocketServer(connections, adj, listening, dispatcher, servers[-1].log_info)
