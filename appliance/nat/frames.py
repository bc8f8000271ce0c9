"""Wire formats: Ethernet, ARP, IPv4, UDP, TCP and ICMP headers, and the Internet checksum.

Parsing copies fixed headers out with :func:`struct.unpack_from`; payloads stay
memoryview slices of the one copy made when the frame left the guest. Builders
write a whole frame into one ``bytearray`` so each outgoing frame is a single
allocation.

The Internet checksum (RFC 1071) is computed without touching single bytes in
Python: the buffer becomes one big integer with :meth:`int.from_bytes`, and
since 2**16 ≡ 1 (mod 0xFFFF) the ones'-complement sum of its 16-bit words is
that integer modulo 0xFFFF (RFC 1071 §2(B), "end-around carry" is exactly
arithmetic modulo 2**16 - 1). Both steps run in C.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

ETH_HLEN = 14
ETH_P_IPV4 = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST_MAC = b"\xff" * 6

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17

IP_MF = 0x2000
IP_DF = 0x4000
IP_OFFMASK = 0x1FFF

_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """Ones'-complement sum of ``data`` as 16-bit big-endian words, not yet folded.

    An odd trailing byte is padded with zero (RFC 768/793). Partial sums of
    even-length pieces may be added together and folded once at the end.
    """
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    return n


def fold(total: int) -> int:
    """Turn a sum of :func:`ones_sum` values into the checksum field value."""
    if total == 0:
        return 0xFFFF
    r = total % 0xFFFF
    return 0xFFFF - r if r else 0


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum of ``data`` (plus an already summed pseudo-header)."""
    return fold(initial + ones_sum(data))


def verify(data: bytes | bytearray | memoryview, initial: int = 0) -> bool:
    """True when ``data`` (checksum field included) sums to 0xFFFF."""
    n = int.from_bytes(data, "big")  # ones_sum() inlined: this runs twice per frame
    if len(data) & 1:
        n <<= 8
    total = initial + n
    return total != 0 and total % 0xFFFF == 0


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Sum of the pseudo-header (RFC 793 §3.1, RFC 768; RFC 8200 §8.1 for 16-byte addresses).

    Word sums are what the checksum needs, and a 128-bit address or a 32-bit
    length contributes the same value modulo 0xFFFF as its 16-bit words.
    """
    return int.from_bytes(src, "big") + int.from_bytes(dst, "big") + proto + length


SPECIAL_MAC4 = b"\x52\x55"  # special_mac's first two bytes for an IPv4 address
SPECIAL_MAC6 = b"\x52\x56"  # and for an IPv6 one
SPECIAL_MAC_PREFIXES = (SPECIAL_MAC4, SPECIAL_MAC6)


def special_mac(addr: bytes) -> bytes:
    """The MAC of an address the stack emulates, as libslirp gives it (and so as guests and their
    users know it): 52:55 and the four bytes of an IPv4 address (10.0.2.3 is 52:55:0a:00:02:03),
    52:56 and the last four of an IPv6 one (fe80::2 is 52:56:00:00:00:02)."""
    return (SPECIAL_MAC4 + addr) if len(addr) == 4 else (SPECIAL_MAC6 + addr[12:16])


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def ip_str(addr: bytes) -> str:
    if len(addr) == 16:
        return socket.inet_ntop(socket.AF_INET6, addr)
    return socket.inet_ntop(socket.AF_INET, addr)


@dataclass(slots=True)
class Ipv4:
    """A parsed IPv4 packet (after reassembly, if it was fragmented)."""

    src: bytes
    dst: bytes
    proto: int
    ttl: int
    ident: int
    frag: int  # flags and offset word, as on the wire
    tos: int
    header: memoryview
    payload: memoryview


def parse_eth(frame: memoryview) -> tuple[bytes, bytes, int] | None:
    if len(frame) < ETH_HLEN:
        return None
    dst, src, ethertype = _ETH.unpack_from(frame)
    return dst, src, ethertype


def parse_ipv4(pkt: memoryview) -> Ipv4 | None:
    """Check and split one IPv4 header; None when it is malformed (RFC 791 §3.1, RFC 1122 §3.2.1)."""
    if len(pkt) < 20:
        return None
    vihl, tos, total, ident, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(pkt)
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20 or total < ihl or total > len(pkt):
        return None
    header = pkt[:ihl]
    if not verify(header):
        return None
    return Ipv4(src, dst, proto, ttl, ident, frag, tos, header, pkt[ihl:total])


def build_ipv4(
    dst_mac: bytes,
    src_mac: bytes,
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    *,
    ident: int = 0,
    ttl: int = 64,
    frag: int = IP_DF,
    tos: int = 0,
) -> bytearray:
    """Ethernet + IPv4 headers (34 bytes) with the IP checksum filled in; append the payload."""
    buf = bytearray(ETH_HLEN + 20)
    _ETH.pack_into(buf, 0, dst_mac, src_mac, ETH_P_IPV4)
    _IPV4.pack_into(buf, ETH_HLEN, 0x45, tos, 20 + payload_len, ident & 0xFFFF, frag, ttl, proto, 0, src, dst)
    struct.pack_into("!H", buf, ETH_HLEN + 10, checksum(memoryview(buf)[ETH_HLEN:]))
    return buf


def build_udp(
    dst_mac: bytes,
    src_mac: bytes,
    src: bytes,
    sport: int,
    dst: bytes,
    dport: int,
    payload: bytes | bytearray | memoryview,
    *,
    ident: int = 0,
) -> bytearray:
    """A whole Ethernet/IPv4/UDP frame with both checksums."""
    length = 8 + len(payload)
    buf = build_ipv4(dst_mac, src_mac, src, dst, IPPROTO_UDP, length, ident=ident, frag=0)
    off = len(buf)
    buf += _UDP.pack(sport, dport, length, 0)
    buf += payload
    c = checksum(memoryview(buf)[off:], pseudo_sum(src, dst, IPPROTO_UDP, length))
    struct.pack_into("!H", buf, off + 6, c or 0xFFFF)
    return buf


def parse_udp(ip: Ipv4, *, trusted: bool = False) -> tuple[int, int, memoryview] | None:
    """Ports and payload of a UDP datagram; None if short or the checksum is wrong (RFC 768).

    :param trusted: the guest's NIC said the checksum is partial or already
        checked (virtio-net NEEDS_CSUM/DATA_VALID), so it is not verified.
    """
    seg = ip.payload
    if len(seg) < 8:
        return None
    sport, dport, length, csum = _UDP.unpack_from(seg)
    if length < 8 or length > len(seg):
        return None
    seg = seg[:length]
    if csum == 0 and len(ip.src) == 16:
        return None  # RFC 8200 §8.1: the checksum is mandatory over IPv6
    if csum and not trusted and not verify(seg, pseudo_sum(ip.src, ip.dst, IPPROTO_UDP, length)):
        return None
    return sport, dport, seg[8:]


@dataclass(slots=True, frozen=True)
class Arp:
    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes


def parse_arp(pkt: memoryview) -> Arp | None:
    """An Ethernet/IPv4 ARP packet (RFC 826); None for other hardware or protocol types."""
    if len(pkt) < _ARP.size:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(pkt)
    if htype != 1 or ptype != ETH_P_IPV4 or hlen != 6 or plen != 4:
        return None
    return Arp(op, sha, spa, tha, tpa)


def build_arp(dst_mac: bytes, src_mac: bytes, op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    frame = _ETH.pack(dst_mac, src_mac, ETH_P_ARP) + _ARP.pack(1, ETH_P_IPV4, 6, 4, op, sha, spa, tha, tpa)
    return frame + bytes(60 - len(frame))  # pad to the Ethernet minimum
