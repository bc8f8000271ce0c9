"""DNS proxy at the ``dns=`` address (RFC 1035): local names answered here, the rest forwarded.

Upstream servers come from the host's ``/etc/resolv.conf`` (IPv4 entries), or
from the config for tests. Each forwarded query gets a fresh transaction id of
ours, so ids chosen by the guest can neither collide with each other nor be
used to inject answers; pending queries are bounded and time out.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.nat.stack import UserNetwork

DNS_PORT = 53
PER_SERVER_TIMEOUT = 2.0
MAX_PENDING = 512
# The largest query forwarded. A question is at most 255 + 16 bytes; with an
# EDNS OPT record (cookies, padding: RFC 7830 pads to 468) queries stay far
# below this. Held for every pending query, so it bounds their memory too.
MAX_QUERY = 4096
_HEADER = struct.Struct("!HHHHHH")
TYPE_A = 1
TYPE_AAAA = 28
TYPE_ANY = 255
CLASS_IN = 1
CLASS_ANY = 255
MAX_NAME = 255
_OPCODE = 0x7800  # RFC 1035 §4.1.1: 0 is a standard query


def host_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """IPv4 ``nameserver`` lines of a resolv.conf (resolv.conf(5))."""
    servers: list[tuple[str, int]] = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return servers
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                socket.inet_aton(parts[1])
            except OSError:
                continue
            servers.append((parts[1], DNS_PORT))
    return servers


def parse_question(msg: bytes) -> tuple[int, int, str, int, int, int] | None:
    """(id, flags, name, qtype, qclass, end offset) of a one-question query, or None.

    The name is in lower case with a dot or backslash inside a label escaped
    by a backslash (RFC 1035 §5.1), and other bytes beyond ASCII as ``\\xNN``:
    the label ``gateway.lab`` must not read as the two labels of a local name.
    """
    if len(msg) < _HEADER.size:
        return None
    qid, flags, qd, _an, _ns, _ar = _HEADER.unpack_from(msg)
    if flags & 0x8000 or qd != 1:
        return None
    labels: list[bytes] = []
    i = _HEADER.size
    while True:
        if i >= len(msg):
            return None
        n = msg[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0 or i + 1 + n > len(msg):
            return None  # a query's only name cannot be compressed
        labels.append(msg[i + 1 : i + 1 + n])
        i += 1 + n
        if i - _HEADER.size > MAX_NAME - 1:
            return None  # RFC 1035 §2.3.4: 255 octets at most, the final zero included
    if i + 4 > len(msg):
        return None
    qtype, qclass = struct.unpack_from("!HH", msg, i)
    name = ".".join(
        lab.replace(b"\\", b"\\\\").replace(b".", b"\\.").decode("ascii", "backslashreplace").lower() for lab in labels
    )
    return qid, flags, name, qtype, qclass, i + 4


def answer(
    msg: bytes, qend: int, qid: int, flags: int, addr: bytes | None, qtype: int, addr6: bytes | None = None
) -> bytes:
    """A response echoing the question with an A and/or AAAA record (or none: NODATA)."""
    rd = flags & 0x0100
    records = b""
    count = 0
    if addr is not None and qtype in (TYPE_A, TYPE_ANY):
        records += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 3600, 4) + addr
        count += 1
    if addr6 is not None and qtype in (TYPE_AAAA, TYPE_ANY):
        records += struct.pack("!HHHIH", 0xC00C, TYPE_AAAA, CLASS_IN, 3600, 16) + addr6
        count += 1
    head = _HEADER.pack(qid, 0x8400 | 0x0080 | rd, 1, count, 0, 0)
    return head + msg[_HEADER.size : qend] + records


class _Query:
    """A forwarded query: who asked, with which id, and where it was sent."""

    __slots__ = ("guest", "gport", "qid", "dns_ip", "wire", "server", "deadline")

    def __init__(self, guest: bytes, gport: int, qid: int, dns_ip: bytes, wire: bytes) -> None:
        self.guest = guest
        self.gport = gport
        self.qid = qid
        self.dns_ip = dns_ip
        self.wire = wire  # the query with our transaction id
        self.server = 0
        self.deadline = 0.0


class DnsProxy:
    def __init__(self, net: UserNetwork) -> None:
        self.net = net
        cfg = net.config
        self.servers = list(cfg.nameservers) if cfg.nameservers is not None else host_nameservers()
        self.local: dict[str, bytes] = {}
        for name in ("gateway", "_gateway", "host"):
            self.local[name] = cfg.host.packed
        self.local["dns"] = cfg.dns.packed
        for name, addr in cfg.hosts.items():
            self.local[name.lower().rstrip(".")] = addr.packed
        self.local6: dict[str, bytes] = {}
        if cfg.ipv6:
            for name in ("gateway", "_gateway", "host"):
                self.local6[name] = cfg.ipv6_host.packed
            self.local6["dns"] = cfg.ipv6_dns.packed
        if cfg.domainname:
            for table in (self.local, self.local6):
                for name, packed in list(table.items()):
                    table[f"{name}.{cfg.domainname.lower().rstrip('.')}"] = packed
        self._sock: socket.socket | None = None
        self._pending: dict[int, _Query] = {}
        self._next_id = int.from_bytes(os.urandom(2), "big")

    def input(self, src: bytes, sport: int, dst: bytes, payload: memoryview) -> None:
        c = self.net.stats
        msg = bytes(payload)
        q = parse_question(msg)
        if q is None:
            c.dns_dropped += 1
            return
        qid, flags, name, qtype, qclass, qend = q
        # Local names are class IN addresses for standard queries; anything else
        # (an UPDATE, class CHAOS) is the upstream's to answer or refuse.
        if not flags & _OPCODE and qclass in (CLASS_IN, CLASS_ANY):
            addr = self.local.get(name)
            if addr is not None:
                c.dns_local += 1
                self._reply(src, sport, dst, answer(msg, qend, qid, flags, addr, qtype, self.local6.get(name)))
                return
        self._forward(src, sport, dst, msg, qid)

    def _forward(self, src: bytes, sport: int, dst: bytes, msg: bytes, qid: int) -> None:
        c = self.net.stats
        if self.net.config.restrict:
            c.restricted += 1  # restrict=on: nothing reaches the host's resolvers (local names still answer)
            return
        if not self.servers:
            c.dns_dropped += 1
            return
        self._expire(time.monotonic())
        if len(self._pending) >= MAX_PENDING or len(msg) > MAX_QUERY:
            c.dns_dropped += 1
            return
        if self._sock is None:
            try:
                self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            except OSError:
                c.dns_dropped += 1
                return
            self._sock.setblocking(False)
            self.net.loop.add_reader(self._sock.fileno(), self._readable)
        for _ in range(8):
            our_id = self._next_id = (self._next_id + 1) & 0xFFFF
            if our_id not in self._pending:
                break
        else:
            c.dns_dropped += 1
            return
        q = _Query(src, sport, qid, dst, struct.pack("!H", our_id) + msg[2:])
        self._pending[our_id] = q
        c.dns_forwarded += 1
        self._send(our_id, q, time.monotonic())

    def _send(self, our_id: int, q: _Query, now: float) -> None:
        """Send (or resend) a query to its current upstream server."""
        assert self._sock is not None
        q.deadline = now + PER_SERVER_TIMEOUT
        try:
            self._sock.sendto(q.wire, self.servers[q.server])
        except OSError:
            self.net.stats.dns_dropped += 1

    def _readable(self) -> None:
        assert self._sock is not None
        for _ in range(64):
            try:
                data, peer = self._sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            if len(data) < _HEADER.size:
                continue
            our_id = int.from_bytes(data[:2], "big")
            p = self._pending.get(our_id)
            if p is None or self.servers[p.server] != (peer[0], peer[1]):
                self.net.stats.dns_dropped += 1
                continue
            del self._pending[our_id]
            self._reply(p.guest, p.gport, p.dns_ip, struct.pack("!H", p.qid) + data[2:])

    def _reply(self, guest: bytes, gport: int, dns_ip: bytes, msg: bytes) -> None:
        self.net.emit_udp(guest, gport, dns_ip, DNS_PORT, msg)

    def _expire(self, now: float) -> None:
        """Move unanswered queries on to the next upstream server (as resolv.conf(5)); then drop them."""
        for k, q in [(k, q) for k, q in self._pending.items() if q.deadline < now]:
            if q.server + 1 < len(self.servers):
                q.server += 1
                self._send(k, q, now)
            else:
                del self._pending[k]
                self.net.stats.dns_dropped += 1

    def expire(self, now: float) -> None:
        self._expire(now)

    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        if self._sock is not None:
            try:
                self.net.loop.remove_reader(self._sock.fileno())
            except (ValueError, OSError):
                pass
            self._sock.close()
            self._sock = None
