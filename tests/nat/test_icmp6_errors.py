"""ICMPv6 errors quote as much of the invoking packet as fits in 1280 bytes (RFC 4443 §2.4(c))."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPerror6, IPv6
from scapy.layers.l2 import Ether

from appliance.nat import UserNetwork
from appliance.nat.icmp import QUOTE_V6, V6_NO_ROUTE, dest_unreachable_v6

from .conftest import GUEST_MAC, GW_MAC, drain, feed
from .test_ipv6 import needs_v6

GUEST6 = "fec0::15"
G = socket.inet_pton(socket.AF_INET6, GUEST6)
R = socket.inet_pton(socket.AF_INET6, "2001:db8::7")


def test_the_quote_fills_the_minimum_mtu_and_no_more() -> None:
    l4 = os.urandom(3000)
    msg = dest_unreachable_v6(V6_NO_ROUTE, G, R, 17, l4, 3000)
    assert 40 + len(msg) == 1280  # with our IPv6 header: the IPv6 minimum MTU exactly
    assert msg[8 + 40 :] == l4[:QUOTE_V6]
    assert struct.unpack_from("!H", msg, 8 + 4)[0] == 3000  # the quoted header keeps the real length


def test_a_short_packet_is_quoted_whole() -> None:
    l4 = struct.pack("!HHHH", 1000, 53, 8 + 5, 0) + b"hello"
    msg = dest_unreachable_v6(V6_NO_ROUTE, G, R, 17, l4, len(l4))
    assert msg[8 + 40 :] == l4


async def port_unreachable_for(net: UserNetwork, data: bytes) -> Ether:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    # Two datagrams: the host hears "refused" for the first, and the error quotes that one.
    for _ in range(2):
        feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IPv6(src=GUEST6, dst="fec0::2")
                        / UDP(sport=3457, dport=port) / data))  # fmt: skip
    async with asyncio.timeout(5):
        while True:
            for raw in drain(net):
                p = Ether(raw)
                if ICMPv6DestUnreach in p:
                    return p
            await asyncio.sleep(0.005)


@needs_v6
@pytest.mark.parametrize("size", [8, 1100, 1184, 1185, 1400])
async def test_port_unreachable_quotes_the_datagram_up_to_1280_bytes(net: UserNetwork, size: int) -> None:
    data = os.urandom(size)
    err = await port_unreachable_for(net, data)
    raw = bytes(err)
    assert len(raw) - 14 == min(1280, 40 + 8 + 40 + 8 + size)
    quoted = raw[14 + 40 + 8 + 40 :]  # scapy cuts a quoted packet short of what its header says
    assert struct.unpack_from("!HH", quoted) == (3457, err[IPerror6].payload.dport)
    assert quoted[8:] == data[: QUOTE_V6 - 8]
    assert err[IPerror6].plen == 8 + size
    again = Ether(raw)
    del again[ICMPv6DestUnreach].cksum
    assert Ether(bytes(again))[ICMPv6DestUnreach].cksum == err[ICMPv6DestUnreach].cksum


@needs_v6
async def test_a_refusal_heard_on_the_next_send_quotes_the_datagram_it_was_about(net: UserNetwork) -> None:
    # The host hears "port unreachable" for the first datagram and says so when the second is
    # sent (which is then dropped): the error quotes the first, its length and bytes, not the second.
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    first, second = b"\x01" * 100, b"\x02" * 300
    for data in (first, second):
        feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IPv6(src=GUEST6, dst="fec0::2")
                        / UDP(sport=3458, dport=port) / data))  # fmt: skip
        if data is first:
            # Until the host has heard (an error pending on the flow's socket, not yet read),
            # without a loop turn: the second send is then the one that reports it.
            [flow] = net.udp._flows.values()
            waiter = select.poll()
            waiter.register(flow.sock.fileno(), 0)
            assert waiter.poll(5000), "the host never heard the refusal"
    async with asyncio.timeout(5):
        errors: list[Ether] = []
        while not errors:
            errors = [p for p in map(Ether, drain(net)) if ICMPv6DestUnreach in p]
            await asyncio.sleep(0.005)
    [err] = errors
    raw = bytes(err)
    assert err[IPerror6].plen == 8 + len(first)
    assert raw[14 + 40 + 8 + 40 + 8 :] == first
