"""Opening images named by -drive/-blockdev: probing, the probed-raw guard, locking, -snapshot."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.qcow2.create import CreateOptions, build_image
from appliance.storage.blockdev import (
    DriveConfig,
    ImageSource,
    ProbedRawGuard,
    open_image_source,
    open_source,
    probe_warning,
)
from appliance.storage.errors import BackendOpenError, ReadOnlyError


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    p = tmp_path / "r.img"
    p.write_bytes(b"\x11" * (1 << 20))
    return p


@pytest.fixture
def qcow(tmp_path: Path) -> Path:
    p = tmp_path / "q.qcow2"
    p.write_bytes(build_image(CreateOptions(size=1 << 20)))
    return p


async def test_probing_finds_qcow2_silently_and_warns_for_raw(raw: Path, qcow: Path) -> None:
    said: list[str] = []
    q = await open_image_source(ImageSource(qcow), warn=said.append)
    r = await open_image_source(ImageSource(raw), warn=said.append)
    try:
        assert (q.fmt, r.fmt) == ("qcow2", "raw")
        assert said == [probe_warning(str(raw))]
        assert said[0].splitlines()[0] == (
            f"WARNING: Image format was not specified for '{raw}' and probing guessed raw."
        )
        assert isinstance(r.backend, ProbedRawGuard)
    finally:
        await q.close()
        await r.close()


@pytest.mark.parametrize("how", ["readonly", "snapshot"])
async def test_probed_raw_that_is_never_written_opens_without_the_warning(raw: Path, how: str) -> None:
    # QEMU's raw driver warns only when the probed image is opened writable:
    # readonly=on and -snapshot (writes go to the overlay) open it silently.
    said: list[str] = []
    src = ImageSource(raw, read_only=how == "readonly", snapshot=how == "snapshot")
    img = await open_image_source(src, warn=said.append)
    try:
        assert img.fmt == "raw"
        assert said == []
    finally:
        await img.close()


async def test_probed_raw_refuses_a_qcow2_header_in_block_0_only(raw: Path) -> None:
    img = await open_image_source(ImageSource(raw), warn=lambda _: None)
    try:
        b = img.backend
        with pytest.raises(ReadOnlyError):
            await b.writev(0, [memoryview(bytearray(b"QFI\xfb" + bytes(508)))])
        with pytest.raises(ReadOnlyError):  # split across buffers
            await b.writev(0, [memoryview(bytearray(b"QF")), memoryview(bytearray(b"I\xfb" + bytes(508)))])
        assert await b.writev(0, [memoryview(bytearray(b"QFI\x00" + bytes(508)))]) == 512
        assert await b.writev(512, [memoryview(bytearray(b"QFI\xfb" + bytes(508)))]) == 512
    finally:
        await img.close()
    data = raw.read_bytes()
    assert data[:4] == b"QFI\x00" and data[512:516] == b"QFI\xfb"


@pytest.mark.parametrize(("offset", "sig"), [(0, b"KDMV"), (0, b"conectix"), (0, b"QED\x00"),
                                           (0x40, b"\x7f\x10\xda\xbe"), (0, b"LUKS\xba\xbe")])
async def test_probed_raw_refuses_any_image_signature_in_block_0(raw: Path, offset: int, sig: bytes) -> None:
    # QEMU's rule: block 0 of a probed raw image may not start to look like
    # any format, or the next probe would open the disk as that format.
    img = await open_image_source(ImageSource(raw), warn=lambda _: None)
    try:
        b = img.backend
        with pytest.raises(ReadOnlyError):
            await b.writev(offset, [memoryview(bytearray(sig + bytes(512 - len(sig))))])
        # the same bytes one sector further are plain data
        assert await b.writev(512 + offset, [memoryview(bytearray(sig + bytes(512 - len(sig))))]) == 512
    finally:
        await img.close()
    assert raw.read_bytes()[:512] == b"\x11" * 512


async def test_probing_refuses_a_vmdk_instead_of_serving_it_raw(tmp_path: Path) -> None:
    p = tmp_path / "d.vmdk"
    p.write_bytes(b"KDMV" + bytes(1 << 16))
    with pytest.raises(ConfigError, match=r"d.vmdk': image format 'vmdk' is not supported"):
        await open_image_source(ImageSource(p), warn=lambda _: None)
    with pytest.raises(BackendOpenError, match=r"image format 'vmdk' is not supported"):
        await open_source(ImageSource(p), warn=lambda _: None)  # the storage daemon's door
    img = await open_image_source(ImageSource(p, fmt="raw"))  # named raw: served as is
    await img.close()


async def test_explicit_raw_format_has_no_guard(raw: Path) -> None:
    img = await open_image_source(ImageSource(raw, fmt="raw"))
    try:
        assert not isinstance(img.backend, ProbedRawGuard)
        await img.backend.writev(0, [memoryview(bytearray(b"QFI\xfb" + bytes(508)))])
    finally:
        await img.close()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_second_writer_and_reader_beside_a_writer_are_refused(raw: Path, qcow: Path, fmt: str) -> None:
    path = raw if fmt == "raw" else qcow
    first = await open_image_source(ImageSource(path, fmt=fmt))
    try:
        with pytest.raises(ConfigError, match="lock"):
            await open_image_source(ImageSource(path, fmt=fmt))
        with pytest.raises(ConfigError, match="lock"):
            await open_image_source(ImageSource(path, fmt=fmt, read_only=True))
    finally:
        await first.close()
    again = await open_image_source(ImageSource(path, fmt=fmt))
    await again.close()


async def test_readers_share(qcow: Path) -> None:
    a = await open_image_source(ImageSource(qcow, fmt="qcow2", read_only=True))
    b = await open_image_source(ImageSource(qcow, fmt="qcow2", read_only=True))
    await a.close()
    await b.close()


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io is not installed")
async def test_qemu_io_cannot_write_while_we_hold_the_image(qcow: Path) -> None:
    img = await open_image_source(ImageSource(qcow, fmt="qcow2"))
    try:
        proc = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 512", str(qcow)],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0 and "lock" in proc.stderr
    finally:
        await img.close()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_snapshot_writes_go_to_a_vanished_overlay(raw: Path, qcow: Path, fmt: str) -> None:
    path = raw if fmt == "raw" else qcow
    before = path.read_bytes()
    tmp_before = set(Path("/tmp").glob("appliance-snapshot-*"))
    img = await open_image_source(ImageSource(path, fmt=fmt, snapshot=True))
    try:
        assert set(Path("/tmp").glob("appliance-snapshot-*")) <= tmp_before
        buf = bytearray(b"\x99" * 4096)
        await img.backend.writev(4096, [memoryview(buf)])
        out = bytearray(4096)
        await img.backend.readv(4096, [memoryview(out)])
        assert out == buf
        # The base is only read: another writer elsewhere is still refused.
        with pytest.raises(ConfigError, match="lock"):
            await open_image_source(ImageSource(path, fmt=fmt))
    finally:
        await img.close()
    assert path.read_bytes() == before


async def test_open_errors_are_config_errors_naming_the_option(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(100))
    with pytest.raises(ConfigError, match=r"^-drive file=x: "):
        await open_image_source(ImageSource(bad, fmt="qcow2", what="-drive file=x"))


async def test_l2_cache_size_reaches_the_qcow2_engine_from_drive_and_blockdev(qcow: Path) -> None:
    from appliance.qcow2 import Qcow2Image
    from appliance.storage.blockdev import BlockdevConfig, DriveConfig, resolve_blockdev

    drive = DriveConfig.parse(f"file={qcow},format=qcow2,l2-cache-size=128k")
    nodes = {
        "f": BlockdevConfig.parse(f"driver=file,node-name=f,filename={qcow}"),
        "q": BlockdevConfig.parse("driver=qcow2,node-name=q,file=f,l2-cache-size=196608"),
        "i": BlockdevConfig.parse(f"driver=qcow2,node-name=i,file.driver=file,file.filename={qcow},"
                                  "l2-cache-size=262144"),
    }
    # 64 KiB clusters: the cache holds that many L2 tables.
    for src, tables in ((drive.source, 2), (resolve_blockdev(nodes, "q", what="t"), 3),
                        (resolve_blockdev(nodes, "i", what="t"), 4)):
        img = await open_image_source(src)
        try:
            assert isinstance(img.backend, Qcow2Image)
            assert img.backend._l2_cap == tables
        finally:
            await img.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file=x.raw,format=raw,l2-cache-size=1M", "l2-cache-size is a qcow2 option"),
        ("file=x.qcow2,format=qcow2,l2-cache-size=lots", "invalid size 'lots'"),
        ("file=x.qcow2,format=qcow2,l2-cache-size=0", "must be positive"),
    ],
)
def test_bad_l2_cache_sizes_are_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    for name in ("x.raw", "x.qcow2"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ConfigError, match=message):
        DriveConfig.parse(text.replace("x.", f"{tmp_path}/x."))


@pytest.mark.parametrize(
    ("extra", "cache"),
    [("cache.direct=on", "none"), ("cache=none,cache.direct=off", "writeback"),
     ("cache.no-flush=on", "unsafe"), ("index=0,werror=report,rerror=report,detect-zeroes=off", "writeback"),
     ("cache=unsafe,copy-on-read=off", "unsafe")],
)
def test_drive_takes_qemus_finer_cache_and_policy_options(tmp_path: Path, extra: str, cache: str) -> None:
    (tmp_path / "d.raw").write_bytes(bytes(4096))
    assert DriveConfig.parse(f"file={tmp_path}/d.raw,format=raw,{extra}").source.cache == cache


@pytest.mark.parametrize(
    ("extra", "message"),
    [("cache.direct=on,cache.no-flush=on", "cache.no-flush=on is not supported"),
     ("cache=writethrough,cache.direct=on", "cannot be combined"),
     ("werror=stop", "werror=stop is not supported"), ("rerror=ignore", "rerror=ignore"),
     ("detect-zeroes=unmap", "detect-zeroes=unmap"), ("copy-on-read=on", "copy-on-read=on"),
     ("index=-1", "'index'")],
)
def test_drive_refuses_what_it_cannot_do_by_name(tmp_path: Path, extra: str, message: str) -> None:
    (tmp_path / "d.raw").write_bytes(bytes(4096))
    with pytest.raises(ConfigError, match=message):
        DriveConfig.parse(f"file={tmp_path}/d.raw,format=raw,{extra}")


@pytest.mark.parametrize(("aio", "kernel_aio"), [("threads", False), ("native", True)])
async def test_qcow2_honours_aio_as_qemu_means_it(tmp_path: Path, aio: str, kernel_aio: bool) -> None:
    from appliance.qcow2 import Qcow2Image

    q = tmp_path / "q.qcow2"
    q.write_bytes(build_image(CreateOptions(size=1 << 20)))
    src = DriveConfig.parse(f"file={q},format=qcow2,cache=none,aio={aio}").source
    try:
        img = await open_image_source(src)
    except ConfigError as err:  # a file system without O_DIRECT
        pytest.skip(f"O_DIRECT unavailable here: {err}")
    try:
        assert isinstance(img.backend, Qcow2Image)
        # threads: QEMU's default, a pool of preadv/pwritev; native: a kernel AIO context.
        assert (img.backend._aio is not None) == kernel_aio
    finally:
        await img.close()


def test_bare_booleans_as_qemu_takes_them(raw: Path) -> None:
    """``-drive ...,readonly,snapshot``: QEMU 7.2 reads bare keys as on (with a warning)."""
    cfg = DriveConfig.parse(f"file={raw},format=raw,if=none,id=d0,readonly,snapshot")
    assert (cfg.source.read_only, cfg.source.snapshot) == (True, True)
