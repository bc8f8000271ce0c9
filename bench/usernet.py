"""User-mode networking (``-netdev user``) throughput and connection rate.

Part 1 — implemented here: the stack driven directly from the host. A frame
generator (the test suite's guest TCP, ``tests/nat/peer.py``) plays the guest
side in the same process, so no guest CPU or virtio is in the path. Each row
gives the measured rate (generator, stack, loopback peer and event loop
sharing one core) and the stack-only rate: the work divided by the CPU time
spent inside the stack itself (``send``, ``recv_into``, the end-of-batch
ACK/write flush, the host-socket callbacks and readers and the hostfwd listeners'
accept(); timers not counted), which is what a guest on other cores
could get at most, and is steady on a noisy machine. Outbound connections'
host sockets are read by the stack's own reader (``HostSocket``), so since
then their ``recv()`` syscalls count as stack time (asyncio's transport made
them outside the protocol callbacks): the download rows' stack-only figure
fell ~1.15 -> ~0.8 GB/s with the same total process CPU.

Rows:
- guest→host TCP: the guest uploads to a loopback sink through 10.0.2.2.
- guest→host TCP, 64 KiB segments: as if the guest had TSO, plain frames.
- guest→host TCP, TSO with virtio-net headers: what a Linux guest sends once it
  takes the NIC's CSUM/HOST_TSO4 offer (partial checksums, never verified).
- host→guest TCP download: a loopback server pushes to the guest, MSS frames,
  and again with the guest taking GUEST_TSO4 (64 KiB frames with a vnet header).
- host→guest TCP (hostfwd): a host client pushes to a guest listener.
- connection setup rate, guest→host and host→guest (hostfwd): handshake, FIN both ways.

Part 2 follows in the same run: ``bench/usernet_linux.py`` (its own process), the Linux
kit in QEMU TCG with ``appliance net-daemon --netdev user`` (vhost-user-net) against
QEMU's own ``-netdev user`` (libslirp) and passt, on the same guest, with the ratios.
``--host-only`` stops after part 1; ``--rounds``, ``--linux-conns``, ``--linux-mb`` and
``--no-passt`` go to part 2 (the issue's table: ``--rounds 6 --linux-conns 200``).

Usage: ``.venv/bin/python bench/usernet.py [--mb 64] [--conns 300] [--host-only] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.nat import (  # noqa: E402
    UserNetConfig,
    UserNetwork,
    tcp_nat,  # noqa: E402
)
from tests.nat.peer import GW_IP, Guest  # noqa: E402

MB = 1 << 20


# Host socket events: asyncio protocol callbacks (guestfwd names) and, on the NAT's own epoll
# (HostPoller._poll: its epoll_wait counts as stack time), HostSocket's reader/writer and the
# hostfwd listeners' accept() (asyncio's accept was loop work, not counted, before they moved).
_HOST_CALLBACKS = (
    (tcp_nat._HostSide, ("data_received", "eof_received", "connection_lost", "resume_writing")),
    (tcp_nat.HostSocket, ("_read_ready", "_write_ready", "_lost")),
    (tcp_nat.HostPoller, ("_poll",)),
    (tcp_nat._ListenSocket, ("_read_ready",)),
)


class StackClock:
    """Accumulates CPU time spent inside the stack's entry points.

    The stack hands frames to the device from inside some of them (its ready
    callback, e.g. a SYN-ACK from inside ``send``); time in that callback is the
    frame generator's and is left out, while ``recv_into`` called from it counts.
    """

    def __init__(self, net: UserNetwork) -> None:
        self.t = 0.0
        self.on = False
        self.t0 = 0.0
        for name in ("send", "recv_into", "_kick"):
            orig = getattr(net, name)
            setattr(net, name, self._wrap(orig))
        net.tcp._flush_acks = self._wrap(net.tcp._flush_acks)  # type: ignore[method-assign]
        for cls, names in _HOST_CALLBACKS:
            for name in names:
                setattr(cls, name, self._wrap_method(getattr(cls, name)))
        set_ready = net.set_ready_callback

        def set_ready_callback(cb):
            set_ready(None if cb is None else self._outside(cb))

        net.set_ready_callback = set_ready_callback  # type: ignore[method-assign]

    def _enter(self) -> bool:
        was = self.on
        if not was:
            self.t0 = time.process_time()
            self.on = True
        return was

    def _leave(self, was: bool) -> None:
        if not was:
            self.t += time.process_time() - self.t0
            self.on = False

    def _outside(self, fn):
        def inner(*a):
            was = self.on
            if was:
                self.t += time.process_time() - self.t0
                self.on = False
            try:
                return fn(*a)
            finally:
                if was:
                    self.t0 = time.process_time()
                    self.on = True

        return inner

    def _wrap(self, fn):
        def inner(*a):
            was = self._enter()
            try:
                return fn(*a)
            finally:
                self._leave(was)

        return inner

    def _wrap_method(self, fn):
        clock = self

        def inner(self, *a):
            was = clock._enter()
            try:
                return fn(self, *a)
            finally:
                clock._leave(was)

        inner.__wrapped__ = fn  # type: ignore[attr-defined]
        return inner


def restore_hostside() -> None:
    for cls, names in _HOST_CALLBACKS:
        for name in names:
            f = getattr(cls, name)
            while hasattr(f, "__wrapped__"):
                f = f.__wrapped__
            setattr(cls, name, f)


async def with_net(cfg: str, vnet: bool = False):
    net = UserNetwork(UserNetConfig.from_string(cfg), vnet_hdr=vnet)
    await net.start()
    if vnet:
        net.set_offloads(True, True, True, False, False)
    return net


async def upload(size: int, mss: int, vnet: bool = False) -> tuple[float, float]:
    data = os.urandom(size)
    done = asyncio.Event()
    h = hashlib.sha256()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while chunk := await r.read(MB):
            h.update(chunk)
        w.close()
        done.set()

    srv = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    net = await with_net("user", vnet)
    clock = StackClock(net)
    async with Guest(net, vnet=vnet) as g:
        c = g.connect(GW_IP, port, mss=min(mss, 1460))
        await c.wait(lambda: c.state == "ESTABLISHED")
        c.peer_mss = mss
        c.tso = vnet
        t0 = time.perf_counter()
        c.write(data)
        c.shutdown()
        await asyncio.wait_for(done.wait(), 300)
        dt = time.perf_counter() - t0
    assert h.digest() == hashlib.sha256(data).digest()
    await net.stop()
    restore_hostside()
    srv.close()
    return size / dt, size / max(clock.t, 1e-9)


async def download(size: int, vnet: bool = False) -> tuple[float, float]:
    data = os.urandom(size)

    async def source(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(data)
        await w.drain()
        w.close()

    srv = await asyncio.start_server(source, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    net = await with_net("user", vnet)
    clock = StackClock(net)
    async with Guest(net, vnet=vnet) as g:
        c = g.connect(GW_IP, port)
        h = hashlib.sha256()
        c.on_data = h.update
        t0 = time.perf_counter()
        await c.wait(lambda: c.fin_rcvd, 300)
        dt = time.perf_counter() - t0
    assert h.digest() == hashlib.sha256(data).digest()
    await net.stop()
    restore_hostside()
    srv.close()
    return size / dt, size / max(clock.t, 1e-9)


async def hostfwd_push(size: int) -> tuple[float, float]:
    data = os.urandom(size)
    net = await with_net("user,hostfwd=tcp:127.0.0.1:0-:5001")
    clock = StackClock(net)
    port = net.tcp.listener_ports()[0]
    async with Guest(net) as g:
        accepted = g.listen(5001)
        h = hashlib.sha256()
        t0 = time.perf_counter()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        while not accepted:
            await asyncio.sleep(0.001)
        c = accepted[0]
        c.on_data = h.update
        w.write(data)
        w.write_eof()
        await c.wait(lambda: c.fin_rcvd, 300)
        dt = time.perf_counter() - t0
        w.close()
    assert h.digest() == hashlib.sha256(data).digest()
    await net.stop()
    restore_hostside()
    return size / dt, size / max(clock.t, 1e-9)


async def connect_rate(n: int) -> tuple[float, float]:
    async def echo_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        w.close()

    srv = await asyncio.start_server(echo_close, "127.0.0.1", 0, backlog=1024)
    port = srv.sockets[0].getsockname()[1]
    net = await with_net("user")
    clock = StackClock(net)
    async with Guest(net) as g:
        t0 = time.perf_counter()
        batch = 32
        for i in range(0, n, batch):
            conns = [g.connect(GW_IP, port) for _ in range(min(batch, n - i))]
            for c in conns:
                await c.wait(lambda c=c: c.state == "ESTABLISHED")
                c.shutdown()
            for c in conns:
                await c.wait(lambda c=c: c.fin_rcvd and c.fin_acked)
                del g.tcp[(c.lport, c.rip, c.rport)]
        dt = time.perf_counter() - t0
    await net.stop()
    restore_hostside()
    srv.close()
    return n / dt, n / max(clock.t, 1e-9)


async def hostfwd_rate(n: int) -> tuple[float, float]:
    net = await with_net("user,hostfwd=tcp:127.0.0.1:0-:5002")
    clock = StackClock(net)
    port = net.tcp.listener_ports()[0]
    async with Guest(net) as g:
        accepted = g.listen(5002)
        t0 = time.perf_counter()
        batch = 32
        for i in range(0, n, batch):
            k = min(batch, n - i)
            streams = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(k)))
            while len(accepted) < k:
                await asyncio.sleep(0.0005)
            for c in accepted:
                await c.wait(lambda c=c: c.state == "ESTABLISHED")
                c.shutdown()
            for r, w in streams:
                await r.read()
                w.close()
            for c in accepted:
                await c.wait(lambda c=c: c.fin_acked)
                g.tcp.pop((c.lport, c.rip, c.rport), None)
            accepted.clear()
        dt = time.perf_counter() - t0
    await net.stop()
    restore_hostside()
    return n / dt, n / max(clock.t, 1e-9)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--mb", type=int, default=64, help="bytes per throughput run (MiB)")
    ap.add_argument("--conns", type=int, default=300, help="connections per rate run")
    ap.add_argument("--host-only", action="store_true", help="part 1 only: no Linux guest, no libslirp or passt")
    ap.add_argument("--rounds", type=int, default=3, help="part 2: rounds, one guest per stack each")
    ap.add_argument("--linux-conns", type=int, default=50, help="part 2: connections per rate row and round")
    ap.add_argument("--linux-mb", type=int, default=32, help="part 2: MiB per throughput row")
    ap.add_argument("--no-passt", action="store_true", help="part 2: compare with libslirp only")
    return ap.parse_args()


def linux_part(args: argparse.Namespace) -> int:
    """Part 2 in a process of its own (it runs QEMU guests and our net-daemon); its exit status."""
    cmd = [sys.executable, str(ROOT / "bench" / "usernet_linux.py"), "--rounds", str(args.rounds),
           "--conns", str(args.linux_conns), "--mb", str(args.linux_mb)] + (["--no-passt"] if args.no_passt else [])
    print(f"\npart 2, with a Linux guest: {' '.join(cmd[1:])}", flush=True)
    return subprocess.run(cmd, check=False).returncode


async def host_part(args: argparse.Namespace) -> None:
    size = args.mb * MB
    rows = [
        ("guest→host TCP (MSS 1460)", "MB/s", await upload(size, 1460)),
        ("guest→host TCP (64 KiB segments)", "MB/s", await upload(size, 65000)),
        ("guest→host TCP (TSO, vnet header)", "MB/s", await upload(size, 65000, vnet=True)),
        ("host→guest TCP download (MSS 1460)", "MB/s", await download(size)),
        ("host→guest TCP download (TSO, vnet)", "MB/s", await download(size, vnet=True)),
        ("host→guest TCP via hostfwd", "MB/s", await hostfwd_push(size)),
        ("guest→host connections", "conn/s", await connect_rate(args.conns)),
        ("host→guest connections via hostfwd", "conn/s", await hostfwd_rate(args.conns)),
    ]
    print(f"{'workload (stack driven from the host)':<40} {'measured':>10} {'stack-only':>11}  unit")
    for name, unit, (rate, ceiling) in rows:
        scale = 1e6 if unit == "MB/s" else 1
        print(f"{name:<40} {rate / scale:>10.1f} {ceiling / scale:>11.1f}  {unit}", flush=True)


def main() -> int:
    args = parse_args()
    asyncio.run(host_part(args))
    if args.host_only:
        return 0
    return linux_part(args)


if __name__ == "__main__":
    sys.exit(main())
