"""The MACs of the stack's emulated addresses are libslirp's, so what a guest learns (``ip neigh``)
or sets by hand (``arp -s``) matches QEMU's ``-netdev user``:

- ARP for an IPv4 address of ours answers with 52:55 and that address (10.0.2.3 is
  52:55:0a:00:02:03), following ``net=``/``host=``/``dns=``;
- every IPv4 frame comes from the host address's MAC, whichever address sent it;
- IPv6 neighbours and frames use 52:56 and the address's last four bytes (fe80::2 is
  52:56:00:00:00:02), the router advertisement's source link-layer option included;
- a frame sent to any of these MACs is taken, and one from them is not the guest's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import ARP, Ether

from appliance.nat import UserNetConfig, UserNetwork
from tests.nat.conftest import GUEST_MAC, drain, feed

GUEST_LL = "fe80::5054:ff:fe12:3456"


def _arp(net: UserNetwork, target: str, guest_ip: str = "10.0.2.15") -> list[Ether]:
    feed(net, bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
                    / ARP(op=1, hwsrc=GUEST_MAC, psrc=guest_ip, pdst=target)))
    return [Ether(f) for f in drain(net)]


@pytest.fixture
async def net3() -> AsyncIterator[UserNetwork]:
    """A stack on net=10.0.3.0/24 (host 10.0.3.2, DNS 10.0.3.3)."""
    n = UserNetwork(UserNetConfig.from_string("user,net=10.0.3.0/24"))
    await n.start()
    yield n
    await n.stop()


@pytest.mark.parametrize(("target", "mac"), [("10.0.2.2", "52:55:0a:00:02:02"), ("10.0.2.3", "52:55:0a:00:02:03")])
async def test_arp_answers_each_address_with_its_own_mac(net: UserNetwork, target: str, mac: str) -> None:
    (reply,) = _arp(net, target)
    assert reply[ARP].op == 2 and reply[ARP].psrc == target
    assert reply[ARP].hwsrc == reply[Ether].src == mac
    assert reply[Ether].dst == reply[ARP].hwdst == GUEST_MAC


async def test_macs_follow_net(net3: UserNetwork) -> None:
    (gw,) = _arp(net3, "10.0.3.2", "10.0.3.15")
    (dns,) = _arp(net3, "10.0.3.3", "10.0.3.15")
    assert gw[ARP].hwsrc == "52:55:0a:00:03:02" and dns[ARP].hwsrc == "52:55:0a:00:03:03"
    feed(net3, bytes(Ether(src=GUEST_MAC, dst="52:55:0a:00:03:02")
                     / IP(src="10.0.3.15", dst="10.0.3.2") / ICMP(id=5, seq=1) / b"ping"))
    (pong,) = [Ether(f) for f in drain(net3)]
    assert pong[Ether].src == "52:55:0a:00:03:02" and pong[ICMP].type == 0


async def test_frames_to_the_dns_address_mac_are_taken(net: UserNetwork) -> None:
    """As after ``arp -s 10.0.2.3 52:55:0a:00:02:03`` in the guest: the query to the DNS address's
    own MAC is answered (here from the stack's own names); the answer comes from the host
    address's MAC, as libslirp sends every IPv4 frame."""
    _arp(net, "10.0.2.2")  # the guest's address learnt
    feed(net, bytes(Ether(src=GUEST_MAC, dst="52:55:0a:00:02:03") / IP(src="10.0.2.15", dst="10.0.2.3")
                    / UDP(sport=40000, dport=53) / DNS(rd=1, qd=DNSQR(qname="localhost"))))
    (answer,) = [Ether(f) for f in drain(net)]
    assert answer[IP].src == "10.0.2.3" and answer[DNS].qr == 1
    assert answer[Ether].src == "52:55:0a:00:02:02"


async def test_a_frame_to_another_mac_is_not_taken(net: UserNetwork) -> None:
    _arp(net, "10.0.2.2")
    before = net.stats.not_for_us
    feed(net, bytes(Ether(src=GUEST_MAC, dst="52:54:00:aa:bb:cc")
                    / IP(src="10.0.2.15", dst="10.0.2.2") / ICMP(id=5, seq=1)))
    assert drain(net) == [] and net.stats.not_for_us == before + 1


async def test_a_frame_from_one_of_our_macs_is_not_the_guests(net: UserNetwork) -> None:
    before = net.stats.not_for_us
    feed(net, bytes(Ether(src="52:55:0a:00:02:03", dst="ff:ff:ff:ff:ff:ff")
                    / ARP(op=1, hwsrc="52:55:0a:00:02:03", psrc="10.0.2.15", pdst="10.0.2.2")))
    assert drain(net) == [] and net.stats.not_for_us == before + 1


async def test_ipv6_router_and_neighbours_use_52_56_macs(net: UserNetwork) -> None:
    feed(net, bytes(Ether(src=GUEST_MAC, dst="33:33:00:00:00:02") / IPv6(src=GUEST_LL, dst="ff02::2", hlim=255)
                    / ICMPv6ND_RS() / ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC)))
    (ra,) = [Ether(f) for f in drain(net)]
    assert ICMPv6ND_RA in ra and ra[IPv6].src == "fe80::2"
    assert ra[Ether].src == ra[ICMPv6NDOptSrcLLAddr].lladdr == "52:56:00:00:00:02"
    for target, mac in (("fec0::2", "52:56:00:00:00:02"), ("fec0::3", "52:56:00:00:00:03")):
        feed(net, bytes(Ether(src=GUEST_MAC, dst="33:33:ff:00:00:02") / IPv6(src="fec0::15", dst="ff02::1:ff00:2",
                                                                            hlim=255)
                        / ICMPv6ND_NS(tgt=target) / ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC)))
        (na,) = [Ether(f) for f in drain(net)]
        assert ICMPv6ND_NA in na and na[ICMPv6ND_NA].tgt == target
        assert na[ICMPv6NDOptDstLLAddr].lladdr == mac and na[Ether].src == mac
    feed(net, bytes(Ether(src=GUEST_MAC, dst="52:56:00:00:00:03") / IPv6(src="fec0::15", dst="fec0::3")
                    / ICMPv6EchoRequest(id=9, seq=1, data=b"six")))
    (reply,) = [Ether(f) for f in drain(net)]
    assert ICMPv6EchoReply in reply and reply[IPv6].src == "fec0::3"
    assert reply[Ether].src == "52:56:00:00:00:03"
