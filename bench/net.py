#!/usr/bin/env python3
"""virtio-net benchmark, side by side with QEMU in one run (issue 5).

(b) The Linux kit in QEMU TCG moves a TCP stream to and from a host inside a
network namespace, once through our virtio-net (``appliance net-daemon``, in
its own process, over vhost-user on a tap) and once through QEMU's own
virtio-net on the same kind of tap (``-netdev tap,vhost=off``). The guest CPU
is emulated, so both sides pay the same guest cost; the ratio shows what our
device path adds or saves. Our side must use INTx (see one_run), so QEMU's NIC
runs twice: as QEMU sets it up (MSI-X, the ``qemu`` column and the ratio the
targets are about) and with ``vectors=0`` like ours (``qemu-intx``, the same
interrupt path on both sides; ``--no-intx-column`` skips it). Two guest workloads, the same on
both sides (see WORKLOADS): ``nc``, busybox ``dd|nc`` with its 1 KiB writes
(a per-segment test: the emulated guest CPU is the limit, ~30x below the
other direction), and ``bulk``, the kit's ``kitnet`` with 256 KiB writes and
reads (64 KiB TSO frames: the NIC's bulk path). Host → guest is timed until
the guest closes after reading everything. For host → guest the table also
splits the guest vCPU thread's time while the host sends: running, waiting for
a host CPU (a busy machine), and idle (the guest waiting for frames, which is
the NIC's side of the pipeline).

(a) The test guest's ``net bench`` on ``appliance run`` against the same ELF on
``qemu-system-x86_64 -enable-kvm -M microvm,pcie=on`` with QEMU's own
virtio-net-pci on ``-netdev tap,vhost=off``: guest → tap frames/s at 64 and
1514 bytes, tap → guest frames/s (a C blaster in the namespace writes
broadcast frames into the tap; the guest counts what it receives), and
guest → tap Gbit/s with 64 KiB TSO frames.

Run as root: ``.venv/bin/python bench/net.py [--mb 40] [--bulk-mb 1024] [--workloads nc,bulk] [--runs 3]
[--seconds 5] [--parts ab] [--no-intx-column]``.
Loop-thread CPU per frame without a VM (steadier on a busy machine):
``bench/tools/net_cpu.py``.
The whole run happens inside a namespace this script creates and deletes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.kit.tcg import TcgGuest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOST_IP = "10.95.0.1"
GUEST_IP = "10.95.0.2"
TAP = "bnt0"


async def host_sink(port: int) -> tuple[asyncio.AbstractServer, asyncio.Future[tuple[int, float]]]:
    """Accept one connection and time it from first byte to EOF."""
    done: asyncio.Future[tuple[int, float]] = asyncio.get_running_loop().create_future()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        n = 0
        first = None
        while True:
            b = await r.read(1 << 20)
            if not b:
                break
            if first is None:
                first = time.perf_counter()
            n += len(b)
        w.close()
        if not done.done():
            done.set_result((n, time.perf_counter() - (first or time.perf_counter())))

    server = await asyncio.start_server(handle, HOST_IP, port)
    return server, done


async def host_send(port: int, nbytes: int) -> float:
    """Connect to the guest's listener and push ``nbytes``; returns seconds.

    The clock stops when the guest closes its end after reading our EOF, so
    it covers delivery, not just the last megabytes queued in our socket
    buffer (closing right after the last write measured only the latter).
    """
    for _ in range(100):
        try:
            r, w = await asyncio.open_connection(GUEST_IP, port)
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        raise RuntimeError("guest listener never came up")
    chunk = b"\0" * (1 << 20)
    t0 = time.perf_counter()
    sent = 0
    while sent < nbytes:
        w.write(chunk)
        await w.drain()
        sent += len(chunk)
    w.write_eof()
    await asyncio.wait_for(r.read(), 300)
    secs = time.perf_counter() - t0
    w.close()
    await w.wait_closed()
    return secs


# (b) workloads: the guest side of each direction. Both VMMs run the same one.
# "nc": busybox dd|nc moves 1 KiB per poll/read/write round, so each write
# leaves as its own small TCP segment and the emulated guest CPU is the limit
# (a per-segment cost test). "bulk": the kit's kitnet writes and reads 256 KiB
# at a time, so the guest's stack builds 64 KiB TSO frames and the NIC's bulk
# path is what is timed.
WORKLOADS = {
    "nc": ("dd if=/dev/zero bs=1M count={mb} 2>/dev/null | nc {host} {port}", "nc -l -p {port} > /dev/null"),
    "bulk": ("kitnet send {host} {port} {mb}M", "kitnet recv {port} > /dev/null"),
}


async def guest_nic_interrupts(g: TcgGuest) -> int:
    """Interrupts the guest has taken from its virtio devices (the NIC is the only one).

    Under TCG an interrupt is one of the guest's dearest events (an INTx one
    costs MMIO exits for the ISR read and the IOAPIC EOI), so the table shows
    them per MiB next to the throughput.
    """
    text = await g.run("grep virtio /proc/interrupts || true")
    total = 0
    for line in text.splitlines():
        for word in line.split()[1:]:
            if not word.isdigit():
                break
            total += int(word)
    return total


def _schedstat(task: str) -> tuple[float, float]:
    """(CPU time, run-queue wait) of a /proc task, in seconds."""
    with open(f"/proc/{task}/schedstat", encoding="ascii") as f:
        run, wait = f.read().split()[:2]
    return int(run) / 1e9, int(wait) / 1e9


def _vcpu_task(pid: int) -> str:
    """The TCG vCPU thread of a booted single-CPU QEMU: its busiest thread but main."""
    tasks = [f"{pid}/task/{t}" for t in os.listdir(f"/proc/{pid}/task") if t != str(pid)]
    return max(tasks, key=lambda t: _schedstat(t)[0])


async def one_run(kind: str, sizes: dict[str, int], tmp: Path) -> dict[str, float]:
    from appliance.kit.tcg import TcgGuest

    mac = "52:54:00:be:ec:01"
    daemon = None
    if kind == "appliance":
        sock = tmp / f"bench-{uuid.uuid4().hex[:6]}.sock"
        # The daemon runs in its own process, as users run it: sharing this
        # process's loop and GIL with the TCP load generator below cost our
        # side the time the sender spends in send()/recv().
        daemon = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "appliance"), "net-daemon", "--netdev", f"tap,id=n0,ifname={TAP}",
             "--export", f"type=vhost-user-net,id=e0,netdev=n0,addr.type=unix,addr.path={sock}"]
        )
        for _ in range(300):
            if sock.exists() or daemon.poll() is not None:
                break
            await asyncio.sleep(0.05)
        if not sock.exists():
            daemon.kill()
            raise RuntimeError("appliance net-daemon did not come up")
        # QEMU 7.2 under TCG segfaults (SIGSEGV at address 0x28) starting a
        # vhost-user-net device whose driver enabled MSI-X, with the default
        # vectors and with vectors=2 alike: vhost_net_start clears
        # use_guest_notifier_mask for vhost-user, but 7.2's
        # virtio_pci_set_guest_notifiers still installs the MSI-X vector
        # notifiers whenever the device class has guest_notifier_mask, and
        # without KVM there is no irqfd table, so the first unmasked vector
        # reaches kvm_virtio_pci_irqfd_use with a NULL vector_irqfd. The
        # check on use_guest_notifier_mask came with QEMU 8.0's config
        # interrupt series. Nothing on the command line or in our protocol
        # features avoids that path (MSI-X is enabled by the driver before
        # DRIVER_OK starts vhost), so our side runs with INTx: vectors=0.
        args = ["-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c0",
                "-device", f"virtio-net-pci,netdev=n0,mac={mac},vectors=0"]
    else:
        subprocess.run(["ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"], check=True)
        subprocess.run(["ip", "link", "set", TAP, "up"], check=True)
        args = ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
                "-device", f"virtio-net-pci,netdev=n0,mac={mac}" + (",vectors=0" if kind == "qemu-intx" else "")]
    try:
        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP], check=True)
        async with TcgGuest(args, machine="q35") as g:
            await g.run(f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0")
            vcpu = _vcpu_task(g.proc.pid) if g.proc is not None else None
            out: dict[str, float] = {}
            port = 5003
            for name, mb in sizes.items():
                send_cmd, sink_cmd = WORKLOADS[name]
                # guest -> host
                port += 1
                srv, done = await host_sink(port)
                irqs = await guest_nic_interrupts(g)
                await g.run(send_cmd.format(mb=mb, host=HOST_IP, port=port), timeout=600)
                n, secs = await asyncio.wait_for(done, 60)
                srv.close()
                out[f"{name}_guest_to_host_gbps"] = n * 8 / secs / 1e9
                out[f"{name}_guest_to_host_irq_per_mib"] = (await guest_nic_interrupts(g) - irqs) / mb
                # host -> guest
                port += 1
                irqs = await guest_nic_interrupts(g)
                await g.write(sink_cmd.format(port=port) + "; echo SINK-DONE\n")
                v0 = _schedstat(vcpu) if vcpu else (0.0, 0.0)
                secs = await host_send(port, mb << 20)
                v1 = _schedstat(vcpu) if vcpu else (0.0, 0.0)
                await g.expect("SINK-DONE", 120)
                out[f"{name}_host_to_guest_gbps"] = (mb << 20) * 8 / secs / 1e9
                if vcpu:
                    # Where the guest's time went while the host sent: running, waiting for a host
                    # CPU, or idle (waiting for frames from the NIC).
                    run, wait = v1[0] - v0[0], v1[1] - v0[1]
                    out[f"{name}_host_to_guest_vcpu_run_pct"] = 100 * run / secs
                    out[f"{name}_host_to_guest_vcpu_wait_pct"] = 100 * wait / secs
                    out[f"{name}_host_to_guest_vcpu_idle_pct"] = 100 * max(0.0, secs - run - wait) / secs
                out[f"{name}_host_to_guest_irq_per_mib"] = (await guest_nic_interrupts(g) - irqs) / mb
            await g.poweroff()
        return out
    finally:
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        subprocess.run(["ip", "link", "del", TAP], check=False, capture_output=True)


def build_blaster() -> Path:
    out = ROOT / ".cache" / "bench" / "blast"
    src = ROOT / "bench" / "tools" / "blast.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-o", str(out), str(src)], check=True)
    return out


def vmm_argv(kind: str, elf: Path) -> list[str]:
    nic = ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no" + (",vhost=off" if kind == "qemu" else ""),
           "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:be:ec:02"]
    if kind == "qemu":
        return ["qemu-system-x86_64", "-enable-kvm", "-M", "microvm,pcie=on", "-m", "256", "-nodefaults",
                "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(elf), *nic]
    return [str(ROOT / ".venv" / "bin" / "appliance"), "run", "-m", "256", "-nographic", "-no-reboot",
            "-kernel", str(elf), *nic]


async def testguest_run(kind: str, seconds: int, blaster: Path) -> dict[str, float]:
    from appliance.kit import paths
    from appliance.kit.console import GuestConsole

    out: dict[str, float] = {}
    async with GuestConsole(vmm_argv(kind, paths().guest_elf)) as g:
        await g.ready(60)
        # QEMU leaves a tap it opened with script=no down; bring it up for both.
        subprocess.run(["ip", "link", "set", TAP, "up"], check=True)
        await g.fields("net info", "NET info")
        for size in (64, 1514):
            f = await g.fields(f"net bench tx {size} {seconds}", "NET bench", seconds + 60)
            out[f"tx_fps_{size}"] = float(f["fps"])
        for size in (64, 1514):
            await g.write(f"net bench rx {seconds}\n")
            await asyncio.sleep(0.2)
            blast = await asyncio.create_subprocess_exec(
                str(blaster), TAP, str(size), str(seconds + 1), stdout=asyncio.subprocess.DEVNULL
            )
            m = await g.expect(r"NET bench dir=rx (.*)\n", seconds + 60)
            await blast.wait()
            f = dict(kv.split("=", 1) for kv in m.group(1).split())
            out[f"rx_fps_{size}"] = float(f["fps"])
        f = await g.fields(f"net bench tso {seconds}", "NET bench", seconds + 60)
        out["tso_gbps"] = float(f["gbps"])
        await g.write("poweroff\n")
        await g.wait(30)
    return out


async def inner_a(runs: int, seconds: int) -> None:
    blaster = build_blaster()
    results: dict[str, list[dict[str, float]]] = {"appliance": [], "qemu": []}
    for _ in range(runs):
        for kind in ("appliance", "qemu"):
            results[kind].append(await testguest_run(kind, seconds, blaster))
    print(f"\n(a) test guest `net bench`, appliance run vs QEMU+KVM microvm (tap, vhost=off), median of {runs}")
    print(f"{'metric':<24}{'appliance':>14}{'qemu':>14}{'ratio':>8}")
    for metric in results["appliance"][0]:
        a = statistics.median(r[metric] for r in results["appliance"])
        q = statistics.median(r[metric] for r in results["qemu"])
        print(f"{metric:<24}{a:>14.3f}{q:>14.3f}{(a / q if q else float('nan')):>8.2f}")


async def inner(sizes: dict[str, int], runs: int, seconds: int, parts: str, intx_column: bool) -> None:
    if "a" in parts:
        await inner_a(runs, seconds)
    if "b" in parts:
        await inner_b(sizes, runs, intx_column)


async def inner_b(sizes: dict[str, int], runs: int, intx_column: bool) -> None:
    tmp = Path("/tmp")
    kinds = ["appliance", "qemu"] + (["qemu-intx"] if intx_column else [])
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for i in range(runs):
        # Rotate which side goes first, so a drift in the machine's load
        # (other jobs on a shared host) does not always favour one side.
        order = kinds[i % len(kinds):] + kinds[: i % len(kinds)]
        for kind in order:
            results[kind].append(await one_run(kind, sizes, tmp))
    what = ", ".join(f"{name} {mb} MiB" for name, mb in sizes.items())
    print(f"\n(b) Linux kit in QEMU TCG, TCP through virtio-net ({what}), median of {runs}; "
          "appliance on INTx (QEMU 7.2 bug, see one_run), qemu on MSI-X"
          + (", qemu-intx on INTx" if intx_column else ""))
    for unit, suffix in (("Gbit/s", "_gbps"), ("guest irq/MiB", "_irq_per_mib"), ("vCPU % of time", "_pct")):
        head = f"{f'metric ({unit})':<28}"
        for k in kinds:
            head += f"{k:>12}" + ("" if k == "appliance" else f"{'ratio':>7}")
        print(head + "   " + "".join(f"{k + ' min-max':>19}" for k in kinds))
        for metric in results["appliance"][0]:
            if not metric.endswith(suffix):
                continue
            vals = {k: [r[metric] for r in results[k]] for k in kinds}
            med = {k: statistics.median(v) for k, v in vals.items()}
            line = f"{metric.removesuffix(suffix):<28}"
            for k in kinds:
                line += f"{med[k]:>12.3f}"
                if k != "appliance":
                    line += f"{(med['appliance'] / med[k] if med[k] else float('nan')):>7.2f}"
            spread = "".join(f"{f'{min(v):.3f}-{max(v):.3f}':>19}" for v in vals.values())
            print(line + "   " + spread)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=40, help="(b): MiB each way for the busybox nc workload")
    p.add_argument("--bulk-mb", type=int, default=1024, help="(b): MiB each way for the kitnet bulk workload")
    p.add_argument("--workloads", default="nc,bulk", help="(b): comma-separated, from: " + ", ".join(WORKLOADS))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--parts", default="ab", help="a: test guest under KVM, b: Linux in TCG")
    p.add_argument("--no-intx-column", action="store_true",
                   help="(b): skip the runs of QEMU's own NIC with vectors=0 (INTx, as our vhost-user side must use)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.inner:
        names = [w for w in a.workloads.split(",") if w]
        unknown = [w for w in names if w not in WORKLOADS]
        if unknown:
            print(f"bench/net.py: unknown workload {unknown[0]!r}", file=sys.stderr)
            return 2
        sizes = {w: a.mb if w == "nc" else a.bulk_mb for w in names}
        asyncio.run(inner(sizes, a.runs, a.seconds, a.parts, not a.no_intx_column))
        return 0
    if os.geteuid() != 0:
        print("bench/net.py needs root (it makes a network namespace)", file=sys.stderr)
        return 2
    ns = f"aplbench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        return subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, __file__, "--inner", "--mb", str(a.mb),
             "--bulk-mb", str(a.bulk_mb), "--workloads", a.workloads, "--runs", str(a.runs),
             "--seconds", str(a.seconds), "--parts", a.parts] + (["--no-intx-column"] if a.no_intx_column else [])
        ).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
