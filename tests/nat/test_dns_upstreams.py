"""Where the DNS forwarder sends queries: the host's resolv.conf read as its resolver reads it,
IPv6 upstreams, and moving from one family's server to the other's (TCP to an IPv6 upstream:
test_dns_conformance).

Upstreams here are resolvers this test runs on 127.0.0.1 and ::1; no other resolver is
contacted. resolv.conf files are written to the test's own directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from scapy.layers.dns import DNS

from appliance.nat import UserNetConfig, UserNetwork
from appliance.nat import dns as dnsmod
from appliance.nat.dns import host_nameservers

from .peer import Guest
from .test_dns_conformance import Resolver, Setup, ask, many_a, q


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "resolv.conf"
    path.write_text(text)
    return str(path)


def test_resolv_conf_gives_ipv4_and_ipv6_servers_in_its_order(tmp_path: Path) -> None:
    path = write(tmp_path, """# written by a DHCP client
search lab.test
nameserver 2001:db8::53
; a comment in the other style
nameserver 192.0.2.53
nameserver fe80::1%lo
nameserver resolver.lab.test
nameserver fe80::2%no-such-if0
nameserver
options edns0 trust-ad
nameserver ::1
""")
    # A name and a zone no interface has are not addresses a resolver can use: skipped,
    # as are lines that are not nameserver lines; the rest keep the file's order.
    assert host_nameservers(path) == [("2001:db8::53", 53), ("192.0.2.53", 53), ("fe80::1%lo", 53), ("::1", 53)]


def test_resolv_conf_naming_no_server_means_the_local_machine(tmp_path: Path) -> None:
    """resolv.conf(5): with no nameserver entry the name server on the local machine is used;
    libslirp likewise sends the guest's queries to loopback. Was: no upstream, SERVFAIL."""
    local = [("127.0.0.1", 53)]
    assert host_nameservers(write(tmp_path, "")) == local
    assert host_nameservers(write(tmp_path, "search lab.test\nnameserver not-an-address\n")) == local
    assert host_nameservers(str(tmp_path / "missing.conf")) == local


async def start_resolver(host: str) -> tuple[asyncio.DatagramTransport, Resolver, int]:
    loop = asyncio.get_running_loop()
    transport, resolver = await loop.create_datagram_endpoint(
        lambda: Resolver(lambda query: bytes(many_a(query, 2))), local_addr=(host, 0)
    )
    return transport, resolver, transport.get_extra_info("sockname")[1]


async def test_guest_query_is_answered_through_an_ipv6_upstream() -> None:
    transport, resolver, port = await start_resolver("::1")
    net = UserNetwork(dataclasses.replace(UserNetConfig(), nameservers=(("::1", port),)))
    await net.start()
    try:
        async with Guest(net) as g:
            a = await ask(Setup(net, resolver, g, port), q("v6.example", 0x6606))
            assert (a.id, a.rcode, a.ancount, a.qd[0].qname) == (0x6606, 0, 2, b"v6.example.")
            # The upstream saw the question with an id of ours, not the guest's.
            assert [bytes(r.qd[0].qname) for r in resolver.got] == [b"v6.example."]
    finally:
        await net.stop()
        transport.close()


async def test_silent_ipv4_upstream_gives_way_to_the_next_an_ipv6_one(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(dnsmod, "PER_SERVER_TIMEOUT", 0.05)
    loop = asyncio.get_running_loop()
    silent, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    silent_port = silent.get_extra_info("sockname")[1]
    transport, resolver, port = await start_resolver("::1")
    servers = (("127.0.0.1", silent_port), ("::1", port))
    net = UserNetwork(dataclasses.replace(UserNetConfig(), nameservers=servers))
    await net.start()
    try:
        async with Guest(net) as g:
            a = await ask(Setup(net, resolver, g, port), q("second.example", 0x2222), timeout=5)
            assert (a.id, a.rcode, a.ancount) == (0x2222, 0, 2)
            assert net.dns.pending() == 0
    finally:
        await net.stop()
        transport.close()
        silent.close()


async def test_answer_from_another_ipv6_port_is_dropped(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An answer must come from the server the query went to: the same id and question from
    another port on the same address does not count (RFC 5452 §9.1)."""
    monkeypatch.setattr(dnsmod, "PER_SERVER_TIMEOUT", 0.2)
    loop = asyncio.get_running_loop()
    forger_t, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("::1", 0))

    class Relay(Resolver):
        """Never answers itself: the forger answers each query instead."""

        def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
            self.got.append(DNS(data))
            forger_t.sendto(bytes(many_a(DNS(data), 1)), addr)

    transport, resolver = await loop.create_datagram_endpoint(lambda: Relay(bytes), local_addr=("::1", 0))
    port = transport.get_extra_info("sockname")[1]
    net = UserNetwork(dataclasses.replace(UserNetConfig(), nameservers=(("::1", port),)))
    await net.start()
    try:
        async with Guest(net) as g:
            # Only the forged answer comes: dropped, so the guest hears SERVFAIL when the query times out.
            a = await ask(Setup(net, resolver, g, port), q("forged.example", 0x3333), timeout=5)
            assert (a.id, a.rcode, a.ancount) == (0x3333, 2, 0)
            assert resolver.got
    finally:
        await net.stop()
        transport.close()
        forger_t.close()



async def test_a_changed_resolv_conf_is_read_again(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A host that changes networks rewrites resolv.conf: later queries go to the new server
    (libslirp reads it again too). Was: the servers of the daemon's start, for good."""
    a_transport, a, port = await start_resolver("127.0.0.1")
    loop = asyncio.get_running_loop()
    b_transport, b = await loop.create_datagram_endpoint(
        lambda: Resolver(lambda query: bytes(many_a(query, 1))), local_addr=("::1", port)
    )
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\n")
    monkeypatch.setattr(dnsmod, "RESOLV_CONF", str(conf))
    monkeypatch.setattr(dnsmod, "RESOLV_CHECK", 0.0)
    real = dnsmod.host_nameservers
    monkeypatch.setattr(dnsmod, "host_nameservers", lambda path: real(path, port))  # the test's resolvers' port
    net = UserNetwork(UserNetConfig())  # no nameservers given: the host's resolv.conf
    await net.start()
    try:
        async with Guest(net) as g:
            s = Setup(net, a, g, port)
            assert (await ask(s, q("first.example", 0x1111))).ancount == 2  # from the IPv4 one
            conf.write_text("# another network\nnameserver ::1\n")
            assert (await ask(s, q("second.example", 0x2222))).ancount == 1  # from the IPv6 one
            assert [r.qd[0].qname for r in a.got] == [b"first.example."]
            assert [r.qd[0].qname for r in b.got] == [b"second.example."]
    finally:
        await net.stop()
        a_transport.close()
        b_transport.close()
