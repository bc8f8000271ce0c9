"""The guest's handshake ACK goes without a kick, through virtio-net to the user-mode stack.

A connection the guest opens is connected on the host before our SYN-ACK leaves, so the
guest's ACK of it only completes the handshake here: the NIC lets it wait for the guest's
next frame (its data or FIN, which kicks). A host that speaks first (a greeting, or an
immediate close) needs that ACK before anything can go to the guest; the stack then has the
NIC take the ring at once instead of at the end of its wait (TX_QUIET_WAIT, set to 30 s here
so that only the prompt path can pass).

The guest is a fake virtio driver writing frames built with ``tests.nat.peer``; the hosts
are servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from appliance.nat import UserNetConfig, UserNetwork
from appliance.nic import constants as C
from appliance.nic import virtio_net
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.testing import WRITE, FakeDriver

from .peer import GUEST_IP, GUEST_MAC, GW_IP, tcp_frame

FIN, SYN, PSH, ACK = 0x01, 0x02, 0x08, 0x10
SPORT = 40404


class Rig:
    """A fake driver's NIC in front of a UserNetwork."""

    def __init__(self, net: UserNetwork) -> None:
        self.dev = VirtioNet([net], GUEST_MAC, control_queue=False)
        self.drv = FakeDriver(self.dev, queue_size=64, mem_size=8 << 20, event_idx=True)
        self.drv.activate()
        self.rx: dict[int, int] = {}
        for _ in range(32):
            addr = self.drv.alloc(2048)
            self.rx[self.drv.queues[0].add_chain([(addr, 2048, WRITE)])] = addr
        self.drv.kick(0)

    def send(self, frame: bytes) -> bool:
        """Post a frame on the transmit ring; kick only if the device asked (§2.7.10). Returns
        whether it kicked."""
        q = self.drv.queues[1]
        old = q.next_avail
        data = bytes(C.HDR_LEN) + frame
        addr = self.drv.alloc(len(data))
        self.drv.mem.write(addr, data)
        q.add_chain([(addr, len(data), 0)])
        new = q.next_avail
        kick = (new - q.avail_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        if kick:
            self.drv.kick(1)
        return kick

    def received(self) -> list[tuple[int, int, int, bytes]]:
        """(seq, ack, flags, payload) of each TCP segment the guest got since the last call."""
        out = []
        for head, n in self.drv.queues[0].used():
            frame = bytes(self.drv.mem.read(self.rx[head], n))[C.HDR_LEN :]
            if frame[12:14] != b"\x08\x00" or frame[23] != 6:
                continue
            ihl = (frame[14] & 15) * 4
            total = struct.unpack_from("!H", frame, 16)[0]
            seq, ack, off = struct.unpack_from("!IIH", frame, 14 + ihl + 4)
            out.append((seq, ack, off & 0x3F, frame[14 + ihl + (off >> 12) * 4 : 14 + total]))
        return out


@pytest.fixture(autouse=True)
def _long_quiet_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(virtio_net, "TX_QUIET_WAIT", 30.0)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    r = Rig(net)
    yield r
    r.dev.reset()
    await net.stop()


async def segments_until(
    rig: Rig, done: Callable[[list[tuple[int, int, int, bytes]]], bool], timeout: float = 5.0
) -> list[tuple[int, int, int, bytes]]:
    got: list[tuple[int, int, int, bytes]] = []
    async with asyncio.timeout(timeout):
        while not done(got := got + rig.received()):
            await asyncio.sleep(0.002)
    return got


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def server(handler: Handler) -> tuple[asyncio.Server, int]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def handshake(rig: Rig, port: int) -> int:
    """The guest's SYN (kicked) until our SYN-ACK is in; returns our ISS."""
    assert rig.send(tcp_frame(GUEST_IP, SPORT, GW_IP, port, 1000, 0, SYN, 64240, opts=b"\x02\x04\x05\xb4"))
    got = await segments_until(rig, lambda s: any(f & SYN for _, _, f, _ in s))
    seq, ack, flags, _ = got[-1]
    assert flags == SYN | ACK and ack == 1001
    return seq


async def test_handshake_ack_goes_without_a_kick_and_the_fin_after_it_kicks(rig: Rig) -> None:
    got_eof = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        got_eof.set()
        w.close()

    srv, port = await server(handler)
    iss = await handshake(rig, port)
    assert not rig.send(tcp_frame(GUEST_IP, SPORT, GW_IP, port, 1001, iss + 1, ACK, 502))
    assert rig.send(tcp_frame(GUEST_IP, SPORT, GW_IP, port, 1001, iss + 1, FIN | ACK, 502))
    # Both reached the stack in that kick's pass: the host read EOF, and our FIN came back
    # acknowledging the guest's.
    await asyncio.wait_for(got_eof.wait(), 5)
    got = await segments_until(rig, lambda s: any(f & FIN for _, _, f, _ in s))
    assert [(a, f) for _, a, f, _ in got if f & FIN] == [(1002, FIN | ACK)]
    srv.close()


async def test_a_host_greeting_reaches_the_guest_though_its_ack_was_not_kicked(rig: Rig) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 smtp.test ESMTP\r\n")
        await w.drain()
        await r.read()
        w.close()

    srv, port = await server(handler)
    iss = await handshake(rig, port)
    assert not rig.send(tcp_frame(GUEST_IP, SPORT, GW_IP, port, 1001, iss + 1, ACK, 502))
    # The greeting can only go once the ACK is taken: well within the 30 s quiet wait.
    got = await segments_until(rig, lambda s: any(p for *_, p in s))
    assert b"".join(p for *_, p in got) == b"220 smtp.test ESMTP\r\n"
    srv.close()


async def test_a_host_that_closes_at_once_has_its_fin_reach_the_guest(rig: Rig) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    srv, port = await server(handler)
    iss = await handshake(rig, port)
    assert not rig.send(tcp_frame(GUEST_IP, SPORT, GW_IP, port, 1001, iss + 1, ACK, 502))
    got = await segments_until(rig, lambda s: any(f & FIN for _, _, f, _ in s))
    assert [(s, f) for s, _, f, _ in got if f & FIN] == [(iss + 1, FIN | ACK)]
    srv.close()
