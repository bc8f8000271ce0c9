"""Images made by qemu-img/qemu-io read back exactly as qemu-img convert -O raw sees them,
and images we write pass qemu-img check and compare."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.qcow2 import open_image
from tests.conftest import needs_qemu_img
from tests.qcow2.helpers import check_clean, oracle_raw, qemu_img, qemu_io, read_all

pytestmark = needs_qemu_img

MiB = 1 << 20

WRITES = [
    "write -P 0x11 0 100k",
    "write -P 0x22 300k 7k",
    "write -z 1M 192k",
    "write -P 0x33 2047k 3k",
    "write -P 0x44 3M 1M",
    "discard 3200k 256k",
]


def make(tmp: Path, name: str, opts: str, size: str = "6M") -> Path:
    p = tmp / name
    qemu_img("create", "-f", "qcow2", "-o", opts, str(p), size)
    qemu_io(p, *WRITES)
    return p


FEATURES = [
    "cluster_size=512",
    "cluster_size=4k",
    "cluster_size=2M",
    "compat=0.10",
    "extended_l2=on,cluster_size=64k",
    "extended_l2=on,cluster_size=16k",
    "lazy_refcounts=on",
    "compression_type=zstd",
] + [f"refcount_bits={b}" for b in (1, 2, 4, 8, 32, 64)]


@pytest.mark.parametrize("opts", FEATURES)
async def test_qemu_made_image_reads_like_qemu(tmp_path: Path, opts: str) -> None:
    p = make(tmp_path, "img.qcow2", opts)
    assert await read_all(p) == oracle_raw(p, tmp_path)


@pytest.mark.parametrize("opts", FEATURES)
async def test_our_writes_to_qemu_made_image_pass_check(tmp_path: Path, opts: str) -> None:
    p = make(tmp_path, "img.qcow2", opts)
    model = bytearray(oracle_raw(p, tmp_path))
    img = await open_image(p, read_only=False, fmt="qcow2")
    rnd = __import__("random").Random(opts)
    for _ in range(40):
        off = rnd.randrange(0, len(model) - 1)
        n = min(rnd.randrange(1, 300_000), len(model) - off)
        data = os.urandom(n)
        await img.writev(off, [memoryview(data)])
        model[off : off + n] = data
    await img.write_zeroes(512 * 1024, MiB, may_unmap=True)
    model[512 * 1024 : 512 * 1024 + MiB] = bytes(MiB)
    await img.close()
    check_clean(p)
    assert oracle_raw(p, tmp_path) == bytes(model)


@pytest.mark.parametrize("comp", ["zlib", "zstd"])
async def test_compressed_images_read_back(tmp_path: Path, comp: str) -> None:
    src = make(tmp_path, "src.qcow2", "cluster_size=64k")
    dst = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={comp}", str(src),
             str(dst))
    assert await read_all(dst) == oracle_raw(src, tmp_path)


async def test_backing_chain_with_raw_base_and_relative_names(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(4 * MiB))
    sub = tmp_path / "sub"
    sub.mkdir()
    mid = sub / "mid.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", str(mid), "5M")
    qemu_io(mid, "write -P 0x55 1M 65k", "write -z 2M 64k")
    top = sub / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top))
    qemu_io(top, "write -P 0x66 1030k 3k")
    cwd = os.getcwd()
    os.chdir("/")
    try:
        got = await read_all(top)
    finally:
        os.chdir(cwd)
    assert got == oracle_raw(top, tmp_path)


async def test_cow_from_backing_keeps_unwritten_bytes(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -P 0xAA 0 4M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    img = await open_image(top, read_only=False, fmt="qcow2")
    await img.writev(70_000, [memoryview(b"\x01" * 1000)])
    await img.close()
    check_clean(top)
    qemu_io(top, "read -P 0xAA 0 70000", "read -P 0x01 70000 1000", "read -P 0xAA 71000 60072")
    assert base.stat().st_size > 0
    qemu_io(base, "read -P 0xAA 0 4M")


async def test_snapshots_made_by_qemu_and_applied_by_us(tmp_path: Path) -> None:
    p = make(tmp_path, "s.qcow2", "cluster_size=64k")
    before = oracle_raw(p, tmp_path)
    qemu_img("snapshot", "-c", "one", str(p))
    qemu_io(p, "write -P 0x77 0 2M")
    from appliance.qcow2.snapops import apply_snapshot, create_snapshot, delete_snapshot

    img = await open_image(p, read_only=False, fmt="qcow2")
    await create_snapshot(img, "two")
    await img.writev(0, [memoryview(b"\x99" * 4096)])
    await apply_snapshot(img, "one")
    await img.close()
    check_clean(p)
    assert oracle_raw(p, tmp_path) == before
    img = await open_image(p, read_only=False, fmt="qcow2")
    await delete_snapshot(img, "one")
    await delete_snapshot(img, "two")
    await img.close()
    check_clean(p)
    assert "one" not in qemu_img("snapshot", "-l", str(p)).stdout
    assert oracle_raw(p, tmp_path) == before
