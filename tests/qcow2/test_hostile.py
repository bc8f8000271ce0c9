"""Hostile images: clear errors or the corrupt bit; never a hang, a huge allocation,
or a write into an image that failed its checks. Includes hypothesis fuzzing of the
header, snapshot table and refcount block parsers, and the cases it found."""

from __future__ import annotations

import contextlib
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from appliance.qcow2 import CorruptImage, ErrorKind, Qcow2Error, UnsupportedImage, open_image
from appliance.qcow2.create import CreateOptions, build_image, create_image
from appliance.qcow2.header import parse_header
from appliance.qcow2.refcount import decode_block, encode_block
from appliance.qcow2.snapshot import parse_snapshots
from tests.conftest import needs_qemu_img
from tests.qcow2.helpers import qemu_img, qemu_io

CS = 65536


def image(**kw: object) -> bytearray:
    """A fresh image padded to whole clusters (header, reftable, refblock, L1)."""
    data = bytearray(build_image(CreateOptions(size=kw.pop("size", 8 << 20), **kw)))  # type: ignore[arg-type]
    return data + bytes(-len(data) % CS)


def put(buf: bytearray, off: int, fmt: str, *vals: int) -> bytearray:
    need = off + struct.calcsize(fmt)
    if len(buf) < need:
        buf.extend(bytes(need - len(buf)))
    struct.pack_into(fmt, buf, off, *vals)
    return buf


async def open_bytes(tmp: Path, data: bytes, read_only: bool = True):  # type: ignore[no-untyped-def]
    p = tmp / "h.qcow2"
    p.write_bytes(data)
    return await open_image(p, read_only=read_only, fmt="qcow2")


async def test_truncated_header_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Qcow2Error, match="truncated|bad magic"):
        await open_bytes(tmp_path, bytes(image()[:50]))


async def test_wrong_magic_is_not_qcow2(tmp_path: Path) -> None:
    data = image()
    data[:4] = b"QFI\x00"
    with pytest.raises(Qcow2Error, match="not a qcow2"):
        await open_bytes(tmp_path, bytes(data))


async def test_l1_table_past_eof_reads_as_zeroes(tmp_path: Path) -> None:
    """QEMU opens it and reads zeroes there (test_corrupt_open has the rest)."""
    data = put(image(), 40, ">Q", 1 << 40)  # l1_table_offset
    img = await open_bytes(tmp_path, bytes(data))
    try:
        buf = bytearray(b"\xff" * 4096)
        await img.readv(0, [memoryview(buf)])
        assert buf == bytes(4096)
    finally:
        await img.close()


async def test_unaligned_refcount_table_is_corrupt(tmp_path: Path) -> None:
    data = put(image(), 48, ">Q", CS + 8)  # refcount_table_offset
    with pytest.raises(CorruptImage, match="Reference count table offset invalid"):
        await open_bytes(tmp_path, bytes(data))


async def test_unknown_incompatible_feature_is_named(tmp_path: Path) -> None:
    data = put(image(), 72, ">Q", 1 << 5)
    with pytest.raises(UnsupportedImage, match="Unknown incompatible feature: 20$"):
        await open_bytes(tmp_path, bytes(data))


async def test_refcount_order_out_of_range(tmp_path: Path) -> None:
    data = put(image(), 96, ">I", 7)
    with pytest.raises(Qcow2Error, match="Reference count entry width too large"):
        await open_bytes(tmp_path, bytes(data))


async def test_huge_virtual_size_with_small_l1_is_refused(tmp_path: Path) -> None:
    data = put(image(), 24, ">Q", 1 << 62)
    with pytest.raises(Qcow2Error, match="Image is too big"):
        await open_bytes(tmp_path, bytes(data))


async def test_huge_l1_size_is_refused_before_reading(tmp_path: Path) -> None:
    data = put(image(), 36, ">I", 0xFFFFFFFF)
    with pytest.raises(Qcow2Error, match="too large"):
        await open_bytes(tmp_path, bytes(data))


async def test_header_extension_running_past_cluster(tmp_path: Path) -> None:
    data = image()
    # First extension after the 112-byte header: claim 1 MiB of data.
    put(data, 112, ">II", 0x12345678, 1 << 20)
    with pytest.raises(Qcow2Error, match="Header extension too large"):
        await open_bytes(tmp_path, bytes(data))


async def test_unaligned_l2_offset_marks_image_corrupt_and_stops_writes(tmp_path: Path) -> None:
    data = image()
    put(data, 3 * CS, ">Q", (1 << 63) | (4 * CS + 512))  # L1[0] -> unaligned L2
    data.extend(bytes(2 * CS))
    img = await open_bytes(tmp_path, bytes(data), read_only=False)
    buf = bytearray(4096)
    with pytest.raises(CorruptImage):
        await img.readv(0, [memoryview(buf)])
    with pytest.raises(Qcow2Error) as err:
        await img.writev(1 << 20, [memoryview(b"x" * 512)])
    assert err.value.kind == ErrorKind.READ_ONLY
    await img.close()
    header = (tmp_path / "h.qcow2").read_bytes()[:CS]
    assert struct.unpack_from(">Q", header, 72)[0] & 2, "corrupt bit not set"
    with pytest.raises(CorruptImage, match="marked corrupt"):
        await open_image(tmp_path / "h.qcow2", read_only=False, fmt="qcow2")
    ro = await open_image(tmp_path / "h.qcow2", read_only=True, fmt="qcow2")
    await ro.close()


async def test_l2_entry_pointing_at_header_is_never_written(tmp_path: Path) -> None:
    data = image()
    put(data, 3 * CS, ">Q", (1 << 63) | (4 * CS))  # L1[0] -> L2 at cluster 4
    data.extend(bytes(CS))
    put(data, 4 * CS, ">Q", (1 << 63) | 0)  # guest cluster 0 -> host 0? offset 0 is unallocated
    put(data, 4 * CS + 8, ">Q", (1 << 63) | (3 * CS))  # guest cluster 1 -> the L1 table
    img = await open_bytes(tmp_path, bytes(data), read_only=False)
    before = (tmp_path / "h.qcow2").read_bytes()[3 * CS : 4 * CS]
    with pytest.raises(CorruptImage, match="metadata"):
        await img.writev(CS, [memoryview(b"\xee" * 4096)])
    await img.close()
    after = (tmp_path / "h.qcow2").read_bytes()[3 * CS : 4 * CS]
    assert before == after


async def test_bad_compressed_cluster_is_a_clear_error(tmp_path: Path) -> None:
    data = image(size=CS)
    put(data, 3 * CS, ">Q", (1 << 63) | (4 * CS))
    data.extend(bytes(2 * CS))
    garbage = b"\xff" * 600
    coff = 5 * CS
    data[coff : coff + len(garbage)] = garbage
    nsec = 1  # two sectors in all
    put(data, 4 * CS, ">Q", (1 << 62) | (nsec << (62 - 8)) | coff)
    img = await open_bytes(tmp_path, bytes(data))
    with pytest.raises(CorruptImage, match="inflate"):
        await img.readv(0, [memoryview(bytearray(4096))])
    await img.close()


async def test_compressed_bomb_stops_at_one_cluster(tmp_path: Path) -> None:
    data = image(size=CS)
    put(data, 3 * CS, ">Q", (1 << 63) | (4 * CS))
    data.extend(bytes(2 * CS))
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    blob = c.compress(bytes(64 << 20)) + c.flush()  # inflates to 64 MiB
    coff = 5 * CS
    data[coff : coff + len(blob)] = blob
    data.extend(bytes(len(blob)))
    nsec = (coff + len(blob) - 1) // 512 - coff // 512
    put(data, 4 * CS, ">Q", (1 << 62) | (nsec << (62 - 8)) | coff)
    img = await open_bytes(tmp_path, bytes(data))
    buf = bytearray(CS)
    await img.readv(0, [memoryview(buf)])  # inflation stops after one cluster
    assert buf == bytes(CS)
    await img.close()


@needs_qemu_img
async def test_refcount_overflow_is_refused_not_wrapped(tmp_path: Path) -> None:
    p = tmp_path / "r1.qcow2"
    await create_image(p, CreateOptions(size=1 << 20, refcount_bits=1))
    img = await open_image(p, read_only=False, fmt="qcow2")
    await img.writev(0, [memoryview(b"a" * 4096)])
    from appliance.qcow2.snapops import create_snapshot

    with pytest.raises(Qcow2Error) as err:
        await create_snapshot(img, "x")
    assert err.value.kind == ErrorKind.RANGE
    await img.close()
    # What the operation had counted was taken back: clean, and not left dirty.
    assert qemu_img("check", str(p), check=False).returncode == 0
    assert "cleanly shut down" not in qemu_img("info", str(p)).stdout
    qemu_io(p, "read -P 0x61 0 4096")


@needs_qemu_img
async def test_backing_chain_loop_is_detected(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", str(a), "1M")
    qemu_img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(b))
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a))
    with pytest.raises(Qcow2Error, match="loop"):
        await open_image(b, read_only=True, fmt="qcow2")


# ------------------------------------------------------------------ fuzzing


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.binary(min_size=0, max_size=600))
def test_header_parser_only_raises_qcow2_errors(data: bytes) -> None:
    try:
        parse_header(b"QFI\xfb" + data, 1 << 30)
    except Qcow2Error:
        pass


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=12))
def test_mutated_headers_only_raise_qcow2_errors(edits: list[tuple[int, int]]) -> None:
    data = image(backing_file="base.raw", backing_fmt="raw")
    for pos, val in edits:
        data[pos] = val
    try:
        parse_header(bytes(data[:CS]), len(data))
    except Qcow2Error:
        pass


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=400), st.integers(0, 20))
def test_snapshot_table_parser_only_raises_corrupt(data: bytes, count: int) -> None:
    try:
        parse_snapshots(data, count, CS)
    except CorruptImage:
        pass


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(st.integers(0, 6), st.binary(min_size=64, max_size=64))
def test_refcount_blocks_round_trip_every_width(order: int, data: bytes) -> None:
    values = decode_block(data, order)
    assert len(values) == 64 * 8 >> order
    assert encode_block(values, order) == data


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(0, 4 * CS + 64), st.integers(0, 255)), min_size=1,
                max_size=8))
# Found by a longer fuzzing run: an L1 table moved to 2^56 or to offset 0. The write fails and
# close() then fails too, on purpose (a flush after a failed one must not pretend success).
@example(edits=[(40, 1)])
@example(edits=[(45, 0)])
def test_mutated_images_read_or_fail_cleanly(tmp_path_factory: pytest.TempPathFactory,
                                              edits: list[tuple[int, int]]) -> None:
    """Bytes flipped anywhere in the metadata: open+read either works or raises Qcow2Error."""
    import asyncio

    data = image(size=2 << 20)
    data[3 * CS : 3 * CS + 8] = struct.pack(">Q", (1 << 63) | 4 * CS)
    data.extend(bytes(2 * CS))
    data[4 * CS : 4 * CS + 8] = struct.pack(">Q", (1 << 63) | 5 * CS)
    for pos, val in edits:
        data[pos] = val
    tmp = tmp_path_factory.mktemp("fz")

    async def go() -> None:
        try:
            img = await open_bytes(tmp, bytes(data), read_only=False)
        except Qcow2Error:
            return
        try:
            n = min(img.size, 1 << 20)
            await img.readv(0, [memoryview(bytearray(n))])
            await img.writev(0, [memoryview(b"z" * 512)])
        except Qcow2Error:
            pass
        finally:
            with contextlib.suppress(Qcow2Error):
                await img.close()

    asyncio.run(asyncio.wait_for(go(), 20))


def test_edge_case_refcount_table_pointing_into_itself() -> None:
    """Edge case kept beside the fuzzers: a refcount table at offset 0 (the header)."""
    data = image()
    data[48:56] = bytes([
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  # refcount_table_offset = 0
    ])
    with pytest.raises(CorruptImage, match="Reference count table lies in the header"):
        parse_header(bytes(data[:CS]), len(data))


def test_edge_case_backing_name_past_cluster() -> None:
    """Edge case kept beside the fuzzers: backing_file_offset beyond the first cluster."""
    data = image()
    data[8:20] = bytes([
        0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,  # backing_file_offset = 64 KiB
        0x00, 0x00, 0x00, 0x10,                          # backing_file_size = 16
    ])
    with pytest.raises(Qcow2Error, match="Backing file name too long"):
        parse_header(bytes(data[:CS]), len(data))


async def test_data_cluster_past_eof_reads_as_zeroes_with_o_direct(tmp_path: Path) -> None:
    """A data cluster beyond the end of the file (truncated image): zeroes, no hang,
    through the kernel AIO path as well as the thread pool."""
    import mmap

    data = image(size=CS * 4)
    put(data, 3 * CS, ">Q", (1 << 63) | (4 * CS))
    data.extend(bytes(CS))
    put(data, 4 * CS, ">Q", (1 << 63) | (9 * CS))  # guest cluster 0 -> past EOF
    p = tmp_path / "h.qcow2"
    p.write_bytes(bytes(data))
    for cache in ("writeback", "none"):
        img = await open_image(p, read_only=True, fmt="qcow2", cache=cache)
        buf = mmap.mmap(-1, CS)
        buf.write(b"\xff" * CS)
        await img.readv(0, [memoryview(buf)])
        assert buf[:] == bytes(CS)
        await img.close()
