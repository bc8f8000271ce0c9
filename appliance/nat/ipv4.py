"""IPv4 fragment reassembly (RFC 791 §3.2, RFC 815) with bounded memory.

Limits, each enforced before any byte is stored: at most ``MAX_DATAGRAMS``
datagrams in progress, ``MAX_BYTES`` buffered over all of them, 65535 bytes and
``MAX_FRAGMENTS`` pieces per datagram, and ``TIMEOUT`` seconds for a datagram to complete (Linux uses 30 s).
Overlapping fragments drop the whole datagram, the policy Linux adopted for
IPv4 and RFC 5722 mandates for IPv6: overlaps only serve to evade filters.
An exact duplicate fragment (same offset and length) is harmless and ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from appliance.nat.frames import IP_MF, IP_OFFMASK, Ipv4

MAX_DATAGRAMS = 64
MAX_BYTES = 1 << 20
MAX_DATAGRAM = 65535
# Fragments held for one datagram. A 64 KiB datagram over a 1280-byte MTU is 52;
# more only come from a sender cutting tiny pieces, each costing an overlap check
# and an object several times its size (FreeBSD's maxfragsperpacket is 16).
MAX_FRAGMENTS = 64
TIMEOUT = 30.0


@dataclass(slots=True)
class _Partial:
    deadline: float
    pieces: dict[int, bytes] = field(default_factory=dict)  # offset → data
    size: int = 0
    total: int | None = None  # payload length, known once the last fragment came
    first: Ipv4 | None = None


class Reassembler:
    def __init__(self) -> None:
        self._partial: dict[tuple[bytes, bytes, int, int], _Partial] = {}
        self._bytes = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._partial)

    @property
    def buffered(self) -> int:
        return self._bytes

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        # Insertion order is deadline order: every entry gets the same timeout.
        while self._partial:
            key, p = next(iter(self._partial.items()))
            if p.deadline > now:
                break
            self._drop(key)

    def _drop(self, key: tuple[bytes, bytes, int, int]) -> None:
        p = self._partial.pop(key)
        self._bytes -= p.size
        self.dropped += 1

    def add(self, ip: Ipv4, now: float | None = None) -> Ipv4 | None:
        """Take one fragment; return the whole datagram when it is complete."""
        now = time.monotonic() if now is None else now
        self.expire(now)
        offset = (ip.frag & IP_OFFMASK) * 8
        more = bool(ip.frag & IP_MF)
        data = bytes(ip.payload)
        end = offset + len(data)
        key = (ip.src, ip.dst, ip.proto, ip.ident)
        bad = end + len(ip.header) > MAX_DATAGRAM or (more and (len(data) == 0 or len(data) % 8))
        p = self._partial.get(key)
        if bad:
            if p is not None:
                self._drop(key)
            else:
                self.dropped += 1
            return None
        if p is None:
            if len(self._partial) >= MAX_DATAGRAMS:
                self._drop(next(iter(self._partial)))
            p = self._partial[key] = _Partial(now + TIMEOUT)
        if not more:
            if p.total is not None and p.total != end:
                self._drop(key)
                return None
            p.total = end
        if p.total is not None and end > p.total:
            self._drop(key)
            return None
        old = p.pieces.get(offset)
        if old is not None and len(old) == len(data):
            return None
        if len(p.pieces) >= MAX_FRAGMENTS:
            self._drop(key)
            return None
        for o, d in p.pieces.items():
            if o < end and offset < o + len(d):
                self._drop(key)
                return None
        while self._bytes + len(data) > MAX_BYTES and self._partial:
            victim = next(iter(self._partial))
            self._drop(victim)
            if victim == key:
                return None
        p.pieces[offset] = data
        p.size += len(data)
        self._bytes += len(data)
        if offset == 0:
            # Its header, copied: a view would pin the guest's whole frame (any
            # padding after the IP total length) with only ``data`` counted.
            p.first = Ipv4(ip.src, ip.dst, ip.proto, ip.ttl, ip.ident, 0, ip.tos, memoryview(bytes(ip.header)),
                           memoryview(b""))  # fmt: skip
        if p.total is None or p.size != p.total or p.first is None:
            return None
        # No overlaps and the sizes add up, so the pieces tile [0, total) exactly.
        del self._partial[key]
        self._bytes -= p.size
        payload = b"".join(p.pieces[o] for o in sorted(p.pieces))
        f = p.first
        return Ipv4(f.src, f.dst, f.proto, f.ttl, f.ident, 0, f.tos, f.header, memoryview(payload))
