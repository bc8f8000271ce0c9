"""What the test guest prints can be trusted, on `appliance run` and on QEMU
alike: console lines end in CR LF (as serial consoles send them), `echo`
returns its whole line, the TSC rate behind every µs figure is measured to a
known precision and agrees between the two VMMs, and `blk bench` latencies
are ordered (p50 ≤ p99 ≤ max) and consistent with its IOPS (Little's law:
mean latency × IOPS = queue depth when every slot always has a request out)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from appliance.kit import build
from appliance.kit.console import GuestConsole
from tests.conftest import needs_kvm, needs_qemu

pytestmark = [needs_kvm, needs_qemu, pytest.mark.kvm, pytest.mark.qemu]

VMMS = ["appliance", "qemu"]


@pytest.fixture(scope="module")
def guest_elf() -> Path:
    return build(linux=False).guest_elf


def argv(vmm: str, elf: Path, *extra: str) -> list[str]:
    common = ["-kernel", str(elf), "-m", "128M", "-no-reboot", *extra]
    if vmm == "appliance":
        return [sys.executable, "-m", "appliance.cli.main", "run", "-nographic", *common]
    # microvm,pcie=on boots in a fraction of a second (no firmware); the guest
    # finds its PCI devices through ECAM.
    return ["qemu-system-x86_64", "-enable-kvm", "-M", "microvm,pcie=on", "-nodefaults",
            "-nographic", "-serial", "stdio", *common]


def disk(img: Path, queues: int) -> tuple[str, ...]:
    return ("-drive", f"file={img},if=none,id=d0,format=raw",
            "-device", f"virtio-blk-pci,drive=d0,num-queues={queues}")


async def read_until(stream: asyncio.StreamReader, out: bytearray, needle: bytes, timeout: float) -> None:
    async def more() -> None:
        while needle not in out:
            chunk = await stream.read(65536)
            if not chunk:
                raise AssertionError(f"console closed before {needle!r}: {bytes(out[-2000:])!r}")
            out.extend(chunk)
    await asyncio.wait_for(more(), timeout)


@pytest.mark.parametrize("vmm", VMMS)
async def test_lines_end_in_crlf_and_echo_returns_the_whole_line(guest_elf: Path, vmm: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv(vmm, guest_elf, "-smp", "2"), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    out = bytearray()
    try:
        await read_until(proc.stdout, out, b"TESTGUEST-READY", 40)
        await read_until(proc.stdout, out, b"\n", 10)
        # Longer than the guest's old 512-byte line buffer, spaces kept.
        long_text = " ".join(f"w{i:03d}" for i in range(200))
        for text in ("hello big  world", long_text):
            proc.stdin.write(f"echo {text}\n".encode())
            await read_until(proc.stdout, out, f"{text}\r\n".encode(), 20)
        proc.stdin.write(b"help\n")
        await read_until(proc.stdout, out, b"HELP time", 20)
        proc.stdin.write(b"poweroff\n")
        out.extend(await asyncio.wait_for(proc.stdout.read(), 20))
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = bytes(out)
    start = text.index(b"TESTGUEST-")    # QEMU's own messages come before
    assert b"TESTGUEST-AP 1 alive" in text
    lines = text[start:]
    assert lines.count(b"\n") == lines.count(b"\r\n") >= 5


async def test_tsc_rate_is_measured_and_agrees_between_vmms(guest_elf: Path) -> None:
    rates = []
    for vmm in VMMS:
        async with GuestConsole(argv(vmm, guest_elf)) as g:
            await g.ready(timeout=40)
            f = await g.fields("time", "TIME")
            # Bracketed PIT windows: the rate is known to within err_ppm.
            assert f["measured"] == "1" and int(f["err_ppm"]) <= 2500, (vmm, f)
            rates.append(int(f["tsc_khz"]))
            await g.write("poweroff\n")
            assert await g.wait(20) == 0
    assert abs(rates[0] - rates[1]) <= rates[1] // 100, rates


@pytest.mark.slow
@pytest.mark.parametrize("vmm", VMMS)
async def test_blk_bench_latencies_are_ordered_and_match_iops(guest_elf: Path, vmm: str, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(16 << 20))
    async with GuestConsole(argv(vmm, guest_elf, *disk(img, 2))) as g:
        await g.ready(timeout=40)
        for mode, bs, qd in (("randread", 4096, 4), ("read", 65536, 2), ("randwrite", 4096, 1)):
            s = await g.blk_bench(mode, bs, qd, 1)
            p50, p99, mx, mean = (int(s[k]) for k in ("p50_us", "p99_us", "max_us", "mean_us"))
            ios, iops = int(s["ios"]), float(s["iops"])
            assert ios > 50 and s["qd"] == str(qd) and s["queues"] == "2", s
            assert sum(int(n) for n in s["per_queue"].split(",")) == ios
            assert 0 < p50 <= p99 <= mx and mean <= mx, s
            # Each slot holds one request at a time, so latency × IOPS cannot
            # pass the depth; only the ramp-down (slots already idle) and the
            # guest's own turnaround keep it under.
            busy = mean * iops / 1e6 / qd
            assert 0.5 < busy <= 1.05, (busy, s)
        await g.write("poweroff\n")
        assert await g.wait(20) == 0
