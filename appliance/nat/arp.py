"""ARP (RFC 826): answer for the stack's virtual addresses and learn the guest's MAC.

The table is small and bounded: a guest claiming thousands of addresses
evicts its own oldest entries and nothing else.
"""

from __future__ import annotations

from appliance.nat.frames import BROADCAST_MAC, build_arp

ARP_REQUEST = 1
ARP_REPLY = 2
MAX_ENTRIES = 256


class ArpTable:
    """IPv4 address → MAC of guests on the virtual LAN."""

    def __init__(self) -> None:
        self._map: dict[bytes, bytes] = {}

    def learn(self, ip: bytes, mac: bytes) -> None:
        if mac[0] & 1 or ip == b"\0\0\0\0":
            return  # multicast/broadcast MACs and unconfigured senders are not addresses
        if self._map.get(ip) == mac:
            return
        self._map.pop(ip, None)
        if len(self._map) >= MAX_ENTRIES:
            del self._map[next(iter(self._map))]
        self._map[ip] = mac

    def lookup(self, ip: bytes) -> bytes | None:
        return self._map.get(ip)

    def forget_mac(self, mac: bytes) -> list[bytes]:
        """Drop every address ``mac`` had; returns them."""
        gone = [ip for ip, m in self._map.items() if m == mac]
        for ip in gone:
            del self._map[ip]
        return gone

    def __len__(self) -> int:
        return len(self._map)


def reply_for(request_sha: bytes, request_spa: bytes, our_mac: bytes, our_ip: bytes) -> bytes:
    return build_arp(request_sha, our_mac, ARP_REPLY, our_mac, our_ip, request_sha, request_spa)


def request_for(our_mac: bytes, our_ip: bytes, target_ip: bytes) -> bytes:
    return build_arp(BROADCAST_MAC, our_mac, ARP_REQUEST, our_mac, our_ip, bytes(6), target_ip)
