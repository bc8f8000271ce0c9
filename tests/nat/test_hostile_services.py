"""A hostile guest against the stack's own services: DHCP, DNS, TFTP, fragments, ICMP, IPv6, UDP, ARP.

Each strategy builds a well-formed message of its protocol and mutates one or a
few fields (a bad option length, a compression loop, a path out of the root...),
so the parsers get past their first checks. After every example: no internal
error was caught at the frame boundary (``errors`` stays 0), the service's
tables are within their bounds, and a normal exchange of the same service
still works. Concrete findings are kept below as named tests with the frame
that triggered them.

Only loopback is ever contacted: the DNS upstream is a server of this test on
127.0.0.1, UDP goes to the gateway address (the host's loopback), and IPv6 and
ICMP destinations are the stack's own addresses or loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.nat import UserNetConfig, UserNetwork, udp_nat
from appliance.nat import arp as arpmod
from appliance.nat import dhcp as dhcpmod
from appliance.nat import dns as dnsmod
from appliance.nat import ipv4 as ipv4mod
from appliance.nat import tftp as tftpmod

from .conftest import drain
from .peer import GUEST_IP, GUEST_MAC, GW_IP, GW_MAC, csum, eth

DNS_IP = bytes([10, 0, 2, 3])
BCAST_MAC = b"\xff" * 6
ZERO4 = bytes(4)
OTHER_MACS = [GUEST_MAC, b"\x52\x54\x00\xaa\xbb\x01", b"\x52\x54\x00\xaa\xbb\x02", b"\x02\x00\x00\x00\x00\x03"]
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- frame builders (independent of the stack's own) ------------------------------------


def ip4(src: bytes, dst: bytes, proto: int, payload: bytes, *, ident: int = 0, frag: int = 0x4000,
        ttl: int = 64) -> bytes:  # fmt: skip
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, ttl, proto, 0, src, dst))
    struct.pack_into("!H", hdr, 10, csum(bytes(hdr)))
    return bytes(hdr) + payload


def udp_frame(src: bytes, sport: int, dst: bytes, dport: int, payload: bytes, *, src_mac: bytes = GUEST_MAC,
              dst_mac: bytes = GW_MAC) -> bytes:  # fmt: skip
    u = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    struct.pack_into("!H", u, 6, csum(struct.pack("!4s4sBBH", src, dst, 0, 17, len(u)) + bytes(u)) or 0xFFFF)
    return eth(dst_mac, src_mac, 0x0800, ip4(src, dst, 17, bytes(u)))


def icmp_frame(src: bytes, dst: bytes, msg: bytes, **kw: int) -> bytes:
    m = bytearray(msg)
    m[2:4] = b"\0\0"
    struct.pack_into("!H", m, 2, csum(bytes(m)))
    return eth(GW_MAC, GUEST_MAC, 0x0800, ip4(src, dst, 1, bytes(m), **kw))


def feed(net: UserNetwork, frame: bytes) -> None:
    assert net.send([memoryview(frame)]) is True


def assert_clean(net: UserNetwork) -> None:
    c = net.counters()
    assert c["errors"] == 0, "an internal error was caught at the frame boundary"
    assert net.queued() <= net.queue_limit


def udp_replies(frames: list[bytes], dport: int) -> list[tuple[bytes, int, bytes]]:
    """(source address, source port, payload) of every IPv4/UDP frame to ``dport``."""
    out = []
    for f in frames:
        if len(f) < 42 or f[12:14] != b"\x08\x00" or f[23] != 17:
            continue
        ihl = (f[14] & 15) * 4
        u = f[14 + ihl :]
        sport, dp, length = struct.unpack_from("!HHH", u)
        if dp == dport:
            out.append((f[26:30], sport, u[8:length]))
    return out


async def new_net(text: str = "user", **replace: object) -> UserNetwork:
    cfg = dataclasses.replace(UserNetConfig.from_string(text), **replace)
    if cfg.nameservers is None:
        cfg = dataclasses.replace(cfg, nameservers=(("127.0.0.1", 9),))
    n = UserNetwork(cfg)
    await n.start()
    return n


# -- DHCP --------------------------------------------------------------------------------

_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s4s")


def bootp(msg_opts: bytes, *, chaddr: bytes = GUEST_MAC, xid: int = 7, flags: int = 0, ciaddr: bytes = ZERO4,
          op: int = 1, htype: int = 1, hlen: int = 6, magic: bytes = dhcpmod.MAGIC) -> bytes:  # fmt: skip
    return _BOOTP.pack(op, htype, hlen, 0, xid, 0, flags, ciaddr, ZERO4, ZERO4, ZERO4, chaddr.ljust(16, b"\0"),
                       bytes(64), bytes(128), magic) + msg_opts  # fmt: skip


def opt(code: int, value: bytes) -> bytes:
    return bytes([code, len(value)]) + value


def dhcp_to_server(payload: bytes, *, src: bytes = ZERO4, dst: bytes = b"\xff\xff\xff\xff") -> bytes:
    return udp_frame(src, 68, dst, 67, payload, dst_mac=BCAST_MAC if dst[0] == 255 else GW_MAC)


def dhcp_replies(net: UserNetwork) -> list[tuple[int, bytes, dict[int, bytes]]]:
    """(message type, yiaddr, options) of every DHCP reply queued for the guest."""
    out = []
    for _src, _sport, body in udp_replies(drain(net), 68):
        yiaddr = body[16:20]
        opts: dict[int, bytes] = {}
        i = _BOOTP.size
        while i < len(body) and body[i] != 255:
            if body[i] == 0:
                i += 1
                continue
            opts[body[i]] = body[i + 2 : i + 2 + body[i + 1]]
            i += 2 + body[i + 1]
        out.append((opts[53][0], yiaddr, opts))
    return out


def normal_dhcp_exchange(net: UserNetwork, mac: bytes = GUEST_MAC) -> bytes:
    """DISCOVER, OFFER, REQUEST, ACK for ``mac``; the address leased."""
    drain(net)
    feed(net, dhcp_to_server(bootp(opt(53, b"\1") + b"\xff", chaddr=mac, xid=0x5150)))
    offers = [r for r in dhcp_replies(net) if r[0] == dhcpmod.OFFER]
    assert offers, "no OFFER after the storm"
    ip = offers[0][1]
    feed(net, dhcp_to_server(bootp(opt(53, b"\3") + opt(50, ip) + opt(54, GW_IP) + b"\xff", chaddr=mac, xid=0x5151)))
    acks = [r for r in dhcp_replies(net) if r[0] == dhcpmod.ACK]
    assert acks and acks[0][1] == ip, "no ACK after the storm"
    return ip


POOL_ADDRS = [bytes([10, 0, 2, 15 + i]) for i in range(18)]
ADDRS = st.sampled_from([*POOL_ADDRS, GW_IP, DNS_IP, ZERO4, b"\xff" * 4, bytes([10, 0, 2, 255]), bytes([8, 8, 8, 8])])


@st.composite
def dhcp_option(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["type", "req", "sid", "overload", "params", "random", "pad", "empty"]))
    if kind == "type":
        return opt(53, bytes([draw(st.integers(0, 12))]))
    if kind == "req":
        return opt(50, draw(ADDRS)[: draw(st.sampled_from([4, 4, 3, 0]))])
    if kind == "sid":
        return opt(54, draw(ADDRS))
    if kind == "overload":
        return opt(52, bytes([draw(st.integers(0, 255))]))
    if kind == "params":
        return opt(55, draw(st.binary(min_size=0, max_size=255)))
    if kind == "pad":
        return bytes(draw(st.integers(1, 40)))
    if kind == "empty":
        return bytes([draw(st.integers(1, 254)), 0])
    return opt(draw(st.integers(1, 254)), draw(st.binary(max_size=60)))


@st.composite
def dhcp_message(draw: st.DrawFn) -> bytes:
    mtype = draw(st.sampled_from([1, 3, 4, 7, 8, 1, 3]))
    opts = [opt(53, bytes([mtype]))] + draw(st.lists(dhcp_option(), max_size=6))
    opts = draw(st.permutations(opts))
    body = b"".join(opts)
    tail = draw(st.sampled_from(["end", "none", "badlen", "end+junk", "huge"]))
    if tail == "end":
        body += b"\xff"
    elif tail == "badlen":
        body += bytes([draw(st.integers(1, 254)), draw(st.integers(1, 255))]) + b"x"
    elif tail == "end+junk":
        body += b"\xff" + draw(st.binary(max_size=30))
    elif tail == "huge":
        body += opt(55, bytes(range(1, 255))) * draw(st.integers(1, 4)) + b"\xff"
    head = dict(
        chaddr=draw(st.sampled_from(OTHER_MACS)),
        xid=draw(st.integers(0, 2**32 - 1)),
        flags=draw(st.sampled_from([0, 0x8000, 0xFFFF])),
        ciaddr=draw(ADDRS),
    )
    mutate = draw(st.sampled_from(["none"] * 6 + ["op", "hlen", "htype", "magic", "short"]))
    if mutate == "op":
        head["op"] = 2
    elif mutate == "hlen":
        head["hlen"] = draw(st.sampled_from([0, 5, 16, 255]))
    elif mutate == "htype":
        head["htype"] = 6
    elif mutate == "magic":
        head["magic"] = b"\x63\x82\x53\x64"
    msg = bootp(body, **head)  # type: ignore[arg-type]
    if mutate == "short":
        msg = msg[: draw(st.integers(0, len(msg) - 1))]
    return msg


@SETTINGS
@given(storm=st.lists(st.tuples(dhcp_message(), st.booleans()), min_size=1, max_size=8))
async def test_dhcp_messages_with_one_field_wrong_never_escape_and_leasing_still_works(
    storm: list[tuple[bytes, bool]],
) -> None:
    net = await new_net()
    try:
        for msg, unicast in storm:
            if unicast:  # a renewal from a configured address, to the server
                feed(net, dhcp_to_server(msg, src=GUEST_IP, dst=GW_IP))
            else:
                feed(net, dhcp_to_server(msg))
        drain(net)
        assert_clean(net)
        assert len(net.dhcp.leases) <= dhcpmod.POOL_SIZE
        assert normal_dhcp_exchange(net) in POOL_ADDRS
        assert_clean(net)
    finally:
        await net.stop()


async def test_dhcp_lease_table_stays_bounded_as_offers_to_many_macs_expire(monkeypatch) -> None:
    """Finding: every OFFER to a new MAC added a table entry that stayed after it expired.

    A guest sending DISCOVERs from ever new client hardware addresses got a
    fresh OFFER (and a fresh entry) each time an earlier offer lapsed (60 s):
    the table grew without limit. Frame: DISCOVER, chaddr 02:00:00:00:xx:xx.
    """
    net = await new_net()
    clock = [1000.0]
    monkeypatch.setattr(dhcpmod.DhcpServer, "_now", staticmethod(lambda: clock[0]))
    try:
        for i in range(400):
            mac = b"\x02\x00\x00\x00" + struct.pack("!H", i)
            feed(net, dhcp_to_server(bootp(opt(53, b"\1") + b"\xff", chaddr=mac)))
            if i % dhcpmod.POOL_SIZE == dhcpmod.POOL_SIZE - 1:
                clock[0] += 61  # every offer so far has lapsed
        drain(net)
        assert len(net.dhcp.leases) <= dhcpmod.POOL_SIZE
        assert_clean(net)
    finally:
        await net.stop()


async def test_dhcp_decline_storm_does_not_take_the_pool_forever(monkeypatch) -> None:
    """Finding: a DECLINE took its address out of the pool for the life of the stack.

    A guest taking each address and declining it (REQUEST then DECLINE for
    10.0.2.15..30) left no address to lease to anyone ever again. Declined
    addresses now come back after ``DECLINE_HOLD`` seconds.
    """
    net = await new_net()
    clock = [1000.0]
    monkeypatch.setattr(dhcpmod.DhcpServer, "_now", staticmethod(lambda: clock[0]))
    try:
        for ip in POOL_ADDRS[: dhcpmod.POOL_SIZE]:
            feed(net, dhcp_to_server(bootp(opt(53, b"\3") + opt(50, ip) + opt(54, GW_IP) + b"\xff")))
            feed(net, dhcp_to_server(bootp(opt(53, b"\4") + opt(50, ip) + opt(54, GW_IP) + b"\xff")))
        drain(net)
        feed(net, dhcp_to_server(bootp(opt(53, b"\1") + b"\xff")))
        assert dhcp_replies(net) == []  # every address declined just now: silence (RFC 2131 §4.3.1)
        clock[0] += dhcpmod.DECLINE_HOLD + 1
        assert normal_dhcp_exchange(net) == POOL_ADDRS[0]
        assert_clean(net)
    finally:
        await net.stop()


# -- DNS ---------------------------------------------------------------------------------


class Upstream(asyncio.DatagramProtocol):
    """A loopback resolver for the test: answers every datagram by echoing it as a response."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
        self.got.append(data)
        if len(data) >= 12:
            self.transport.sendto(data[:2] + b"\x81\x80" + data[4:], addr)


async def dns_setup() -> tuple[UserNetwork, Upstream, asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    transport, upstream = await loop.create_datagram_endpoint(Upstream, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    net = await new_net("user,domainname=lab.test", nameservers=(("127.0.0.1", port),))
    return net, upstream, transport


def qname(*labels: bytes) -> bytes:
    return b"".join(bytes([len(lab)]) + lab for lab in labels) + b"\0"


def dns_msg(name: bytes, *, qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0,
            ar: int = 0, qtype: int = 1, qclass: int = 1, extra: bytes = b"") -> bytes:  # fmt: skip
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar) + name + struct.pack("!HH", qtype, qclass) + extra


LABELS = st.lists(st.binary(min_size=1, max_size=63).filter(lambda b: b"." not in b), min_size=0, max_size=5)


@st.composite
def dns_query(draw: st.DrawFn) -> bytes:
    labels = draw(LABELS)
    kind = draw(
        st.sampled_from(
            [
                "ok",
                "long_label",
                "long_name",
                "loop",
                "pointer",
                "truncate",
                "qd",
                "edns",
                "flags",
                "local",
                "dot_label",
            ]
        )  # fmt: skip
    )
    name = qname(*labels)
    fields: dict[str, int] = {}
    extra = b""
    if kind == "long_label":
        n = draw(st.integers(64, 255))
        name = bytes([n]) + b"a" * draw(st.integers(0, n + 2)) + b"\0"
    elif kind == "long_name":
        name = qname(*[b"a" * 63] * draw(st.integers(4, 130)))
    elif kind == "loop":
        name = b"\xc0\x0c"  # points at itself (offset 12)
    elif kind == "pointer":
        name = qname(*labels)[:-1] + struct.pack("!H", 0xC000 | draw(st.integers(0, 0x3FFF)))
    elif kind == "qd":
        fields["qd"] = draw(st.sampled_from([0, 2, 65535]))
        fields["an"] = draw(st.sampled_from([0, 65535]))
    elif kind == "edns":
        rdlen = draw(st.integers(0, 20))
        rdata = draw(st.binary(max_size=24))
        extra = b"\0" + struct.pack("!HHIH", 41, draw(st.integers(0, 65535)), 0, rdlen) + rdata
        fields["ar"] = draw(st.sampled_from([1, 1, 0, 2]))
    elif kind == "flags":
        fields["flags"] = draw(st.integers(0, 0xFFFF))
    elif kind == "local":
        name = qname(*draw(st.sampled_from([[b"gateway"], [b"HOST"], [b"dns", b"lab", b"test"]])))
        fields["qtype"] = draw(st.sampled_from([1, 28, 255, 5, 0]))
        fields["qclass"] = draw(st.sampled_from([1, 3, 255, 0]))
    elif kind == "dot_label":
        name = qname(b"gateway.lab", b"test")
    msg = dns_msg(name, qid=draw(st.integers(0, 0xFFFF)), extra=extra, **fields)
    if kind == "truncate":
        msg = msg[: draw(st.integers(0, len(msg)))]
    return msg


async def normal_dns_query(net: UserNetwork, upstream: Upstream) -> None:
    drain(net)
    feed(net, udp_frame(GUEST_IP, 5353, DNS_IP, 53, dns_msg(qname(b"www", b"example", b"com"), qid=0xA1A1)))
    async with asyncio.timeout(5):
        while True:
            got = [p for _s, _p, p in udp_replies(drain(net), 5353) if p[:2] == b"\xa1\xa1"]
            if got:
                break
            await asyncio.sleep(0.002)
    feed(net, udp_frame(GUEST_IP, 5354, DNS_IP, 53, dns_msg(qname(b"gateway"), qid=0xB2B2)))
    [(src, sport, reply)] = udp_replies(drain(net), 5354)
    assert src == DNS_IP and sport == 53 and reply[:2] == b"\xb2\xb2" and reply[-4:] == GW_IP


@settings(max_examples=100, deadline=None)
@given(queries=st.lists(dns_query(), min_size=1, max_size=6), sport=st.sampled_from([53, 1000, 0, 65535]))
async def test_dns_queries_with_one_field_wrong_never_escape_and_resolving_still_works(
    queries: list[bytes], sport: int
) -> None:
    net, upstream, transport = await dns_setup()
    try:
        for q in queries:
            feed(net, udp_frame(GUEST_IP, sport, DNS_IP, 53, q))
        await asyncio.sleep(0)
        drain(net)
        assert_clean(net)
        assert net.dns.pending() <= dnsmod.MAX_PENDING
        for wire in upstream.got:
            assert len(wire) >= 12 and wire[4:6] == b"\0\1"  # only one-question queries leave
        await normal_dns_query(net, upstream)
        assert_clean(net)
    finally:
        await net.stop()
        transport.close()


async def test_dns_names_longer_than_255_octets_are_refused_not_forwarded() -> None:
    """Finding: a query name of 127 63-octet labels (8 KB, RFC 1035 §2.3.4 allows 255) was forwarded upstream."""
    net, upstream, transport = await dns_setup()
    try:
        feed(net, udp_frame(GUEST_IP, 5353, DNS_IP, 53, dns_msg(qname(*[b"a" * 63] * 5))))
        await asyncio.sleep(0.05)
        assert upstream.got == [] and net.counters()["dns_dropped"] == 1
        await normal_dns_query(net, upstream)
    finally:
        await net.stop()
        transport.close()


async def test_dns_a_label_holding_dots_is_not_a_local_name() -> None:
    """Finding: the one label 'gateway.lab' then 'test' was answered as the local name gateway.lab.test.

    Labels were joined with dots before the lookup, so a label containing a
    dot matched a different, local, name. Such a query now goes upstream.
    """
    net, upstream, transport = await dns_setup()
    try:
        feed(net, udp_frame(GUEST_IP, 5353, DNS_IP, 53, dns_msg(qname(b"gateway.lab", b"test"))))
        assert net.counters()["dns_local"] == 0
        await asyncio.sleep(0.05)
        assert len(upstream.got) == 1
    finally:
        await net.stop()
        transport.close()


async def test_dns_local_names_answer_only_standard_class_in_queries() -> None:
    """Finding: 'gateway' asked with opcode UPDATE or class CHAOS got an IN A record back.

    Frames: opcode 5 (flags 0x2800) and qclass 3, each for 'gateway'. The
    local table knows class IN names for standard queries; the rest goes upstream.
    """
    net, upstream, transport = await dns_setup()
    try:
        feed(net, udp_frame(GUEST_IP, 5353, DNS_IP, 53, dns_msg(qname(b"gateway"), flags=0x2800)))
        feed(net, udp_frame(GUEST_IP, 5353, DNS_IP, 53, dns_msg(qname(b"gateway"), qclass=3)))
        assert net.counters()["dns_local"] == 0
        await asyncio.sleep(0.05)
        assert len(upstream.got) == 2
        feed(net, udp_frame(GUEST_IP, 5354, DNS_IP, 53, dns_msg(qname(b"gateway"), qclass=255)))
        assert net.counters()["dns_local"] == 1
    finally:
        await net.stop()
        transport.close()


# -- TFTP --------------------------------------------------------------------------------

SECRET = b"SECRET-OUTSIDE-THE-ROOT"


@pytest.fixture(scope="module")
def tftp_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tftp")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "f").write_bytes(os.urandom(3000))
    (root / "sub" / "g").write_bytes(b"inside" * 10)
    (root / "empty").write_bytes(b"")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET * 40)
    (base / "secret").write_bytes(SECRET * 40)
    (root / "escape").symlink_to(base / "secret")
    (root / "escape_dir").symlink_to(outside)
    (root / "loop").symlink_to(root / "loop")
    (root / "inner").symlink_to(root / "sub" / "g")
    os.mkfifo(root / "fifo")
    # tftp= itself may name a symlink to the directory served.
    (base / "rootlink").symlink_to(root)
    return base


TFTP_NAMES = st.sampled_from([
    "f", "/f", "//f", "sub/g", "/sub/g", "sub//g", "inner", "empty", "missing", "sub", "sub/", "/",
    "..", "../secret", "/../secret", "sub/../../secret", "./f", "sub/./g", "escape", "escape_dir/secret",
    "/escape_dir/secret", "loop", "fifo", "f/..", "...", "..\\secret", "../root/f", "a" * 300, "a/" * 200 + "f",
    f"{'../' * 20}etc/passwd", "/etc/passwd", "rootlink/f",
])  # fmt: skip
TFTP_OPTS = st.lists(
    st.tuples(
        st.sampled_from(["blksize", "tsize", "timeout", "BLKSIZE", "windowsize", "x", ""]),
        st.sampled_from(
            [
                "0",
                "1",
                "7",
                "8",
                "512",
                "1468",
                "65464",
                "65535",
                "99999999999",
                "4294967296",
                "-1",
                "",
                "abc",
                "1e3",
                "0" * 30,
                "255",
                "256",
            ]
        ),  # fmt: skip
    ),
    max_size=4,
)


@st.composite
def tftp_packet(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["rrq", "rrq", "rrq", "ack", "ack", "error", "wrq", "data", "oack", "junk", "badrrq"]))
    if kind == "rrq":
        name = draw(TFTP_NAMES)
        mode = draw(st.sampled_from(["octet", "OCTET", "netascii", "mail", ""]))
        words = [name, mode] + [w for pair in draw(TFTP_OPTS) for w in pair]
        return b"\0\1" + b"".join(w.encode() + b"\0" for w in words)
    if kind == "badrrq":
        return b"\0\1" + draw(st.binary(max_size=80))
    if kind == "ack":
        return struct.pack("!HH", 4, draw(st.sampled_from([0, 1, 2, 3, 5, 7, 0xFFFF])))[
            : draw(st.sampled_from([4, 4, 3]))
        ]
    if kind == "error":
        return struct.pack("!HH", 5, draw(st.integers(0, 9))) + draw(st.binary(max_size=10))
    if kind == "wrq":
        return b"\0\2f\0octet\0"
    if kind == "data":
        return b"\0\3\0\1" + draw(st.binary(max_size=20))
    if kind == "oack":
        return b"\0\6blksize\0512\0"
    return draw(st.binary(max_size=20))


@settings(max_examples=150, deadline=None)
@given(packets=st.lists(st.tuples(tftp_packet(), st.sampled_from([2000, 2001, 2002])), min_size=1, max_size=12),
       via_link=st.booleans())  # fmt: skip
def test_tftp_never_reads_outside_the_root_and_never_escapes(
    tftp_tree: Path, packets: list[tuple[bytes, int]], via_link: bool
) -> None:
    asyncio.run(_tftp_storm(tftp_tree, packets, via_link))


async def _tftp_storm(base: Path, packets: list[tuple[bytes, int]], via_link: bool) -> None:
    root = base / ("rootlink" if via_link else "root")
    fds = len(os.listdir("/proc/self/fd"))
    net = await new_net(f"user,tftp={root}")
    try:
        sent: list[bytes] = []
        for pkt, port in packets:
            feed(net, udp_frame(GUEST_IP, port, GW_IP, 69, pkt))
            sent += [p for _s, _p, p in udp_replies(drain(net), port)]
        tftp = net.tftp
        assert tftp is not None
        for now in (time.monotonic() + 1.5, time.monotonic() + 3):  # retransmissions
            tftp.expire(now)
            sent += [p for port in (2000, 2001, 2002) for _s, _p, p in udp_replies(drain(net), port)]
        for p in sent:
            assert SECRET not in p
            assert len(p) <= 4 + tftpmod.MAX_BLKSIZE
            assert p[:2] in (b"\0\3", b"\0\5", b"\0\6")
        assert len(tftp) <= tftpmod.MAX_SESSIONS
        assert_clean(net)
        # A plain read from a new port still works.
        feed(net, udp_frame(GUEST_IP, 3000, GW_IP, 69, b"\0\1sub/g\0octet\0"))
        [data] = [p for _s, _p, p in udp_replies(drain(net), 3000)]
        assert data == b"\0\3\0\1" + b"inside" * 10
    finally:
        await net.stop()
    assert len(os.listdir("/proc/self/fd")) <= fds


async def test_tftp_repeated_options_are_answered_once(tftp_tree: Path) -> None:
    """Finding: RRQ f octet blksize 512 blksize 1024 got an OACK naming blksize twice (RFC 2347: each once)."""
    net = await new_net(f"user,tftp={tftp_tree / 'root'}")
    try:
        rrq = b"\0\1" + b"\0".join(
            [b"f", b"octet", b"blksize", b"512", b"blksize", b"1024", b"tsize", b"0", b"TSIZE", b"0", b""]
        )
        feed(net, udp_frame(GUEST_IP, 2000, GW_IP, 69, rrq))
        [(_s, _p, oack)] = udp_replies(drain(net), 2000)
        assert oack == b"\0\6" + b"\0".join([b"blksize", b"512", b"tsize", b"3000", b""])
        assert_clean(net)
    finally:
        await net.stop()


async def test_tftp_does_not_open_special_files(tftp_tree: Path, monkeypatch) -> None:
    """Finding: a name of a FIFO (or device) below the root was opened before being found not a file.

    Opening is itself an action on a device or FIFO; a regular file is
    checked for first, and what was opened is checked again.
    """
    opened: list[str] = []
    real_open = os.open

    def spy(path, *a, **kw):  # type: ignore[no-untyped-def]
        opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(tftpmod.os, "open", spy)
    net = await new_net(f"user,tftp={tftp_tree / 'root'}")
    try:
        feed(net, udp_frame(GUEST_IP, 2000, GW_IP, 69, b"\0\1fifo\0octet\0"))
        [(_s, _p, err)] = udp_replies(drain(net), 2000)
        assert err[:2] == b"\0\5"
        assert not [p for p in opened if p.endswith("fifo")]
    finally:
        await net.stop()


# -- IPv4 fragments ----------------------------------------------------------------------


def frag_frame(ident: int, offset: int, data: bytes, more: bool, proto: int = 1, dst: bytes = GW_IP) -> bytes:
    frag = (0x2000 if more else 0) | (offset // 8)
    return eth(GW_MAC, GUEST_MAC, 0x0800, ip4(GUEST_IP, dst, proto, data, ident=ident, frag=frag))


FRAGMENT = st.tuples(
    st.integers(0, 5),  # ident
    st.one_of(st.integers(0, 8191).map(lambda o: o * 8), st.sampled_from([0, 8, 1480, 65528, 65520])),
    st.one_of(st.integers(0, 24), st.sampled_from([1480, 1472, 8, 4000])),
    st.booleans(),
    st.sampled_from([1, 17, 6, 99]),
)


@SETTINGS
@given(frags=st.lists(FRAGMENT, min_size=1, max_size=60))
async def test_arbitrary_fragment_sequences_stay_bounded_and_never_escape(
    frags: list[tuple[int, int, int, bool, int]],
) -> None:
    net = await new_net()
    r = net.reassembler
    try:
        for ident, offset, n, more, proto in frags:
            feed(net, frag_frame(ident, offset, bytes([ident]) * n, more, proto))
            assert r.buffered <= ipv4mod.MAX_BYTES and len(r) <= ipv4mod.MAX_DATAGRAMS
            assert all(len(p.pieces) <= ipv4mod.MAX_FRAGMENTS for p in r._partial.values())
        drain(net)
        assert_clean(net)
        await _ping_gateway_fragmented(net, os.urandom(3000), ident=0x7777)
    finally:
        await net.stop()


async def _ping_gateway_fragmented(net: UserNetwork, data: bytes, ident: int, order: list[int] | None = None,
                                   dup: list[int] = (), step: int = 1480) -> None:  # type: ignore[assignment]  # fmt: skip
    msg = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x42, 1) + data)
    struct.pack_into("!H", msg, 2, csum(bytes(msg)))
    pieces = [(off, bytes(msg[off : off + step])) for off in range(0, len(msg), step)]
    order = order if order is not None else list(range(len(pieces)))
    drain(net)
    for i in [*order, *dup]:
        off, chunk = pieces[i]
        feed(net, frag_frame(ident, off, chunk, off + step < len(msg)))
    replies = drain(net)
    # The reply (its size over the MTU) comes back in fragments: put them together.
    body = b"".join(f[34:] for f in replies if f[12:14] == b"\x08\x00" and f[23] == 1)
    assert body[0] == 0 and body[8:] == data


@SETTINGS
@given(data=st.binary(min_size=1500, max_size=9000), seed=st.integers(0, 1000), dups=st.integers(0, 3))
async def test_fragments_in_any_order_with_duplicates_reassemble_exactly_once(
    data: bytes, seed: int, dups: int
) -> None:
    net = await new_net()
    try:
        n = -(-(len(data) + 8) // 1480)
        order = list(range(n))
        rng = random.Random(seed)
        rng.shuffle(order)
        dup = [rng.randrange(n - 1) for _ in range(dups)] if n > 1 else []
        await _ping_gateway_fragmented(net, data, 99, order, [i for i in dup if i not in order[-1:]])
        assert net.counters()["frag_reassembled"] == 1
        assert_clean(net)
    finally:
        await net.stop()


async def test_tiny_fragment_flood_caps_pieces_per_datagram() -> None:
    """Finding: 8-byte fragments of one datagram were all kept (up to 8191 of them).

    Each new one was checked for overlap against every piece held, so a
    datagram made of 8-byte fragments cost quadratic time, and each piece's
    object overhead (several times its 8 bytes) was not counted against the
    byte budget. Frame: ICMP, ident 1, MF, offsets 0, 16, 32, ... 8 bytes each.
    """
    net = await new_net()
    r = net.reassembler
    try:
        t0 = time.process_time()
        for i in range(4000):
            feed(net, frag_frame(1, i * 16, bytes(8), True))
        spent = time.process_time() - t0
        assert all(len(p.pieces) <= ipv4mod.MAX_FRAGMENTS for p in r._partial.values())
        assert net.counters()["frag_dropped"] >= 1
        assert spent < 5.0
        await _ping_gateway_fragmented(net, bytes(2000), ident=2)
        assert_clean(net)
    finally:
        await net.stop()


async def test_largest_echo_in_1232_byte_fragments_is_answered() -> None:
    """A 65507-byte echo over a 1280-byte MTU path is 54 fragments: within ``MAX_FRAGMENTS``."""
    net = await new_net()
    try:
        await _ping_gateway_fragmented(net, os.urandom(65507 - 8), ident=5, step=1232)
        assert net.counters()["frag_reassembled"] == 1
        assert_clean(net)
    finally:
        await net.stop()


async def test_fragment_past_64k_is_refused_and_others_keep_working() -> None:
    net = await new_net()
    try:
        feed(net, frag_frame(3, 0, bytes(1480), True))
        feed(net, frag_frame(3, 65528, bytes(16), False))  # 65528 + 16 + 20 > 65535
        assert len(net.reassembler) == 0
        await _ping_gateway_fragmented(net, bytes(5000), ident=4)
        assert_clean(net)
    finally:
        await net.stop()


# -- ICMP --------------------------------------------------------------------------------


@st.composite
def icmp_message(draw: st.DrawFn) -> bytes:
    typ = draw(st.sampled_from([0, 3, 4, 5, 8, 8, 11, 12, 13, 17, 255]))
    code = draw(st.integers(0, 255))
    if typ in (3, 4, 5, 11, 12):  # an error: quote an IP header that may be nonsense
        inner = bytearray(draw(st.binary(min_size=0, max_size=60)))
        if draw(st.booleans()) and len(inner) >= 20:
            inner[0] = draw(st.sampled_from([0x45, 0x4F, 0x40, 0x65, 0x00]))
        return struct.pack("!BBHI", typ, code, 0, 0) + bytes(inner)
    return struct.pack("!BBHHH", typ, code, 0, draw(st.integers(0, 0xFFFF)), 1) + draw(st.binary(max_size=1400))


@SETTINGS
@given(msgs=st.lists(st.tuples(icmp_message(), st.sampled_from([GW_IP, DNS_IP, bytes([10, 0, 2, 255]),
                                                                bytes([255] * 4), bytes([10, 0, 2, 99])])),
                     min_size=1, max_size=8))  # fmt: skip
async def test_icmp_errors_with_bogus_quotes_and_odd_echoes_never_escape(msgs: list[tuple[bytes, bytes]]) -> None:
    net = await new_net()
    try:
        for msg, dst in msgs:
            feed(net, icmp_frame(GUEST_IP, dst, msg))
        drain(net)
        assert_clean(net)
        assert len(net.icmp.flows()) == 0  # nothing here is for a host ping socket
        feed(net, icmp_frame(GUEST_IP, GW_IP, struct.pack("!BBHHH", 8, 0, 0, 5, 5) + b"ok"))
        [reply] = drain(net)
        assert reply[34] == 0 and reply[-2:] == b"ok"
    finally:
        await net.stop()


# -- IPv6 --------------------------------------------------------------------------------

GUEST6 = bytes.fromhex("fec0" + "00" * 12 + "0015")
LL_GUEST = bytes.fromhex("fe80" + "00" * 12 + "0015")
ROUTER6 = bytes.fromhex("fec0" + "00" * 12 + "0002")
LL_ROUTER = bytes.fromhex("fe80" + "00" * 12 + "0002")
ALL_ROUTERS = bytes.fromhex("ff02" + "00" * 13 + "02")


def solicited(addr: bytes) -> bytes:
    return bytes.fromhex("ff0200000000000000000001ff") + addr[13:]  # ff02::1:ff00:0/104 (RFC 4291 §2.7.1)


def ipv6_frame(src: bytes, dst: bytes, nh: int, payload: bytes, *, hop: int = 255, icmp_len: int | None = None,
               dst_mac: bytes | None = None) -> bytes:  # fmt: skip
    """An IPv6 frame; with ``icmp_len``, the ICMPv6 checksum of the payload's last bytes is filled in."""
    body = bytearray(payload)
    if icmp_len is not None and icmp_len >= 4:
        start = len(body) - icmp_len
        body[start + 2 : start + 4] = b"\0\0"
        pseudo = src + dst + struct.pack("!IxxxB", icmp_len, 58)
        struct.pack_into("!H", body, start + 2, csum(pseudo + bytes(body[start:])))
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(body), nh, hop, src, dst)
    if dst_mac is None:
        dst_mac = b"\x33\x33" + dst[12:] if dst[0] == 0xFF else GW_MAC
    return eth(dst_mac, GUEST_MAC, 0x86DD, hdr + bytes(body))


def ndp_options(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        typ = draw(st.sampled_from([1, 2, 3, 5, 14, 25, 200]))
        units = draw(st.sampled_from([0, 1, 1, 2, 255]))
        out += bytes([typ, units]) + draw(st.binary(min_size=0, max_size=max(0, units * 8 - 2)))
    return out


@st.composite
def icmp6_message(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    """(message, destination, hop limit)."""
    kind = draw(st.sampled_from(["ns", "rs", "na", "echo", "other"]))
    hop = draw(st.sampled_from([255, 255, 254, 64, 1, 0]))
    code = draw(st.sampled_from([0, 0, 0, 1, 255]))
    if kind == "ns":
        target = draw(st.sampled_from([ROUTER6, LL_ROUTER, GUEST6, solicited(ROUTER6), bytes(16)]))
        msg = struct.pack("!BBHI16s", 135, code, 0, 0, target) + ndp_options(draw)
        dst = draw(st.sampled_from([solicited(target), target, ROUTER6]))
    elif kind == "rs":
        msg = struct.pack("!BBHI", 133, code, 0, 0) + ndp_options(draw)
        dst = draw(st.sampled_from([ALL_ROUTERS, LL_ROUTER]))
    elif kind == "na":
        msg = struct.pack("!BBHI16s", 136, code, 0, 0xE0000000, GUEST6) + ndp_options(draw)
        dst = LL_ROUTER
    elif kind == "echo":
        msg = struct.pack("!BBHHH", 128, code, 0, 1, 1) + draw(st.binary(max_size=1200))
        dst = draw(st.sampled_from([ROUTER6, LL_ROUTER, bytes.fromhex("fec0" + "00" * 12 + "0003")]))
    else:
        msg = bytes([draw(st.integers(0, 255)), code, 0, 0]) + draw(st.binary(max_size=40))
        dst = ROUTER6
    if draw(st.integers(0, 5)) == 0:
        msg = msg[: draw(st.integers(0, len(msg)))]
    return msg, dst, hop


@st.composite
def ext_chain(draw: st.DrawFn) -> tuple[int, bytes]:
    """Extension headers (RFC 8200 §4) before an upper layer: (first next-header value, their bytes)."""
    kinds = draw(st.lists(st.sampled_from([0, 43, 44, 60, 59, 51]), max_size=4))
    chain = b""
    nxt = 58
    for k in reversed(kinds):
        if k == 44:
            h = struct.pack("!BBHI", nxt, 0, draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 2**32 - 1)))
        else:
            ln = draw(st.integers(0, 3))
            h = bytes([nxt, ln]) + draw(st.binary(min_size=6 + 8 * ln, max_size=6 + 8 * ln))
        chain = h + chain
        nxt = k
    return nxt, chain


@SETTINGS
@given(msgs=st.lists(st.tuples(icmp6_message(), ext_chain(), st.sampled_from([LL_GUEST, GUEST6])), min_size=1,
                     max_size=6))  # fmt: skip
async def test_ndp_and_icmpv6_with_bad_options_hop_limits_and_extension_headers_never_escape(msgs) -> None:
    net = await new_net()
    try:
        for (msg, dst, hop), (nh, chain), src in msgs:
            feed(net, ipv6_frame(src, dst, nh, chain + msg, hop=hop, icmp_len=len(msg)))
            for f in drain(net):
                if f[12:14] == b"\x86\xdd" and f[54] in (134, 136):
                    # RFC 4861 §6.1.1/§7.1.1: only a valid solicitation (hop limit 255, code 0,
                    # no option of length 0) is answered.
                    assert hop == 255 and msg[1] == 0
                    assert not _zero_length_option(msg[8 if msg[0] == 133 else 24 :])
        assert_clean(net)
        assert len(net.arp_table) <= arpmod.MAX_ENTRIES
        ns = struct.pack("!BBHI16s", 135, 0, 0, 0, ROUTER6)
        feed(net, ipv6_frame(LL_GUEST, solicited(ROUTER6), 58, ns, icmp_len=24))
        [na] = drain(net)
        assert na[54] == 136 and na[62:78] == ROUTER6
    finally:
        await net.stop()


def _zero_length_option(opts: bytes) -> bool:
    i = 0
    while i + 2 <= len(opts):
        if opts[i + 1] == 0:
            return True
        i += opts[i + 1] * 8
    return False


async def test_neighbor_solicitation_with_a_zero_length_option_is_not_answered() -> None:
    """Finding: an NS for fec0::2 carrying an option of length 0 was answered (RFC 4861 §7.1.1: discard it).

    A zero length makes an option walk never advance; hosts must drop such
    messages rather than act on them.
    """
    net = await new_net()
    try:
        ns = struct.pack("!BBHI16s", 135, 0, 0, 0, ROUTER6) + b"\x01\x00" + bytes(6)
        feed(net, ipv6_frame(LL_GUEST, solicited(ROUTER6), 58, ns, icmp_len=len(ns)))
        rs = struct.pack("!BBHI", 133, 0, 0, 0) + b"\x01\x00" + bytes(6)
        feed(net, ipv6_frame(LL_GUEST, ALL_ROUTERS, 58, rs, icmp_len=len(rs)))
        assert drain(net) == []
        assert_clean(net)
    finally:
        await net.stop()


async def test_short_echo_request_to_the_router_is_not_answered() -> None:
    """Finding: a 4-byte ICMPv6 'echo request' (no identifier or sequence, RFC 4443 §4.1) got a 4-byte reply."""
    net = await new_net()
    try:
        feed(net, ipv6_frame(GUEST6, ROUTER6, 58, b"\x80\0\0\0", icmp_len=4, hop=64))
        assert drain(net) == []
        assert_clean(net)
    finally:
        await net.stop()


# -- UDP to odd and closed ports, ARP ----------------------------------------------------


@SETTINGS
@given(
    datagrams=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    GW_IP,
                    DNS_IP,
                    bytes([10, 0, 2, 255]),
                    b"\xff" * 4,
                    bytes([224, 0, 0, 1]),
                    bytes([10, 0, 2, 99]),
                    ZERO4,
                    bytes([127, 0, 0, 1]),
                ]
            ),  # fmt: skip
            st.sampled_from([0, 1, 7, 9, 53, 67, 68, 69, 137, 65535]),
            st.sampled_from([0, 67, 68, 1234, 65535]),
            st.binary(max_size=64),
        ),
        min_size=1,
        max_size=10,
    )
)
async def test_udp_to_odd_and_closed_ports_never_escapes(datagrams) -> None:
    net = await new_net()
    try:
        for dst, dport, sport, payload in datagrams:
            feed(net, udp_frame(GUEST_IP, sport, dst, dport, payload))
        await asyncio.sleep(0.01)
        drain(net)
        assert_clean(net)
        assert len(net.udp) <= udp_nat.MAX_FLOWS
    finally:
        await net.stop()


@SETTINGS
@given(
    arps=st.lists(
        st.tuples(
            st.sampled_from([1, 6, 0, 0xFFFF]), st.sampled_from([0x0800, 0x86DD, 0]),
            st.sampled_from([6, 0, 4, 16, 255]),
            st.sampled_from([4, 0, 6, 16, 255]), st.sampled_from([1, 2, 0, 3, 8, 0xFFFF]),
            st.sampled_from([GUEST_IP, ZERO4, GW_IP, bytes([10, 0, 2, 77]), b"\xff" * 4]),
            st.sampled_from([GW_IP, DNS_IP, GUEST_IP, bytes([10, 0, 2, 77])]), st.integers(0, 30),
        ),
        min_size=1,
        max_size=10,
    )
)  # fmt: skip
async def test_arp_with_odd_lengths_and_opcodes_never_escapes(arps) -> None:
    net = await new_net()
    try:
        for htype, ptype, hlen, plen, op, spa, tpa, cut in arps:
            body = struct.pack("!HHBBH", htype, ptype, hlen, plen, op) + GUEST_MAC + spa + bytes(6) + tpa + bytes(30)
            feed(net, eth(BCAST_MAC, GUEST_MAC, 0x0806, body[: len(body) - cut]))
            for f in drain(net):
                assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)  # only a real request is answered
                assert f[28:32] == tpa
        assert_clean(net)
        feed(net, eth(BCAST_MAC, GUEST_MAC, 0x0806, struct.pack("!HHBBH", 1, 0x800, 6, 4, 1) + GUEST_MAC + GUEST_IP
                      + bytes(6) + GW_IP))  # fmt: skip
        [reply] = drain(net)
        assert reply[20:22] == b"\0\2" and reply[28:32] == GW_IP
    finally:
        await net.stop()


async def test_dns_pending_queries_hold_bounded_memory() -> None:
    """Finding: a 60 KB 'query' (one valid question, then padding) was kept whole while pending.

    512 of them (one unfragmented UDP frame each: nothing checks a guest's frame
    against the MTU) pinned 30 MB for the query timeout. Queries above
    ``MAX_QUERY`` bytes are dropped; normal ones still go through.
    """
    net, upstream, transport = await dns_setup()
    try:
        big = dns_msg(qname(b"www", b"example", b"com"), ar=1, extra=b"\0" * 60000)
        for i in range(dnsmod.MAX_PENDING):
            feed(net, udp_frame(GUEST_IP, 1024 + i, DNS_IP, 53, big))
        held = sum(len(q.wire) for q in net.dns._pending.values())
        assert held <= dnsmod.MAX_PENDING * dnsmod.MAX_QUERY
        await normal_dns_query(net, upstream)
        assert_clean(net)
    finally:
        await net.stop()
        transport.close()


async def test_fragment_reassembly_does_not_pin_padded_frames() -> None:
    """Finding: the first fragment's whole frame stayed referenced until its datagram completed or expired.

    Frame: IPv4 ICMP, MF, offset 0, 8 bytes of payload, then 60000 bytes of
    Ethernet padding after the IP total length. Only the 8 bytes counted
    against ``MAX_BYTES``, while 64 such datagrams pinned 3.8 MB for 30 s.
    """
    import gc
    import tracemalloc

    net = await new_net()
    tracemalloc.start()
    try:
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        for ident in range(ipv4mod.MAX_DATAGRAMS):
            feed(net, frag_frame(ident, 0, bytes(8), True) + bytes(60000))
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
        assert len(net.reassembler) == ipv4mod.MAX_DATAGRAMS
        assert grown < 1 << 20, f"{grown} bytes held for {ipv4mod.MAX_DATAGRAMS * 8} bytes of fragments"
        await _ping_gateway_fragmented(net, bytes(4000), ident=1000)
        assert_clean(net)
    finally:
        tracemalloc.stop()
        await net.stop()


async def test_memory_and_tables_stay_bounded_under_a_storm_of_every_service(tmp_path: Path) -> None:
    """DHCP from ever new MACs, DNS for ever new names, TFTP sessions, NS from ever new
    IPv6 sources, ARP for ever new addresses and fragment starts, interleaved."""
    import gc
    import tracemalloc

    (tmp_path / "f").write_bytes(os.urandom(5000))
    net, upstream, transport = await dns_setup()
    tnet = await new_net(f"user,tftp={tmp_path}")
    rng = random.Random(1)
    tracemalloc.start()
    try:
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(6000):
            k = i % 6
            if k == 0:
                msg = opt(53, bytes([rng.choice([1, 3, 4, 7, 8])])) + opt(50, rng.choice(POOL_ADDRS)) + b"\xff"
                mac = b"\x02\x00" + rng.getrandbits(32).to_bytes(4, "big")
                feed(net, dhcp_to_server(bootp(msg, chaddr=mac, ciaddr=rng.choice(POOL_ADDRS))))
            elif k == 1:
                query = dns_msg(qname(b"x%d" % rng.getrandbits(30), b"com"))
                feed(net, udp_frame(GUEST_IP, rng.randrange(1024, 65535), DNS_IP, 53, query))
            elif k == 2:
                rrq = b"\0\1f\0octet\0blksize\0%d\0" % rng.randrange(8, 2000)
                feed(tnet, udp_frame(GUEST_IP, rng.randrange(1024, 65535), GW_IP, 69, rrq))
            elif k == 3:
                src = bytes.fromhex("fec0" + "00" * 6) + rng.getrandbits(64).to_bytes(8, "big")
                ns = struct.pack("!BBHI16s", 135, 0, 0, 0, ROUTER6)
                feed(net, ipv6_frame(src, solicited(ROUTER6), 58, ns, icmp_len=24))
            elif k == 4:
                spa = bytes([10, 0, 2, rng.randrange(4, 255)])
                body = struct.pack("!HHBBH", 1, 0x800, 6, 4, 1) + GUEST_MAC + spa + bytes(6) + GW_IP
                feed(net, eth(BCAST_MAC, GUEST_MAC, 0x0806, body))
            else:
                feed(net, frag_frame(rng.getrandbits(16), rng.randrange(0, 8000) * 8, bytes(64), True))
            if i % 500 == 0:
                drain(net)
                drain(tnet)
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)
        drain(net)
        drain(tnet)
        upstream.got.clear()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
        assert grown < 4 << 20, f"heap grew by {grown} bytes"
        assert len(net.dhcp.leases) <= dhcpmod.POOL_SIZE and net.dns.pending() <= dnsmod.MAX_PENDING
        assert len(net.arp_table) <= arpmod.MAX_ENTRIES and len(net.reassembler) <= ipv4mod.MAX_DATAGRAMS
        assert tnet.tftp is not None and len(tnet.tftp) <= tftpmod.MAX_SESSIONS
        assert_clean(net)
        assert_clean(tnet)
        await normal_dns_query(net, upstream)
    finally:
        tracemalloc.stop()
        await tnet.stop()
        await net.stop()
        transport.close()


async def test_router_solicitation_from_the_unspecified_address_gets_a_multicast_advertisement() -> None:
    """Finding: an RS from :: (a host before its link-local address is ready) was dropped unanswered.

    RFC 4861 §6.2.6: such a solicitation is answered to all nodes (ff02::1);
    one carrying a source link-layer address option is invalid (§6.1.1).
    """
    net = await new_net()
    try:
        rs = struct.pack("!BBHI", 133, 0, 0, 0)
        feed(net, ipv6_frame(bytes(16), ALL_ROUTERS, 58, rs, icmp_len=len(rs)))
        [ra] = drain(net)
        assert ra[:6] == b"\x33\x33\x00\x00\x00\x01" and ra[38:54] == bytes.fromhex("ff02" + "00" * 13 + "01")
        assert ra[54] == 134 and ra[21] == 255
        rs_slla = rs + b"\x01\x01" + GUEST_MAC
        feed(net, ipv6_frame(bytes(16), ALL_ROUTERS, 58, rs_slla, icmp_len=len(rs_slla)))
        assert drain(net) == []
        assert len(net.arp_table) == 0  # nothing learned from an unspecified source
        assert_clean(net)
    finally:
        await net.stop()


async def test_dhcp_decline_of_another_address_leaves_the_lease_alone() -> None:
    """Finding: a DECLINE naming 10.0.2.20 (option 50) took away the client's lease of 10.0.2.15 and
    held 10.0.2.15 out of the pool; the address declined is the one the message names (RFC 2131 §4.3.3)."""
    net = await new_net()
    try:
        ip = normal_dhcp_exchange(net)
        other = bytes([10, 0, 2, 20])
        feed(net, dhcp_to_server(bootp(opt(53, b"\4") + opt(50, other) + opt(54, GW_IP) + b"\xff")))
        assert net.dhcp.leases[GUEST_MAC].ip == ip and net.dhcp._declined == {}
        feed(net, dhcp_to_server(bootp(opt(53, b"\4") + opt(50, ip) + opt(54, GW_IP) + b"\xff")))
        assert GUEST_MAC not in net.dhcp.leases and ip in net.dhcp._declined
        assert_clean(net)
    finally:
        await net.stop()
