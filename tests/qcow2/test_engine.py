"""The engine as the VMM sees it: BlockBackend API, concurrency, cache modes, growth."""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import struct
from pathlib import Path

import pytest

from appliance.qcow2 import Qcow2Backend, Qcow2Image, create_temporary_overlay, open_image
from appliance.qcow2.create import CreateOptions, create_image
from appliance.storage.backend import BlockBackend
from tests.conftest import needs_qemu_img
from tests.qcow2.helpers import check_clean, oracle_raw, qemu_img, qemu_io, read_all

MiB = 1 << 20


async def test_qcow2_backend_is_a_block_backend(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    await create_image(p, CreateOptions(size=8 * MiB))
    img = await open_image(p, read_only=False, fmt="qcow2")
    assert isinstance(img, Qcow2Backend) and isinstance(img, BlockBackend)
    assert (img.size, img.read_only, img.logical_block_size, img.supports_discard) == (
        8 * MiB, False, 512, True)
    buf = bytearray(4096)
    assert await img.readv(8 * MiB - 1024, [memoryview(buf)]) == 1024  # short only at EOF
    await img.close()


async def test_probing_warns_only_for_raw_opened_writable(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    q = tmp_path / "a.qcow2"
    await create_image(q, CreateOptions(size=MiB))
    r = tmp_path / "a.raw"
    r.write_bytes(bytes(MiB))
    with caplog.at_level(logging.WARNING, logger="appliance.qcow2"):
        a = await open_image(q, read_only=False)
        ro = await open_image(r, read_only=True)
        assert not caplog.records  # QEMU, too, is silent for a read-only probed raw
        b = await open_image(r, read_only=False)
        assert "probing guessed raw" in caplog.text
    assert isinstance(a, Qcow2Backend) and not isinstance(b, Qcow2Backend)
    for img in (a, ro, b):
        await img.close()


async def test_temporary_overlay_keeps_the_base_unchanged(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * (2 * MiB))
    ov = create_temporary_overlay(base, "raw")
    try:
        img = await open_image(ov, read_only=False, fmt="qcow2")
        assert img.size == 2 * MiB
        await img.writev(1000, [memoryview(b"\x01" * 5000)])
        buf = bytearray(8192)
        await img.readv(0, [memoryview(buf)])
        assert buf[:1000] == b"\x5a" * 1000 and buf[1000:6000] == b"\x01" * 5000
        assert buf[6000:] == b"\x5a" * 2192
        await img.close()
    finally:
        ov.unlink()
    assert base.read_bytes() == b"\x5a" * (2 * MiB)


@pytest.mark.parametrize("backing", [False, True])
async def test_concurrent_writes_to_one_cluster_all_land(tmp_path: Path, backing: bool) -> None:
    """32 writes into two fresh clusters at once: every one is there afterwards."""
    p = tmp_path / "c.qcow2"
    opts = CreateOptions(size=4 * MiB)
    if backing:
        (tmp_path / "b.raw").write_bytes(b"\x77" * (4 * MiB))
        opts.backing_file, opts.backing_fmt = "b.raw", "raw"
    await create_image(p, opts)
    img = await open_image(p, read_only=False, fmt="qcow2")
    await asyncio.gather(*(img.writev(i * 4096, [memoryview(bytes([i + 1]) * 4096)])
                           for i in range(32)))
    buf = bytearray(32 * 4096 + 4096)
    await img.readv(0, [memoryview(buf)])
    for i in range(32):
        assert buf[i * 4096 : (i + 1) * 4096] == bytes([i + 1]) * 4096, i
    assert buf[-4096:] == (b"\x77" if backing else b"\0") * 4096
    await img.close()
    if backing:
        return
    r = qemu_img("check", str(p), check=False)
    assert r.returncode == 0, r.stdout


async def test_cache_none_uses_o_direct(tmp_path: Path) -> None:
    p = tmp_path / "d.qcow2"
    await create_image(p, CreateOptions(size=4 * MiB))
    img = await open_image(p, read_only=False, fmt="qcow2", cache="none")
    assert img._direct and img._dfd != img._fd
    m = mmap.mmap(-1, 8192)
    m.write(b"\x42" * 8192)
    await img.writev(4096, [memoryview(m)])
    await img.write_zeroes(64 * 1024 + 512, 1024)
    out = mmap.mmap(-1, 8192)
    await img.readv(4096, [memoryview(out)])
    assert out[:] == b"\x42" * 8192
    await img.close()
    assert (await read_all(p))[4096:12288] == b"\x42" * 8192


@needs_qemu_img
async def test_refcount_table_grows_and_stays_consistent(tmp_path: Path) -> None:
    p = tmp_path / "g.qcow2"
    await create_image(p, CreateOptions(size=16 * MiB, cluster_size=512))
    rt_before = struct.unpack(">Q", p.read_bytes()[48:56])[0]
    img = await open_image(p, read_only=False, fmt="qcow2")
    data = os.urandom(12 * MiB)
    for off in range(0, len(data), 256 * 1024):
        await img.writev(off, [memoryview(data)[off : off + 256 * 1024]])
    await img.close()
    rt_after = struct.unpack(">Q", p.read_bytes()[48:56])[0]
    assert rt_after != rt_before
    check_clean(p)
    assert oracle_raw(p, tmp_path)[: len(data)] == data


@needs_qemu_img
async def test_tiny_l2_cache_writes_back_in_order(tmp_path: Path) -> None:
    p = tmp_path / "l2.qcow2"
    await create_image(p, CreateOptions(size=64 * MiB, cluster_size=4096))
    img = await Qcow2Backend.open(p, read_only=False, l2_cache_size=2 * 4096)
    model = bytearray(64 * MiB)
    rnd = __import__("random").Random(5)
    for _ in range(300):
        off = rnd.randrange(0, 64 * MiB - 70_000)
        b = bytes([rnd.randrange(1, 255)]) * rnd.randrange(1, 70_000)
        await img.writev(off, [memoryview(b)])
        model[off : off + len(b)] = b
    await img.close()
    check_clean(p)
    assert oracle_raw(p, tmp_path) == bytes(model)


@needs_qemu_img
async def test_extended_l2_subcluster_writes_keep_backing_data(tmp_path: Path) -> None:
    base = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -P 0x11 0 4M")
    top = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", "-b",
             "b.qcow2", "-F", "qcow2", str(top))
    qemu_io(top, "write -P 0x22 4k 2k")  # qemu allocates one subcluster
    img = await open_image(top, read_only=False, fmt="qcow2")
    await img.writev(6144, [memoryview(b"\x33" * 1000)])  # same cluster, next subcluster
    await img.writev(200_000, [memoryview(b"\x44" * 3000)])
    await img.write_zeroes(1 * MiB, 64 * 1024)
    await img.close()
    check_clean(top)
    qemu_io(top, "read -P 0x11 0 4k", "read -P 0x22 4k 2k", "read -P 0x33 6144 1000",
            "read -P 0x11 7144 56392", "read -P 0x44 200000 3000", "read -P 0 1M 64k")


async def test_unknown_header_extension_survives_header_rewrites(tmp_path: Path) -> None:
    from appliance.qcow2.create import build_image
    from appliance.qcow2.header import parse_header
    from appliance.qcow2.ops import resize

    data = bytearray(build_image(CreateOptions(size=MiB)))
    h = parse_header(bytes(data[:65536]), len(data))
    h.extensions.append((0x12345678, b"hello, future"))
    head = h.serialize()
    data[: len(head)] = head
    p = tmp_path / "x.qcow2"
    p.write_bytes(bytes(data))
    img = await open_image(p, read_only=False, fmt="qcow2")
    await resize(img, 2 * MiB)
    await img.close()
    h2 = parse_header(p.read_bytes()[:65536])
    assert h2.size == 2 * MiB and h2.ext(0x12345678) == b"hello, future"


async def test_writable_open_clears_autoclear_bits(tmp_path: Path) -> None:
    from appliance.qcow2.create import build_image
    from appliance.qcow2.header import parse_header

    data = bytearray(build_image(CreateOptions(size=MiB)))
    struct.pack_into(">Q", data, 88, 0b11)  # bitmaps + raw external data
    p = tmp_path / "x.qcow2"
    p.write_bytes(bytes(data))
    ro = await open_image(p, read_only=True, fmt="qcow2")
    await ro.close()
    assert parse_header(p.read_bytes()[:65536]).autoclear_features == 0b11
    rw = await open_image(p, read_only=False, fmt="qcow2")
    await rw.close()
    assert parse_header(p.read_bytes()[:65536]).autoclear_features == 0


@needs_qemu_img
async def test_compressed_writes_respect_narrow_refcounts(tmp_path: Path) -> None:
    """With 2-bit refcounts at most 3 compressed clusters may share a host cluster."""
    p = tmp_path / "z.qcow2"
    await create_image(p, CreateOptions(size=MiB, refcount_bits=2))
    img = await open_image(p, read_only=False, fmt="qcow2")
    for i in range(16):
        await img.write_compressed(i * 65536, bytes([i + 1]) * 65536)
    await img.close()
    check_clean(p)
    raw = oracle_raw(p, tmp_path)
    assert all(raw[i * 65536 : (i + 1) * 65536] == bytes([i + 1]) * 65536 for i in range(16))


@needs_qemu_img
@pytest.mark.parametrize("cache,aio", [("none", "native"), ("none", "threads"),
                                       ("writeback", "native")])
async def test_concurrent_allocating_writes_land_and_leave_a_clean_image(
        tmp_path: Path, cache: str, aio: str) -> None:
    """Batches of 16 disjoint writes at once (whole clusters, partial ones, several into
    one fresh cluster, rewrites of allocated ones): the data is all there, qemu-img check
    is clean and the space reserved ahead of allocation is given back at close (under
    O_DIRECT with kernel AIO or the pool alike)."""
    p = tmp_path / "w.qcow2"
    await create_image(p, CreateOptions(size=32 * MiB))
    img = await Qcow2Image.open(p, read_only=False, cache=cache, aio=aio)
    model = bytearray(32 * MiB)
    rnd = __import__("random").Random(11)
    for batch in range(12):
        ops: list[tuple[int, memoryview]] = []
        while len(ops) < 16:
            n = rnd.choice([512, 4096, 65536, 65536, 131072])
            off = rnd.randrange(0, 24 * MiB - n) // 512 * 512
            if rnd.random() < 0.3:
                # Crowd a few clusters this batch is the first to touch.
                off = 24 * MiB + (batch * 4 + rnd.randrange(4)) * 65536
                off, n = off + rnd.randrange(16) * 4096, 4096
            if any(o < off + n and off < o + len(v) for o, v in ops):
                continue
            m = mmap.mmap(-1, max(n, 4096))
            m.write(bytes([batch * 16 + len(ops) + 1]) * n)
            ops.append((off, memoryview(m)[:n]))
        await asyncio.gather(*(img.writev(off, [v]) for off, v in ops))
        for off, v in ops:
            model[off : off + len(v)] = v
    out = mmap.mmap(-1, 32 * MiB)
    await img.readv(0, [memoryview(out)])
    assert out[:] == model
    await img.close()
    check_clean(p)
    assert oracle_raw(p, tmp_path) == bytes(model)
    info = qemu_img("check", "--output=json", str(p)).stdout
    end = int(info.split('"image-end-offset":')[1].split(",")[0])
    assert p.stat().st_size <= end + 64 * 1024


@needs_qemu_img
async def test_cache_none_takes_unaligned_buffers_and_offsets(tmp_path: Path) -> None:
    """O_DIRECT refuses unaligned buffers and ranges; the engine bounces them instead."""
    p = tmp_path / "u.qcow2"
    await create_image(p, CreateOptions(size=4 * MiB))
    img = await open_image(p, read_only=False, fmt="qcow2", cache="none")
    model = bytearray(4 * MiB)
    for off, n in ((4096, 8192), (70000, 3000), (65536 * 3 + 1, 65535), (4096, 8192)):
        data = bytearray(os.urandom(n + 1))[1:]  # a view one byte into a bytearray
        await img.writev(off, [memoryview(data)])
        model[off : off + n] = data
    # Neighbours inside the same sectors at once: each read-modify-write keeps the others.
    pieces = [(300_000 + i * 100, bytes([i + 1]) * 100) for i in range(12)]
    await asyncio.gather(*(img.writev(off, [memoryview(d)]) for off, d in pieces))
    for off, d in pieces:
        model[off : off + 100] = d
    got = bytearray(4 * MiB + 1)
    await img.readv(0, [memoryview(got)[1:]])
    assert got[1:] == model
    small = bytearray(100)
    await img.readv(70001, [memoryview(small)])
    assert small == model[70001:70101]
    await img.close()
    check_clean(p)
    assert oracle_raw(p, tmp_path) == bytes(model)


@needs_qemu_img
@pytest.mark.parametrize("cache", ["none", "writeback"])
async def test_whole_cluster_writes_over_a_backing_file_race_partial_ones(
        tmp_path: Path, cache: str) -> None:
    """An overlay over a raw base: whole-cluster writes, 4 KiB writes inside them and 4 KiB
    writes into the next clusters, all at once: every cluster holds one write or the other
    in each place, partly written clusters keep the base's bytes around the write."""
    base = tmp_path / "b.raw"
    base.write_bytes(b"\x77" * (8 * MiB))
    p = tmp_path / "o.qcow2"
    await create_image(p, CreateOptions(size=8 * MiB, backing_file="b.raw", backing_fmt="raw"))
    img = await open_image(p, read_only=False, fmt="qcow2", cache=cache)
    model = bytearray(b"\x77" * (8 * MiB))
    await img.writev(0, [memoryview(bytes(4096))])  # the L2 table exists from here on
    model[:4096] = bytes(4096)
    either: list[tuple[int, bytes]] = []
    for rnd in range(3):
        whole, part = [], []
        for k in range(8):
            c = (rnd * 32 + k * 4 + 1) * 65536
            m = mmap.mmap(-1, 65536)
            m.write(bytes([rnd * 16 + k + 1]) * 65536)
            whole.append(img.writev(c, [memoryview(m)]))
            model[c : c + 65536] = m[:]
            p4 = mmap.mmap(-1, 4096)
            p4.write(bytes([0xA0 + k]) * 4096)
            off = c + 65536 + (k % 16) * 4096  # the next cluster: partial, over the base
            part.append(img.writev(off, [memoryview(p4)]))
            model[off : off + 4096] = p4[:]
            # And one inside the whole-cluster write: either may land last.
            inside = c + (k % 16) * 4096
            part.append(img.writev(inside, [memoryview(p4)]))
            either.append((inside, p4[:]))
        await asyncio.gather(*whole, *part)
    out = mmap.mmap(-1, 8 * MiB)
    await img.readv(0, [memoryview(out)])
    for off, d in either:
        assert out[off : off + 4096] in (d, model[off : off + 4096])
        model[off : off + 4096] = out[off : off + 4096]
    assert out[:] == model
    await img.close()
    check_clean(p)
    assert oracle_raw(p, tmp_path) == bytes(model)
