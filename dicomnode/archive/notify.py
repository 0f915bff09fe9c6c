"""Cross-node wake-ups over PostgreSQL's LISTEN/NOTIFY.

A node that changes something other nodes cache (consent, restriction, legal hold, policy)
sends a notification on a channel after its commit; every node listening on that channel drops
its cached reads at once instead of when they grow stale. The database stays the truth: a
notification is only a wake-up (one sent while a listener is disconnected is lost, so the
caches still expire on their own), and on SQLite, which serves one host, there is nothing to
send: each process's own writes already drop its cache.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event, text

log = logging.getLogger("dicomnode.notify")

GOVERNANCE = "dicomnode_governance"  # consent, restriction, hold or policy changed
RECONNECT_SECONDS = 1.0  # how long a listener that lost its connection waits to try again


def announce(engine: Engine, channel: str, payload: str = "") -> None:
    """Tell every listener on `channel` (PostgreSQL; nothing on SQLite). A failure is logged,
    not raised: the change is committed, and the others' caches expire on their own."""
    if engine.dialect.name != "postgresql":
        return
    try:
        with engine.begin() as conn:
            conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": channel, "payload": payload},
            )
    except Exception:
        log.warning("no wake-up sent on %s", channel, exc_info=True)


class Listener:
    """A thread that LISTENs on `channel` over its own connection and calls `on_wake` for each
    notification (and once after every reconnection, since notifications sent meanwhile were
    lost). Nothing on SQLite."""

    def __init__(self, engine: Engine, channel: str, on_wake: Callable[[str], None]) -> None:
        self.engine = engine
        self.channel = channel
        self.on_wake = on_wake
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 2.0) -> None:
        """Start listening; returns once the LISTEN is in place (or `timeout` passed)."""
        if self.engine.dialect.name != "postgresql" or self._thread is not None:
            return
        event.listen(self.engine, "engine_disposed", lambda _engine: self._stop.set())
        self._thread = threading.Thread(
            target=self._run, name=f"listen-{self.channel}", daemon=True
        )
        self._thread.start()
        self._ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _connect(self) -> Any:
        import psycopg

        args, kwargs = self.engine.dialect.create_connect_args(self.engine.url)
        connection = psycopg.connect(*args, **kwargs, autocommit=True)
        connection.execute(f'LISTEN "{self.channel}"')
        return connection

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                connection = self._connect()
            except Exception:
                log.warning("cannot listen on %s; trying again", self.channel, exc_info=True)
                self._stop.wait(RECONNECT_SECONDS)
                continue
            self._ready.set()
            if not first:
                self._wake("")  # what was sent while disconnected is lost
            first = False
            try:
                with connection:
                    while not self._stop.is_set():
                        for note in connection.notifies(timeout=0.5):
                            self._wake(note.payload)
            except Exception:
                if not self._stop.is_set():
                    log.warning("lost the %s listener; reconnecting", self.channel, exc_info=True)
                    self._stop.wait(RECONNECT_SECONDS)

    def _wake(self, payload: str) -> None:
        try:
            self.on_wake(payload)
        except Exception:
            log.exception("a wake-up on %s failed", self.channel)
