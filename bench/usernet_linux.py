#!/usr/bin/env python3
"""User-mode networking with a real Linux guest, side by side in one run (issue 6, part 2).

The Linux kit in QEMU TCG reaches the host through three user-mode stacks on
the same guest: ours (``appliance net-daemon --netdev user`` over vhost-user),
QEMU's built-in ``-netdev user`` (libslirp), and passt (``-netdev stream`` to
its socket) when Debian's package is installed. Only loopback services this
script starts are contacted.

Rows: guest→host TCP throughput (the guest uploads to a loopback sink via
10.0.2.2), host→guest TCP throughput (a host client pushes through
``hostfwd``), and guest→host TCP connection setup rate.

Usage: ``.venv/bin/python bench/usernet_linux.py [--mb 64] [--conns 100] [--runs 1]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAC = "52:54:00:12:34:56"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    """Loopback TCP sink: times each upload from first byte to EOF, counts connections."""

    def __init__(self) -> None:
        self.port = free_port()
        self.uploads: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
        self.accepts: list[float] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepts.append(time.perf_counter())
        n, first = 0, 0.0
        while chunk := await r.read(1 << 20):
            if not n:
                first = time.perf_counter()
            n += len(chunk)
        w.close()
        if n:
            self.uploads.put_nowait((n, time.perf_counter() - first))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def stack(kind: str, fwd_port: int, tmp: Path) -> AsyncIterator[list[str]]:
    """QEMU arguments for a NIC on the ``kind`` user-mode stack, with hostfwd to guest port 7000."""
    fwd = f"hostfwd=tcp:127.0.0.1:{fwd_port}-:7000"
    if kind == "appliance":
        from appliance.net.netdev import open_netdev, parse_netdev
        from appliance.nic.virtio_net import VirtioNet
        from appliance.virtio.vhost_user.backend import VhostUserBackend
        from appliance.virtio.vhost_user.server import VhostUserServer

        backends, user = await open_netdev(parse_netdev(f"user,id=u0,{fwd}"))
        dev = VirtioNet(backends, bytes.fromhex(MAC.replace(":", "")), control_queue=False)
        sock = tmp / "user.sock"
        server = VhostUserServer(sock, VhostUserBackend(dev))
        await server.start()
        try:
            # vectors=0: QEMU 7.2 under TCG crashes in its MSI-X notifier path for
            # vhost-user NICs (see tests/linux/test_vhost_user_net.py).
            yield ["-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c0",
                   "-device", f"virtio-net-pci,netdev=n0,mac={MAC},vectors=0"]
        finally:
            await server.close()
            await user.stop()
    elif kind == "libslirp":
        yield ["-netdev", f"user,id=n0,{fwd}", "-device", f"virtio-net-pci,netdev=n0,mac={MAC}"]
    else:
        sock = tmp / "passt.sock"
        proc = subprocess.Popen(
            ["passt", "-f", "-q", "-1", "-s", str(sock), "-t", f"{fwd_port}:7000", "-a", "10.0.2.15",
             "-n", "24", "-g", "10.0.2.2", "--no-dhcpv6", "--no-ndp", "--no-ra"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        try:
            yield ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}",
                   "-device", f"virtio-net-pci,netdev=n0,mac={MAC}"]
        finally:
            proc.terminate()
            proc.wait()


async def one_run(kind: str, mb: int, conns: int) -> dict[str, float]:
    from appliance.kit.tcg import TcgGuest

    sink = Sink()
    await sink.start()
    fwd_port = free_port()
    with tempfile.TemporaryDirectory() as d:
        Path(d).chmod(0o1777)  # passt drops root to nobody before making its socket
        async with stack(kind, fwd_port, Path(d)) as args, TcgGuest(args, machine="q35") as g:
            await g.run("udhcpc -i eth0 -n -q -t 5", timeout=60)
            gw = "10.0.2.2"
            # guest -> host upload
            await g.run(f"dd if=/dev/zero bs=1M count={mb} 2>/dev/null | nc {gw} {sink.port}", timeout=900)
            n, secs = await asyncio.wait_for(sink.uploads.get(), 60)
            up = n * 8 / secs / 1e9
            # host -> guest through hostfwd
            await g.write("nc -l -p 7000 > /dev/null; echo FWD-DONE\n")
            await asyncio.sleep(1)
            chunk = b"\0" * (1 << 20)
            r, w = await asyncio.open_connection("127.0.0.1", fwd_port)
            t0 = time.perf_counter()
            for _ in range(mb):
                w.write(chunk)
                await w.drain()
            w.close()
            await g.expect("FWD-DONE", 600)
            down = (mb << 20) * 8 / (time.perf_counter() - t0) / 1e9
            # connection setup rate, guest -> host
            sink.accepts.clear()
            await g.run(f"i=0; while [ $i -lt {conns} ]; do nc {gw} {sink.port} </dev/null; i=$((i+1)); done",
                        timeout=600)
            rate = (len(sink.accepts) - 1) / (sink.accepts[-1] - sink.accepts[0]) if len(sink.accepts) > 1 else 0.0
            await g.poweroff()
    sink.close()
    return {"guest_to_host_gbps": up, "host_to_guest_gbps": down, "connections_per_s": rate}


async def main_async(mb: int, conns: int, runs: int) -> None:
    kinds = ["appliance", "libslirp"] + (["passt"] if shutil.which("passt") else [])
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for _ in range(runs):
        for k in kinds:
            try:
                results[k].append(await one_run(k, mb, conns))
            except Exception as err:  # noqa: BLE001 - one stack failing must not hide the others
                print(f"{k}: run failed: {err}", file=sys.stderr)
    print(f"\nLinux kit in QEMU TCG, {mb} MiB transfers, {conns} connections, median of {runs}")
    header = f"{'metric':<22}" + "".join(f"{k:>12}" for k in kinds) + "".join(
        f"{'ours/' + k:>16}" for k in kinds[1:]
    )
    print(header)
    for metric in ("guest_to_host_gbps", "host_to_guest_gbps", "connections_per_s"):
        vals = {k: statistics.median(r[metric] for r in results[k]) if results[k] else float("nan") for k in kinds}
        row = f"{metric:<22}" + "".join(f"{vals[k]:>12.3f}" for k in kinds)
        row += "".join(f"{vals['appliance'] / vals[k] if vals[k] else float('nan'):>16.2f}" for k in kinds[1:])
        print(row)
    if "passt" not in kinds:
        print("passt: not installed (apt-get install passt) — not compared")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=64)
    p.add_argument("--conns", type=int, default=100)
    p.add_argument("--runs", type=int, default=1)
    a = p.parse_args()
    asyncio.run(main_async(a.mb, a.conns, a.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
