"""Microbenchmarks of the virtio data path: device CPU time per item.

Each case drives a device through the fake driver (no VM) and times only the
device side with ``time.thread_time`` (CPU time of this thread), so numbers are
comparable before/after a change even on a loaded machine; the best of
``--repeat`` runs is printed.

    .venv/bin/python bench/micro.py            # all cases
    .venv/bin/python bench/micro.py pop net-tx # some

Cases:
  pop      Virtqueue.pop + push_used of a 2-descriptor chain (us per chain)
  net-tx   VirtioNet transmit of 64-byte frames to a null backend (us per frame)
  net-rx   VirtioNet receive of 64-byte frames from a datagram socketpair (us per frame)
  blk      VirtioBlk 4 KiB read (page cache) and write at queue depth 1 on a raw
           file: kick to used element, wall time and the event-loop thread's
           CPU time (us per request; wall time swings with machine load)
  conn     A guest TCP connection through VirtioNet and the user-mode stack
           (event index, checksum offload, mergeable buffers, as a Linux
           guest): SYN -> SYN-ACK, ACK, FIN -> FIN+ACK, final ACK, to a
           loopback sink in another process that closes on EOF (busybox
           `nc HOST PORT </dev/null`); us per connection, wall and the loop
           thread's CPU less the fake driver's own. It runs ~3000 connections
           a second, a real guest a few hundred: a timer left armed for a time
           nobody wants any more (instead of cancelled) is shared here by
           dozens of connections but wakes a real daemon's loop about once
           each, so confirm timer changes with bench/usernet_linux.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.nic import constants as C  # noqa: E402
from appliance.nic.virtio_net import VirtioNet  # noqa: E402
from appliance.storage.blk import VirtioBlk  # noqa: E402
from appliance.storage.blk_request import HEADER, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT  # noqa: E402
from appliance.storage.raw import open_raw  # noqa: E402
from appliance.virtio.testing import WRITE, DriverQueue, FakeDriver, make_memory  # noqa: E402

FRAME = bytes(12) + b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5" + bytes(50)
BATCH = 128


class FutureInterrupt:
    """Completes a future on notify, so the benchmark waits without polling."""

    def __init__(self) -> None:
        self.fut: asyncio.Future[None] | None = None

    def notify(self) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)


class NullBackend:
    """Sends go nowhere; receives come from a SOCK_DGRAM socketpair (one syscall each)."""

    def __init__(self, vnet_hdr_len: int = 12) -> None:
        self.vnet_hdr_len = vnet_hdr_len
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.a.setblocking(False)
        self.fd = self.a.fileno()

    def set_ready_callback(self, ready: Callable[[], None] | None) -> None:
        pass

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        try:
            return os.readv(self.fd, bufs)
        except BlockingIOError:
            return -1

    def send(self, bufs: Sequence[memoryview]) -> bool:
        return True

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> None:
        pass

    def close(self) -> None:
        self.a.close()
        self.b.close()


def bench_pop(total: int) -> float:
    mem = make_memory(4 << 20)
    dq = DriverQueue.at(mem, 0x1000, 256)
    vq = dq.virtqueue()
    buf = 0x100000
    spent = 0.0
    n = 0
    while n < total:
        for _ in range(BATCH):
            dq.add_chain([(buf, 12, 0), (buf + 64, 1500, WRITE)])
        t = time.thread_time()
        while (c := vq.pop()) is not None:
            vq.push_used(c.head, 0)
            n += 1
        vq.needs_notification()
        spent += time.thread_time() - t
        dq.used()
    return spent / n * 1e6


def bench_net_tx(total: int) -> float:
    be = NullBackend()
    dev = VirtioNet([be], bytes.fromhex("525400123456"))
    drv = FakeDriver(dev, queue_size=256, mem_size=16 << 20)
    drv.activate()
    q = drv.queues[1]
    addrs = [drv.alloc(len(FRAME)) for _ in range(BATCH)]
    for a in addrs:
        drv.mem.write(a, FRAME)
    n = 0
    spent = 0.0
    while n < total:
        for a in addrs:
            q.add_chain([(a, 12, 0), (a + 12, len(FRAME) - 12, 0)])
        t = time.thread_time()
        drv.kick(1)
        spent += time.thread_time() - t
        n += len(q.used())
    assert dev.stats[0].tx_frames == n
    be.close()
    return spent / n * 1e6


def bench_net_rx(total: int) -> float:
    be = NullBackend()
    be.b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    dev = VirtioNet([be], bytes.fromhex("525400123456"))
    drv = FakeDriver(dev, queue_size=256, mem_size=16 << 20)
    drv.activate()
    q = drv.queues[0]
    addrs = [drv.alloc(2048) for _ in range(BATCH)]
    n = 0
    spent = 0.0
    while n < total:
        for a in addrs:
            q.add_chain([(a, 2048, WRITE)])
        for _ in range(BATCH):
            be.b.send(FRAME)
        t = time.thread_time()
        drv.kick(0)
        spent += time.thread_time() - t
        got = len(q.used())
        assert got == BATCH, got
        n += got
    assert dev.stats[0].rx_frames == n
    be.close()
    return spent / n * 1e6


async def _blk(total: int, rtype: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "disk.raw")
        with open(path, "wb") as f:
            f.truncate(64 << 20)
        backend = open_raw(path)
        dev = VirtioBlk(backend)
        drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20)
        irq = FutureInterrupt()
        drv.interrupts = [irq]  # type: ignore[list-item]  # any Interrupt will do
        drv.activate()
        q = drv.queues[0]
        hdr = drv.alloc(16)
        data = drv.alloc(4096, 4096)
        status = drv.alloc(1)
        flag = WRITE if rtype == VIRTIO_BLK_T_IN else 0
        loop = asyncio.get_running_loop()
        spent = 0.0
        cpu = 0.0
        for i in range(total + 100):
            sector = (i * 7919 % 16384) * 8
            drv.mem.write(hdr, HEADER.pack(rtype, 0, sector))
            q.add_chain([(hdr, 16, 0), (data, 4096, flag), (status, 1, WRITE)])
            t = loop.time()
            c = time.thread_time()
            irq.fut = loop.create_future()
            drv.kick(0)
            if q.pending() == 0:
                await irq.fut
            if i >= 100:  # warm-up: page cache, pool threads
                spent += loop.time() - t
                cpu += time.thread_time() - c
            q.used()
        await dev.quiesce()
        await backend.close()
        drv.mem.close()
    return spent / total * 1e6, cpu / total * 1e6


def bench_blk_read(total: int) -> tuple[float, float]:
    return asyncio.run(_blk(total, VIRTIO_BLK_T_IN))


def bench_blk_write(total: int) -> tuple[float, float]:
    return asyncio.run(_blk(total, VIRTIO_BLK_T_OUT))


SINK = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(128)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    while c.recv(65536):
        pass
    c.close()
"""

_GUEST_MAC = bytes.fromhex("525400123456")
_GUEST_IP = bytes([10, 0, 2, 15])
_GW_IP = bytes([10, 0, 2, 2])
_ETH_IP_TCP = struct.Struct("!6s6sHBBHHHBBH4s4sHHIIHHHH")
# A Linux SYN's options: MSS 1460, SACK permitted, timestamps, window scale 7.
_SYN_OPTS = bytes.fromhex("020405b40402080a000000010000000001030307")


def _guest_frame(
    host_mac: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, opts: bytes = b"", ident: int = 0
) -> bytes:
    """What a Linux guest with checksum offload transmits: NEEDS_CSUM header, partial TCP sum."""
    from appliance.nat.frames import fold

    tlen = 20 + len(opts)
    total = 20 + tlen
    ipsum = 0x4500 + total + ident + 0x4000 + (64 << 8 | 6)
    ipsum += sum(int.from_bytes(x[i : i + 2], "big") for x in (_GUEST_IP, _GW_IP) for i in (0, 2))
    pseudo = sum(int.from_bytes(x[i : i + 2], "big") for x in (_GUEST_IP, _GW_IP) for i in (0, 2)) + 6 + tlen
    hdr = _ETH_IP_TCP.pack(
        host_mac,
        _GUEST_MAC,
        0x0800,
        0x45,
        0,
        total,
        ident,
        0x4000,
        64,
        6,
        fold(ipsum),
        _GUEST_IP,
        _GW_IP,
        sport,
        dport,
        seq & 0xFFFFFFFF,
        ack & 0xFFFFFFFF,
        (tlen << 10) | flags,
        64240,
        fold(pseudo) ^ 0xFFFF or 0xFFFF,
        0,
    )
    vhdr = C.HDR.pack(C.HDR_F_NEEDS_CSUM, C.GSO_NONE, 0, 0, 34, 16, 0)
    return vhdr + hdr + opts


async def _conn(total: int) -> tuple[float, float]:
    from appliance.nat.stack import UserNetwork
    from appliance.nat.tcp import ACK, FIN, SYN

    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE)
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        net = UserNetwork(vnet_hdr=True)
        await net.start()
        dev = VirtioNet([net], _GUEST_MAC, control_queue=False)
        drv = FakeDriver(dev, queue_size=256, mem_size=16 << 20, event_idx=True)
        irq = FutureInterrupt()
        drv.interrupts[0] = irq  # type: ignore[call-overload]  # any Interrupt will do
        drv.activate()
        rxq, txq = drv.queues
        host_mac = net.host_mac
        rx_bufs: dict[int, int] = {}
        for _ in range(200):
            a = drv.alloc(2048)
            rx_bufs[rxq.add_chain([(a, 2048, WRITE)])] = a
        tx_buf = [drv.alloc(256) for _ in range(256)]
        tx_i = 0
        loop = asyncio.get_running_loop()
        driver_cpu = 0.0
        last_kick = 0

        def transmit(frame: bytes) -> None:
            # As Linux's virtqueue_kick_prepare: a kick only when the avail index passes avail_event.
            nonlocal tx_i, last_kick, driver_cpu
            c = time.thread_time()
            txq.used()
            txq.set_used_event(txq.last_used)
            a = tx_buf[tx_i % 256]
            tx_i += 1
            drv.mem.write(a, frame)
            txq.add_chain([(a, len(frame), 0)])
            new = txq.next_avail
            kick = ((new - txq.avail_event - 1) & 0xFFFF) < ((new - last_kick) & 0xFFFF)
            driver_cpu += time.thread_time() - c
            if kick:
                last_kick = new
                drv.kick(1)

        async def receive() -> tuple[int, int, int]:
            """The next frame for the guest: (flags, seq, ack) of its TCP header."""
            nonlocal driver_cpu
            while not rxq.pending():
                irq.fut = loop.create_future()
                c = time.thread_time()
                rxq.set_used_event(rxq.last_used)
                driver_cpu += time.thread_time() - c
                if rxq.pending():
                    break
                await irq.fut
            c = time.thread_time()
            (head, n), *rest = rxq.used()
            assert not rest, rest
            a = rx_bufs[head]
            _seq, _ack = struct.unpack_from("!II", drv.mem.read(a + 12 + 34 + 4, 8))
            fl = drv.mem.read(a + 12 + 34 + 13, 1)[0]
            rx_bufs[rxq.add_chain([(a, 2048, WRITE)])] = a
            rxq.set_used_event(rxq.last_used)
            driver_cpu += time.thread_time() - c
            return fl, _seq, _ack

        warm = 50
        t0 = c0 = 0.0
        for i in range(total + warm):
            if i == warm:
                t0, c0, driver_cpu = loop.time(), time.thread_time(), 0.0
            sport = 30000 + i % 20000
            isn = 1000 + i * 7
            c = time.thread_time()
            syn = _guest_frame(host_mac, sport, port, isn, 0, SYN, _SYN_OPTS)
            driver_cpu += time.thread_time() - c
            transmit(syn)
            fl, iss, _ = await receive()
            assert fl == SYN | ACK, fl
            c = time.thread_time()
            f1 = _guest_frame(host_mac, sport, port, isn + 1, iss + 1, ACK)
            f2 = _guest_frame(host_mac, sport, port, isn + 1, iss + 1, FIN | ACK)
            driver_cpu += time.thread_time() - c
            transmit(f1)
            await asyncio.sleep(0)  # nc's connect() returns, then it reads stdin and shuts down
            transmit(f2)
            fl, _, _ = await receive()
            if fl == ACK:  # the sink took longer than FIN_ACK_DELAY (a busy machine): the FIN follows
                fl, _, _ = await receive()
            assert fl & FIN, fl
            c = time.thread_time()
            f3 = _guest_frame(host_mac, sport, port, isn + 2, iss + 2, ACK)
            driver_cpu += time.thread_time() - c
            transmit(f3)
        wall = (loop.time() - t0) / total * 1e6
        cpu = (time.thread_time() - c0 - driver_cpu) / total * 1e6
        await asyncio.sleep(0.05)
        assert not net.tcp.conns or len(net.tcp.conns) <= 1, len(net.tcp.conns)
        dev.reset()
        await net.stop()
        drv.mem.close()
    finally:
        sink.kill()
        sink.wait()
    return wall, cpu


def bench_conn(total: int) -> tuple[float, float]:
    return asyncio.run(_conn(total))


CASES: dict[str, tuple[Callable[[int], float | tuple[float, float]], int]] = {
    "pop": (bench_pop, 100_000),
    "net-tx": (bench_net_tx, 100_000),
    "net-rx": (bench_net_rx, 50_000),
    "blk-read": (bench_blk_read, 5_000),
    "blk-write": (bench_blk_write, 5_000),
    "conn": (bench_conn, 1_000),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="*", help="cases to run (default: all): " + ", ".join(CASES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the item counts")
    args = p.parse_args(argv)
    names = args.cases or [c for c in CASES]
    for name in names:
        if name == "blk":
            names = [*names, "blk-read", "blk-write"]
    for name in names:
        if name == "blk":
            continue
        fn, count = CASES[name]
        runs = [fn(int(count * args.scale)) for _ in range(args.repeat)]
        if isinstance(runs[0], tuple):
            wall = min(r[0] for r in runs if isinstance(r, tuple))
            cpu = min(r[1] for r in runs if isinstance(r, tuple))
            print(f"{name:10s} {wall:8.2f} us/item wall, {cpu:6.2f} us loop-thread CPU")
        else:
            print(f"{name:10s} {min(r for r in runs if isinstance(r, float)):8.2f} us/item")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
