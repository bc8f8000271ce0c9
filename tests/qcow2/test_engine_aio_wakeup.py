"""LinuxAio reaps its ring before it clears the eventfd: no completion may be lost.

A completion that lands after the ring was read but before the eventfd was
cleared has had its signal swallowed; the second pass over the ring must
pick it up, or its request would wait forever.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import time
from pathlib import Path

import pytest

from appliance.storage.aio import IOCB_CMD_PREADV, AioUnavailable, LinuxAio


async def test_completion_between_ring_pass_and_eventfd_read_is_not_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "data"
    p.write_bytes(b"\x5a" * (1 << 20))
    # Written back and out of the page cache first: O_DIRECT reads of dirty pages wait for their
    # writeback, as long as the disk is busy with it.
    with open(p, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        pytest.skip("no O_DIRECT here")
    try:
        aio = LinuxAio(depth=8)
    except AioUnavailable:
        os.close(fd)
        pytest.skip("no kernel AIO here")
    if aio._ring_u32 is None:
        aio.close()
        os.close(fd)
        pytest.skip("the kernel's event ring layout is not the known one")
    hdr = aio._ring_u32
    bufs = [memoryview(mmap.mmap(-1, 4096)) for _ in range(2)]
    loop = asyncio.get_running_loop()
    first: asyncio.Future[int] = loop.create_future()
    second: asyncio.Future[int] = loop.create_future()
    real_read = os.eventfd_read
    injected = False

    def eventfd_read(efd: int) -> int:
        """A completion lands just before the first read of the eventfd."""
        nonlocal injected
        if efd == aio._efd and not injected:
            injected = True
            aio.start(IOCB_CMD_PREADV, fd, [bufs[1]], 4096,
                      lambda _t, r, _e: second.set_result(r), None, eager=True)
            deadline = time.monotonic() + 30  # only bounds a hang
            while hdr[2] == hdr[3] and time.monotonic() < deadline:
                pass
            assert hdr[2] != hdr[3], "the second read did not complete"
        return real_read(efd)

    monkeypatch.setattr(os, "eventfd_read", eventfd_read)
    try:
        aio.start(IOCB_CMD_PREADV, fd, [bufs[0]], 0, lambda _t, r, _e: first.set_result(r),
                  None, eager=True)
        assert await asyncio.wait_for(first, 30) == 4096
        assert await asyncio.wait_for(second, 30) == 4096
        assert injected
        assert bytes(bufs[1]) == b"\x5a" * 4096
    finally:
        aio.close()
        os.close(fd)
