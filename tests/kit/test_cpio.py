"""The newc cpio writer: what `cpio -t` and a re-parse see in its archives."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest

from appliance.kit.cpio import CpioWriter


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    entries = {}
    off = 0
    while True:
        assert data[off : off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[off + 110 : off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off : off + filesize]
        off += filesize
        off += -off % 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = (f[1], body, (f[9], f[10]))


def sample() -> bytes:
    w = CpioWriter()
    w.directory("bin")
    w.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    w.file("odd", b"abcde")
    w.symlink("bin/sh", "/bin/busybox")
    w.chardev("dev/console", 5, 1)
    return w.finish()


def test_entries_round_trip_with_types_modes_and_data() -> None:
    e = parse_newc(sample())
    assert e["bin"][0] == stat.S_IFDIR | 0o755
    assert e["bin/hello"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n", (0, 0))
    assert e["odd"][1] == b"abcde"
    assert e["bin/sh"] == (stat.S_IFLNK | 0o777, b"/bin/busybox", (0, 0))
    assert e["dev/console"] == (stat.S_IFCHR | 0o600, b"", (5, 1))


def test_archive_is_reproducible_and_4_byte_aligned() -> None:
    assert sample() == sample()
    assert len(sample()) % 4 == 0


def test_duplicate_names_are_refused() -> None:
    w = CpioWriter()
    w.file("a", b"")
    with pytest.raises(ValueError):
        w.file("/a", b"")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is not installed")
def test_gnu_cpio_lists_the_archive() -> None:
    out = subprocess.run(["cpio", "-t", "--quiet"], input=sample(), capture_output=True, check=True)
    assert out.stdout.decode().split() == ["bin", "bin/hello", "odd", "bin/sh", "dev/console"]
