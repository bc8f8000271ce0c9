"""The I/O pool keeps a deep burst's loop thread and workers on one CPU, and lets go after it."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time

import pytest

from appliance.storage import io

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                reason="needs a thread allowed on two CPUs or more")


def _cpus() -> set[int]:
    return os.sched_getaffinity(0)


async def _each_worker_once(pool: io.IoPool, n: int) -> list[set[int]]:
    """The CPU set of each of ``n`` workers, read inside a job (jobs meet at a barrier)."""
    barrier = threading.Barrier(n, timeout=10)

    def meet() -> set[int]:
        barrier.wait()
        return _cpus()

    return list(await asyncio.gather(*(pool.run(meet) for _ in range(n))))


async def test_a_deep_burst_pins_the_loop_and_the_workers_until_it_is_delivered() -> None:
    before = _cpus()
    pool = io.IoPool(workers=3)
    gate = threading.Event()
    futs = [pool.submit(lambda: (gate.wait(10), _cpus())[1]) for _ in range(io.PIN_DEPTH + 2)]
    try:
        during = _cpus()
        assert len(during) == 1 and during < before
    finally:
        gate.set()
    got = await asyncio.gather(*futs)
    # The last jobs were taken after the pin, by workers back from the first.
    assert got[-3:] == [during] * 3
    assert _cpus() == before
    # Each worker takes the old set back at its next job (three: no new burst).
    assert await _each_worker_once(pool, 3) == [before] * 3
    pool.shutdown()


async def test_a_shallow_burst_pins_nothing() -> None:
    before = _cpus()
    pool = io.IoPool(workers=3)
    gate = threading.Event()
    futs = [pool.submit(gate.wait, 10) for _ in range(io.PIN_DEPTH - 1)]
    assert _cpus() == before
    gate.set()
    await asyncio.gather(*futs)
    assert await _each_worker_once(pool, 3) == [before] * 3
    pool.shutdown()


async def test_a_loop_kept_on_one_cpu_by_its_user_is_left_there() -> None:
    before = _cpus()
    mine = {min(before)}
    os.sched_setaffinity(0, mine)
    try:
        pool = io.IoPool(workers=3)
        gate = threading.Event()
        futs = [pool.submit(gate.wait, 10) for _ in range(io.PIN_DEPTH + 2)]
        assert _cpus() == mine
        gate.set()
        await asyncio.gather(*futs)
        assert _cpus() == mine
        pool.shutdown()
    finally:
        os.sched_setaffinity(0, before)


def _wait_idle(pool: io.IoPool, workers: int) -> None:
    deadline = time.monotonic() + 10
    while pool._jobs or len(pool._idle) < workers:
        assert time.monotonic() < deadline, "jobs never finished"
        time.sleep(0.01)


@pytest.mark.parametrize("closed_before_done", [True, False])
def test_a_loop_closed_mid_burst_leaves_its_thread_unpinned(closed_before_done: bool) -> None:
    """Closed with jobs running, the worker that finishes the last unpins; closed with
    completions it never took, its end does (it must not be kept alive meanwhile)."""
    pool = io.IoPool(workers=2)
    gate = threading.Event()
    seen: dict[str, set[int]] = {}

    def body() -> None:
        seen["before"] = _cpus()
        loop = asyncio.new_event_loop()

        async def burst() -> None:
            for _ in range(io.PIN_DEPTH + 1):
                pool.submit(gate.wait, 10)

        loop.run_until_complete(burst())
        seen["during"] = _cpus()
        if closed_before_done:
            loop.close()
            gate.set()
            _wait_idle(pool, 2)
            seen["closed"] = _cpus()
        else:
            gate.set()
            _wait_idle(pool, 2)
            loop.close()
            seen["closed"] = _cpus()
            del loop
            gc.collect()
        seen["after"] = _cpus()

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    assert len(seen["during"]) == 1
    assert (seen["closed"] == seen["before"]) is closed_before_done
    assert seen["after"] == seen["before"]
    pool.shutdown()


async def test_jobs_started_from_another_thread_pin_nobody() -> None:
    """start() with a loop's ring from a thread that is not the loop's leaves both threads be."""
    before = _cpus()
    pool = io.IoPool(workers=3)
    ring = pool.ring()
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    all_done = loop.create_future()
    got: list[object] = []

    def done(token: object, result: object, exc: BaseException | None) -> None:
        got.append(token)
        if len(got) == io.PIN_DEPTH + 2:
            all_done.set_result(None)

    seen: dict[str, set[int]] = {}

    def other() -> None:
        for i in range(io.PIN_DEPTH + 2):
            pool.start(gate.wait, (10,), done, i, ring)
        seen["other"] = _cpus()

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert seen["other"] == before
    assert _cpus() == before
    gate.set()
    await asyncio.wait_for(all_done, 10)
    assert sorted(got) == list(range(io.PIN_DEPTH + 2))  # type: ignore[type-var]
    pool.shutdown()


async def test_jobs_that_may_not_pin_leave_a_deep_burst_on_every_cpu() -> None:
    # Bulk work (a convert's copies) must keep both CPUs: pinned, a 2 GiB qcow2->raw
    # convert took 2.6-5.6 s instead of ~1 s here.
    before = _cpus()
    pool = io.IoPool(workers=3)
    gate = threading.Event()
    futs = [pool.submit(lambda: (gate.wait(10), _cpus())[1], pin=False) for _ in range(io.PIN_DEPTH + 2)]
    try:
        assert _cpus() == before
    finally:
        gate.set()
    assert await asyncio.gather(*futs) == [before] * (io.PIN_DEPTH + 2)
    pool.shutdown()
