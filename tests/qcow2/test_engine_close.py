"""Qcow2Image.close() with start_rw requests still in flight.

A pool job holds the descriptor number: closing the file under it would let
its syscall hit a closed (or reused) descriptor. close() waits for every
request in flight, and for the tasks that follow some of them up, first.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.qcow2 import Qcow2Image
from tests.conftest import needs_qemu_img
from tests.qcow2.helpers import check_clean, qemu_img, qemu_io

pytestmark = needs_qemu_img

KiB = 1024
CS = 64 * KiB


def aligned(n: int, fill: int = 0) -> memoryview:
    mv = memoryview(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    if fill:
        mv[:] = bytes([fill]) * n
    return mv


@pytest.fixture
def slow_syscalls(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Pool threads' preadv/pwritev wait 0.3 s before the real call; the event is set
    once any of them has started waiting."""
    started = threading.Event()
    real_r, real_w = os.preadv, os.pwritev

    def slow(real: Any) -> Any:
        def call(*args: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                started.set()
                time.sleep(0.3)
            return real(*args)
        return call

    monkeypatch.setattr(os, "preadv", slow(real_r))
    monkeypatch.setattr(os, "pwritev", slow(real_w))
    return started


async def test_close_waits_for_pool_jobs_in_flight(tmp_path: Path,
                                                   slow_syscalls: threading.Event) -> None:
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(p), "4M")
    qemu_io(p, "write -P 0x11 0 128k")
    img = await Qcow2Image.open(p, read_only=False, cache="none", aio="threads")
    await img.readv(0, [aligned(4 * KiB)])  # caches the L2 table
    # An allocation through writev first caches the refcount block start_rw allocates from.
    assert await img.writev(32 * CS, [aligned(CS, 0x99)]) == CS
    slow_syscalls.clear()
    results: list[tuple[str, int, BaseException | None]] = []

    def done(token: str, n: int, err: BaseException | None) -> None:
        results.append((token, n, err))

    rbuf = aligned(CS)
    assert img.start_rw(False, 0, [rbuf], done, "read")
    assert img.start_rw(True, CS, [aligned(CS, 0x22)], done, "overwrite")
    assert img.start_rw(True, 3 * CS, [aligned(CS, 0x33)], done, "allocate")
    await asyncio.get_running_loop().run_in_executor(None, slow_syscalls.wait, 5)
    await img.close()
    assert sorted(results, key=lambda r: r[0]) == [
        ("allocate", CS, None), ("overwrite", CS, None), ("read", CS, None)]
    assert bytes(rbuf) == b"\x11" * CS
    # Nothing more is taken once closed.
    assert not img.start_rw(False, 0, [rbuf], done, "late")
    check_clean(p)
    qemu_io(p, "read -P 0x11 0 64k", "read -P 0x22 64k 64k", "read -P 0 128k 64k",
            "read -P 0x33 192k 64k", "read -P 0x99 2M 64k")


async def test_close_waits_for_a_retry_task(tmp_path: Path) -> None:
    """A pool job that failed is retried through writev in a task: close() waits for it."""
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(p), "4M")
    qemu_io(p, "write -P 0x11 0 64k")
    img = await Qcow2Image.open(p, read_only=False, cache="none", aio="threads")
    await img.readv(0, [aligned(4 * KiB)])
    results: list[tuple[int, BaseException | None]] = []
    raw = aligned(8 * KiB)
    odd = raw[8 : 8 + 4 * KiB]  # O_DIRECT refuses it: EINVAL, then the bounce path
    odd[:] = b"\x44" * len(odd)
    assert img.start_rw(True, 4 * KiB, [odd], lambda _t, n, e: results.append((n, e)), None)
    await img.close()
    assert results == [(4 * KiB, None)]
    check_clean(p)
    qemu_io(p, "read -P 0x11 0 4k", "read -P 0x44 4k 4k", "read -P 0x11 8k 56k")
