"""IPv6: neighbor discovery, router advertisement for SLAAC, echo, and UDP/TCP NAT over v6 to ::1."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import Ether

from appliance.nat import UserNetConfig, UserNetwork

from .conftest import GUEST_MAC, GW_MAC, drain, feed

GUEST6 = "fec0::5054:ff:fe12:3456"
LL6 = "fe80::5054:ff:fe12:3456"
ROUTER6 = "fec0::2"


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_v6 = pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback on this host")


async def frames_until(net: UserNetwork, pred, timeout: float = 5.0) -> Ether:
    async with asyncio.timeout(timeout):
        while True:
            for raw in drain(net):
                p = Ether(raw)
                if pred(p):
                    return p
            await asyncio.sleep(0.005)


async def test_router_solicitation_gets_an_advertisement_with_slaac_prefix_and_rdnss(net: UserNetwork) -> None:
    feed(
        net,
        bytes(Ether(src=GUEST_MAC, dst="33:33:00:00:00:02") / IPv6(src=LL6, dst="ff02::2", hlim=255) / ICMPv6ND_RS()),
    )
    [ra] = [Ether(f) for f in drain(net)]
    assert ICMPv6ND_RA in ra and ra[IPv6].src == "fe80::2" and ra[IPv6].hlim == 255
    assert ra[ICMPv6ND_RA].routerlifetime > 0
    pi = ra[ICMPv6NDOptPrefixInfo]
    assert pi.prefix == "fec0::" and pi.prefixlen == 64 and pi.A == 1 and pi.L == 1
    assert ra[ICMPv6NDOptRDNSS].dns == ["fec0::3"]
    assert ra[ICMPv6NDOptSrcLLAddr].lladdr == "52:56:00:00:00:02"  # fe80::2's, as libslirp's


async def test_router_advertisements_repeat_unsolicited_once_the_guest_speaks_ipv6(net: UserNetwork) -> None:
    # The router lifetime is 1800 s and Linux solicits only when its link comes up: without
    # advertisements of our own (RFC 4861 §6.2.4) a guest's IPv6 default route dies after 30 min.
    assert net.ipv6 is not None
    now = time.monotonic()
    net.ipv6.expire(now + 100_000)
    assert drain(net) == []  # a guest that never spoke IPv6 hears nothing
    rs = Ether(src=GUEST_MAC, dst="33:33:00:00:00:02") / IPv6(src=LL6, dst="ff02::2", hlim=255) / ICMPv6ND_RS()
    feed(net, bytes(rs))
    assert len(drain(net)) == 1  # the solicited one
    due = net.ipv6.next_ra
    assert due is not None and now + 198 <= due <= time.monotonic() + 600
    net.ipv6.expire(due - 1)
    assert drain(net) == []
    for _ in range(2):
        due = net.ipv6.next_ra
        assert due is not None
        net.ipv6.expire(due)
        [ra] = [Ether(f) for f in drain(net)]
        assert ra[Ether].dst == "33:33:00:00:00:01" and ra[IPv6].dst == "ff02::1" and ra[IPv6].hlim == 255
        assert ra[ICMPv6ND_RA].routerlifetime == 1800 and ra[ICMPv6NDOptPrefixInfo].prefix == "fec0::"
        assert net.ipv6.next_ra is not None and due + 198 <= net.ipv6.next_ra <= due + 600


async def test_neighbor_solicitation_for_router_is_answered(net: UserNetwork) -> None:
    ns = IPv6(src=LL6, dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(tgt=ROUTER6)
    feed(net, bytes(Ether(src=GUEST_MAC, dst="33:33:ff:00:00:02") / ns))
    [na] = [Ether(f) for f in drain(net)]
    assert na[ICMPv6ND_NA].tgt == ROUTER6 and na[ICMPv6ND_NA].R == 1 and na[ICMPv6ND_NA].S == 1
    assert na[Ether].dst == GUEST_MAC


async def test_neighbor_solicitation_with_forwarded_hop_limit_is_ignored(net: UserNetwork) -> None:
    ns = IPv6(src=LL6, dst="ff02::1:ff00:2", hlim=64) / ICMPv6ND_NS(tgt=ROUTER6)
    feed(net, bytes(Ether(src=GUEST_MAC, dst="33:33:ff:00:00:02") / ns))
    assert drain(net) == []


async def test_echo_to_router_is_answered(net: UserNetwork) -> None:
    req = IPv6(src=GUEST6, dst=ROUTER6) / ICMPv6EchoRequest(id=5, seq=6, data=b"v6 ping")
    feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / req))
    [rep] = [Ether(f) for f in drain(net)]
    assert rep[ICMPv6EchoReply].id == 5 and rep[ICMPv6EchoReply].data == b"v6 ping"
    chk = rep[ICMPv6EchoReply].cksum
    again = Ether(bytes(rep))
    del again[ICMPv6EchoReply].cksum
    assert Ether(bytes(again))[ICMPv6EchoReply].cksum == chk


@needs_v6
async def test_udp_over_ipv6_to_the_router_reaches_host_loopback(net: UserNetwork) -> None:
    srv = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    srv.bind(("::1", 0))
    srv.setblocking(False)
    port = srv.getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        feed(
            net,
            bytes(
                Ether(src=GUEST_MAC, dst=GW_MAC) / IPv6(src=GUEST6, dst=ROUTER6) / UDP(sport=7000, dport=port) / b"six"
            ),
        )
        data, peer = await asyncio.wait_for(loop.sock_recvfrom(srv, 100), 5)
        assert data == b"six"
        await loop.sock_sendto(srv, b"xis", peer)
        rep = await frames_until(net, lambda p: UDP in p)
        assert rep[IPv6].src == ROUTER6 and rep[IPv6].dst == GUEST6 and bytes(rep[UDP].payload) == b"xis"
        again = Ether(bytes(rep))
        del again[UDP].chksum
        assert Ether(bytes(again))[UDP].chksum == rep[UDP].chksum
    finally:
        srv.close()


@needs_v6
async def test_tcp_over_ipv6_handshake_and_data_both_ways(net: UserNetwork) -> None:
    got = asyncio.get_running_loop().create_future()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.set_result(await r.readexactly(5))
        w.write(b"world")
        await w.drain()

    srv = await asyncio.start_server(handler, "::1", 0)
    port = srv.sockets[0].getsockname()[1]
    base = Ether(src=GUEST_MAC, dst=GW_MAC) / IPv6(src=GUEST6, dst=ROUTER6)
    try:
        feed(net, bytes(base / TCP(sport=40000, dport=port, flags="S", seq=1000, options=[("MSS", 1440)])))
        synack = await frames_until(net, lambda p: TCP in p)
        assert synack[TCP].flags == "SA" and synack[TCP].ack == 1001
        assert dict(synack[TCP].options)["MSS"] == 1440
        srv_seq = synack[TCP].seq + 1
        feed(net, bytes(base / TCP(sport=40000, dport=port, flags="PA", seq=1001, ack=srv_seq) / b"hello"))
        assert await asyncio.wait_for(got, 5) == b"hello"
        data = await frames_until(net, lambda p: TCP in p and len(p[TCP].payload) > 0)
        assert bytes(data[TCP].payload) == b"world" and data[TCP].seq == srv_seq
        again = Ether(bytes(data))
        del again[TCP].chksum
        assert Ether(bytes(again))[TCP].chksum == data[TCP].chksum
    finally:
        srv.close()


async def test_ipv6_off_ignores_ipv6() -> None:
    net = UserNetwork(UserNetConfig.from_string("user,ipv6=off"))
    await net.start()
    try:
        req = IPv6(src=GUEST6, dst=ROUTER6) / ICMPv6EchoRequest()
        feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / req))
        assert drain(net) == []
    finally:
        await net.stop()
