"""Damaged qcow2 images made by someone else, against QEMU 7.2 as the oracle.

The defects are the ones QEMU's iotests 060 and 080 build: metadata
structures overlapping one another (reached through a refcount of 0, a
refcount block read from the wrong place, an L1 table on the refcount table),
reserved L2 bits in a version 2 image, tables with impossible sizes or
offsets. For each, the engine must never write one structure over another
(it marks the image corrupt, as QEMU's overlap check does), and ``appliance
img`` must refuse, check and repair as qemu-img does.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.qcow2 import CorruptImage, Qcow2Error, open_image
from tests.conftest import needs_qemu_img
from tests.qcow2.helpers import qemu_img, qemu_io
from tests.qcow2.test_check_parity import ours, theirs

pytestmark = needs_qemu_img

COPIED = 1 << 63
OFF = 0x00FFFFFFFFFFFE00


def _put(p: Path, off: int, fmt: str, *vals: int) -> None:
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, *vals))


def _get(p: Path, off: int, fmt: str) -> int:
    with open(p, "rb") as f:
        f.seek(off)
        return int(struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0])


def _layout(p: Path) -> dict[str, int]:
    l1, rt = _get(p, 40, ">Q"), _get(p, 48, ">Q")
    return {"l1": l1, "rt": rt, "l2": _get(p, l1, ">Q") & OFF, "rb": _get(p, rt, ">Q")}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One image per compat level, made and written by QEMU (layout: header,
    refcount table, refcount block, L1, L2, data)."""
    d = tmp_path_factory.mktemp("corrupt")
    out = {}
    for compat in ("1.1", "0.10"):
        p = d / f"base-{compat}.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", f"compat={compat}", str(p), "4M")
        qemu_io(p, "write -P 1 0 192k", "write -P 2 1M 64k")
        out[compat] = p
    return out


def _copy(src: Path, where: Path, name: str = "img.qcow2") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    p = where / name
    shutil.copy(src, p)
    return p


def _incompat(p: Path) -> int:
    return _get(p, 72, ">Q")


async def _write(p: Path, offset: int, data: bytes) -> None:
    img = await open_image(p, read_only=False, fmt="qcow2")
    try:
        await img.writev(offset, [memoryview(data)])
        await img.flush()
    finally:
        await img.close()


# Structures counted 0 (or a refcount block read from the L1 table): the next
# allocating write would take a cluster another table lives in.
OVERLAPS: dict[str, tuple[Callable[[Path, dict[str, int]], None], str]] = {
    "refcount_zero_on_l1": (lambda p, m: _put(p, m["rb"] + 2 * (m["l1"] >> 16), ">H", 0),
                            "active L1 table"),
    "refcount_zero_on_l2": (lambda p, m: _put(p, m["rb"] + 2 * (m["l2"] >> 16), ">H", 0),
                            "active L2 table"),
    "refcount_zero_on_refblock": (lambda p, m: _put(p, m["rb"] + 2 * (m["rb"] >> 16), ">H", 0),
                                  "refcount block"),
    "refblock_read_from_l1": (lambda p, m: _put(p, m["rt"], ">Q", m["l1"]), "refcount table"),
}


@pytest.mark.parametrize("kind", sorted(OVERLAPS))
async def test_allocation_never_overwrites_metadata_counted_zero(
        pristine: dict[str, Path], tmp_path: Path, kind: str) -> None:
    """iotest 060's "overlap" cases: QEMU refuses the write and sets the corrupt
    bit ("Preventing invalid write on metadata"); we used to hand the cluster out
    and write guest data over the L1 table, an L2 table or the refcount table."""
    damage, what = OVERLAPS[kind]
    p = _copy(pristine["1.1"], tmp_path / "a")
    damage(p, _layout(p))
    q = _copy(p, tmp_path / "q")
    before = p.read_bytes()[: 5 * 65536]  # header, reftable, refblock, L1, L2
    with pytest.raises(CorruptImage, match=rf"Preventing invalid write on metadata \(overlaps with {what}\)"):
        await _write(p, 2 << 20, b"\x2b" * 65536)
    # QEMU does the same with the same image.
    r = qemu_io_raw(q, "write -P 43 2M 64k")
    assert "Marking image as corrupt: Preventing invalid write on metadata" in r
    assert _incompat(p) & 2 and _incompat(q) & 2
    # The tables are as they were (the header gained the corrupt bit only).
    after = p.read_bytes()[: 5 * 65536]
    assert after[:72] == before[:72] and after[65536:] == before[65536:]


def qemu_io_raw(p: Path, *cmds: str) -> str:
    import subprocess

    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run([*argv, str(p)], capture_output=True, text=True)
    return r.stdout + r.stderr


async def test_l1_table_on_the_refcount_table_is_never_written(pristine: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """An L1 table placed on the refcount table: writing the L1 would overwrite the
    refcounts. QEMU refuses and marks the image corrupt; we used to write it."""
    p = _copy(pristine["1.1"], tmp_path)
    m = _layout(p)
    _put(p, 40, ">Q", m["rt"])
    reftable = p.read_bytes()[m["rt"] : m["rt"] + 65536]
    with pytest.raises(CorruptImage, match="Preventing invalid write on metadata"):
        await _write(p, 0, b"\x2a" * 512)
    assert p.read_bytes()[m["rt"] : m["rt"] + 65536] == reftable
    assert _incompat(p) & 2


async def test_zero_flag_in_a_version_2_image_is_corruption(pristine: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """Bit 0 of an L2 entry is reserved in version 2: QEMU fails the read ("Zero
    cluster entry found in pre-v3 image") and convert/map fail; we used to read
    through it (data for an allocated entry, zeroes for an unallocated one)."""
    p = _copy(pristine["0.10"], tmp_path)
    m = _layout(p)
    _put(p, m["l2"] + 8, ">Q", _get(p, m["l2"] + 8, ">Q") | 1)
    img = await open_image(p, read_only=True, fmt="qcow2")
    try:
        with pytest.raises(CorruptImage, match=r"Zero cluster entry found in pre-v3 image "
                                                r"\(L2 offset: 0x40000, L2 index: 0x1\)"):
            await img.readv(65536, [memoryview(bytearray(512))])
    finally:
        await img.close()
    for args in (["convert", "-O", "raw", "img.qcow2", "o.raw"], ["map", "img.qcow2"]):
        a, q = ours(*args, cwd=tmp_path), theirs(*args, cwd=tmp_path)
        assert a.returncode == q.returncode == 1, (args, a.stderr)
        assert "Zero cluster entry found in pre-v3 image (L2 offset: 0x40000, L2 index: 0x1)" in a.stderr
    # check finds nothing wrong, in both.
    assert ours("check", "img.qcow2", cwd=tmp_path).returncode == 0
    assert theirs("check", "img.qcow2", cwd=tmp_path).returncode == 0


# Header fields QEMU refuses at open (iotest 080): the same one line from
# every command, with the same exit code.
REFUSED: dict[str, list[tuple[int, str, int]]] = {
    "l1_size_huge": [(36, ">I", 0x7FFFFFFF)],
    "l1_offset_unaligned": [(40, ">Q", 0x1234567890ABCDEF), (36, ">I", 1)],
    "reftable_clusters_huge": [(56, ">I", 0x20001)],
    "reftable_offset_past_int64": [(48, ">Q", 0xFFFFFFFFFFFF0000), (56, ">I", 0x7F)],
    "no_reftable": [(56, ">I", 0)],
    "nb_snapshots_huge": [(60, ">I", 0xFFFFFFFF)],
    "snapshot_offset_past_int64": [(64, ">Q", 0xFFFFFFFFFFFF0000), (60, ">I", 0xFFFF)],
    "snapshot_offset_unaligned_no_snapshots": [(64, ">Q", 0x12345678)],
    "header_length_huge": [(100, ">I", 0x7FFFFFFF)],
    "extension_huge": [(112, ">II", 0x12345678, 0x7FFFFFFF)],
    "backing_offset_past_cluster": [(8, ">QI", 65536 + 16, 4)],
    "backing_name_huge": [(8, ">QI", 0x1000, 0xFFFFFFFF)],
    "cluster_bits_small": [(20, ">I", 8)],
    "version_4": [(4, ">I", 4)],
    "refcount_order_7": [(96, ">I", 7)],
    "encryption_method_3": [(32, ">I", 3)],
    "size_huge": [(24, ">Q", 1 << 62)],
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_headers_are_refused_in_qemu_imgs_words(pristine: dict[str, Path], tmp_path: Path,
                                                        kind: str) -> None:
    p = _copy(pristine["1.1"], tmp_path)
    for off, fmt, *vals in REFUSED[kind]:
        _put(p, off, fmt, *vals)
    for args in (["info", "img.qcow2"],):
        a, q = ours(*args, cwd=tmp_path), theirs(*args, cwd=tmp_path)
        assert a.stderr.replace("appliance img:", "qemu-img:") == q.stderr, (kind, args)
        assert a.returncode == q.returncode, (kind, args)
        assert "Traceback" not in a.stderr


def test_snapshot_entry_with_too_much_extra_data_is_named(pristine: dict[str, Path],
                                                          tmp_path: Path) -> None:
    p = _copy(pristine["1.1"], tmp_path)
    qemu_img("snapshot", "-c", "s", str(p))
    _put(p, _get(p, 64, ">Q") + 36, ">I", 0xFFFFFFFF)  # extra_data_size
    a, q = ours("info", "img.qcow2", cwd=tmp_path), theirs("info", "img.qcow2", cwd=tmp_path)
    assert a.stderr.replace("appliance img:", "qemu-img:") == q.stderr
    assert a.returncode == q.returncode == 1


def test_check_of_an_unaligned_snapshot_offset_fails_as_qemu_img(pristine: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """No snapshots, but an unaligned table offset: qemu-img check fails with EINVAL."""
    p = _copy(pristine["1.1"], tmp_path)
    _put(p, 64, ">Q", 0x12345678)
    a, q = ours("check", "img.qcow2", cwd=tmp_path), theirs("check", "img.qcow2", cwd=tmp_path)
    assert (a.returncode, a.stdout) == (q.returncode, q.stdout) == (1, "")
    assert a.stderr.replace("appliance img:", "qemu-img:") == q.stderr


def test_check_of_a_refcount_block_past_the_largest_offset(pristine: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """A refcount table entry with bit 63 set (here: the table read from the L1
    table): qemu-img reports the block outside the image and internal errors;
    we used to die with an OverflowError traceback."""
    p = _copy(pristine["1.1"], tmp_path)
    _put(p, 48, ">Q", _layout(p)["l1"])
    a, q = ours("check", "img.qcow2", cwd=tmp_path), theirs("check", "img.qcow2", cwd=tmp_path)
    assert "Traceback" not in a.stderr
    assert (a.returncode, a.stdout) == (q.returncode, q.stdout)


def test_repair_of_a_garbage_snapshot_table_ends_cleanly(pristine: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """nb_snapshots 0xffffffff over a table of garbage: qemu-img check -r all gives
    up with exit 1; we used to die with a struct.error traceback when the
    rebuilt table held an ID too long to store."""
    p = _copy(pristine["1.1"], tmp_path)
    _put(p, 60, ">I", 0xFFFFFFFF)
    a = ours("check", "-r", "all", "img.qcow2", cwd=tmp_path)
    assert "Traceback" not in a.stderr, a.stderr[-2000:]
    assert a.returncode == 1
    assert "appliance img: Check failed" in a.stderr


async def test_pread_past_the_largest_offset_is_a_typed_error(pristine: dict[str, Path],
                                                              tmp_path: Path) -> None:
    p = _copy(pristine["1.1"], tmp_path)
    img = await open_image(p, read_only=True, fmt="qcow2")
    try:
        with pytest.raises(Qcow2Error, match="largest file offset"):
            await img._pread(0xFFFFFFFFFFFF0000, 65536)
    finally:
        await img.close()
