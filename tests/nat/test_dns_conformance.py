"""The DNS forwarder against RFC 1035 and RFC 6891 (EDNS0), with a test resolver on loopback.

The guest is played by frames (scapy builds and reads the DNS messages); the
upstream is a resolver this test runs on 127.0.0.1, over UDP and TCP. No
other resolver is ever contacted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from collections.abc import AsyncIterator, Callable

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR, DNSRROPT

from appliance.nat import UserNetConfig, UserNetwork

from .peer import GW_IP, Guest

DNS_IP = bytes([10, 0, 2, 3])


def many_a(q: DNS, n: int) -> DNS:
    """An answer of ``n`` A records (16 bytes each), echoing the query's EDNS record if any."""
    an = [DNSRR(rrname=q.qd[0].qname, type="A", ttl=60, rdata=f"192.0.2.{i % 250 + 1}") for i in range(n)]
    ar = [DNSRROPT(rclass=4096)] if q.arcount else []
    return DNS(id=q.id, qr=1, ra=1, rd=q.rd, qd=q.qd, an=an, ar=ar)


class Resolver(asyncio.DatagramProtocol):
    """A loopback resolver: answers with what ``make`` builds for each query."""

    def __init__(self, make: Callable[[DNS], bytes]) -> None:
        self.make = make
        self.got: list[DNS] = []

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
        q = DNS(data)
        self.got.append(q)
        self.transport.sendto(self.make(q), addr)


@dataclasses.dataclass
class Setup:
    net: UserNetwork
    resolver: Resolver
    guest: Guest
    port: int


@pytest.fixture
async def setup(request) -> AsyncIterator[Setup]:  # type: ignore[no-untyped-def]
    make = getattr(request, "param", lambda q: bytes(many_a(q, 60)))
    loop = asyncio.get_running_loop()
    transport, resolver = await loop.create_datagram_endpoint(lambda: Resolver(make), local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    cfg = UserNetConfig.from_string("user,domainname=lab.test")
    net = UserNetwork(dataclasses.replace(cfg, nameservers=(("127.0.0.1", port),)))
    await net.start()
    try:
        async with Guest(net) as g:
            yield Setup(net, resolver, g, port)
    finally:
        await net.stop()
        transport.close()


async def ask(s: Setup, query: DNS, sport: int = 33333, timeout: float = 5.0) -> DNS:
    """Send ``query`` from the guest's ``sport`` to 10.0.2.3:53; the one answer (from :53 to sport)."""
    s.guest.udp.clear()
    s.guest.send_udp(DNS_IP, sport, 53, bytes(query))
    async with asyncio.timeout(timeout):
        while not s.guest.udp:
            await asyncio.sleep(0.005)
    [(src, from_port, to_port, payload)] = s.guest.udp
    assert (src, from_port, to_port) == (DNS_IP, 53, sport)
    return DNS(payload)


def q(name: str, qid: int = 0x1234, qtype: str = "A", edns: int | None = None, version: int = 0) -> DNS:
    ar = [DNSRROPT(rclass=edns, version=version)] if edns is not None else []
    return DNS(id=qid, rd=1, qd=[DNSQR(qname=name, qtype=qtype)], ar=ar)


def opt_of(m: DNS) -> DNSRROPT | None:
    return next((r for r in m.ar if isinstance(r, DNSRROPT)), None)


async def test_answer_over_512_bytes_without_edns_arrives_truncated_with_tc(setup: Setup) -> None:
    """RFC 1035 §4.2.1: a client without EDNS0 takes 512 bytes over UDP; a longer answer is cut
    to the header and question with TC set, as a resolver sends it (was: 1000+ bytes passed on)."""
    a = await ask(setup, q("big.example", 0xBEEF))
    assert a.id == 0xBEEF and a.qr == 1 and a.tc == 1
    assert a.qdcount == 1 and a.qd[0].qname == b"big.example." and a.ancount == 0
    assert len(bytes(a)) <= 512


@pytest.mark.parametrize("setup", [lambda q: bytes(many_a(q, 40))], indirect=True)
async def test_edns_query_gets_the_whole_answer_up_to_its_advertised_size(setup: Setup) -> None:
    a = await ask(setup, q("big.example", 7, edns=1232))
    assert a.tc == 0 and a.ancount == 40 and 512 < len(bytes(a)) <= 1232
    assert opt_of(a) is not None


async def test_edns_answer_larger_than_advertised_is_truncated_and_keeps_its_opt_record(setup: Setup) -> None:
    """RFC 6891 §7: the OPT record stays in a truncated answer; sizes below 512 count as 512."""
    for size in (600, 100):
        a = await ask(setup, q("big.example", 8, edns=size))
        assert a.tc == 1 and a.ancount == 0 and a.arcount == 1 and opt_of(a) is not None
        assert len(bytes(a)) <= 512


@pytest.mark.parametrize("setup", [lambda q: bytes(many_a(q, 2))], indirect=True)
async def test_query_id_and_port_round_trip_and_upstream_sees_a_random_id_of_ours(setup: Setup) -> None:
    ids = []
    for i, (qid, sport) in enumerate(((0xBEEF, 33333), (0x0001, 53), (0xFFFF, 65535))):
        a = await ask(setup, q(f"www{i}.example", qid), sport=sport)
        assert a.id == qid and a.ancount == 2
        ids.append(setup.resolver.got[-1].id)
    # RFC 5452 §4.3: not counting up from one query to the next (a 1-in-65536 chance each).
    assert not (ids[1] == (ids[0] + 1) & 0xFFFF and ids[2] == (ids[1] + 1) & 0xFFFF)


@pytest.mark.parametrize("setup", [lambda q: bytes(DNS(id=q.id, qr=1, qd=[DNSQR(qname="other.example")]))],
                         indirect=True)  # fmt: skip
async def test_answer_to_another_question_is_dropped(setup: Setup) -> None:
    """RFC 5452 §9.1: the answer must carry the question asked (was: passed to the guest)."""
    setup.guest.send_udp(DNS_IP, 33333, 53, bytes(q("www.example")))
    await asyncio.sleep(0.3)
    assert setup.guest.udp == [] and setup.net.counters()["dns_dropped"] == 1


@pytest.mark.parametrize(
    "setup", [lambda q: bytes(DNS(id=q.id, qr=1, rd=q.rd, qd=[DNSQR(qname=q.qd[0].qname.upper())]))], indirect=True
)
async def test_answer_with_the_question_in_other_case_is_passed_on(setup: Setup) -> None:
    a = await ask(setup, q("MiXeD.Example"))
    assert a.qd[0].qname == b"MIXED.EXAMPLE."


async def test_local_names_are_case_insensitive_and_echo_the_question_as_asked(setup: Setup) -> None:
    for name in ("GaTeWaY", "gateway.LAB.test", "DNS"):
        a = await ask(setup, q(name))
        assert a.aa == 1 and a.rcode == 0 and a.ancount == 1
        assert a.qd[0].qname == name.encode() + b"."  # 0x20 case randomization survives
        assert a.an[0].rdata == ("10.0.2.3" if name == "DNS" else "10.0.2.2")
    assert setup.resolver.got == []


async def test_aaaa_for_the_gateway_names(setup: Setup) -> None:
    a = await ask(setup, q("gateway", qtype="AAAA"))
    assert a.rcode == 0 and a.ancount == 1 and a.an[0].rdata == "fec0::2"
    a = await ask(setup, q("dns.lab.test", qtype="AAAA"))
    assert a.an[0].rdata == "fec0::3"
    a = await ask(setup, q("gateway", qtype="MX"))
    assert a.rcode == 0 and a.ancount == 0  # NODATA: the name exists
    assert setup.resolver.got == []


async def test_aaaa_for_the_gateway_without_ipv6_is_nodata() -> None:
    net = UserNetwork(dataclasses.replace(UserNetConfig.from_string("user,ipv6=off"), nameservers=()))
    await net.start()
    try:
        async with Guest(net) as g:
            a = await ask(Setup(net, Resolver(bytes), g, 0), q("gateway", qtype="AAAA"))
            assert a.rcode == 0 and a.ancount == 0 and a.aa == 1
    finally:
        await net.stop()


async def test_local_answer_to_an_edns_query_carries_an_opt_record(setup: Setup) -> None:
    """RFC 6891 §7: a responder that gets an OPT record sends one back (was: none);
    an EDNS version it does not know gets BADVERS (§6.1.3: extended RCODE 1, header 0)."""
    a = await ask(setup, q("gateway", edns=4096))
    o = opt_of(a)
    assert a.ancount == 1 and a.arcount == 1 and o is not None and o.version == 0 and o.rclass >= 512
    a = await ask(setup, q("gateway", edns=4096, version=1))
    o = opt_of(a)
    assert a.ancount == 0 and a.rcode == 0 and o is not None and o.extrcode == 1
    assert setup.resolver.got == []


@pytest.mark.parametrize("upstream", ["127.0.0.1", "::1"])
async def test_tcp_query_to_the_dns_address_reaches_the_upstream_as_libslirp(upstream: str) -> None:
    """libslirp connects TCP to its DNS address to the host's resolver: a client told TC=1
    asks again over TCP (RFC 7766), two-byte length and all, and the id comes back. The
    resolver may be an IPv6 one (test_dns_upstreams)."""
    got: list[bytes] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        n = struct.unpack("!H", await r.readexactly(2))[0]
        query = DNS(await r.readexactly(n))
        got.append(bytes(query))
        reply = bytes(many_a(query, 60))
        w.write(struct.pack("!H", len(reply)) + reply)
        await w.drain()
        w.close()

    srv = await asyncio.start_server(serve, upstream, 0)
    port = srv.sockets[0].getsockname()[1]
    net = UserNetwork(dataclasses.replace(UserNetConfig(), nameservers=((upstream, port),)))
    await net.start()
    try:
        async with Guest(net) as g:
            c = g.connect(DNS_IP, 53)
            query = bytes(q("big.example", 0x4242))
            c.write(struct.pack("!H", len(query)) + query)
            await c.wait(lambda: c.fin_rcvd, 10)
            data = c.read()
            n = struct.unpack("!H", data[:2])[0]
            a = DNS(data[2 : 2 + n])
            assert a.id == 0x4242 and a.ancount == 60 and a.tc == 0
            assert got and DNS(got[0]).id == 0x4242
    finally:
        await net.stop()
        srv.close()


async def test_tcp_to_the_dns_address_on_another_port_is_refused() -> None:
    net = UserNetwork(dataclasses.replace(UserNetConfig(), nameservers=(("127.0.0.1", 9),)))
    await net.start()
    try:
        async with Guest(net) as g:
            c = g.connect(DNS_IP, 80)
            await c.wait(lambda: c.reset, 10)
            c2 = g.connect(GW_IP, 9)  # the gateway itself is the host's loopback
            await c2.wait(lambda: c2.reset, 10)
    finally:
        await net.stop()


async def test_query_with_no_upstream_gets_servfail_at_once() -> None:
    """No upstream at all (``nameservers=()``; a resolv.conf naming none means the local
    machine's, see test_dns_upstreams): RCODE 2 with the question and the guest's id, an OPT
    record for an EDNS query (was: silence, the guest waited out its timeouts)."""
    net = UserNetwork(dataclasses.replace(UserNetConfig(), nameservers=()))
    await net.start()
    try:
        async with Guest(net) as g:
            s = Setup(net, Resolver(bytes), g, 0)
            a = await ask(s, q("www.example", 0x5151), timeout=1)
            assert (a.id, a.qr, a.rcode, a.ancount, a.arcount) == (0x5151, 1, 2, 0, 0)
            assert a.qd[0].qname == b"www.example." and a.rd == 1
            a = await ask(s, q("www.example", 0x5152, edns=1232), timeout=1)
            assert a.rcode == 2 and opt_of(a) is not None
    finally:
        await net.stop()


async def test_query_whose_upstreams_stay_silent_gets_servfail(monkeypatch) -> None:
    from appliance.nat import dns as dnsmod

    monkeypatch.setattr(dnsmod, "PER_SERVER_TIMEOUT", 0.05)
    loop = asyncio.get_running_loop()
    silent, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    port = silent.get_extra_info("sockname")[1]
    net = UserNetwork(dataclasses.replace(UserNetConfig(), nameservers=(("127.0.0.1", port),) * 2))
    await net.start()
    try:
        async with Guest(net) as g:
            a = await ask(Setup(net, Resolver(bytes), g, port), q("slow.example", 0x6161), timeout=5)
            assert (a.id, a.rcode, a.qd[0].qname) == (0x6161, 2, b"slow.example.")
            assert net.dns.pending() == 0
    finally:
        await net.stop()
        silent.close()
