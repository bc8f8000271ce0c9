"""RawBackend: cache modes, O_DIRECT bounces, holes, and opening errors."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.storage.backend import BlockBackend
from appliance.storage.errors import BackendOpenError, ReadOnlyError
from appliance.storage.raw import RawBackend, open_raw
from tests.storage.backends import read_back

SIZE = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "img.raw"
    with open(p, "wb") as f:
        f.truncate(SIZE)
    return p


def test_raw_backend_satisfies_the_protocol(image: Path) -> None:
    b = RawBackend(image)
    assert isinstance(b, BlockBackend)
    assert b.size == SIZE and b.logical_block_size == 512 and not b.read_only
    b.close_now()


@pytest.mark.parametrize("cache", ["writeback", "writethrough", "none", "unsafe", "directsync"])
async def test_every_cache_mode_round_trips_data(image: Path, cache: str) -> None:
    b = RawBackend(image, cache=cache)
    data = os.urandom(8192)
    assert await b.writev(4096, [memoryview(data)]) == 8192
    await b.flush()
    assert await read_back(b, 4096, 8192) == data
    await b.close()
    assert image.read_bytes()[4096 : 4096 + 8192] == data


async def test_cache_none_bounces_unaligned_guest_buffers(image: Path) -> None:
    """Buffers at odd addresses and lengths, and an offset inside a block, all
    go through the aligned bounce path and still land at the right place."""
    b = RawBackend(image, cache="none")
    ram = mmap.mmap(-1, 1 << 16)
    view = memoryview(ram)
    payload = os.urandom(1536)
    view[3 : 3 + 1536] = payload
    # Aligned offset, misaligned memory.
    assert await b.writev(512, [view[3:515], view[515 : 3 + 1536]]) == 1536
    assert image.read_bytes()[512:2048] == payload
    # Misaligned offset and length: read-modify-write keeps the neighbours.
    assert await b.writev(700, [memoryview(b"hello")]) == 5
    disk = image.read_bytes()
    assert disk[700:705] == b"hello" and disk[512:700] == payload[:188]
    out = view[7 : 7 + 1536]
    assert await b.readv(512, [out]) == 1536
    assert bytes(out[:188]) == payload[:188] and bytes(out[188:193]) == b"hello"
    small = bytearray(10)
    assert await b.readv(701, [memoryview(small)]) == 10
    assert bytes(small[:4]) == b"ello"
    del out, view
    ram.close()
    await b.close()


async def test_read_only_backend_refuses_writes(image: Path) -> None:
    b = RawBackend(image, read_only=True)
    with pytest.raises(ReadOnlyError):
        await b.writev(0, [memoryview(b"x" * 512)])
    with pytest.raises(ReadOnlyError):
        await b.write_zeroes(0, 512)
    await b.flush()
    await b.close()


async def test_discard_unmap_punches_a_hole(image: Path) -> None:
    b = RawBackend(image, discard="unmap")
    assert b.supports_discard
    await b.writev(0, [memoryview(os.urandom(SIZE))])
    await b.flush()
    before = os.stat(image).st_blocks
    await b.discard(0, SIZE // 2)
    assert os.stat(image).st_blocks < before
    assert await read_back(b, 0, 4096) == bytes(4096)
    assert os.stat(image).st_size == SIZE
    await b.close()


async def test_discard_ignore_keeps_data(image: Path) -> None:
    b = RawBackend(image)
    assert not b.supports_discard
    data = os.urandom(4096)
    await b.writev(0, [memoryview(data)])
    await b.discard(0, 4096)
    assert await read_back(b, 0, 4096) == data
    await b.close()


@pytest.mark.parametrize("may_unmap", [False, True])
async def test_write_zeroes_zeroes_exactly_the_range(image: Path, may_unmap: bool) -> None:
    b = RawBackend(image, discard="unmap")
    data = os.urandom(16384)
    await b.writev(0, [memoryview(data)])
    await b.write_zeroes(4096, 8192, may_unmap=may_unmap)
    got = await read_back(b, 0, 16384)
    assert got[:4096] == data[:4096] and got[4096:12288] == bytes(8192)
    assert got[12288:] == data[12288:]
    assert os.stat(image).st_size == SIZE
    await b.close()


async def test_many_iovecs_beyond_iov_max(image: Path) -> None:
    b = RawBackend(image)
    data = os.urandom(1500 * 16)
    views = [memoryview(data)[i : i + 16] for i in range(0, len(data), 16)]
    assert await b.writev(0, views) == len(data)
    assert await read_back(b, 0, len(data)) == data
    await b.close()


def test_missing_file_gives_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(BackendOpenError) as info:
        open_raw(tmp_path / "nope.raw")
    msg = str(info.value)
    assert "nope.raw" in msg and "No such file" in msg and "\n" not in msg


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackendOpenError):
        open_raw(tmp_path, read_only=True)


@pytest.mark.parametrize(
    "option",
    [{"cache": "sometimes"}, {"discard": "maybe"}, {"aio": "io_uring"}, {"aio": "native"}],
)
def test_bad_option_values_are_config_errors(image: Path, option: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        open_raw(image, **option)  # type: ignore[arg-type]
    assert list(option.values())[0] in str(info.value)


@pytest.mark.parametrize("cache", ["writeback", "none"])
async def test_read_across_end_of_file_is_short(image: Path, cache: str) -> None:
    b = RawBackend(image, cache=cache)
    buf = mmap.mmap(-1, 8192)
    assert await b.readv(SIZE - 4096, [memoryview(buf)]) == 4096
    await b.close()
    buf.close()


async def test_aio_native_round_trips_aligned_and_unaligned_buffers(image: Path) -> None:
    b = RawBackend(image, cache="none", aio="native")
    ram = mmap.mmap(-1, 1 << 16)
    view = memoryview(ram)
    data = os.urandom(8192)
    view[:8192] = data
    # Aligned, two iovecs: kernel AIO. Then an odd address: the bounce path.
    assert await b.writev(4096, [view[:4096], view[4096:8192]]) == 8192
    assert b._aio is not None and b._aio.depth > 0  # went through kernel AIO
    assert await b.writev(65536, [memoryview(b"z" * 512)]) == 512
    out = view[16384 : 16384 + 8192]
    assert await b.readv(4096, [out]) == 8192
    assert bytes(out) == data
    many = [view[32768 + i * 512 : 32768 + (i + 1) * 512] for i in range(64)]
    assert await b.readv(0, many) == 64 * 512  # more iovecs than a slot holds
    assert await read_back(b, 65536, 512) == b"z" * 512
    del out, many
    view.release()
    await b.close()
    ram.close()
    assert image.read_bytes()[4096 : 4096 + 8192] == data


async def test_aio_native_queues_beyond_its_depth(image: Path) -> None:
    import asyncio

    from appliance.storage.aio import IOCB_CMD_PREADV, LinuxAio

    aio = LinuxAio(depth=4)
    fd = os.open(image, os.O_RDONLY | os.O_DIRECT)
    ram = mmap.mmap(-1, 32 * 4096)
    views = [memoryview(ram)[i * 4096 : (i + 1) * 4096] for i in range(32)]
    try:
        got = await asyncio.gather(
            *(aio.submit(IOCB_CMD_PREADV, fd, [v], i * 4096) for i, v in enumerate(views))
        )
        assert got == [4096] * 32
        with pytest.raises(OSError):
            await aio.submit(IOCB_CMD_PREADV, -1 & 0xFFFFFFFF, [views[0]], 0)
    finally:
        aio.close()
        os.close(fd)
        for v in views:
            v.release()
        ram.close()


async def test_start_rw_through_the_pool_looks_its_ring_up_once_per_loop(
        image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cache=none, aio=threads: start_rw keeps the pool's completion side for its
    loop instead of looking it up per request (a getpid() system call each),
    and every request still completes on the loop with the right bytes."""
    import asyncio

    from appliance.storage import io

    pool = io.io_pool()
    lookups = []
    real_ring = pool.ring
    monkeypatch.setattr(pool, "ring", lambda: lookups.append(1) or real_ring())
    b = RawBackend(image, cache="none", aio="threads")
    buf = memoryview(mmap.mmap(-1, 4096))
    loop = asyncio.get_running_loop()
    try:
        for i in range(8):
            buf[:] = bytes([i + 1]) * 4096
            fut = loop.create_future()
            assert b.start_rw(True, i * 4096, [buf], lambda f, n, e: f.set_result((n, e)), fut)
            assert await fut == (4096, None)
        assert len(lookups) == 1
    finally:
        await b.close()
    with open(image, "rb") as f:
        data = f.read(8 * 4096)
    assert data == b"".join(bytes([i + 1]) * 4096 for i in range(8))
