"""One system call per request at queue depth 1 (what ``img bench`` -d 1 measures).

At qd1 every request's latency includes whatever the loop does between a
completion and the next submission, so a chain of start_rw requests, each
started from the previous one's callback, must cost one system call each
and nothing else: reads one io_submit (completions come from the event
ring, no io_getevents); allocating writes past the end of the file, which
ext4 runs synchronously anyway, one pwritev (elsewhere one io_submit);
their metadata waits in the write-back caches for the flush.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from appliance.qcow2 import Qcow2Image
from appliance.qcow2 import image as image_mod
from appliance.storage import aio as aio_mod
from appliance.storage import io as io_mod
from tests.conftest import needs_qemu_img
from tests.qcow2.helpers import check_clean, qemu_img, qemu_io

pytestmark = needs_qemu_img

CS = 64 * 1024
N = 48


def aligned(n: int, fill: int) -> memoryview:
    mv = memoryview(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    mv[:] = bytes([fill]) * n
    return mv


async def chain(img: Qcow2Image, write: bool, buf: memoryview, first: int) -> int:
    """N requests over consecutive clusters, each started by the previous completion.

    :returns: how many start_rw took (the rest would have gone the coroutine way).
    """
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    state = {"next": 0, "taken": 0}

    def issue() -> None:
        k = state["next"]
        state["next"] = k + 1
        if img.start_rw(write, first + k * CS, [buf], done, k):
            state["taken"] += 1
        else:
            finished.set_exception(AssertionError(f"start_rw refused request {k}"))

    def done(_token: Any, n: int, err: BaseException | None) -> None:
        if err is not None or n != CS:
            finished.set_exception(AssertionError(f"request failed: {n} {err!r}"))
        elif state["next"] < N:
            issue()
        else:
            finished.set_result(None)

    issue()
    await asyncio.wait_for(finished, 30)
    return state["taken"]


async def test_qd1_requests_cost_one_system_call_each(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(p), "16M")
    calls: Counter[int] = Counter()
    real = aio_mod._syscall

    def counting(nr: Any, *args: Any) -> int:
        calls[nr.value] += 1
        return int(real(nr, *args))

    monkeypatch.setattr(aio_mod, "_syscall", counting)
    plain: Counter[str] = Counter()
    real_pwritev, real_preadv = os.pwritev, os.preadv

    def pwritev(*args: Any) -> int:
        plain["pwritev"] += 1
        return real_pwritev(*args)

    def preadv(*args: Any) -> int:
        plain["preadv"] += 1
        return real_preadv(*args)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "preadv", preadv)
    # Metadata and file-space calls: none may happen per request.
    other: list[str] = []
    real_iorun, real_falloc = image_mod._iorun, io_mod.fallocate

    def iorun(fn: Any, *args: Any) -> Any:
        other.append(getattr(fn, "__name__", repr(fn)))
        return real_iorun(fn, *args)

    def falloc(*args: Any) -> None:
        other.append("fallocate")
        real_falloc(*args)

    monkeypatch.setattr(image_mod, "_iorun", iorun)
    monkeypatch.setattr(io_mod, "fallocate", falloc)
    img = await Qcow2Image.open(p, read_only=False, cache="none", aio="native")
    try:
        assert img._aio is not None
        # The first write makes the L2 table and the refcount block: the coroutine path.
        assert await img.writev(0, [aligned(CS, 0x99)]) == CS
        ring = img._aio._ring_u32 is not None
        calls.clear()
        other.clear()
        plain.clear()
        assert await chain(img, True, aligned(CS, 0x5A), CS) == N
        if img._sync_extend:  # ext4: the kernel would run them inside io_submit anyway
            assert plain == {"pwritev": N}
            assert sum(calls.values()) == 0
        else:
            assert not plain and calls[aio_mod._SYS_IO_SUBMIT] == N
        assert img._inflight == {} and img._io_count == 0
        assert other == []
        calls.clear()
        plain.clear()
        back = aligned(CS, 0)
        assert await chain(img, False, back, CS) == N
        assert calls[aio_mod._SYS_IO_SUBMIT] == N and not plain
        if ring:
            assert calls[aio_mod._SYS_IO_GETEVENTS] == 0
        assert bytes(back) == b"\x5a" * CS
        assert other == []
        await img.flush()
    finally:
        await img.close()
    check_clean(p)
    out = qemu_io(p, f"read -P 0x5a {CS} {N * CS}")
    assert "Pattern verification failed" not in out


async def test_a_failed_synchronous_write_is_done_again_the_careful_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pwritev refusing an allocating write past the end (ENOSPC here) gives the
    cluster back and the request goes the coroutine way; nothing leaks."""
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(p), "16M")
    img = await Qcow2Image.open(p, read_only=False, cache="none", aio="native")
    if not img._sync_extend:
        await img.close()
        pytest.skip("writes past the end of the file go through io_submit on this file system")
    real = os.pwritev
    failed: list[int] = []

    def once(fd: int, bufs: Any, off: int) -> int:
        if not failed:
            failed.append(off)
            raise OSError(28, "No space left on device")
        return real(fd, bufs, off)

    try:
        assert await img.writev(0, [aligned(CS, 0x99)]) == CS
        monkeypatch.setattr(os, "pwritev", once)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, BaseException | None]] = loop.create_future()
        assert img.start_rw(True, CS, [aligned(CS, 0x77)], lambda _t, n, e: fut.set_result((n, e)),
                            None)
        assert await asyncio.wait_for(fut, 30) == (CS, None)
        assert failed
        monkeypatch.setattr(os, "pwritev", real)
        await img.flush()
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, f"read -P 0x77 {CS} {CS}")
