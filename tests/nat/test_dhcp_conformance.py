"""DHCP server against RFC 2131/2132/3396/3397 and libslirp's choices, with crafted frames.

Each test names the rule it checks; where RFC 2131 leaves a choice the
expected answer is what QEMU 7.2's libslirp sends (``test_dhcp_libslirp_parity``
puts the two side by side).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.nat import UserNetConfig, UserNetwork
from appliance.nat import dhcp as dhcpmod

from .conftest import drain, feed

MAC = bytes.fromhex("525400123456")
MAC2 = bytes.fromhex("525400000002")
BCAST_MAC = b"\xff" * 6
ZERO = b"\0\0\0\0"
BCAST = b"\xff\xff\xff\xff"
GW = bytes([10, 0, 2, 2])
IP15, IP16, IP20 = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 16]), bytes([10, 0, 2, 20])
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s4s")


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def opt(code: int, value: bytes) -> bytes:
    return bytes([code, len(value)]) + value


def bootp(options: bytes, *, mac: bytes = MAC, xid: int = 7, flags: int = 0, ciaddr: bytes = ZERO,
          giaddr: bytes = ZERO, sname: bytes = b"", file: bytes = b"", magic: bool = True) -> bytes:  # fmt: skip
    head = _BOOTP.pack(1, 1, 6, 0, xid, 0, flags, ciaddr, ZERO, ZERO, giaddr, mac.ljust(16, b"\0"),
                       sname.ljust(64, b"\0"), file.ljust(128, b"\0"), dhcpmod.MAGIC)  # fmt: skip
    if not magic:
        return head[:-4] + bytes(64)  # an RFC 951 request: a 64-byte vendor area of zeros
    return head + options + b"\xff"


def frame(payload: bytes, *, mac: bytes = MAC, src: bytes = ZERO, dst: bytes = BCAST, sport: int = 68) -> bytes:
    udp = struct.pack("!HHHH", sport, 67, 8 + len(payload), 0) + payload
    c = csum(src + dst + struct.pack("!BBH", 0, 17, len(udp)) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst))
    struct.pack_into("!H", ip, 10, csum(bytes(ip)))
    return (BCAST_MAC if dst[0] == 255 else bytes.fromhex("52550a000202")) + mac + b"\x08\x00" + bytes(ip) + udp


class Reply:
    """One DHCP reply as the guest receives it: addressing, fixed fields and options."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.dst_mac = raw[:6]
        ip = raw[14:34]
        self.ip_len = struct.unpack("!H", ip[2:4])[0]
        self.src, self.dst = ip[12:16], ip[16:20]
        self.sport, self.dport = struct.unpack("!HH", raw[34:38])
        body = raw[42 : 14 + self.ip_len]
        self.body = body
        f = _BOOTP.unpack_from(body)
        self.op, self.xid, self.flags = f[0], f[4], f[6]
        self.ciaddr, self.yiaddr, self.siaddr, self.giaddr = f[7], f[8], f[9], f[10]
        self.sname, self.file, self.magic = f[12], f[13], f[14]
        self.order: list[int] = []
        self.opts: dict[int, bytes] = {}
        self._scan(body[_BOOTP.size :])
        overload = self.opts.get(52, b"\0")[0]
        if overload & 1:
            self._scan(self.file)
        if overload & 2:
            self._scan(self.sname)

    def _scan(self, field: bytes) -> None:
        i = 0
        while i < len(field) and field[i] != 255:
            if field[i] == 0:
                i += 1
                continue
            code, n = field[i], field[i + 1]
            assert i + 2 + n <= len(field), "an option runs past its field"
            if code not in self.opts:
                self.order.append(code)
            self.opts[code] = self.opts.get(code, b"") + field[i + 2 : i + 2 + n]
            i += 2 + n
        assert i < len(field), "a field without END"

    @property
    def type(self) -> int:
        return self.opts[53][0]


def replies(net: UserNetwork) -> list[Reply]:
    out = []
    for raw in drain(net):
        if raw[12:14] == b"\x08\x00" and raw[23] == 17 and struct.unpack("!H", raw[36:38])[0] == 68:
            out.append(Reply(raw))
    return out


def one(net: UserNetwork, payload: bytes, **kw: object) -> Reply:
    feed(net, frame(payload, **kw))  # type: ignore[arg-type]
    [r] = replies(net)
    return r


def nothing(net: UserNetwork, payload: bytes, **kw: object) -> None:
    feed(net, frame(payload, **kw))  # type: ignore[arg-type]
    assert replies(net) == []


async def new_net(options: str = "") -> UserNetwork:
    cfg = UserNetConfig.from_string("user" + ("," + options if options else ""))
    net = UserNetwork(cfg)
    await net.start()
    return net


@pytest.fixture
async def net():  # type: ignore[no-untyped-def]
    n = await new_net()
    yield n
    await n.stop()


def lease(net: UserNetwork, mac: bytes = MAC, xid: int = 1) -> bytes:
    """DISCOVER, REQUEST (SELECTING): the address ACKed."""
    offer = one(net, bootp(opt(53, b"\1"), mac=mac, xid=xid), mac=mac)
    ack = one(net, bootp(opt(53, b"\3") + opt(50, offer.yiaddr) + opt(54, GW), mac=mac, xid=xid + 1), mac=mac)
    assert ack.type == dhcpmod.ACK and ack.yiaddr == offer.yiaddr
    return ack.yiaddr


# -- RFC 2131 §4.1: where replies go -------------------------------------------------------


async def test_broadcast_flag_gets_offer_and_ack_broadcast(net: UserNetwork) -> None:
    for msg in (opt(53, b"\1"), opt(53, b"\3") + opt(50, IP15) + opt(54, GW)):
        r = one(net, bootp(msg, flags=0x8000))
        assert (r.dst_mac, r.dst, r.dport) == (BCAST_MAC, BCAST, 68)
        assert r.flags == 0x8000  # table 3: flags from the client's message


async def test_without_broadcast_flag_offer_is_unicast_to_chaddr_and_yiaddr(net: UserNetwork) -> None:
    r = one(net, bootp(opt(53, b"\1")))
    assert (r.dst_mac, r.dst, r.dport, r.src, r.sport) == (MAC, IP15, 68, GW, 67)


async def test_renewing_request_is_unicast_to_ciaddr_even_with_broadcast_flag(net: UserNetwork) -> None:
    """§4.1: ciaddr set → unicast to ciaddr; the BROADCAST bit only matters when ciaddr is 0
    (was: broadcast when the flag was set)."""
    lease(net)
    for flags in (0, 0x8000):
        r = one(net, bootp(opt(53, b"\3"), ciaddr=IP15, flags=flags), src=IP15, dst=GW)
        assert r.type == dhcpmod.ACK
        assert (r.dst_mac, r.dst, r.ciaddr, r.yiaddr) == (MAC, IP15, IP15, IP15)
        assert r.opts[51] == struct.pack("!I", 86400)


async def test_rebinding_broadcast_request_is_acked_to_ciaddr(net: UserNetwork) -> None:
    lease(net)
    r = one(net, bootp(opt(53, b"\3"), ciaddr=IP15), src=IP15, dst=BCAST)
    assert r.type == dhcpmod.ACK and r.dst == IP15 and r.yiaddr == IP15


async def test_nak_is_always_broadcast(net: UserNetwork) -> None:
    r = one(net, bootp(opt(53, b"\3") + opt(50, bytes([10, 0, 2, 99]))))
    assert r.type == dhcpmod.NAK and (r.dst_mac, r.dst) == (BCAST_MAC, BCAST)


async def test_relayed_message_is_answered_by_broadcast_to_the_client_port_as_libslirp(net: UserNetwork) -> None:
    """giaddr set: libslirp ignores the relay and broadcasts to port 68; a relay on the guest's
    link sends from port 67 (was: that reached the UDP NAT and got ICMP port unreachable)."""
    relay = bytes([10, 0, 2, 50])
    r = one(net, bootp(opt(53, b"\1"), giaddr=relay), src=relay, dst=GW, sport=67)
    assert r.type == dhcpmod.OFFER and r.yiaddr == IP15
    assert (r.dst_mac, r.dst, r.dport) == (BCAST_MAC, BCAST, 68)
    assert r.giaddr == relay  # table 3: giaddr from the client's message
    r = one(net, bootp(opt(53, b"\1"), giaddr=bytes([192, 168, 5, 1]), mac=MAC2), mac=MAC2)
    assert r.dst == BCAST and r.yiaddr == IP16


# -- RFC 2131 §4.3.1 table 3: the fixed fields ---------------------------------------------


async def test_reply_fields_follow_table_3(net: UserNetwork) -> None:
    """OFFER: ciaddr 0; ACK: ciaddr from the REQUEST; NAK: ciaddr, yiaddr, siaddr 0, no boot file,
    options 53, 54 and libslirp's message (56) only (was: ciaddr echoed in OFFER and NAK, siaddr
    set and no message in NAK)."""
    r = one(net, bootp(opt(53, b"\1"), ciaddr=IP20, xid=0xABCDEF01))
    assert (r.op, r.xid, r.ciaddr, r.yiaddr, r.siaddr) == (2, 0xABCDEF01, ZERO, IP15, GW)
    assert r.magic == dhcpmod.MAGIC and r.order[:2] == [53, 54]
    r = one(net, bootp(opt(53, b"\3") + opt(50, bytes([192, 168, 1, 5])), ciaddr=IP20))
    assert r.type == dhcpmod.NAK
    assert (r.ciaddr, r.yiaddr, r.siaddr, r.file) == (ZERO, ZERO, ZERO, bytes(128))
    assert set(r.opts) == {53, 54, 56} and r.opts[56] == b"requested address not available"


async def test_every_reply_is_at_least_300_bytes_of_bootp(net: UserNetwork) -> None:
    """RFC 1542 §3.1.1: some relays and clients drop BOOTP messages shorter than 300 bytes."""
    for msg in (opt(53, b"\1"), opt(53, b"\3") + opt(50, b"\x01\x02\x03\x04")):
        r = one(net, bootp(msg))
        assert r.ip_len - 28 >= 300


# -- states (RFC 2131 §4.3.2) ----------------------------------------------------------------


async def test_init_reboot_outside_the_pool_or_anothers_address_is_nakked(net: UserNetwork) -> None:
    lease(net)
    for ip in (bytes([10, 0, 2, 99]), bytes([10, 0, 3, 15]), IP15):
        r = one(net, bootp(opt(53, b"\3") + opt(50, ip), mac=MAC2), mac=MAC2)
        assert r.type == dhcpmod.NAK, ip


async def test_init_reboot_for_the_clients_own_lease_is_acked(net: UserNetwork) -> None:
    lease(net)
    r = one(net, bootp(opt(53, b"\3") + opt(50, IP15)))
    assert r.type == dhcpmod.ACK and r.yiaddr == IP15


async def test_init_reboot_for_an_address_never_leased_to_the_client_is_nakked(net: UserNetwork) -> None:
    """RFC 2131 §4.3.2: an INIT-REBOOT for an address this server did not lease to the client
    (remembered from another network, or from before a restart) gets a NAK, and the client then
    DISCOVERs the address it is given here. libslirp grants a free pool address instead (was so)."""
    r = one(net, bootp(opt(53, b"\3") + opt(50, IP20)))
    assert r.type == dhcpmod.NAK
    assert MAC not in net.dhcp.leases and one(net, bootp(opt(53, b"\1"))).yiaddr == IP15


async def test_init_reboot_for_the_clients_released_address_is_acked(net: UserNetwork) -> None:
    lease(net)
    nothing(net, bootp(opt(53, b"\7") + opt(54, GW), ciaddr=IP15), src=IP15, dst=GW)
    r = one(net, bootp(opt(53, b"\3") + opt(50, IP15)))
    assert r.type == dhcpmod.ACK and r.yiaddr == IP15


async def test_renewal_of_a_free_pool_address_after_a_restart_is_acked_as_libslirp(net: UserNetwork) -> None:
    """RENEWING/REBINDING (ciaddr, no option 50/54) with no record here, as after QEMU restarts
    under a running guest: the address is free, so the guest keeps it."""
    r = one(net, bootp(opt(53, b"\3"), ciaddr=IP20), src=IP20, dst=GW)
    assert r.type == dhcpmod.ACK and r.yiaddr == IP20 and r.dst == IP20


async def test_bound_client_asking_for_another_address_is_nakked(net: UserNetwork) -> None:
    lease(net)
    r = one(net, bootp(opt(53, b"\3") + opt(50, IP20)))
    assert r.type == dhcpmod.NAK


async def test_request_naming_another_server_is_not_answered(net: UserNetwork) -> None:
    one(net, bootp(opt(53, b"\1")))
    nothing(net, bootp(opt(53, b"\3") + opt(50, IP15) + opt(54, bytes([10, 0, 2, 9]))))
    assert MAC not in net.dhcp.leases  # the offer is withdrawn: 10.0.2.15 is free again
    r = one(net, bootp(opt(53, b"\1"), mac=MAC2), mac=MAC2)
    assert r.yiaddr == IP15


async def test_request_naming_no_address_gets_the_clients_binding_as_libslirp(net: UserNetwork) -> None:
    """No option 50 and no ciaddr: libslirp ACKs the client's binding or a new address (its
    comment: Windows remembers its address); was NAK."""
    lease(net, MAC2)
    r = one(net, bootp(opt(53, b"\3")))
    assert r.type == dhcpmod.ACK and r.yiaddr == IP16
    assert net.dhcp.leases[MAC].state is dhcpmod.LeaseState.BOUND
    assert one(net, bootp(opt(53, b"\3"))).yiaddr == IP16


async def test_release_then_discover_gives_the_same_address_back(net: UserNetwork) -> None:
    """RFC 2131 §4.3.1: the client's previous address first (libslirp keeps the binding
    through a RELEASE). Was: the lowest free address, so a client that had 10.0.2.16 got 10.0.2.15."""
    assert lease(net, MAC) == IP15
    assert lease(net, MAC2, xid=10) == IP16
    for mac, ip in ((MAC, IP15), (MAC2, IP16)):
        nothing(net, bootp(opt(53, b"\7") + opt(54, GW), mac=mac, ciaddr=ip), mac=mac, src=ip, dst=GW)
    assert net.dhcp.leases == {}
    assert one(net, bootp(opt(53, b"\1"), mac=MAC2), mac=MAC2).yiaddr == IP16
    assert one(net, bootp(opt(53, b"\1"), mac=MAC), mac=MAC).yiaddr == IP15


async def test_lapsed_lease_comes_back_to_its_client(monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(dhcpmod.DhcpServer, "_now", staticmethod(lambda: clock[0]))
    net = await new_net()
    try:
        lease(net, MAC)
        lease(net, MAC2, xid=10)
        clock[0] += 86401
        assert one(net, bootp(opt(53, b"\1"), mac=MAC2), mac=MAC2).yiaddr == IP16
    finally:
        await net.stop()


async def test_release_of_another_address_is_ignored(net: UserNetwork) -> None:
    lease(net)
    nothing(net, bootp(opt(53, b"\7"), ciaddr=IP20), src=IP20, dst=GW)
    assert net.dhcp.leases[MAC].ip == IP15


async def test_inform_is_acked_to_ciaddr_without_lease_or_yiaddr(net: UserNetwork) -> None:
    r = one(net, bootp(opt(53, b"\x08"), ciaddr=IP20, flags=0x8000), src=IP20, dst=GW)
    assert r.type == dhcpmod.ACK
    assert (r.dst, r.dst_mac, r.yiaddr, r.ciaddr) == (IP20, MAC, ZERO, IP20)
    assert 51 not in r.opts and r.opts[1] == b"\xff\xff\xff\0" and r.opts[6] == bytes([10, 0, 2, 3])
    assert net.dhcp.leases == {}  # §4.3.5: no lease is made


async def test_bootp_client_gets_an_ack_as_libslirp() -> None:
    """A BOOTP request (RFC 951, no option 53, with or without the RFC 1497 cookie) is answered
    as libslirp answers it: an ACK of an address (was: dropped as malformed)."""
    net = await new_net("bootfile=pxelinux.0")
    try:
        r = one(net, bootp(b"", magic=False))
        assert r.type == dhcpmod.ACK and r.yiaddr == IP15 and r.file.rstrip(b"\0") == b"pxelinux.0"
        r = one(net, bootp(b"", mac=MAC2), mac=MAC2)
        assert r.type == dhcpmod.ACK and r.yiaddr == IP16
        assert one(net, bootp(b"", magic=False)).yiaddr == IP15  # the same client again
    finally:
        await net.stop()


# -- options ---------------------------------------------------------------------------------


async def test_restricted_network_offers_no_router_or_dns_as_libslirp() -> None:
    net = await new_net("restrict=on")
    try:
        r = one(net, bootp(opt(53, b"\1")))
        assert 3 not in r.opts and 6 not in r.opts and r.opts[1] == b"\xff\xff\xff\0"
    finally:
        await net.stop()


async def test_options_follow_the_parameter_request_list_order(net: UserNetwork) -> None:
    """RFC 2132 §9.8: requested options in the client's order, after 53 and 54; options not asked
    for still follow (libslirp sends its whole set); unknown codes are left out."""
    r = one(net, bootp(opt(53, b"\1") + opt(55, bytes([28, 6, 42, 3, 1, 51]))))
    assert r.order == [53, 54, 28, 6, 3, 1, 51]
    r = one(net, bootp(opt(53, b"\1")))
    assert r.order == [53, 54, 1, 3, 6, 28, 51]  # libslirp's order, 28 ours


async def test_client_identifier_is_neither_used_nor_echoed_as_libslirp(net: UserNetwork) -> None:
    cid = opt(61, b"\x01" + MAC)
    a = one(net, bootp(opt(53, b"\1") + cid))
    b = one(net, bootp(opt(53, b"\1") + opt(61, b"\xffother"), mac=MAC2), mac=MAC2)
    assert 61 not in a.opts and 61 not in b.opts
    assert (a.yiaddr, b.yiaddr) == (IP15, IP16)  # leased by MAC


async def test_hostname_domain_tftp_server_and_search_list(net: UserNetwork) -> None:
    await net.stop()
    net = await new_net("hostname=vm1,domainname=ex.test,tftp-server-name=tftp.ex,"
                        "dnssearch=a.example.test,dnssearch=b.example.test,dnssearch=example.test")  # fmt: skip
    try:
        r = one(net, bootp(opt(53, b"\1")))
        assert r.opts[12] == b"vm1" and r.opts[15] == b"ex.test" and r.opts[66] == b"tftp.ex"
        # RFC 3397 §2: b.example.test and example.test point into a.example.test (offset 2).
        assert r.opts[119] == b"\x01a\x07example\x04test\x00\x01b\xc0\x02\xc0\x02"
        assert r.order == [53, 54, 1, 3, 6, 28, 51, 12, 15, 66, 119]  # libslirp's order, 28 ours
    finally:
        await net.stop()


async def test_http_bootfile_adds_the_uefi_http_vendor_class_as_libslirp() -> None:
    net = await new_net("bootfile=http://10.0.2.2/boot.efi")
    try:
        r = one(net, bootp(opt(53, b"\1")))
        assert r.opts[60] == b"HTTPClient" and r.file.rstrip(b"\0") == b"http://10.0.2.2/boot.efi"
    finally:
        await net.stop()


def test_search_list_keeps_case_and_leaves_out_names_with_empty_labels_as_libslirp() -> None:
    """Was: lower-cased (so Ok.Test and ok.test shared bytes) and "x..y" sent as x.y, "." as the root."""
    enc = dhcpmod.encode_search(("Ok.Test", "ok.test", "b.ok.test", "x..y", "a.b.", "."))
    assert enc == b"\x02Ok\x04Test\x00\x02ok\x04test\x00\x01b\xc0\x09\x01a\x01b\x00"
    assert dhcpmod.encode_search(("x..y",)) == b""


async def test_search_list_of_only_bad_names_sends_no_option_119() -> None:
    net = await new_net("dnssearch=x..y")
    try:
        assert 119 not in one(net, bootp(opt(53, b"\1"))).opts
    finally:
        await net.stop()


def long_search(n: int) -> str:
    return ",".join(f"dnssearch=d{i:02d}.some-rather-long-domain-name-{i}.example.test" for i in range(n))


async def test_long_search_list_stays_within_576_bytes_using_file_and_sname() -> None:
    """RFC 2131 §2/§4.1: no more than 576 bytes unless the client says so (option 57); options
    go on in file and sname with option 52 (was: a 657-byte reply). The list is split into
    instances (RFC 3396) the client joins back."""
    net = await new_net(long_search(9))
    try:
        want = dhcpmod.encode_search(tuple(f"d{i:02d}.some-rather-long-domain-name-{i}.example.test" for i in range(9)))
        assert len(want) > 255
        r = one(net, bootp(opt(53, b"\1")))
        assert r.ip_len <= 576
        assert r.opts[52] == b"\x03" and r.opts[119] == want
        assert r.opts[51] == struct.pack("!I", 86400) and r.opts[3] == GW
    finally:
        await net.stop()


async def test_max_message_size_lets_the_reply_grow_without_overload() -> None:
    net = await new_net(long_search(9))
    try:
        r = one(net, bootp(opt(53, b"\1") + opt(57, struct.pack("!H", 1500))))
        assert 576 < r.ip_len <= 1500 and 52 not in r.opts and len(r.opts[119]) > 255
        r = one(net, bootp(opt(53, b"\1") + opt(57, struct.pack("!H", 300))))  # below 576: ignored
        assert r.ip_len <= 576
    finally:
        await net.stop()


async def test_max_message_size_is_held_to_the_guest_links_mtu() -> None:
    """Option 57 says what the client takes; one frame on the guest's link is what it can get
    (set_mtu: host_mtu= or a vhost-user front end's MTU). Was: up to 1500 whatever the MTU."""
    net = await new_net(long_search(20))
    try:
        net.set_mtu(1000)
        r = one(net, bootp(opt(53, b"\1") + opt(57, struct.pack("!H", 9000))))
        assert 576 < r.ip_len <= 1000
        net.set_mtu(9000)
        r = one(net, bootp(opt(53, b"\1") + opt(57, struct.pack("!H", 9000))))
        assert r.ip_len > 1000 and 52 not in r.opts and 119 in r.opts
    finally:
        await net.stop()


async def test_search_list_that_fits_nowhere_is_left_out_and_the_rest_is_sent() -> None:
    net = await new_net(long_search(14) + ",bootfile=pxe.0")
    try:
        r = one(net, bootp(opt(53, b"\1")))
        assert r.ip_len <= 576 and 119 not in r.opts
        assert r.opts[51] and r.opts[1] and r.file.rstrip(b"\0") == b"pxe.0"
    finally:
        await net.stop()


async def test_client_options_overloaded_into_file_and_sname_are_read(net: UserNetwork) -> None:
    """RFC 2131 §4.1: a client may put options in file and sname (option 52); here the
    requested address sits in file and the server id in sname (was: ignored, so no address)."""
    msg = bootp(opt(53, b"\3") + opt(52, b"\3"), file=opt(50, IP20) + b"\xff", sname=opt(54, GW) + b"\xff")
    r = one(net, msg)
    assert r.type == dhcpmod.ACK and r.yiaddr == IP20


async def test_server_ignores_its_own_and_other_servers_replies(net: UserNetwork) -> None:
    for t in (2, 5, 6, 9, 0x10):
        nothing(net, bootp(opt(53, bytes([t]))))


async def test_discover_from_a_bound_client_keeps_its_binding(monkeypatch) -> None:
    """A bound client that DISCOVERs again is offered its address and stays bound (was: the
    binding became a 60-second offer, and another client got the address a minute later)."""
    clock = [1000.0]
    monkeypatch.setattr(dhcpmod.DhcpServer, "_now", staticmethod(lambda: clock[0]))
    net = await new_net()
    try:
        lease(net)
        assert one(net, bootp(opt(53, b"\1"), xid=50)).yiaddr == IP15
        clock[0] += 61
        assert one(net, bootp(opt(53, b"\1"), mac=MAC2), mac=MAC2).yiaddr == IP16
        assert net.dhcp.leases[MAC].state is dhcpmod.LeaseState.BOUND
    finally:
        await net.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    msg_type=st.sampled_from([1, 3, 8, 0]),
    params=st.binary(max_size=40),
    size=st.integers(0, 0xFFFF),
    overload=st.integers(0, 4),
    file=st.binary(max_size=128),
    sname=st.binary(max_size=64),
    flags=st.sampled_from([0, 0x8000, 0xFFFF]),
    ciaddr=st.sampled_from([ZERO, IP15, IP20, BCAST]),
    giaddr=st.sampled_from([ZERO, bytes([10, 0, 2, 50])]),
)
async def test_any_request_list_size_and_overload_gives_a_well_formed_reply_within_the_size(
    msg_type: int, params: bytes, size: int, overload: int, file: bytes, sname: bytes, flags: int,
    ciaddr: bytes, giaddr: bytes,
) -> None:  # fmt: skip
    net = await new_net(long_search(9) + ",hostname=vm1,domainname=lab.test")
    try:
        body = opt(55, params) + opt(57, size.to_bytes(2, "big")) + opt(52, bytes([overload]))
        if msg_type:
            body = opt(53, bytes([msg_type])) + body
        feed(net, frame(bootp(body, flags=flags, ciaddr=ciaddr, giaddr=giaddr, file=file, sname=sname)))
        for r in replies(net):  # Reply() checks every option stays in its field and each field ends
            limit = min(size, 1500) if size >= 576 else 576  # one frame at most (MTU 1500)
            assert r.ip_len <= limit and r.opts[53] and r.opts[54] == GW
            assert len(r.body) >= 300
        assert net.counters()["errors"] == 0
    finally:
        await net.stop()
