"""LazyTimer: the device's deferred-interrupt timers, stopped and started again without new loop handles."""

from __future__ import annotations

import asyncio

from appliance.nic.virtio_net import LazyTimer


async def test_a_stopped_timer_does_not_fire() -> None:
    fired: list[int] = []
    t = LazyTimer(fired.append, 7)
    t.start(asyncio.get_running_loop(), 0.01)
    t.stop()
    await asyncio.sleep(0.03)
    assert fired == [] and not t.due


async def test_started_again_later_it_fires_once_at_the_later_time_on_the_same_handle() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    t = LazyTimer(lambda _arg: fired.append(loop.time()), 0)
    t.start(loop, 0.01)
    handle = t._handle
    t.stop()
    start = loop.time()
    t.start(loop, 0.05)
    assert t._handle is handle  # no new loop handle for a later time
    await asyncio.sleep(0.03)
    assert fired == []  # the first handle fired and waits again
    await asyncio.sleep(0.06)
    assert len(fired) == 1 and fired[0] - start >= 0.05
    assert not t.due


async def test_started_sooner_it_fires_at_the_sooner_time() -> None:
    loop = asyncio.get_running_loop()
    fired: list[int] = []
    t = LazyTimer(fired.append, 1)
    t.start(loop, 10.0)
    t.start(loop, 0.01)
    await asyncio.sleep(0.05)
    assert fired == [1]
    t.close()


async def test_close_takes_the_handle_off_the_loop() -> None:
    fired: list[int] = []
    t = LazyTimer(fired.append, 1)
    t.start(asyncio.get_running_loop(), 0.01)
    t.close()
    assert t._handle is None and not t.due
    await asyncio.sleep(0.03)
    assert fired == []
