"""QEMU's hubs (appliance.net.hub): every frame a port hands in goes out of every other port.

Real UDP links on loopback stand in for host back ends; the NICs' side is driven through the
FrameBackend interface the virtio-net device uses.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from scapy.layers.l2 import Ether

from appliance.net.dgram import DgramLink
from appliance.net.hub import NIC_QUEUE, NIC_QUEUE_BYTES, Hub, HubError, NicSide

SRC = "52:54:00:12:34:56"


def frame(n: int, dst: str = "ff:ff:ff:ff:ff:ff") -> bytes:
    return bytes(Ether(src=SRC, dst=dst, type=0x88B5) / n.to_bytes(4, "big")) + bytes(42)


def take(side: NicSide) -> bytes | None:
    buf = bytearray(2048)
    n = side.recv_into([memoryview(buf)])
    return None if n < 0 else bytes(buf[:n])


def take_all(side: NicSide) -> list[bytes]:
    out = []
    while (f := take(side)) is not None:
        out.append(f)
    return out


@contextmanager
def udp_peer() -> Iterator[tuple[socket.socket, DgramLink]]:
    """A test socket and a DgramLink wired to it over loopback."""
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    link = DgramLink(("127.0.0.1", port), peer.getsockname())
    peer.connect(("127.0.0.1", port))
    try:
        yield peer, link
    finally:
        link.close()
        peer.close()


async def settle(until: object = None, rounds: int = 200) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0.005)
        if callable(until) and until():
            return


async def test_a_frame_goes_out_of_every_port_but_the_one_it_came_in_by() -> None:
    hub = Hub(0)
    a, b, c = hub.add_port(), hub.add_port(), hub.add_port()
    assert [p.name for p in hub.ports] == ["hub0port0", "hub0port1", "hub0port2"]
    nic_a, nic_b = a.connect_nic(), b.connect_nic()
    with udp_peer() as (peer, link):
        c.connect_backend(link)
        assert nic_a.send([memoryview(frame(1))])
        assert take(nic_b) == frame(1)
        assert take(nic_a) is None  # not back to its sender
        assert peer.recv(2048) == frame(1)
        # From the host side: both NICs get it.
        peer.send(frame(2))
        await settle(lambda: nic_a.queued() and nic_b.queued())
        assert take_all(nic_a) == [frame(2)] and take_all(nic_b) == [frame(2)]
        c.disconnect()


async def test_a_nic_is_woken_from_the_loop_not_from_inside_the_senders_pass() -> None:
    hub = Hub(1)
    a, b = hub.add_port("p0"), hub.add_port("p1")
    nic_a, nic_b = a.connect_nic(), b.connect_nic()
    woken: list[int] = []
    nic_b.set_ready_callback(lambda: woken.append(nic_b.queued()))
    for n in range(3):
        nic_a.send([memoryview(frame(n))])
    assert woken == []  # nothing ran inside the sends
    await settle(lambda: woken)
    assert woken == [3]  # one wake-up for the burst
    assert take_all(nic_b) == [frame(0), frame(1), frame(2)]
    # A NIC that posts buffers again is woken at once for what waits.
    nic_b.set_ready_callback(None)
    nic_a.send([memoryview(frame(9))])
    await settle(rounds=4)
    assert woken == [3]
    nic_b.set_ready_callback(lambda: woken.append(nic_b.queued()))
    await settle(lambda: len(woken) == 2)
    assert woken == [3, 1]


async def test_a_slow_nic_alone_on_the_hub_pauses_its_back_end_and_loses_nothing() -> None:
    """QEMU's net_hub_port_can_receive: with no other port able to take a frame, the back end is
    not read; its frames wait in the host socket and come through once the NIC reads."""
    hub = Hub(0)
    nic = hub.add_port().connect_nic()
    port = hub.add_port()
    sent = NIC_QUEUE + 40
    with udp_peer() as (peer, link):
        port.connect_backend(link)
        for n in range(NIC_QUEUE):
            peer.send(frame(n))
        await settle(lambda: nic.queued() >= NIC_QUEUE)
        # These wait in the socket (which holds about as many as the NIC's queue).
        for n in range(NIC_QUEUE, sent):
            peer.send(frame(n))
        await settle(rounds=10)
        assert nic.queued() == NIC_QUEUE and hub.ports[0].dropped == 0
        got = take_all(nic)
        await settle(lambda: nic.queued() >= sent - NIC_QUEUE)
        got += take_all(nic)
        assert got == [frame(n) for n in range(sent)]
        port.disconnect()


async def test_a_full_nic_beside_one_that_reads_drops_and_counts() -> None:
    hub = Hub(0)
    full, reader = hub.add_port(), hub.add_port()
    nic_full, nic_reader = full.connect_nic(), reader.connect_nic()
    source = hub.add_port().connect_nic()
    for n in range(NIC_QUEUE + 10):
        source.send([memoryview(frame(n))])
        assert take(nic_reader) == frame(n)
    assert nic_full.queued() == NIC_QUEUE and full.dropped == 10
    assert take(nic_full) == frame(0)


async def test_a_port_without_a_peer_loses_what_it_is_sent() -> None:
    hub = Hub(2)
    loose = hub.add_port("h0")
    nic = hub.add_port("h1").connect_nic()
    nic.send([memoryview(frame(1))])
    assert loose.dropped == 1
    assert not loose.has_room()


async def test_link_down_on_a_back_end_stops_frames_both_ways() -> None:
    hub = Hub(0)
    nic = hub.add_port().connect_nic()
    port = hub.add_port()
    with udp_peer() as (peer, link):
        side = port.connect_backend(link)
        side.link_up = False
        nic.send([memoryview(frame(1))])
        peer.send(frame(2))
        await settle(rounds=20)
        assert take(nic) is None
        peer.settimeout(0.2)
        with pytest.raises(TimeoutError):
            peer.recv(2048)
        side.link_up = True
        port.link_up = False  # the port's own link cuts it as well
        nic.send([memoryview(frame(4))])
        peer.send(frame(5))
        await settle(rounds=20)
        assert take(nic) is None
        with pytest.raises(TimeoutError):
            peer.recv(2048)
        port.link_up = True
        peer.send(frame(3))
        await settle(lambda: nic.queued())
        assert take_all(nic) == [frame(3)]
        port.disconnect()


async def test_a_port_takes_one_peer_and_no_virtio_net_headers() -> None:
    hub = Hub(0)
    port = hub.add_port()
    port.connect_nic()
    with pytest.raises(HubError, match="already in use"):
        port.connect_nic()

    class WithHeaders:
        vnet_hdr_len = 12

    with pytest.raises(HubError, match="virtio-net headers"):
        hub.add_port().connect_backend(WithHeaders())  # type: ignore[arg-type]


async def test_a_nic_that_reads_nothing_holds_at_most_its_byte_bound_of_big_frames() -> None:
    """A guest sending 64 KiB frames to a NIC that posts no buffers: the port keeps
    NIC_QUEUE_BYTES' worth and drops the rest, whatever the frame count."""
    hub = Hub(0)
    sink = hub.add_port()
    stuck = sink.connect_nic()
    source = hub.add_port().connect_nic()
    big = bytes(65000)
    for _ in range(NIC_QUEUE):
        source.send([memoryview(big)])
    held = stuck.queued()
    assert held * len(big) <= NIC_QUEUE_BYTES + len(big) and held < NIC_QUEUE
    assert sink.dropped == NIC_QUEUE - held
