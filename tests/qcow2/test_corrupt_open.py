"""Damaged images QEMU 7.2 opens, and so must we: qemu-img as the live oracle.

Each image is made by qemu-img, then patched: an active L1 table past the end
of the file or in the header cluster, an L2 table past the end of the file, a
snapshot entry whose L1 table is unaligned or too large, a header_length not
a multiple of 8, an unknown header extension twice, an encrypted image
(methods 1 and 2), a header cluster counted 0. ``appliance img`` must then
answer as qemu-img does (info, check and its exit code 2, ``check -r all``,
map, convert, compare, snapshot), reading zeroes where QEMU's file layer reads
zeroes, and refusing only what QEMU refuses, in its words. Ours runs in this
process (``img_here``); only qemu-img is a new process.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.qcow2 import CorruptImage, Qcow2Error, open_image
from tests.conftest import needs_qemu_img
from tests.qcow2.helpers import qemu_img
from tests.qcow2.test_corrupt_images import _get, _incompat, _layout, _put, _write, qemu_io_raw
from tests.qcow2.test_img_parity import img_here

pytestmark = needs_qemu_img


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made and written by QEMU: header, refcount table, refcount block, L1, L2, data."""
    p = tmp_path_factory.mktemp("open") / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "4M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 192k", "-c",
                    "write -P 2 1M 64k", str(p)], check=True, capture_output=True)
    return p


@pytest.fixture(scope="module")
def with_snapshot(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("snap") / "base.qcow2"
    shutil.copy(pristine, p)
    qemu_img("snapshot", "-c", "s1", str(p))
    return p


def _same(d: Path, *args: str, copy: bool = False) -> None:
    """One command, ours and qemu-img's, on twin copies when it writes: the same
    stdout, stderr (but the program's name) and exit code."""
    ours_dir, their_dir = (d / "a", d / "q") if copy else (d, d)
    if copy:
        for where in (ours_dir, their_dir):
            where.mkdir(exist_ok=True)
            shutil.copy(d / "img.qcow2", where / "img.qcow2")
    out, err, code = img_here(*args, cwd=ours_dir)
    q = subprocess.run(["qemu-img", *args], cwd=their_dir, capture_output=True, text=True)
    assert "Traceback" not in err, err
    assert (out, err.replace("appliance img:", "qemu-img:"), code) == (q.stdout, q.stderr,
                                                                      q.returncode), args
    if copy:
        _judged_alike(ours_dir, their_dir)


def _judged_alike(a: Path, q: Path) -> None:
    """After a change: qemu-img check says the same of both results (but for the
    fragmentation figure: where a fresh L2 table goes relative to its first data
    cluster is the allocator's choice)."""
    ra = subprocess.run(["qemu-img", "check", "img.qcow2"], cwd=a, capture_output=True, text=True)
    rq = subprocess.run(["qemu-img", "check", "img.qcow2"], cwd=q, capture_output=True, text=True)

    def text(r: subprocess.CompletedProcess[str]) -> tuple[int, list[str], str]:
        return r.returncode, [ln for ln in r.stdout.splitlines() if "fragmented" not in ln], r.stderr

    assert text(ra) == text(rq)


def _all_commands(d: Path) -> None:
    shutil.copy(d / "img.qcow2", d / "twin.qcow2")
    for args in (["info", "img.qcow2"], ["info", "--output", "json", "img.qcow2"],
                 ["check", "img.qcow2"], ["map", "img.qcow2"],
                 ["map", "--output", "json", "img.qcow2"],
                 ["compare", "img.qcow2", "twin.qcow2"]):
        _same(d, *args)
    _same(d, "convert", "-O", "raw", "img.qcow2", "ours.raw")
    qemu_img("convert", "-O", "raw", str(d / "img.qcow2"), str(d / "theirs.raw"))
    assert (d / "ours.raw").read_bytes() == (d / "theirs.raw").read_bytes()
    _same(d, "check", "-r", "all", "img.qcow2", copy=True)


def _image(src: Path, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "img.qcow2"
    shutil.copy(src, p)
    return p


def _writes_alike(src: Path, d: Path, refused: str | None = None) -> None:
    """The same writes by qemu-io and by the engine: both read back, and qemu-img check
    says the same of both images (the file grows to reach a table past its end); or,
    with ``refused``, both refuse the first write so and mark the image corrupt."""
    a, q = _image(src, d / "wa"), _image(src, d / "wq")
    r = qemu_io_raw(q, "write -P 3 0 64k", "write -P 4 3M 4k", "read -P 3 0 64k")
    if refused is not None:
        assert f"Marking image as corrupt: {refused}" in r, r
        with pytest.raises(CorruptImage, match=re.escape(refused)):
            asyncio.run(_write(a, 0, b"\3" * 65536))
        assert _incompat(a) & 2 and _incompat(q) & 2
        _judged_alike(a.parent, q.parent)
        return
    assert "fail" not in r.lower(), r

    async def ours() -> bytes:
        img = await open_image(a, read_only=False, fmt="qcow2")
        try:
            await img.writev(0, [memoryview(b"\3" * 65536)])
            await img.writev(3 << 20, [memoryview(b"\4" * 4096)])
            await img.flush()
            buf = bytearray(65536)
            await img.readv(0, [memoryview(buf)])
            return bytes(buf)
        finally:
            await img.close()

    assert asyncio.run(ours()) == b"\3" * 65536
    _judged_alike(a.parent, q.parent)


def _resized_alike(src: Path, d: Path, in_header: bool = False) -> None:
    """Growing the disk moves the L1 table; the old one (counted nowhere) gives
    nothing back. ``in_header``: QEMU takes the header cluster's count to 0 (and
    warns "qcow2_free_clusters failed"); we keep it, one error fewer in check."""
    a, q = _image(src, d / "ra"), _image(src, d / "rq")
    out, err, code = img_here("resize", "img.qcow2", "1G", cwd=a.parent)
    r = subprocess.run(["qemu-img", "resize", "img.qcow2", "1G"], cwd=q.parent,
                       capture_output=True, text=True)
    assert (out, code) == (r.stdout, r.returncode) == ("Image resized.\n", 0), err
    if not in_header:
        _judged_alike(a.parent, q.parent)
        return
    ra = subprocess.run(["qemu-img", "check", str(a)], capture_output=True, text=True)
    rq = subprocess.run(["qemu-img", "check", str(q)], capture_output=True, text=True)
    assert "ERROR cluster 0 refcount=0 reference=1" in rq.stderr
    assert rq.stderr.replace("ERROR cluster 0 refcount=0 reference=1\n", "") == ra.stderr


def test_active_l1_table_past_the_end_of_the_file(pristine: Path, tmp_path: Path) -> None:
    """QEMU reads the table as zeroes (an empty disk); check counts the reference past
    the end as an error (exit 2) and the old tables as leaks, -r all frees those. We
    used to refuse the open."""
    p = _image(pristine, tmp_path)
    _put(p, 40, ">Q", 1 << 30)
    _all_commands(tmp_path)
    _writes_alike(p, tmp_path)
    _resized_alike(p, tmp_path)


def test_active_l1_table_in_the_header_cluster(pristine: Path, tmp_path: Path) -> None:
    """The header's first bytes read as L1 entry 0: reserved bits, an L2 table far past
    the end (zeroes), cluster 0 referenced twice. A write needs a new L2 table, and
    writing the L1 would overwrite the header: both refuse and mark the image corrupt."""
    p = _image(pristine, tmp_path)
    _put(p, 40, ">Q", 0)
    _all_commands(tmp_path)
    _resized_alike(p, tmp_path, in_header=True)
    q = _image(p, tmp_path / "q")
    assert "Preventing invalid write on metadata (overlaps with qcow2_header)" in \
        qemu_io_raw(q, "write -P 3 0 64k")
    header = p.read_bytes()[:65536]
    with pytest.raises(CorruptImage, match=r"overlaps with qcow2_header"):
        asyncio.run(_write(p, 0, b"\3" * 65536))
    assert _incompat(p) & 2 and _incompat(q) & 2
    assert p.read_bytes()[80:65536] == header[80:]  # the corrupt bit (72..80) only


def test_l2_table_past_the_end_of_the_file(pristine: Path, tmp_path: Path) -> None:
    """QEMU's file layer reads zeroes past the end: map, convert and compare see an
    empty table; we used to mark the image corrupt on the first read. A write goes
    into the table where it is (the file grows to reach it), as QEMU's does."""
    p = _image(pristine, tmp_path)
    _put(p, _layout(p)["l1"], ">Q", (1 << 63) | (1 << 30))
    _all_commands(tmp_path)
    _writes_alike(p, tmp_path)


async def test_tables_past_the_largest_file_fail_writes_with_a_typed_error(
        pristine: Path, tmp_path: Path) -> None:
    """An L1 or L2 table (or a data cluster) at 2^55: reads are zeroes; a write there
    fails EFBIG in QEMU ("write failed: File too large") and here as a Qcow2Error,
    every time (a failed table write stays owed, never reported written)."""
    far = (1 << 63) | (1 << 55)
    cases = {"l1": lambda m: (40, 1 << 55), "l2": lambda m: (m["l1"], far),
             "data": lambda m: (m["l2"], far)}
    for name, where in cases.items():
        p = _image(pristine, tmp_path / name)
        off, val = where(_layout(p))
        _put(p, off, ">Q", val)
        r = qemu_io_raw(_image(p, tmp_path / f"q{name}"), "write 0 512")
        if "File too large" not in r:
            pytest.skip("this file system takes files of 2^55 bytes")
        img = await open_image(p, read_only=False, fmt="qcow2")
        try:
            for _ in range(2):
                with pytest.raises(Qcow2Error, match="File too large"):
                    await img.writev(0, [memoryview(b"x" * 512)])
                    await img.flush()
        finally:
            if name == "data":
                await img.close()  # nothing owed: the data write failed, no table changed
            else:
                with pytest.raises(Qcow2Error, match="File too large"):
                    await img.close()


async def test_compressed_cluster_at_a_huge_offset_fails_typed(pristine: Path,
                                                               tmp_path: Path) -> None:
    """A compressed entry naming 2^52: a partial write must read it (past the end
    of the file), a whole one frees it (a refcount past every block); both fail as
    Qcow2Errors, never a bare OSError."""
    p = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "4M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -c -P 1 0 64k", str(p)], check=True,
                   capture_output=True)
    l2 = _layout(p)["l2"]
    _put(p, l2, ">Q", (_get(p, l2, ">Q") & ~((1 << 54) - 1)) | (1 << 52))
    img = await open_image(p, read_only=False, fmt="qcow2")
    try:
        for n in (512, 65536):
            with pytest.raises(Qcow2Error):
                await img.writev(0, [memoryview(b"x" * n)])
                await img.flush()
    finally:
        await img.close()


@pytest.mark.parametrize("kind", ["unaligned", "too_large"])
def test_snapshot_with_a_bad_l1_table_opens(with_snapshot: Path, tmp_path: Path,
                                            kind: str) -> None:
    """QEMU opens the image; check reports the entry; only what loads the snapshot's
    table (apply, delete) fails, in QEMU's words; creating another one allocates
    where the oversized table claims to be, which the overlap check refuses."""
    p = _image(with_snapshot, tmp_path)
    st = _get(p, 64, ">Q")
    if kind == "unaligned":
        _put(p, st, ">Q", _get(p, st, ">Q") + 512)
    else:
        _put(p, st + 8, ">I", 0x7FFFFFFF)
    _all_commands(tmp_path)
    _same(tmp_path, "snapshot", "-l", "img.qcow2")
    _same(tmp_path, "convert", "-l", "s1", "-O", "raw", "img.qcow2", "s1.raw")
    # The oversized table claims the clusters where the next one would be allocated.
    _writes_alike(p, tmp_path, None if kind == "unaligned" else
                  "Preventing invalid write on metadata (overlaps with inactive L1 table)")
    for act in ("-a", "-d", "-c"):
        _same(tmp_path, "snapshot", act, "s1" if act != "-c" else "s2", "img.qcow2", copy=True)


@pytest.mark.parametrize("length", [106, 108])
def test_header_length_not_a_multiple_of_8(pristine: Path, tmp_path: Path, length: int) -> None:
    """QEMU does not check; the extensions start where the header ends. At 106 an
    end marker is read from the padding; at 108 the same marker's length runs past
    the cluster ("Header extension too large"). We used to refuse both."""
    p = _image(pristine, tmp_path)
    _put(p, 100, ">I", length)
    for args in (["info", "img.qcow2"], ["check", "img.qcow2"], ["map", "img.qcow2"]):
        _same(tmp_path, *args)
    _same(tmp_path, "check", "-r", "all", "img.qcow2", copy=True)


def test_unknown_header_extension_twice(pristine: Path, tmp_path: Path) -> None:
    """QEMU keeps both copies; we used to refuse the image."""
    p = _image(pristine, tmp_path)
    _put(p, 112, ">II8sII8sII", 0x12345678, 8, b"abcdefgh", 0x12345678, 8, b"ijklmnop", 0, 0)
    _all_commands(tmp_path)
    _writes_alike(p, tmp_path)
    # Both copies are written back when the header is (QEMU writes them in reverse).
    assert (tmp_path / "wa" / "img.qcow2").read_bytes()[:65536].count(b"\x12\x34\x56\x78") == 2


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory, pristine: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("enc")
    aes = d / "aes.qcow2"
    shutil.copy(pristine, aes)
    _put(aes, 32, ">I", 1)
    luks = d / "luks.qcow2"
    qemu_img("create", "-f", "qcow2", "--object", "secret,id=s0,data=x", "-o",
             "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", str(luks), "4M")
    return {"aes": aes, "luks": luks}


@pytest.mark.parametrize("method", ["aes", "luks"])
def test_encrypted_image_answers_info_and_refuses_the_rest(
        encrypted: dict[str, Path], tmp_path: Path, method: str) -> None:
    """qemu-img info opens it without a key ("encrypted: yes", the LUKS header's
    cipher and key slots); check, map, convert and compare cannot open it without
    encrypt.key-secret, in those words. We used to refuse info too."""
    _image(encrypted[method], tmp_path)
    shutil.copy(tmp_path / "img.qcow2", tmp_path / "twin.qcow2")
    for args in (["info", "img.qcow2"], ["info", "--output", "json", "img.qcow2"],
                 ["check", "img.qcow2"], ["check", "-r", "all", "img.qcow2"],
                 ["map", "img.qcow2"], ["convert", "-O", "raw", "img.qcow2", "o.raw"],
                 ["compare", "img.qcow2", "twin.qcow2"]):
        _same(tmp_path, *args)
    with pytest.raises(Qcow2Error, match="Parameter 'encrypt.key-secret' is required for cipher"):
        asyncio.run(open_image(tmp_path / "img.qcow2", read_only=True, fmt="qcow2"))


async def test_header_cluster_counted_zero_is_never_handed_out(pristine: Path,
                                                               tmp_path: Path) -> None:
    """QEMU's allocator starts at cluster 0, takes the header, and its overlap check
    marks the image corrupt; ours started at cluster 1, so the write succeeded and
    the bad count stayed."""
    p = _image(pristine, tmp_path)
    _put(p, _layout(p)["rb"], ">H", 0)
    q = _image(p, tmp_path / "q")
    assert "overlaps with qcow2_header" in qemu_io_raw(q, "write -P 7 2M 64k")
    img = await open_image(p, read_only=False, fmt="qcow2")
    try:
        with pytest.raises(CorruptImage, match=r"overlaps with qcow2_header"):
            await img.writev(2 << 20, [memoryview(b"\7" * 65536)])
    finally:
        await img.close()
    assert _incompat(p) & 2 and _incompat(q) & 2
