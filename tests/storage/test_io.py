"""The I/O pool and the vectored I/O helpers."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from appliance.storage import io


async def test_pool_returns_results_and_raises_errors() -> None:
    pool = io.IoPool(workers=2)
    assert await pool.run(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        await pool.run(lambda: 1 // 0)
    results = await asyncio.gather(*(pool.run(threading.get_ident) for _ in range(50)))
    assert len(set(results)) <= 2
    pool.shutdown()


async def test_pool_runs_jobs_concurrently() -> None:
    pool = io.IoPool(workers=4)
    barrier = threading.Barrier(3, timeout=5)
    # Three jobs that can only finish together prove three threads at once.
    await asyncio.gather(*(pool.run(barrier.wait) for _ in range(3)))
    pool.shutdown()


def test_pool_serves_a_second_event_loop_through_the_fallback() -> None:
    pool = io.IoPool(workers=2)

    async def job() -> int:
        return await pool.run(lambda: 7)

    assert asyncio.run(job()) == 7  # first loop, now closed
    loop = asyncio.new_event_loop()
    other = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(job()) == 7  # rebinds to the live loop
        assert other.run_until_complete(job()) == 7  # call_soon_threadsafe path
    finally:
        loop.close()
        other.close()
    pool.shutdown()


async def test_cancelled_waiter_does_not_break_the_pool() -> None:
    pool = io.IoPool(workers=1)
    ev = threading.Event()
    task = asyncio.ensure_future(pool.run(ev.wait, 5))
    await asyncio.sleep(0.01)
    task.cancel()
    ev.set()
    assert await pool.run(lambda: "ok") == "ok"
    pool.shutdown()


def test_preadv_and_pwritev_full_handle_many_small_buffers(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        data = os.urandom(3000 * 3)
        views = [memoryview(data)[i : i + 3] for i in range(0, len(data), 3)]
        assert io.pwritev_full(fd, views, 10) == len(data)
        out = bytearray(len(data) + 100)
        assert io.preadv_full(fd, [memoryview(out)], 10) == len(data)  # short at EOF
        assert bytes(out[: len(data)]) == data
    finally:
        os.close(fd)


def test_zero_from_clears_only_the_tail() -> None:
    a, b = bytearray(b"x" * 4), bytearray(b"y" * 4)
    io.zero_from([memoryview(a), memoryview(b)], 6)
    assert a == b"xxxx" and b == b"yy\0\0"
