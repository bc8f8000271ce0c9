"""Stateless DHCPv6 (appliance/nat/dhcp6.py): Information-request → Reply, with scapy-built frames.

What is answered (RFC 8415 §18.3.6, RFC 3646, RFC 5970), when options 24 and 59
are sent, how ``restrict=`` and ``ipv6=off`` change it, and what a hostile guest's
messages get: nothing, and one counter each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp6 import (
    DHCP6,
    DUID_LL,
    DHCP6_Confirm,
    DHCP6_InfoRequest,
    DHCP6_Rebind,
    DHCP6_RelayForward,
    DHCP6_Release,
    DHCP6_Renew,
    DHCP6_Reply,
    DHCP6_Request,
    DHCP6_Solicit,
    DHCP6OptBootFileUrl,
    DHCP6OptClientId,
    DHCP6OptDNSDomains,
    DHCP6OptDNSServers,
    DHCP6OptIA_NA,
    DHCP6OptIA_PD,
    DHCP6OptIA_TA,
    DHCP6OptOptReq,
    DHCP6OptServerId,
)
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from appliance.nat import UserNetConfig, UserNetwork
from appliance.nat import dhcp6 as dhcp6mod

from .conftest import GUEST_MAC, drain, feed

GW_MAC = "52:56:00:00:00:02"  # fec0::2's (special_mac), as libslirp's IPv6 frames come from

LL6 = "fe80::5054:ff:fe12:3456"
GUEST6 = "fec0::5054:ff:fe12:3456"
ALL_DHCP = "ff02::1:2"
ORO_ALL = [23, 24, 59]
SERVER_DUID = struct.pack("!HH", 3, 1) + bytes.fromhex(GW_MAC.replace(":", ""))
CLIENT_DUID = DUID_LL(lladdr=GUEST_MAC)


@contextlib.asynccontextmanager
async def running(options: str = "user") -> AsyncIterator[UserNetwork]:
    """A started stack with these ``-netdev user`` options (no upstream resolvers), stopped after."""
    n = UserNetwork(dataclasses.replace(UserNetConfig.from_string(options), nameservers=()))
    await n.start()
    try:
        yield n
    finally:
        await n.stop()


@pytest.fixture
async def net() -> AsyncIterator[UserNetwork]:
    async with running() as n:
        yield n


def frame(msg: Packet | bytes, *, src: str = LL6, dst: str = ALL_DHCP, sport: int = 546, dport: int = 547) -> bytes:
    mac = "33:33:00:01:00:02" if dst.startswith("ff02") else GW_MAC
    return bytes(Ether(src=GUEST_MAC, dst=mac) / IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / msg)


def info_request(trid: int = 0x123456, oro: list[int] | None = ORO_ALL, client: bool = True) -> Packet:
    msg = DHCP6_InfoRequest(trid=trid)
    if client:
        msg /= DHCP6OptClientId(duid=CLIENT_DUID)
    if oro is not None:
        msg /= DHCP6OptOptReq(reqopts=oro)
    return msg


def replies(net: UserNetwork) -> list[Ether]:
    """The stack's DHCPv6 answers (UDP from port 547) among what it queued."""
    out = []
    for raw in drain(net):
        p = Ether(raw)
        if UDP in p and p[UDP].sport == 547:
            out.append(p)
    return out


def options_of(reply: Ether) -> dict[int, bytes]:
    """The Reply's options by code, from its raw bytes (every one whole, none twice)."""
    data = bytes(reply[UDP].payload)
    opts = dhcp6mod.options(data[4:])
    assert opts is not None, data
    codes = [c for c, _ in opts]
    assert len(codes) == len(set(codes)), codes
    return dict(opts)


def one_reply(net: UserNetwork, msg: Packet | bytes, **kw: object) -> Ether:
    feed(net, frame(msg, **kw))  # type: ignore[arg-type]
    [r] = replies(net)
    return r


async def test_information_request_gets_reply_with_ids_and_dns(net: UserNetwork) -> None:
    r = one_reply(net, info_request(trid=0xABCDEF))
    assert r[Ether].dst == GUEST_MAC and r[Ether].src == GW_MAC
    assert r[IPv6].src == "fec0::2" and r[IPv6].dst == LL6
    assert r[UDP].sport == 547 and r[UDP].dport == 546
    assert DHCP6_Reply in r and r[DHCP6_Reply].trid == 0xABCDEF
    assert r[DHCP6OptServerId].duid.lladdr == GW_MAC  # DUID-LL (RFC 8415 §11.4)
    assert bytes(r[DHCP6OptClientId].duid) == bytes(CLIENT_DUID)
    assert r[DHCP6OptDNSServers].dnsservers == ["fec0::3"]
    opts = options_of(r)
    assert opts[2] == SERVER_DUID
    assert set(opts) == {1, 2, 23}  # no search list, no boot URL configured
    assert net.counters()["dhcp6_replies"] == 1


async def test_reply_checksums_are_valid(net: UserNetwork) -> None:
    r = one_reply(net, info_request())
    raw = bytes(r)
    csum = r[UDP].chksum
    r[UDP].chksum = None
    assert Ether(bytes(r))[UDP].chksum == csum, raw


@pytest.mark.parametrize("dst", ["fec0::2", "fe80::2"])
async def test_unicast_to_the_router_is_answered(net: UserNetwork, dst: str) -> None:
    r = one_reply(net, info_request(), dst=dst)
    assert r[DHCP6_Reply].trid == 0x123456


async def test_request_from_a_slaac_address_and_another_port_is_answered_there(net: UserNetwork) -> None:
    r = one_reply(net, info_request(), src=GUEST6, sport=5000)
    assert r[IPv6].dst == GUEST6 and r[UDP].dport == 5000


async def test_without_client_identifier_the_reply_has_none(net: UserNetwork) -> None:
    opts = options_of(one_reply(net, info_request(client=False)))
    assert set(opts) == {2, 23}


async def test_options_are_sent_only_when_requested() -> None:
    async with running("user,dnssearch=lab.test,tftp=/srv,bootfile=boot.efi") as net:
        assert set(options_of(one_reply(net, info_request(oro=None)))) == {1, 2}
        assert set(options_of(one_reply(net, info_request(oro=[23])))) == {1, 2, 23}
        assert set(options_of(one_reply(net, info_request(oro=[24, 59])))) == {1, 2, 24, 59}
        assert set(options_of(one_reply(net, info_request(oro=[7, 32, 82, 0xFFFF])))) == {1, 2}
        assert set(options_of(one_reply(net, info_request(oro=[])))) == {1, 2}


async def test_domain_search_list_is_dnssearch_uncompressed() -> None:
    async with running("user,domainname=ignored.test,dnssearch=lab.test,dnssearch=example.lab.test") as net:
        r = one_reply(net, info_request())
        assert r[DHCP6OptDNSDomains].dnsdomains == ["lab.test.", "example.lab.test."]
        # RFC 8415 §10: no compression, so the shared suffix is written out twice.
        assert options_of(r)[24] == b"\3lab\4test\0\7example\3lab\4test\0"


async def test_domain_search_list_falls_back_to_domainname() -> None:
    async with running("user,domainname=lab.test") as net:
        assert options_of(one_reply(net, info_request()))[24] == b"\3lab\4test\0"


async def test_domain_search_list_leaves_out_names_with_empty_labels() -> None:
    async with running("user,dnssearch=a..b,dnssearch=ok.test.") as net:
        assert options_of(one_reply(net, info_request()))[24] == b"\2ok\4test\0"
    async with running("user,dnssearch=a..b") as net:
        assert 24 not in options_of(one_reply(net, info_request()))  # nothing left: no option


@pytest.mark.parametrize(
    ("options", "url"),
    [
        ("tftp=/srv,bootfile=pxelinux.0", b"tftp://[fec0::2]/pxelinux.0"),
        ("ipv6-net=fd00:1::/64,tftp=/srv,bootfile=efi/boot.efi", b"tftp://[fd00:1::2]/efi/boot.efi"),
        ("ipv6-net=fd00::/64,ipv6-host=fd00::1:5,tftp=/srv,bootfile=x", b"tftp://[fd00::1:5]/x"),
        ("bootfile=pxelinux.0", None),  # no TFTP server: libslirp would still send a URL
        ("tftp=/srv", None),  # no file: libslirp sends tftp://[…]/(null)
    ],
)
async def test_boot_file_url_needs_tftp_and_bootfile(options: str, url: bytes | None) -> None:
    async with running("user," + options) as net:
        opts = options_of(one_reply(net, info_request()))
        assert opts.get(59) == url
        if url is not None:
            assert one_reply(net, info_request())[DHCP6OptBootFileUrl].optdata == url


async def test_custom_ipv6_dns_is_the_dns_server() -> None:
    async with running("user,ipv6-net=fd00::/64,ipv6-dns=fd00::53") as net:
        r = one_reply(net, info_request())
        assert r[DHCP6OptDNSServers].dnsservers == ["fd00::53"] and r[IPv6].src == "fd00::2"


async def test_restrict_on_still_answers_without_dns_as_dhcpv4() -> None:
    """DHCP is a local service: restrict=on keeps it, and leaves the DNS server out as the DHCPv4
    server leaves out options 3 and 6 (libslirp drops every guest UDPv6 datagram under restrict)."""
    async with running("user,restrict=on,dnssearch=lab.test") as net:
        opts = options_of(one_reply(net, info_request()))
        assert set(opts) == {1, 2, 24}
        assert net.counters()["restricted"] == 0


async def test_ipv6_off_does_not_answer() -> None:
    async with running("user,ipv6=off") as net:
        assert net.dhcp6 is None
        feed(net, frame(info_request()))
        assert replies(net) == []


async def test_ipv4_off_still_answers() -> None:
    async with running("user,ipv4=off") as net:
        assert one_reply(net, info_request())[DHCP6OptDNSServers].dnsservers == ["fec0::3"]


@pytest.mark.parametrize(
    "msg",
    [
        DHCP6_Solicit(trid=1) / DHCP6OptClientId(duid=CLIENT_DUID) / DHCP6OptIA_NA(iaid=1),
        DHCP6_Request(trid=1) / DHCP6OptClientId(duid=CLIENT_DUID),
        DHCP6_Confirm(trid=1),
        DHCP6_Renew(trid=1),
        DHCP6_Rebind(trid=1),
        DHCP6_Release(trid=1),
        DHCP6_Reply(trid=1),  # a server's message
        DHCP6_RelayForward(hopcount=0, linkaddr="::", peeraddr=LL6),
        DHCP6(msgtype=0, trid=1),
        DHCP6(msgtype=255, trid=1),
    ],
    ids=lambda m: m.summary(),
)
async def test_other_message_types_are_not_answered(net: UserNetwork, msg: Packet) -> None:
    feed(net, frame(msg))
    assert replies(net) == []
    c = net.counters()
    assert c["unsupported"] == 1 and c["dhcp6_replies"] == 0 and c["errors"] == 0


# -- hostile messages: each one dropped and counted once ---------------------------------------

INFO = b"\x0b\x12\x34\x56"
CLIENT_ID = b"\0\1\0\x0a" + bytes(CLIENT_DUID)


@pytest.mark.parametrize(
    ("payload", "counter"),
    [
        (b"", "dhcp6_bad"),
        (b"\x0b", "dhcp6_bad"),
        (b"\x0b\x12\x34", "dhcp6_bad"),
        (INFO + b"\0", "dhcp6_bad"),  # 1-3 stray bytes: half an option header
        (INFO + b"\0\6\0", "dhcp6_bad"),
        (INFO + b"\0\6\0\4\0\x17", "dhcp6_bad"),  # option length past the end
        (INFO + b"\0\1\xff\xff" + bytes(100), "dhcp6_bad"),
        (INFO + CLIENT_ID + b"\0\6\0\2\0", "dhcp6_bad"),
        (INFO + b"\0\6\0\3\0\x17\0", "dhcp6_bad"),  # ORO of odd length
        (INFO + CLIENT_ID + CLIENT_ID, "dhcp6_bad"),  # two client identifiers
        (INFO + b"\0\1\1\1" + bytes(257), "dhcp6_bad"),  # client identifier over libslirp's 256
        (INFO + b"\0\3\0\x0c" + bytes(12), "dhcp6_bad"),  # IA_NA: asks for an address (RFC 8415 §16.12)
        (INFO + b"\0\4\0\4" + bytes(4), "dhcp6_bad"),  # IA_TA
        (INFO + b"\0\5\0\x18" + bytes(24), "dhcp6_bad"),  # a bare IA Address, as libslirp checks
        (INFO + b"\0\x19\0\x0c" + bytes(12), "dhcp6_bad"),  # IA_PD
        (INFO + b"\0\2\0\x0a\0\3\0\1\x02\0\0\0\0\1", "not_for_us"),  # another server's DUID
    ],
)
async def test_malformed_information_requests_are_dropped_and_counted(
    net: UserNetwork, payload: bytes, counter: str
) -> None:
    feed(net, frame(payload))
    assert replies(net) == []
    c = net.counters()
    assert c[counter] == 1 and c["dhcp6_replies"] == 0 and c["errors"] == 0


async def test_request_naming_our_server_identifier_is_answered(net: UserNetwork) -> None:
    r = one_reply(net, info_request() / DHCP6OptServerId(duid=DUID_LL(lladdr=GW_MAC)))
    assert r[DHCP6OptServerId].duid.lladdr == GW_MAC


@pytest.mark.parametrize("msg", [DHCP6_Solicit(trid=1), DHCP6_InfoRequest(trid=1)])
async def test_ia_options_in_any_request_get_no_reply(net: UserNetwork, msg: Packet) -> None:
    for ia in (DHCP6OptIA_NA(iaid=1), DHCP6OptIA_TA(iaid=1), DHCP6OptIA_PD(iaid=1)):
        feed(net, frame(msg / ia))
    assert replies(net) == []


async def test_oro_with_a_huge_count_and_long_client_id_fit_one_reply(net: UserNetwork) -> None:
    oro = b"\0\6" + struct.pack("!H", 1200) + b"\0\x17" * 600  # 600 requests, every one DNS
    r = one_reply(net, INFO + b"\0\1\1\0" + b"\xaa" * 256 + oro)
    opts = options_of(r)
    assert opts[1] == b"\xaa" * 256 and opts[23] == bytes.fromhex("fec0" + "00" * 13 + "03")


async def test_bad_udp_checksum_is_not_answered(net: UserNetwork) -> None:
    raw = bytearray(frame(info_request()))
    raw[14 + 40 + 6] ^= 0x55
    feed(net, bytes(raw))
    assert replies(net) == []
    assert net.counters()["bad_checksum"] == 1


async def test_dhcp_port_on_another_multicast_group_or_a_guest_address_is_not_answered(net: UserNetwork) -> None:
    feed(net, bytes(Ether(src=GUEST_MAC, dst="33:33:00:01:00:03") / IPv6(src=LL6, dst="ff02::1:3")
                    / UDP(sport=546, dport=547) / info_request()))  # fmt: skip
    feed(net, frame(info_request(), dst=GUEST6))
    feed(net, frame(info_request(), dport=546))  # to the group, but a client's port
    assert replies(net) == []
    assert net.counters()["errors"] == 0


async def test_tcp_to_the_dhcp_group_is_not_for_us(net: UserNetwork) -> None:
    from scapy.layers.inet import TCP

    feed(net, bytes(Ether(src=GUEST_MAC, dst="33:33:00:01:00:02") / IPv6(src=LL6, dst=ALL_DHCP)
                    / TCP(sport=546, dport=547, flags="S")))  # fmt: skip
    assert drain(net) == []
    assert net.counters()["not_for_us"] == 1


def dhcp6_message():  # type: ignore[no-untyped-def]
    """Mostly Information-requests, with option lists that are valid, truncated or lying."""

    def opt(code: int, body: bytes, lie: int | None) -> bytes:
        return struct.pack("!HH", code, len(body) if lie is None else lie) + body

    one = st.builds(
        opt,
        st.sampled_from([1, 2, 3, 5, 6, 6, 6, 6, 8, 16, 23, 24, 59, 0xFFFF]),
        st.binary(max_size=40),
        st.one_of(st.none(), st.none(), st.none(), st.integers(0, 0xFFFF)),
    )
    head = st.tuples(st.sampled_from([11, 11, 11, 1, 3, 7, 12, 0, 255]), st.binary(min_size=3, max_size=3))
    return st.builds(lambda h, opts, tail: bytes([h[0]]) + h[1] + b"".join(opts) + tail,
                     head, st.lists(one, max_size=6), st.sampled_from([b"", b"", b"", b"\0", b"\0\6\0"]))  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(messages=st.lists(dhcp6_message(), min_size=1, max_size=8))
def test_any_message_gets_one_well_formed_reply_or_one_counted_drop(messages: list[bytes]) -> None:
    asyncio.run(_storm(messages))


async def _storm(messages: list[bytes]) -> None:
    async with running("user,dnssearch=lab.test,tftp=/srv,bootfile=f") as net:
        keys = ("dhcp6_replies", "dhcp6_bad", "not_for_us", "unsupported")
        for msg in messages:
            before = net.counters()
            feed(net, frame(msg))
            after = net.counters()
            assert after["errors"] == 0
            assert sum(after[k] - before[k] for k in keys) == 1, (msg, after)
            out = replies(net)
            event("reply" if out else next(k for k in keys if after[k] > before[k]))
            assert len(out) == after["dhcp6_replies"] - before["dhcp6_replies"]
            for r in out:
                data = bytes(r[UDP].payload)
                assert data[0] == 7 and data[1:4] == msg[1:4]
                opts = options_of(r)
                assert opts[2] == SERVER_DUID
                assert set(opts) <= {1, 2, 23, 24, 59}


# -- TFTP over IPv6, where the Boot File URL points -------------------------------------------


async def test_tftp_answers_at_the_router_address_the_boot_url_names(tmp_path: Path) -> None:
    (tmp_path / "boot.efi").write_bytes(b"EFI" * 100)
    async with running(f"user,tftp={tmp_path},bootfile=boot.efi") as net:
        url = one_reply(net, info_request())[DHCP6OptBootFileUrl].optdata
        assert url == b"tftp://[fec0::2]/boot.efi"
        feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IPv6(src=GUEST6, dst="fec0::2")
                        / UDP(sport=2000, dport=69) / b"\0\1boot.efi\0octet\0"))  # fmt: skip
        [data] = [Ether(f) for f in drain(net)]
        assert data[IPv6].src == "fec0::2" and data[IPv6].dst == GUEST6 and data[UDP].sport == 69
        assert bytes(data[UDP].payload) == b"\0\3\0\1" + b"EFI" * 100
