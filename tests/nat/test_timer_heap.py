"""TimerHeap: the stack's deadlines on one loop timer."""

from __future__ import annotations

import asyncio
import time

from appliance.nat.timers import TimerHeap


def heap(errors: list[int] | None = None) -> TimerHeap:
    loop = asyncio.get_running_loop()
    return TimerHeap(lambda: loop, lambda: (errors if errors is not None else []).append(1))


async def test_callbacks_run_in_deadline_order_with_the_time_they_were_set_for() -> None:
    t = heap()
    got: list[tuple[str, float]] = []
    now = time.monotonic()
    t.call_at(now + 0.03, lambda w: got.append(("c", w)))
    t.call_at(now + 0.01, lambda w: got.append(("a", w)))
    t.call_at(now + 0.02, lambda w: got.append(("b", w)))
    await asyncio.sleep(0.06)
    assert got == [("a", now + 0.01), ("b", now + 0.02), ("c", now + 0.03)]
    assert len(t) == 0


async def test_an_earlier_deadline_moves_the_loop_timer_forward() -> None:
    t = heap()
    fired: list[float] = []
    now = time.monotonic()
    t.call_at(now + 5.0, fired.append)
    t.call_at(now + 0.01, lambda w: fired.append(time.monotonic()))
    await asyncio.sleep(0.05)
    assert len(fired) == 1 and fired[0] >= now + 0.01
    t.close()


async def test_a_callback_that_sets_an_already_due_entry_does_not_spin_in_one_turn() -> None:
    t = heap()
    calls = 0

    def again(when: float) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            t.call_at(when, again)  # already due: runs on a later loop turn

    t.call_at(time.monotonic(), again)
    await asyncio.sleep(0.02)
    assert calls == 3


async def test_a_raising_callback_is_reported_and_the_rest_still_run() -> None:
    errors: list[int] = []
    t = heap(errors)
    got: list[float] = []
    now = time.monotonic()

    def boom(when: float) -> None:
        raise RuntimeError("bug")

    t.call_at(now, boom)
    t.call_at(now, got.append)
    await asyncio.sleep(0.02)
    assert errors == [1] and got == [now]


async def test_close_drops_entries_and_ignores_new_ones() -> None:
    t = heap()
    got: list[float] = []
    t.call_at(time.monotonic() + 0.01, got.append)
    t.close()
    t.call_at(time.monotonic(), got.append)
    await asyncio.sleep(0.03)
    assert got == [] and len(t) == 0
