"""Image locking: two writers are refused, by us and by QEMU, both ways."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.storage.errors import BackendOpenError, ImageLockedError
from appliance.storage.raw import open_raw

needs_qemu_io = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io is not installed")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "img.raw"
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    return p


def test_second_writer_is_refused(image: Path) -> None:
    a = open_raw(image)
    with pytest.raises(ImageLockedError) as info:
        open_raw(image)
    assert isinstance(info.value, BackendOpenError)
    assert '"write" lock' in str(info.value) and "\n" not in str(info.value)
    a.close_now()
    open_raw(image).close_now()  # closing released the locks


def test_reader_and_writer_exclude_each_other(image: Path) -> None:
    r = open_raw(image, read_only=True)
    with pytest.raises(ImageLockedError):
        open_raw(image)
    r.close_now()
    w = open_raw(image)
    with pytest.raises(ImageLockedError):
        open_raw(image, read_only=True)
    w.close_now()


def test_readers_share(image: Path) -> None:
    a = open_raw(image, read_only=True)
    b = open_raw(image, read_only=True)
    a.close_now()
    b.close_now()


def test_locking_off_skips_the_check(image: Path) -> None:
    a = open_raw(image)
    b = open_raw(image, locking=False)
    a.close_now()
    b.close_now()


@pytest.fixture
def qemu_io_writer(image: Path) -> Iterator[subprocess.Popen[str]]:
    """qemu-io holding the image open for writing, waiting on stdin."""
    proc = subprocess.Popen(
        ["qemu-io", "-f", "raw", str(image)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdin is not None
    # A command round trip proves the image is open (and locked) by now.
    proc.stdin.write("write -P 0x5a 0 512\n")
    proc.stdin.flush()
    assert proc.stdout is not None
    deadline = time.monotonic() + 10
    while "wrote" not in (proc.stdout.readline() or ""):
        assert time.monotonic() < deadline and proc.poll() is None
    yield proc
    proc.stdin.write("quit\n")
    proc.stdin.close()
    proc.wait(10)


@needs_qemu_io
def test_qemu_io_writer_blocks_our_writer(image: Path, qemu_io_writer: subprocess.Popen[str]) -> None:
    with pytest.raises(ImageLockedError):
        open_raw(image)


@needs_qemu_io
def test_our_writer_blocks_qemu_io(image: Path) -> None:
    w = open_raw(image)
    try:
        res = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "read 0 512", str(image)],
            capture_output=True, text=True, timeout=30,
        )
        assert res.returncode != 0
        assert "lock" in (res.stdout + res.stderr)
        # With force-share (-U) a read-only qemu-io is let in, as with QEMU.
        res = subprocess.run(
            ["qemu-io", "-r", "-U", "-f", "raw", "-c", "read 0 512", str(image)],
            capture_output=True, text=True, timeout=30,
        )
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        w.close_now()
    res = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read 0 512", str(image)],
        capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 0, res.stdout + res.stderr
