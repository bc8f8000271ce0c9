"""IPv6 for the user-mode network: NDP, router advertisements for SLAAC, ICMPv6 echo.

The stack is the guest's router on the ``ipv6-net`` prefix (default
``fec0::/64``, as libslirp): it answers Neighbor Solicitations for its
addresses (RFC 4861 §7.2.4), answers Router Solicitations with a Router
Advertisement carrying the prefix with the autonomous flag, so the guest
configures itself by SLAAC (RFC 4862 §5.5), and the DNS server address
(RDNSS, RFC 8106); and it answers echo requests to its own addresses
(RFC 4443 §4.1). TCP and UDP over IPv6 go through the same NAT as IPv4;
UDP to the DHCPv6 servers' group (ff02::1:2) reaches the stateless server in
:mod:`appliance.nat.dhcp6`.

Addresses: the router is ``ipv6-host`` (default ``prefix::2``, link-local
``fe80::2``), DNS is ``ipv6-dns`` (default ``prefix::3``). Extension headers are not followed: packets carrying them are
dropped and counted.
"""

from __future__ import annotations

import ipaddress
import random
import struct
import time
from typing import TYPE_CHECKING

from appliance.nat.frames import (
    ETH_HLEN,
    ETH_P_IPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Ipv4,
    fold,
    ones_sum,
    special_mac,
    verify,
)

if TYPE_CHECKING:
    from appliance.nat.stack import UserNetwork

IPPROTO_ICMPV6 = 58
_IPV6 = struct.Struct("!IHBB16s16s")
_ETH = struct.Struct("!6s6sH")

ECHO_REQUEST = 128
ECHO_REPLY = 129
ROUTER_SOLICIT = 133
ROUTER_ADVERT = 134
NEIGHBOR_SOLICIT = 135
NEIGHBOR_ADVERT = 136

LINK_LOCAL_ROUTER = ipaddress.IPv6Address("fe80::2").packed
ALL_NODES = ipaddress.IPv6Address("ff02::1").packed
ALL_DHCP_SERVERS = ipaddress.IPv6Address("ff02::1:2").packed  # RFC 8415 §7.1
ROUTER_LIFETIME = 1800
# Unsolicited advertisements (RFC 4861 §6.2.1 defaults): a random interval between
# MinRtrAdvInterval (0.33 x Max) and MaxRtrAdvInterval, so the router lifetime above
# (3 x Max) never runs out on a guest that solicited only once, at boot.
MAX_RTR_ADV_INTERVAL = 600.0
MIN_RTR_ADV_INTERVAL = 198.0
VALID_LIFETIME = 86400
PREFERRED_LIFETIME = 14400


def pseudo_sum6(src: bytes, dst: bytes, next_header: int, length: int) -> int:
    """RFC 8200 §8.1 pseudo-header; the 128-bit addresses fold like any other words."""
    return int.from_bytes(src, "big") + int.from_bytes(dst, "big") + length + next_header


def multicast_mac(addr: bytes) -> bytes:
    """RFC 2464 §7: 33:33 and the low 32 bits of the address."""
    return b"\x33\x33" + addr[12:]


def solicited_node(addr: bytes) -> bytes:
    """RFC 4291 §2.7.1: ff02::1:ffXX:XXXX."""
    return ipaddress.IPv6Address("ff02::1:ff00:0").packed[:13] + addr[13:]


def parse_ipv6(pkt: memoryview) -> Ipv4 | None:
    """An IPv6 packet as the stack's generic packet record (proto = next header)."""
    if len(pkt) < 40:
        return None
    vtc, plen, nh, hop, src, dst = _IPV6.unpack_from(pkt)
    if vtc >> 28 != 6 or 40 + plen > len(pkt):
        return None
    return Ipv4(src, dst, nh, hop, 0, 0, (vtc >> 20) & 0xFF, pkt[:40], pkt[40 : 40 + plen])


def build_ipv6(
    dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, next_header: int, payload_len: int, *, hop: int = 64
) -> bytearray:
    """Ethernet + IPv6 headers (54 bytes); append the payload."""
    buf = bytearray(ETH_HLEN + 40)
    _ETH.pack_into(buf, 0, dst_mac, src_mac, ETH_P_IPV6)
    _IPV6.pack_into(buf, ETH_HLEN, 6 << 28, payload_len, next_header, hop, src, dst)
    return buf


def build_l4_v6(
    dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, next_header: int, msg: bytes | bytearray,
    csum_off: int, *, hop: int = 64,
) -> bytearray:  # fmt: skip
    """A whole frame whose upper-layer message gets its checksum at ``csum_off``."""
    frame = build_ipv6(dst_mac, src_mac, src, dst, next_header, len(msg), hop=hop)
    start = len(frame)
    frame += msg
    frame[start + csum_off : start + csum_off + 2] = b"\0\0"
    c = fold(pseudo_sum6(src, dst, next_header, len(msg)) + ones_sum(memoryview(frame)[start:]))
    if next_header == IPPROTO_UDP and c == 0:
        c = 0xFFFF
    struct.pack_into("!H", frame, start + csum_off, c)
    return frame


def _options_ok(opts: memoryview | bytes) -> bool:
    """Whether every NDP option has a nonzero length and fits (RFC 4861 §4.6: length 0 is invalid)."""
    i = 0
    while i < len(opts):
        if i + 2 > len(opts) or opts[i + 1] == 0:
            return False
        i += opts[i + 1] * 8
    return i == len(opts)


def _has_option(opts: memoryview | bytes, kind: int) -> bool:
    """Whether NDP options already checked by :func:`_options_ok` hold one of ``kind``."""
    i = 0
    while i < len(opts):
        if opts[i] == kind:
            return True
        i += opts[i + 1] * 8
    return False


class Ipv6:
    def __init__(self, net: UserNetwork) -> None:
        self.net = net
        cfg = net.config
        self.prefix = cfg.ipv6_net
        self.router = cfg.ipv6_host.packed
        self.dns = cfg.ipv6_dns.packed
        self.local = {self.router, self.dns, LINK_LOCAL_ROUTER}
        # When the next unsolicited advertisement is due; None until the guest shows it
        # speaks IPv6 (any packet of its), so a guest that never does sees none.
        self.next_ra: float | None = None

    def expire(self, now: float) -> None:
        """Housekeeping: the periodic unsolicited Router Advertisement (RFC 4861 §6.2.4)."""
        if self.next_ra is not None and now >= self.next_ra:
            self.next_ra = now + random.uniform(MIN_RTR_ADV_INTERVAL, MAX_RTR_ADV_INTERVAL)
            self.send_ra(ALL_NODES, multicast_mac(ALL_NODES))

    def in_prefix(self, addr: bytes) -> bool:
        return ipaddress.IPv6Address(addr) in self.prefix

    def guest_source_ok(self, addr: bytes) -> bool:
        return (addr[:8] == LINK_LOCAL_ROUTER[:8] or self.in_prefix(addr)) and addr not in self.local

    def input(self, body: memoryview, src_mac: bytes) -> None:
        st = self.net.stats
        pkt = parse_ipv6(body)
        if pkt is None:
            st.truncated += 1
            return
        if self.next_ra is None:
            # A guest that was up before us (a daemon restarted under it) solicits no more:
            # it gets the next advertisement within MaxRtrAdvInterval all the same.
            self.next_ra = time.monotonic() + random.uniform(MIN_RTR_ADV_INTERVAL, MAX_RTR_ADV_INTERVAL)
        if pkt.src == bytes(16):
            # A host without an address yet: its Router Solicitation is answered to all
            # nodes (RFC 4861 §6.2.6); duplicate address detection probes need no answer.
            if pkt.proto == IPPROTO_ICMPV6 and len(pkt.payload) >= 1 and pkt.payload[0] == ROUTER_SOLICIT:
                self._icmp(pkt, src_mac)
            else:
                st.not_for_us += 1
            return
        if not self.guest_source_ok(pkt.src):
            st.not_for_us += 1
            return
        self.net.learn_neighbor(pkt.src, src_mac)
        if pkt.proto == IPPROTO_ICMPV6:
            self._icmp(pkt, src_mac)
        elif pkt.proto in (IPPROTO_TCP, IPPROTO_UDP):
            if (pkt.dst[0] == 0xFF and not (pkt.dst == ALL_DHCP_SERVERS and pkt.proto == IPPROTO_UDP)
                    or pkt.dst[:8] == LINK_LOCAL_ROUTER[:8] and pkt.dst != LINK_LOCAL_ROUTER):  # fmt: skip
                st.not_for_us += 1  # the one group we take is the DHCPv6 servers' (dhcp6.py)
                return
            self.net.l4_input(pkt, src_mac)
        else:
            st.unsupported += 1

    def _icmp(self, pkt: Ipv4, src_mac: bytes) -> None:
        st = self.net.stats
        msg = pkt.payload
        if len(msg) < 4:
            st.truncated += 1
            return
        if not verify(msg, pseudo_sum6(pkt.src, pkt.dst, IPPROTO_ICMPV6, len(msg))):
            st.bad_checksum += 1
            return
        kind = msg[0]
        if kind == NEIGHBOR_SOLICIT:
            self._neighbor_solicit(pkt, src_mac)
        elif kind == ROUTER_SOLICIT:
            # RFC 4861 §6.1.1: only from the link itself (hop limit 255), code 0, 8 bytes
            # or more, and every option with a length above zero.
            if pkt.ttl != 255 or msg[1] != 0 or len(msg) < 8 or not _options_ok(msg[8:]):
                st.not_for_us += 1
                return
            if pkt.src == bytes(16):
                if _has_option(msg[8:], 1):
                    st.not_for_us += 1  # §6.1.1: no source link-layer address without a source address
                    return
                self.send_ra(ALL_NODES, multicast_mac(ALL_NODES))
                return
            self.send_ra(pkt.src, src_mac)
        elif kind == ECHO_REQUEST and len(msg) < 8:
            st.truncated += 1  # RFC 4443 §4.1: identifier and sequence number are not optional
        elif kind == ECHO_REQUEST and pkt.dst in self.local:
            st.icmp_echo_local += 1
            reply = bytearray(msg)
            reply[0] = ECHO_REPLY
            self._send_icmp(pkt.dst, pkt.src, src_mac, reply)
        elif kind == ECHO_REQUEST:
            if self.net.config.restrict:
                st.restricted += 1
            elif not self.net.routable(pkt.dst):
                st.not_for_us += 1
            else:
                self.net.icmp.forward(pkt.src, pkt.dst, bytes(msg))
        elif kind == NEIGHBOR_ADVERT:
            pass  # already learned from the Ethernet source
        else:
            st.unsupported += 1

    def _neighbor_solicit(self, pkt: Ipv4, src_mac: bytes) -> None:
        msg = pkt.payload
        if len(msg) < 24 or pkt.ttl != 255 or msg[1] != 0 or not _options_ok(msg[24:]):
            self.net.stats.not_for_us += 1  # RFC 4861 §7.1.1
            return
        target = bytes(msg[8:24])
        if target not in self.local:
            return
        opt = struct.pack("!BB6s", 2, 1, special_mac(target))  # target link-layer address
        na = struct.pack("!BBHI16s", NEIGHBOR_ADVERT, 0, 0, 0xE0000000, target) + opt  # Router|Solicited|Override
        self._send_icmp(target, pkt.src, src_mac, bytearray(na), hop=255)

    def send_ra(self, dst: bytes, dst_mac: bytes) -> None:
        """A Router Advertisement (RFC 4861 §4.2) with prefix, MTU and RDNSS options."""
        ra = bytearray(struct.pack("!BBHBBHII", ROUTER_ADVERT, 0, 0, 64, 0, ROUTER_LIFETIME, 0, 0))
        ra += struct.pack("!BB6s", 1, 1, special_mac(LINK_LOCAL_ROUTER))  # source link-layer address
        ra += struct.pack("!BBHI", 5, 1, 0, self.net.mtu)  # MTU: the link's (UserNetwork.set_mtu)
        ra += struct.pack(
            "!BBBBIII16s", 3, 4, self.prefix.prefixlen, 0xC0, VALID_LIFETIME, PREFERRED_LIFETIME, 0,
            self.prefix.network_address.packed,
        )  # prefix information: on-link and autonomous (SLAAC)  # fmt: skip
        ra += struct.pack("!BBHI16s", 25, 3, 0, 3600, self.dns)  # RDNSS (RFC 8106 §5.1)
        self._send_icmp(LINK_LOCAL_ROUTER, dst, dst_mac, ra, hop=255)

    def _send_icmp(self, src: bytes, dst: bytes, dst_mac: bytes, msg: bytearray, *, hop: int = 64) -> None:
        frame = build_l4_v6(dst_mac, special_mac(src), src, dst, IPPROTO_ICMPV6, msg, 2, hop=hop)
        self.net.output_v6(frame)

    def emit_icmp(self, src: bytes, dst: bytes, msg: bytearray) -> None:
        mac = self.net.mac_for(dst)
        if mac is not None:
            self._send_icmp(src, dst, mac, msg)

    def solicit(self, target: bytes) -> None:
        """Ask for a guest address's MAC (RFC 4861 §7.2.2)."""
        group = solicited_node(target)
        ns = struct.pack("!BBHI16s", NEIGHBOR_SOLICIT, 0, 0, 0, target)
        ns += struct.pack("!BB6s", 1, 1, special_mac(self.router))
        self._send_icmp(self.router, group, multicast_mac(group), bytearray(ns), hop=255)
