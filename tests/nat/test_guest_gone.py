"""UserNetwork.guest_gone: a front end went away (net-daemon), and the next guest finds the stack
as a new one would be, with the forwarding listeners still there.

Each test leaves some per-guest state behind the way a guest would (a DNS query, a TFTP
transfer, a learned address, a closing connection), calls guest_gone(), and checks that
nothing of it is left or listed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6ND_RS, IPv6
from scapy.layers.l2 import ARP, Ether

from appliance.nat import UserNetConfig, UserNetwork

from .conftest import GUEST_MAC, GW_MAC, drain, feed, full_listener
from .peer import GW_IP, Guest
from .test_dhcp import dhcp_frame
from .test_long_run import GUEST_ISS, MSS_OPT, SYN, Wire

OTHER_MAC = "52:54:00:ab:cd:ef"  # the next guest's NIC
GUEST = "10.0.2.15"


def _dns_query(name: str, sport: int = 5353, mac: str = GUEST_MAC) -> bytes:
    return bytes(Ether(src=mac, dst=GW_MAC) / IP(src=GUEST, dst="10.0.2.3") / UDP(sport=sport, dport=53)
                 / DNS(id=7, rd=1, qd=DNSQR(qname=name)))  # fmt: skip


def _guest_rows(net: UserNetwork) -> list[object]:
    return [f for f in net.flows() if f.guest_started]


@pytest.fixture
async def silent_upstream() -> AsyncIterator[tuple[str, int]]:
    """A resolver that reads queries and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()
    sock.close()


async def test_guest_gone_forgets_the_guests_dns_queries_and_rows(silent_upstream: tuple[str, int]) -> None:
    """The guest asked the DNS address twice: one query still waits for the upstream, and its port
    is listed as a UDP flow in ``info usernet``. After guest_gone neither is left: the answer (or
    the SERVFAIL at its timeout) would go to whatever guest has 10.0.2.15 next, and the row is a
    flow of the gone guest, as the UDP flows closed beside it."""
    net = UserNetwork(UserNetConfig(nameservers=(silent_upstream,)))
    await net.start()
    try:
        feed(net, _dns_query("example.test"))
        drain(net)
        assert net.dns.pending() == 1
        assert _guest_rows(net)
        net.guest_gone()
        assert net.dns.pending() == 0
        assert _guest_rows(net) == []
        # The proxy still works for the next guest.
        feed(net, _dns_query("example.org", sport=5354, mac=OTHER_MAC))
        assert net.dns.pending() == 1
    finally:
        await net.stop()


async def test_guest_gone_ends_the_guests_tftp_transfers(tmp_path: Path) -> None:
    """A transfer in progress holds its file open and resends its block to the gone guest until
    the session times out; guest_gone ends it at once, and TFTP still serves the next guest."""
    (tmp_path / "big").write_bytes(bytes(4096))
    net = UserNetwork(UserNetConfig.from_string(f"user,tftp={tmp_path}"))
    await net.start()
    rrq = b"\0\1big\0octet\0"
    try:
        feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src=GUEST, dst="10.0.2.2")
                        / UDP(sport=2000, dport=69) / rrq))  # fmt: skip
        drain(net)
        assert net.tftp is not None and len(net.tftp) == 1
        net.guest_gone()
        assert len(net.tftp) == 0
        feed(net, bytes(Ether(src=OTHER_MAC, dst=GW_MAC) / IP(src=GUEST, dst="10.0.2.2")
                        / UDP(sport=2001, dport=69) / rrq))  # fmt: skip
        assert len(net.tftp) == 1
    finally:
        await net.stop()


async def test_guest_gone_then_a_new_guest_is_learnt_from_its_first_ip_packet(net: UserNetwork) -> None:
    """The next guest takes the old one's address (its lease from DHCP, from 0.0.0.0, is the
    first thing it sends) and pings the gateway: its address is learnt from that packet as on a
    new stack, and the reply goes to it without an ARP request first."""
    feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src=GUEST, dst="10.0.2.2") / ICMP(id=1, seq=1)))
    drain(net)
    net.guest_gone()
    feed(net, dhcp_frame(OTHER_MAC, "discover"))
    drain(net)
    feed(net, bytes(Ether(src=OTHER_MAC, dst=GW_MAC) / IP(src=GUEST, dst="10.0.2.2") / ICMP(id=2, seq=1)))
    out = [Ether(f) for f in drain(net)]
    assert net.arp_table.lookup(bytes([10, 0, 2, 15])) == bytes.fromhex(OTHER_MAC.replace(":", ""))
    assert [p for p in out if ARP in p] == []
    assert [p[Ether].dst for p in out if ICMP in p] == [OTHER_MAC]


async def test_guest_gone_forgets_quiet_frames_expected_from_the_gone_guest(net: UserNetwork) -> None:
    """The guest closed a connection first and went before its last ACK: that ACK never comes,
    and the next guest's first frames must not be taken for it (the NIC lets quiet frames wait
    for a later kick)."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        w.close()

    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with Guest(net) as g:
            c = g.connect(GW_IP, port)
            await c.wait(lambda: c.state == "ESTABLISHED", 10)
            c.shutdown()
            await c.wait(lambda: c.fin_rcvd, 10)
            net.guest_gone()
        assert net.take_quiet_tx() == 0
    finally:
        srv.close()


async def test_guest_gone_drops_the_guests_half_reassembled_datagrams(net: UserNetwork) -> None:
    """A first fragment of the gone guest's waits for the rest (30 s): dropped and counted at
    once, so the next guest's fragments with the same id never meet it."""
    first = IP(src=GUEST, dst="10.0.2.2", id=99, flags="MF", frag=0, proto=17) / (b"x" * 16)
    feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / first))
    assert len(net.reassembler) == 1
    net.guest_gone()
    assert len(net.reassembler) == 0
    assert net.counters()["frag_dropped"] == 1


async def test_guest_gone_keeps_every_listener_and_may_come_twice_or_first() -> None:
    """Before any guest, and twice in a row: nothing breaks, and the forwards (from the options and
    from hostfwd_add, TCP and UDP) still listen and still open connections toward the guest."""
    net = UserNetwork(UserNetConfig.from_string("user,hostfwd=tcp:127.0.0.1:0-:22,hostfwd=udp:127.0.0.1:0-:53"))
    await net.start()
    try:
        await net.add_hostfwd("tcp:127.0.0.1:0-:80")
        before = [(f.proto, f.host_port) for f in net.flows()]
        assert len(before) == 3
        net.guest_gone()
        net.guest_gone()
        assert [(f.proto, f.host_port) for f in net.flows()] == before
        port = net.tcp.listener_ports()[0]
        with socket.create_connection(("127.0.0.1", port)):
            async with asyncio.timeout(5):
                while not net.tcp.conns:
                    await asyncio.sleep(0.01)
        assert net.counters()["errors"] == 0
    finally:
        await net.stop()


async def test_guest_gone_stops_router_advertisements_until_a_guest_speaks_ipv6(net: UserNetwork) -> None:
    """The periodic advertisement started with the gone guest's first IPv6 packet. With no guest
    it would be queued every few minutes for whoever comes next, as long as none does; a new
    stack sends none until a guest speaks IPv6, and so does this one."""
    feed(net, bytes(Ether(src=GUEST_MAC, dst="33:33:00:00:00:02") / IPv6(src="fe80::1", dst="ff02::2")
                    / ICMPv6ND_RS()))  # fmt: skip
    drain(net)
    assert net.ipv6 is not None
    net.guest_gone()
    net.ipv6.expire(time.monotonic() + 3600)
    assert drain(net) == []


async def test_guest_gone_frees_host_connects_still_in_progress_once(net: UserNetwork) -> None:
    """A connect the gone guest started is still waiting on the host (the server's accept queue is
    full): its socket and slot go with the guest, counted back once, and no timer is left to
    count them back again."""
    async with full_listener() as port:
        w = Wire(net)
        for gport in (20000, 20001):
            w.tcp(gport, port, GUEST_ISS, 0, SYN, opts=MSS_OPT)
        await asyncio.sleep(0.05)
        assert len(net.tcp._pending) == 2 and net.tcp._connecting == 2
        net.guest_gone()
        assert not net.tcp.conns and not net.tcp._pending and net.tcp._connecting == 0
        net.guest_gone()
        await asyncio.sleep(0.05)
        assert net.tcp._connecting == 0
        assert net.counters()["errors"] == 0
