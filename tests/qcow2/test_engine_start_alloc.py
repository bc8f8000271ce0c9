"""Qcow2Image.start_rw allocating fresh clusters: the callback form of an allocating write.

A write inside one host-less cluster is allocated and submitted with no
coroutine; its L2 entry is published once the data is written. These check
the bytes (qemu-io), the image (qemu-img check), and each way the fast case
is refused or falls back to the careful path.
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


def aligned(n: int, fill: int = 0) -> memoryview:
    mv = memoryview(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    if fill:
        mv[:] = bytes([fill]) * n
    return mv


def start(img: Qcow2Image, offset: int, buf: memoryview) -> asyncio.Future[Any] | None:
    """start_rw a write; the future gets (nbytes, error), or None if it was refused."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    inside = True

    def done(token: object, n: int, err: BaseException | None) -> None:
        assert not inside, "the callback ran from inside start_rw"
        fut.set_result((n, err))

    ok = img.start_rw(True, offset, [buf], done, None)
    inside = False
    return fut if ok else None


async def opened(p: Path, aio: str) -> Qcow2Image:
    img = await Qcow2Image.open(p, read_only=False, cache="none", aio=aio)
    # The first write makes the L2 table and the refcount block: the coroutine path.
    assert await img.writev(32 * CS, [aligned(4 * KiB, 0x99)]) == 4 * KiB
    return img


def make(tmp_path: Path, *opts: str) -> Path:
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", ",".join([f"cluster_size={CS}", *opts]),
             str(p), "8M")
    return p


@pytest.mark.parametrize("aio", ["native", "threads"])
async def test_fresh_clusters_are_allocated_without_the_coroutine_path(
        tmp_path: Path, aio: str) -> None:
    p = make(tmp_path)
    img = await opened(p, aio)
    try:
        whole = start(img, 0, aligned(CS, 0x11))
        part = start(img, 3 * CS + 8 * KiB, aligned(4 * KiB, 0x22))  # zero fill around it
        assert whole is not None and part is not None
        assert len(img._inflight) == 2
        assert await whole == (CS, None) and await part == (4 * KiB, None)
        assert img._inflight == {} and img._io_count == 0
        # The cluster is mapped now: an overwrite goes in place.
        again = start(img, 3 * CS, aligned(4 * KiB, 0x33))
        assert again is not None and await again == (4 * KiB, None)
        await img.flush()
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, "read -P 0x11 0 64k", "read -P 0 64k 128k", "read -P 0x33 192k 4k",
            "read -P 0 196k 4k", "read -P 0x22 200k 4k", "read -P 0 204k 52k",
            "read -P 0x99 2M 4k")


@pytest.mark.parametrize("aio", ["native", "threads"])
async def test_writes_riding_on_a_started_allocation(tmp_path: Path, aio: str) -> None:
    """16 writes into one fresh cluster: the first allocates, the rest put their bytes
    at its host cluster and finish only once it is published."""
    p = make(tmp_path)
    img = await opened(p, aio)
    try:
        futs = [start(img, i * 4 * KiB, aligned(4 * KiB, i + 1)) for i in range(16)]
        assert all(f is not None for f in futs)
        got = await asyncio.gather(*futs)  # type: ignore[arg-type]
        assert got == [(4 * KiB, None)] * 16
        assert img._inflight == {} and img._io_count == 0
        await img.flush()
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, *(f"read -P {i + 1} {i * 4}k 4k" for i in range(16)))
    mapped = qemu_img("map", "--output=json", str(p)).stdout
    assert mapped.count('"data": true') == 2  # cluster 0 allocated once, and cluster 32


async def test_publishes_under_the_lock_when_metadata_is_busy(tmp_path: Path) -> None:
    """The lock is held when the data lands (a flush, say): the entry goes in through _commit."""
    p = make(tmp_path)
    img = await opened(p, "native")
    try:
        async with img._lock:
            fut = start(img, 5 * CS, aligned(CS, 0x55))
            # Taken before the lock was seen? No: start_rw refuses while it is held.
            assert fut is None
        fut = start(img, 5 * CS, aligned(CS, 0x55))
        assert fut is not None
        await img._lock.acquire()
        try:
            await asyncio.sleep(0.2)  # the data is written meanwhile
            assert 5 in img._inflight
        finally:
            img._lock.release()
        assert await fut == (CS, None)
        assert img._inflight == {}
        await img.flush()
    finally:
        await img.close()
    check_clean(p)
    qemu_io(p, "read -P 0x55 320k 64k")


async def test_refused_where_the_careful_path_is_needed(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "8M")
    qemu_io(base, "write -P 0x77 0 8M")
    over = tmp_path / "over.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(over))
    img = await opened(over, "native")
    try:
        # Backing data to copy around a partial write: the planner does it.
        assert start(img, 4 * KiB, aligned(4 * KiB, 1)) is None
        # Crosses into the next cluster.
        assert start(img, CS - 4 * KiB, aligned(8 * KiB, 1)) is None
        # A whole cluster needs no copy.
        fut = start(img, CS, aligned(CS, 2))
        assert fut is not None and await fut == (CS, None)
        await img.flush()
    finally:
        await img.close()
    check_clean(over)
    qemu_io(over, "read -P 0x77 0 64k", "read -P 2 64k 64k", "read -P 0x77 128k 1920k")

    lazy = make(tmp_path, "lazy_refcounts=on")
    img = await Qcow2Image.open(lazy, read_only=False, cache="none")
    try:
        await img.readv(0, [aligned(4 * KiB)])
        assert await img.writev(0, [aligned(4 * KiB, 3)]) == 4 * KiB  # sets the dirty bit
        fut = start(img, 2 * CS, aligned(CS, 4))
        assert fut is not None and await fut == (CS, None)
    finally:
        await img.close()
    check_clean(lazy)
    qemu_io(lazy, "read -P 3 0 4k", "read -P 4 128k 64k")


async def test_failed_data_write_frees_the_cluster_and_reports(tmp_path: Path) -> None:
    """The data write fails (pool, bad fd): the cluster goes back, the caller gets the error
    through the coroutine path's retry, and the image stays clean."""
    p = make(tmp_path)
    img = await opened(p, "threads")
    try:
        real = img._dfd
        img._dfd = 10_000  # not open: EBADF from the pool
        fut = start(img, 6 * CS, aligned(CS, 6))
        assert fut is not None
        img._dfd = real  # the retry through writev uses the real descriptor
        assert await fut == (CS, None)
        assert img._inflight == {}
        await img.flush()
    finally:
        await img.close()
    r = qemu_img("check", str(p), check=False)
    assert "ERROR" not in r.stdout, r.stdout
    qemu_io(p, "read -P 6 384k 64k")
