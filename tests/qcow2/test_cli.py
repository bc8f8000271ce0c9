"""`appliance img` against `qemu-img`: same JSON fields and values, same exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.qcow2 import open_image
from tests.conftest import ROOT, needs_qemu_img
from tests.qcow2.helpers import check_clean, oracle_raw, qemu_img, qemu_io

pytestmark = needs_qemu_img


def img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "appliance.cli.main", "img", *args], cwd=ROOT,
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"appliance img {' '.join(args)}: rc {r.returncode}\n"
                             f"{r.stdout}{r.stderr}")
    return r


def both_json(*args: str) -> tuple[object, object]:
    ours = json.loads(img(*args, check=False).stdout)
    theirs = json.loads(qemu_img(*args, check=False).stdout)
    return ours, theirs


def _drop(d: object, *keys: str) -> object:
    if isinstance(d, list):
        return [_drop(x, *keys) for x in d]
    if isinstance(d, dict):
        return {k: _drop(v, *keys) for k, v in d.items() if k not in keys}
    return d


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", str(base), "8M")
    qemu_io(base, "write -P 1 0 1M", "write -z 2M 64k", "write -P 2 3M 12k")
    qemu_img("snapshot", "-c", "snap1", str(base))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top), "10M")
    qemu_io(top, "write -P 3 512k 1M", "write -z 4M 8k", "discard 0 64k")
    return top


@pytest.mark.parametrize("opts", ["compat=0.10", "compat=1.1",
                                  "extended_l2=on,compression_type=zstd,lazy_refcounts=on"])
def test_info_json_matches_qemu(tmp_path: Path, opts: str) -> None:
    p = tmp_path / "i.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, str(p), "5G")
    ours, theirs = both_json("info", "--output=json", str(p))
    assert _drop(ours, "actual-size") == _drop(theirs, "actual-size")


def test_info_backing_chain_and_snapshots_match_qemu(chain: Path) -> None:
    ours, theirs = both_json("info", "--output=json", "--backing-chain", str(chain))
    assert _drop(ours, "actual-size") == _drop(theirs, "actual-size")
    human = img("info", "--backing-chain", str(chain)).stdout
    assert "Snapshot list:" in human and "snap1" in human
    assert "backing file: base.qcow2" in human


def test_map_json_matches_qemu(chain: Path) -> None:
    ours = img("map", "--output=json", str(chain)).stdout
    theirs = qemu_img("map", "--output=json", str(chain)).stdout
    assert json.loads(ours) == json.loads(theirs)


def test_check_json_matches_qemu(chain: Path) -> None:
    for path in (chain, chain.parent / "base.qcow2"):
        ours, theirs = both_json("check", "--output=json", str(path))
        assert ours == theirs


def test_create_matches_qemu_create(tmp_path: Path) -> None:
    for opts in ("cluster_size=16k,refcount_bits=8", "compat=0.10", "extended_l2=on"):
        a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
        ours = img("create", "-f", "qcow2", "-o", opts, str(a), "3G").stdout
        theirs = qemu_img("create", "-f", "qcow2", "-o", opts, str(b), "3G").stdout
        assert ours.replace("a.qcow2", "b.qcow2") == theirs
        check_clean(a)
        x, y = both_json("info", "--output=json", str(a))
        z = json.loads(qemu_img("info", "--output=json", str(b)).stdout)
        assert _drop(x, "actual-size", "filename") == _drop(z, "actual-size", "filename")
        a.unlink()
        b.unlink()


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_create_preallocated_is_clean(tmp_path: Path, mode: str) -> None:
    p = tmp_path / "p.qcow2"
    img("create", "-f", "qcow2", "-o", f"preallocation={mode},cluster_size=4k", str(p), "2M")
    check_clean(p)
    m = json.loads(qemu_img("map", "--output=json", str(p)).stdout)
    assert all(e["data"] for e in m)
    qemu_io(p, "read -P 0 0 2M")


async def _leak(path: Path) -> None:
    im = await open_image(path, read_only=False, fmt="qcow2")
    async with im._lock:
        c = await im._alloc_clusters(2)
        await im._pwrite(c << im._cb, bytes(2 * im._cs))  # inside the file, as leaks are
        await im._flush_refcounts()
    im._closed = True
    im._close_fds()


def test_check_leaks_exit_3_and_repair(tmp_path: Path) -> None:
    import asyncio

    p = tmp_path / "l.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "4M")
    qemu_io(p, "write -P 9 0 200k")
    asyncio.run(_leak(p))
    assert qemu_img("check", str(p), check=False).returncode == 3
    r = img("check", str(p), check=False)
    assert r.returncode == 3 and "2 leaked clusters were found" in r.stdout
    j = json.loads(img("check", "--output=json", str(p), check=False).stdout)
    assert j["leaks"] == 2
    r = img("check", "-r", "leaks", str(p), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    check_clean(p)
    qemu_io(p, "read -P 9 0 200k")


def test_check_corruption_exit_2_and_repair_all(tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "4M")
    qemu_io(p, "write -P 9 0 64k")
    raw = bytearray(p.read_bytes())
    # Refcount block at 0x20000 (16-bit entries); zero the refcount of the data cluster.
    data_cluster = 5  # header, reftable, refblock, L1, L2, then data
    raw[0x20000 + 2 * data_cluster : 0x20000 + 2 * data_cluster + 2] = b"\0\0"
    p.write_bytes(bytes(raw))
    assert qemu_img("check", str(p), check=False).returncode == 2
    assert img("check", str(p), check=False).returncode == 2
    r = img("check", "-r", "all", str(p), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    check_clean(p)
    qemu_io(p, "read -P 9 0 64k")


def test_convert_compare_commit_rebase_resize_amend(chain: Path, tmp_path: Path) -> None:
    expect = oracle_raw(chain, tmp_path)
    out = tmp_path / "flat.qcow2"
    img("convert", "-O", "qcow2", "-o", "cluster_size=16k", str(chain), str(out))
    check_clean(out)
    assert img("compare", str(chain), str(out)).returncode == 0
    zc = tmp_path / "z.qcow2"
    img("convert", "-c", "-O", "qcow2", str(chain), str(zc))
    check_clean(zc)
    assert oracle_raw(zc, tmp_path) == expect
    raw = tmp_path / "flat.raw"
    img("convert", "-O", "raw", str(chain), str(raw))
    assert raw.read_bytes() == expect
    # Mismatch exit code and message.
    qemu_io(out, "write -P 0x42 4096 1")
    r = img("compare", str(chain), str(out), check=False)
    assert r.returncode == 1 and "Content mismatch at offset 4096!" in r.stdout
    # Rebase the top onto nothing (safe): contents stay.
    img("rebase", "-b", "", str(chain))
    assert "backing" not in json.dumps(json.loads(qemu_img("info", "--output=json",
                                                            str(chain)).stdout))
    assert oracle_raw(chain, tmp_path) == expect
    check_clean(chain)
    # Resize grow, then lazy refcounts on.
    img("resize", str(chain), "+3M")
    info = json.loads(qemu_img("info", "--output=json", str(chain)).stdout)
    assert info["virtual-size"] == 13 * 1024 * 1024
    img("amend", "-o", "lazy_refcounts=on", str(chain))
    assert json.loads(qemu_img("info", "--output=json", str(chain)).stdout)[
        "format-specific"]["data"]["lazy-refcounts"] is True
    check_clean(chain)


def test_commit_moves_top_into_base(tmp_path: Path) -> None:
    base = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -P 1 0 4M")
    top = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(top))
    qemu_io(top, "write -P 2 100k 300k", "write -z 2M 64k")
    expect = oracle_raw(top, tmp_path)
    assert "Image committed." in img("commit", str(top)).stdout
    assert oracle_raw(base, tmp_path) == expect
    assert oracle_raw(top, tmp_path) == expect
    check_clean(base)
    check_clean(top)
    m = json.loads(qemu_img("map", "--output=json", str(top)).stdout)
    assert all(e["depth"] == 1 for e in m if e["data"])


def test_snapshot_subcommand_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "s.qcow2"
    img("create", "-f", "qcow2", str(p), "4M")
    qemu_io(p, "write -P 5 0 1M")
    img("snapshot", "-c", "first", str(p))
    qemu_io(p, "write -P 6 0 1M")
    listed = img("snapshot", "-l", str(p)).stdout
    assert "first" in listed and listed == qemu_img("snapshot", "-l", str(p)).stdout
    img("snapshot", "-a", "first", str(p))
    qemu_io(p, "read -P 5 0 1M")
    img("snapshot", "-d", "first", str(p))
    check_clean(p)
    assert qemu_img("snapshot", "-l", str(p)).stdout == ""


def test_bench_runs_and_leaves_a_clean_image(tmp_path: Path) -> None:
    p = tmp_path / "b.qcow2"
    img("create", "-q", "-f", "qcow2", str(p), "64M")
    r = img("bench", "-w", "-c", "1000", "-d", "8", "-s", "4k", "-S", "64k", "--pattern=0x33",
            "-t", "none", str(p))
    assert "Sending 1000 write requests, 4096 bytes each, 8 in parallel" in r.stdout
    assert "Run completed in" in r.stdout
    check_clean(p)
    qemu_io(p, "read -P 0x33 0 4k", "read -P 0 4k 60k", "read -P 0x33 64k 4k")
    r = img("bench", "-c", "500", "-d", "32", "-s", "64k", str(p))
    assert "500 read requests" in r.stdout


def test_bench_over_holes_finishes(tmp_path: Path) -> None:
    """Reads of unallocated clusters complete without waiting; thousands in a row must
    not nest the next request inside the last one's completion without end."""
    p = tmp_path / "h.qcow2"
    img("create", "-q", "-f", "qcow2", str(p), "64M")
    for cache in ("writeback", "none"):
        r = img("bench", "-c", "20000", "-d", "4", "-s", "4k", "-t", cache, str(p))
        assert "Run completed in" in r.stdout


def test_bench_buffer_per_request_writes_the_pattern_from_every_slot(tmp_path: Path) -> None:
    p = tmp_path / "b.qcow2"
    img("create", "-q", "-f", "qcow2", str(p), "16M")
    # 64 requests of 64 KiB from 16 slots, each slot with its own buffer: all carry the pattern.
    img("bench", "-w", "-c", "64", "-d", "16", "-s", "64k", "--pattern=0x6c",
        "--buffer-per-request", "-t", "none", "-i", "native", str(p))
    check_clean(p)
    qemu_io(p, "read -P 0x6c 0 4M", "read -P 0 4M 12M")
    img("bench", "-c", "64", "-d", "16", "-s", "64k", "--buffer-per-request", "-t", "none",
        "-i", "threads", str(p))


def test_bad_option_value_exits_2_with_one_line(tmp_path: Path) -> None:
    r = img("create", "-f", "qcow2", "-o", "cluster_size=3k", str(tmp_path / "x"), "1M",
            check=False)
    assert r.returncode == 1 and "Cluster size must be a power of two" in r.stderr
    r = img("create", "-f", "qcow2", "-o", "bogus=1", str(tmp_path / "x"), "1M", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_resize_shrink_needs_the_flag_and_frees_clusters(tmp_path: Path) -> None:
    p = tmp_path / "r.qcow2"
    img("create", "-q", "-f", "qcow2", str(p), "8M")
    qemu_io(p, "write -P 7 0 8M")
    r = img("resize", str(p), "4M", check=False)
    assert r.returncode == 1 and "--shrink" in r.stderr
    assert "Image resized." in img("resize", "--shrink", str(p), "4M").stdout
    check_clean(p)
    info = json.loads(qemu_img("info", "--output=json", str(p)).stdout)
    assert info["virtual-size"] == 4 * 1024 * 1024
    qemu_io(p, "read -P 7 0 4M")
    img("resize", str(p), "+4M")
    qemu_io(p, "read -P 0 4M 4M")  # grown space reads as zeroes, old data is gone
    check_clean(p)


def test_rebase_unsafe_only_rewrites_the_header(tmp_path: Path) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(b"\1" * 1024 * 1024)
    b.write_bytes(b"\2" * 1024 * 1024)
    top = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "a.raw", "-F", "raw", str(top))
    img("rebase", "-u", "-b", "b.raw", "-F", "raw", str(top))
    info = json.loads(qemu_img("info", "--output=json", str(top)).stdout)
    assert info["backing-filename"] == "b.raw" and info["backing-filename-format"] == "raw"
    qemu_io(top, "read -P 2 0 1M")
    check_clean(top)


def test_convert_progress_reaches_100(tmp_path: Path) -> None:
    src = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", str(src), "4M")
    qemu_io(src, "write -P 1 0 1M")
    r = img("convert", "-p", "-O", "raw", str(src), str(tmp_path / "o.raw"))
    assert "(100.00/100%)" in r.stdout


def test_check_counts_an_unreadable_refcount_block_as_corruption(tmp_path: Path) -> None:
    p = tmp_path / "rb.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "4M")
    qemu_io(p, "write -P 9 0 64k")
    raw = bytearray(p.read_bytes())
    raw[0x10000 : 0x10008] = (0x7FFF0000).to_bytes(8, "big")  # refblock 0 far past EOF
    p.write_bytes(bytes(raw))
    r = img("check", str(p), check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert qemu_img("check", str(p), check=False).returncode == 2
    r = img("check", "-r", "all", str(p), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    check_clean(p)
    qemu_io(p, "read -P 9 0 64k")


def test_bitmaps_are_kept_marked_in_use_and_counted(tmp_path: Path) -> None:
    """qemu-img made bitmaps: info matches, check counts their clusters, and after our
    writes they stay referenced (no leaks), flagged in-use (possibly inconsistent)."""
    p = tmp_path / "bm.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "64M")
    qemu_io(p, "write -P 1 0 1M")
    qemu_img("bitmap", "--add", str(p), "b0")
    qemu_img("bitmap", "--add", "-g", "512k", str(p), "b1")
    qemu_io(p, "write -P 2 2M 1M")
    ours, theirs = both_json("info", "--output=json", str(p))
    assert _drop(ours, "actual-size") == _drop(theirs, "actual-size")
    assert img("check", str(p)).stdout == qemu_img("check", str(p)).stdout
    import asyncio

    async def write() -> None:
        im = await open_image(p, read_only=False, fmt="qcow2")
        await im.writev(0, [memoryview(b"x" * 4096)])
        await im.close()

    asyncio.run(write())
    r = qemu_img("check", str(p), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(qemu_img("info", "--output=json", str(p)).stdout)
    flags = [b["flags"] for b in info["format-specific"]["data"]["bitmaps"]]
    assert all("in-use" in f for f in flags)


def test_closed_pipe_and_missing_file_give_no_traceback(tmp_path) -> None:
    """`appliance img … | head` stops quietly; a missing image is named in one line."""
    import subprocess
    import sys

    missing = tmp_path / "nope.qcow2"
    r = subprocess.run([sys.executable, "-m", "appliance.cli.main", "img", "info", str(missing)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"appliance img: Could not open '{missing}': Could not open '{missing}': "
                                "No such file or directory")
    img = tmp_path / "a.qcow2"
    subprocess.run([sys.executable, "-m", "appliance.cli.main", "img", "create", "-f", "qcow2", str(img), "1G"],
                   check=True, capture_output=True)
    p = subprocess.Popen([sys.executable, "-m", "appliance.cli.main", "img", "map", "--output", "json", str(img)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    p.stdout.close()  # the reader goes away before the first line
    _, err = p.communicate(timeout=60)
    assert b"Traceback" not in err and b"Broken pipe" not in err


def test_amend_refcount_bits_rewrites_refcounts_like_qemu(chain: Path, tmp_path: Path) -> None:
    """The chain's base (a snapshot, zero clusters) goes 16 -> 64 -> 2 bits, and a v3 image
    with 8 bits goes to v2 (16 bits); qemu-img check stays clean, contents equal, and refusals match qemu-img's."""
    base = tmp_path / "base.qcow2"
    expect = oracle_raw(base, tmp_path)
    mirror = tmp_path / "mirror.qcow2"
    mirror.write_bytes(base.read_bytes())
    for bits in ("64", "2"):
        img("amend", "-o", f"refcount_bits={bits}", str(base))
        info = json.loads(qemu_img("info", "--output=json", str(base)).stdout)
        assert info["format-specific"]["data"]["refcount-bits"] == int(bits)
        check_clean(base)
        assert oracle_raw(base, tmp_path) == expect
    # The snapshot holds a second reference to its clusters: one bit cannot count it.
    r = img("amend", "-o", "refcount_bits=1", str(base), check=False)
    q = qemu_img("amend", "-o", "refcount_bits=1", str(mirror), check=False)
    assert r.returncode == q.returncode == 1
    assert r.stderr.split(": ", 1)[1] == q.stderr.split(": ", 1)[1]
    r = img("amend", "-o", "refcount_bits=3", str(base), check=False)
    assert r.returncode == 1 and "must be a power of two" in r.stderr
    # Going back to compat=0.10 needs 16 bits: as with qemu-img, only when asked for
    # (refcount_bits=16 beside compat=0.10) are the refcounts rewritten on the way.
    flat = tmp_path / "flat.qcow2"
    img("convert", "-O", "qcow2", "-o", "refcount_bits=8", str(base), str(flat))
    r = img("amend", "-o", "compat=0.10", str(flat), check=False)
    assert r.returncode == 1 and "compat=0.10 requires refcount_bits=16" in r.stderr
    img("amend", "-o", "compat=0.10,refcount_bits=16", str(flat))
    info = json.loads(qemu_img("info", "--output=json", str(flat)).stdout)
    assert info["format-specific"]["data"]["compat"] == "0.10"
    check_clean(flat)
    assert oracle_raw(flat, tmp_path) == expect
    v2 = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(v2), "1M")
    r = img("amend", "-o", "refcount_bits=8", str(v2), check=False)
    assert r.returncode == 1 and "compatibility level 1.1" in r.stderr


def test_commit_b_reaches_down_the_chain_like_qemu(tmp_path: Path) -> None:
    """base <- mid <- top; commit -b base top puts what mid and top hold into base (top's
    zeroes as zeroes) and leaves top as it was, exactly as qemu-img does on a copy."""
    for d in ("ours", "qemu"):
        (tmp_path / d).mkdir()
        b, m, t = (tmp_path / d / f"{n}.qcow2" for n in ("b", "m", "t"))
        qemu_img("create", "-f", "qcow2", str(b), "4M")
        qemu_io(b, "write -P 1 0 4M")
        qemu_img("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(m))
        qemu_io(m, "write -P 2 0 1M", "write -z 1536k 64k")
        qemu_img("create", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", str(t))
        qemu_io(t, "write -P 3 512k 1M", "write -z 3M 64k", "write -P 4 1552k 4k")
    top = tmp_path / "ours" / "t.qcow2"
    expect = oracle_raw(top, tmp_path)
    top_before = top.read_bytes()
    assert "Image committed." in img("commit", "-b", str(tmp_path / "ours" / "b.qcow2"),
                                     str(top)).stdout
    qemu_img("commit", "-b", str(tmp_path / "qemu" / "b.qcow2"), str(tmp_path / "qemu" / "t.qcow2"))
    assert top.read_bytes() == top_before
    assert oracle_raw(top, tmp_path) == expect
    for n in ("b", "m"):
        ours, theirs = tmp_path / "ours" / f"{n}.qcow2", tmp_path / "qemu" / f"{n}.qcow2"
        check_clean(ours)
        assert oracle_raw(ours, tmp_path) == oracle_raw(theirs, tmp_path), n
    r = img("commit", "-b", "nope.qcow2", str(top), check=False)
    q = qemu_img("commit", "-b", "nope.qcow2", str(top), check=False)
    assert r.returncode == q.returncode == 1
    assert r.stderr.split(": ", 1)[1] == q.stderr.split(": ", 1)[1]


def test_convert_concatenates_several_sources_like_qemu(chain: Path, tmp_path: Path) -> None:
    """A qcow2 overlay (read through its chain), a raw file of an odd size and a small
    qcow2 end to end: the output equals qemu-img's, plain and compressed."""
    raw = tmp_path / "mid.raw"
    raw.write_bytes(b"\x00" * 4096 + b"\x9c" * (3 * 65536 + 512) + b"\x00" * 8192)
    small = tmp_path / "small.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", str(small), "96k")
    qemu_io(small, "write -P 0x44 1k 20k")
    srcs = [str(chain), str(raw), str(small)]
    theirs = tmp_path / "theirs.raw"
    qemu_img("convert", "-O", "raw", *srcs, str(theirs))
    expect = theirs.read_bytes()
    assert len(expect) == 10 * 1024 * 1024 + raw.stat().st_size + 96 * 1024
    for opts in ([], ["-c"]):
        out = tmp_path / f"ours{len(opts)}.qcow2"
        img("convert", *opts, "-O", "qcow2", *srcs, str(out))
        check_clean(out)
        assert oracle_raw(out, tmp_path) == expect
    flat = tmp_path / "ours.raw"
    img("convert", "-O", "raw", *srcs, str(flat))
    assert flat.read_bytes() == expect
    r = img("convert", "-B", str(small), "-O", "qcow2", *srcs, str(tmp_path / "x.qcow2"),
            check=False)
    q = qemu_img("convert", "-B", str(small), "-O", "qcow2", *srcs, str(tmp_path / "y.qcow2"),
                 check=False)
    assert r.returncode == q.returncode == 1
    assert r.stderr.split(": ", 1)[1] == q.stderr.split(": ", 1)[1]
