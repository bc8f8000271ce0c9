"""Allocating writes with nothing else in flight extend the file; with others in flight they use reserved space.

At queue depth 1 a write of a whole fresh cluster goes past the end of the file
(ext4 then allocates written extents inside io_submit, as for QEMU); with
requests in flight the engine reserves space ahead so the write stays
asynchronous. Either way the bytes and the image must be right.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from pathlib import Path
from typing import Any

import pytest

from appliance.qcow2 import Qcow2Image
from tests.conftest import needs_qemu_img
from tests.qcow2.helpers import check_clean, qemu_img, qemu_io

pytestmark = needs_qemu_img

CS = 64 * 1024


def aligned(n: int, fill: int) -> memoryview:
    mv = memoryview(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    mv[:] = bytes([fill]) * n
    return mv


def start(img: Qcow2Image, offset: int, buf: memoryview) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    assert img.start_rw(True, offset, [buf], lambda _t, n, e: fut.set_result((n, e)), None)
    return fut


async def opened(tmp_path: Path) -> tuple[Path, Qcow2Image]:
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(p), "256M")
    img = await Qcow2Image.open(p, read_only=False, cache="none")
    if img._aio is None:
        await img.close()
        pytest.skip("no kernel AIO for O_DIRECT here")
    # The first write makes the L2 table (the coroutine path); should it have
    # reserved space ahead, fill that so the next fresh cluster lies past it.
    assert await img.writev(0, [aligned(CS, 0x11)]) == CS
    buf = aligned(CS, 0x22)
    gc = 1
    while img._alloc_end < img._falloc_end:
        n, err = await start(img, gc * CS, buf)
        assert (n, err) == (CS, None)
        gc += 1
    return p, img


async def test_lone_allocating_write_extends_the_file(tmp_path: Path) -> None:
    p, img = await opened(tmp_path)
    try:
        end = img._falloc_end
        host = img._alloc_end
        n, err = await start(img, 1000 * CS, aligned(CS, 0x33))
        assert (n, err) == (CS, None)
        assert os.fstat(img._fd).st_size == host + CS  # grown by the write, nothing reserved
        assert img._falloc_end == host + CS >= end
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, f"read -P 0x11 0 {CS}", f"read -P 0x33 {1000 * CS} {CS}",
            f"read -P 0 {1001 * CS} {CS}")


async def test_allocating_writes_in_flight_together_use_reserved_space(tmp_path: Path) -> None:
    p, img = await opened(tmp_path)
    try:
        host = img._alloc_end
        futs = [start(img, (2000 + i) * CS, aligned(CS, 0x40 + i)) for i in range(4)]
        for f in futs:
            assert await f == (CS, None)
        # The first went past the end alone; the others found it in flight and reserved ahead.
        assert img._falloc_end > host + 4 * CS
        assert os.fstat(img._fd).st_size == img._falloc_end
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, *(f"read -P {0x40 + i} {(2000 + i) * CS} {CS}" for i in range(4)))


async def test_partial_cluster_write_uses_reserved_space(tmp_path: Path) -> None:
    """A write into part of a fresh cluster reserves space ahead even alone: the rest of
    that cluster must lie inside the file for the writes that follow to take the fast path."""
    p, img = await opened(tmp_path)
    try:
        host = img._alloc_end
        n, err = await start(img, 3000 * CS + 8192, aligned(4096, 0x55))
        assert (n, err) == (4096, None)
        assert img._falloc_end > host + CS
        assert os.fstat(img._fd).st_size == img._falloc_end
        # The rest of that cluster reads as zeroes; a write after it is a plain overwrite.
        buf = aligned(CS, 0xFF)
        assert await img.readv(3000 * CS, [buf]) == CS
        assert bytes(buf) == bytes(8192) + b"\x55" * 4096 + bytes(CS - 8192 - 4096)
        assert await start(img, 3000 * CS + CS - 4096, aligned(4096, 0x77)) == (4096, None)
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, f"read -P 0 {3000 * CS} 8192", f"read -P 0x55 {3000 * CS + 8192} 4096",
            f"read -P 0 {3000 * CS + 12288} {CS - 12288 - 4096}",
            f"read -P 0x77 {3001 * CS - 4096} 4096")


@pytest.mark.parametrize("mode", ["native", "threads"])
async def test_first_write_to_fresh_image_reserves_nothing_ahead(tmp_path: Path, mode: str) -> None:
    """A fresh image's first whole-cluster write (which makes the L2 table) and the
    writes after it, one at a time, go past the end of the file: none lands in
    space reserved ahead (unwritten extents, each finished by a kworker after
    its completion: ~350 us a 64 KiB write at queue depth 1 instead of ~90)."""
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(p), "256M")
    img = await Qcow2Image.open(p, read_only=False, cache="none", aio=mode)
    try:
        if mode == "native" and img._aio is None:
            pytest.skip("no kernel AIO for O_DIRECT here")
        assert await img.writev(0, [aligned(CS, 0x11)]) == CS
        for gc in range(1, 4):
            assert await start(img, gc * CS, aligned(CS, 0x20 + gc)) == (CS, None)
            assert await img.writev((100 + gc) * CS, [aligned(CS, 0x30 + gc)]) == CS
        size = os.fstat(img._fd).st_size
        assert size <= img._alloc_end < 1 << 20  # no 8 MiB reservation
        assert img._falloc_end <= img._alloc_end
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, f"read -P 0x11 0 {CS}",
            *(f"read -P {0x20 + gc} {gc * CS} {CS}" for gc in range(1, 4)),
            *(f"read -P {0x30 + gc} {(100 + gc) * CS} {CS}" for gc in range(1, 4)))
