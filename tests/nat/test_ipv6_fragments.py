"""IPv6 packets to the guest larger than its MTU leave in fragments (RFC 8200 §4.5).

Only a packet's source may fragment in IPv6, so a big UDP answer from the
host (an EDNS0 DNS reply, say) must be split by the stack, or the guest's
driver drops it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, defragment6
from scapy.layers.l2 import Ether

from appliance.nat import UserNetConfig, UserNetwork

from .conftest import GUEST_MAC, GW_MAC, feed
from .test_ipv6 import GUEST6, ROUTER6, needs_v6
from .test_services import collect


@needs_v6
async def test_a_udp_answer_larger_than_the_mtu_arrives_in_fragments_that_reassemble(net: UserNetwork) -> None:
    srv = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    srv.bind(("::1", 0))
    srv.setblocking(False)
    port = srv.getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IPv6(src=GUEST6, dst=ROUTER6) / UDP(sport=7001, dport=port)
                        / b"big?"))  # fmt: skip
        _, peer = await asyncio.wait_for(loop.sock_recvfrom(srv, 100), 5)
        answers = [os.urandom(4000), os.urandom(1000)]
        for data in answers:
            await loop.sock_sendto(srv, data, peer)
        got = await collect(net, lambda fs: sum(1 for f in fs if IPv6 in f) >= 4)
        pieces = [f for f in got if IPv6ExtHdrFragment in f]
        assert len(pieces) == 3  # 4000 bytes + 8 of UDP header over a 1500-byte link
        assert all(len(f) - 14 <= 1500 for f in got)
        assert len({f[IPv6ExtHdrFragment].id for f in pieces}) == 1
        order = sorted(pieces, key=lambda f: f[IPv6ExtHdrFragment].offset)
        assert [f[IPv6ExtHdrFragment].offset * 8 for f in order] == [0, 1448, 2896]  # 8-byte units
        assert [f[IPv6ExtHdrFragment].m for f in order] == [1, 1, 0]
        [whole] = defragment6([IPv6(bytes(f[IPv6])) for f in pieces])  # it edits what it is given
        whole = IPv6(bytes(whole))
        assert whole.src == ROUTER6 and whole.dst == GUEST6
        assert bytes(whole[UDP].payload) == answers[0]
        again = IPv6(bytes(whole))
        del again[UDP].chksum
        assert IPv6(bytes(again))[UDP].chksum == whole[UDP].chksum
        [small] = [f for f in got if IPv6ExtHdrFragment not in f and UDP in f]
        assert bytes(small[UDP].payload) == answers[1]  # one that fits goes whole
    finally:
        srv.close()


@pytest.mark.parametrize("dst", [GUEST6, "10.0.2.15"])
async def test_a_packet_in_fragments_is_queued_whole_or_not_at_all_on_a_jumbo_link(dst: str) -> None:
    # With host_mtu=9000 each fragment is ~9 KB, more than the 1514-byte frames tx_space()
    # counts in: near the byte limit the first fragments were queued and the rest dropped,
    # which the guest holds for its reassembly timeout and then throws away.
    net = UserNetwork(UserNetConfig(nameservers=()), queue_bytes=100_000)
    net.set_mtu(9000)
    addr = ipaddress.ip_address(dst).packed
    net.learn_neighbor(addr, bytes.fromhex(GUEST_MAC.replace(":", "")))
    assert net.output(bytearray(85_000))  # the guest is behind: 15 000 bytes of room left
    assert net.tx_space() >= 4
    src = ipaddress.ip_address(ROUTER6 if len(addr) == 16 else "10.0.2.2").packed
    net.emit_udp(addr, 7001, src, 53, os.urandom(30_000))  # four ~9 KB fragments
    queued = net.queued() - 1
    assert queued in (0, 4), f"{queued} of 4 fragments queued"
    net.close()
