"""`appliance img` against qemu-img, second batch: cases a differential run of
both tools on the same inputs found apart (commit -b names, shrinking,
messages for missing files and backing files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, needs_qemu_img
from tests.qcow2.helpers import qemu_io
from tests.qcow2.test_img_parity import img, qimg

pytestmark = needs_qemu_img


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


def _one_line(stderr: str) -> str:
    """qemu-img's message as ours gives it: one line, no program name, no --help hint."""
    lines = [ln.removeprefix("qemu-img: ").removeprefix("appliance img: ") for ln in stderr.splitlines()
             if not ln.startswith("Try 'qemu-img --help'")]
    return " ".join(lines)


def _image(d: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", "a.qcow2", "4M", cwd=d)
    qimg("create", "-q", "-f", "raw", "r.raw", "1M", cwd=d)


@pytest.mark.parametrize("args", [
    ["info"], ["info", "a.qcow2", "r.raw"], ["check", "-r", "bogus", "a.qcow2"], ["map", "--output=xml", "a.qcow2"],
    ["info", "--bogus", "a.qcow2"], ["create", "-f", "qcow2", "n.qcow2", "1M", "extra"], ["resize", "a.qcow2"],
    ["compare", "a.qcow2"], ["create", "-f", "qcow2", "n.qcow2", "1x"], ["create", "-f", "qcow2", "n.qcow2", "9E"],
    ["create", "-f", "qcow2", "n.qcow2", "-1"], ["measure", "-O", "raw", "--size", "1x"],
    ["map", "--start-offset=x", "a.qcow2"], ["map", "--max-length=-1", "a.qcow2"], ["resize", "a.qcow2", "1x"],
    ["snapshot", "-l", "-c", "s", "a.qcow2"], ["snapshot", "-c", "x", "-c", "y", "a.qcow2"], ["rebase", "a.qcow2"],
    ["convert", "--target-image-opts", "a.qcow2", "driver=qcow2,file.filename=r.raw"], ["convert", "a.qcow2"],
    ["create", "-f", "raw", "-o", "cluster_size=64k", "n.raw", "1M"], ["create", "-f", "qcow2", "n.qcow2"],
    # Bad numbers in qemu-img's words, not a traceback (int() and indexing on user text).
    ["create", "-f", "qcow2", "-o", "refcount_bits=abc", "n.qcow2", "10M"],
    ["create", "-f", "qcow2", "-o", "refcount_bits=99999999999999999999", "n.qcow2", "1M"],
    ["convert", "-O", "qcow2", "-o", "refcount_bits=abc", "a.qcow2", "o.qcow2"],
    ["create", "-f", "qcow2", "-o", "cluster_size=4kb", "n.qcow2", "1M"],
    ["create", "-f", "raw", "-o", "size=x", "n.raw"],
    ["resize", "a.qcow2", ""], ["resize", "a.qcow2", "+"], ["resize", "a.qcow2", "99999999999999999999"],
    ["amend", "-o", "size=abc", "a.qcow2"], ["amend", "-o", "refcount_bits=abc", "a.qcow2"],
    ["info", "a.qcow2", ""], ["convert", "-m", "abc", "a.qcow2", "o.raw"],
    ["convert", "-m", "0x11", "a.qcow2", "o.raw"],
    ["convert", "-S", "1000", "a.qcow2", "o.raw"], ["convert", "-S", "abc", "a.qcow2", "o.raw"],
    ["convert", "-r", "99999999999999999999", "a.qcow2", "o.raw"], ["bench", "-c", "abc", "a.qcow2"],
    ["bench", "-d", "-1", "a.qcow2"], ["bench", "-w", "--pattern=0x100", "a.qcow2"],
    ["bench", "-w", "--flush-interval=1e3", "a.qcow2"], ["bench", "-S", "2147483648", "a.qcow2"],
    ["bitmap", "--add", "-g", "abc", "a.qcow2", "b1"], ["dd", "if=a.qcow2", "of=o.raw", "count=1.5"],
    # QEMU's size syntax: no "B" after a suffix, no underscores, a fraction only before a
    # suffix, nothing after the number, no exponent.
    ["create", "-f", "raw", "n.raw", "10KB"], ["create", "-f", "raw", "n.raw", "1kb"],
    ["create", "-f", "raw", "n.raw", "1_000"], ["create", "-f", "raw", "n.raw", "1.5"],
    ["create", "-f", "raw", "n.raw", "0.5"], ["create", "-f", "raw", "n.raw", ".5k"],
    ["create", "-f", "raw", "n.raw", "1M "], ["create", "-f", "raw", "n.raw", "1e3"],
    ["create", "-f", "raw", "n.raw", "0x1.5"], ["create", "-f", "raw", "n.raw", "18446744073709551616"],
    ["resize", "a.qcow2", "10KB"], ["resize", "a.qcow2", "1.5"], ["map", "--start-offset", "1.5", "a.qcow2"],
    ["measure", "--size", "1_000", "-O", "qcow2"], ["create", "-f", "raw", "n.raw", "99999999999999999999k"],
    ["resize", "a.qcow2", "+8E"], ["resize", "a.qcow2", "9E"],
    # getopt_long: an ambiguous abbreviation is an unknown option.
    ["info", "--fo", "a.qcow2"], ["map", "--f=qcow2", "a.qcow2"],
    # convert's -o as its target format's option parser takes them.
    ["convert", "-O", "raw", "-o", "cluster_size=4k", "a.qcow2", "o.raw"],
    ["convert", "-O", "raw", "-o", "nocow=maybe", "a.qcow2", "o.raw"],
    ["convert", "-O", "raw", "-o", "size=abc", "a.qcow2", "o.raw"],
    ["convert", "-O", "raw", "-o", "cluster_size=4k,foo=bar", "a.qcow2", "o.raw"],
])
def test_refused_command_lines_in_qemu_imgs_words(tmp_path: Path, args: list[str]) -> None:
    # The project's exit code for a refused command line is 2 (qemu-img's 1).
    _image(tmp_path)
    ours, theirs = img(*args, cwd=tmp_path), qimg(*args, cwd=tmp_path)
    assert (ours.returncode, theirs.returncode) == (2, 1)
    assert _one_line(ours.stderr) == _one_line(theirs.stderr)
    assert ours.stdout == theirs.stdout == ""


def _snapshotted(d: Path) -> None:
    _image(d)
    qimg("snapshot", "-c", "s1", "a.qcow2", cwd=d)


@pytest.mark.parametrize("args", [
    ["snapshot", "-d", "1", "a.qcow2"], ["snapshot", "-c", "", "a.qcow2"], ["snapshot", "-a", "", "a.qcow2"],
    ["snapshot", "a.qcow2"], ["map", "-f", "qcow2", "r.raw"], ["check", "-f", "qcow2", "r.raw"], ["commit", "r.raw"],
    ["rebase", "-u", "-b", "r.raw", "-F", "bogus", "a.qcow2"], ["rebase", "-u", "-b", "", "-F", "bogus", "a.qcow2"],
    ["rebase", "-u", "-b", "r.raw", "-F", "vmdk", "a.qcow2"], ["rebase", "-u", "a.qcow2"],
])
def test_snapshot_rebase_and_format_answers_as_qemu_img(tmp_path: Path, args: list[str]) -> None:
    # -d takes a name only (not an id); -c '' makes a snapshot named ''; no
    # action lists nothing; -F takes any format QEMU knows and refuses others.
    q, o = both(tmp_path, _snapshotted, *args)
    ids = [[ln.split()[:2] for ln in qimg("snapshot", "-l", "a.qcow2", cwd=d).stdout.splitlines()[2:]]
           for d in (q, o)]
    assert ids[0] == ids[1]
    infos = [qimg("info", "-U", "a.qcow2", cwd=d).stdout for d in (q, o)]
    assert [ln for ln in infos[0].splitlines() if "backing" in ln] == [
        ln for ln in infos[1].splitlines() if "backing" in ln]


def _dirty(d: Path) -> None:
    # A writer killed with lazy refcounts on leaves the dirty bit and refcounts behind.
    qimg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "a.qcow2", "4M", cwd=d)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 128k", "-c", "sigraise 9", "a.qcow2"],
                   cwd=d, capture_output=True)


@pytest.mark.parametrize("args", [
    ["info", "a.qcow2"], ["resize", "a.qcow2", "8M"], ["amend", "-o", "lazy_refcounts=off", "a.qcow2"],
    ["snapshot", "-c", "s", "a.qcow2"], ["rebase", "-u", "-b", "", "a.qcow2"],
])
def test_a_dirty_image_opened_for_writing_is_repaired_saying_what_qemu_img_says(
        tmp_path: Path, args: list[str]) -> None:
    # info says 'cleanly shut down: no'; a writer first runs the repairing check
    # QEMU runs on open and prints its findings.
    q, o = both(tmp_path, _dirty, *args)
    checks = [qimg("check", "a.qcow2", cwd=d) for d in (q, o)]
    assert (checks[0].stdout, checks[0].returncode) == (checks[1].stdout, checks[1].returncode)


def _odd_raw(d: Path) -> None:
    (d / "odd.raw").write_bytes(b"abcdefgh" * 125)  # 1000 bytes: not whole sectors
    (d / "one.raw").write_bytes(b"x")
    qimg("create", "-q", "-f", "qcow2", "-b", "odd.raw", "-F", "raw", "top.qcow2", cwd=d)
    qimg("create", "-q", "-f", "qcow2", "a.qcow2", "1M", cwd=d)


@pytest.mark.parametrize("args", [
    ["map", "--output=json", "odd.raw"], ["map", "--output=json", "-f", "raw", "--start-offset=512", "odd.raw"],
    ["map", "--output=json", "top.qcow2"], ["compare", "top.qcow2", "odd.raw"], ["compare", "-s", "odd.raw", "one.raw"],
    ["map", "--output=json", "--start-offset=512", "one.raw"], ["map", "--output=json", "--start-offset=2M", "a.qcow2"],
    ["map", "--output=json", "--start-offset=1M", "a.qcow2"],
])
def test_a_raw_file_counts_in_whole_sectors_and_maps_past_the_end_as_qemu_img(
        tmp_path: Path, args: list[str]) -> None:
    both(tmp_path, _odd_raw, *args)


def _convert_source(d: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=16k,extended_l2=on", "a.qcow2", "8M", cwd=d)
    qemu_io(d / "a.qcow2", "write -P 1 0 100k", "write -z 1M 64k", "write -P 2 2M 1k", "write -P 3 5M 1M")


@pytest.mark.parametrize("opts", [[], ["-c"], ["-o", "cluster_size=4k"], ["-c", "-o", "compression_type=zstd"]])
def test_convert_lays_out_the_target_as_qemu_img_does(tmp_path: Path, opts: list[str]) -> None:
    # Each L2 table ahead of the data it maps, writes in disk order, and with
    # -c every cluster holding data compressed whole (a partial one too):
    # check's fragmentation and compression figures come out the same.
    q, o = both(tmp_path, _convert_source, "convert", "-O", "qcow2", *opts, "a.qcow2", "b.qcow2")
    checks = [qimg("check", "b.qcow2", cwd=d).stdout for d in (q, o)]
    assert checks[0] == checks[1]
    assert qimg("compare", "q/b.qcow2", "o/b.qcow2", cwd=tmp_path).returncode == 0


def _three(d: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", "base.qcow2", "8M", cwd=d)
    qemu_io(d / "base.qcow2", "write -P 1 0 2M", "write -P 9 6M 64k")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=d)
    qemu_io(d / "top.qcow2", "write -P 3 1536k 64k", "write -z 0 64k", "discard 6M 64k")
    qimg("create", "-q", "-f", "qcow2", "t.qcow2", "8M", cwd=d)


@pytest.mark.parametrize("args", [
    ["commit", "top.qcow2"], ["commit", "-d", "top.qcow2"], ["commit", "-b", "base.qcow2", "top.qcow2"],
    ["convert", "-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "o.qcow2"],
    ["convert", "-O", "qcow2", "-o", "backing_file=base.qcow2", "top.qcow2", "o.qcow2"],
    ["convert", "-n", "--target-image-opts", "top.qcow2", "driver=qcow2,file.filename=t.qcow2"],
    ["convert", "-n", "--target-image-opts", "top.qcow2", "t.qcow2"],
])
def test_commit_and_convert_targets_end_as_qemu_imgs(tmp_path: Path, args: list[str]) -> None:
    # commit empties a version 3 top by laying it out afresh (its file cut to
    # four clusters) and unmaps what it zeroes in the base; convert wants -F
    # with -B and takes --target-image-opts with -n.
    q, o = both(tmp_path, _three, *args)
    for name in ("base.qcow2", "top.qcow2", "t.qcow2"):
        checks = [qimg("check", name, cwd=d).stdout for d in (q, o)]
        assert checks[0] == checks[1], name
        assert qimg("compare", f"q/{name}", f"o/{name}", cwd=tmp_path).returncode == 0


def _json(driver: str, name: str) -> str:
    import json

    return "json:" + json.dumps({"driver": driver, "file": {"driver": "file", "filename": name}},
                                separators=(",", ":"))


def _json_backed(d: Path) -> None:
    (d / "sub").mkdir()
    qimg("create", "-q", "-f", "raw", "jb.raw", "4M", cwd=d)
    qemu_io(d / "jb.raw", "write -P 1 0 1M", fmt="raw")
    qimg("create", "-q", "-f", "qcow2", "-b", _json("raw", "jb.raw"), "-F", "raw", "sub/j.qcow2", cwd=d)
    # From d: the JSON names its file relative to the working directory.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 64k", "sub/j.qcow2"], cwd=d,
                   check=True, capture_output=True)


@pytest.mark.parametrize("args", [
    ["info", "--backing-chain", "sub/j.qcow2"], ["info", "--output=json", "sub/j.qcow2"],
    ["map", "--output=json", "sub/j.qcow2"], ["compare", "sub/j.qcow2", "jb.raw"], ["commit", "sub/j.qcow2"],
    ["create", "-f", "qcow2", "-b", _json("raw", "jb.raw"), "-F", "raw", "n.qcow2"],
    ["create", "-f", "qcow2", "-b", _json("raw", "jb.raw"), "n.qcow2"],
    ["info", _json("qcow2", "sub/j.qcow2")], ["info", _json("qcow2", "nothere")],
    ["snapshot", "-l", _json("qcow2", "sub/j.qcow2")],
])
def test_json_filenames_as_images_and_backing_files(tmp_path: Path, args: list[str]) -> None:
    # A backing file recorded as json:{...} is opened from what it names (not
    # next to the overlay) and shown as recorded; an image argument in that
    # form is the file it names. Commas in the Formatting line are doubled.
    q, o = both(tmp_path, _json_backed, *args)
    assert qimg("compare", "q/jb.raw", "o/jb.raw", cwd=tmp_path).returncode == 0


def _narrow(d: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", "a.qcow2", "16M", cwd=d)
    qemu_io(d / "a.qcow2", "write -P 1 0 3M")
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "16M", cwd=d)


@pytest.mark.parametrize("args", [
    ["bitmap", "--remove", "v2.qcow2", "b0"], ["bitmap", "--clear", "v2.qcow2", "b0"],
    ["dd", "-O", "qcow2", "if=a.qcow2", "of=o.qcow2", "bs=64k", "skip=3"],
])
def test_v2_bitmaps_and_dd_targets_as_qemu_img(tmp_path: Path, args: list[str]) -> None:
    # A version 2 image has no bitmap to change; dd's qcow2 target gets its L2 table first.
    q, o = both(tmp_path, _narrow, *args)
    for name in ("a.qcow2", "o.qcow2"):
        if (q / name).exists():
            checks = [qimg("check", name, cwd=d) for d in (q, o)]
            assert (checks[0].stdout, checks[0].returncode) == (checks[1].stdout, checks[1].returncode)


def _snapshotted_narrow(d: Path) -> None:
    # Two snapshots fill 2-bit refcounts; then the first L2 table is rewritten,
    # so a third snapshot counts that table and its data once more before it
    # meets the second table, whose count would overflow.
    qimg("create", "-q", "-f", "qcow2", "-o", "refcount_bits=2", "a.qcow2", "1G", cwd=d)
    qemu_io(d / "a.qcow2", "write -P 1 0 64k", "write -P 2 512M 64k")
    for name in ("s1", "s2"):
        qimg("snapshot", "-c", name, "a.qcow2", cwd=d)
    qemu_io(d / "a.qcow2", "write -P 3 0 64k")
    (d / "n.qcow2").write_bytes((d / "a.qcow2").read_bytes())
    qimg("snapshot", "-c", "s1", "n.qcow2", cwd=d)  # 1-bit refcounts: fails at once


@pytest.mark.parametrize("args", [
    ["snapshot", "-c", "s3", "a.qcow2"], ["snapshot", "-a", "s1", "a.qcow2"],
])
def test_a_failed_snapshot_operation_leaves_the_image_clean(tmp_path: Path, args: list[str]) -> None:
    # QEMU's EINVAL in qemu-img's words; then the image is as it was: its
    # dirty bit clear (lazy refcounts are off) and no count left raised, where
    # qemu-img leaves leaks and COPIED flags that no longer match.
    q, o = both(tmp_path, _snapshotted_narrow, *args)
    info = qimg("info", "a.qcow2", cwd=o).stdout
    assert "cleanly shut down" not in info and "s3" not in info
    check = qimg("check", "a.qcow2", cwd=o)
    assert check.returncode == 0 and check.stdout.startswith("No errors were found"), check.stdout
    assert qimg("compare", "q/a.qcow2", "o/a.qcow2", cwd=tmp_path).returncode == 0
    # Still usable: no repair on the next writable open, and a snapshot that fits goes in.
    r = img("snapshot", "-d", "s2", "a.qcow2", cwd=o)
    assert (r.returncode, r.stderr) == (0, "")
    assert img("snapshot", "-c", "s3", "a.qcow2", cwd=o).returncode == 0
    assert qimg("check", "a.qcow2", cwd=o).returncode == 0


@pytest.mark.parametrize("args", [
    ["create", "-f", "raw", "-o", "nocow=on,preallocation=falloc", "n.raw", "1M"],
    ["create", "-f", "qcow2", "-o", "nocow=off,preallocation=metadata", "n.qcow2", "1M"],
])
def test_create_takes_nocow_and_says_so_as_qemu_img(tmp_path: Path, args: list[str]) -> None:
    both(tmp_path, lambda d: None, *args)


def _sizes(d: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", "a.qcow2", "1M", cwd=d)
    qemu_io(d / "a.qcow2", "write -P 1 0 64k", "write -P 2 960k 64k")


@pytest.mark.parametrize("args", [
    ["create", "-f", "raw", "n.raw", "0x100000"], ["create", "-f", "raw", "n.raw", "0X100000"],
    ["create", "-f", "raw", "n.raw", "0x1k"], ["create", "-f", "raw", "n.raw", " 1M"],
    ["create", "-f", "raw", "n.raw", "+1M"], ["create", "-f", "raw", "n.raw", "1.5k"],
    ["create", "-f", "raw", "n.raw", "1.k"], ["create", "-f", "raw", "n.raw", "1.0"],
    ["create", "-f", "raw", "n.raw", "0.5k"], ["create", "-f", "raw", "n.raw", "0010k"],
    ["create", "-f", "qcow2", "-o", "cluster_size=0x1000,size=0x100000", "n.qcow2"],
    ["create", "-f", "qcow2", "-o", "refcount_bits=0x10", "n.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "refcount_bits=-1", "n.qcow2", "1M"],
    ["resize", "a.qcow2", "0x200000"], ["resize", "a.qcow2", "+0x1000"], ["resize", "a.qcow2", "++1M"],
    ["resize", "a.qcow2", "+1.5k"],
    ["map", "--output=json", "--start-offset", "0x1000", "a.qcow2"],
    ["map", "--output=json", "--max-length=0x10000", "a.qcow2"], ["measure", "--size", "0x100000", "-O", "qcow2"],
    ["amend", "-o", "size=0x200000", "a.qcow2"], ["convert", "-S", "0x1000", "-m", "0x4", "a.qcow2", "o.raw"],
    ["bitmap", "--add", "-g", "0x10000", "a.qcow2", "b1"], ["dd", "bs=0x200", "count=010", "if=a.qcow2", "of=o.raw"],
])
def test_sizes_in_qemus_syntax(tmp_path: Path, args: list[str]) -> None:
    # qemu_strtosz: hexadecimal, a fraction before a suffix, leading blanks and
    # "+"; C's strtoull for the counts and -o numbers (0x, octal 0…).
    q, o = both(tmp_path, _sizes, *args)
    for name in ("n.raw", "n.qcow2", "a.qcow2", "o.raw"):
        if (q / name).exists():
            infos = [qimg("info", "--output=json", name, cwd=d).stdout for d in (q, o)]
            assert [json.loads(i)["virtual-size"] for i in infos][0] == json.loads(infos[1])["virtual-size"]
            assert qimg("compare", f"q/{name}", f"o/{name}", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("args", [
    ["create", "n.qcow2", "-f", "qcow2", "1M"], ["create", "-f", "qcow2", "n.qcow2", "-o", "cluster_size=4k", "1M"],
    ["bitmap", "a.qcow2", "--add", "b1"], ["bitmap", "--add", "a.qcow2", "-g", "64k", "b1"],
    ["dd", "if=a.qcow2", "-O", "qcow2", "of=o.qcow2"], ["info", "a.qcow2", "--out=json", "--back"],
    ["check", "--rep=leaks", "--out=json", "a.qcow2"], ["map", "a.qcow2", "--output", "json", "-f", "qcow2"],
    ["info", "--format=qcow2", "a.qcow2"], ["compare", "a.qcow2", "-f", "qcow2", "a.qcow2"],
    ["resize", "a.qcow2", "--shr", "512k"],
])
def test_options_among_and_after_the_file_names_and_cut_short(tmp_path: Path, args: list[str]) -> None:
    # GNU getopt permutes, and getopt_long takes a long option cut to any prefix
    # that names only one.
    q, o = both(tmp_path, _sizes, *args)
    for name in ("n.qcow2", "a.qcow2", "o.qcow2"):
        if (q / name).exists():
            infos = [json.loads(qimg("info", "--output=json", name, cwd=d).stdout) for d in (q, o)]
            assert [_drop_sizes(i) for i in infos[:1]] == [_drop_sizes(infos[1])]
            assert qimg("compare", f"q/{name}", f"o/{name}", cwd=tmp_path).returncode == 0


def _drop_sizes(info: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in info.items() if k not in ("actual-size", "dirty-flag")}


@pytest.mark.parametrize("args", [
    ["convert", "-O", "raw", "-o", "preallocation=bogus", "a.qcow2", "o.raw"],
    ["convert", "-O", "raw", "-o", "preallocation=metadata", "a.qcow2", "o.raw"],
    ["convert", "-O", "raw", "-o", "preallocation=falloc,nocow=on,size=2M", "a.qcow2", "o.raw"],
    ["convert", "-O", "qcow2", "-o", "preallocation=bogus", "a.qcow2", "o.qcow2"],
    ["convert", "-O", "qcow2", "-o", "compat=9", "a.qcow2", "o.qcow2"],
    ["create", "-f", "raw", "-o", "preallocation=bogus", "o.raw", "1M"],
    ["create", "-f", "raw", "-o", "preallocation=metadata", "o.raw", "1M"],
])
def test_convert_checks_the_targets_options_as_create_does(tmp_path: Path, args: list[str]) -> None:
    # What the format's creation refuses comes after the file is named (convert:
    # "error while converting"); metadata preallocation leaves raw's file empty.
    q, o = both(tmp_path, _sizes, *args)
    for name in ("o.raw", "o.qcow2"):
        assert (q / name).exists() == (o / name).exists(), name
        if (q / name).exists():
            assert (q / name).stat().st_size == (o / name).stat().st_size


def _damaged(d: Path) -> None:
    import struct

    qimg("create", "-q", "-f", "qcow2", "z.qcow2", "4M", cwd=d)
    qimg("create", "-q", "-f", "qcow2", "big.qcow2", "8M", cwd=d)
    qimg("create", "-q", "-f", "qcow2", "c.qcow2", "8M", cwd=d)
    qemu_io(d / "big.qcow2", "write -P 1 0 128k")
    qemu_io(d / "c.qcow2", "write -P 1 0 128k", "write -c -P 7 128k 64k", "write -P 2 3M 64k")
    qimg("create", "-q", "-f", "qcow2", "u.qcow2", "4M", cwd=d)
    qemu_io(d / "u.qcow2", "write -P 7 0 64k")
    with open(d / "c.qcow2", "r+b") as f:  # the compressed cluster's bytes no longer inflate
        head = f.read(48)
        cb = struct.unpack(">I", head[20:24])[0]
        f.seek(struct.unpack(">Q", head[40:48])[0])
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 16)
        f.seek(struct.unpack(">Q", f.read(8))[0] & ((1 << (62 - (cb - 8))) - 1))
        f.write(b"\xff" * 64)
    with open(d / "u.qcow2", "r+b") as f:  # a data cluster at an unaligned offset
        head = f.read(48)
        f.seek(struct.unpack(">Q", head[40:48])[0])
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(l2)
        f.write(struct.pack(">Q", entry | 0x200))


@pytest.mark.parametrize(("args", "code"), [
    (["compare", "c.qcow2", "big.qcow2"], 4), (["compare", "big.qcow2", "c.qcow2"], 4),
    (["compare", "c.qcow2", "z.qcow2"], 1), (["compare", "-p", "c.qcow2", "c.qcow2"], 4),
    (["compare", "z.qcow2", "u.qcow2"], 3), (["compare", "-s", "u.qcow2", "z.qcow2"], 3),
])
def test_compare_exit_codes_for_unreadable_images(tmp_path: Path, args: list[str], code: int) -> None:
    # qemu-img's documented codes: 3 when a block status fails, 4 when a read
    # does, named at the start of the piece it was reading; a difference before
    # the damaged piece is still a difference (1).
    q, o = tmp_path / "q", tmp_path / "o"
    for d in (q, o):
        d.mkdir()
        _damaged(d)
    theirs, ours = qimg(*args, cwd=q), img(*args, cwd=o)
    assert (ours.returncode, theirs.returncode) == (code, code)
    assert ours.stdout == theirs.stdout
    # qemu-img also prints its driver's corruption event before the last line.
    assert ours.stderr.replace("appliance img: ", "qemu-img: ") == "".join(
        ln for ln in theirs.stderr.splitlines(keepends=True) if not ln.startswith("qcow2: "))


@pytest.mark.parametrize("args", [
    ["bench", "-c", "4", "-o", "2M", "a.qcow2"], ["bench", "-c", "4", "-o", "1M", "a.qcow2"],
    ["bench", "-c", "4", "-s", "2M", "a.qcow2"], ["bench", "-w", "-c", "4", "-o", "1M", "a.qcow2"],
    ["bench", "-c", "1000", "-s", "3000", "a.qcow2"],
])
def test_bench_requests_past_the_end_fail_as_in_qemu_img(tmp_path: Path, args: list[str]) -> None:
    # 7.2 wraps at the image's end: a request that then runs past it fails (EIO).
    both(tmp_path, _sizes, *args)


def test_bench_runs_zero_requests_and_those_that_end_at_the_end(tmp_path: Path) -> None:
    _sizes(tmp_path)
    for args in (["bench", "-c", "0", "a.qcow2"], ["bench", "-c", "0x4", "-o", "1020k", "a.qcow2"]):
        ours, theirs = img(*args, cwd=tmp_path), qimg(*args, cwd=tmp_path)
        assert ours.returncode == theirs.returncode == 0, ours.stderr
        assert ours.stdout.splitlines()[0] == theirs.stdout.splitlines()[0]
        assert ours.stdout.splitlines()[1].startswith("Run completed in ")


def _progress(d: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", "p.qcow2", "64M", cwd=d)
    qemu_io(d / "p.qcow2", "write -P 1 0 8M", "write -P 2 40M 8M")
    (d / "p2.qcow2").write_bytes((d / "p.qcow2").read_bytes())
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1M", cwd=d)
    qimg("create", "-q", "-f", "qcow2", "b.qcow2", "64M", cwd=d)
    qimg("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2", cwd=d)
    qemu_io(d / "t.qcow2", "write -P 3 0 4M")


@pytest.mark.parametrize("args", [
    ["compare", "-p", "p.qcow2", "p2.qcow2"], ["compare", "-p", "p.qcow2", "t.qcow2"],
    ["compare", "-p", "p.qcow2", "nothere"], ["compare", "-p", "-q", "p.qcow2", "p2.qcow2"],
    ["amend", "-p", "-o", "compat=0.10", "p.qcow2"], ["amend", "-p", "-o", "compat=1.1", "v2.qcow2"],
    ["amend", "-p", "-o", "lazy_refcounts=on", "p.qcow2"], ["amend", "-p", "-o", "size=128M", "p.qcow2"],
    ["amend", "-p", "-o", "compat=2", "p.qcow2"], ["amend", "-p", "-q", "-o", "compat=0.10", "p.qcow2"],
    ["convert", "-p", "-O", "raw", "p.qcow2", "o.raw"], ["convert", "-p", "-O", "raw", "b.qcow2", "o.raw"],
    ["rebase", "-p", "-b", "", "t.qcow2"], ["rebase", "-p", "-u", "-b", "", "t.qcow2"],
])
def test_progress_as_qemu_img_prints_it(tmp_path: Path, args: list[str]) -> None:
    # "    (0.00/100%)\r" first, a figure whenever it moved past the last by the
    # command's step, and a newline at the end (after compare's verdict): the
    # same bytes, carriage returns included.
    q, o = tmp_path / "q", tmp_path / "o"
    for d in (q, o):
        d.mkdir()
        _progress(d)
    theirs, ours = _bytes(["qemu-img", *args], q), _bytes(_IMG + args, o)
    assert (ours.stdout, ours.returncode) == (theirs.stdout, theirs.returncode)
    assert ours.stderr.replace(b"appliance img: ", b"qemu-img: ") == theirs.stderr


def test_amend_progress_of_work_done_in_steps_and_of_refused_options(tmp_path: Path) -> None:
    _progress(tmp_path)
    ours = _bytes(_IMG + ["amend", "-p", "-o", "refcount_bits=8", "p.qcow2"], tmp_path)
    assert ours.returncode == 0
    assert ours.stdout.startswith(b"    (0.00/100%)\r") and ours.stdout.endswith(b"    (100.00/100%)\r\n")
    for opt in ("foo=bar", "refcount_bits=abc"):  # refused before the 0: only the newline
        args = ["amend", "-p", "-o", opt, "p.qcow2"]
        ours, theirs = _bytes(_IMG + args, tmp_path), _bytes(["qemu-img", *args], tmp_path)
        assert ours.stdout == theirs.stdout == b"\n"
        assert _one_line(ours.stderr.decode()) == _one_line(theirs.stderr.decode())


_IMG = [sys.executable, "-m", "appliance.cli.main", "img"]


def _bytes(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """A run with its output as bytes: text mode would turn each "\r" into a newline."""
    return subprocess.run(argv, cwd=cwd, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
