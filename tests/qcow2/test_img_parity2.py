"""`appliance img` against qemu-img, second batch: cases a differential run of
both tools on the same inputs found apart (commit -b names, shrinking,
messages for missing files and backing files)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, needs_qemu_img
from tests.qcow2.helpers import qemu_io

pytestmark = needs_qemu_img


def img(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli.main", "img", *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def qimg(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], cwd=cwd, capture_output=True, text=True)


def both(tmp_path: Path, setup: Callable[[Path], None], *args: str) -> tuple[Path, Path]:
    """Run ``args`` through qemu-img in q/ and through us in o/, each over its own
    copy of what ``setup`` makes; the same stdout, stderr (less the program
    name) and exit code. Returns (q, o)."""
    q, o = tmp_path / "q", tmp_path / "o"
    for d in (q, o):
        d.mkdir()
        setup(d)
    theirs, ours = qimg(*args, cwd=q), img(*args, cwd=o)
    assert (ours.stdout, ours.stderr.replace("appliance img: ", "qemu-img: "), ours.returncode) == (
        theirs.stdout, theirs.stderr, theirs.returncode), args
    return q, o


def _chain(d: Path) -> None:
    (d / "sub" / "deeper").mkdir(parents=True)
    qimg("create", "-q", "-f", "raw", "base.raw", "4M", cwd=d)
    qimg("create", "-q", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", "sub/mid.qcow2", cwd=d)
    qemu_io(d / "sub" / "mid.qcow2", "write -P 2 1M 64k")
    qimg("create", "-q", "-f", "qcow2", "-b", "../mid.qcow2", "-F", "qcow2", "sub/deeper/top.qcow2", cwd=d)
    qemu_io(d / "sub" / "deeper" / "top.qcow2", "write -P 3 2M 64k")


@pytest.mark.parametrize("base", ["sub/mid.qcow2", "base.raw", "../mid.qcow2", "../base.raw"])
def test_commit_b_reads_a_relative_base_from_each_layers_directory(tmp_path: Path, base: str) -> None:
    # qemu-img finds the base as it finds a backing file: a relative name is
    # taken from the directory of the layer whose backing file it may be.
    q, o = both(tmp_path, _chain, "commit", "-b", base, "sub/deeper/top.qcow2")
    for name in ("base.raw", "sub/mid.qcow2"):
        assert qimg("compare", f"q/{name}", f"o/{name}", cwd=tmp_path).returncode == 0


def _compressed_tail(d: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "a.qcow2", "4M", cwd=d)
    qemu_io(d / "a.qcow2", "write -P 1 0 100k", "write -c -P 3 3M 512")


def _spread(d: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", "a.qcow2", "2G", cwd=d)
    qemu_io(d / "a.qcow2", "write -P 1 0 64k", "write -P 2 1500M 64k")


def _empty(d: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", "a.qcow2", "4M", cwd=d)


@pytest.mark.parametrize(("setup", "args"), [
    (_compressed_tail, ["resize", "--shrink", "a.qcow2", "3M"]),
    (_spread, ["resize", "--shrink", "a.qcow2", "700M"]),
    (_spread, ["amend", "-o", "size=512M", "a.qcow2"]),
    (_empty, ["resize", "--shrink", "a.qcow2", "1M"]),
])
def test_a_shrunk_image_frees_the_tables_past_its_end_and_its_file_tail(
        tmp_path: Path, setup: Callable[[Path], None], args: list[str]) -> None:
    # L2 tables wholly past the new end are freed and the file is cut after
    # its last used cluster; QEMU's discard of the tail takes the L2 table of
    # the entry the new end falls in even where there was none.
    q, o = both(tmp_path, setup, *args)
    checks = [qimg("check", "a.qcow2", cwd=d) for d in (q, o)]
    assert checks[0].stdout == checks[1].stdout and checks[1].returncode == 0
    assert (q / "a.qcow2").stat().st_size == (o / "a.qcow2").stat().st_size
    assert qimg("compare", "q/a.qcow2", "o/a.qcow2", cwd=tmp_path).returncode == 0


def _files(d: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", "a.qcow2", "4M", cwd=d)
    (d / "dir").mkdir()


@pytest.mark.parametrize("args", [
    ["info", "nothere"], ["check", "nothere"], ["map", "-f", "raw", "nothere"], ["snapshot", "-l", "nothere"],
    ["resize", "nothere", "1M"], ["amend", "-o", "compat=1.1", "nothere"], ["commit", "nothere"],
    ["compare", "a.qcow2", "nothere"], ["convert", "-O", "raw", "nothere", "o.raw"],
    ["convert", "-n", "-O", "raw", "a.qcow2", "nothere"], ["dd", "if=nothere", "of=o.raw"],
    ["create", "-f", "qcow2", "nodir/x.qcow2", "1M"], ["create", "-f", "raw", "nodir/x.raw", "1M"],
    ["convert", "-O", "raw", "a.qcow2", "nodir/o.raw"], ["convert", "-O", "raw", "a.qcow2", "dir"],
    ["info", "dir"], ["rebase", "-b", "nothere", "-F", "raw", "a.qcow2"],
    ["create", "-f", "qcow2", "-b", "nothere", "-F", "raw", "x.qcow2", "1M"],
])
def test_missing_files_are_named_in_qemu_imgs_words(tmp_path: Path, args: list[str]) -> None:
    both(tmp_path, _files, *args)


def _lost_chain(d: Path) -> None:
    (d / "s").mkdir()
    qimg("create", "-q", "-u", "-f", "qcow2", "-b", "../gone.qcow2", "-F", "qcow2", "s/nb.qcow2", "1M", cwd=d)
    qimg("create", "-q", "-u", "-f", "qcow2", "-b", "s/nb.qcow2", "-F", "qcow2", "top.qcow2", "1M", cwd=d)


@pytest.mark.parametrize("args", [
    ["resize", "top.qcow2", "2M"], ["resize", "s/nb.qcow2", "2M"], ["snapshot", "-c", "s", "top.qcow2"],
    ["snapshot", "-l", "s/nb.qcow2"], ["amend", "-o", "compat=0.10", "top.qcow2"], ["commit", "top.qcow2"],
    ["check", "top.qcow2"], ["map", "top.qcow2"], ["info", "--backing-chain", "top.qcow2"],
    ["create", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-b", "s/nb.qcow2", "-F", "qcow2", "x.qcow2"],
])
def test_a_missing_backing_file_anywhere_down_the_chain_stops_commands_that_open_it(
        tmp_path: Path, args: list[str]) -> None:
    # Named under every image above it; nothing written (resize, snapshot and
    # amend went ahead on the top image before).
    q, o = both(tmp_path, _lost_chain, *args)
    for name in ("top.qcow2", "s/nb.qcow2"):
        assert (q / name).read_bytes() == (o / name).read_bytes()
