#!/usr/bin/env python3
"""CPU of each pass of a guest→host TCP connection through virtio-net and ``-netdev user``, without a VM.

With a Linux guest in QEMU TCG (``bench/usernet_linux.py``) our net-daemon spends
~1 ms of CPU per busybox ``nc`` connection, against ~0.1 ms per connection in
``bench/usernet.py``, which drives the stack from the host in batches with its
caches warm. The difference is not more work: between two of the daemon's passes
the guest's emulation runs for milliseconds and evicts what they touch, so each
pass starts cold. This tool replays one connection at a time through the fake
guest driver, VirtioNet and UserNetwork, to a sink process on loopback, and
copies ``--evict-mib`` MiB before each pass (``--warm``: not). Only the passes
are timed, with ``time.thread_time`` (this thread's CPU: its syscalls
included, the sink's time excluded).

Passes: ``syn`` (the SYN's kick until its SYN-ACK is in the receive ring: the host
connect included), ``after`` (the loop turn the SYN pass leaves: the host
handshake's held ACK, the socket watched), ``ack`` (the guest's ACK), ``fin``
(the guest's FIN: our shutdown, and the sink's FIN when it comes within the
pass). The guest waits on ``syn`` and ``fin``.

``--hostfwd``: host→guest connections through a ``hostfwd`` listener instead, as
``bench/usernet_linux.py``'s hostfwd row makes them (a client process connects,
sends one byte and its FIN, and reads the guest's echo to EOF). Passes: ``accept``
(the listener's event: the accept and our SYN toward the guest), ``synack`` (the
guest's SYN-ACK: the client's byte and FIN read and passed on, with our ACK, in one
segment), ``data`` (the guest's echo, which ACKs that segment, as a Linux guest
sends it), ``flush`` (the loop turn after it: the echo written to the client),
``fin`` (the guest's FIN) and ``close`` (the turn after it: the client's socket
closed). The client waits on all but ``flush``.

    .venv/bin/python bench/tools/conn_passes.py [--conns 300] [--warm] [--evict-mib 48] [--hostfwd]

Pin it to one CPU (``taskset -c 1``) for steadier numbers: the sink then runs
when we yield to it, as a TCG guest's host server does on a 2-CPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.nat import UserNetConfig, UserNetwork, tcp_nat  # noqa: E402
from appliance.nic import constants as C  # noqa: E402
from appliance.nic.virtio_net import VirtioNet  # noqa: E402
from appliance.virtio.testing import WRITE, FakeDriver  # noqa: E402
from bench.micro import SINK  # noqa: E402  (a loopback server that reads each connection to EOF)
from tests.nat.peer import GUEST_IP, GUEST_MAC, GW_IP, tcp_frame  # noqa: E402

FIN, SYN, PSH, ACK = 0x01, 0x02, 0x08, 0x10
# The SYN's options as Linux sends them: MSS 1460, SACK permitted, window scale 7.
SYN_OPTIONS = b"\x02\x04\x05\xb4\x04\x02\x01\x03\x03\x07"
PASSES = ("syn", "after", "ack", "fin")
HOSTFWD_PASSES = ("accept", "synack", "data", "flush", "fin", "close")
GUEST_PORT = 7000
# The hostfwd client: a connection per line read, as usernet_linux.py's (one byte, its FIN, read to EOF).
CLIENT = """
import socket, sys
port = int(sys.argv[1])
for _ in sys.stdin:
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"x")
    c.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := c.recv(4096):
        got += chunk
    c.close()
    print(got.decode(), flush=True)
"""
RX_BUF = 2048
TX_SLOTS = 256


class Rig:
    """The fake driver's side of a virtio-net NIC whose backend is a UserNetwork."""

    def __init__(self, net: UserNetwork) -> None:
        # As the net-daemon makes it (a process of its own: it yields to the threads it wakes).
        self.dev = VirtioNet([net], GUEST_MAC, control_queue=False, yield_after_rx_irq=True)
        self.drv = FakeDriver(self.dev, queue_size=256, mem_size=64 << 20, event_idx=True)
        self.drv.activate()
        self.rx_bufs: dict[int, int] = {}
        self._post_rx(64)
        self.drv.kick(0)
        self._tx_base = self.drv.alloc(TX_SLOTS * 4096)
        self._tx_n = 0

    def _post_rx(self, n: int) -> None:
        for _ in range(n):
            addr = self.drv.alloc(RX_BUF)
            self.rx_bufs[self.drv.queues[0].add_chain([(addr, RX_BUF, WRITE)])] = addr

    def queue_tx(self, frame: bytes) -> None:
        """Put a frame on the transmit ring without kicking (the kick is what is timed)."""
        addr = self._tx_base + (self._tx_n % TX_SLOTS) * 4096
        self._tx_n += 1
        data = bytes(C.HDR_LEN) + frame
        self.drv.mem.write(addr, data)
        self.drv.queues[1].add_chain([(addr, len(data), 0)])
        self.drv.queues[1].used()  # reap earlier frames' slots

    def received(self) -> list[bytes]:
        out = []
        for head, n in self.drv.queues[0].used():
            out.append(bytes(self.drv.mem.read(self.rx_bufs.pop(head), n))[C.HDR_LEN :])
        self._post_rx(len(out))
        return out


def tcp_of(frame: bytes) -> tuple[int, int]:
    """(sequence number, flags) of an IPv4 TCP frame."""
    ihl = (frame[14] & 15) * 4
    seq, _, off = struct.unpack_from("!IIH", frame, 14 + ihl + 4)
    return seq, off & 0x3F


def has_fin(frames: list[bytes]) -> bool:
    return any(tcp_of(f)[1] & FIN for f in frames)


def tcp_ports(frame: bytes) -> tuple[int, int]:
    """(source port, destination port) of an IPv4 TCP frame."""
    ihl = (frame[14] & 15) * 4
    sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
    return sport, dport


def tcp_payload(frame: bytes) -> bytes:
    ihl = (frame[14] & 15) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    doff = (frame[14 + ihl + 12] >> 4) * 4
    return frame[14 + ihl + doff : 14 + total]


async def frames_until(rig: Rig, done: Callable[[list[bytes]], bool], what: str) -> list[bytes]:
    """Frames for the guest until ``done`` says they are enough (5 s at most)."""
    got: list[bytes] = []
    for _ in range(25000):
        got += rig.received()
        if done(got):
            return got
        await asyncio.sleep(0.0002)
    raise RuntimeError(f"no {what} ({got!r})")


class PassClock:
    """This thread's CPU in each pass, by name, with ``evict_mib`` MiB copied before each kick."""

    def __init__(self, names: tuple[str, ...], evict_mib: int) -> None:
        self.times: dict[str, list[float]] = {p: [] for p in names}
        self._a, self._b = bytearray(evict_mib << 20), bytearray(evict_mib << 20)

    def evict(self) -> None:
        if self._a:
            self._a[:] = self._b

    def kick(self, rig: Rig, name: str) -> None:
        """The transmit ring's kick: the guest's queued frames taken, all the stack does with them."""
        self.evict()
        t = time.thread_time()
        rig.drv.kick(1)
        self.times[name].append(time.thread_time() - t)

    async def turn(self, name: str) -> None:
        """One loop turn: the callbacks the last pass scheduled."""
        t = time.thread_time()
        await asyncio.sleep(0)
        self.times[name].append(time.thread_time() - t)


async def run(conns: int, evict_mib: int) -> tuple[dict[str, list[float]], int]:
    """Time each pass of ``conns`` connections; returns the times and how many FINs came inline."""
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE)
    assert sink.stdout is not None
    port = int(sink.stdout.readline())
    net = UserNetwork(UserNetConfig(nameservers=()))
    net.yield_after_host_wakeup = True
    await net.start()
    rig = Rig(net)
    clock = PassClock(PASSES, evict_mib)
    inline = 0
    try:
        for i in range(conns):
            sport = 20000 + i % 40000
            rig.queue_tx(tcp_frame(GUEST_IP, sport, GW_IP, port, 1000, 0, SYN, 64240, opts=SYN_OPTIONS))
            clock.kick(rig, "syn")
            got = rig.received()
            if not got or tcp_of(got[-1])[1] != SYN | ACK:
                raise RuntimeError(f"connection {i}: no SYN-ACK ({got!r})")
            iss = tcp_of(got[-1])[0]
            await clock.turn("after")  # the loop turn the SYN pass scheduled
            rig.queue_tx(tcp_frame(GUEST_IP, sport, GW_IP, port, 1001, iss + 1, ACK, 64240))
            clock.kick(rig, "ack")
            await asyncio.sleep(0.0005)  # a guest takes about this long to send its FIN
            rig.queue_tx(tcp_frame(GUEST_IP, sport, GW_IP, port, 1001, iss + 1, FIN | ACK, 64240))
            clock.kick(rig, "fin")
            came = has_fin(rig.received())
            inline += came
            if not came:
                await frames_until(rig, has_fin, f"FIN from the host side, connection {i}")
            rig.queue_tx(tcp_frame(GUEST_IP, sport, GW_IP, port, 1002, iss + 2, ACK, 64240))
            await asyncio.sleep(0.003)  # the quiet ACK's wait (TX_QUIET_WAIT) and the socket's close
    finally:
        await net.stop()
        sink.kill()
        sink.wait()
    return clock.times, inline


def arp_announce() -> bytes:
    """The guest's ARP request for the gateway, so the stack knows its MAC before it sends a SYN."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, GUEST_IP, bytes(6), GW_IP)
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + body


async def run_hostfwd(conns: int, evict_mib: int) -> dict[str, list[float]]:
    """Time each pass of ``conns`` hostfwd connections."""
    clock = PassClock(HOSTFWD_PASSES, evict_mib)
    cpu = time.thread_time
    accept_cpu: list[float] = []
    real_ready = tcp_nat._ListenSocket._read_ready

    def timed_ready(self: tcp_nat._ListenSocket) -> None:
        t = cpu()
        real_ready(self)
        accept_cpu.append(cpu() - t)

    tcp_nat._ListenSocket._read_ready = timed_ready  # type: ignore[method-assign]
    net = UserNetwork(UserNetConfig.from_string(f"user,hostfwd=tcp:127.0.0.1:0-:{GUEST_PORT}"))
    net.yield_after_host_wakeup = True
    await net.start()
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(net.tcp.listener_ports()[0]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    rig = Rig(net)
    try:
        rig.queue_tx(arp_announce())
        rig.drv.kick(1)
        await frames_until(rig, bool, "ARP reply")
        for i in range(conns):
            clock.evict()
            accept_cpu.clear()
            client.stdin.write(b"go\n")
            syn = (await frames_until(rig, lambda f: bool(f) and tcp_of(f[-1])[1] == SYN, "SYN"))[-1]
            clock.times["accept"].append(sum(accept_cpu))
            iss, _ = tcp_of(syn)
            cport, _ = tcp_ports(syn)
            g = 5000 * i  # the guest's ISS
            rig.queue_tx(tcp_frame(GUEST_IP, GUEST_PORT, GW_IP, cport, g, iss + 1, SYN | ACK, 64240,
                                   opts=b"\x02\x04\x05\xb4"))  # fmt: skip
            clock.kick(rig, "synack")
            # The client's byte and FIN: in the pass or soon after.
            await frames_until(rig, has_fin, "client FIN")
            # A Linux guest sends no ACK of its own for them: it goes with the echo.
            rig.queue_tx(tcp_frame(GUEST_IP, GUEST_PORT, GW_IP, cport, g + 1, iss + 3, PSH | ACK, 64240, b"x"))
            clock.kick(rig, "data")
            await clock.turn("flush")
            await asyncio.sleep(0.0005)
            rig.queue_tx(tcp_frame(GUEST_IP, GUEST_PORT, GW_IP, cport, g + 2, iss + 3, FIN | ACK, 64240))
            clock.kick(rig, "fin")
            await clock.turn("close")
            echo = await asyncio.wait_for(client.stdout.readline(), 5)
            if echo != b"x\n":
                raise RuntimeError(f"connection {i}: the client read {echo!r}")
            rig.received()
            await asyncio.sleep(0.003)
    finally:
        tcp_nat._ListenSocket._read_ready = real_ready  # type: ignore[method-assign]
        client.kill()
        await client.wait()
        await net.stop()
    return clock.times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=300, help="connections, one at a time")
    ap.add_argument("--evict-mib", type=int, default=48, help="MiB copied before each pass")
    ap.add_argument("--warm", action="store_true", help="copy nothing before the passes")
    ap.add_argument("--hostfwd", action="store_true", help="host->guest connections through a hostfwd listener")
    a = ap.parse_args()
    if a.conns < 1 or a.evict_mib < 0:
        ap.error("--conns must be at least 1 and --evict-mib not negative")
    evict = 0 if a.warm else a.evict_mib
    inline = -1
    passes: tuple[str, ...]
    if a.hostfwd:
        passes = HOSTFWD_PASSES
        times = asyncio.run(run_hostfwd(a.conns, evict))
    else:
        passes = PASSES
        times, inline = asyncio.run(run(a.conns, evict))
    kind = "hostfwd connections" if a.hostfwd else "connections"
    print(f"{a.conns} {kind}, {'warm' if not evict else f'{evict} MiB copied before each pass'}")
    print(f"{'pass':<8}{'median us':>12}{'p90 us':>10}")
    for name in passes:
        v = sorted(times[name])
        print(f"{name:<8}{statistics.median(v) * 1e6:>12.0f}{v[len(v) * 9 // 10] * 1e6:>10.0f}")
    total = sum(statistics.median(times[p]) for p in passes)
    print(f"{'sum':<8}{total * 1e6:>12.0f}")
    if inline >= 0:
        print(f"the sink's FIN came inside the fin pass for {inline} of {a.conns}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
