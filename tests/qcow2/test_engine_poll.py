"""The qcow2 engine under aio=native with completion polling on and off.

Allocating writes, overwrites and reads through start_rw (the device data
path) and the coroutines must leave the same bytes and a clean image
whether the loop caught each completion by spinning on the AIO ring or
woke on the eventfd.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import random
from pathlib import Path
from typing import Any

import pytest

from appliance.qcow2 import Qcow2Image
from appliance.storage import poll
from tests.conftest import needs_qemu_img
from tests.qcow2.helpers import check_clean, qemu_img, qemu_io

pytestmark = needs_qemu_img

CS = 64 * 1024


def aligned(n: int, fill: int) -> memoryview:
    mv = memoryview(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    mv[:] = bytes([fill]) * n
    return mv


async def rw(img: Qcow2Image, write: bool, offset: int, buf: memoryview) -> int:
    """One request through start_rw when it takes it, else the coroutine."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    if img.start_rw(write, offset, [buf], lambda _t, n, e: fut.set_result((n, e)), None):
        n, err = await asyncio.wait_for(fut, 10)
        if err is not None:
            raise err
        return int(n)
    return await (img.writev(offset, [buf]) if write else img.readv(offset, [buf]))


@pytest.mark.parametrize("max_ns", [poll.LIMIT_MAX_NS, 0])
async def test_qd1_writes_and_reads_are_right_with_polling_on_and_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_ns: int) -> None:
    monkeypatch.setattr(poll, "_max_ns", None)
    poll.set_max_ns(max_ns)
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(p), "16M")
    rnd = random.Random(4)
    clusters = rnd.sample(range(256), 48)
    img = await Qcow2Image.open(p, read_only=False, cache="none")
    try:
        if img._aio is None:
            pytest.skip("no kernel AIO for O_DIRECT here")
        poller = poll.poller_of(asyncio.get_running_loop())
        assert poller is not None
        # Spin even on a busy test machine (the poller would rightly back off there).
        if poller._schedstat is not None:
            os.close(poller._schedstat)
            poller._schedstat = None
        monkeypatch.setattr(poll, "PREEMPTED_NS", 10**12)
        for i, c in enumerate(clusters):  # allocating
            assert await rw(img, True, c * CS, aligned(CS, i + 1)) == CS
        for i, c in enumerate(clusters[:16]):  # overwrites
            assert await rw(img, True, c * CS, aligned(CS, 0x80 + i)) == CS
        buf = aligned(CS, 0)
        # With polling on, the reads go round again until a spin has seen a
        # completion (20 s at most). One CI run's single pass saw none: a pass
        # sees none when each request outlasts the 10 ms window (which then
        # resets) or completes before the loop waits, as on a disk busy with
        # an earlier test's writeback.
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            for i, c in enumerate(clusters):
                assert await rw(img, False, c * CS, buf) == CS
                want = 0x80 + i if i < 16 else i + 1
                assert bytes(buf) == bytes([want]) * CS, f"cluster {c}"
            if not max_ns or poller.hits or asyncio.get_running_loop().time() > deadline:
                break
        if max_ns:
            assert poller.hits > 0, (poller.misses, poller.contended)
        else:
            assert poller.hits == poller.misses == 0
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, *(f"read -P {0x80 + i if i < 16 else i + 1} {c * CS} {CS}"
                 for i, c in enumerate(clusters)))
