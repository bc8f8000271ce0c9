"""The loop poller runs a polled source's reader itself (appliance.storage.poll).

At queue depth 1 every request waits for the loop to get from a completion
to the callback that starts the next one, so when the ring of a source
with requests in flight holds a completion (seen before waiting, while
spinning, or woken by its fd alone), the poller runs the reader's asyncio
handle from inside select: as the loop would (the handle's context,
exceptions to the loop's handler), one ready-queue pass sooner. Anything
else (several fds ready, a cancelled reader) goes back to the loop.
(Here because the engine's queue-depth-1 path is what it serves.)
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import threading
from collections.abc import Iterator

import pytest

from appliance.storage import poll


class PipeRing:
    """A poll source whose ring fills when the test says so; its fd is a pipe."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.pending = 0
        self.filled = False

    @property
    def fd(self) -> int:
        return self.r

    def in_flight(self) -> bool:
        return self.pending > 0

    def ring_ready(self) -> bool:
        return self.filled

    def drain(self) -> None:
        try:
            os.read(self.r, 64)
        except BlockingIOError:
            pass
        self.filled = False
        self.pending = 0


@pytest.fixture
def ring(monkeypatch: pytest.MonkeyPatch) -> Iterator[PipeRing]:
    monkeypatch.setattr(poll, "_max_ns", 1_000_000)
    # Spin even on a busy machine: a turn that lost the CPU would otherwise stop it.
    monkeypatch.setattr(poll, "PREEMPTED_NS", 10**12)
    r = PipeRing()
    yield r
    os.close(r.r)
    os.close(r.w)


def _inside_select() -> bool:
    return any(f.function == "_dispatch" for f in inspect.stack())


async def _registered(ring: PipeRing) -> poll.LoopPoller:
    loop = asyncio.get_running_loop()
    poller = poll.register(ring, loop)
    if poller is None:
        pytest.skip("this loop has no selector to poll")
    if poller._schedstat is not None:  # spin even on a busy machine
        os.close(poller._schedstat)
        poller._schedstat = None
    return poller


async def test_a_completion_in_the_ring_runs_the_reader_from_select(ring: PipeRing) -> None:
    loop = asyncio.get_running_loop()
    poller = await _registered(ring)
    var: contextvars.ContextVar[str] = contextvars.ContextVar("v", default="unset")
    var.set("at add_reader")
    seen: list[tuple[bool, str]] = []
    fut: asyncio.Future[None] = loop.create_future()

    def reader() -> None:
        seen.append((_inside_select(), var.get()))
        ring.drain()
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(ring.fd, reader)
    var.set("later")
    try:
        ring.pending = 1
        ring.filled = True  # already there: returned at once, nothing written to the fd
        await asyncio.wait_for(fut, 5)
        assert seen == [(True, "at add_reader")]
        # While spinning: the ring fills from another thread, the fd stays silent.
        fut = loop.create_future()
        poller.ns = poller.max_ns = 1_000_000_000
        ring.pending = 1
        threading.Timer(0.01, lambda: setattr(ring, "filled", True)).start()
        await asyncio.wait_for(fut, 5)
        assert seen[-1] == (True, "at add_reader")  # (seen spinning, or before it on a busy CPU)
        # Blocked in the selector, woken by the fd alone.
        fut = loop.create_future()
        poller.ns = 0
        poller.max_ns = 1
        ring.pending = 1
        threading.Timer(0.01, lambda: os.write(ring.w, b"x")).start()
        await asyncio.wait_for(fut, 5)
        assert seen[-1] == (True, "at add_reader") and len(seen) == 3
    finally:
        loop.remove_reader(ring.fd)
        poll.unregister(ring, loop)


async def test_a_reader_that_raises_goes_to_the_loops_handler(ring: PipeRing) -> None:
    loop = asyncio.get_running_loop()
    await _registered(ring)
    caught: list[BaseException | None] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _l, ctx: caught.append(ctx.get("exception")))
    fut: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not fut.done():
            fut.set_result(None)

    def reader() -> None:
        ring.drain()
        loop.call_soon(finish)
        raise ValueError("from the reader")

    loop.add_reader(ring.fd, reader)
    try:
        ring.pending = 1
        ring.filled = True
        await asyncio.wait_for(fut, 5)  # the loop went on
        assert len(caught) == 1 and isinstance(caught[0], ValueError)
    finally:
        loop.set_exception_handler(old)
        loop.remove_reader(ring.fd)
        poll.unregister(ring, loop)


async def test_other_fds_ready_together_go_back_to_the_loop(ring: PipeRing) -> None:
    """Two fds ready at the wake-up: both readers run the loop's way, neither from select."""
    loop = asyncio.get_running_loop()
    poller = await _registered(ring)
    poller.ns = 0
    poller.max_ns = 1
    r2, w2 = os.pipe()
    seen: list[tuple[str, bool]] = []
    fut: asyncio.Future[None] = loop.create_future()

    def reader(name: str, fd: int) -> None:
        seen.append((name, _inside_select()))
        try:
            os.read(fd, 64)
        except BlockingIOError:
            pass
        if len(seen) == 2 and not fut.done():
            fut.set_result(None)

    loop.add_reader(ring.fd, reader, "ring", ring.r)
    loop.add_reader(r2, reader, "other", r2)
    try:
        ring.pending = 1
        # Both readable before the loop next waits: one wake-up sees both.
        os.write(w2, b"y")
        os.write(ring.w, b"x")
        await asyncio.wait_for(fut, 5)
        assert sorted(seen) == [("other", False), ("ring", False)]
    finally:
        loop.remove_reader(ring.fd)
        loop.remove_reader(r2)
        os.close(r2)
        os.close(w2)
        poll.unregister(ring, loop)


async def test_another_fd_waking_the_wait_goes_to_the_loop(ring: PipeRing) -> None:
    """Blocked with a request in flight, woken by some other fd: its reader runs the
    loop's way and the source's reader does not run at all."""
    loop = asyncio.get_running_loop()
    poller = await _registered(ring)
    poller.ns = 0
    poller.max_ns = 1
    r2, w2 = os.pipe()
    seen: list[tuple[str, bool]] = []
    fut: asyncio.Future[None] = loop.create_future()

    def other() -> None:
        seen.append(("other", _inside_select()))
        os.read(r2, 64)
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(ring.fd, lambda: seen.append(("ring", _inside_select())))
    loop.add_reader(r2, other)
    try:
        ring.pending = 1
        threading.Timer(0.01, lambda: os.write(w2, b"y")).start()
        await asyncio.wait_for(fut, 5)
        assert seen == [("other", False)]
    finally:
        loop.remove_reader(ring.fd)
        loop.remove_reader(r2)
        os.close(r2)
        os.close(w2)
        poll.unregister(ring, loop)
