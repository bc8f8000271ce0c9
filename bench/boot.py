"""Boot benchmark: the appliance vs QEMU microvm on the same test guest ELF.

For each VMM, ``--runs`` times (default 10): start the process, wait for the
guest's readiness line on the serial console (``TESTGUEST-READY``), type
``poweroff`` and wait for the process to exit. Reports the median time from
process start to readiness and to exit, and the VMM's memory overhead: the
process RSS at readiness minus the guest RAM it has touched (the resident part
of the guest-RAM mapping, found in /proc/PID/smaps). Prints one table with the
appliance/QEMU ratios. Runs alternate between the VMMs so machine noise hits
both alike.

    .venv/bin/python bench/boot.py [--runs N] [--smp N] [--mem 256]
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

READY = b"TESTGUEST-READY"
TIMEOUT = 60.0


@dataclass
class Sample:
    ready: float
    exit: float
    rss: int
    guest_touched: int


def smaps_split(pid: int, mem_bytes: int) -> tuple[int, int]:
    """(total RSS, RSS of mappings the size of guest RAM) of ``pid``, in bytes."""
    total = guest = 0
    size = 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    a, b = line.split()[0].split("-")
                    size = int(b, 16) - int(a, 16)
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                    total += rss
                    # Guest RAM: one mapping of the RAM size (QEMU may round it up a little).
                    if mem_bytes <= size <= mem_bytes + (8 << 20):
                        guest += rss
    except OSError:
        pass
    return total, guest


def run_once(argv: list[str], mem_bytes: int) -> Sample:
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen = b""
    try:
        while READY not in seen or not seen[seen.index(READY):].count(b"\n"):
            if time.monotonic() - t0 > TIMEOUT:
                raise RuntimeError(f"{argv[0]}: no readiness line; console: {seen[-300:]!r}")
            for _ in sel.select(0.5):
                data = proc.stdout.read(65536)
                if data:
                    seen += data
                elif proc.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited early; console: {seen[-300:]!r}")
        ready = time.monotonic() - t0
        rss, touched = smaps_split(proc.pid, mem_bytes)
        proc.stdin.write(b"poweroff\n")
        proc.stdin.flush()
        while proc.poll() is None:
            for _ in sel.select(0.05):
                proc.stdout.read(65536)
            if time.monotonic() - t0 > TIMEOUT:
                raise RuntimeError(f"{argv[0]}: did not exit after poweroff")
        return Sample(ready, time.monotonic() - t0, rss, touched)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--mem", type=int, default=256, help="guest RAM in MiB")
    ap.add_argument("--kernel", type=Path, default=None, help="test guest ELF (default: the kit's)")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    if args.kernel is None:
        from appliance.kit import paths

        args.kernel = paths().guest_elf
    if not args.kernel.exists():
        print(f"bench: {args.kernel} is missing (run: appliance kit build)", file=sys.stderr)
        return 2
    common = ["-m", f"{args.mem}M", "-smp", str(args.smp), "-kernel", str(args.kernel), "-nographic"]
    vmms = {"appliance": [sys.executable, "-m", "appliance.cli.main", "run", *common]}
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        vmms["qemu microvm"] = [qemu, "-enable-kvm", "-M", "microvm", "-no-reboot", *common]
    else:
        print("bench: qemu-system-x86_64 not installed; appliance only", file=sys.stderr)
    mem_bytes = args.mem << 20
    samples: dict[str, list[Sample]] = {name: [] for name in vmms}
    for i in range(args.runs):
        for name, argv in vmms.items():
            samples[name].append(run_once(argv, mem_bytes))
        print(f"bench: run {i + 1}/{args.runs} done", file=sys.stderr, flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(getattr(s, key) for s in samples[name])

    def overhead(name: str) -> float:
        return statistics.median(s.rss - s.guest_touched for s in samples[name]) / (1 << 20)

    rows = [
        ("process start -> ready (ms)", lambda n: med(n, "ready") * 1000),
        ("process start -> exit after poweroff (ms)", lambda n: med(n, "exit") * 1000),
        ("VMM RSS at ready (MiB)", lambda n: med(n, "rss") / (1 << 20)),
        ("guest RAM touched (MiB)", lambda n: med(n, "guest_touched") / (1 << 20)),
        ("VMM overhead = RSS - guest touched (MiB)", overhead),
    ]
    names = list(vmms)
    print(f"\nBoot benchmark: {args.kernel.name}, -smp {args.smp}, -m {args.mem}M, median of {args.runs} runs\n")
    head = f"{'metric':<44}" + "".join(f"{n:>16}" for n in names)
    if len(names) == 2:
        head += f"{'ratio':>10}"
    print(head)
    print("-" * len(head))
    for label, fn in rows:
        vals = [fn(n) for n in names]
        line = f"{label:<44}" + "".join(f"{v:>16.1f}" for v in vals)
        if len(vals) == 2:
            line += f"{(vals[0] / vals[1] if vals[1] else float('nan')):>9.2f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
