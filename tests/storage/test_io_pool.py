"""The I/O pool's hand-offs: one wake-up per submission, bursts, several loops, shutdown."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from pathlib import Path

import pytest

from appliance.storage import io


def _voluntary_switches(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


async def _started_and_idle(pool: io.IoPool, n: int) -> list[int]:
    """Start ``n`` workers (jobs that meet at a barrier) and wait until all are idle."""
    barrier = threading.Barrier(n, timeout=10)

    def meet() -> int:
        barrier.wait()
        return threading.get_native_id()

    tids = await asyncio.gather(*(pool.run(meet) for _ in range(n)))
    deadline = time.monotonic() + 10
    while len(pool._idle) < n:
        assert time.monotonic() < deadline, "workers never went idle"
        await asyncio.sleep(0.005)
    # Each past its append and asleep on its lock: sleeping, and not switching, twice in a row
    # (a fixed pause was not enough for a worker held off the CPU on a loaded machine).
    ids = sorted(set(tids))
    last: list[int] = []
    while True:
        now = [_voluntary_switches(t) for t in ids]
        if now == last and all(_state(t) == "S" for t in ids):
            return ids
        assert time.monotonic() < deadline, "workers never went to sleep"
        last = now
        await asyncio.sleep(0.02)


def _state(tid: int) -> str:
    """The thread's scheduler state letter (proc(5): the field after the parenthesised name)."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


async def test_a_submission_wakes_exactly_one_idle_worker() -> None:
    """Four idle workers; one job: only one of them runs at all (a SimpleQueue getter
    wakes the next blocked getter on its way out, a second thread per job)."""
    pool = io.IoPool(workers=4)
    tids = await _started_and_idle(pool, 4)
    assert len(tids) == 4
    for _ in range(3):
        before = {t: _voluntary_switches(t) for t in tids}
        ran = await pool.run(threading.get_native_id)
        # Its result can reach us before it blocks again (which is what counts its switch):
        # wait for that, then a moment for any other worker a wrong hand-off woke.
        deadline = time.monotonic() + 10
        while _voluntary_switches(ran) == before[ran]:
            assert time.monotonic() < deadline, "the worker that ran never went back to sleep"
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        woke = [t for t in tids if _voluntary_switches(t) != before[t]]
        assert woke == [ran]
    pool.shutdown()


async def test_a_burst_reaches_as_many_workers_as_it_needs() -> None:
    """Jobs that can only finish together, submitted at once to sleeping workers: the
    first woken worker wakes the next, and so on, until every job has a thread."""
    pool = io.IoPool(workers=4)
    await _started_and_idle(pool, 4)
    barrier = threading.Barrier(4, timeout=10)
    assert await asyncio.gather(*(pool.run(barrier.wait) for _ in range(4))) is not None
    pool.shutdown()


async def test_start_delivers_every_job_once_in_any_interleaving() -> None:
    """Callbacks start the next job (as the data path does) at depths 1 to 32, with
    jobs of mixed lengths: each job's callback runs once, on the loop, with its result."""
    pool = io.IoPool(workers=3)
    ring = pool.ring()
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    rng = random.Random(4)
    delays = [rng.choice((0.0, 0.0, 0.0001, 0.0005)) for _ in range(3000)]
    seen: list[int] = []
    finished = loop.create_future()
    nxt = 0

    def job(i: int) -> int:
        if delays[i]:
            time.sleep(delays[i])
        return i * 2

    def done(token: int, result: int, err: BaseException | None) -> None:
        nonlocal nxt
        assert threading.get_ident() == loop_thread
        assert err is None and result == token * 2
        seen.append(token)
        if nxt < len(delays):
            nxt += 1
            pool.start(job, (nxt - 1,), done, nxt - 1, ring)
        elif len(seen) == len(delays):
            finished.set_result(None)

    for depth in (1, 32):
        seen.clear()
        nxt = 0
        finished = loop.create_future()
        for _ in range(depth):
            nxt += 1
            pool.start(job, (nxt - 1,), done, nxt - 1, ring)
        await asyncio.wait_for(finished, 30)
        assert sorted(seen) == list(range(len(delays)))
    assert len(pool._threads) <= 3
    pool.shutdown()


def test_loops_in_two_threads_share_the_pool() -> None:
    """Two loops, each in its own thread, submit at once: every result comes back to the
    loop that asked for it."""
    pool = io.IoPool(workers=4)
    errors: list[BaseException] = []

    def driver(tag: int) -> None:
        async def main() -> None:
            me = threading.get_ident()
            ring = pool.ring()
            fin = asyncio.get_running_loop().create_future()
            count = 0

            def done(token: int, result: int, err: BaseException | None) -> None:
                nonlocal count
                assert threading.get_ident() == me and result == token + tag
                count += 1
                if count == 500:
                    fin.set_result(None)
                elif count % 4 == 0:
                    for _ in range(4):
                        pool.start(lambda t: t + tag, (count,), done, count, ring)

            for _ in range(4):
                pool.start(lambda t: t + tag, (0,), done, 0, ring)
            await asyncio.wait_for(fin, 30)
            assert await pool.run(lambda: tag) == tag

        try:
            asyncio.run(main())
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=driver, args=(tag,)) for tag in (1000, 2000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    pool.shutdown()


async def test_a_failing_callback_is_reported_and_the_rest_still_delivered() -> None:
    pool = io.IoPool(workers=1)
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    got: list[int] = []
    gate = threading.Event()

    def bad(token: int, result: int, err: BaseException | None) -> None:
        raise ValueError("callback bug")

    def good(token: int, result: int, err: BaseException | None) -> None:
        got.append(result)

    ring = pool.ring()
    pool.start(gate.wait, (5,), good, 0, ring)  # holds the one worker
    pool.start(lambda: 1, (), bad, 0, ring)
    pool.start(lambda: 2, (), good, 0, ring)
    gate.set()
    assert await pool.run(lambda: 3) == 3
    assert got == [True, 2]
    assert [type(c["exception"]) for c in reported] == [ValueError]
    pool.shutdown()


async def test_errors_reach_start_callbacks() -> None:
    pool = io.IoPool(workers=2)
    fut = asyncio.get_running_loop().create_future()
    pool.start(os.read, (-1, 1), lambda tok, res, err: fut.set_result((tok, res, err)), "t")
    tok, res, err = await fut
    assert tok == "t" and res is None and isinstance(err, OSError)
    pool.shutdown()


async def test_shutdown_finishes_queued_jobs_then_the_threads_end() -> None:
    pool = io.IoPool(workers=2)
    gate = threading.Event()
    futs = [pool.submit(gate.wait, 5) for _ in range(2)] + [pool.submit(lambda: 7)]
    threads = list(pool._threads)
    pool.shutdown()
    gate.set()
    assert await asyncio.gather(*futs) == [True, True, 7]
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    # A job after shutdown starts a new thread.
    assert await pool.run(lambda: 8) == 8
    pool.shutdown()


async def test_jobs_drop_their_arguments_before_the_waiter_resumes(tmp_path: Path) -> None:
    """A view of an mmap cannot outlive the unmap: the pool must not keep the job's
    arguments (views of guest RAM) once the waiter has its result."""
    import mmap

    pool = io.IoPool(workers=1)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 4096)
    try:
        ring = pool.ring()
        for _ in range(20):
            m = mmap.mmap(-1, 4096)
            view = memoryview(m)
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            pool.start(os.preadv, (fd, [view], 0),
                       lambda tok, res, err: tok.set_result(res), fut, ring)
            assert await fut == 4096
            view.release()
            m.close()  # BufferError if the pool still held an export
    finally:
        os.close(fd)
        pool.shutdown()


@pytest.mark.parametrize("workers", [1, 4])
async def test_run_from_many_coroutines_at_once(workers: int) -> None:
    pool = io.IoPool(workers=workers)
    results = await asyncio.gather(*(pool.run(lambda i=i: i * i) for i in range(400)))
    assert results == [i * i for i in range(400)]
    assert len(pool._threads) <= workers
    pool.shutdown()


async def test_a_worker_is_asleep_or_idle_before_it_wakes_the_loop() -> None:
    """With nothing queued, a worker puts itself on the idle list before it writes the
    loop's eventfd: the loop, woken, never has to wait for that worker to go idle, and
    the job its callback starts finds the worker ready to take it."""
    pool = io.IoPool(workers=1)
    ring = pool.ring()
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    idle_seen: list[int] = []
    count = 0

    def done(token: object, result: int, err: BaseException | None) -> None:
        nonlocal count
        assert err is None
        idle_seen.append(len(pool._idle))
        count += 1
        if count < 300:
            pool.start(os.getpid, (), done, None, ring)
        else:
            finished.set_result(None)

    pool.start(os.getpid, (), done, None, ring)
    await asyncio.wait_for(finished, 30)
    assert idle_seen == [1] * 300
    assert len(pool._threads) == 1
    pool.shutdown()
