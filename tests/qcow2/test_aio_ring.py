"""storage.aio reaps completions from the kernel's event ring (the qcow2 and raw O_DIRECT path).

Many more requests than the ring has entries, so head and tail wrap around
it several times; every request ends with its own bytes. A ring whose head
is out of range is no longer trusted: completions come through io_getevents.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from pathlib import Path

import pytest

from appliance.storage.aio import IOCB_CMD_PREADV, LinuxAio

BLOCK = 4096
BLOCKS = 600


def numbered_file(path: Path) -> int:
    with open(path, "wb") as f:
        for i in range(BLOCKS):
            f.write(i.to_bytes(4, "little") * (BLOCK // 4))
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        pytest.skip("no O_DIRECT on this file system")


async def read_blocks(aio: LinuxAio, fd: int, order: list[int]) -> None:
    bufs = [memoryview(mmap.mmap(-1, BLOCK)) for _ in order]
    got = await asyncio.wait_for(asyncio.gather(*(
        aio.submit(IOCB_CMD_PREADV, fd, [b], i * BLOCK) for b, i in zip(bufs, order, strict=True)
    )), 30)
    assert got == [BLOCK] * len(order)
    for b, i in zip(bufs, order, strict=True):
        assert bytes(b) == i.to_bytes(4, "little") * (BLOCK // 4)


async def test_completions_wrap_around_the_ring(tmp_path: Path) -> None:
    fd = numbered_file(tmp_path / "n.bin")
    aio = LinuxAio(depth=8)
    try:
        if aio._ring_u32 is None:
            pytest.skip("kernel AIO ring not in the layout we read")
        assert BLOCKS > 3 * aio._ring_nr
        await read_blocks(aio, fd, list(range(BLOCKS)))
        assert aio._ring_u32 is not None  # still reading the ring, not io_getevents
        # The kernel's view agrees: nothing left unreaped.
        assert aio._ring_u32[2] == aio._ring_u32[3]
    finally:
        aio.close()
        os.close(fd)


async def test_an_out_of_range_head_falls_back_to_io_getevents(tmp_path: Path) -> None:
    fd = numbered_file(tmp_path / "n.bin")
    aio = LinuxAio(depth=8)
    try:
        if aio._ring_u32 is None:
            pytest.skip("kernel AIO ring not in the layout we read")
        await read_blocks(aio, fd, [5, 1, 9])
        # Out of range for us, the same slot for the kernel (it reads head mod nr).
        aio._ring_u32[2] += aio._ring_nr
        await read_blocks(aio, fd, list(range(100, 140)))
        assert aio._ring_u32 is None
        await read_blocks(aio, fd, list(range(200, 300)))
    finally:
        aio.close()
        os.close(fd)
