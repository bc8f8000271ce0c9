"""A hostile guest: random and fuzzed frames, floods and storms. Nothing may escape or grow unbounded."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dns import DNS
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6ND_RS, IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import fuzz

from appliance.nat import UserNetConfig, UserNetwork, tcp_nat
from appliance.nat import ipv4 as ipv4mod
from appliance.nat import tcp as tcpmod

from .conftest import GUEST_MAC, GW_MAC, drain
from .peer import GUEST_IP, GW_IP, Guest, csum, eth, ip_packet, tcp_frame
from .test_tcp import MB, Sink, connected_to_sink, established, serve

GUEST_MAC_B = bytes.fromhex(GUEST_MAC.replace(":", ""))
GW_MAC_B = bytes.fromhex(GW_MAC.replace(":", ""))


def make_net() -> UserNetwork:
    return UserNetwork(UserNetConfig(nameservers=(("127.0.0.1", 9),)))


def assert_clean(net: UserNetwork) -> None:
    c = net.counters()
    assert c["errors"] == 0, "an internal error was caught at the frame boundary"
    assert net.queued() <= net.queue_limit


def feed_raw(net: UserNetwork, frame: bytes) -> None:
    assert net.send([memoryview(frame)]) is True


# -- random bytes ------------------------------------------------------------

ETHERTYPES = st.sampled_from([0x0800, 0x0806, 0x86DD, 0x1234])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=200), ethertype=ETHERTYPES, split=st.integers(0, 4))
async def test_random_bodies_after_a_valid_ethernet_header_never_escape(
    body: bytes, ethertype: int, split: int
) -> None:
    net = make_net()
    await net.start()
    try:
        frame = GW_MAC_B + GUEST_MAC_B + struct.pack("!H", ethertype) + body
        parts = [memoryview(frame[: len(frame) * split // 4]), memoryview(frame[len(frame) * split // 4 :])]
        assert net.send(parts) is True
        drain(net)
        assert_clean(net)
    finally:
        await net.stop()


PROTOS = st.sampled_from([1, 6, 17, 0, 255])


@settings(max_examples=200, deadline=None)
@given(
    proto=PROTOS,
    payload=st.binary(max_size=120),
    frag=st.integers(0, 0xFFFF),
    ihl_extra=st.integers(0, 3),
    dst=st.sampled_from([GW_IP, bytes([10, 0, 2, 3]), bytes([10, 0, 2, 99]), bytes([255] * 4), bytes([127, 0, 0, 1])]),
    src=st.sampled_from([GUEST_IP, bytes(4), bytes([10, 0, 2, 2]), bytes([8, 8, 8, 8])]),
    fix_l4=st.booleans(),
)
async def test_random_ipv4_packets_with_valid_ip_checksum_never_escape(
    proto: int, payload: bytes, frag: int, ihl_extra: int, dst: bytes, src: bytes, fix_l4: bool
) -> None:
    """The IP header is right, so every transport parser gets the random payload."""
    net = make_net()
    await net.start()
    try:
        body = bytearray(payload)
        if fix_l4 and proto in (6, 17) and len(body) >= (20 if proto == 6 else 8):
            off = 16 if proto == 6 else 6
            body[off : off + 2] = b"\0\0"
            if proto == 6:
                body[12] = (body[12] & 0x0F) | 0x50
            if proto == 17:
                body[4:6] = struct.pack("!H", len(body))
            pseudo = struct.pack("!4s4sBBH", src, dst, 0, proto, len(body))
            body[off : off + 2] = struct.pack("!H", csum(pseudo + bytes(body)))
        opts = b"\x01" * (4 * ihl_extra)
        hdr = bytearray(
            struct.pack(
                "!BBHHHBBH4s4s", 0x45 + ihl_extra, 0, 20 + len(opts) + len(body), 7, frag, 64, proto, 0, src, dst
            )
        )
        hdr += opts
        struct.pack_into("!H", hdr, 10, csum(bytes(hdr)))
        feed_raw(net, eth(GW_MAC_B, GUEST_MAC_B, 0x0800, bytes(hdr) + bytes(body)))
        drain(net)
        assert_clean(net)
    finally:
        await net.stop()


# -- scapy fuzz() ----------------------------------------------------------------

FUZZ_TEMPLATES = {
    "tcp": lambda: IP(src="10.0.2.15", dst="10.0.2.2") / fuzz(TCP(dport=9)),
    "udp": lambda: IP(src="10.0.2.15", dst="10.0.2.2") / fuzz(UDP()),
    "dns": lambda: IP(src="10.0.2.15", dst="10.0.2.3") / UDP(sport=1000, dport=53) / fuzz(DNS()),
    "dhcp": lambda: (
        IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / fuzz(BOOTP(op=1))
        / DHCP(options=[("message-type", random.choice(range(0, 10))), "end"])
    ),
    "icmp": lambda: IP(src="10.0.2.15", dst="10.0.2.2") / fuzz(ICMP()),
    "ip": lambda: fuzz(IP(src="10.0.2.15", dst="10.0.2.2")),
    "ipv6-nd": lambda: IPv6(src="fe80::1", dst="ff02::1:ff00:2", hlim=255) / fuzz(ICMPv6ND_NS(tgt="fec0::2")),
    "ipv6-rs": lambda: IPv6(src="fe80::1", dst="ff02::2", hlim=255) / fuzz(ICMPv6ND_RS()),
    "ipv6-echo": lambda: IPv6(src="fec0::15", dst="fec0::2") / fuzz(ICMPv6EchoRequest()),
    "ipv6-tcp": lambda: IPv6(src="fec0::15", dst="fec0::2") / fuzz(TCP(dport=9)),
    "ipv6-udp": lambda: IPv6(src="fec0::15", dst="fec0::3") / UDP(sport=1000, dport=53) / fuzz(DNS()),
}


@pytest.mark.parametrize("kind", sorted(FUZZ_TEMPLATES))
async def test_scapy_fuzz_frames_never_escape(kind: str) -> None:
    random.seed(kind)
    net = make_net()
    await net.start()
    try:
        for _ in range(150):
            frame = bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / FUZZ_TEMPLATES[kind]())
            feed_raw(net, frame)
        arp = Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / fuzz(ARP(hwsrc=GUEST_MAC, pdst="10.0.2.2"))
        for _ in range(50):
            feed_raw(net, bytes(arp))
        await asyncio.sleep(0.05)
        drain(net)
        assert_clean(net)
    finally:
        await net.stop()


# -- truncation and checksums -----------------------------------------------------


def valid_frames() -> list[bytes]:
    syn = tcp_frame(GUEST_IP, 40000, GW_IP, 9, 1000, 0, 2, 65535, opts=b"\x02\x04\x05\xb4\x03\x03\x07\x00")
    return [
        syn,
        bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.2") / ICMP() / b"abcd"),
        bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.3") / UDP(sport=1, dport=53) / DNS()),
        bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=GUEST_MAC, psrc="10.0.2.15", pdst="10.0.2.2")),
        bytes(
            Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
            / IP(src="0.0.0.0", dst="255.255.255.255")
            / UDP(sport=68, dport=67)
            / BOOTP(op=1, chaddr=GUEST_MAC_B)
            / DHCP(options=[("message-type", "discover"), "end"])
        ),
    ]


async def test_every_truncation_of_valid_frames_is_dropped_quietly() -> None:
    net = make_net()
    await net.start()
    try:
        for frame in valid_frames():
            for n in range(len(frame)):
                feed_raw(net, frame[:n])
        drain(net)
        assert_clean(net)
        c = net.counters()
        assert c["dhcp_replies"] == 0 and c["arp_replies"] == 0 and c["tcp_conns"] == 0
    finally:
        await net.stop()


async def test_single_bit_flips_never_escape_and_bad_checksums_are_counted() -> None:
    net = make_net()
    await net.start()
    rng = random.Random(5)
    try:
        for frame in valid_frames():
            for _ in range(200):
                b = bytearray(frame)
                i = rng.randrange(14, len(b))
                b[i] ^= 1 << rng.randrange(8)
                feed_raw(net, bytes(b))
        drain(net)
        assert_clean(net)
        assert net.counters()["bad_checksum"] > 100
    finally:
        await net.stop()


# -- fragments ----------------------------------------------------------------------


def fragment(ident: int, offset: int, data: bytes, more: bool, proto: int = 17) -> bytes:
    frag = (0x2000 if more else 0) | (offset // 8)
    return eth(GW_MAC_B, GUEST_MAC_B, 0x0800, ip_packet(GUEST_IP, GW_IP, proto, data, ident=ident, frag=frag))


async def test_overlapping_fragments_drop_the_datagram() -> None:
    net = make_net()
    await net.start()
    try:
        udp = struct.pack("!HHHH", 1234, 9, 8 + 24, 0) + b"A" * 24
        feed_raw(net, fragment(1, 0, udp[:16], True))
        feed_raw(net, fragment(1, 8, b"B" * 16, True))  # overlaps bytes 8..16
        feed_raw(net, fragment(1, 16, udp[16:], False))
        assert net.counters()["frag_reassembled"] == 0
        assert net.counters()["frag_dropped"] >= 1
        assert len(net.reassembler) <= 1
        assert_clean(net)
    finally:
        await net.stop()


async def test_fragment_flood_stays_within_memory_bounds() -> None:
    net = make_net()
    await net.start()
    rng = random.Random(9)
    try:
        chunk = bytes(1480)
        for i in range(3000):
            feed_raw(net, fragment(i, rng.randrange(0, 60000) // 8 * 8, chunk, True))
            assert net.reassembler.buffered <= ipv4mod.MAX_BYTES
            assert len(net.reassembler) <= ipv4mod.MAX_DATAGRAMS
        # Oversized datagram (offset + length > 65535) is refused outright.
        feed_raw(net, fragment(70000 & 0xFFFF, 65528, chunk, False))
        assert_clean(net)
    finally:
        await net.stop()


async def test_incomplete_fragments_time_out() -> None:
    net = make_net()
    await net.start()
    try:
        feed_raw(net, fragment(5, 0, bytes(16), True))
        assert len(net.reassembler) == 1
        net.reassembler.expire(__import__("time").monotonic() + ipv4mod.TIMEOUT + 1)
        assert len(net.reassembler) == 0 and net.reassembler.buffered == 0
    finally:
        await net.stop()


# -- TCP floods and storms while a real transfer runs -----------------------------------


async def _transfer_during(net: UserNetwork, attack) -> None:
    """Run a 4 MB upload while ``attack(guest)`` runs; the upload must complete intact."""
    sink = Sink()
    srv, port = await serve(sink.handler)
    data = os.urandom(4 * MB)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await established(c)
        c.write(data)
        await attack(g, c, port)
        c.shutdown()
        await asyncio.wait_for(sink.done.wait(), 60)
        assert sink.hash.hexdigest() == hashlib.sha256(data).hexdigest()
    srv.close()
    assert_clean(net)


async def test_syn_flood_is_bounded_and_other_flows_keep_working() -> None:
    net = make_net()
    await net.start()
    try:

        async def idle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read()
            w.close()

        target, port2 = await serve(idle)

        async def flood(g: Guest, c, port: int) -> None:
            port = port2  # flood a different server than the one receiving the upload
            rng = random.Random(3)
            for i in range(3000):
                sport = rng.randrange(1024, 65535)
                g.link.to_stack(tcp_frame(GUEST_IP, sport, GW_IP, port, rng.getrandbits(32), 0, 2, 65535))
                if i % 200 == 0:
                    await asyncio.sleep(0)
                assert len(net.tcp.conns) <= tcp_nat.MAX_CONNS
                assert len(net.tcp._half_open) <= tcp_nat.MAX_HALF_OPEN
            assert net.counters()["tcp_syn_dropped"] > 0
            # A new, legitimate connection still gets through after the flood.
            fresh = g.connect(GW_IP, port)
            await established(fresh)
            fresh.abort()

        await _transfer_during(net, flood)
        target.close()
    finally:
        await net.stop()


async def test_rst_storm_with_wrong_sequence_numbers_does_not_kill_the_connection() -> None:
    net = make_net()
    await net.start()
    try:

        async def storm(g: Guest, c, port: int) -> None:
            rng = random.Random(4)
            for i in range(2000):
                seq = rng.getrandbits(32)
                if (seq - c.iss - c.snd_nxt) & 0xFFFFFFFF == 0:
                    continue
                g.link.to_stack(tcp_frame(GUEST_IP, c.lport, GW_IP, port, seq, 0, 4, 0))
                # RSTs for connections that do not exist, too
                g.link.to_stack(tcp_frame(GUEST_IP, rng.randrange(1, 65535), GW_IP, port, seq, 0, 4 | 16, 0))
                if i % 100 == 0:
                    await asyncio.sleep(0)
            assert c.state == "ESTABLISHED"

        await _transfer_during(net, storm)
        assert net.counters()["tcp_bad"] > 0
    finally:
        await net.stop()


async def test_zero_window_forever_connections_stay_bounded_while_others_work(monkeypatch) -> None:
    monkeypatch.setattr(tcpmod, "MAX_RTO", 0.3)
    net = make_net()
    await net.start()
    blob = os.urandom(16 * MB)

    async def firehose(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            w.write(blob)
            await w.drain()
        except ConnectionError:
            pass
        w.close()

    hose, hose_port = await serve(firehose)
    try:
        stuck: list = []

        async def stall(g: Guest, c, port: int) -> None:
            for _ in range(5):
                s = g.connect(GW_IP, hose_port)
                await established(s)
                s.window_override = 0
                s._send(16, s.snd_nxt)
                stuck.append(s)
            async with asyncio.timeout(20):  # until every stuck connection has stopped reading its host
                while not all(
                    k.host_paused
                    for k in net.tcp.conns.values()
                    if k.rport == hose_port and k.state == tcpmod.ESTABLISHED
                ):
                    await asyncio.sleep(0.05)

        await _transfer_during(net, stall)
        hosed = [k for k in net.tcp.conns.values() if k.rport == hose_port]
        assert len(hosed) == 5
        for k in hosed:
            assert k.state == tcpmod.ESTABLISHED
            assert k.send_queue() <= tcpmod.SNDBUF + 256 * 1024
            assert k.host_paused
    finally:
        hose.close()
        await net.stop()


async def test_out_of_order_flood_is_bounded() -> None:
    net = make_net()
    await net.start()
    try:
        async with connected_to_sink(net) as (g, c, sink):
            rng = random.Random(6)
            for _ in range(3000):
                off = rng.randrange(2, 400_000)
                g.link.to_stack(
                    tcp_frame(
                        GUEST_IP, c.lport, GW_IP, c.rport, c.iss + c.snd_nxt + off, c.irs + c.rcv_nxt, 16, 4096,
                        b"q" * 100,
                    )
                )  # fmt: skip
            [conn] = net.tcp.conns.values()
            assert len(conn._ooo) <= tcpmod.MAX_OOO_SEGMENTS
            assert conn._ooo_bytes <= tcpmod.RCVBUF
            c.write(b"real data")
            c.shutdown()
            await asyncio.wait_for(sink.done.wait(), 10)
        assert_clean(net)
    finally:
        await net.stop()


async def test_overlapping_out_of_order_segments_stay_within_the_receive_buffer() -> None:
    """Found by fuzzing: 60 KB segments starting a byte apart each fit the window, but 256 of
    them held 15 MB for one connection. What the out-of-order queue holds stays within one
    receive buffer, and the connection still carries the real data after."""
    net = make_net()
    await net.start()
    try:
        async with connected_to_sink(net) as (g, c, sink):
            for i in range(100, 400):  # past the real data below, which then leaves a gap before them
                g.link.to_stack(
                    tcp_frame(
                        GUEST_IP, c.lport, GW_IP, c.rport, c.iss + c.snd_nxt + i, c.irs + c.rcv_nxt, 16, 0xFFFF,
                        bytes(60000),
                    )
                )  # fmt: skip
            [conn] = net.tcp.conns.values()
            assert 0 < conn._ooo_bytes <= tcpmod.RCVBUF
            c.write(b"real data")
            c.shutdown()
            await asyncio.wait_for(sink.done.wait(), 10)
        assert sink.n == len(b"real data")
        assert_clean(net)
    finally:
        await net.stop()


async def test_memory_stays_bounded_under_mixed_floods() -> None:
    """Fragments, SYNs, junk TCP and UDP from a hostile guest: the stack's heap growth stays small."""
    import gc
    import tracemalloc

    net = make_net()
    await net.start()
    rng = random.Random(11)
    tracemalloc.start()
    try:
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(6000):
            kind = i % 4
            if kind == 0:
                feed_raw(net, fragment(rng.getrandbits(16), rng.randrange(0, 8000) * 8, bytes(1024), True))
            elif kind == 1:
                feed_raw(net, tcp_frame(GUEST_IP, rng.randrange(1, 65535), GW_IP, 9, rng.getrandbits(32), 0, 2, 1000))
            elif kind == 2:
                feed_raw(net, tcp_frame(GUEST_IP, rng.randrange(1, 65535), GW_IP, 9, rng.getrandbits(32),
                                        rng.getrandbits(32), 0x18, 1000, bytes(rng.randrange(1, 1400))))  # fmt: skip
            else:
                udp = struct.pack("!HHHH", rng.randrange(1000, 1050), 9, 8 + 64, 0) + bytes(64)
                feed_raw(net, eth(GW_MAC_B, GUEST_MAC_B, 0x0800, ip_packet(GUEST_IP, GW_IP, 17, udp)))
            if i % 500 == 0:
                await asyncio.sleep(0.01)
                drain(net)
        await asyncio.sleep(0.1)
        drain(net)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
        assert grown < 8 * MB, f"heap grew by {grown} bytes"
        assert net.reassembler.buffered <= ipv4mod.MAX_BYTES
        assert_clean(net)
    finally:
        tracemalloc.stop()
        await net.stop()


async def test_frames_sent_from_the_gateways_own_mac_are_dropped_and_not_learnt() -> None:
    # A guest that spoofs the gateway's MAC as its source must not become "the guest" at that
    # address: the stack would then address every reply to itself.
    net = UserNetwork(UserNetConfig.from_string("user,id=n0"))
    await net.start()
    sent: list[bytes] = []
    net.set_ready_callback(lambda: _take_all(net, sent))
    try:
        spoof = Ether(src="52:55:0a:00:02:02", dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc="52:55:0a:00:02:02", psrc="10.0.2.15", pdst="10.0.2.2"
        )
        net.send([memoryview(bytes(spoof))])
        await asyncio.sleep(0.01)
        assert sent == [] and net.counters()["not_for_us"] == 1
        assert net.arp_table.lookup(bytes([10, 0, 2, 15])) is None
        real = Ether(src="52:54:00:12:34:56", dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc="52:54:00:12:34:56", psrc="10.0.2.15", pdst="10.0.2.2"
        )
        net.send([memoryview(bytes(real))])
        await asyncio.sleep(0.01)
        assert len(sent) == 1 and Ether(sent[0])[ARP].op == 2 and Ether(sent[0]).dst == "52:54:00:12:34:56"
    finally:
        await net.stop()


def _take_all(net: UserNetwork, out: list[bytes]) -> None:
    buf = bytearray(2048)
    while (n := net.recv_into([memoryview(buf)])) > 0:
        out.append(bytes(buf[:n]))
