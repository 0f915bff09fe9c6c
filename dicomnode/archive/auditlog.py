"""The audit spool and its sender: DICOM audit messages kept on disk and delivered in order.

`AuditLog.emit` writes one message (the XML from `dicomnode.governance.audit`) durably to the
spool folder: a temporary file, fsynced, renamed to ``<sequence>-<UTC time>.xml``, folder fsynced.
It is an observer: whatever goes wrong is logged, never raised into the caller's work.

A sender thread (`start`/`stop`) sends spooled messages oldest first to the syslog server in
``[audit]`` as RFC 5424 messages (PRI <85>: facility 10, severity 5; APP-NAME dicomnode; MSGID
DICOM+RFC3881; the XML after a UTF-8 BOM as MSG, PS3.15 A.6), each framed by octet counting
(RFC 5425 over TLS 1.2 or later, RFC 6587 over plain TCP). A message leaves the spool only after
it was written to the socket and the server's TCP stack acknowledged every byte of it (Linux
reports unacknowledged bytes, SIOCOUTQ), so a server that goes away mid-batch costs a resend,
not a message. Failures are retried after `retry_interval`, doubling up to 16 times that; the
order never changes. Delivery is at least once: a batch cut off by a broken connection is sent
again whole.

One node process owns a spool folder. Without a syslog server the spool is the audit trail, kept
up to `spool_max_bytes` and `spool_max_age_days` (checked whenever a message is spooled): past
them the oldest messages are deleted and an error is logged.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import queue
import re
import select
import socket
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dicomnode.archive.blobs import fsync_directory
from dicomnode.config import AuditSettings, Settings

try:  # SIOCOUTQ (== TIOCOUTQ on Linux): bytes the peer has not yet acknowledged
    import fcntl
    import termios

    _SIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - not Linux
    _SIOCOUTQ = None

log = logging.getLogger("dicomnode.archive.auditlog")

APP_NAME = "dicomnode"
MSGID = "DICOM+RFC3881"
PRI = 10 * 8 + 5  # facility 10 (security/authorization), severity 5 (notice): "<85>"
BOM = b"\xef\xbb\xbf"
SPOOL_FOLDER = "audit-spool"
BATCH_MESSAGES = 64
BATCH_BYTES = 1024 * 1024
MAX_BACKOFF = 16  # times retry_interval
TLS_ACCEPTANCE_WAIT = 2.0  # seconds to wait for a TLS 1.3 server's verdict on our certificate

_STAMP = "%Y%m%dT%H%M%S%fZ"
# <sequence>-<time>-<pid>.xml: the pid keeps two processes (serve, a CLI command) that write
# to one spool from ever choosing the same name.
_NAME = re.compile(r"^(\d{16})-(\d{8}T\d{12}Z)(?:-\d+)?\.xml$")
STALE_PART_SECONDS = 3600  # a half-written message older than this was left by a crash
ALERT_WINDOW = timedelta(minutes=1)  # security alerts of one source and kind: one per window
MAX_ALERT_SOURCES = 10_000  # windows kept at most (a scan from many addresses stays bounded)


@dataclass(frozen=True, slots=True)
class _Spooled:
    name: str
    size: int

    @property
    def time(self) -> datetime:
        return datetime.strptime(self.name[17:39], _STAMP).replace(tzinfo=UTC)


def syslog_message(xml: bytes, when: datetime, hostname: str, procid: str) -> bytes:
    """The RFC 5424 message carrying one audit message: ``<85>1 TIMESTAMP HOSTNAME dicomnode
    PROCID DICOM+RFC3881 - BOM XML``."""
    stamp = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    header = f"<{PRI}>1 {stamp} {_header_field(hostname, 255)} {APP_NAME} "
    header += f"{_header_field(procid, 128)} {MSGID} -"
    return header.encode("ascii") + b" " + BOM + xml


def tls_context(settings: AuditSettings) -> ssl.SSLContext:
    """The client context for syslog over TLS: TLS 1.2 or later, the server's certificate checked
    against `ca_file` (else the system CAs), its name checked unless `check_hostname` is false,
    and the node's client certificate when `cert_file` is set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = settings.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if settings.ca_file:
        context.load_verify_locations(cafile=str(settings.ca_file))
    else:
        context.load_default_certs()
    if settings.cert_file:
        key = str(settings.key_file) if settings.key_file else None
        context.load_cert_chain(str(settings.cert_file), key)
    return context


@dataclass
class _AlertWindow:
    """One source's alerts of one kind within ALERT_WINDOW: when the window opened, how many
    arrived after the first (not sent yet), and how to build the message that reports them."""

    opened: datetime
    unsent: int = 0
    build: Callable[[int], bytes | list[bytes]] | None = None


class AuditLog:
    """The spool folder `spool_dir` and, when `settings.syslog_host` is set, its sender."""

    def __init__(self, spool_dir: Path, settings: AuditSettings) -> None:
        self.spool_dir = spool_dir
        self.settings = settings
        self._tmp = spool_dir / "tmp"
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[_Spooled] = deque()
        self._bytes = 0
        self._next_sequence = 1
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._tls: ssl.SSLContext | None = None
        self._hostname = socket.gethostname()
        self._procid = str(os.getpid())
        self.source: Any = None  # the AuditSource the node's messages name (set by the app)
        self._builds: queue.Queue[Callable[[], bytes | list[bytes]] | None] = queue.Queue(
            maxsize=10000
        )
        self._writer: threading.Thread | None = None
        self._alerts: dict[tuple[str, ...], _AlertWindow] = {}
        self._alerts_lock = threading.Lock()
        if settings.enabled:
            self._load()

    def submit_alert(
        self, key: tuple[str, ...], build: Callable[[int], bytes | list[bytes]], now: datetime
    ) -> None:
        """A security alert, aggregated per `key` (kind, source) and minute: the first of a
        window is sent at once; the ones after it in that window are counted and sent as one
        message (`build(count)`) when the window has passed, noticed at the next alert of any
        key or at `flush_alerts`. An attack cannot flood the audit queue this way."""
        if not self.settings.enabled:
            return
        due: list[tuple[Callable[[int], bytes | list[bytes]], int]] = []
        with self._alerts_lock:
            for other, window in list(self._alerts.items()):
                if now - window.opened >= ALERT_WINDOW:
                    if window.unsent and window.build is not None:
                        due.append((window.build, window.unsent))
                    del self._alerts[other]
            window = self._alerts.get(key)
            if window is not None:
                window.unsent += 1
                window.build = build
            elif len(self._alerts) < MAX_ALERT_SOURCES:
                self._alerts[key] = _AlertWindow(now)
                due.append((build, 1))
            else:  # too many sources at once: one window for all the others
                overflow = self._alerts.setdefault(("overflow",), _AlertWindow(now))
                overflow.unsent += 1
                overflow.build = build
        for make, count in due:
            self.submit(lambda make=make, count=count: make(count))

    def flush_alerts(self) -> None:
        """Send the counts of alerts still held in their windows (at stop)."""
        with self._alerts_lock:
            held = [(w.build, w.unsent) for w in self._alerts.values() if w.unsent and w.build]
            self._alerts.clear()
        for make, count in held:
            self.submit(lambda make=make, count=count: make(count))

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditLog:
        """The node's audit log: the spool is ``data_dir/audit-spool``."""
        return cls(settings.node.data_dir / SPOOL_FOLDER, settings.audit)

    # --- the spool ----------------------------------------------------------------------------

    def emit(self, xml: bytes) -> None:
        """Spool one audit message durably; never raises (failures are logged)."""
        if not self.settings.enabled:
            return
        tmp_name = None
        try:
            if not isinstance(xml, bytes | bytearray) or not xml:
                raise TypeError(f"an audit message is non-empty bytes, got {type(xml).__name__}")
            now = datetime.now(UTC)
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp, suffix=".part")
            with os.fdopen(fd, "wb") as f:
                f.write(xml)
                f.flush()
                os.fsync(f.fileno())
            with self._lock:
                name = f"{self._next_sequence:016d}-{now.strftime(_STAMP)}-{self._procid}.xml"
                self._next_sequence += 1
                os.replace(tmp_name, self.spool_dir / name)
                tmp_name = None
                self._queue.append(_Spooled(name, len(xml)))
                self._bytes += len(xml)
                self._prune(now)
                self._changed.notify_all()
            fsync_directory(self.spool_dir)
        except Exception:
            log.exception("audit message not spooled", extra={"event": "audit_spool_failed"})
            if tmp_name:
                Path(tmp_name).unlink(missing_ok=True)

    def submit(self, build: Callable[[], bytes | list[bytes]]) -> None:
        """Build and spool a message off the caller's path: `build` runs in the writer thread
        (at once, in the caller's thread, when the writer is not running). Never raises: a full
        queue or a builder that fails is logged (the ledger holds the record of every decision;
        audit messages are the hospital's copy)."""
        if not self.settings.enabled:
            return
        if self._writer is None:
            self._build_and_emit(build)
            return
        try:
            self._builds.put_nowait(build)
        except queue.Full:
            log.error("audit queue full: a message was dropped", extra={"event": "audit_dropped"})

    def _build_and_emit(self, build: Callable[[], bytes | list[bytes]]) -> None:
        try:
            built = build()
        except Exception:
            log.exception("audit message not built", extra={"event": "audit_build_failed"})
            return
        for xml in built if isinstance(built, list) else [built]:
            self.emit(xml)

    def _write_loop(self) -> None:
        while (build := self._builds.get()) is not None:
            self._build_and_emit(build)

    def start_writer(self) -> None:
        """Build and spool submitted messages in a thread of their own (idempotent)."""
        if self._writer is None and self.settings.enabled:
            self._writer = threading.Thread(
                target=self._write_loop, name="audit-writer", daemon=True
            )
            self._writer.start()

    def stop_writer(self) -> None:
        """Spool what was submitted (with the alerts still counted), then stop the writer."""
        self.flush_alerts()
        writer, self._writer = self._writer, None
        if writer is not None:
            self._builds.put(None)
            writer.join()

    def pending(self) -> list[Path]:
        """The spooled messages not yet delivered, oldest first."""
        with self._lock:
            return [self.spool_dir / m.name for m in self._queue]

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the sender to empty the spool; True if it did."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def _load(self) -> None:
        """Read the spool a previous run left: half-written files go, messages are queued."""
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # messages name patients
        self._tmp.mkdir(mode=0o700, exist_ok=True)
        stale = time.time() - STALE_PART_SECONDS
        for leftover in self._tmp.iterdir():  # not another process's message being written
            with contextlib.suppress(FileNotFoundError):
                if leftover.stat().st_mtime < stale:
                    leftover.unlink()
        self._adopt()
        if self._queue:
            log.info(
                "%d audit messages waiting in the spool",
                len(self._queue),
                extra={"event": "audit_spool_loaded", "messages": len(self._queue)},
            )

    def _adopt(self) -> int:
        """Queue the spool's messages this log does not know yet: a previous run's, and those
        another process (a CLI command) spooled since. Returns how many (lock held or not
        needed)."""
        known = {m.name for m in self._queue}
        found = 0
        for path in sorted(self.spool_dir.glob("*.xml")):
            if path.name in known:
                continue
            match = _NAME.match(path.name)
            if not match:
                log.warning("ignoring %s in the audit spool: not a spooled message", path.name)
                continue
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            self._queue.append(_Spooled(path.name, size))
            self._bytes += size
            self._next_sequence = max(self._next_sequence, int(match.group(1)) + 1)
            found += 1
        if found:
            ordered = sorted(self._queue, key=lambda m: m.name)
            self._queue.clear()
            self._queue.extend(ordered)
        return found

    def _prune(self, now: datetime) -> None:
        """Delete the oldest messages while the spool is over its size or age limit (lock held)."""
        max_age = self.settings.spool_max_age_days
        oldest_allowed = now - timedelta(days=max_age) if max_age else None
        dropped = 0
        while self._queue and (
            self._bytes > self.settings.spool_max_bytes
            or (oldest_allowed and self._queue[0].time < oldest_allowed)
        ):
            message = self._queue.popleft()
            self._bytes -= message.size
            (self.spool_dir / message.name).unlink(missing_ok=True)
            dropped += 1
        if dropped:
            log.error(
                "audit spool over its limit: deleted the %d oldest undelivered messages",
                dropped,
                extra={"event": "audit_spool_pruned", "messages": dropped},
            )

    # --- the sender ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start delivering spooled messages to the syslog server; no-op without one, or if
        already started."""
        if not (self.settings.enabled and self.settings.syslog_host):
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="audit-sender", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the sender; undelivered messages stay in the spool for the next start."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        thread.join()  # bounded: every network operation has send_timeout
        self._thread = None

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._send(batch)
                self._delivered(batch)
            except Exception as error:
                self._disconnect()
                failures += 1
                delay = self.settings.retry_interval * min(2 ** (failures - 1), MAX_BACKOFF)
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "audit messages cannot be delivered to %s:%d (%d waiting), retrying: %s",
                    self.settings.syslog_host,
                    self.settings.syslog_port,
                    len(self._queue),
                    error,
                    extra={"event": "audit_delivery_failed", "error": str(error)},
                )
                self._stopping.wait(delay)
                continue
            if failures:
                log.info(
                    "audit delivery to %s:%d resumed after %d failed attempts",
                    self.settings.syslog_host,
                    self.settings.syslog_port,
                    failures,
                    extra={"event": "audit_delivery_resumed", "failures": failures},
                )
                failures = 0
        self._disconnect()

    def _next_batch(self) -> list[_Spooled]:
        """The oldest messages, up to a batch; waits while the spool is empty."""
        with self._changed:
            while not self._queue and not self._stopping.is_set():
                # look again now and then: another process may have spooled messages
                if not self._changed.wait(self.settings.retry_interval):
                    self._adopt()
            batch: list[_Spooled] = []
            size = 0
            for message in self._queue:
                if batch and (len(batch) >= BATCH_MESSAGES or size + message.size > BATCH_BYTES):
                    break
                batch.append(message)
                size += message.size
            return batch

    def _send(self, batch: list[_Spooled]) -> None:
        frames = []
        for message in batch:
            try:
                xml = (self.spool_dir / message.name).read_bytes()
            except FileNotFoundError:  # pruned meanwhile, or collected by hand
                continue
            body = syslog_message(xml, message.time, self._hostname, self._procid)
            frames.append(str(len(body)).encode("ascii") + b" " + body)
        if not frames:
            return
        connection = self._connection()
        connection.sendall(b"".join(frames))
        self._await_acknowledgement(connection)

    def _delivered(self, batch: list[_Spooled]) -> None:
        for message in batch:
            (self.spool_dir / message.name).unlink(missing_ok=True)
        with self._changed:
            for message in batch:
                if self._queue and self._queue[0] is message:
                    self._queue.popleft()
                    self._bytes -= message.size
            self._changed.notify_all()

    def _connection(self) -> socket.socket:
        if self._socket is not None and not _peer_closed(self._socket):
            return self._socket
        self._disconnect()
        host, port = self.settings.syslog_host, self.settings.syslog_port
        raw = socket.create_connection((host, port), timeout=self.settings.send_timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.settings.syslog_protocol == "tls":
                if self._tls is None:
                    self._tls = tls_context(self.settings)
                raw = self._tls.wrap_socket(raw, server_hostname=host)
                self._await_tls_acceptance(raw)
        except BaseException:
            raw.close()
            raise
        self._socket = raw
        return raw

    def _await_tls_acceptance(self, connection: ssl.SSLSocket) -> None:
        """With TLS 1.3 the server checks our certificate only after our handshake is done; it
        then either sends session tickets (accepted) or an alert (refused). Wait for one of them,
        up to TLS_ACCEPTANCE_WAIT, so that a refusal is not mistaken for delivery."""
        if connection.version() != "TLSv1.3":
            return  # TLS 1.2 finishes the handshake only after the server accepted us
        deadline = time.monotonic() + min(self.settings.send_timeout, TLS_ACCEPTANCE_WAIT)
        timeout = connection.gettimeout()
        try:
            while not (connection.session is not None and connection.session.has_ticket):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([connection], [], [], left)[0]:
                    return  # a server that sends no tickets: nothing more to learn
                connection.setblocking(False)
                with contextlib.suppress(ssl.SSLWantReadError):
                    if connection.recv(4096) == b"":
                        raise ConnectionError("the syslog server closed the TLS connection")
        finally:
            connection.settimeout(timeout)

    def _await_acknowledgement(self, connection: socket.socket) -> None:
        """Return once the server's TCP stack acknowledged everything sent; raise if the
        connection breaks or `send_timeout` passes first."""
        if _SIOCOUTQ is None:
            return
        deadline = time.monotonic() + self.settings.send_timeout
        pause = 0.0005
        buffer = array.array("i", [0])
        while True:
            fcntl.ioctl(connection.fileno(), _SIOCOUTQ, buffer, True)
            if buffer[0] == 0:
                return
            if _peer_closed(connection):
                raise ConnectionError("the syslog server closed the connection mid-batch")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{buffer[0]} bytes unacknowledged by the syslog server")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _disconnect(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None


def _peer_closed(connection: socket.socket) -> bool:
    """Whether the server closed or reset the connection. A syslog server never sends, so a
    readable socket means end of stream (or TLS housekeeping such as session tickets)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
    except (OSError, ValueError):
        return True
    if not readable:
        return False
    timeout = connection.gettimeout()
    try:
        connection.setblocking(False)
        try:
            data = connection.recv(4096)
        finally:
            connection.settimeout(timeout)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return not data


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, or "-" when empty."""
    printable = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return printable or "-"
