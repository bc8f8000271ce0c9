"""ARP, ICMP echo, the DNS proxy and UDP NAT, driven with scapy-built frames against loopback services."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, IPerror6, IPv6
from scapy.layers.l2 import ARP, Ether

from appliance.nat import UserNetConfig, UserNetwork

from .conftest import GUEST_MAC, GW_MAC, drain, feed
from .peer import csum
from .test_ipv6 import needs_v6

GUEST = "10.0.2.15"


def ping_allowed() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
        return True
    except OSError:
        return False


async def wait_frames(net: UserNetwork, pred, timeout: float = 5.0) -> list[Ether]:
    got: list[Ether] = []
    async with asyncio.timeout(timeout):
        while True:
            got += [Ether(f) for f in drain(net)]
            hits = [p for p in got if pred(p)]
            if hits:
                return hits
            await asyncio.sleep(0.005)


def arp_request(target: str) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST, pdst=target))


def to_gw(pkt) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / pkt)


async def test_arp_for_gateway_and_dns_answered_with_their_macs(net: UserNetwork) -> None:
    for target, mac in (("10.0.2.2", GW_MAC), ("10.0.2.3", "52:55:0a:00:02:03")):
        feed(net, bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
                        / ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST, pdst=target)))  # fmt: skip
        [reply] = [Ether(f) for f in drain(net)]
        assert reply[ARP].op == 2
        assert reply[ARP].hwsrc == mac  # libslirp's: 52:55 and the address (test_special_macs)
        assert reply[ARP].psrc == target
        assert reply[ARP].hwdst == GUEST_MAC
        assert reply[Ether].dst == GUEST_MAC
    assert net.arp_table.lookup(bytes([10, 0, 2, 15])) == bytes.fromhex("525400123456")


async def test_arp_for_other_addresses_is_ignored(net: UserNetwork) -> None:
    feed(
        net,
        bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST, pdst="10.0.2.77")),
    )
    assert drain(net) == []


async def test_ping_gateway_is_answered_locally(net: UserNetwork) -> None:
    feed(net, to_gw(IP(src=GUEST, dst="10.0.2.2") / ICMP(type=8, id=77, seq=3) / (b"x" * 56)))
    [reply] = [Ether(f) for f in drain(net)]
    assert reply[ICMP].type == 0
    assert (reply[ICMP].id, reply[ICMP].seq) == (77, 3)
    assert bytes(reply[ICMP].payload) == b"x" * 56
    assert reply[IP].src == "10.0.2.2" and reply[IP].dst == GUEST
    again = Ether(bytes(reply))
    del again[IP].chksum, again[ICMP].chksum
    assert Ether(bytes(again))[ICMP].chksum == reply[ICMP].chksum
    assert Ether(bytes(again))[IP].chksum == reply[IP].chksum


async def test_ping_with_bad_checksum_is_dropped(net: UserNetwork) -> None:
    feed(net, to_gw(IP(src=GUEST, dst="10.0.2.2") / ICMP(type=8, id=1, seq=1, chksum=0x1234)))
    assert drain(net) == []
    assert net.counters()["bad_checksum"] == 1


@pytest.mark.skipif(not ping_allowed(), reason="net.ipv4.ping_group_range forbids unprivileged ping here")
async def test_ping_to_the_outside_goes_through_a_ping_socket(net: UserNetwork) -> None:
    feed(net, to_gw(IP(src=GUEST, dst="127.0.0.1") / ICMP(type=8, id=4242, seq=9) / b"hello"))
    [reply] = await wait_frames(net, lambda p: ICMP in p)
    assert reply[ICMP].type == 0 and reply[ICMP].id == 4242 and reply[IP].src == "127.0.0.1"


async def test_ping_to_the_outside_is_counted_when_host_forbids_it(net: UserNetwork) -> None:
    if ping_allowed():
        pytest.skip("this host allows unprivileged ping")
    feed(net, to_gw(IP(src=GUEST, dst="127.0.0.1") / ICMP(type=8, id=1, seq=1)))
    assert net.counters()["icmp_unpermitted"] == 1


class _Upstream(asyncio.DatagramProtocol):
    """A test DNS server on loopback: answers every A query with 192.0.2.1."""

    def __init__(self) -> None:
        self.queries: list[DNS] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        q = DNS(data)
        self.queries.append(q)
        reply = DNS(id=q.id, qr=1, aa=1, rd=q.rd, qd=q.qd, an=DNSRR(rrname=q.qd[0].qname, rdata="192.0.2.1"))
        self.transport.sendto(bytes(reply), addr)


@pytest.fixture
async def dns_net() -> AsyncIterator[tuple[UserNetwork, _Upstream]]:
    loop = asyncio.get_running_loop()
    transport, upstream = await loop.create_datagram_endpoint(_Upstream, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    cfg = UserNetConfig.from_string("user,domainname=lab.test")
    cfg = dataclasses.replace(
        cfg, nameservers=(("127.0.0.1", port),), hosts={"files.internal": ipaddress.IPv4Address("10.0.2.2")}
    )
    n = UserNetwork(cfg)
    await n.start()
    yield n, upstream
    await n.stop()
    transport.close()


def dns_query(name: str, qid: int, qtype: str = "A") -> bytes:
    return to_gw(
        IP(src=GUEST, dst="10.0.2.3") / UDP(sport=5353, dport=53) / DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype=qtype))
    )


async def test_dns_query_is_forwarded_to_the_upstream_and_answered(dns_net) -> None:
    net, upstream = dns_net
    feed(net, dns_query("www.example.com", 0xBEEF))
    [reply] = await wait_frames(net, lambda p: DNS in p)
    assert reply[DNS].id == 0xBEEF
    assert reply[DNS].an[0].rdata == "192.0.2.1"
    assert reply[IP].src == "10.0.2.3" and reply[UDP].sport == 53 and reply[UDP].dport == 5353
    assert upstream.queries[0].qd[0].qname == b"www.example.com."
    assert net.counters()["dns_forwarded"] == 1


async def test_dns_query_moves_on_to_the_next_upstream_when_the_first_is_silent(monkeypatch) -> None:
    from appliance.nat import dns as dnsmod

    monkeypatch.setattr(dnsmod, "PER_SERVER_TIMEOUT", 0.1)
    loop = asyncio.get_running_loop()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # bound but never answers
    transport, upstream = await loop.create_datagram_endpoint(_Upstream, local_addr=("127.0.0.1", 0))
    servers = (("127.0.0.1", silent.getsockname()[1]), ("127.0.0.1", transport.get_extra_info("sockname")[1]))
    net = UserNetwork(dataclasses.replace(UserNetConfig(), nameservers=servers))
    await net.start()
    try:
        feed(net, dns_query("slow.example", 0x4321))
        [reply] = await wait_frames(net, lambda p: DNS in p, timeout=5.0)
        assert reply[DNS].id == 0x4321 and reply[DNS].an[0].rdata == "192.0.2.1"
        assert len(upstream.queries) == 1
    finally:
        await net.stop()
        transport.close()
        silent.close()


async def test_dns_gateway_names_and_hosts_table_are_answered_locally(dns_net) -> None:
    net, upstream = dns_net
    for name, qid in (("gateway", 1), ("files.internal", 2), ("gateway.lab.test", 3)):
        feed(net, dns_query(name, qid))
        [reply] = [Ether(f) for f in drain(net)]
        assert reply[DNS].id == qid and reply[DNS].an[0].rdata == "10.0.2.2"
    feed(net, dns_query("gateway", 4, "AAAA"))
    [reply] = [Ether(f) for f in drain(net)]
    assert reply[DNS].rcode == 0 and reply[DNS].ancount == 1 and reply[DNS].an[0].rdata == "fec0::2"
    feed(net, dns_query("files.internal", 5, "AAAA"))
    [reply] = [Ether(f) for f in drain(net)]
    assert reply[DNS].rcode == 0 and reply[DNS].ancount == 0
    assert upstream.queries == []


async def test_dns_garbage_is_dropped_and_counted(dns_net) -> None:
    net, _ = dns_net
    feed(net, to_gw(IP(src=GUEST, dst="10.0.2.3") / UDP(sport=5353, dport=53) / b"\x01\x02\x03"))
    assert drain(net) == []
    assert net.counters()["dns_dropped"] == 1


async def test_udp_round_trip_through_a_loopback_echo_server(net: UserNetwork) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.setblocking(False)
    port = srv.getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        feed(net, to_gw(IP(src=GUEST, dst="10.0.2.2") / UDP(sport=3333, dport=port) / b"ping-1"))
        data, peer = await loop.sock_recvfrom(srv, 2048)
        assert data == b"ping-1"
        await loop.sock_sendto(srv, b"pong-1", peer)
        [reply] = await wait_frames(net, lambda p: UDP in p)
        assert bytes(reply[UDP].payload) == b"pong-1"
        assert reply[IP].src == "10.0.2.2" and reply[UDP].sport == port and reply[UDP].dport == 3333
        assert net.flows()[0].proto == "UDP"
        # The same flow reuses its socket.
        feed(net, to_gw(IP(src=GUEST, dst="10.0.2.2") / UDP(sport=3333, dport=port) / b"ping-2"))
        data, peer2 = await loop.sock_recvfrom(srv, 2048)
        assert data == b"ping-2" and peer2 == peer
        assert net.counters()["udp_flows"] == 1
    finally:
        srv.close()


async def test_udp_flow_expires_when_idle(net: UserNetwork) -> None:
    from appliance.nat import udp_nat

    feed(net, to_gw(IP(src=GUEST, dst="10.0.2.2") / UDP(sport=3333, dport=9) / b"x"))
    assert len(net.udp) == 1
    net.udp.expire(time.monotonic() + udp_nat.IDLE_TIMEOUT - 5)
    assert len(net.udp) == 1
    net.udp.expire(time.monotonic() + udp_nat.IDLE_TIMEOUT + 1)
    assert len(net.udp) == 0


async def test_udp_hostfwd_delivers_host_datagrams_to_the_guest_and_back() -> None:
    net = UserNetwork(UserNetConfig.from_string("user,hostfwd=udp:127.0.0.1:0-:5000"))
    await net.start()
    cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        hp = net.udp.listener_ports()[0]
        feed(
            net,
            bytes(
                Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST, pdst="10.0.2.2")
            ),
        )
        drain(net)
        cli.sendto(b"to-guest", ("127.0.0.1", hp))
        [pkt] = await wait_frames(net, lambda p: UDP in p)
        assert pkt[IP].dst == GUEST and pkt[UDP].dport == 5000 and bytes(pkt[UDP].payload) == b"to-guest"
        assert pkt[IP].src == "10.0.2.2"
        feed(net, to_gw(IP(src=GUEST, dst="10.0.2.2") / UDP(sport=5000, dport=pkt[UDP].sport) / b"to-host"))
        data = await asyncio.wait_for(loop.sock_recv(cli, 2048), 5)
        assert data == b"to-host"
    finally:
        cli.close()
        await net.stop()


async def test_restrict_on_refuses_outbound_udp_and_dns_forwarding() -> None:
    net = UserNetwork(UserNetConfig.from_string("user,restrict=on"))
    await net.start()
    try:
        feed(net, to_gw(IP(src=GUEST, dst="10.0.2.2") / UDP(sport=3333, dport=9) / b"x"))
        assert net.counters()["restricted"] == 1 and len(net.udp) == 0
        feed(net, dns_query("www.example.com", 7))
        assert net.counters()["restricted"] == 2 and net.dns.pending() == 0
        feed(net, dns_query("gateway", 8))
        [reply] = [Ether(f) for f in drain(net)]
        assert reply[DNS].an[0].rdata == "10.0.2.2"
    finally:
        await net.stop()


async def test_fragmented_udp_datagram_is_reassembled_and_forwarded(net: UserNetwork) -> None:
    from scapy.layers.inet import fragment

    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.setblocking(False)
    port = srv.getsockname()[1]
    try:
        payload = bytes(range(256)) * 12
        pkt = IP(src=GUEST, dst="10.0.2.2", id=99) / UDP(sport=4444, dport=port) / payload
        frags = fragment(pkt, fragsize=800)
        assert len(frags) == 4
        for f in reversed(frags):
            feed(net, to_gw(f))
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(srv, 65535), 5)
        assert data == payload
        assert net.counters()["frag_reassembled"] == 1
    finally:
        srv.close()


PING_IN_NETNS = r"""
import asyncio, pathlib, subprocess, sys
sys.path.insert(0, sys.argv[1])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
# This network namespace is private to this process, so its sysctl is ours to set.
pathlib.Path("/proc/sys/net/ipv4/ping_group_range").write_text("0 2147483647")
from scapy.layers.inet import ICMP, IP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from appliance.nat import UserNetwork
from tests.nat.conftest import drain

async def main():
    net = UserNetwork()
    await net.start()
    frame = Ether(src="52:54:00:12:34:56", dst="52:55:0a:00:02:02") / IP(src="10.0.2.15", dst="127.0.0.1")
    net.send([memoryview(bytes(frame / ICMP(type=8, id=4242, seq=9) / b"netns ping"))])
    frame6 = Ether(src="52:54:00:12:34:56", dst="52:55:0a:00:02:02") / IPv6(src="fec0::15", dst="fec0::2")
    net.send([memoryview(bytes(frame6 / ICMPv6EchoRequest(id=4343, seq=7, data=b"netns ping6")))])
    got = []
    for _ in range(2000):
        for raw in drain(net):
            p = Ether(raw)
            if ICMP in p:
                got.append(f"{p[ICMP].type} {p[ICMP].id} {p[ICMP].seq} {p[IP].src} {bytes(p[ICMP].payload).decode()}")
            if ICMPv6EchoReply in p:
                r = p[ICMPv6EchoReply]
                got.append(f"{r.type} {r.id} {r.seq} {p[IPv6].src} {r.data.decode()}")
        if len(got) == 2:
            break
        await asyncio.sleep(0.01)
    print("\n".join(sorted(got)) if got else f"no reply {net.counters()}")
    await net.stop()

asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_ping_forwarded_through_a_ping_socket_in_a_private_netns(project_root) -> None:
    """A private network namespace allows ping sockets; the guest's echo to 127.0.0.1 comes back."""
    out = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", PING_IN_NETNS, str(project_root)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.strip().splitlines() == ["0 4242 9 127.0.0.1 netns ping", "129 4343 7 fec0::2 netns ping6"], (
        out.stdout + out.stderr[-2000:]
    )


async def test_udp_to_a_closed_host_port_returns_icmp_port_unreachable(net: UserNetwork) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    feed(net, to_gw(IP(src=GUEST, dst="10.0.2.2") / UDP(sport=3456, dport=port) / b"anyone?"))
    [err] = await wait_frames(net, lambda p: ICMP in p)
    assert (err[ICMP].type, err[ICMP].code) == (3, 3)
    assert err[IPerror].src == GUEST and err[IPerror].dst == "10.0.2.2"
    assert err[UDPerror].sport == 3456 and err[UDPerror].dport == port
    again = Ether(bytes(err))
    del again[ICMP].chksum
    assert Ether(bytes(again))[ICMP].chksum == err[ICMP].chksum


@needs_v6  # a host without IPv6 loopback (a container, say) cannot bind ::1
async def test_udp_over_ipv6_to_a_closed_host_port_returns_icmpv6_port_unreachable(net: UserNetwork) -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    feed(net, to_gw(IPv6(src="fec0::15", dst="fec0::2") / UDP(sport=3457, dport=port) / b"anyone6?"))
    [err] = await wait_frames(net, lambda p: ICMPv6DestUnreach in p)
    assert err[ICMPv6DestUnreach].code == 4  # port unreachable (RFC 4443 §3.1)
    assert err[IPv6].src == "fec0::2" and err[IPv6].dst == "fec0::15"
    assert err[IPerror6].src == "fec0::15" and err[IPerror6].dst == "fec0::2"
    assert bytes(err[IPerror6].payload)[:4] == struct.pack("!HH", 3457, port)
    again = Ether(bytes(err))
    del again[ICMPv6DestUnreach].cksum
    assert Ether(bytes(again))[ICMPv6DestUnreach].cksum == err[ICMPv6DestUnreach].cksum


async def collect(net: UserNetwork, enough, timeout: float = 5.0) -> list[Ether]:
    got: list[Ether] = []
    async with asyncio.timeout(timeout):
        while not enough(got):
            got += [Ether(f) for f in drain(net)]
            await asyncio.sleep(0.005)
    return got


def reassemble(frames: list[Ether]) -> bytes:
    """Independent of the stack: put IPv4 fragments back together by offset."""
    parts = sorted((p[IP].frag * 8, bytes(p[IP].payload)) for p in frames if IP in p)
    out = b""
    for off, data in parts:
        assert off == len(out)
        out += data
    return out


async def test_big_udp_reply_is_fragmented_to_the_mtu(net: UserNetwork) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.setblocking(False)
    port = srv.getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        feed(net, to_gw(IP(src=GUEST, dst="10.0.2.2") / UDP(sport=5353, dport=port) / b"q"))
        _, peer = await loop.sock_recvfrom(srv, 100)
        big = bytes(range(256)) * 16  # 4096 bytes, like an EDNS0 answer
        await loop.sock_sendto(srv, big, peer)
        frags = await collect(net, lambda got: any(IP in p and p[IP].frag and not p[IP].flags.MF for p in got))
        assert len(frags) == 3 and all(len(bytes(p)) <= 1514 for p in frags)
        assert len({p[IP].id for p in frags}) == 1
        raw = reassemble(frags)
        udp = UDP(raw)
        assert bytes(udp.payload) == big and udp.sport == port and udp.dport == 5353
        pseudo = socket.inet_aton("10.0.2.2") + socket.inet_aton(GUEST) + struct.pack("!BBH", 0, 17, len(raw))
        assert csum(pseudo + raw) == 0  # the checksum covers the whole datagram
    finally:
        srv.close()


async def test_big_ping_to_gateway_is_reassembled_and_answered_in_fragments(net: UserNetwork) -> None:
    from scapy.layers.inet import fragment

    req = IP(src=GUEST, dst="10.0.2.2", id=77) / ICMP(type=8, id=9, seq=1) / (b"p" * 3000)
    for f in fragment(req, fragsize=1480):
        feed(net, to_gw(f))
    frags = await collect(net, lambda got: any(IP in p and p[IP].frag and not p[IP].flags.MF for p in got))
    assert len(frags) == 3
    reply = ICMP(reassemble(frags))
    assert reply.type == 0 and reply.id == 9 and bytes(reply.payload) == b"p" * 3000


async def test_ready_callback_is_paused_by_none_and_fires_when_set_again(net: UserNetwork) -> None:
    calls: list[int] = []
    net.set_ready_callback(None)
    feed(net, to_gw(IP(src=GUEST, dst="10.0.2.2") / ICMP(type=8, id=1, seq=1)))
    await asyncio.sleep(0.01)
    assert calls == [] and net.queued() == 1
    net.set_ready_callback(lambda: calls.append(1))
    await asyncio.sleep(0.01)
    assert calls == [1]
    assert len(drain(net)) == 1
    feed(net, to_gw(IP(src=GUEST, dst="10.0.2.2") / ICMP(type=8, id=1, seq=2)))
    await asyncio.sleep(0.01)
    assert calls == [1, 1]


async def test_dns_local_names_under_a_domainname_given_with_its_trailing_dot() -> None:
    """``domainname=lab.test.`` (absolute, as resolv.conf users write it) still makes
    ``gateway.lab.test`` local, as before QEMU's any-text domainname was taken as given."""
    net = UserNetwork(dataclasses.replace(UserNetConfig.from_string("user,domainname=Lab.Test."),
                                          nameservers=(("127.0.0.1", 9),)))
    await net.start()
    try:
        feed(net, dns_query("gateway.lab.test", 7))
        [reply] = [Ether(f) for f in drain(net)]
        assert reply[DNS].id == 7 and reply[DNS].an[0].rdata == "10.0.2.2"
    finally:
        await net.stop()


async def test_icmp_errors_to_the_guest_are_rate_limited(net: UserNetwork) -> None:
    # RFC 4443 §2.4(f) (MUST for ICMPv6), RFC 1812 §4.3.2.8: a token bucket with Linux's
    # defaults, 50 at once and 1000 a second after.
    import errno

    from appliance.nat import icmp

    feed(net, arp_request("10.0.2.2"))  # the guest's MAC, for the errors' frames
    drain(net)
    udp = struct.pack("!HHHH", 5000, 53, 9, 0)
    t0 = time.monotonic()
    sent = sum(
        net.icmp.unreachable(errno.ENETUNREACH, bytes([10, 0, 2, 15]), bytes([198, 51, 100, 7]), 17, udp, 9)
        for _ in range(200)
    )
    elapsed = time.monotonic() - t0
    assert icmp.ERRORS_BURST <= sent <= icmp.ERRORS_BURST + elapsed * icmp.ERRORS_PER_SEC + 1
    frames = [Ether(f) for f in drain(net) if Ether(f).haslayer(ICMP)]
    assert len(frames) == sent
    assert net.counters()["icmp_errors_limited"] == 200 - sent
    await asyncio.sleep(0.02)  # 20 more tokens by now
    assert net.icmp.unreachable(errno.EHOSTUNREACH, bytes([10, 0, 2, 15]), bytes([198, 51, 100, 7]), 17, udp, 9)
