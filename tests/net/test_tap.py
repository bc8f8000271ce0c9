"""Tap queues move frames between our readv/writev and the kernel, inside a namespace."""

from __future__ import annotations

import asyncio

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

from appliance.net.tap import Tap, link_exists
from appliance.net.tun import VNET_HDR_LEN
from tests.conftest import needs_root
from tests.net.netns import inside, namespace, ns_exec

pytestmark = needs_root

GUEST_MAC = "52:54:00:12:34:56"


async def recv_frame(q, hdr: int, timeout: float = 3.0) -> bytes:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    buf = bytearray(65536 + hdr)
    while loop.time() < deadline:
        n = q.recv_into([memoryview(buf)])
        if n > 0:
            return bytes(buf[hdr:n])
        await asyncio.sleep(0.01)
    raise TimeoutError("no frame from the tap")


async def answer(q, hdr: int, want) -> Ether:
    """Read frames until one has layer ``want`` (the kernel also sends IPv6 noise)."""
    for _ in range(50):
        pkt = Ether(await recv_frame(q, hdr))
        if want in pkt:
            return pkt
    raise AssertionError("expected frame not seen")


@pytest.mark.parametrize("vnet_hdr", [True, False])
async def test_kernel_answers_arp_and_ping_through_the_tap(vnet_hdr: bool) -> None:
    with namespace() as ns:
        with inside(ns):
            tap = Tap("aptap0", vnet_hdr=vnet_hdr)
            (q,) = await tap.open()
        ns_exec(ns, "ip", "addr", "add", "10.77.0.1/24", "dev", "aptap0")
        hdr = VNET_HDR_LEN if vnet_hdr else 0
        pre = bytes(hdr)
        try:
            arp = Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
                op=1, hwsrc=GUEST_MAC, psrc="10.77.0.2", pdst="10.77.0.1"
            )
            assert q.send([memoryview(pre + bytes(arp))])
            reply = await answer(q, hdr, ARP)
            assert reply[ARP].op == 2 and reply[ARP].psrc == "10.77.0.1"
            host_mac = reply[ARP].hwsrc

            ip = IP(src="10.77.0.2", dst="10.77.0.1")
            ping = Ether(src=GUEST_MAC, dst=host_mac) / ip / ICMP(id=7, seq=1) / (b"x" * 100)
            assert q.send([memoryview(pre), memoryview(bytes(ping))])  # header and frame in two buffers
            echo = await answer(q, hdr, ICMP)
            assert echo[ICMP].type == 0 and echo[ICMP].id == 7 and bytes(echo[ICMP].payload) == b"x" * 100
            assert q.tx_frames == 2 and q.rx_frames >= 2
        finally:
            with inside(ns):
                await tap.close()
                assert not link_exists("aptap0")


async def test_multiqueue_tap_has_one_fd_per_queue_and_is_removed_on_close() -> None:
    with namespace() as ns:
        with inside(ns):
            tap = Tap(None, queues=4)
            qs = await tap.open()
            assert len({q.fd for q in qs}) == 4
            assert tap.owned and link_exists(tap.name)
            out = ns_exec(ns, "ip", "-d", "link", "show", tap.name)
            assert "multi_queue" in out
            await tap.close()
            assert not link_exists(tap.name)
            assert all(q.fd == -1 for q in qs)


async def test_adopted_tap_is_left_in_place() -> None:
    with namespace() as ns:
        ns_exec(ns, "ip", "tuntap", "add", "dev", "keepme", "mode", "tap")
        with inside(ns):
            tap = Tap("keepme", vnet_hdr=False)
            await tap.open()
            assert not tap.owned
            await tap.close()
            assert link_exists("keepme")


async def test_tap_enslaved_to_bridge() -> None:
    with namespace() as ns:
        ns_exec(ns, "ip", "link", "add", "br9", "type", "bridge")
        with inside(ns):
            tap = Tap("aptap1", bridge="br9")
            await tap.open()
            try:
                out = ns_exec(ns, "ip", "link", "show", "aptap1")
                assert "master br9" in out and "UP" in out
            finally:
                await tap.close()


async def test_tap_to_missing_bridge_is_a_clear_error() -> None:
    from appliance.net.errors import TapError

    with namespace() as ns:
        with inside(ns):
            tap = Tap("aptap2", bridge="nosuchbr")
            with pytest.raises(TapError, match="bridge 'nosuchbr' does not exist"):
                await tap.open()
            assert not link_exists("aptap2")
