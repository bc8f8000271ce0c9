"""`img convert` copying data file to file in the kernel (mapping scan + copy_file_range).

The output must be what the read-and-write path and qemu-img produce: same
bytes, same allocated ranges (zero blocks left out), a clean image.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.qcow2.image import copy_range
from tests.conftest import ROOT, needs_qemu_img
from tests.qcow2.helpers import check_clean, qemu_img, qemu_io

pytestmark = needs_qemu_img

MiB = 1 << 20


def img(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "appliance.cli.main", "img", *args], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"appliance img {' '.join(args)}: {r.stdout}{r.stderr}"


def data_ranges(path: Path, fmt: str) -> list[tuple[int, int]]:
    out = json.loads(qemu_img("map", "--output", "json", "-f", fmt, str(path)).stdout)
    ranges: list[tuple[int, int]] = []
    for e in out:
        if e["data"] and not e.get("zero", False):
            if ranges and ranges[-1][1] == e["start"]:
                ranges[-1] = (ranges[-1][0], e["start"] + e["length"])
            else:
                ranges.append((e["start"], e["start"] + e["length"]))
    return ranges


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Data, written zeroes, a hole, data again, and a tail that is not a whole cluster."""
    raw = tmp_path / "src.raw"
    size = 21 * MiB + 12 * 1024
    with open(raw, "wb") as f:
        f.truncate(size)
        f.write(os.urandom(3 * MiB + 4096))  # data ending past a cluster boundary
        f.write(bytes(2 * MiB))  # written zeroes: data to SEEK_DATA, zero to the scan
        f.seek(9 * MiB)
        f.write(os.urandom(MiB) + bytes(128 * 1024) + os.urandom(8192))
        f.seek(size - 5000)
        f.write(os.urandom(5000))
    return raw


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4096"], ["-o", "cluster_size=512"]])
def test_raw_to_qcow2_matches_qemu_img(source: Path, tmp_path: Path, opts: list[str]) -> None:
    ours, theirs, slow = tmp_path / "o.qcow2", tmp_path / "q.qcow2", tmp_path / "u.qcow2"
    img("convert", "-f", "raw", "-O", "qcow2", *opts, str(source), str(ours))
    # -U: the source may be changing, so the read-and-write path.
    img("convert", "-U", "-f", "raw", "-O", "qcow2", *opts, str(source), str(slow))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *opts, str(source), str(theirs))
    for out in (ours, slow):
        check_clean(out)
        assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(source), str(out),
                        check=False).returncode == 0
        assert data_ranges(out, "qcow2") == data_ranges(theirs, "qcow2")


def test_qcow2_to_raw_and_qcow2_match_qemu_img(source: Path, tmp_path: Path) -> None:
    # A qcow2 source whose clusters are not in guest order in the file, with a
    # compressed cluster and a backing file underneath part of it.
    base = tmp_path / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(source), str(base))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    qemu_io(top, "write -P 0x11 18M 1M", "write -P 0x22 0 64k", "write -z 9M 64k",
            "write -c -P 0x33 20M 64k", "write -P 0x44 12M 2M")
    for fmt in ("raw", "qcow2"):
        ours, slow = tmp_path / f"o.{fmt}", tmp_path / f"u.{fmt}"
        theirs = tmp_path / f"q.{fmt}"
        img("convert", "-f", "qcow2", "-O", fmt, str(top), str(ours))
        img("convert", "-U", "-f", "qcow2", "-O", fmt, str(top), str(slow))
        qemu_img("convert", "-f", "qcow2", "-O", fmt, str(top), str(theirs))
        for out in (ours, slow):
            assert qemu_img("compare", "-F", fmt, str(top), str(out),
                            check=False).returncode == 0
            assert data_ranges(out, fmt) == data_ranges(theirs, fmt)
        if fmt == "qcow2":
            check_clean(ours)


def test_convert_onto_existing_target_zeroes_the_gaps(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.raw"
    out.write_bytes(b"\xff" * os.path.getsize(source))
    img("convert", "-n", "-f", "raw", "-O", "raw", str(source), str(out))
    assert out.read_bytes() == source.read_bytes()


def test_copy_range_falls_back_to_read_and_write(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "a", tmp_path / "b"
    data = os.urandom(3 * MiB + 100)
    src.write_bytes(data)
    dst.write_bytes(bytes(4 * MiB))

    def refuse(*_: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
    try:
        copy_range(sfd, 100, dfd, 4096, len(data) - 100)
        # Past the end of a source that shrank: zeroes.
        copy_range(sfd, len(data) - 10, dfd, 0, 20)
    finally:
        os.close(sfd)
        os.close(dfd)
    got = dst.read_bytes()
    assert got[4096 : 4096 + len(data) - 100] == data[100:]
    assert got[:20] == data[-10:] + bytes(10)
