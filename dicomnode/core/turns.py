"""Turns: order among threads that do most of their work side by side."""

from __future__ import annotations

import threading


class Turns:
    """Turns 0, 1, 2, ... taken in order: `wait(k)` returns once every turn before k has
    `passed`. A turn may pass without waiting (work that failed early), and passing it twice
    is harmless. STOW-RS files a request's parts side by side and lets them queue their index
    writes in part order, so the parts are indexed (and listed by QIDO-RS) in that order."""

    def __init__(self) -> None:
        self._next = 0
        self._passed: set[int] = set()
        self._changed = threading.Condition()

    def wait(self, turn: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._next >= turn)

    def passed(self, turn: int) -> None:
        with self._changed:
            self._passed.add(turn)
            while self._next in self._passed:
                self._next += 1
            self._changed.notify_all()
