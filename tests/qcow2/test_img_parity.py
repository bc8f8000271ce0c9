"""`appliance img` prints what `qemu-img` prints for the cases scripts meet:
raw holes and preallocated clusters in `map`, leaks repaired in place by
`check -r`, backing formats that must be named, and the probing warning only
where an image is opened for writing."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, needs_qemu_img
from tests.qcow2.helpers import qemu_img, qemu_io

pytestmark = needs_qemu_img


def img(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli.main", "img", *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def qimg(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], cwd=cwd, capture_output=True, text=True)


def img_here(*args: str, cwd: Path) -> tuple[str, str, int]:
    """``appliance img`` run by its own main in this process: (stdout, stderr, exit status).
    For the large read-only tables below, where a new interpreter for each of some 260 runs
    took most of a minute; what a separate process adds (the exit itself) is checked by
    ``img`` everywhere else."""
    from appliance.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(["img", *args])
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(old)
    return out.getvalue(), err.getvalue(), code


def same_as_qemu_img_here(cwd: Path, *args: str) -> None:
    """:func:`same_stdout_and_rc` with ours run by :func:`img_here`."""
    stdout, stderr, code = img_here(*args, cwd=cwd)
    theirs = qimg(*args, cwd=cwd)
    assert stdout == theirs.stdout, f"{args}\nours:\n{stdout}{stderr}\nqemu-img:\n{theirs.stdout}"
    assert code == theirs.returncode, (args, stderr, theirs.stderr)


def same_stdout_and_rc(cwd: Path, *args: str) -> tuple[str, str]:
    ours, theirs = img(*args, cwd=cwd), qimg(*args, cwd=cwd)
    assert ours.stdout == theirs.stdout, f"{args}\nours:\n{ours.stdout}{ours.stderr}\nqemu-img:\n{theirs.stdout}"
    assert ours.returncode == theirs.returncode, (args, ours.stderr, theirs.stderr)
    return ours.stderr, theirs.stderr


def test_map_of_a_raw_file_with_holes_names_their_offsets(tmp_path: Path) -> None:
    p = tmp_path / "sp.raw"
    qemu_img("create", "-f", "raw", str(p), "8M")
    qemu_io(p, "write -P 5 1M 4k", fmt="raw")
    for fmt in ([], ["-f", "raw"]):
        same_stdout_and_rc(tmp_path, "map", *fmt, "--output", "json", "sp.raw")
        same_stdout_and_rc(tmp_path, "map", *fmt, "sp.raw")


def test_map_of_metadata_preallocation_shows_zero_data_and_kept_zero_clusters(tmp_path: Path) -> None:
    p = tmp_path / "pm.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", str(p), "8M")
    # A zeroed cluster that keeps its host cluster, data, a zeroed and unmapped one.
    qemu_io(p, "write -z 0 64k", "write -P 1 64k 64k", "write -z -u 128k 64k")
    same_stdout_and_rc(tmp_path, "map", "--output", "json", "pm.qcow2")
    same_stdout_and_rc(tmp_path, "map", "pm.qcow2")


def test_map_of_subclusters_in_a_kept_cluster(tmp_path: Path) -> None:
    p = tmp_path / "x.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=64k,extended_l2=on", str(p), "4M")
    qemu_io(p, "write -P 7 0 100k", "write -z 1M 512k", "discard 2M 4k")
    same_stdout_and_rc(tmp_path, "map", "--output", "json", "x.qcow2")


def test_human_map_refuses_compressed_clusters_like_qemu_img(tmp_path: Path) -> None:
    p = tmp_path / "z.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "8M")
    qemu_io(p, "write -c -P 3 0 64k")
    same_stdout_and_rc(tmp_path, "map", "--output", "json", "z.qcow2")
    ours, _ = same_stdout_and_rc(tmp_path, "map", "z.qcow2")
    assert "File contains external, encrypted or compressed clusters." in ours


def leaky(tmp_path: Path, name: str) -> Path:
    """An image with one leaked cluster: a snapshot that 1-bit refcounts cannot hold fails half way."""
    p = tmp_path / name
    qemu_img("create", "-f", "qcow2", "-o", "refcount_bits=1", str(p), "4M")
    qemu_io(p, "write -P 7 0 100k")
    assert qimg("snapshot", "-c", "s", name, cwd=tmp_path).returncode != 0
    assert qimg("check", name, cwd=tmp_path).returncode == 3  # leaks
    return p


@pytest.mark.parametrize("output", ["human", "json"])
def test_check_repairs_leaks_in_place_as_qemu_img_does(tmp_path: Path, output: str) -> None:
    (tmp_path / "q").mkdir()
    (tmp_path / "o").mkdir()
    leaky(tmp_path / "q", "l.qcow2")
    shutil.copy(tmp_path / "q" / "l.qcow2", tmp_path / "o" / "l.qcow2")
    size = (tmp_path / "o" / "l.qcow2").stat().st_size
    for args in (["check", "--output", output, "l.qcow2"],
                 ["check", "--output", output, "-r", "leaks", "l.qcow2"]):
        ours, theirs = img(*args, cwd=tmp_path / "o"), qimg(*args, cwd=tmp_path / "q")
        assert (ours.stdout, ours.stderr, ours.returncode) == (theirs.stdout, theirs.stderr, theirs.returncode)
    # Repaired where it was: the image did not grow, and qemu-img finds it clean.
    assert (tmp_path / "o" / "l.qcow2").stat().st_size == size
    assert qimg("check", "l.qcow2", cwd=tmp_path / "o").returncode == 0


def test_a_backing_file_without_its_format_is_refused(tmp_path: Path) -> None:
    qemu_img("create", "-f", "raw", str(tmp_path / "b.raw"), "1M")
    qemu_img("create", "-f", "qcow2", "-b", "b.raw", "-F", "raw", str(tmp_path / "t.qcow2"))
    before = (tmp_path / "t.qcow2").read_bytes()
    r = img("create", "-f", "qcow2", "-b", "b.raw", "n.qcow2", cwd=tmp_path)
    assert r.returncode == 1 and not (tmp_path / "n.qcow2").exists()
    assert "n.qcow2: Backing file specified without backing format\nDetected format of raw." in r.stderr
    for unsafe in ([], ["-u"]):
        r = img("rebase", *unsafe, "-b", "b.raw", "t.qcow2", cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        assert "Could not change the backing file to 'b.raw': backing format must be specified" in r.stderr
    assert (tmp_path / "t.qcow2").read_bytes() == before


def test_probing_warns_only_where_the_raw_image_is_opened_for_writing(tmp_path: Path) -> None:
    qemu_img("create", "-f", "raw", str(tmp_path / "r.raw"), "1M")
    for args in (["info", "r.raw"], ["map", "r.raw"], ["compare", "r.raw", "r.raw"]):
        ours, theirs = same_stdout_and_rc(tmp_path, *args)
        assert "probing guessed raw" not in ours + theirs
    r = img("check", "-r", "all", "r.raw", cwd=tmp_path)
    assert r.returncode == 63
    assert "WARNING: Image format was not specified for 'r.raw' and probing guessed raw." in r.stderr
    assert r.stderr.rstrip().endswith("This image format does not support checks")


def test_info_sizes_a_raw_file_in_whole_sectors(tmp_path: Path) -> None:
    (tmp_path / "odd.raw").write_bytes(b"x" * 1000)
    human = ["info", "-f", "raw", "odd.raw"]
    # image, file format, virtual size (the disk size line depends on the file system)
    assert img(*human, cwd=tmp_path).stdout.splitlines()[:3] == qimg(*human, cwd=tmp_path).stdout.splitlines()[:3]
    js = ["info", "--output=json", "-f", "raw", "odd.raw"]
    ours, theirs = (json.loads(r.stdout) for r in (img(*js, cwd=tmp_path), qimg(*js, cwd=tmp_path)))
    assert ours["virtual-size"] == theirs["virtual-size"] == 1024


def test_snapshot_names_that_are_not_there_leave_the_image_untouched(tmp_path: Path) -> None:
    p = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "4M")
    before = p.read_bytes()
    for flag, what in (("-a", "Could not apply snapshot 'nope': Failed to load snapshot: No such file or directory"),
                       ("-d", "Could not delete snapshot 'nope': snapshot not found")):
        r = img("snapshot", flag, "nope", "s.qcow2", cwd=tmp_path)
        assert r.returncode == 1 and what in r.stderr
    # Not even the dirty bit a snapshot operation sets while it runs.
    assert p.read_bytes() == before


@pytest.mark.parametrize("param", ["s1", "1", "snapshot.name=s1", "snapshot.id=1", "snapshot.id=1,snapshot.name=s1"])
def test_convert_from_an_internal_snapshot_matches_qemu_img(tmp_path: Path, param: str) -> None:
    p = tmp_path / "sn.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "8M")
    qemu_io(p, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -P 2 512k 1M")
    qemu_img("resize", str(p), "16M")  # the copy keeps today's size, as qemu-img's does
    before = p.read_bytes()
    r = img("convert", "-O", "raw", "-l", param, "sn.qcow2", "ours.raw", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    qemu_img("convert", "-O", "raw", "-l", param, str(p), str(tmp_path / "theirs.raw"))
    assert (tmp_path / "ours.raw").read_bytes() == (tmp_path / "theirs.raw").read_bytes()
    assert p.read_bytes() == before  # viewing a snapshot writes nothing


def test_convert_from_a_missing_snapshot_fails_like_qemu_img(tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", str(tmp_path / "sn.qcow2"), "1M")
    for param in ("nope", "snapshot.id=7"):
        r = img("convert", "-O", "raw", "-l", param, "sn.qcow2", "o.raw", cwd=tmp_path)
        assert r.returncode == 1 and "Failed to load snapshot: Can't find snapshot" in r.stderr
        assert not (tmp_path / "o.raw").exists()


@pytest.mark.parametrize("args", [["create", "-f", "qcow2", "-o", "help"], ["create", "-f", "raw", "-o", "?"],
                                  ["convert", "-O", "qcow2", "-o", "help"], ["amend", "-f", "qcow2", "-o", "help"]])
def test_o_help_lists_options_in_qemu_img_layout(tmp_path: Path, args: list[str]) -> None:
    ours, theirs = img(*args, cwd=tmp_path), qimg(*args, cwd=tmp_path)
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    keys = [line.split("=")[0].strip() for line in ours.stdout.splitlines()[1:]]
    assert keys and keys == sorted(keys)
    # Every option we list is one qemu-img lists for that format and command, same heading.
    assert ours.stdout.splitlines()[0] == theirs.stdout.splitlines()[0]
    theirs_keys = {line.split("=")[0].strip() for line in theirs.stdout.splitlines()[1:] if "=<" in line}
    assert set(keys) - {"preallocation"} <= theirs_keys  # raw's preallocation is its file layer's in QEMU


@pytest.mark.parametrize(
    ("create", "compressed"),
    [("refcount_bits=64", False), ("lazy_refcounts=on", False), ("extended_l2=on", False),
     ("compression_type=zstd", False), ("compression_type=zstd", True)],
)
def test_amend_to_compat_0_10_refuses_and_allows_what_qemu_img_does(
        tmp_path: Path, create: str, compressed: bool) -> None:
    (tmp_path / "q").mkdir()
    (tmp_path / "o").mkdir()
    p = tmp_path / "q" / "d.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", create, str(p), "4M")
    if compressed:
        qemu_io(p, "write -c -P 1 0 64k")
    qemu_io(p, "write -P 2 1M 64k")
    shutil.copy(p, tmp_path / "o" / "d.qcow2")
    ours = img("amend", "-o", "compat=0.10", "d.qcow2", cwd=tmp_path / "o")
    theirs = qimg("amend", "-o", "compat=0.10", "d.qcow2", cwd=tmp_path / "q")
    assert ours.returncode == theirs.returncode
    assert ours.stderr.replace("appliance img: ", "") == theirs.stderr.replace("qemu-img: ", "")
    assert qimg("check", "d.qcow2", cwd=tmp_path / "o").returncode == 0
    assert qimg("compare", "q/d.qcow2", "o/d.qcow2", cwd=tmp_path).returncode == 0
    info = [json.loads(qimg("info", "--output=json", f"{d}/d.qcow2", cwd=tmp_path).stdout) for d in "qo"]
    assert info[0]["format-specific"]["data"]["compat"] == info[1]["format-specific"]["data"]["compat"]


@pytest.mark.parametrize("args", [["-c", "50", "-q"], ["-c", "50", "-d", "4", "-w", "--flush-interval=4"],
                                  ["-c", "50", "-w", "--flush-interval=10"]])
def test_bench_prints_and_refuses_what_qemu_img_bench_does(tmp_path: Path, args: list[str]) -> None:
    qemu_img("create", "-f", "qcow2", str(tmp_path / "b.qcow2"), "16M")
    ours, theirs = img("bench", *args, "b.qcow2", cwd=tmp_path), qimg("bench", *args, "b.qcow2", cwd=tmp_path)

    def shape(r: subprocess.CompletedProcess[str]) -> tuple[bool, list[str]]:
        # A refused command line exits 2 here (the project's rule), 1 in qemu-img.
        text = (r.stdout + r.stderr).replace("appliance img:", "qemu-img:")
        return r.returncode == 0, [line.split(" in ")[0] for line in text.splitlines()]  # timings differ

    assert shape(ours) == shape(theirs)


def test_a_second_snapshot_of_the_same_name_is_taken_as_qemu_img_takes_it(tmp_path: Path) -> None:
    for d in ("q", "o"):
        (tmp_path / d).mkdir()
        qemu_img("create", "-f", "qcow2", str(tmp_path / d / "s.qcow2"), "4M")
    for _ in range(2):
        assert img("snapshot", "-c", "s1", "s.qcow2", cwd=tmp_path / "o").returncode == 0
        assert qimg("snapshot", "-c", "s1", "s.qcow2", cwd=tmp_path / "q").returncode == 0

    def ids_and_names(d: str) -> list[list[str]]:
        lines = qimg("snapshot", "-l", "s.qcow2", cwd=tmp_path / d).stdout.splitlines()[2:]
        return [line.split()[:2] for line in lines]

    assert ids_and_names("o") == ids_and_names("q") == [["1", "s1"], ["2", "s1"]]
    assert qimg("check", "s.qcow2", cwd=tmp_path / "o").returncode == 0


def _compare_images(d: Path) -> list[str]:
    """Pairs of images for `compare`: layout, zero clusters, holes, raw, backing, compressed."""
    def q(name: str, *cmds: str, opts: str = "cluster_size=64k", size: str = "1M") -> str:
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(d / name), size)
        if cmds:
            qemu_io(d / name, *cmds)
        return name

    q("empty.qcow2")
    q("seq.qcow2", "write -P 1 0 1M")
    q("rev.qcow2", *(f"write -P 1 {o}k 64k" for o in range(960, -64, -64)))
    q("one.qcow2", "write -P 0 64k 4k")
    q("zero.qcow2", "write -z 64k 64k")
    q("diff.qcow2", "write -P 1 0 1M", "write -P 2 300k 1")
    q("small.qcow2", "write -P 3 0 8k", opts="cluster_size=512", size="1M")
    q("small2.qcow2", "write -P 3 0 8k", "write -z 512k 512", opts="cluster_size=512", size="1M")
    qemu_img("create", "-q", "-f", "raw", str(d / "hole.raw"), "1M")
    qemu_io(d / "hole.raw", "write -P 1 0 1M", fmt="raw")
    qemu_img("create", "-q", "-f", "raw", str(d / "sparse.raw"), "1M")
    qemu_io(d / "sparse.raw", "write -P 0 64k 4k", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "seq.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
    qemu_io(d / "top.qcow2", "write -P 1 128k 64k")
    qemu_img("convert", "-q", "-c", "-O", "qcow2", str(d / "diff.qcow2"), str(d / "comp.qcow2"))
    return sorted(p.name for p in d.iterdir())


def test_compare_and_strict_compare_give_qemu_img_answers(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # -s compares block status as qemu-img does, end-of-file flag included:
    # the same bytes laid out in a different order are a mismatch for it.
    import contextlib
    import io

    from appliance.cli.main import main

    names = _compare_images(tmp_path)
    monkeypatch.chdir(tmp_path)
    for a in names:
        for b in names:
            for strict in ([], ["-s"]):
                args = ["compare", *strict, a, b]
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    rc = main(["img", *args])  # in-process: 200 runs
                theirs = qimg(*args, cwd=tmp_path)
                assert (out.getvalue(), rc) == (theirs.stdout, theirs.returncode), args


@pytest.mark.parametrize("backed", [False, True])
def test_amend_to_compat_0_10_expands_zero_clusters_as_qemu_img_does(
        tmp_path: Path, backed: bool) -> None:
    # Zero clusters that keep their host cluster, ones that don't, over a
    # backing file or not, in an L2 table a snapshot shares and in one it doesn't.
    for d in "qo":
        (tmp_path / d).mkdir()
    q = tmp_path / "q"
    if backed:
        qemu_img("create", "-q", "-f", "qcow2", str(q / "b.qcow2"), "4M")
        qemu_io(q / "b.qcow2", "write -P 9 0 4M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "-o",
                 "cluster_size=4k", str(q / "d.qcow2"))
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(q / "d.qcow2"), "4M")
    p = q / "d.qcow2"
    qemu_io(p, "write -P 1 0 64k", "write -z 8k 8k", "write -z -u 32k 4k", "write -z 3M 16k")
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -z 2M 8k", "write -P 2 2M 4k")
    for f in q.iterdir():
        shutil.copy(f, tmp_path / "o" / f.name)
    before = (tmp_path / "before.raw")
    qemu_img("convert", "-O", "raw", str(p), str(before))
    ours = img("amend", "-o", "compat=0.10", "d.qcow2", cwd=tmp_path / "o")
    theirs = qimg("amend", "-o", "compat=0.10", "d.qcow2", cwd=q)
    assert (ours.returncode, ours.stderr) == (theirs.returncode, theirs.stderr) == (0, "")
    for d in "qo":
        assert qimg("check", "d.qcow2", cwd=tmp_path / d).returncode == 0
        info = json.loads(qimg("info", "--output=json", "d.qcow2", cwd=tmp_path / d).stdout)
        assert info["format-specific"]["data"]["compat"] == "0.10"
        assert qimg("compare", "-F", "qcow2", "-f", "raw", "before.raw", f"{d}/d.qcow2",
                    cwd=tmp_path).returncode == 0
        # The snapshot's view survives too.
        assert qimg("convert", "-l", "s1", "-O", "raw", "d.qcow2", "s1.raw",
                    cwd=tmp_path / d).returncode == 0
    assert (tmp_path / "q" / "s1.raw").read_bytes() == (tmp_path / "o" / "s1.raw").read_bytes()
    same = [json.loads(qimg("map", "--output=json", "d.qcow2", cwd=tmp_path / d).stdout)
            for d in "qo"]
    strip = [[{k: v for k, v in e.items() if k != "offset"} for e in m] for m in same]
    assert strip[0] == strip[1]


@pytest.mark.parametrize("args", [
    ["--target-is-zero", "-O", "raw", "s.qcow2", "t.raw"],
    ["-r", "abc", "-O", "raw", "s.qcow2", "t.raw"],
    ["-C", "-c", "-O", "qcow2", "s.qcow2", "t.qcow2"],
    ["-C", "-S", "0", "-O", "raw", "s.qcow2", "t.raw"],
    ["-C", "-S4k", "-O", "raw", "s.qcow2", "t.raw"],
])
def test_convert_refuses_option_clashes_with_qemu_img_words(tmp_path: Path, args: list[str]) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "s.qcow2"), "1M")
    ours, theirs = img("convert", *args, cwd=tmp_path), qimg("convert", *args, cwd=tmp_path)
    # A refused command line exits 2 here (the project's rule), 1 in qemu-img; one line.
    assert (ours.returncode, theirs.returncode) == (2, 1)
    assert ours.stderr.replace("appliance img: ", "") == " ".join(
        theirs.stderr.replace("qemu-img: ", "").split("\n")).rstrip() + "\n"


def test_convert_target_is_zero_and_rate_limit(tmp_path: Path) -> None:
    import time

    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "s.qcow2"), "32M")
    qemu_io(tmp_path / "s.qcow2", "write -P 3 0 32M", "write -z 1M 1M")
    # -n --target-is-zero: the target's own bytes in the source's zero areas stay.
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "t.raw"), "32M")
    qemu_io(tmp_path / "t.raw", "write -P 7 1M 4k", fmt="raw")
    img("convert", "-n", "--target-is-zero", "-O", "raw", "s.qcow2", "t.raw", cwd=tmp_path)
    assert (tmp_path / "t.raw").read_bytes()[1 << 20 : (1 << 20) + 4096] == b"\x07" * 4096
    img("convert", "-n", "-O", "raw", "s.qcow2", "t.raw", cwd=tmp_path)
    assert qimg("compare", "-f", "qcow2", "-F", "raw", "s.qcow2", "t.raw",
                cwd=tmp_path).returncode == 0
    # -r 16M: 32 MiB may not take much less than two seconds.
    t0 = time.monotonic()
    r = img("convert", "-r", "16M", "-O", "raw", "s.qcow2", "r.raw", cwd=tmp_path)
    assert r.returncode == 0 and time.monotonic() - t0 >= 1.2
    assert qimg("compare", "s.qcow2", "r.raw", cwd=tmp_path).returncode == 0


def test_json_output_is_laid_out_as_qemu_img_lays_it_out(tmp_path: Path) -> None:
    # Empty lists (a bitmap's flags), characters outside ASCII in names, and
    # check's allocated-clusters, left out while nothing is allocated.
    name = "b\u00e9\U0001F600.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / name), "16M")
    qimg("bitmap", "--add", name, "b0", cwd=tmp_path)
    qimg("bitmap", "--add", "-g", "128k", "--disable", name, "b1", cwd=tmp_path)
    same_stdout_and_rc(tmp_path, "info", "--output", "json", name)
    same_stdout_and_rc(tmp_path, "check", "--output", "json", name)
    qemu_io(tmp_path / name, "write 0 64k")
    same_stdout_and_rc(tmp_path, "check", "--output", "json", name)


def test_qemu_json_writer_escapes_like_qemu() -> None:
    from appliance.cli.qemu_json import dumps

    assert dumps({"a": [], "b": {}, "c": [1, True, None]}) == (
        '{\n    "a": [\n    ],\n    "b": {\n    },\n    "c": [\n        1,\n        true,\n'
        '        null\n    ]\n}')
    assert dumps("\u00e9\x7f\t\"\\\U0001F600") == '"\\u00E9\\u007F\\t\\"\\\\\\uD83D\\uDE00"'


def _words(stderr: str) -> str:
    """A message without the program name, qemu-img's two-line ones joined as ours are."""
    lines = [ln.replace("qemu-img: ", "").replace("appliance img: ", "") for ln in stderr.splitlines()]
    if len(lines) == 2 and lines[1] == "This option is only supported for image creation":
        return f"{lines[0]}: this option is only supported for image creation"
    if len(lines) == 2 and lines[1] == "You can use 'qemu-img rebase' instead.":
        return f"{lines[0]}: you can use 'appliance img rebase' instead"
    return "\n".join(lines)


@pytest.mark.parametrize("opts", [
    "cluster_size=3k", "refcount_bits=3", "compat=0.10,lazy_refcounts=on",
    "compat=0.10,refcount_bits=8", "compat=0.9", "compression_type=lz4",
    "extended_l2=on,cluster_size=8k", "compat=0.10,extended_l2=on",
    "compat=0.10,compression_type=zstd", "cluster_size=3k,refcount_bits=3,compat=0.10,lazy_refcounts=on",
])
def test_create_refuses_bad_options_in_qemu_img_order_and_words(tmp_path: Path, opts: str) -> None:
    args = ["create", "-f", "qcow2", "-o", opts, "x.qcow2", "1M"]
    ours, theirs = img(*args, cwd=tmp_path), qimg(*args, cwd=tmp_path)
    assert ours.stdout == theirs.stdout
    assert (ours.returncode, _words(ours.stderr)) == (theirs.returncode, _words(theirs.stderr))


@pytest.mark.parametrize("opts", [
    "cluster_size=65536", "preallocation=off", "encrypt.format=luks", "lazy_refcounts=maybe",
    "data_file=x", "compat=0.9", "lazy_refcounts=y", "backing_file=b.qcow2", "backing_fmt=raw",
])
def test_amend_refuses_what_qemu_img_refuses(tmp_path: Path, opts: str) -> None:
    for d in "qo":
        (tmp_path / d).mkdir()
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / d / "a.qcow2"), "1M")
    ours = img("amend", "-o", opts, "a.qcow2", cwd=tmp_path / "o")
    theirs = qimg("amend", "-o", opts, "a.qcow2", cwd=tmp_path / "q")
    assert (ours.returncode, _words(ours.stderr)) == (theirs.returncode, _words(theirs.stderr))
    assert (tmp_path / "o" / "a.qcow2").read_bytes() == (tmp_path / "q" / "a.qcow2").read_bytes()


@pytest.mark.parametrize("args", [
    ["convert", "-t", "bogus", "-O", "raw", "a.qcow2", "y.raw"],
    ["convert", "-T", "bogus", "-O", "raw", "a.qcow2", "y.raw"],
    ["compare", "-T", "bogus", "a.qcow2", "a.qcow2"],
    ["commit", "-t", "bogus", "a.qcow2"],
    ["check", "-T", "bogus", "a.qcow2"],
    ["bench", "-t", "bogus", "-c", "1", "a.qcow2"],
    ["bench", "--pattern", "999", "-w", "-c", "1", "a.qcow2"],
    ["bench", "--pattern", "abc", "-w", "-c", "1", "a.qcow2"],
])
def test_bad_cache_modes_and_patterns_are_refused_in_qemu_img_words(tmp_path: Path,
                                                                     args: list[str]) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M")
    ours, theirs = img(*args, cwd=tmp_path), qimg(*args, cwd=tmp_path)
    # A refused command line exits 2 here (the project's rule); qemu-img 1 (compare: 2).
    assert ours.returncode == 2 and theirs.returncode in (1, 2)
    assert _words(ours.stderr) == _words(theirs.stderr)


def test_snapshots_we_take_list_like_qemu_img_ones(tmp_path: Path) -> None:
    # icount 0 (QEMU without record/replay) and a date to the microsecond.
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "s.qcow2"), "1M")
    qimg("snapshot", "-c", "theirs", "s.qcow2", cwd=tmp_path)
    img("snapshot", "-c", "ours", "s.qcow2", cwd=tmp_path)
    snaps = json.loads(qimg("info", "--output=json", "s.qcow2", cwd=tmp_path).stdout)["snapshots"]
    assert [sorted(s) for s in snaps] == [sorted(snaps[0])] * 2
    assert snaps[1]["icount"] == 0 and snaps[1]["date-nsec"] % 1000 == 0
    same_stdout_and_rc(tmp_path, "info", "--output=json", "s.qcow2")


@pytest.mark.parametrize("args", [
    ["commit", "-b", "nonexist", "a.qcow2"],
    ["commit", "-r", "abc", "a.qcow2"],
    ["rebase", "-b", "nonexist", "-F", "qcow2", "a.qcow2"],
    # a safe rebase opens the new backing file (relative to the image) before it asks for -F
    ["rebase", "-b", "nonexist", "a.qcow2"],
    ["rebase", "-b", "nonexist", "sub/a.qcow2"],
    ["rebase", "-u", "-b", "nonexist", "sub/a.qcow2"],
])
def test_commit_and_rebase_refusals_match_qemu_img(tmp_path: Path, args: list[str]) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M")
    (tmp_path / "sub").mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "sub" / "a.qcow2"), "1M")
    ours, theirs = img(*args, cwd=tmp_path), qimg(*args, cwd=tmp_path)
    assert ours.returncode in (1, 2) and theirs.returncode == 1
    assert " ".join(_words(ours.stderr).split()) == " ".join(_words(theirs.stderr).split())


def test_measure_gives_qemu_img_numbers(tmp_path: Path) -> None:
    # Sources with data, zero clusters, compressed clusters, a bitmap, a
    # backing chain and raw holes; targets of several shapes; --size alone.
    names = _compare_images(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "bm.qcow2"), "16M")
    qimg("bitmap", "--add", "bm.qcow2", "b0", cwd=tmp_path)
    qimg("bitmap", "--add", "-g", "128k", "bm.qcow2", "b\u00e9-long-name", cwd=tmp_path)
    targets = [["-O", "qcow2"], ["-O", "raw"], ["--output", "json", "-O", "qcow2"],
               ["-O", "qcow2", "-o", "cluster_size=512"],
               ["-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=1"],
               ["-O", "qcow2", "-o", "extended_l2=on,preallocation=full"],
               ["-O", "qcow2", "-o", "compat=0.10"], ["-O", "qcow2", "-o", "backing_file=x"]]
    for name in [*names, "bm.qcow2"]:
        for t in targets:
            same_as_qemu_img_here(tmp_path, "measure", *t, name)
    for size in ("0", "511", "1G", "100T"):
        for t in targets[:5]:
            same_as_qemu_img_here(tmp_path, "measure", *t, "--size", size)
    same_stdout_and_rc(tmp_path, "measure", "-O", "qcow2", "bm.qcow2")  # and as its own process


def test_a_block_device_is_measured_and_mapped_as_qemu_img_does(tmp_path: Path) -> None:
    # A raw block device: its size is where it ends (st_size is 0) and it has no holes to report.
    backing = tmp_path / "lo.img"
    backing.write_bytes(b"\x07" * (1 << 20) + bytes(7 << 20))
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device here: {made.stderr.strip()}")
    dev = made.stdout.strip()
    try:
        for args in (["info", "-f", "raw", dev], ["map", "--output", "json", "-f", "raw", dev],
                     ["measure", "-O", "qcow2", "-f", "raw", dev]):
            same_stdout_and_rc(tmp_path, *args)
        img("convert", "-f", "raw", "-O", "qcow2", dev, "c.qcow2", cwd=tmp_path)
        assert qimg("compare", "-f", "raw", "-F", "qcow2", dev, "c.qcow2", cwd=tmp_path).returncode == 0
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize("ops", [
    # bs=3 across the end of the written first MiB (qemu-img takes ~45 s for all 4 MiB at bs=3).
    [], ["bs=64k", "count=10", "skip=2"], ["bs=3", "skip=300000", "count=70000"], ["skip=100"],
    ["count=0"], ["bs=1M", "count=2", "skip=1"],
    ["bs=1k", "count=1k"], ["bs=64k", "bs=1k", "skip=9"], ["-O", "qcow2", "bs=64k", "count=10", "skip=2"],
    ["-O", "qcow2", "bs=3", "count=5"],
])
def test_dd_makes_what_qemu_img_dd_makes(tmp_path: Path, ops: list[str]) -> None:
    for d in "qo":
        (tmp_path / d).mkdir()
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / d / "s.qcow2"), "4M")
        qemu_io(tmp_path / d / "s.qcow2", "write -P 3 0 1M", "write -P 5 2M 512k")
    fmt = "qcow2" if "qcow2" in ops else "raw"
    ours = img("dd", *ops, "if=s.qcow2", f"of=o.{fmt}", cwd=tmp_path / "o")
    theirs = qimg("dd", *ops, "if=s.qcow2", f"of=o.{fmt}", cwd=tmp_path / "q")
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (0, ""), ours.stderr
    if fmt == "raw":
        assert (tmp_path / "o/o.raw").read_bytes() == (tmp_path / "q/o.raw").read_bytes()
    else:
        # Where clusters land in the file is the allocator's business; what maps where is not.
        maps = [json.loads(qimg("map", "--output=json", "o.qcow2", cwd=tmp_path / d).stdout) for d in "oq"]
        assert [[{k: v for k, v in e.items() if k != "offset"} for e in m] for m in maps][0] == \
            [{k: v for k, v in e.items() if k != "offset"} for e in maps[1]]
        assert qimg("check", "o.qcow2", cwd=tmp_path / "o").returncode == 0
        assert qimg("compare", "q/o.qcow2", "o/o.qcow2", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("ops", [
    ["bs=0"], ["bs=abc"], ["count=-1"], ["skip=abc"], ["bogus=1"], ["of=x.raw"], ["if=nonexist", "of=x.raw"],
])
def test_dd_refuses_what_qemu_img_dd_refuses(tmp_path: Path, ops: list[str]) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "s.qcow2"), "1M")
    ops = [o if o.startswith(("if=", "of=")) or "if=nonexist" in ops else o for o in ops]
    if not any(o.startswith("if=") for o in ops) and "of=x.raw" not in ops:
        ops = [*ops, "if=s.qcow2", "of=x.raw"]
    ours, theirs = img("dd", *ops, cwd=tmp_path), qimg("dd", *ops, cwd=tmp_path)
    assert ours.returncode in (1, 2) and theirs.returncode == 1
    assert " ".join(_words(ours.stderr).split()) == " ".join(_words(theirs.stderr).split())


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_create_rounds_a_size_up_to_whole_sectors(tmp_path: Path, fmt: str) -> None:
    for d in "qo":
        (tmp_path / d).mkdir()
    ours = img("create", "-f", fmt, "x", "15", cwd=tmp_path / "o")
    theirs = qimg("create", "-f", fmt, "x", "15", cwd=tmp_path / "q")
    assert ours.stdout == theirs.stdout  # "size=15" said, 512 made
    info = [json.loads(qimg("info", "--output=json", "-f", fmt, "x", cwd=tmp_path / d).stdout) for d in "qo"]
    assert info[0]["virtual-size"] == info[1]["virtual-size"] == 512


@pytest.mark.parametrize("args", [["--shrink", "a.qcow2", "1000"], ["a.qcow2", "2000001"], ["a.qcow2", "+1"]])
def test_resize_of_qcow2_to_part_of_a_sector_is_refused(tmp_path: Path, args: list[str]) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M")
    ours, theirs = img("resize", *args, cwd=tmp_path), qimg("resize", *args, cwd=tmp_path)
    assert (ours.returncode, _words(ours.stderr)) == (theirs.returncode, _words(theirs.stderr)) == (
        1, "The new size must be a multiple of 512")


def test_a_qcow2_image_on_a_block_device_works_like_on_a_file(tmp_path: Path) -> None:
    # An LVM-style volume holding a qcow2 image: st_size is 0, the device's end is the file's.
    backing = tmp_path / "vol.img"
    backing.write_bytes(bytes(64 << 20))
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device here: {made.stderr.strip()}")
    dev = made.stdout.strip()
    try:
        qemu_img("create", "-q", "-f", "qcow2", dev, "32M")
        qemu_io(Path(dev), "write -P 9 1M 256k")
        for args in (["info", dev], ["check", dev], ["map", "--output", "json", dev]):
            same_stdout_and_rc(tmp_path, *args)
        assert img("bench", "-w", "-c", "200", "-s", "64k", "-o", "4M", "--pattern", "7", dev,
                   cwd=tmp_path).returncode == 0
        assert qimg("check", dev, cwd=tmp_path).returncode == 0
        assert "Pattern verification failed" not in subprocess.run(
            ["qemu-io", "-c", "read -P 9 1M 256k", "-c", "read -P 7 4M 64k", dev],
            capture_output=True, text=True).stdout
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize("opts", [
    "cluster_size=4k,extended_l2=on", "compat=0.10,refcount_bits=8", "data_file=x,data_file_raw=on",
    "compat=0.10,lazy_refcounts=on", "compat=0.10,extended_l2=on", "compression_type=lz4",
    "preallocation=bogus", "compat=0.9", "cluster_size=3k", "refcount_bits=3",
])
def test_measure_takes_and_refuses_options_as_qemu_img_measure(tmp_path: Path, opts: str) -> None:
    args = ["measure", "-O", "qcow2", "-o", opts, "--size", "1G"]
    ours, theirs = img(*args, cwd=tmp_path), qimg(*args, cwd=tmp_path)
    assert ours.stdout == theirs.stdout
    assert ours.returncode == theirs.returncode
    assert _words(ours.stderr) == _words(theirs.stderr)


@pytest.mark.parametrize(("opts", "code"), [("preallocation=foo", 1), ("lazy_refcounts=maybe", 2),
                                            ("bogus=1", 2)])
def test_create_names_the_file_in_option_errors(tmp_path: Path, opts: str, code: int) -> None:
    args = ["create", "-f", "qcow2", "-o", opts, "n.qcow2", "1M"]
    ours, theirs = img(*args, cwd=tmp_path), qimg(*args, cwd=tmp_path)
    assert ours.stdout == theirs.stdout  # the "Formatting" line comes first where qemu-img prints it
    # A refused command line exits 2 here (the project's rule); qemu-img says 1.
    assert (ours.returncode, theirs.returncode) == (code, 1)
    assert _words(ours.stderr) == _words(theirs.stderr)


def test_target_is_zero_onto_a_target_with_its_own_backing_file(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "b.qcow2"), "1M")
    qemu_io(tmp_path / "b.qcow2", "write -P 4 0 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(tmp_path / "t.qcow2"))
    args = ["convert", "-n", "--target-is-zero", "-O", "qcow2", "b.qcow2", "t.qcow2"]
    assert img(*args, cwd=tmp_path).returncode == qimg(*args, cwd=tmp_path).returncode == 0
    args = ["convert", "-n", "--target-is-zero", "-B", "b.qcow2", "-O", "qcow2", "b.qcow2", "t.qcow2"]
    ours, theirs = img(*args, cwd=tmp_path), qimg(*args, cwd=tmp_path)
    assert ours.returncode != 0 and _words(ours.stderr) == _words(theirs.stderr)


def test_snapshot_commands_on_a_raw_image_answer_as_qemu_img(tmp_path: Path) -> None:
    qemu_img("create", "-f", "raw", str(tmp_path / "r.raw"), "1M")
    for op in (["-l"], ["-c", "s"], ["-a", "s"], ["-d", "s"]):
        ours, theirs = same_stdout_and_rc(tmp_path, "snapshot", *op, "r.raw")
        assert ours.replace("appliance img:", "qemu-img:") == theirs, op


def test_measure_of_a_version_2_source_has_no_bitmaps_line(tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(tmp_path / "v2.qcow2"), "32M")
    out, _ = same_stdout_and_rc(tmp_path, "measure", "-O", "qcow2", "v2.qcow2")
    assert "bitmaps" not in img("measure", "-O", "qcow2", "v2.qcow2", cwd=tmp_path).stdout
    same_stdout_and_rc(tmp_path, "measure", "--output", "json", "-O", "qcow2", "v2.qcow2")


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_raw_images_we_create_map_like_qemu_imgs_with_the_first_block_written(
        tmp_path: Path, prealloc: str) -> None:
    for tool, name in ((qimg, "q.raw"), (img, "a.raw")):
        assert tool("create", "-q", "-f", "raw", "-o", f"preallocation={prealloc}", name, "1M",
                    cwd=tmp_path).returncode == 0
    maps = [qimg("map", "--output", "json", "-f", "raw", n, cwd=tmp_path).stdout for n in ("q.raw", "a.raw")]
    assert maps[0] == maps[1]
    assert ('"start": 0, "length": 4096' in maps[1]) is (prealloc != "full")
    # convert into raw lays the target out the same way
    qemu_img("create", "-f", "qcow2", str(tmp_path / "e.qcow2"), "2M")
    assert qimg("convert", "-O", "raw", "e.qcow2", "qc.raw", cwd=tmp_path).returncode == 0
    assert img("convert", "-O", "raw", "e.qcow2", "ac.raw", cwd=tmp_path).returncode == 0
    assert (qimg("map", "--output", "json", "-f", "raw", "qc.raw", cwd=tmp_path).stdout
            == qimg("map", "--output", "json", "-f", "raw", "ac.raw", cwd=tmp_path).stdout)


@pytest.mark.parametrize(("fmt", "name"), [("vmdk", "x.vmdk"), ("vpc", "x.vhd"), ("vhdx", "x.vhdx"),
                                           ("vdi", "x.vdi"), ("qed", "x.qed"), ("parallels", "x.hdd")])
def test_images_in_formats_we_do_not_implement_are_refused_by_name_not_read_as_raw(
        tmp_path: Path, fmt: str, name: str) -> None:
    qemu_img("create", "-f", fmt, str(tmp_path / name), "16M")
    for cmd in (["info"], ["check"], ["map"], ["convert", "-O", "raw"]):
        args = [*cmd, name] + (["out.raw"] if cmd[0] == "convert" else [])
        r = img(*args, cwd=tmp_path)
        assert r.returncode == 1, (cmd, r.stdout, r.stderr)
        assert r.stderr.strip() == (f"appliance img: Could not open '{name}': image format '{fmt}' "
                                    "is not supported (qcow2 and raw are); convert it with qemu-img "
                                    "convert -O qcow2"), r.stderr
        assert r.stdout == ""
    # Named explicitly as raw, the bytes are served as they are, as QEMU does.
    r = img("info", "-f", "raw", name, cwd=tmp_path)
    assert r.returncode == 0 and "file format: raw" in r.stdout
    assert img("info", "-f", "vmdkk", name, cwd=tmp_path).stderr.strip() == (
        f"appliance img: Could not open '{name}': Unknown driver 'vmdkk'")


def _twin_dirs(tmp_path: Path, make: list[list[str]], io: dict[str, list[str]]) -> tuple[Path, Path]:
    """Two directories holding the same images, one for qemu-img and one for us."""
    q, a = tmp_path / "q", tmp_path / "a"
    for d in (q, a):  # made twice rather than copied: a copy would lose the holes
        d.mkdir()
        for args in make:
            assert qimg(*args, cwd=d).returncode == 0, args
        for name, cmds in io.items():
            qemu_io(d / name, *cmds)
    return q, a


def _same_steps(q: Path, a: Path, steps: list[list[str]]) -> None:
    for args in steps:
        theirs, ours = qimg(*args, cwd=q), img(*args, cwd=a)
        assert ours.stdout == theirs.stdout, (args, ours.stdout, theirs.stdout)
        assert ours.stderr.replace("appliance img:", "qemu-img:") == theirs.stderr, args
        assert ours.returncode == theirs.returncode, args


def test_resize_of_an_image_with_snapshots_keeps_each_snapshots_size_as_qemu_img(tmp_path: Path) -> None:
    q, a = _twin_dirs(tmp_path, [["create", "-f", "qcow2", "s.qcow2", "16M"]],
                      {"s.qcow2": ["write -P 1 0 128k", "write -P 2 15M 64k"]})
    _same_steps(q, a, [["snapshot", "-c", "small", "s.qcow2"], ["resize", "s.qcow2", "+1M"],
                       ["snapshot", "-c", "big", "s.qcow2"], ["resize", "--shrink", "s.qcow2", "8M"],
                       ["amend", "-o", "compat=0.10", "s.qcow2"],  # snapshots of other sizes
                       ["snapshot", "-a", "big", "s.qcow2"]])
    infos = [json.loads(tool("info", "--output", "json", "s.qcow2", cwd=d).stdout)
             for tool, d in ((qimg, q), (img, a))]
    for i in infos:
        for sn in i["snapshots"]:
            del sn["date-sec"], sn["date-nsec"]
        del i["actual-size"]
    assert infos[0] == infos[1]
    assert infos[1]["virtual-size"] == 17 << 20
    _same_steps(q, a, [["snapshot", "-a", "small", "s.qcow2"], ["snapshot", "-d", "big", "s.qcow2"],
                       ["amend", "-o", "compat=0.10", "s.qcow2"],
                       ["resize", "s.qcow2", "+1M"]])  # v2 with a snapshot: refused
    assert qimg("compare", "-q", str(q / "s.qcow2"), str(a / "s.qcow2"), cwd=tmp_path).returncode == 0
    assert qimg("check", str(a / "s.qcow2"), cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_commit_grows_a_smaller_base_to_the_overlays_size(tmp_path: Path, base_fmt: str) -> None:
    q, a = _twin_dirs(tmp_path, [["create", "-f", base_fmt, "b.img", "1M"],
                                 ["create", "-f", "qcow2", "-b", "b.img", "-F", base_fmt, "t.qcow2", "3M"]],
                      {"t.qcow2": ["write -P 9 2M 64k"]})
    _same_steps(q, a, [["commit", "t.qcow2"], ["info", "--output", "json", "-f", base_fmt, "b.img"]])
    assert qimg("compare", "-q", str(q / "b.img"), str(a / "b.img"), cwd=tmp_path).returncode == 0
    data = qimg("convert", "-O", "raw", str(a / "b.img"), str(tmp_path / "out.raw"), cwd=tmp_path)
    assert data.returncode == 0
    assert (tmp_path / "out.raw").read_bytes()[2 << 20:(2 << 20) + 65536] == b"\x09" * 65536


def test_a_missing_backing_file_stops_every_command_that_needs_it_in_qemu_imgs_words(tmp_path: Path) -> None:
    q, a = _twin_dirs(tmp_path, [["create", "-f", "raw", "base.raw", "1M"],
                                 ["create", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw", "d.qcow2", "1M"]],
                      {})
    _same_steps(q, a, [["check", "d.qcow2"], ["map", "d.qcow2"], ["convert", "-O", "raw", "d.qcow2", "o.raw"],
                       ["compare", "d.qcow2", "base.raw"], ["commit", "d.qcow2"], ["info", "d.qcow2"],
                       ["rebase", "-b", "base.raw", "-F", "raw", "d.qcow2"]])


@pytest.mark.parametrize("start", ["none", "old"])
def test_safe_rebase_keeps_zeroes_as_zero_clusters_and_maps_like_qemu_img(tmp_path: Path, start: str) -> None:
    make = [["create", "-f", "raw", "new.raw", "4M"], ["create", "-f", "raw", "old.raw", "4M"]]
    make.append(["create", "-f", "qcow2", "t.qcow2", "4M"] if start == "none" else
                ["create", "-f", "qcow2", "-b", "old.raw", "-F", "raw", "t.qcow2", "4M"])
    q, a = _twin_dirs(tmp_path, make, {"t.qcow2": ["write -P 3 1M 64k"]})
    for d in (q, a):
        qemu_io(d / "new.raw", "write -P 7 0 4M", fmt="raw")
    _same_steps(q, a, [["rebase", "-b", "new.raw", "-F", "raw", "t.qcow2"]])
    maps = [qimg("map", "--output", "json", "t.qcow2", cwd=d).stdout for d in (q, a)]
    if start == "none":
        assert maps[0] == maps[1]
    # Where the old view was zeroes we write zero clusters, no data; qemu-img
    # 7.2 does that only past the old backing file's end and copies zeroes
    # read from it as data.
    assert '{ "start": 0, "length": 1048576, "depth": 0, "present": true, "zero": true, "data": false}' in maps[1]
    assert qimg("compare", "-q", str(q / "t.qcow2"), str(a / "t.qcow2"), cwd=tmp_path).returncode == 0


def test_safe_rebase_of_a_version_2_image_without_backing_keeps_the_guest_view(tmp_path: Path) -> None:
    # v2 has no zero clusters, so zeroes are written as data. (qemu-img 7.2
    # lets the new backing file show through here, against its own manual.)
    qemu_img("create", "-f", "raw", str(tmp_path / "new.raw"), "1M")
    qemu_io(tmp_path / "new.raw", "write -P 7 0 1M", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(tmp_path / "v2.qcow2"), "1M")
    qemu_img("create", "-f", "raw", str(tmp_path / "zero.raw"), "1M")
    assert img("rebase", "-b", "new.raw", "-F", "raw", "v2.qcow2", cwd=tmp_path).returncode == 0
    assert qimg("compare", "v2.qcow2", "zero.raw", cwd=tmp_path).returncode == 0
    assert qimg("check", "v2.qcow2", cwd=tmp_path).returncode == 0


def _bitmap_flags(p: Path) -> dict[str, list[str]]:
    info = json.loads(qimg("info", "--output=json", str(p), cwd=p.parent).stdout)
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"].get("bitmaps", [])}


def test_bitmaps_stay_valid_until_guest_data_changes_and_disabled_ones_stay_valid(tmp_path: Path) -> None:
    p = tmp_path / "bm.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "16M")
    qemu_io(p, "write -P 1 0 1M")
    for args in (["--add", "bm.qcow2", "live"], ["--add", "--disable", "bm.qcow2", "frozen"]):
        assert qimg("bitmap", *args, cwd=tmp_path).returncode == 0
    before = _bitmap_flags(p)
    assert before == {"live": ["auto"], "frozen": []}
    # Opened writable, data unchanged: as qemu-img leaves them.
    for args in (["snapshot", "-c", "s", "bm.qcow2"], ["check", "-r", "all", "bm.qcow2"],
                 ["amend", "-o", "lazy_refcounts=on", "bm.qcow2"], ["snapshot", "-d", "s", "bm.qcow2"],
                 ["rebase", "-u", "-b", "", "bm.qcow2"]):
        assert img(*args, cwd=tmp_path).returncode == 0, args
        assert _bitmap_flags(p) == before, args
    # A data change we do not track: the tracking bitmap is marked, the disabled one is not.
    qemu_img("create", "-f", "raw", str(tmp_path / "new.raw"), "16M")
    assert img("rebase", "-b", "new.raw", "-F", "raw", "bm.qcow2", cwd=tmp_path).returncode == 0
    assert _bitmap_flags(p) == before  # rebase over zeroes onto zeroes wrote nothing
    assert img("resize", "bm.qcow2", "+1M", cwd=tmp_path).returncode == 0
    assert _bitmap_flags(p) == {"live": ["in-use", "auto"], "frozen": []}
    assert qimg("check", "bm.qcow2", cwd=tmp_path).returncode == 0


def _dirty_map(img_path: Path, bitmap: str, sock: Path) -> str:
    """The bitmap's dirty ranges as qemu itself reads them (qemu-nbd + qemu-img map)."""
    srv = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, "-k", str(sock), str(img_path)])
    try:
        for _ in range(100):
            if sock.exists():
                break
            import time

            time.sleep(0.05)
        r = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts",
                            f"driver=nbd,server.type=unix,server.path={sock},"
                            f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"],
                           capture_output=True, text=True, check=True)
        return r.stdout
    finally:
        srv.wait(timeout=10)


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd (qemu-utils) is not installed")
@pytest.mark.parametrize("target_opts", [[], ["-o", "cluster_size=4k"]])
def test_convert_bitmaps_copies_every_bit_flag_and_granularity_as_qemu_img(
        tmp_path: Path, target_opts: list[str]) -> None:
    s = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", str(s), "64M")
    assert qimg("bitmap", "--add", "s.qcow2", "live", cwd=tmp_path).returncode == 0
    assert qimg("bitmap", "--add", "-g", "512k", "s.qcow2", "coarse", cwd=tmp_path).returncode == 0
    qemu_io(s, "write -P 1 0 100k", "write -P 2 20M 1M")
    assert qimg("bitmap", "--add", "--disable", "s.qcow2", "frozen", cwd=tmp_path).returncode == 0
    qemu_io(s, "write -P 3 40M 64k")  # only the enabled bitmaps see this one
    args = ["convert", "--bitmaps", "-O", "qcow2", *target_opts, "s.qcow2"]
    assert qimg(*args, "q.qcow2", cwd=tmp_path).returncode == 0
    r = img(*args, "a.qcow2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    infos = [json.loads(qimg("info", "--output=json", n, cwd=tmp_path).stdout)["format-specific"]["data"]
             for n in ("q.qcow2", "a.qcow2")]
    assert infos[0]["bitmaps"] == infos[1]["bitmaps"]
    assert [b["flags"] for b in infos[1]["bitmaps"]] == [["auto"], ["auto"], []]
    assert qimg("check", "a.qcow2", cwd=tmp_path).returncode == 0
    assert qimg("compare", "-q", "s.qcow2", "a.qcow2", cwd=tmp_path).returncode == 0
    for name in ("live", "coarse", "frozen"):
        theirs = _dirty_map(tmp_path / "q.qcow2", name, tmp_path / "q.sock")
        ours = _dirty_map(tmp_path / "a.qcow2", name, tmp_path / "a.sock")
        assert ours == theirs, name
        # dirty ranges read as not present; the disabled bitmap saw no write
        assert ('"present": false' in ours) is (name != "frozen"), name


def test_convert_bitmaps_refusals_are_qemu_imgs(tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", str(tmp_path / "s.qcow2"), "4M")
    assert qimg("bitmap", "--add", "s.qcow2", "b", cwd=tmp_path).returncode == 0
    qemu_img("create", "-f", "raw", str(tmp_path / "r.raw"), "4M")
    for args in (["--bitmaps", "-O", "raw", "s.qcow2", "o1.raw"],
                 ["--bitmaps", "-O", "qcow2", "r.raw", "o2.qcow2"],
                 ["--bitmaps", "-O", "qcow2", "s.qcow2", "r.raw", "o3.qcow2"],
                 ["--bitmaps", "-O", "qcow2", "-o", "compat=0.10", "s.qcow2", "o4.qcow2"]):
        ours, theirs = img("convert", *args, cwd=tmp_path), qimg("convert", *args, cwd=tmp_path)
        assert ours.returncode == theirs.returncode == 1, args
        assert ours.stderr.replace("appliance img:", "qemu-img:") == theirs.stderr, args
    r = img("convert", "--skip-broken-bitmaps", "-O", "qcow2", "s.qcow2", "o5.qcow2", cwd=tmp_path)
    assert r.returncode == 2 and "requires --bitmaps" in r.stderr


def test_convert_salvage_turns_unreadable_sectors_into_zeroes_as_qemu_img(tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1M")
    qemu_io(p, "write -c -P 7 0 64k", "write -c -P 8 64k 64k", "write -P 9 128k 64k")
    raw = bytearray(p.read_bytes())
    l1 = int.from_bytes(raw[40:48], "big")
    l2 = int.from_bytes(raw[l1:l1 + 8], "big") & 0x00FFFFFFFFFFFE00
    coff = int.from_bytes(raw[l2:l2 + 8], "big") & ((1 << 54) - 1)
    raw[coff:coff + 64] = b"\xff" * 64  # the first compressed cluster no longer inflates
    p.write_bytes(bytes(raw))
    for args in (["-O", "raw", "c.qcow2", "o.raw"], ["--salvage", "-O", "raw", "c.qcow2", "o.raw"]):
        ours, theirs = img("convert", *args, cwd=tmp_path), qimg("convert", *args, cwd=tmp_path)
        assert ours.returncode == theirs.returncode, args
        assert ours.stderr.replace("appliance img:", "qemu-img:") == theirs.stderr, args
    assert qimg("convert", "--salvage", "-O", "raw", "c.qcow2", "q.raw", cwd=tmp_path).returncode == 0
    assert img("convert", "--salvage", "-q", "-O", "raw", "c.qcow2", "a.raw", cwd=tmp_path).stderr == ""
    data = (tmp_path / "a.raw").read_bytes()
    assert data == (tmp_path / "q.raw").read_bytes()
    assert data[:65536] == bytes(65536) and data[65536:131072] == b"\x08" * 65536


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd (qemu-utils) is not installed")
def test_bitmap_command_does_what_qemu_img_bitmap_does(tmp_path: Path) -> None:
    make = [["create", "-f", "qcow2", "i.qcow2", "32M"], ["bitmap", "--add", "i.qcow2", "live"],
            ["create", "-f", "qcow2", "other.qcow2", "32M"], ["bitmap", "--add", "-g", "1M", "other.qcow2", "o"]]
    q, a = _twin_dirs(tmp_path, make, {"i.qcow2": ["write -P 1 0 100k", "write -P 2 9M 64k"],
                                        "other.qcow2": ["write -P 3 20M 4k"]})
    _same_steps(q, a, [
        ["bitmap", "--add", "i.qcow2", "live"],  # exists
        ["bitmap", "--remove", "i.qcow2", "nope"],
        ["bitmap", "--add", "-g", "1000", "i.qcow2", "bad"],
        ["bitmap", "--add", "-g", "128k", "--disable", "--merge", "live", "i.qcow2", "copy"],
        ["bitmap", "--add", "-g", "4k", "i.qcow2", "fine"],
        ["bitmap", "--merge", "live", "i.qcow2", "fine"],
        ["bitmap", "--merge", "o", "-b", "other.qcow2", "-F", "qcow2", "i.qcow2", "fine"],
        ["bitmap", "--add", "i.qcow2", "gone"], ["bitmap", "--remove", "i.qcow2", "gone"],
        ["bitmap", "--add", "i.qcow2", "wiped"], ["bitmap", "--merge", "live", "i.qcow2", "wiped"],
        ["bitmap", "--clear", "--disable", "i.qcow2", "wiped"],
    ])
    infos = [json.loads(qimg("info", "--output=json", "i.qcow2", cwd=d).stdout)["format-specific"]["data"]
             for d in (q, a)]
    assert infos[0]["bitmaps"] == infos[1]["bitmaps"]
    assert qimg("check", "i.qcow2", cwd=a).returncode == 0
    for name in ("live", "copy", "fine", "wiped"):
        assert (_dirty_map(a / "i.qcow2", name, tmp_path / "a.sock")
                == _dirty_map(q / "i.qcow2", name, tmp_path / "q.sock")), name
    # The last bitmap removed takes the extension with it.
    for name in ("live", "copy", "fine", "wiped"):
        assert img("bitmap", "--remove", "i.qcow2", name, cwd=a).returncode == 0
    assert "bitmaps" not in json.loads(qimg("info", "--output=json", "i.qcow2", cwd=a).stdout)[
        "format-specific"]["data"]
    assert qimg("check", "i.qcow2", cwd=a).returncode == 0


def test_amend_of_a_raw_image_is_refused_as_qemu_img_refuses_it(tmp_path: Path) -> None:
    qemu_img("create", "-f", "raw", str(tmp_path / "r.raw"), "1M")
    qemu_img("create", "-f", "qcow2", str(tmp_path / "q.qcow2"), "1M")
    for args in (["-o", "size=2M", "r.raw"], ["-f", "raw", "-o", "size=2M", "q.qcow2"]):
        ours, theirs = img("amend", *args, cwd=tmp_path), qimg("amend", *args, cwd=tmp_path)
        assert ours.returncode == theirs.returncode == 1, (args, ours.stderr)
        assert ours.stderr.replace("appliance img:", "qemu-img:") == theirs.stderr, args


def test_compare_skips_nothing_it_must_read_and_orders_messages_as_qemu_img(tmp_path: Path) -> None:
    # Zero clusters, unallocated ranges, data, zeroes written as data, a
    # bigger image with data or zeroes past the common end, raw and qcow2.
    specs = {
        "data.qcow2": ("8M", ["write -P 1 1M 64k"]),
        "zflag.qcow2": ("8M", ["write -z 1M 64k"]),
        "empty.qcow2": ("8M", []),
        "zdata.qcow2": ("8M", ["write -P 0 1M 64k"]),
        "late.qcow2": ("8M", ["write -P 2 7M 4k"]),
        "bigtail.qcow2": ("12M", ["write -P 3 9M 4k"]),
        "bigzero.qcow2": ("12M", ["write -z 9M 64k"]),
    }
    for name, (size, cmds) in specs.items():
        qemu_img("create", "-f", "qcow2", str(tmp_path / name), size)
        if cmds:
            qemu_io(tmp_path / name, *cmds)
    qemu_img("create", "-f", "raw", str(tmp_path / "hole.raw"), "8M")
    names = [*specs, "hole.raw"]
    for x in names:
        for y in names:
            for strict in ([], ["-s"]):
                same_as_qemu_img_here(tmp_path, "compare", *strict, x, y)
    same_stdout_and_rc(tmp_path, "compare", "-s", "data.qcow2", "zdata.qcow2")  # and as its own process


@pytest.mark.parametrize("holder_writes", [True, False])
def test_commands_respect_qemus_image_locks_as_qemu_img_does(tmp_path: Path, holder_writes: bool) -> None:
    from appliance.storage.locking import lock_image

    p = tmp_path / "busy.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "16M")
    # Another user of the image, holding QEMU's lock bytes (a VM writing it, or reading it).
    fd = os.open(p, os.O_RDWR if holder_writes else os.O_RDONLY)
    try:
        lock_image(fd, str(p), write=holder_writes)
        for args in (["info", "busy.qcow2"], ["info", "-U", "busy.qcow2"], ["check", "busy.qcow2"],
                     ["map", "busy.qcow2"], ["snapshot", "-l", "busy.qcow2"], ["resize", "busy.qcow2", "+1M"],
                     ["snapshot", "-c", "s", "busy.qcow2"], ["convert", "-O", "raw", "busy.qcow2", "o.raw"],
                     ["convert", "-U", "-O", "raw", "busy.qcow2", "o.raw"], ["check", "-r", "all", "busy.qcow2"]):
            ours, theirs = img(*args, cwd=tmp_path), qimg(*args, cwd=tmp_path)
            assert ours.returncode == theirs.returncode, (args, ours.stderr, theirs.stderr)
            assert ours.stderr.replace("appliance img:", "qemu-img:") == theirs.stderr, args
            # each side's resize/snapshot must have done the same to the image
            assert qimg("info", "-U", "--output=json", "busy.qcow2", cwd=tmp_path).returncode == 0
    finally:
        os.close(fd)
    assert img("info", "busy.qcow2", cwd=tmp_path).returncode == 0  # the locks went with the fd


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("size", ["4M", "1G"])
def test_preallocated_images_are_allocated_like_qemu_imgs(tmp_path: Path, mode: str, size: str) -> None:
    # preallocation=full once zero-filled past the first hole over the L2
    # table, leaving every cluster leaked and the disk unallocated.
    for tool, name in ((qimg, "q.qcow2"), (img, "a.qcow2")):
        assert tool("create", "-q", "-f", "qcow2", "-o", f"preallocation={mode}", name, size,
                    cwd=tmp_path).returncode == 0
    r = qimg("check", "a.qcow2", cwd=tmp_path)
    assert r.returncode == 0 and "No errors" in r.stdout, r.stdout
    maps = [json.loads(qimg("map", "--output=json", n, cwd=tmp_path).stdout) for n in ("q.qcow2", "a.qcow2")]
    shape = [[(e["start"], e["length"], e["present"], e["zero"], e["data"]) for e in m] for m in maps]
    if mode != "metadata":  # one contiguous run of data in both
        assert len(maps[0]) == len(maps[1]) == 1
    assert shape[0] == shape[1]
    assert (tmp_path / "a.qcow2").stat().st_size == (tmp_path / "q.qcow2").stat().st_size


def _map_shape(path: Path) -> list[tuple[int, int, tuple[bool, bool, int, bool]]]:
    """map --output=json with extents of the same kind merged (host offsets aside)."""
    out: list[list[Any]] = []
    for e in json.loads(qimg("map", "--output=json", str(path), cwd=path.parent).stdout):
        k = (e["zero"], e["data"], e["depth"], e["present"])
        if out and out[-1][2] == k and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], k])
    return [(s, n, k) for s, n, k in out]


@pytest.mark.parametrize("opts", [["-O", "qcow2", "-S", "0"], ["-O", "raw", "-S", "0"],
                                  ["-O", "qcow2", "-S", "0", "-c"],
                                  ["-O", "qcow2", "-B", "base.raw", "-F", "raw"],
                                  ["-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2"],
                                  ["-O", "qcow2", "-c", "-B", "base.raw", "-F", "raw"]])
@pytest.mark.parametrize("src", ["top.qcow2", "base.raw"])
def test_convert_allocates_the_target_as_qemu_img_for_S0_and_B(tmp_path: Path, opts: list[str], src: str) -> None:
    # -S 0 writes zeroes as data; -B copies only what the source's top image
    # holds and leaves the rest to the target's backing file.
    make = [["create", "-f", "raw", "base.raw", "8M"],
            ["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2"],
            ["create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"]]
    q, a = _twin_dirs(tmp_path, make, {"top.qcow2": ["write -P 3 0 4k", "write -z 2M 64k", "discard 5M 64k"]})
    for d in (q, a):
        qemu_io(d / "base.raw", "write -P 1 0 1M", "write -P 2 5M 64k", fmt="raw")
        qemu_io(d / "mid.qcow2", "write -P 4 3M 64k")
    assert qimg("convert", *opts, src, "out.img", cwd=q).returncode == 0
    r = img("convert", *opts, src, "out.img", cwd=a)
    assert r.returncode == 0, r.stderr
    assert _map_shape(a / "out.img") == _map_shape(q / "out.img")
    assert qimg("compare", "-q", str(q / "out.img"), str(a / "out.img"), cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_preallocated_overlay_with_extended_l2_keeps_showing_its_backing_file(tmp_path: Path, mode: str) -> None:
    # Preallocated clusters keep every subcluster unallocated: an overlay made
    # that way read zeroes over its backing file before.
    qemu_img("create", "-f", "raw", str(tmp_path / "base.raw"), "4M")
    qemu_io(tmp_path / "base.raw", "write -P 7 0 4M", fmt="raw")
    for tool, name in ((qimg, "q.qcow2"), (img, "a.qcow2")):
        assert tool("create", "-q", "-f", "qcow2", "-o", f"extended_l2=on,preallocation={mode}",
                    "-b", "base.raw", "-F", "raw", name, cwd=tmp_path).returncode == 0
    assert qimg("compare", "a.qcow2", "base.raw", cwd=tmp_path).returncode == 0
    assert qimg("check", "a.qcow2", cwd=tmp_path).returncode == 0
    assert _map_shape(tmp_path / "a.qcow2") == _map_shape(tmp_path / "q.qcow2")


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full", "bogus"])
def test_resize_preallocation_does_what_qemu_img_does(tmp_path: Path, fmt: str, mode: str) -> None:
    q, a = _twin_dirs(tmp_path, [["create", "-f", fmt, "i.img", "4M"]], {"i.img": ["write -P 1 0 64k"]}
                      if fmt == "qcow2" else {})
    for args in (["-f", fmt, f"--preallocation={mode}", "i.img", "+4M"],
                 ["-f", fmt, "--shrink", f"--preallocation={mode}", "i.img", "2M"]):
        _same_steps(q, a, [["resize", *args]])
    assert _map_shape(a / "i.img") == _map_shape(q / "i.img")
    assert qimg("compare", "-q", str(q / "i.img"), str(a / "i.img"), cwd=tmp_path).returncode == 0


def test_snapshot_table_pads_names_by_bytes_as_qemu_img(tmp_path: Path) -> None:
    p = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1M")
    for name in ("ünïcødé", "a-name-longer-than-the-tag-column", "plain"):
        assert qimg("snapshot", "-c", name, "s.qcow2", cwd=tmp_path).returncode == 0
    ours, theirs = (tool("snapshot", "-l", "s.qcow2", cwd=tmp_path).stdout for tool in (img, qimg))
    # The dates can tick between the two runs; the layout may not.
    date = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
    assert date.sub("D", ours) == date.sub("D", theirs)
    assert "ünïcødé           0 B" in ours  # 16 bytes of tag column, as printf pads


@pytest.mark.parametrize("args", [
    ["-f", "qcow2", "-o", "size=1M", "t.qcow2"],
    ["-f", "qcow2", "-o", "size=1M", "t.qcow2", "2M"],
    ["-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "-o", "size=32M", "t.qcow2"],
    ["-f", "raw", "-o", "size=2M", "t.qcow2"],
])
def test_create_takes_the_size_from_o_size_as_qemu_img(tmp_path: Path, args: list[str]) -> None:
    q, a = _twin_dirs(tmp_path, [["create", "-f", "qcow2", "b.qcow2", "16M"]], {})
    _same_steps(q, a, [["create", *args]])
    infos = [qimg("info", "--output=json", "t.qcow2", cwd=d) for d in (q, a)]
    assert infos[0].returncode == infos[1].returncode
    if infos[0].returncode == 0:
        assert json.loads(infos[0].stdout)["virtual-size"] == json.loads(infos[1].stdout)["virtual-size"]


@pytest.mark.parametrize("args", [
    ["info", "--image-opts", "driver=qcow2,file.filename=i.qcow2"],
    ["info", "--image-opts", "driver=qcow2,file.driver=file,file.filename=i.qcow2,cache.direct=off"],
    ["map", "--output=json", "--image-opts", "file.filename=i.qcow2"],
    ["check", "--image-opts", "driver=qcow2,file.filename=i.qcow2"],
    ["info", "--object", "secret,id=s0,data=x", "i.qcow2"],
    ["convert", "--image-opts", "-O", "raw", "driver=qcow2,file.filename=i.qcow2", "o.raw"],
])
def test_image_opts_and_object_are_taken_as_qemu_img_takes_them(tmp_path: Path, args: list[str]) -> None:
    qemu_img("create", "-f", "qcow2", str(tmp_path / "i.qcow2"), "4M")
    qemu_io(tmp_path / "i.qcow2", "write -P 1 0 64k")
    same_stdout_and_rc(tmp_path, *args)


def test_version_is_answered_like_qemu_img(tmp_path: Path) -> None:
    for flag in ("--version", "-V"):
        r = img(flag, cwd=tmp_path)
        assert r.returncode == 0 and re.match(r"appliance img version \S+ \(qemu-img 7\.2 compatible\)$",
                                              r.stdout.splitlines()[0]), r.stdout


def test_create_and_convert_refuse_a_target_in_use_before_touching_it(tmp_path: Path) -> None:
    from appliance.storage.locking import lock_image

    qemu_img("create", "-f", "qcow2", str(tmp_path / "src.qcow2"), "4M")
    qemu_io(tmp_path / "src.qcow2", "write -P 3 0 64k")
    busy = tmp_path / "busy.qcow2"
    qemu_img("create", "-f", "qcow2", str(busy), "16M")
    before = busy.read_bytes()
    fd = os.open(busy, os.O_RDWR)
    try:
        lock_image(fd, str(busy), write=True)  # a VM writing it
        for args in (["create", "-f", "qcow2", "busy.qcow2", "1M"],
                     ["convert", "-O", "raw", "src.qcow2", "busy.qcow2"]):
            r = img(*args, cwd=tmp_path)
            assert r.returncode == 1 and 'Failed to get "write" lock' in r.stderr, (args, r.stderr)
            assert busy.read_bytes() == before, args
    finally:
        os.close(fd)


def test_convert_backing_rules_and_short_targets_as_qemu_img(tmp_path: Path) -> None:
    make = [["create", "-f", "qcow2", "b.qcow2", "16M"],
            ["create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2"],
            ["create", "-f", "qcow2", "small.qcow2", "8M"]]
    q, a = _twin_dirs(tmp_path, make, {"b.qcow2": ["write -P 1 0 16M"], "t.qcow2": ["write -z 2M 64k"]})
    _same_steps(q, a, [["convert", "-O", "raw", "-B", "b.qcow2", "-F", "qcow2", "t.qcow2", "o1.raw"],
                       ["convert", "-O", "qcow2", "-o", "backing_file=b.qcow2,backing_fmt=qcow2", "t.qcow2",
                        "o2.qcow2"],
                       ["convert", "-n", "-O", "qcow2", "t.qcow2", "small.qcow2"]])
    assert qimg("compare", "o2.qcow2", "t.qcow2", cwd=a).returncode == 0
    assert _map_shape(a / "o2.qcow2") == _map_shape(q / "o2.qcow2")


def test_image_opts_escapes_commas_and_refuses_what_qemu_img_refuses(tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", str(tmp_path / "io.img"), "1M")
    qemu_img("create", "-f", "qcow2", str(tmp_path / "io.img,x"), "2M")
    for args in (["info", "--image-opts", "driver=qcow2,file.filename=io.img,,x"],
                 ["info", "--image-opts", "driver=qcow2,file.filename=io.img,bogus=1"],
                 ["info", "-f", "qcow2", "--image-opts", "driver=qcow2,file.filename=io.img"]):
        ours, theirs = img(*args, cwd=tmp_path), qimg(*args, cwd=tmp_path)
        assert ours.stdout == theirs.stdout, args
        assert ours.stderr.replace("appliance img:", "qemu-img:") == theirs.stderr, args
        assert (ours.returncode == 0) == (theirs.returncode == 0), args
    r = img("dd", "--image-opts", "if=driver=qcow2,file.filename=io.img,,x", "of=o.raw", "bs=64k", "count=1",
            cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "o.raw").stat().st_size == 65536, r.stderr


def test_bitmap_add_refuses_what_qemu_could_not_open_and_inconsistent_bitmaps_stay_out(tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", str(tmp_path / "n.qcow2"), "16M")
    qemu_img("create", "-f", "qcow2", str(tmp_path / "z.qcow2"), "0")
    qemu_img("create", "-f", "qcow2", str(tmp_path / "big.qcow2"), "8T")
    for args, needle in ((["--add", "n.qcow2", ""], "Bitmap name cannot be empty"),
                         (["--add", "n.qcow2", "x" * 1024], "Name length exceeds maximum (1023 characters)"),
                         (["--add", "-g", "512", "big.qcow2", "b"], "Too much space will be occupied"),
                         (["--add", "z.qcow2", "b"], "the disk is empty")):
        r = img("bitmap", *args, cwd=tmp_path)
        assert r.returncode == 1 and needle in r.stderr, (args, r.stderr)
    assert img("bitmap", "--add", "-g", "0", "n.qcow2", "dflt", cwd=tmp_path).returncode == 0
    assert _bitmap_flags(tmp_path / "n.qcow2") == {"dflt": ["auto"]}
    for name in ("n.qcow2", "big.qcow2", "z.qcow2"):
        assert qimg("check", name, cwd=tmp_path).returncode == 0, name
    # An inconsistent bitmap is not merged from and blocks a resize, as in qemu-img.
    p = tmp_path / "n.qcow2"
    assert img("bitmap", "--add", "n.qcow2", "dst", cwd=tmp_path).returncode == 0
    from appliance.qcow2.header import EXT_BITMAPS, parse_header

    raw = bytearray(p.read_bytes())
    ext = parse_header(bytes(raw[:65536])).ext(EXT_BITMAPS)
    assert ext is not None
    d_off = int.from_bytes(ext[16:24], "big")  # the live directory (old ones linger in freed clusters)
    nb = raw.find(b"dflt", d_off)  # the entry's flags sit 24 bytes before its name
    raw[nb - 24 + 15] |= 1  # flags (big-endian u32 at +12): set in_use
    p.write_bytes(bytes(raw))
    assert "in-use" in _bitmap_flags(p)["dflt"]
    r = img("bitmap", "--merge", "dflt", "n.qcow2", "dst", cwd=tmp_path)
    assert r.returncode == 1 and "Bitmap 'dflt' is inconsistent and cannot be used" in r.stderr
    r = img("resize", "n.qcow2", "+1M", cwd=tmp_path)
    assert r.returncode == 1 and "Bitmap 'dflt' is inconsistent and cannot be used" in r.stderr


def test_convert_bitmaps_into_an_existing_target_as_qemu_img(tmp_path: Path) -> None:
    make = [["create", "-f", "qcow2", "s.qcow2", "64M"], ["bitmap", "--add", "s.qcow2", "small"],
            ["create", "-f", "qcow2", "big.qcow2", "1G"],
            ["create", "-f", "qcow2", "same.qcow2", "64M"], ["bitmap", "--add", "same.qcow2", "small"],
            ["create", "-f", "qcow2", "other.qcow2", "64M"], ["bitmap", "--add", "other.qcow2", "other"]]
    q, a = _twin_dirs(tmp_path, make, {"s.qcow2": ["write 0 64k"]})
    _same_steps(q, a, [["convert", "-n", "--bitmaps", "-O", "qcow2", "s.qcow2", "big.qcow2"],
                       ["convert", "-n", "--bitmaps", "-O", "qcow2", "s.qcow2", "same.qcow2"],
                       ["convert", "-n", "--bitmaps", "-O", "qcow2", "s.qcow2", "other.qcow2"]])
    for name in ("big.qcow2", "same.qcow2", "other.qcow2"):
        assert qimg("check", name, cwd=a).returncode == 0, name
        assert set(_bitmap_flags(a / name)) == set(_bitmap_flags(q / name)), name
    # The copied bitmap is consistent; the target's own tracking bitmap saw
    # writes we do not track, so it is marked in-use (qemu-img tracks them).
    assert _bitmap_flags(a / "other.qcow2") == {"other": ["in-use", "auto"], "small": ["auto"]}
    assert _bitmap_flags(a / "same.qcow2") == {"small": ["auto"]}  # refused before any write


@pytest.mark.parametrize("ext", ["off", "on"])
@pytest.mark.parametrize("mode", ["off", "metadata", "falloc", "full"])
def test_a_grown_overlay_reads_zeroes_where_its_longer_backing_file_has_data(
        tmp_path: Path, ext: str, mode: str) -> None:
    make = [["create", "-f", "qcow2", "b.qcow2", "8M"],
            ["create", "-f", "qcow2", "-o", f"extended_l2={ext}", "-b", "b.qcow2", "-F", "qcow2", "ov.qcow2", "4M"]]
    q, a = _twin_dirs(tmp_path, make, {"b.qcow2": ["write -P 1 0 8M"]})
    _same_steps(q, a, [["resize", f"--preallocation={mode}", "ov.qcow2", "8M"]])
    assert qimg("compare", "-q", str(q / "ov.qcow2"), str(a / "ov.qcow2"), cwd=tmp_path).returncode == 0
    assert qimg("check", "ov.qcow2", cwd=a).returncode == 0
    r = subprocess.run(["qemu-io", "-c", "read -P 0 4M 4M", "-c", "read -P 1 0 4M", str(a / "ov.qcow2")],
                       capture_output=True, text=True)
    assert "failed" not in r.stdout + r.stderr


def test_option_lists_sector_sizes_and_late_options_as_qemu_img(tmp_path: Path) -> None:
    (tmp_path / "c1.img").write_bytes(bytes(196616))  # not a whole number of sectors
    qemu_img("create", "-f", "qcow2", str(tmp_path / "s.qcow2"), "1M")
    qemu_io(tmp_path / "s.qcow2", "write -P 5 0 64k")
    r = img("create", "-f", "qcow2", "-o", "size=1M,", "x1.qcow2", cwd=tmp_path)
    assert r.returncode == 2 and not (tmp_path / "x1.qcow2").exists()
    # QEMU's file driver creates the file before it refuses the mode: it is left empty.
    ours, theirs = same_stdout_and_rc(tmp_path, "create", "-f", "raw", "-o", "preallocation=metadata",
                                      "x2.raw", "1M")
    assert ours.replace("appliance img", "qemu-img") == theirs
    assert (tmp_path / "x2.raw").stat().st_size == 0
    same_stdout_and_rc(tmp_path, "create", "-q", "-f", "qcow2", "-b", "c1.img", "-F", "raw", "x3.qcow2")
    assert json.loads(qimg("info", "--output=json", "x3.qcow2", cwd=tmp_path).stdout)["virtual-size"] == 197120
    # options after the file names, as getopt lets qemu-img take them
    assert img("convert", "s.qcow2", "-O", "raw", "o.raw", cwd=tmp_path).returncode == 0
    assert qimg("compare", "-q", "s.qcow2", "o.raw", cwd=tmp_path).returncode == 0
