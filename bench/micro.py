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
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


CASES: dict[str, tuple[Callable[[int], float | tuple[float, float]], int]] = {
    "pop": (bench_pop, 100_000),
    "net-tx": (bench_net_tx, 100_000),
    "net-rx": (bench_net_rx, 50_000),
    "blk-read": (bench_blk_read, 5_000),
    "blk-write": (bench_blk_write, 5_000),
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
