"""DNS proxy at the ``dns=`` address (RFC 1035): local names answered here, the rest forwarded.

Upstream servers come from the host's ``/etc/resolv.conf`` (IPv4 and IPv6
entries, in its order), or from the config for tests. A resolv.conf naming none
means the name server on the local machine (resolv.conf(5)), 127.0.0.1:53, which
is where libslirp sends the guest's queries when the host names none either. The
file is read again when it changes (a laptop joining another network, a VPN coming
up), looked at no more than once a second, as libslirp does. Each forwarded
query gets a fresh random transaction id of ours, so ids chosen by the guest can
neither collide with each other nor be used to inject answers, and an answer must
carry the question asked; pending queries are bounded and time out. An answer larger
than the guest can take (512 bytes, or the size its EDNS0 OPT record gives:
RFC 1035 §4.2.1, RFC 6891 §6.2.5) reaches it truncated with TC set, as a
resolver sends it, so that it asks again over TCP (TCP to ``dns=``:53 is
spliced to the first upstream, as libslirp connects it to the host's DNS).
With no upstream, or none answering, the guest gets SERVFAIL at once.

Unlike libslirp, which only forwards (UDP and TCP, any port, to the host's
resolver), the gateway's names are answered here, over UDP only: a TCP
query for them goes upstream like any other.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.nat.frames import ip_str
from appliance.nat.stats import FlowInfo, sock_address
from appliance.nat.udp_nat import ANSWERED_DNS_TIMEOUT, IDLE_TIMEOUT, MAX_FLOWS, udp_label

if TYPE_CHECKING:
    from appliance.nat.stack import UserNetwork

DNS_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"
RESOLV_CHECK = 1.0  # seconds between looks at whether resolv.conf changed
PER_SERVER_TIMEOUT = 2.0
MAX_PENDING = 512
# The largest query forwarded. A question is at most 255 + 16 bytes; with an
# EDNS OPT record (cookies, padding: RFC 7830 pads to 468) queries stay far
# below this. Held for every pending query, so it bounds their memory too.
MAX_QUERY = 4096
_HEADER = struct.Struct("!HHHHHH")
TYPE_A = 1
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_ANY = 255
CLASS_IN = 1
CLASS_ANY = 255
MAX_NAME = 255
_OPCODE = 0x7800  # RFC 1035 §4.1.1: 0 is a standard query
FLAG_TC = 0x0200
UDP_PLAIN = 512  # RFC 1035 §4.2.1: the most a client without EDNS0 takes over UDP
UDP_OURS = 1232  # the payload size our own answers advertise (DNS flag day 2020)
RCODE_SERVFAIL = 2
RCODE_BADVERS = 16  # RFC 6891 §6.1.3, carried in the OPT record's extended RCODE
# An upstream as configured, (host, port), with the family and address its queries go to.
_Upstream = tuple[tuple[str, int], tuple[socket.AddressFamily, tuple[Any, ...]]]


def host_nameservers(path: str = RESOLV_CONF, port: int = DNS_PORT) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of a resolv.conf, IPv4 and IPv6, in file order (resolv.conf(5)).

    An IPv6 link-local entry keeps its zone (``fe80::1%eth0``). A file that names none, or no
    file at all, means the local machine's name server, as it does for the host's own resolver.
    """
    servers: list[tuple[str, int]] = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and upstream_address(parts[1], port) is not None:
            servers.append((parts[1], port))
    return servers or [("127.0.0.1", port)]


def upstream_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]] | None:
    """The socket family and address of a numeric upstream (IPv4, or IPv6 with an optional
    ``%zone``), or None when ``host`` is not one (a name, or a zone no interface has)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return None
    family, _, _, _, addr = found[0]
    return family, addr


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


def _skip_name(msg: bytes, i: int) -> int | None:
    """The offset after the (possibly compressed) name at ``i``, or None if it runs out."""
    while i < len(msg):
        n = msg[i]
        if n & 0xC0 == 0xC0:
            return i + 2 if i + 2 <= len(msg) else None
        if n & 0xC0:
            return None  # RFC 6891 §5: the other label types are gone
        i += 1 + n
        if n == 0:
            return i
    return None


def find_opt(msg: bytes, start: int) -> tuple[bytes, int, int] | None:
    """The OPT record of a message whose question ends at ``start``: (record, payload size, version).

    RFC 6891 §6.1.1: the record in the additional section whose type is 41;
    None when there is none or the records do not parse.
    """
    if len(msg) < _HEADER.size:
        return None
    _id, _fl, _qd, an, ns, ar = _HEADER.unpack_from(msg)
    i = start
    for k in range(an + ns + ar):
        at = i
        j = _skip_name(msg, i)
        if j is None or j + 10 > len(msg):
            return None
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", msg, j)
        i = j + 10 + rdlen
        if i > len(msg):
            return None
        if rtype == TYPE_OPT and k >= an + ns and j == at + 1:  # the owner is the root
            return msg[at:i], max(rclass, UDP_PLAIN), (ttl >> 16) & 0xFF
    return None


def answer(
    msg: bytes,
    qend: int,
    qid: int,
    flags: int,
    addr: bytes | None,
    qtype: int,
    addr6: bytes | None = None,
    *,
    edns: tuple[bytes, int, int] | None = None,
) -> bytes:
    """A response echoing the question with an A and/or AAAA record (or none: NODATA).

    With ``edns`` (the query's OPT record) the response carries an OPT record of
    ours (RFC 6891 §7), or only that with BADVERS for an EDNS version above 0 (§6.1.3).
    """
    rd = flags & 0x0100
    records = b""
    count = 0
    badvers = edns is not None and edns[2] > 0
    if addr is not None and qtype in (TYPE_A, TYPE_ANY) and not badvers:
        records += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 3600, 4) + addr
        count += 1
    if addr6 is not None and qtype in (TYPE_AAAA, TYPE_ANY) and not badvers:
        records += struct.pack("!HHHIH", 0xC00C, TYPE_AAAA, CLASS_IN, 3600, 16) + addr6
        count += 1
    opt = b""
    if edns is not None:
        ext = (RCODE_BADVERS >> 4) << 24 if badvers else 0
        opt = b"\0" + struct.pack("!HHIH", TYPE_OPT, UDP_OURS, ext, 0)
    head = _HEADER.pack(qid, 0x8400 | 0x0080 | rd, 1, count, 0, 1 if opt else 0)
    return head + msg[_HEADER.size : qend] + records + opt


def failure(query: bytes, qend: int, qid: int, rcode: int) -> bytes:
    """An answer-less response with ``rcode`` (RFC 1035 §4.1.1) echoing the question, with an
    OPT record when the query had one (RFC 6891 §7)."""
    flags = int.from_bytes(query[2:4], "big")
    head = _HEADER.pack(qid, 0x8000 | (flags & (_OPCODE | 0x0100)) | 0x0080 | rcode, 1, 0, 0, 0)
    found = find_opt(query, qend)
    if found is None:
        return head + query[_HEADER.size : qend]
    opt = b"\0" + struct.pack("!HHIH", TYPE_OPT, UDP_OURS, 0, 0)
    return head[:-2] + b"\0\1" + query[_HEADER.size : qend] + opt


def truncated(reply: bytes, question: bytes) -> bytes:
    """What a resolver sends when the answer does not fit (RFC 1035 §4.1.1, RFC 2181 §9):
    the header with TC set, the question, and the OPT record if the answer has one
    (RFC 6891 §7), so that the client asks again over TCP."""
    qid, flags, _qd, _an, _ns, _ar = _HEADER.unpack_from(reply)
    found = find_opt(reply, _HEADER.size + len(question))
    opt = found[0] if found is not None else b""
    return _HEADER.pack(qid, flags | FLAG_TC, 1, 0, 0, 1 if opt else 0) + question + opt


class _Query:
    """A forwarded query: who asked, with which id, and where it was sent."""

    __slots__ = ("guest", "gport", "qid", "dns_ip", "wire", "question", "limit", "upstreams", "server", "deadline")

    def __init__(self, guest: bytes, gport: int, qid: int, dns_ip: bytes, wire: bytes, qend: int, limit: int) -> None:
        self.guest = guest
        self.gport = gport
        self.qid = qid
        self.dns_ip = dns_ip
        self.wire = wire  # the query with our transaction id
        self.question = wire[_HEADER.size : qend]
        self.limit = limit  # the largest UDP answer the guest takes
        # The upstream list the query started with (a resolv.conf change makes a new one) and
        # its place in it.
        self.upstreams: list[_Upstream] = []
        self.server = 0
        self.deadline = 0.0

    def answered_by(self, data: bytes) -> bool:
        """The answer is to our question (RFC 5452 §9.1), compared without case (RFC 4343)."""
        q = self.question
        if int.from_bytes(data[4:6], "big") == 0:
            return data[3] & 0x0F != 0  # an error may come without the question (RFC 1035 §4.1.1)
        got = data[_HEADER.size : _HEADER.size + len(q)]
        return got[:-4].lower() == q[:-4].lower() and got[-4:] == q[-4:]


class _Asker:
    """A guest resolver's source port, as ``info usernet`` shows it: libslirp opens a UDP socket
    for each guest port that queries the DNS address, so QEMU lists one row for each, with the
    UDP flows' timeouts (240 s from a query, 10 s from an answer)."""

    __slots__ = ("created", "last", "timeout")

    def __init__(self, now: float) -> None:
        self.created = self.last = now
        self.timeout = IDLE_TIMEOUT


class DnsProxy:
    def __init__(self, net: UserNetwork) -> None:
        self.net = net
        cfg = net.config
        # None: the host's resolv.conf, read again when it changes (_refresh).
        self._from_host = cfg.nameservers is None
        self._resolv_seen: tuple[int, int, int] | None = None
        self._resolv_checked = -RESOLV_CHECK
        self._upstreams: list[_Upstream] = []
        self.servers: list[tuple[str, int]] = []
        if self._from_host:
            self._refresh(time.monotonic())
        else:
            self._use(list(cfg.nameservers or ()))
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
        self._socks: dict[socket.AddressFamily, socket.socket] = {}
        self._pending: dict[int, _Query] = {}
        self._askers: dict[tuple[bytes, int, bytes], _Asker] = {}

    def _use(self, servers: list[tuple[str, int]]) -> None:
        # Each upstream with where its queries go; one socket per address family, made when
        # a query first goes to a server of that family.
        self._upstreams = [(s, a) for s in servers if (a := upstream_address(*s)) is not None]
        self.servers = [s for s, _ in self._upstreams]

    def _refresh(self, now: float) -> None:
        """Take the host's resolv.conf again if it changed since we last read it."""
        if not self._from_host or now - self._resolv_checked < RESOLV_CHECK:
            return
        self._resolv_checked = now
        try:
            st = os.stat(RESOLV_CONF)
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            seen = None
        if seen != self._resolv_seen or not self._upstreams:
            self._resolv_seen = seen
            self._use(host_nameservers(RESOLV_CONF))

    def first_server(self) -> tuple[str, int] | None:
        """The upstream a TCP connection to the DNS address goes to (the first, as libslirp)."""
        self._refresh(time.monotonic())
        return self.servers[0] if self.servers else None

    def input(self, src: bytes, sport: int, dst: bytes, payload: memoryview) -> None:
        c = self.net.stats
        msg = bytes(payload)
        q = parse_question(msg)
        if q is None:
            c.dns_dropped += 1
            return
        qid, flags, name, qtype, qclass, qend = q
        edns = find_opt(msg, qend)
        # Local names are class IN addresses for standard queries; anything else
        # (an UPDATE, class CHAOS) is the upstream's to answer or refuse.
        if not flags & _OPCODE and qclass in (CLASS_IN, CLASS_ANY):
            addr = self.local.get(name)
            if addr is not None:
                c.dns_local += 1
                reply = answer(msg, qend, qid, flags, addr, qtype, self.local6.get(name), edns=edns)
                self._reply(src, sport, dst, reply)
                return
        self._forward(src, sport, dst, msg, qid, qend, edns[1] if edns is not None else UDP_PLAIN)

    def _forward(self, src: bytes, sport: int, dst: bytes, msg: bytes, qid: int, qend: int, limit: int) -> None:
        c = self.net.stats
        if self.net.config.restrict:
            c.restricted += 1  # restrict=on: nothing reaches the host's resolvers (local names still answer)
            return
        now = time.monotonic()
        self._refresh(now)
        if not self.servers:
            # No resolver to ask: say so now (as a resolver whose upstreams all fail does)
            # rather than leave the guest waiting out its timeouts.
            c.dns_dropped += 1
            self._reply(src, sport, dst, failure(msg, qend, qid, RCODE_SERVFAIL))
            return
        self._expire(now)
        if len(self._pending) >= MAX_PENDING or len(msg) > MAX_QUERY:
            c.dns_dropped += 1
            return
        # A random id (RFC 5452 §4.3): one that counts up tells an off-path forger the next.
        for _ in range(8):
            our_id = secrets.randbits(16)
            if our_id not in self._pending:
                break
        else:
            c.dns_dropped += 1
            return
        q = _Query(src, sport, qid, dst, struct.pack("!H", our_id) + msg[2:], qend, limit)
        q.upstreams = self._upstreams
        self._pending[our_id] = q
        c.dns_forwarded += 1
        self._asked(src, sport, dst, now, IDLE_TIMEOUT)
        self._send(our_id, q, now)

    def _send(self, our_id: int, q: _Query, now: float) -> None:
        """Send (or resend) a query to its current upstream server."""
        q.deadline = now + PER_SERVER_TIMEOUT
        family, addr = q.upstreams[q.server][1]
        try:
            self._socket(family).sendto(q.wire, addr)
        except OSError:
            # Unanswered, it moves on to the next server when its deadline passes.
            self.net.stats.dns_dropped += 1

    def _socket(self, family: socket.AddressFamily) -> socket.socket:
        sock = self._socks.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self.net.loop.add_reader(sock.fileno(), self._readable, family)
            self._socks[family] = sock
        return sock

    def _readable(self, family: socket.AddressFamily) -> None:
        sock = self._socks.get(family)
        if sock is None:
            return
        for _ in range(64):
            try:
                data, peer = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            if len(data) < _HEADER.size:
                continue
            our_id = int.from_bytes(data[:2], "big")
            p = self._pending.get(our_id)
            if p is None or not _from_server(p, family, peer) or not p.answered_by(data):
                self.net.stats.dns_dropped += 1
                continue
            del self._pending[our_id]
            if len(data) > p.limit:
                data = truncated(data, p.question)
            self._reply(p.guest, p.gport, p.dns_ip, struct.pack("!H", p.qid) + data[2:])

    def _reply(self, guest: bytes, gport: int, dns_ip: bytes, msg: bytes) -> None:
        self._asked(guest, gport, dns_ip, time.monotonic(), ANSWERED_DNS_TIMEOUT)
        self.net.emit_udp(guest, gport, dns_ip, DNS_PORT, msg)

    def _asked(self, guest: bytes, gport: int, dns_ip: bytes, now: float, timeout: float) -> None:
        key = (guest, gport, dns_ip)
        # Kept in order of last use, so the first is the one to drop when full (a guest
        # querying from every port it has must not make this table grow).
        a = self._askers.pop(key, None)
        if a is None:
            if len(self._askers) >= MAX_FLOWS:
                del self._askers[next(iter(self._askers))]
            a = _Asker(now)
        a.last = now
        a.timeout = timeout
        self._askers[key] = a

    def flows(self) -> list[tuple[float, FlowInfo]]:
        """A row for each guest port that asked lately (see :class:`_Asker`), with when it first
        did. The socket shown is the one its queries go out on, when one is open."""
        now = time.monotonic()
        rows = []
        for (guest, gport, dns_ip), a in self._askers.items():
            sock = self._socks.get(socket.AF_INET6 if len(guest) == 16 else socket.AF_INET)
            host = sock_address(sock)
            rows.append((a.created, FlowInfo("UDP", "", host[0], host[1], ip_str(guest), gport, 0, 0,
                                             sock.fileno() if sock is not None else -1,
                                             udp_label(a.timeout - (now - a.last)), guest_started=True,
                                             peer_addr=ip_str(dns_ip), peer_port=DNS_PORT)))
        return rows

    def _expire(self, now: float) -> None:
        """Move unanswered queries on to the next upstream server (as resolv.conf(5)); then drop them."""
        for k, q in [(k, q) for k, q in self._pending.items() if q.deadline < now]:
            if q.server + 1 < len(q.upstreams):
                q.server += 1
                self._send(k, q, now)
            else:
                del self._pending[k]
                self.net.stats.dns_dropped += 1
                qend = _HEADER.size + len(q.question)
                self._reply(q.guest, q.gport, q.dns_ip, failure(q.wire, qend, q.qid, RCODE_SERVFAIL))

    def expire(self, now: float) -> None:
        self._expire(now)
        for key in [k for k, a in self._askers.items() if now - a.last > a.timeout]:
            del self._askers[key]

    def pending(self) -> int:
        return len(self._pending)

    def forget_queries(self) -> None:
        """The guest went away (:meth:`UserNetwork.guest_gone`): drop its queries still waiting
        for an upstream and the rows of its resolver's ports. The upstream sockets stay."""
        self._pending.clear()
        self._askers.clear()

    def close(self) -> None:
        for sock in self._socks.values():
            try:
                self.net.loop.remove_reader(sock.fileno())
            except (ValueError, OSError):
                pass
            sock.close()
        self._socks.clear()
        self._askers.clear()


def _from_server(q: _Query, family: socket.AddressFamily, peer: tuple[Any, ...]) -> bool:
    """Whether ``peer`` is the upstream ``q`` went to last (its address and port; for IPv6 also
    its zone, which recvfrom gives as part of a link-local address)."""
    want_family, want = q.upstreams[q.server][1]
    return want_family == family and want[:2] == peer[:2]
