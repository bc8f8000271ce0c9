"""DHCP server: the whole DORA exchange with scapy-built frames, and the lease table."""

from __future__ import annotations

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from appliance.nat import UserNetConfig, UserNetwork
from appliance.nat.dhcp import encode_search

from .conftest import GUEST_MAC, drain, feed


def dhcp_frame(mac: str, msg: str, xid: int = 0x1234, extra=(), ciaddr="0.0.0.0", src="0.0.0.0", flags=0):
    opts = [("message-type", msg), *extra, "end"]
    chaddr = bytes.fromhex(mac.replace(":", "")) + bytes(10)
    return bytes(
        Ether(src=mac, dst="ff:ff:ff:ff:ff:ff")
        / IP(src=src, dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / BOOTP(op=1, xid=xid, chaddr=chaddr, ciaddr=ciaddr, flags=flags)
        / DHCP(options=opts)
    )


def replies(net: UserNetwork) -> list[tuple[Ether, dict]]:
    out = []
    for raw in drain(net):
        pkt = Ether(raw)
        if DHCP in pkt:
            opts = {o[0]: o[1:] for o in pkt[DHCP].options if isinstance(o, tuple)}
            out.append((pkt, opts))
    return out


@pytest.fixture
async def rich() -> UserNetwork:
    cfg = UserNetConfig.from_string(
        "user,hostname=vm1,domainname=example.test,dnssearch=example.test,dnssearch=lab.example.test"
    )
    n = UserNetwork(cfg)
    await n.start()
    yield n
    await n.stop()


async def test_discover_request_ack_gives_first_lease_with_all_options(rich: UserNetwork) -> None:
    """DISCOVER → OFFER of 10.0.2.15, REQUEST → ACK with options 1,3,6,12,15,28,51,54,119."""
    feed(rich, dhcp_frame(GUEST_MAC, "discover"))
    [(offer, o)] = replies(rich)
    assert o["message-type"] == (2,)
    assert offer[BOOTP].yiaddr == "10.0.2.15"
    assert offer[Ether].src == "52:55:0a:00:02:02"
    assert offer[IP].src == "10.0.2.2"
    feed(rich, dhcp_frame(GUEST_MAC, "request", extra=[("requested_addr", "10.0.2.15"), ("server_id", "10.0.2.2")]))
    [(ack, o)] = replies(rich)
    assert o["message-type"] == (5,)
    assert ack[BOOTP].yiaddr == "10.0.2.15"
    assert ack[BOOTP].xid == 0x1234
    assert o["subnet_mask"] == ("255.255.255.0",)
    assert o["router"] == ("10.0.2.2",)
    assert o["name_server"] == ("10.0.2.3",)
    assert o["hostname"] == (b"vm1",)
    assert o["domain"] == (b"example.test",)
    assert o["broadcast_address"] == ("10.0.2.255",)
    assert o["lease_time"] == (86400,)
    assert o["server_id"] == ("10.0.2.2",)
    assert o[119] == (b"\x07example\x04test\x00\x03lab\xc0\x00",)
    assert rich.dhcp.leases[bytes.fromhex(GUEST_MAC.replace(":", ""))].ip == bytes([10, 0, 2, 15])


def test_domain_search_uses_rfc3397_compression() -> None:
    """The second name points back at the first's 'example.test' suffix (RFC 3397 §2)."""
    enc = encode_search(("example.test", "lab.example.test"))
    assert enc == b"\x07example\x04test\x00" + b"\x03lab\xc0\x00"


def test_domain_search_encoder_never_raises_and_leaves_out_overlong_names() -> None:
    # The encoder takes any name without raising (a non-ASCII one is its UTF-8 bytes; the
    # config drops such lists before they get here, as libslirp); a name over 255 bytes on the
    # wire (RFC 1035 §2.3.4) or with a 64-byte label is left out.
    assert encode_search(("exämple.test",)) == b"\x08ex\xc3\xa4mple\x04test\x00"
    long_name = ".".join(["a" * 63] * 4)  # 4 x 64 + 1 = 257 bytes encoded
    assert encode_search((long_name, "a" * 64 + ".test", "ok.test")) == b"\x02ok\x04test\x00"
    fits = ".".join(["a" * 63] * 3 + ["b" * 61])  # 3 x 64 + 62 + 1 = 255
    assert len(encode_search((fits,))) == 255


async def test_leases_are_per_mac_and_stable(net: UserNetwork) -> None:
    feed(net, dhcp_frame(GUEST_MAC, "discover"))
    feed(net, dhcp_frame("52:54:00:00:00:02", "discover", xid=2))
    offers = [p[BOOTP].yiaddr for p, _ in replies(net)]
    assert offers == ["10.0.2.15", "10.0.2.16"]
    feed(net, dhcp_frame(GUEST_MAC, "discover", xid=3))
    assert [p[BOOTP].yiaddr for p, _ in replies(net)] == ["10.0.2.15"]


async def test_request_for_foreign_address_is_nakked(net: UserNetwork) -> None:
    feed(net, dhcp_frame(GUEST_MAC, "request", extra=[("requested_addr", "192.168.1.5")]))
    [(nak, o)] = replies(net)
    assert o["message-type"] == (6,)
    assert nak[IP].dst == "255.255.255.255"


async def test_init_reboot_request_for_an_address_never_leased_to_the_client_is_nakked(net: UserNetwork) -> None:
    feed(net, dhcp_frame(GUEST_MAC, "request", extra=[("requested_addr", "10.0.2.20")]))
    [(nak, o)] = replies(net)
    assert o["message-type"] == (6,)
    assert nak[BOOTP].yiaddr == "0.0.0.0"


async def test_selecting_request_for_free_pool_address_is_acked(net: UserNetwork) -> None:
    feed(net, dhcp_frame(GUEST_MAC, "request", extra=[("requested_addr", "10.0.2.20"), ("server_id", "10.0.2.2")]))
    [(ack, o)] = replies(net)
    assert o["message-type"] == (5,)
    assert ack[BOOTP].yiaddr == "10.0.2.20"


async def test_release_frees_the_address_for_another_client(net: UserNetwork) -> None:
    sel = [("requested_addr", "10.0.2.15"), ("server_id", "10.0.2.2")]
    feed(net, dhcp_frame(GUEST_MAC, "request", extra=sel))
    replies(net)
    feed(net, dhcp_frame("52:54:00:00:00:09", "request", xid=9, extra=sel))
    assert replies(net)[0][1]["message-type"] == (6,)  # taken
    feed(net, dhcp_frame(GUEST_MAC, "release", ciaddr="10.0.2.15", src="10.0.2.15",
                         extra=[("server_id", "10.0.2.2")]))  # fmt: skip
    assert replies(net) == []
    feed(net, dhcp_frame("52:54:00:00:00:09", "request", xid=9, extra=sel))
    assert replies(net)[0][1]["message-type"] == (5,)


async def test_inform_gets_config_without_lease_time(net: UserNetwork) -> None:
    feed(net, dhcp_frame(GUEST_MAC, "inform", ciaddr="10.0.2.15", src="10.0.2.15"))
    [(ack, o)] = replies(net)
    assert o["message-type"] == (5,)
    assert "lease_time" not in o
    assert ack[BOOTP].yiaddr == "0.0.0.0"
    assert ack[IP].dst == "10.0.2.15"


async def test_request_naming_another_server_is_silently_dropped(net: UserNetwork) -> None:
    feed(net, dhcp_frame(GUEST_MAC, "discover"))
    replies(net)
    feed(net, dhcp_frame(GUEST_MAC, "request", extra=[("requested_addr", "10.0.2.15"), ("server_id", "10.9.9.9")]))
    assert replies(net) == []
    assert bytes.fromhex(GUEST_MAC.replace(":", "")) not in net.dhcp.leases


async def test_pool_exhaustion_stays_silent(net: UserNetwork) -> None:
    for i in range(20):
        feed(net, dhcp_frame(f"52:54:00:00:01:{i:02x}", "discover", xid=i))
    assert len(replies(net)) == 16


async def test_broadcast_flag_gets_broadcast_offer(net: UserNetwork) -> None:
    feed(net, dhcp_frame(GUEST_MAC, "discover", flags=0x8000))
    [(offer, _)] = replies(net)
    assert offer[IP].dst == "255.255.255.255"
    assert offer[Ether].dst == "ff:ff:ff:ff:ff:ff"
