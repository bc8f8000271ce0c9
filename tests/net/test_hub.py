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


async def test_a_back_end_beside_only_an_empty_port_is_read_and_its_frames_lost() -> None:
    """QEMU's qemu_can_send_packet is true for a port without a peer: the back end is read on
    (its remote end is not held back), and what it sends is lost there."""
    hub = Hub(1)
    port = hub.add_port()
    loose = hub.add_port()
    with udp_peer() as (peer, link):
        port.connect_backend(link)
        for n in range(10):
            peer.send(frame(n))
        await settle(lambda: loose.dropped == 10)
        assert loose.dropped == 10
        port.disconnect()


class Echo:
    """A back end that answers inside ``send``, as the user network answers a loopback connect
    that completes at once: its answer is ready before ``send`` returns."""

    vnet_hdr_len = 0

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.got: list[bytes] = []
        self.ready: object = None
        self.sending = False

    def set_ready_callback(self, ready: object) -> None:
        self.ready = ready

    def recv_into(self, bufs: list[memoryview]) -> int:
        if not self.out:
            return -1
        data = self.out.pop(0)
        off = 0
        for b in bufs:
            take = min(len(b), len(data) - off)
            b[:take] = data[off : off + take]
            off += take
        return len(data)

    def send(self, bufs: list[memoryview]) -> bool:
        assert not self.sending, "send entered again from inside itself"
        self.sending = True
        data = b"".join(bytes(b) for b in bufs)
        self.got.append(data)
        if data.startswith(b"request"):  # answers requests only, or two of them would chatter
            self.out.append(b"reply:" + data)
            assert callable(self.ready)
            self.ready()
        self.sending = False
        return True

    def set_offloads(self, *args: bool) -> None:
        return

    def close(self) -> None:
        return


async def test_an_answer_given_inside_send_goes_out_after_the_frame_it_answers() -> None:
    """The hub holds what a port hands in while it is still handing a frame out (QEMU's net
    queue does the same while delivering): every port sees the request before the answer, and
    two back ends that answer at once do not enter each other's send."""
    hub = Hub(0)
    nic = hub.add_port().connect_nic()
    first, second = Echo(), Echo()
    hub.add_port().connect_backend(first)  # type: ignore[arg-type]
    hub.add_port().connect_backend(second)  # type: ignore[arg-type]
    watcher = hub.add_port().connect_nic()
    nic.send([memoryview(b"request---")])
    assert take_all(watcher) == [b"request---", b"reply:request---", b"reply:request---"]
    # Each back end had the request, then the other's answer: never an answer first.
    assert first.got == second.got == [b"request---", b"reply:request---"]


async def test_a_back_end_with_virtio_net_headers_is_seen_without_them() -> None:
    """A tap fd opened with IFF_VNET_HDR by someone else (libvirt's way): the hub strips the
    header from what it reads and puts a zero one before what it sends."""
    hub = Hub(0)
    nic = hub.add_port().connect_nic()

    class Headed(Echo):
        vnet_hdr_len = 12

        def send(self, bufs: list[memoryview]) -> bool:
            self.out.append(b"".join(bytes(b) for b in bufs))
            return True

    tap = Headed()
    hub.add_port().connect_backend(tap)  # type: ignore[arg-type]
    nic.send([memoryview(frame(1))])
    assert tap.out == [bytes(12) + frame(1)]
    tap.out = [b"\x01" * 12 + frame(2)]
    assert callable(tap.ready)
    tap.ready()
    assert take_all(nic) == [frame(2)]


async def test_link_down_on_a_back_end_stops_frames_both_ways() -> None:
    hub = Hub(0)
    nic = hub.add_port().connect_nic()
    port = hub.add_port()
    with udp_peer() as (peer, link):
        port.connect_backend(link)
        port.backend_link_up = False
        nic.send([memoryview(frame(1))])
        peer.send(frame(2))
        await settle(rounds=20)
        assert take(nic) is None
        peer.settimeout(0.2)
        with pytest.raises(TimeoutError):
            peer.recv(2048)
        port.backend_link_up = True
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


async def test_a_port_takes_one_peer() -> None:
    hub = Hub(0)
    port = hub.add_port()
    port.connect_nic()
    with pytest.raises(HubError, match="already in use"):
        port.connect_nic()


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
