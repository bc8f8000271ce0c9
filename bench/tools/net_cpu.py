#!/usr/bin/env python3
"""Loop-thread CPU per frame of virtio-net on a real tap, without a VM.

The device runs through the fake guest driver against a tap (with vnet
headers) in a network namespace this script makes; only the device side is
timed with ``time.thread_time`` (CPU time of this thread, tap syscalls
included), so before/after numbers are comparable on a loaded machine. The
best of ``--repeat`` runs is printed.

    .venv/bin/python bench/tools/net_cpu.py [--frames 200000] [--size 64] [--profile tx|rx]

tx: 64-frame batches of 1-descriptor chains written to the tap (a frame the
    host drops right away: no listener).
rx: 64 frames queued in the tap by an AF_PACKET socket, then one rx kick
    drains them into 2 KiB single-buffer chains (MRG_RXBUF, as Linux posts;
    ``--no-mrg``: without it, as the test guest).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

TAP = "ncpu0"
BATCH = 64


def frame(size: int) -> bytes:
    return b"\xff" * 6 + b"\x02\x00\x00\xbe\xec\x01" + b"\x88\xb5" + bytes(size - 14)


async def run(frames: int, size: int, repeat: int, profile: str, mrg: bool) -> None:
    from appliance.net.netdev import TapNetdev, open_netdev
    from appliance.nic import constants as C
    from appliance.nic.virtio_net import VirtioNet
    from appliance.virtio.testing import WRITE, FakeDriver

    backends, tap = await open_netdev(TapNetdev("n0", ifname=TAP), queues=1)
    try:
        dev = VirtioNet(backends, bytes.fromhex("525400123456"))
        drv = FakeDriver(dev, queue_size=256, mem_size=32 << 20)
        if not mrg:
            drv.features &= ~(1 << C.F_MRG_RXBUF)
        drv.activate()
        txq, rxq = drv.queues[1], drv.queues[0]
        payload = bytes(12) + frame(size)
        txbufs = [drv.alloc(2048) for _ in range(BATCH)]
        for a in txbufs:
            drv.mem.write(a, payload)
        rxbufs = [drv.alloc(2048) for _ in range(256)]
        for a in rxbufs:
            rxq.add_chain([(a, 2048, WRITE)])
        drv.kick(0)
        pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        pkt.bind((TAP, 0x88B5))
        pkt.setsockopt(263, 20, 1)  # SOL_PACKET, PACKET_QDISC_BYPASS
        raw = frame(size)

        def tx_case() -> float:
            n, spent = 0, 0.0
            while n < frames:
                for a in txbufs:
                    txq.add_chain([(a, len(payload), 0)])
                t = time.thread_time()
                drv.kick(1)
                spent += time.thread_time() - t
                n += len(txq.used())
            assert dev.stats[0].tx_dropped == 0
            return spent / n * 1e6

        def rx_case() -> float:
            n, spent = 0, 0.0
            while n < frames:
                for _ in range(BATCH):
                    pkt.send(raw)
                t = time.thread_time()
                dev._rx(0)
                spent += time.thread_time() - t
                used = rxq.used()
                for head, _ in used:
                    rxq.add_chain([(rxbufs[head % 256], 2048, WRITE)])
                n += len(used)
                t = time.thread_time()
                drv.kick(0)
                spent += time.thread_time() - t
            return spent / n * 1e6

        for name, case in (("tx", tx_case), ("rx", rx_case)):
            if profile and profile != name:
                continue
            if profile:
                prof = cProfile.Profile()
                prof.enable()
                case()
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(15)
            best = min(case() for _ in range(repeat))
            if name == "rx":
                name += "-mrg" if mrg else "-nomrg"
            print(f"{name}-{size:<6} {best:6.2f} us/frame (loop-thread CPU, best of {repeat})")
        pkt.close()
    finally:
        dev.close()
        await tap.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=200_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", default="", help="cProfile one case (tx or rx)")
    p.add_argument("--no-mrg", action="store_true", help="rx without MRG_RXBUF (as the test guest)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.inner:
        asyncio.run(run(a.frames, a.size, a.repeat, a.profile, not a.no_mrg))
        return 0
    ns = f"aplcpu-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        return subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, __file__, "--inner", "--frames", str(a.frames),
             "--size", str(a.size), "--repeat", str(a.repeat), "--profile", a.profile]
            + (["--no-mrg"] if a.no_mrg else [])
        ).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
