"""The lone allocating write past the end of the file that start_rw runs itself.

On ext4 an O_DIRECT write past the end of the file runs inside the system
call, so start_rw sends it as a plain pwritev and publishes the cluster's
L2 entry at once (the refcount raised first, both in the write-back caches
until the flush); only the caller's callback waits for the loop. These
check what may happen between start_rw's return and that callback, and
the careful way taken when pwritev refuses.
"""

from __future__ import annotations

import asyncio
import mmap
from pathlib import Path
from typing import Any

import pytest

from appliance.qcow2 import Qcow2Image
from tests.conftest import needs_qemu_img
from tests.qcow2.helpers import check_clean, qemu_img, qemu_io

pytestmark = needs_qemu_img

KiB = 1024
CS = 64 * KiB


def aligned(n: int, fill: int, extra: int = 0) -> memoryview:
    mv = memoryview(mmap.mmap(-1, n + extra, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    mv[:] = bytes([fill]) * (n + extra)
    return mv


def start(img: Qcow2Image, offset: int, buf: memoryview) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    inside = True

    def done(_token: object, n: int, err: BaseException | None) -> None:
        assert not inside, "the callback ran from inside start_rw"
        fut.set_result((n, err))

    assert img.start_rw(True, offset, [buf], done, None)
    inside = False
    return fut


async def opened(tmp_path: Path) -> tuple[Path, Qcow2Image]:
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(p), "16M")
    img = await Qcow2Image.open(p, read_only=False, cache="none", aio="native")
    if img._aio is None or not img._sync_extend:
        await img.close()
        pytest.skip("writes past the end of the file go through io_submit here")
    # The first write makes the L2 table and the refcount block: the coroutine path.
    assert await img.writev(0, [aligned(CS, 0x99)]) == CS
    return p, img


async def test_the_cluster_is_mapped_before_the_callback(tmp_path: Path) -> None:
    """A write into the same cluster and a flush, both before the allocating
    write's callback, see the cluster mapped; nothing is left in flight."""
    p, img = await opened(tmp_path)
    try:
        end = img.file_size
        first = start(img, CS, aligned(CS, 0x11))
        # Written and published; counted in flight only until its callback is told.
        assert img._inflight == {} and img._io_count == 1
        assert img.file_size > end
        # In place, into the host cluster just written.
        second = start(img, CS + 8 * KiB, aligned(4 * KiB, 0x22))
        back = aligned(CS, 0)
        await img.flush()
        assert await first == (CS, None) and await second == (4 * KiB, None)
        assert img._io_count == 0
        assert await img.readv(CS, [back]) == CS
        assert bytes(back[:8 * KiB]) == b"\x11" * 8 * KiB
        assert bytes(back[8 * KiB:12 * KiB]) == b"\x22" * 4 * KiB
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, "read -P 0x99 0 64k", "read -P 0x11 64k 8k", "read -P 0x22 72k 4k",
            "read -P 0x11 76k 52k")


async def test_callbacks_follow_in_order_and_the_next_joins_the_pass(tmp_path: Path) -> None:
    """A chain of them, each started by the previous callback: every callback after
    its own start_rw returned, all in order, the image clean afterwards."""
    p, img = await opened(tmp_path)
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    told: list[int] = []
    bufs = [aligned(CS, k + 1) for k in range(12)]
    starting = [False]

    def issue(k: int) -> None:
        starting[0] = True
        ok = img.start_rw(True, (k + 1) * CS, [bufs[k]], done, k)
        starting[0] = False
        if not ok:
            finished.set_exception(AssertionError(f"refused {k}"))

    def done(k: int, n: int, err: BaseException | None) -> None:
        if starting[0] or err is not None or n != CS:
            finished.set_exception(AssertionError(f"request {k}: {n} {err!r}"))
            return
        told.append(k)
        if k + 1 < len(bufs):
            issue(k + 1)
        else:
            finished.set_result(None)

    try:
        issue(0)
        await asyncio.wait_for(finished, 30)
        assert told == list(range(len(bufs)))
        assert img._inflight == {} and img._io_count == 0
        await img.flush()
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, *(f"read -P {k + 1} {(k + 1) * 64}k 64k" for k in range(len(bufs))))


async def test_a_buffer_o_direct_refuses_goes_the_careful_way(tmp_path: Path) -> None:
    """A misaligned buffer: pwritev refuses it (EINVAL), the request is done
    again through writev (which bounces it), and no cluster leaks."""
    p, img = await opened(tmp_path)
    try:
        buf = aligned(CS, 0x44, extra=512)[1:1 + CS]
        fut = start(img, 3 * CS, buf)
        assert await asyncio.wait_for(fut, 30) == (CS, None)
        await img.flush()
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, "read -P 0x44 192k 64k", "read -P 0 64k 128k")
