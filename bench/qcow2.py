"""qcow2 engine vs QEMU: `appliance img bench` against `qemu-img bench`, and convert.

Every case runs both tools on the same machine, on freshly created images of
the same layout, one after the other, and prints the ratio (appliance speed /
QEMU speed, so > 1 means we are faster). Random access is qemu-img bench's
own mechanism: a step of a large prime number of blocks, wrapping inside the
image. Both tools use ``-t none`` (O_DIRECT).

Usage: .venv/bin/python bench/qcow2.py [--quick] [--convert-size 2G] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MiB = 1 << 20
IMAGE_SIZE = 1024 * MiB
PRIME = 7919


def run(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{r.stdout}{r.stderr}")
    return r.stdout


def ours(*args: str) -> list[str]:
    return [PY, "-m", "appliance.cli.main", "img", *args]


def bench_seconds(tool: list[str]) -> float:
    os.sync()  # start each run without the previous run's dirty pages in flight
    out = run(tool)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise SystemExit(f"no timing in output of {tool}: {out}")
    return float(m.group(1))


def timed(argv: list[str]) -> float:
    os.sync()
    t0 = time.perf_counter()
    run(argv)
    return time.perf_counter() - t0


def fresh_qcow2(path: Path, size: int = IMAGE_SIZE) -> None:
    if path.exists():
        path.unlink()
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)])


def io_cases(quick: bool) -> list[tuple[str, int, bool, bool, int, int]]:
    cases = []
    for bs in (4096, 65536):
        for write in (False, True):
            for rand in (False, True):
                for qd in (1, 32):
                    if bs == 4096:
                        count = 4000 if qd == 1 else 20000
                    else:
                        count = 2000 if qd == 1 else 6000
                    if quick:
                        count //= 4
                    name = (f"{bs // 1024:>2}k {'write' if write else 'read '} "
                            f"{'rand' if rand else 'seq '} qd{qd:<2}")
                    cases.append((name, bs, write, rand, qd, count))
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests, 256 MiB convert")
    ap.add_argument("--convert-size", default=None)
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to test")
    ap.add_argument("--repeat", type=int, default=2, help="runs per tool; the best counts")
    ap.add_argument("--only", default=None,
                    help="regular expression: run only the cases whose name matches")
    a = ap.parse_args()
    if shutil.which("qemu-img") is None:
        print("qemu-img is not installed", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="qcow2-bench-", dir=a.dir or "/var/tmp"))
    rows: list[tuple[str, str, str, float]] = []
    try:
        # Reads: one image, filled by QEMU, read by both tools.
        filled = work / "filled.qcow2"
        if any(not c[2] and _wanted(a.only, f"bench {c[0]}") for c in io_cases(a.quick)):
            fresh_qcow2(filled)
            run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {IMAGE_SIZE}", str(filled)])
        for name, bs, write, rand, qd, count in io_cases(a.quick):
            if not _wanted(a.only, f"bench {name}"):
                continue
            step = bs * PRIME if rand else bs
            common = ["-f", "qcow2", "-t", "none", "-c", str(count), "-d", str(qd),
                      "-s", str(bs), "-S", str(step)] + (["-w"] if write else [])
            best = {"qemu": 1e9, "ours": 1e9}
            for _ in range(a.repeat):
                for who in ("qemu", "ours"):
                    if write:
                        img = work / f"w-{who}.qcow2"
                        fresh_qcow2(img)
                    else:
                        img = filled
                    argv = (["qemu-img", "bench", *common, str(img)] if who == "qemu"
                            else ours("bench", *common, str(img)))
                    best[who] = min(best[who], bench_seconds(argv))
            q_iops, o_iops = count / best["qemu"], count / best["ours"]
            rows.append((f"bench {name}", f"{q_iops:>9.0f} IOPS", f"{o_iops:>9.0f} IOPS",
                         o_iops / q_iops))
            print(_fmt(rows[-1]), flush=True)
        # Convert.
        conv_names = ("qcow2->raw", "raw->qcow2", "raw->qcow2 -c")
        if not any(_wanted(a.only, f"convert {n}") for n in conv_names):
            return _table(rows, work)
        size_text = a.convert_size or ("256M" if a.quick else "2G")
        size = _size(size_text)
        raw = work / "src.raw"
        _make_source(raw, size)
        src_q = work / "src.qcow2"
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(src_q)])
        conv = [
            ("qcow2->raw", ["-f", "qcow2", "-O", "raw"], src_q),
            ("raw->qcow2", ["-f", "raw", "-O", "qcow2"], raw),
            ("raw->qcow2 -c", ["-c", "-f", "raw", "-O", "qcow2"], raw),
        ]
        for name, opts, src in conv:
            if not _wanted(a.only, f"convert {name}"):
                continue
            best = {"qemu": 1e9, "ours": 1e9}
            for _ in range(a.repeat + 1 if "-c" not in opts else 1):
                for who in ("qemu", "ours"):
                    out = work / f"out-{who}"
                    if out.exists():
                        out.unlink()
                    argv = (["qemu-img", "convert", *opts, str(src), str(out)] if who == "qemu"
                            else ours("convert", *opts, str(src), str(out)))
                    best[who] = min(best[who], timed(argv))
            rows.append((f"convert {size_text} {name}", f"{size / best['qemu'] / MiB:>7.0f} MB/s",
                         f"{size / best['ours'] / MiB:>7.0f} MB/s", best["qemu"] / best["ours"]))
            print(_fmt(rows[-1]), flush=True)
            chk = subprocess.run(["qemu-img", "compare", str(src), str(work / "out-ours")],
                                 capture_output=True, text=True)
            if chk.returncode != 0:
                print(f"  !! {name}: output differs from the source: {chk.stdout.strip()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _table(rows, work)


def _wanted(only: str | None, name: str) -> bool:
    return only is None or re.search(only, name) is not None


def _table(rows: list[tuple[str, str, str, float]], work: Path) -> int:
    shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'case':<34}{'qemu-img':>16}{'appliance':>16}{'ratio':>8}")
    for r in rows:
        print(_fmt(r))
    return 0


def _fmt(r: tuple[str, str, str, float]) -> str:
    return f"{r[0]:<34}{r[1]:>16}{r[2]:>16}{r[3]:>7.2f}x"


def _size(text: str) -> int:
    mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    return int(text[:-1]) * mult[text[-1].upper()] if text[-1].isalpha() else int(text)


def _make_source(path: Path, size: int) -> None:
    """Compressible but not trivial data: low-entropy bytes that differ per chunk."""
    import random

    rnd = random.Random(1)
    block = bytes(rnd.choice(b"abcdefgh\0\0\0\0") for _ in range(4 * MiB))
    with open(path, "wb") as f:
        pos = 0
        i = 0
        while pos < size:
            n = min(len(block), size - pos)
            f.write(i.to_bytes(8, "little") + block[8:n])
            pos += n
            i += 1
    os.sync()


if __name__ == "__main__":
    sys.exit(main())
