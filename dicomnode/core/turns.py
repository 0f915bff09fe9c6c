"""Turns: order among threads that do most of their work side by side."""

from __future__ import annotations

import threading
from dataclasses import dataclass


class Turns:
    """Turns 0, 1, 2, ... taken in order: a turn's `wait` returns once every turn before it
    has `passed`. A turn may pass without waiting (work that failed early), and passing it
    twice is harmless. STOW-RS files a request's parts side by side and lets them queue their
    index writes in part order, so the parts are indexed (and listed by QIDO-RS) in that order."""

    def __init__(self) -> None:
        self._next = 0
        self._passed: set[int] = set()
        self._changed = threading.Condition()

    def turn(self, number: int) -> Turn:
        return Turn(self, number)

    def _wait(self, number: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._next >= number)

    def _pass(self, number: int) -> None:
        with self._changed:
            self._passed.add(number)
            while self._next in self._passed:
                self._next += 1
            self._changed.notify_all()


@dataclass(frozen=True)
class Turn:
    """One turn of `turns`; `ANY_TIME` is the turn of work that waits for nobody."""

    turns: Turns | None
    number: int = 0

    def wait(self) -> None:
        if self.turns is not None:
            self.turns._wait(self.number)

    def passed(self) -> None:
        if self.turns is not None:
            self.turns._pass(self.number)


ANY_TIME = Turn(None)
