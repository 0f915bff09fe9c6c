"""A static web server with a reverse proxy, as a hospital puts in front of a viewer: the
viewer's files at `/`, and `/dicomweb/...` forwarded to a DICOMweb server with a bearer token
added (the one change the proxy makes to a request)."""

from __future__ import annotations

import http.client
import mimetypes
import sys
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# headers that belong to one connection, never forwarded (RFC 9110 section 7.6.1)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("application/javascript", ".js")
mimetypes.add_type("font/woff2", ".woff2")


class _QuietServer(ThreadingHTTPServer):
    """Ignores a browser closing its connection mid-answer (a page or context closed)."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ViewerServer:
    """Serves `root` (with `overrides`: path -> bytes, e.g. a generated /app-config.js) on
    127.0.0.1 at a free port, falls back to /index.html for the viewer's own routes, and
    forwards `prefix`... to `upstream` (http://host:port/path) with `Authorization` set by
    `authorization()` when given."""

    def __init__(
        self,
        root: Path,
        upstream: str,
        prefix: str = "/dicomweb",
        authorization: Callable[[], str] | None = None,
        overrides: dict[str, bytes] | None = None,
    ) -> None:
        self.root = root.resolve()
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.upstream_path = parsed.path.rstrip("/")
        self.prefix = prefix
        self.authorization = authorization
        self.overrides = overrides or {}
        self.forwarded: list[tuple[str, str, int]] = []  # (method, path, status) as answered
        self._local = threading.local()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

            do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_GET

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ViewerServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- requests ---------------------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.urlsplit(request.path).path
        if path == self.prefix or path.startswith(self.prefix + "/"):
            self._forward(request)
        else:
            self._static(request, path)

    def _static(self, request: BaseHTTPRequestHandler, path: str) -> None:
        body = self.overrides.get(path)
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if body is None:
            file = (self.root / urllib.parse.unquote(path).lstrip("/")).resolve()
            if not file.is_relative_to(self.root) or not file.is_file():
                file = self.root / "index.html"  # the viewer's routes (/viewer?...)
                content_type = "text/html"
            body = file.read_bytes()
        request.send_response(200)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)

    def _upstream(self, fresh: bool = False) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None or fresh:
            if connection is not None:
                connection.close()
            connection = http.client.HTTPConnection(
                self.upstream_host, self.upstream_port, timeout=120
            )
            self._local.connection = connection
        return connection

    def _forward(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if self.authorization is not None:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            headers["Authorization"] = self.authorization()
        target = self.upstream_path + request.path[len(self.prefix) :]
        for attempt in (0, 1):  # a kept-alive upstream connection may have been closed
            connection = self._upstream(fresh=attempt == 1)
            try:
                connection.request(request.command, target, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                break
            except (ConnectionError, http.client.HTTPException):
                if attempt == 1:
                    raise
        self.forwarded.append((request.command, request.path, response.status))
        request.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                request.send_header(name, value)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(payload)
