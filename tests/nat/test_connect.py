"""Outbound connection setup: how fast a guest SYN is answered, and connects that never finish."""

from __future__ import annotations

import asyncio
import socket
import struct

from appliance.nat import UserNetConfig, UserNetwork, tcp_nat

from .conftest import drain
from .peer import GUEST_IP, GW_IP, tcp_frame

SYN, ACK, RST = 0x02, 0x10, 0x04


def syn(port: int, sport: int = 40100) -> bytes:
    return tcp_frame(GUEST_IP, sport, GW_IP, port, 5000, 0, SYN, 0xFFFF, opts=struct.pack("!BBH", 2, 4, 1460))


def tcp_flags(frame: bytes) -> int:
    return frame[14 + 20 + 13] if len(frame) >= 54 and frame[12:14] == b"\x08\x00" and frame[23] == 6 else -1


async def test_syn_to_a_loopback_listener_is_answered_within_three_loop_turns() -> None:
    """A SYN-ACK reaches the guest's queue a couple of loop turns after the SYN (no resolver, no waits)."""
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    try:
        with socket.socket() as lsock:
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(8)
            net.send([memoryview(syn(lsock.getsockname()[1]))])
            turns = 0
            got: list[bytes] = []
            while not any(tcp_flags(f) == SYN | ACK for f in got) and turns < 50:
                await asyncio.sleep(0)
                turns += 1
                got += drain(net)
            assert any(tcp_flags(f) == SYN | ACK for f in got)
            assert turns <= 3, f"SYN-ACK took {turns} loop turns"
    finally:
        await net.stop()


async def test_connect_that_never_completes_times_out_into_rst(monkeypatch) -> None:
    """A listener whose accept queue is full drops SYNs; after CONNECT_TIMEOUT the guest gets a RST."""
    monkeypatch.setattr(tcp_nat, "CONNECT_TIMEOUT", 0.3)
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    lsock = socket.socket()
    fillers: list[socket.socket] = []
    try:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        port = lsock.getsockname()[1]
        for _ in range(3):  # fill the accept queue; further SYNs are dropped by the host kernel
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        await asyncio.sleep(0.05)
        net.send([memoryview(syn(port))])
        await asyncio.sleep(0.1)
        assert not [f for f in drain(net) if tcp_flags(f) >= 0], "nothing is sent while the connect is pending"
        assert net.tcp._pending, "the connect is in progress"
        await asyncio.sleep(0.5)
        flags = [tcp_flags(f) for f in drain(net)]
        assert RST | ACK in flags
        c = net.counters()
        assert c["tcp_refused"] == 1 and c["errors"] == 0
        assert not net.tcp._pending and net.tcp._connecting == 0 and not net.tcp.conns
    finally:
        for c in fillers:
            c.close()
        lsock.close()
        await net.stop()


async def test_stop_closes_connects_in_progress(monkeypatch) -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    lsock = socket.socket()
    fillers: list[socket.socket] = []
    try:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        port = lsock.getsockname()[1]
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        await asyncio.sleep(0.05)
        net.send([memoryview(syn(port))])
        assert net.tcp._pending
        socks = [s for s, _ in net.tcp._pending.values()]
        await net.stop()
        assert not net.tcp._pending and all(s.fileno() == -1 for s in socks)
    finally:
        for c in fillers:
            c.close()
        lsock.close()
