"""Turns: threads that work side by side take one step in a fixed order (STOW-RS parts are
indexed in their order although they are filed at once)."""

from __future__ import annotations

import threading

from dicomnode.core.turns import Turns


def test_turns_are_taken_in_order_whatever_order_the_threads_come_in():
    turns, order = Turns(), []

    def take(number: int) -> None:
        turn = turns.turn(number)
        turn.wait()
        order.append(number)
        turn.passed()

    threads = [threading.Thread(target=take, args=(number,)) for number in reversed(range(8))]
    for thread in threads:  # turn 7 starts first and waits for the other seven
        thread.start()
    for thread in threads:
        thread.join(10)
    assert order == list(range(8))


def test_a_turn_that_passes_without_waiting_lets_the_next_one_go_only_after_those_before():
    turns = Turns()
    turns.turn(1).passed()  # turn 1 failed early; turn 2 must still wait for turn 0
    waiting = threading.Thread(target=turns.turn(2).wait)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()
    turns.turn(0).passed()
    waiting.join(10)
    assert not waiting.is_alive()
    turns.turn(0).passed()  # passing twice is harmless
    turns.turn(2).wait()
