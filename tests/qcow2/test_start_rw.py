"""Qcow2Image.start_rw: the callback form of readv/writev (virtio-blk's data path, img bench).

It must read and write the same bytes the coroutine path does, leave an
image qemu-img finds clean, and start nothing (return False) for every
request it does not take, so the caller's readv/writev serves it.
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


def aligned(n: int) -> memoryview:
    return memoryview(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


async def rw(img: Qcow2Image, write: bool, offset: int, bufs: list[memoryview]) -> Any:
    """start_rw and wait for its callback: (nbytes, error), or None if it was refused."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[tuple[int, BaseException | None]] = loop.create_future()
    inside = True

    def done(token: object, n: int, err: BaseException | None) -> None:
        assert token == "tok"
        assert not inside, "the callback ran from inside start_rw"
        fut.set_result((n, err))

    started = img.start_rw(write, offset, bufs, done, "tok")
    inside = False
    if not started:
        return None
    return await asyncio.wait_for(fut, 10)


def make(tmp_path: Path, name: str = "a.qcow2", size: str = "4M") -> Path:
    p = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}", str(p), size)
    return p


@pytest.mark.parametrize("aio", ["native", "threads"])
async def test_reads_the_bytes_qemu_wrote(tmp_path: Path, aio: str) -> None:
    p = make(tmp_path)
    qemu_io(p, "write -P 0x11 0 64k", "write -P 0x22 64k 64k")
    img = await Qcow2Image.open(p, read_only=True, cache="none", aio=aio)
    try:
        warm = aligned(4 * KiB)
        await img.readv(0, [warm])  # loads the L2 table: start_rw only takes cached ones
        buf = aligned(CS)
        assert await rw(img, False, 64 * KiB, [buf]) == (CS, None)
        assert bytes(buf) == b"\x22" * CS
        # Two views inside one cluster: one preadv.
        a, b = aligned(CS), aligned(CS)
        assert await rw(img, False, 4 * KiB, [a[: 8 * KiB], b[: 4 * KiB]]) == (12 * KiB, None)
        assert bytes(a[: 8 * KiB]) == bytes(b[: 4 * KiB]) * 2 == b"\x11" * 8 * KiB
        assert img._io_count == 0
    finally:
        await img.close()


@pytest.mark.parametrize("aio", ["native", "threads"])
async def test_writes_in_place_and_leaves_a_clean_image(tmp_path: Path, aio: str) -> None:
    p = make(tmp_path)
    qemu_io(p, "write -P 0x11 0 128k")
    img = await Qcow2Image.open(p, read_only=False, cache="none", aio=aio)
    try:
        await img.readv(0, [aligned(4 * KiB)])
        buf = aligned(16 * KiB)
        buf[:] = b"\x5c" * len(buf)
        assert await rw(img, True, 68 * KiB, [buf]) == (16 * KiB, None)
        await img.flush()
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, "read -P 0x11 0 68k", "read -P 0x5c 68k 16k", "read -P 0x11 84k 44k",
            "read -P 0 128k 3968k")


async def test_refuses_what_needs_the_coroutine_path(tmp_path: Path) -> None:
    p = make(tmp_path)
    qemu_io(p, "write -P 0x11 0 64k")
    qemu_img("snapshot", "-c", "s", str(p))  # cluster 0 now shared: not COPIED
    qemu_io(p, "write -P 0x33 64k 64k")
    buf = aligned(2 * CS)
    img = await Qcow2Image.open(p, read_only=False, cache="none")
    try:
        assert await rw(img, False, 0, [buf[:CS]]) is None  # L2 table not cached yet
        await img.readv(0, [buf[:4 * KiB]])
        assert await rw(img, False, 128 * KiB, [buf[:CS]]) is None  # unallocated
        assert await rw(img, False, 32 * KiB, [buf[:CS]]) is None  # crosses a cluster
        assert await rw(img, True, 0, [buf[:CS]]) is None  # shared with the snapshot
        assert await rw(img, False, 1, [buf[:4 * KiB]]) is None  # O_DIRECT would refuse it
        assert await rw(img, False, 0, [buf[:0]]) is None
        assert img._io_count == 0
        # What it refused, readv/writev still do.
        buf[:CS] = b"\x44" * CS
        assert await img.writev(0, [buf[:CS]]) == CS
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, "read -P 0x44 0 64k", "read -P 0x33 64k 64k")
    img = await Qcow2Image.open(p, read_only=False, cache="writeback")
    try:
        await img.readv(0, [buf[:4 * KiB]])
        assert await rw(img, False, 0, [buf[:CS]]) is None  # page cache: readv serves it
    finally:
        await img.close()
    ro = await Qcow2Image.open(p, read_only=True, cache="none")
    try:
        await ro.readv(0, [buf[:4 * KiB]])
        assert await rw(ro, True, 64 * KiB, [buf[:CS]]) is None  # read-only image
    finally:
        await ro.close()


async def test_threads_unaligned_buffer_goes_the_bounce_way(tmp_path: Path) -> None:
    """The pool has no alignment check up front: O_DIRECT's EINVAL sends it via readv/writev."""
    p = make(tmp_path)
    qemu_io(p, "write -P 0x11 0 64k")
    img = await Qcow2Image.open(p, read_only=False, cache="none", aio="threads")
    try:
        await img.readv(0, [aligned(4 * KiB)])
        raw = aligned(16 * KiB)
        odd = raw[8 : 8 + 4 * KiB]  # not sector aligned in memory
        assert await rw(img, False, 4 * KiB, [odd]) == (4 * KiB, None)
        assert bytes(odd) == b"\x11" * 4 * KiB
        odd[:] = b"\x77" * len(odd)
        assert await rw(img, True, 8 * KiB, [odd]) == (4 * KiB, None)
        await img.flush()
        assert img._io_count == 0
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, "read -P 0x11 0 8k", "read -P 0x77 8k 4k", "read -P 0x11 12k 52k")


@pytest.mark.parametrize("aio", ["native", "threads"])
async def test_a_host_contiguous_run_of_clusters_goes_in_one_request(
        tmp_path: Path, aio: str) -> None:
    p = make(tmp_path, size="8M")
    qemu_io(p, "write -P 0x21 0 512k")  # clusters 0-7 written in order: one host run
    img = await Qcow2Image.open(p, read_only=False, cache="none", aio=aio)
    try:
        await img.readv(0, [aligned(4 * KiB)])
        buf = aligned(256 * KiB)
        # 4 KiB into cluster 1 up to 4 KiB into cluster 5, in two views.
        assert await rw(img, False, 68 * KiB, [buf[:128 * KiB], buf[128 * KiB:]]) == (
            256 * KiB, None)
        assert bytes(buf) == b"\x21" * len(buf)
        buf[:] = b"\x4d" * len(buf)
        assert await rw(img, True, 68 * KiB, [buf]) == (256 * KiB, None)
        await img.flush()
        assert img._io_count == 0
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, "read -P 0x21 0 68k", "read -P 0x4d 68k 256k", "read -P 0x21 324k 188k")


async def test_a_run_broken_anywhere_is_refused(tmp_path: Path) -> None:
    p = make(tmp_path, size="8M")
    # Cluster 2 is written last, so its host cluster is out of the run of 0, 1, 3.
    qemu_io(p, "write -P 1 0 128k", "write -P 3 192k 64k", "write -P 2 128k 64k")
    qemu_img("snapshot", "-c", "s", str(p))
    qemu_io(p, "write -P 5 1M 128k")  # fresh clusters 16-17, after the snapshot: COPIED
    img = await Qcow2Image.open(p, read_only=False, cache="none")
    buf = aligned(256 * KiB)
    try:
        await img.readv(0, [buf[:4 * KiB]])
        assert await rw(img, False, 0, [buf[:128 * KiB]]) == (128 * KiB, None)
        assert await rw(img, False, 64 * KiB, [buf[:128 * KiB]]) is None  # 1 then 2: apart
        assert await rw(img, False, 192 * KiB, [buf[:128 * KiB]]) is None  # 4 unallocated
        assert await rw(img, True, 0, [buf[:128 * KiB]]) is None  # shared with the snapshot
        assert await rw(img, True, 1 << 20, [buf[:128 * KiB]]) == (128 * KiB, None)
        assert await rw(img, False, 0, [aligned(8 << 20)[: 66 * CS]]) is None  # too many
        assert img._io_count == 0
    finally:
        await img.close()
    check_clean(p)


@pytest.mark.parametrize("aio", ["native", "threads"])
async def test_writes_riding_on_a_cluster_allocation_in_flight(tmp_path: Path, aio: str) -> None:
    """16 writes into one fresh cluster at once: the first allocates it, the others put
    their bytes at its host cluster meanwhile and finish once it is published."""
    p = make(tmp_path)
    img = await Qcow2Image.open(p, read_only=False, cache="none", aio=aio)
    try:
        await img.readv(0, [aligned(4 * KiB)])
        # One allocation first, so the refcount block is cached and the next
        # allocating write registers itself at once, before its first wait.
        assert await img.writev(8 * CS, [aligned(4 * KiB)]) == 4 * KiB
        bufs = []
        for i in range(16):
            b = aligned(4 * KiB)
            b[:] = bytes([i + 1]) * len(b)
            bufs.append(b)
        got = await asyncio.gather(*(img.writev(i * 4 * KiB, [b]) for i, b in enumerate(bufs)))
        assert got == [4 * KiB] * 16
        assert img._inflight == {} and img._io_count == 0
        await img.flush()
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, *(f"read -P {i + 1} {i * 4}k 4k" for i in range(16)))
    mapped = qemu_img("map", "--output=json", str(p)).stdout
    assert mapped.count('"data": true') == 2  # cluster 0 allocated once, and cluster 8
