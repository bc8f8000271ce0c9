"""Long runs: every kind of flow, run many times and let time out, leaves nothing behind.

A network-lab VM runs for days behind the user-mode stack. Each test here drives one kind of
flow through it, hundreds to thousands of times, with crafted frames (a raw guest, no scapy:
it has to be quick), lets the stack's timers run out (module timeouts shortened, or the
housekeeping tick run with its clock moved ahead), and then checks that the stack is back
where it started: no flow in its tables, no host descriptor open, no asyncio task, reader or
timer left over, and the traced heap back near its baseline. Only loopback services the test
starts itself are contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import os
import shutil
import socket
import struct
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from appliance.nat import UserNetConfig, UserNetwork, stack, tcp_nat, udp_nat
from appliance.nat import dns as dnsmod
from appliance.nat import icmp as icmpmod
from appliance.nat import ipv4 as ipv4mod
from appliance.nat import tcp as tcpmod
from appliance.nat import tftp as tftpmod

from .conftest import drain, full_listener
from .peer import GUEST_IP, GUEST_MAC, GW_IP, GW_MAC, csum, eth, ip_packet, tcp_frame

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
M32 = 0xFFFFFFFF
GUEST6 = ipaddress.IPv6Address("fec0::5054:ff:fe12:3456").packed
ROUTER6 = ipaddress.IPv6Address("fec0::2").packed
DNS_IP = bytes([10, 0, 2, 3])
MSS_OPT = struct.pack("!BBH", 2, 4, 1460)
GUEST_ISS = 1000  # every raw guest connection starts its sequence space here
MEMORY_SLACK = 256 * 1024  # heap left over after a run, however many flows it had
BATCH = 100  # connections opened at once (below MAX_HALF_OPEN and the listener's backlog)


def _have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAVE_V6 = _have_ipv6_loopback()
FAMILIES = [4, pytest.param(6, marks=pytest.mark.skipif(not HAVE_V6, reason="no IPv6 loopback"))]


def _ping_allowed() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
        return True
    except OSError:
        return False


# -- the raw guest ------------------------------------------------------------


def tcp6_frame(src: bytes, sport: int, dst: bytes, dport: int, seq: int, ack: int, flags: int, win: int,
               payload: bytes = b"", opts: bytes = b"") -> bytes:  # fmt: skip
    hlen = 20 + len(opts)
    seg = bytearray(struct.pack("!HHIIHHHH", sport, dport, seq & M32, ack & M32, (hlen // 4) << 12 | flags, win, 0, 0))
    seg += opts + payload
    struct.pack_into("!H", seg, 16, csum(src + dst + struct.pack("!IxxxB", len(seg), 6) + bytes(seg)))
    return eth(GW_MAC, GUEST_MAC, 0x86DD, struct.pack("!IHBB16s16s", 6 << 28, len(seg), 6, 64, src, dst) + seg)


def udp_frame(src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> bytes:
    if len(src) == 16:
        udp = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
        struct.pack_into("!H", udp, 6, csum(src + dst + struct.pack("!IxxxB", len(udp), 17) + bytes(udp)) or 0xFFFF)
        return eth(GW_MAC, GUEST_MAC, 0x86DD, struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64, src, dst) + udp)
    udp = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    struct.pack_into("!H", udp, 6, csum(src + dst + struct.pack("!xBH", 17, len(udp)) + bytes(udp)) or 0xFFFF)
    return eth(GW_MAC, GUEST_MAC, 0x0800, ip_packet(src, dst, 17, bytes(udp)))


class Seg(NamedTuple):
    """A TCP segment from the stack to the guest."""

    flags: int
    seq: int
    ack: int
    length: int


def _l4(frame: bytes, proto: int) -> tuple[int, int] | None:
    """Where the ``proto`` header starts in a frame to the guest and where its packet ends."""
    if frame[12:14] == b"\x08\x00" and len(frame) >= 34 and frame[23] == proto:
        return 14 + (frame[14] & 15) * 4, 14 + int.from_bytes(frame[16:18], "big")
    if frame[12:14] == b"\x86\xdd" and len(frame) >= 54 and frame[20] == proto:
        return 54, 54 + int.from_bytes(frame[18:20], "big")
    return None


class Wire:
    """The raw guest's side: TCP segments out, frames from the stack sorted by flow."""

    def __init__(self, net: UserNetwork, v6: bool = False) -> None:
        self.net = net
        self.src = GUEST6 if v6 else GUEST_IP
        self.dst = ROUTER6 if v6 else GW_IP
        self._build = tcp6_frame if v6 else tcp_frame
        self.segs: dict[tuple[int, int], list[Seg]] = defaultdict(list)  # (guest port, remote port)
        self.udp: list[tuple[int, int, bytes]] = []  # (remote port, guest port, payload)
        self.icmp: list[bytes] = []

    def send(self, frame: bytes) -> None:
        assert self.net.send([memoryview(frame)]) is True

    def tcp(self, gport: int, rport: int, seq: int, ack: int, flags: int, payload: bytes = b"",
            opts: bytes = b"") -> None:  # fmt: skip
        self.send(self._build(self.src, gport, self.dst, rport, seq, ack, flags, 0xFFFF, payload, opts))

    def poll(self) -> None:
        for f in drain(self.net):
            if (at := _l4(f, 6)) is not None:
                sport, dport, seq, ack, off = struct.unpack_from("!HHIIH", f, at[0])
                self.segs[dport, sport].append(Seg(off & 0x3F, seq, ack, at[1] - at[0] - (off >> 12) * 4))
            elif (at := _l4(f, 17)) is not None:
                sport, dport, length = struct.unpack_from("!HHH", f, at[0])
                self.udp.append((sport, dport, f[at[0] + 8 : at[0] + length]))
            elif _l4(f, 1) is not None:
                self.icmp.append(f)

    def seen(self, gport: int, rport: int, flags: int) -> Seg | None:
        """The first segment of that flow carrying all of ``flags``."""
        return next((s for s in self.segs[gport, rport] if s.flags & flags == flags), None)

    async def until(self, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                self.poll()
                if cond():
                    return
                await asyncio.sleep(0.001)


async def syn(w: Wire, port: int, gports: range, answer: int) -> None:
    """SYNs from ``gports`` to the host's ``port`` until each is answered with ``answer``: sent
    again after 50 ms as a guest retransmits them (no more than MAX_CONNECTING host connects are
    in progress at once; past that a SYN is dropped)."""
    async with asyncio.timeout(5):
        while True:
            missing = [p for p in gports if w.seen(p, port, answer) is None]
            if not missing:
                return
            for p in missing:
                w.tcp(p, port, GUEST_ISS, 0, SYN, opts=MSS_OPT)
            for _ in range(50):
                await asyncio.sleep(0.001)
                w.poll()
                if all(w.seen(p, port, answer) for p in missing):
                    break


async def open_outbound(w: Wire, port: int, gports: range, *, ack: bool = True) -> dict[int, int]:
    """Guest connections from ``gports`` to the host's ``port``: SYN, SYN-ACK, and (``ack``) the
    final ACK. Returns the stack's next sequence number for each."""
    await syn(w, port, gports, SYN | ACK)
    theirs = {}
    for p in gports:
        synack = w.seen(p, port, SYN | ACK)
        assert synack is not None
        theirs[p] = synack.seq + 1
        if ack:
            w.tcp(p, port, GUEST_ISS + 1, theirs[p], ACK)
    return theirs


async def accept(lsock: socket.socket, n: int) -> list[socket.socket]:
    """``n`` connections from a non-blocking loopback listener."""
    out: list[socket.socket] = []
    async with asyncio.timeout(5):
        while len(out) < n:
            try:
                s, _ = lsock.accept()
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            s.setblocking(False)
            out.append(s)
    return out


def reset(s: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashing or impatient peer does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


@contextlib.contextmanager
def listener(family: int = socket.AF_INET) -> Iterator[tuple[socket.socket, int]]:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        s.listen(512)
        s.setblocking(False)
        yield s, s.getsockname()[1]


# -- what "clean" means ---------------------------------------------------------


def tables(net: UserNetwork) -> dict[str, int]:
    """Every table of the stack that holds per-flow state, by name (all 0 when idle)."""
    tcp = net.tcp
    return {
        "flows": len([f for f in net.flows() if f.state != "LISTEN"]),
        "tcp.conns": len(tcp.conns),
        "tcp.half_open": len(tcp._half_open),
        "tcp.time_wait": len(tcp._time_wait),
        "tcp.pending": len(tcp._pending),
        "tcp.attaching": len(tcp._attaching),
        "tcp.ack_set": len(tcp._ack_set),
        "tcp.connecting": tcp._connecting,
        "tcp.tasks": len(tcp._tasks),
        "udp.flows": len(net.udp._flows),
        "icmp.flows": len(net.icmp._flows),
        "dns.pending": len(net.dns._pending),
        "dns.askers": len(net.dns._askers),
        "reassembly": len(net.reassembler),
        "reassembly.bytes": net.reassembler.buffered,
        "tftp.sessions": len(net.tftp) if net.tftp is not None else 0,
        "tx.waiters": len(net._space_waiters),
    }


def process(net: UserNetwork | None) -> dict[str, int]:
    """What the process holds for the stack: descriptors, the loop's tasks, readers/writers and
    live timers, and the stack's own epoll's watches (listeners included)."""
    loop: Any = asyncio.get_running_loop()
    poller = net.tcp._poller if net is not None else None
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "tasks": len(asyncio.all_tasks()),
        "selector": len(loop._selector.get_map()),
        "timers": sum(1 for h in loop._scheduled if not h.cancelled()),
        "epoll": len(poller) if poller is not None else 0,
    }


class Ledger:
    """A baseline of :func:`process` and the traced heap, and the check that a run came back to it."""

    def __init__(self, net: UserNetwork) -> None:
        self.net = net
        self.base: dict[str, int] = {}
        self.heap = 0

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0.01)
            drain(self.net)
        gc.collect()

    async def baseline(self) -> None:
        await self.settle()
        assert tables(self.net) == dict.fromkeys(tables(self.net), 0), "not idle at the start"
        self.base = process(self.net)
        self.heap = tracemalloc.get_traced_memory()[0]

    async def assert_clean(self) -> None:
        await self.settle()
        left = {k: v for k, v in tables(self.net).items() if v}
        assert not left, f"flow state left behind: {left}"
        now = process(self.net)
        grew = {k: (self.base[k], v) for k, v in now.items() if v > self.base[k]}
        assert not grew, f"process resources grew (before, after): {grew}"
        loop: Any = asyncio.get_running_loop()
        # Cancelled timers wait in the heap until asyncio purges them (more than half cancelled).
        assert len(loop._scheduled) <= self.base["timers"] + 250
        grown = tracemalloc.get_traced_memory()[0] - self.heap
        assert grown < MEMORY_SLACK, f"heap grew by {grown} bytes"
        assert self.net.counters()["errors"] == 0


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def run_housekeeping(net: UserNetwork, ahead: float) -> None:
    """Run the stack's 1 s housekeeping tick now, with its clock ``ahead`` seconds in the future:
    the idle timeouts of UDP, ICMP, DNS, TFTP and reassembly as they would run after that long.
    The pending tick is cancelled, so one chain of ticks stays scheduled."""
    real = time.monotonic

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return real() + ahead

    assert net._housekeeping is not None
    net._housekeeping.cancel()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(stack, "time", Clock)
        net._tick()


@contextlib.asynccontextmanager
async def started(text: str = "user", **replace: Any) -> AsyncIterator[UserNetwork]:
    cfg = dataclasses.replace(UserNetConfig.from_string(text), **replace)
    if cfg.nameservers is None:
        cfg = dataclasses.replace(cfg, nameservers=())
    net = UserNetwork(cfg)
    await net.start()
    try:
        yield net
    finally:
        await net.stop()


@pytest.fixture
def quick_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    """TCP timers in tens of milliseconds: retransmissions, handshakes and TIME-WAIT. A handshake
    gives up after ~0.35 s, well past a loaded machine's pause before the raw guest answers."""
    monkeypatch.setattr(tcpmod, "INITIAL_RTO", 0.05)
    monkeypatch.setattr(tcpmod, "MIN_RTO", 0.01)
    monkeypatch.setattr(tcpmod, "MAX_RTO", 0.1)
    monkeypatch.setattr(tcpmod, "MAX_RETRIES", 2)
    monkeypatch.setattr(tcpmod, "MAX_SYN_RETRIES", 3)
    monkeypatch.setattr(tcpmod, "TIME_WAIT", 0.02)


# -- guest-to-host TCP --------------------------------------------------------------

# How each kind of connection ends, after the handshake (``theirs``: the stack's next sequence
# number; ``host``: the accepted host socket).
Ending = Callable[[Wire, int, int, int, socket.socket], None]


def _guest_closes_first(w: Wire, gport: int, port: int, theirs: int, host: socket.socket) -> None:
    w.tcp(gport, port, GUEST_ISS + 1, theirs, FIN | ACK)
    host.close()  # the host answers the EOF by closing: the stack's FIN follows


def _host_closes_first(w: Wire, gport: int, port: int, theirs: int, host: socket.socket) -> None:
    host.close()


def _guest_resets(w: Wire, gport: int, port: int, theirs: int, host: socket.socket) -> None:
    w.tcp(gport, port, GUEST_ISS + 1, theirs, RST)
    host.close()


def _host_resets(w: Wire, gport: int, port: int, theirs: int, host: socket.socket) -> None:
    reset(host)


def _guest_goes_silent(w: Wire, gport: int, port: int, theirs: int, host: socket.socket) -> None:
    host.send(b"never acknowledged")
    host.close()


ENDINGS: dict[str, Ending] = {
    "guest_closes_first": _guest_closes_first,
    "host_closes_first": _host_closes_first,
    "guest_resets": _guest_resets,
    "host_resets": _host_resets,
    "guest_goes_silent": _guest_goes_silent,
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_outbound_connections_leave_nothing_behind(family: int, ending: str, quick_tcp: None,
                                                         traced: None) -> None:  # fmt: skip
    """Guest connections to a loopback server, ended each way, 300 times: nothing remains.

    Closed by the guest first (CLOSE-WAIT, LAST-ACK), by the host first (FIN-WAIT, TIME-WAIT),
    reset by either side, or the guest going silent with data unacknowledged (retransmissions
    give up): once the timers have run, the tables, descriptors, loop and heap are as before.
    """
    end = ENDINGS[ending]
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    async with started() as net:
        w = Wire(net, v6=family == 6)
        ledger = Ledger(net)
        with listener(fam) as (lsock, port):
            gport = 10000

            async def round_(n: int) -> None:
                nonlocal gport
                gports = range(gport, gport + n)
                gport += n
                theirs = await open_outbound(w, port, gports)
                hosts = await accept(lsock, n)
                for p, h in zip(gports, hosts, strict=True):
                    end(w, p, port, theirs[p], h)
                if ending not in ("guest_resets", "host_resets", "guest_goes_silent"):
                    # The stack's FIN comes once it reads the host's EOF: acknowledge it (with the
                    # guest's own FIN when the host closed first).
                    todo = set(gports)

                    def answered() -> bool:
                        for p in list(todo):
                            fin = w.seen(p, port, FIN)
                            if fin is not None:
                                seq = GUEST_ISS + (2 if ending == "guest_closes_first" else 1)
                                flags = ACK if ending == "guest_closes_first" else FIN | ACK
                                w.tcp(p, port, seq, fin.seq + 1, flags)
                                todo.discard(p)
                        return not todo

                    await w.until(answered)
                await w.until(lambda: not net.tcp.conns)
                w.segs.clear()

            await round_(10)
            await ledger.baseline()
            for _ in range(3):
                await round_(BATCH)
            await ledger.assert_clean()
            if ending in ("host_resets", "guest_goes_silent"):
                assert net.counters()["tcp_rst_sent"] >= 3 * BATCH


async def test_refused_and_abandoned_connections_leave_nothing_behind(quick_tcp: None, traced: None) -> None:
    """SYNs to a closed host port (RST back), and SYNs whose SYN-ACK the guest never answers
    (the handshake gives up): 300 of each."""
    async with started() as net:
        w = Wire(net)
        ledger = Ledger(net)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]  # nobody listens there once closed
        with listener() as (lsock, port):
            gport = 10000

            async def refused(n: int) -> None:
                nonlocal gport
                rng = range(gport, gport + n)
                gport += n
                await syn(w, closed_port, rng, RST)
                await w.until(lambda: not net.tcp.conns)
                w.segs.clear()

            async def abandoned(n: int) -> None:
                nonlocal gport
                rng = range(gport, gport + n)
                gport += n
                await open_outbound(w, port, rng, ack=False)
                for h in await accept(lsock, n):
                    h.close()
                await w.until(lambda: not net.tcp.conns)
                w.segs.clear()

            await refused(10)
            await abandoned(10)
            await ledger.baseline()
            for _ in range(3):
                await refused(BATCH)
                await abandoned(BATCH)
            await ledger.assert_clean()
            assert net.counters()["tcp_refused"] >= 3 * BATCH


async def test_connection_left_in_fin_wait_2_by_a_silent_guest_is_reset(
    quick_tcp: None, traced: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: the host closed, the guest acknowledged our FIN but never sent its own (an
    application that never closes, or a guest rebooted meanwhile): the connection stayed in
    FIN-WAIT-2, with its host socket, for as long as the stack ran. No timer ends that state.
    Now it is reset after FIN_WAIT_2_TIMEOUT without a segment from the guest, as BSD stacks
    and libslirp give it up (10 minutes) and Linux resets an orphan after tcp_fin_timeout."""
    monkeypatch.setattr(tcpmod, "FIN_WAIT_2_TIMEOUT", 0.05, raising=False)
    async with started() as net:
        w = Wire(net)
        ledger = Ledger(net)
        with listener() as (lsock, port):
            gport = 10000

            async def round_(n: int) -> None:
                nonlocal gport
                rng = range(gport, gport + n)
                gport += n
                theirs = await open_outbound(w, port, rng)
                for h in await accept(lsock, n):
                    h.close()
                await w.until(lambda: all(w.seen(p, port, FIN) for p in rng))
                for p in rng:
                    w.tcp(p, port, GUEST_ISS + 1, theirs[p] + 1, ACK)  # our FIN acknowledged, no FIN of its own
                await w.until(lambda: all(w.seen(p, port, RST) for p in rng), 10)
                assert not net.tcp.conns
                w.segs.clear()

            await round_(10)
            await ledger.baseline()
            for _ in range(5):
                await round_(BATCH)
            await ledger.assert_clean()


async def test_fin_wait_2_lasts_while_the_guest_is_heard_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FIN-WAIT-2 limit counts silence: a guest that goes on sending (its half of a
    half-closed connection) keeps the connection however long that lasts."""
    monkeypatch.setattr(tcpmod, "FIN_WAIT_2_TIMEOUT", 1.0, raising=False)
    async with started() as net:
        w = Wire(net)
        with listener() as (lsock, port):
            theirs = (await open_outbound(w, port, range(10000, 10001)))[10000]
            [host] = await accept(lsock, 1)
            host.shutdown(socket.SHUT_WR)
            await w.until(lambda: w.seen(10000, port, FIN) is not None)
            w.tcp(10000, port, GUEST_ISS + 1, theirs + 1, ACK)
            [conn] = net.tcp.conns.values()
            assert conn.state_name == "FIN_WAIT_2"
            got = b""
            for i in range(15):  # 1.5 s, half again the limit, in 0.1 s steps
                w.tcp(10000, port, GUEST_ISS + 1 + i, theirs + 1, ACK | PSH, b"x")
                await asyncio.sleep(0.1)
                with contextlib.suppress(BlockingIOError):
                    got += host.recv(100)
            assert conn.state_name == "FIN_WAIT_2" and net.tcp.conns
            await w.until(lambda: w.seen(10000, port, RST) is not None, 5)
            assert not net.tcp.conns
            with contextlib.suppress(BlockingIOError):
                got += host.recv(100)
            assert got == b"x" * 15
            host.close()


async def test_connect_the_guest_gave_up_on_frees_its_slot_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: a guest that reset a connection (or whose SYN the SYN cache let go) while the host
    connect was still in progress left that connect running until CONNECT_TIMEOUT: its socket,
    and one of MAX_CONNECTING slots, 20 s long. 64 SYNs to a silent address given up would have
    refused every new connection for that time."""
    monkeypatch.setattr(tcp_nat, "CONNECT_TIMEOUT", 30.0)
    async with started() as net:
        w = Wire(net)
        async with full_listener() as port:
            fds = len(os.listdir("/proc/self/fd"))
            w.tcp(20000, port, GUEST_ISS, 0, SYN, opts=MSS_OPT)
            await asyncio.sleep(0.05)
            assert net.tcp._pending, "the host connect is in progress"
            w.tcp(20000, port, GUEST_ISS + 1, 0, RST)
            assert not net.tcp.conns and not net.tcp._pending and net.tcp._connecting == 0
            await asyncio.sleep(0.01)
            assert len(os.listdir("/proc/self/fd")) <= fds
            assert net.counters()["errors"] == 0


# -- hostfwd TCP ---------------------------------------------------------------------


def announce(w: Wire) -> None:
    """The guest's ARP request for the gateway: the stack learns its MAC (for its own SYNs)."""
    w.send(eth(b"\xff" * 6, GUEST_MAC, 0x0806,
               struct.pack("!HHBBH6s4s6s4s", 1, 0x800, 6, 4, 1, GUEST_MAC, GUEST_IP, bytes(6), GW_IP)))  # fmt: skip
    drain(w.net)


def connect_clients(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        out.append(c)
    return out


@pytest.mark.parametrize(
    "ending", ["guest_accepts", "guest_refuses", "guest_never_answers", "client_leaves_early", "client_resets_early"]
)
async def test_forwarded_connections_leave_nothing_behind(ending: str, quick_tcp: None, traced: None) -> None:
    """Host clients of a hostfwd rule, 150 of them: the guest accepts (and the client closes
    first), refuses with RST, never answers the SYN; or the client leaves (FIN or RST) before
    the guest answers. Once done, only the listener remains."""
    async with started("user,hostfwd=tcp:127.0.0.1:0-:22") as net:
        w = Wire(net)
        ledger = Ledger(net)
        announce(w)
        [port] = net.tcp.listener_ports()

        async def round_(n: int) -> None:
            clients = connect_clients(port, n)
            await w.until(lambda: len([k for k in list(w.segs) if w.seen(*k, SYN)]) == n)
            syns = {k: s for k in list(w.segs) if (s := w.seen(*k, SYN)) is not None}
            if ending in ("client_leaves_early", "client_resets_early"):
                # Gone after the stack took the connection, before the guest answers its SYN.
                for c in clients:
                    if ending == "client_leaves_early":
                        c.close()
                    else:
                        reset(c)
                await asyncio.sleep(0.005)
            for (gport, rport), syn in syns.items():
                if ending == "guest_refuses":
                    w.tcp(gport, rport, 0, syn.seq + 1, RST | ACK)
                elif ending != "guest_never_answers":
                    w.tcp(gport, rport, 5000, syn.seq + 1, SYN | ACK, opts=MSS_OPT)
            if ending in ("guest_accepts", "client_leaves_early"):
                if ending == "guest_accepts":
                    for c in clients:
                        c.close()  # the client closes first: the stack's FIN follows
                todo = set(syns)

                def answered() -> bool:
                    for k in list(todo):
                        fin = w.seen(*k, FIN)
                        if fin is not None:
                            w.tcp(*k, 5001, fin.seq + 1, FIN | ACK)
                            todo.discard(k)
                    return not todo

                await w.until(answered)
            await w.until(lambda: not net.tcp.conns)
            for c in clients:
                c.close()
            w.segs.clear()

        await round_(10)
        await ledger.baseline()
        for _ in range(3):
            await round_(50)  # within the listener's backlog of 100
        await ledger.assert_clean()


async def test_hostfwd_add_and_remove_cycles_leave_nothing_behind(traced: None) -> None:
    """hostfwd_add then hostfwd_remove, TCP and UDP, 200 times each, a client connecting to each
    TCP forward before it goes (the guest resets it): listeners, sockets and watches all go."""
    async with started() as net:
        w = Wire(net)
        ledger = Ledger(net)
        announce(w)

        async def cycle() -> None:
            await net.add_hostfwd("tcp:127.0.0.1:0-:22")
            await net.add_hostfwd("udp:127.0.0.1:0-:53")
            tport = net.tcp.listener_ports()[0]
            uport = net.udp.listener_ports()[0]
            with socket.socket() as c:
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", tport))
                await w.until(lambda: any(w.seen(*k, SYN) for k in w.segs))
                for k in list(w.segs):
                    syn = w.seen(*k, SYN)
                    if syn is not None:
                        w.tcp(*k, 0, syn.seq + 1, RST | ACK)
                w.segs.clear()
            assert net.remove_hostfwd(f"tcp:127.0.0.1:{tport}")
            assert net.remove_hostfwd(f"udp:127.0.0.1:{uport}")

        await cycle()
        await ledger.baseline()
        for _ in range(200):
            await cycle()
        assert not net.tcp.listener_ports() and not net.udp.listener_ports()
        await ledger.assert_clean()


# -- UDP, DNS, ICMP, fragments, TFTP -------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
async def test_udp_flows_expire_and_leave_nothing_behind(family: int, traced: None) -> None:
    """1000 guest UDP flows to a loopback echo server, each answered, then idle past the
    timeout: the housekeeping closes every socket."""
    v6 = family == 6
    loop = asyncio.get_running_loop()
    async with started() as net:
        w = Wire(net, v6=v6)
        ledger = Ledger(net)
        with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as srv:
            srv.bind(("::1" if v6 else "127.0.0.1", 0))
            srv.setblocking(False)
            port = srv.getsockname()[1]
            gport = 20000

            async def round_(n: int) -> None:
                nonlocal gport
                for p in range(gport, gport + n):
                    w.send(udp_frame(w.src, p, w.dst, port, b"ping"))
                gport += n
                for _ in range(n):
                    data, peer = await asyncio.wait_for(loop.sock_recvfrom(srv, 100), 5)
                    srv.sendto(b"pong", peer)
                await w.until(lambda: len(w.udp) >= n)
                w.udp.clear()
                run_housekeeping(net, udp_nat.IDLE_TIMEOUT + 1)

            await round_(10)
            await ledger.baseline()
            for _ in range(4):
                await round_(250)
            await ledger.assert_clean()


async def test_guest_flow_replaced_by_a_forwarded_client_closes_its_socket(traced: None) -> None:
    """Finding: the guest sends from its forwarded UDP port to a host peer's port (a WireGuard or
    RTP endpoint talks from one port both ways), then that peer sends to the hostfwd port. The
    forward's flow took the guest's flow's place in the table, but the guest flow's connected
    socket was never closed nor unwatched: one descriptor and loop reader lost each time."""
    async with started("user,hostfwd=udp:127.0.0.1:0-:5000") as net:
        w = Wire(net)
        ledger = Ledger(net)
        [fwd_port] = net.udp.listener_ports()
        loop = asyncio.get_running_loop()

        async def exchange() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
                peer.bind(("127.0.0.1", 0))
                peer.setblocking(False)
                pport = peer.getsockname()[1]
                w.send(udp_frame(GUEST_IP, 5000, GW_IP, pport, b"handshake"))  # the guest starts
                assert await asyncio.wait_for(loop.sock_recv(peer, 100), 5) == b"handshake"
                peer.sendto(b"response", ("127.0.0.1", fwd_port))  # the peer answers the forward
                await w.until(lambda: any(d == b"response" for _, _, d in w.udp))
                w.udp.clear()

        await exchange()
        run_housekeeping(net, udp_nat.IDLE_TIMEOUT + 1)
        await ledger.baseline()
        for _ in range(200):
            await exchange()
        run_housekeeping(net, udp_nat.IDLE_TIMEOUT + 1)
        await ledger.assert_clean()


async def test_dns_queries_answered_or_not_leave_nothing_behind(traced: None) -> None:
    """750 queries a loopback upstream answers and 750 it ignores (SERVFAIL when they time
    out): pending queries and the per-port rows all go once idle."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
        up.bind(("127.0.0.1", 0))
        up.setblocking(False)
        async with started(nameservers=(("127.0.0.1", up.getsockname()[1]),)) as net:
            w = Wire(net)
            ledger = Ledger(net)
            gport = 20000

            async def round_(n: int, answer: bool) -> None:
                nonlocal gport
                for i in range(n):
                    q = struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + b"\x01x\x05%05d\x00\x00\x01\x00\x01" % i
                    w.send(udp_frame(GUEST_IP, gport + i, DNS_IP, 53, q))
                gport += n
                for _ in range(n):
                    data, peer = await asyncio.wait_for(loop.sock_recvfrom(up, 600), 5)
                    if answer:
                        up.sendto(data[:2] + b"\x81\x80" + data[4:], peer)
                if answer:
                    await w.until(lambda: len(w.udp) >= n)
                else:
                    run_housekeeping(net, dnsmod.PER_SERVER_TIMEOUT + 0.5)
                    w.poll()
                    assert len(w.udp) == n and all(d[3] & 0x0F == dnsmod.RCODE_SERVFAIL for _, _, d in w.udp)
                w.udp.clear()
                run_housekeeping(net, udp_nat.IDLE_TIMEOUT + 1)

            await round_(10, True)
            await ledger.baseline()
            for _ in range(3):
                await round_(250, True)
                await round_(250, False)
            await ledger.assert_clean()


async def ping_long_run() -> None:
    """Echo requests to host loopback under 1000 identifiers (each its own ping socket, 64 at
    most at once), then idle past the timeout: no ping socket, reader or heap is left."""
    async with started() as net:
        w = Wire(net)
        ledger = Ledger(net)
        ident = 0

        async def round_(n: int) -> None:
            nonlocal ident
            for _ in range(n):  # fewer than MAX_FLOWS: no socket is closed before its reply
                ident += 1
                msg = bytearray(struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"ping")
                struct.pack_into("!H", msg, 2, csum(bytes(msg)))
                w.send(eth(GW_MAC, GUEST_MAC, 0x0800, ip_packet(GUEST_IP, bytes([127, 0, 0, 1]), 1, bytes(msg))))
            await w.until(lambda: len(w.icmp) >= n)
            w.icmp.clear()
            run_housekeeping(net, icmpmod.IDLE_TIMEOUT + 1)

        await round_(5)
        await ledger.baseline()
        for _ in range(20):
            await round_(50)
        await ledger.assert_clean()
        assert net.counters()["icmp_echo_forwarded"] >= 1000


# Where this host gives no ping sockets (net.ipv4.ping_group_range), a private network namespace
# of a root process does: its loopback is all it reaches, and its sysctl is its own.
PING_IN_NETNS = r"""
import asyncio, pathlib, subprocess, sys, tracemalloc
sys.path.insert(0, sys.argv[1])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
pathlib.Path("/proc/sys/net/ipv4/ping_group_range").write_text("0 2147483647")
from tests.nat.test_long_run import ping_long_run
tracemalloc.start()
asyncio.run(ping_long_run())
print("clean")
"""


@pytest.mark.skipif(not _ping_allowed() and (os.geteuid() != 0 or shutil.which("unshare") is None),
                    reason="no ping sockets here, and no root to make a network namespace that has them")  # fmt: skip
async def test_ping_sockets_expire_and_leave_nothing_behind(traced: None) -> None:
    if _ping_allowed():
        await ping_long_run()
        return
    proc = await asyncio.create_subprocess_exec(
        "unshare", "-n", sys.executable, "-c", PING_IN_NETNS, str(Path(__file__).parents[2]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and out.strip() == b"clean", err.decode(errors="replace")[-3000:]


async def test_fragments_never_completed_leave_nothing_behind(traced: None) -> None:
    """3000 first and last fragments of datagrams whose middle never comes, then the reassembly
    timeout: nothing is held."""
    async with started() as net:
        w = Wire(net)
        ledger = Ledger(net)
        ident = 0

        def round_(n: int) -> None:
            nonlocal ident
            for _ in range(n):
                ident = (ident + 1) & 0xFFFF
                w.send(eth(GW_MAC, GUEST_MAC, 0x0800, ip_packet(GUEST_IP, GW_IP, 17, bytes(1024), ident, 0x2000)))
                w.send(eth(GW_MAC, GUEST_MAC, 0x0800, ip_packet(GUEST_IP, GW_IP, 17, bytes(512), ident, 1024 // 8 * 2)))
            run_housekeeping(net, ipv4mod.TIMEOUT + 1)

        round_(10)
        await ledger.baseline()
        for _ in range(6):
            round_(500)
        await ledger.assert_clean()
        assert net.counters()["frag_dropped"] >= 3000


async def test_tftp_transfers_finished_or_abandoned_leave_nothing_behind(tmp_path: Path, traced: None) -> None:
    """216 reads of a 3000-byte file to the end and 216 abandoned after the first block: every
    session ends and its file descriptor is closed."""
    (tmp_path / "boot.img").write_bytes(os.urandom(3000))
    async with started(f"user,tftp={tmp_path}") as net:
        w = Wire(net)
        ledger = Ledger(net)
        gport = 20000

        def fetch(finish: bool) -> None:
            nonlocal gport
            gport += 1
            w.send(udp_frame(GUEST_IP, gport, GW_IP, 69, b"\0\1boot.img\0octet\0"))
            block = 0
            while True:
                w.poll()
                [(_, _, data)] = w.udp
                w.udp.clear()
                assert data[:2] == b"\0\3"
                block = int.from_bytes(data[2:4], "big")
                if not finish:
                    return
                w.send(udp_frame(GUEST_IP, gport, GW_IP, 69, b"\0\4" + block.to_bytes(2, "big")))
                if len(data) - 4 < tftpmod.DEFAULT_BLKSIZE:
                    return

        def round_(n: int) -> None:
            for i in range(n):
                fetch(finish=i % 2 == 0)
            run_housekeeping(net, tftpmod.SESSION_TIMEOUT + 1)

        round_(4)
        await ledger.baseline()
        for _ in range(12):
            round_(2 * tftpmod.MAX_SESSIONS - 4)  # the abandoned ones alone fill the session table
        await ledger.assert_clean()
        assert net.tftp is not None and net.tftp.stats.files_sent >= 12 * (tftpmod.MAX_SESSIONS - 2)


async def test_a_stopped_stack_leaves_nothing_open(traced: None) -> None:
    """A stack stopped with everything in use (connections both ways, UDP and DNS flows,
    forwards), 30 times over: its descriptors, readers, timers and tasks all go with it."""
    loop: Any = asyncio.get_running_loop()

    async def life() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.bind(("127.0.0.1", 0))
            cfg = "user,hostfwd=tcp:127.0.0.1:0-:22,hostfwd=udp:127.0.0.1:0-:53"
            async with started(cfg, nameservers=(("127.0.0.1", up.getsockname()[1]),)) as net:
                w = Wire(net)
                announce(w)
                with listener() as (lsock, port):
                    await open_outbound(w, port, range(10000, 10010))
                    hosts = await accept(lsock, 10)
                    w.send(udp_frame(GUEST_IP, 20000, GW_IP, up.getsockname()[1], b"datagram"))
                    w.send(udp_frame(GUEST_IP, 20001, DNS_IP, 53, b"\0\1\1\0\0\1\0\0\0\0\0\0\1x\0\0\1\0\1"))
                    [fwd] = net.tcp.listener_ports()
                    clients = connect_clients(fwd, 5)
                    await w.until(lambda: len([k for k in list(w.segs) if k[0] == 22]) == 5)
                    assert net.udp._flows and net.dns._pending
            for h in hosts + clients:
                h.close()

    await life()
    gc.collect()
    base = process(None)
    heap = tracemalloc.get_traced_memory()[0]
    for _ in range(30):
        await life()
    for _ in range(3):
        await asyncio.sleep(0.01)
    gc.collect()
    now = process(None)
    assert {k: v for k, v in now.items() if v > base[k]} == {}, (base, now)
    assert len(loop._scheduled) <= base["timers"] + 250
    assert tracemalloc.get_traced_memory()[0] - heap < MEMORY_SLACK
