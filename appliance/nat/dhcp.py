"""DHCP server (RFC 2131, options from RFC 2132; domain search RFC 3397).

Leases are keyed by the client's MAC, as in libslirp (a client identifier,
option 61, is neither used nor echoed, as there). What to do with a message is
looked up in ``TRANSITIONS`` by (lease state, message type), so the whole
protocol is readable in one table. The pool is 16 addresses from
``dhcpstart``, as in libslirp.

Where RFC 2131 leaves a choice the server does what libslirp (QEMU 7.2's
``-netdev user``) does: a BOOTP request (no message type) is answered with an
ACK, a REQUEST naming neither an address nor a ``ciaddr`` gets the client's
binding or a new one, a renewal (``ciaddr``) of a free pool address is
granted, a NAK carries the message "requested address not available", and
``restrict=on`` leaves the router and DNS options out. A message relayed
through a BOOTP relay (``giaddr`` set) is answered by broadcast to the client
port as libslirp does: the relay is on the guest's own link, so the client
hears it. Beyond libslirp, and as RFC 2131 asks: replies are addressed by
§4.1 (unicast to ``ciaddr`` or to ``yiaddr``/``chaddr`` unless the BROADCAST
flag is set), a REQUEST naming another server is not answered, DHCPINFORM is
answered, a released or lapsed client gets its old address back (§4.3.1),
options come in the order of the client's parameter request list (RFC 2132
§9.8) and replies stay within 576 bytes or the client's maximum message size
(option 57), using the ``file`` and ``sname`` fields (option 52) when the
options field is full. An INIT-REBOOT REQUEST for an address this server
never leased to the client is NAKed (libslirp grants it if free; RFC 2131
§4.3.2 would stay silent, which leaves the client waiting out its retries).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.nat.config import domain_labels, raw_bytes
from appliance.nat.frames import BROADCAST_MAC, build_udp

if TYPE_CHECKING:
    from appliance.nat.stack import UserNetwork

log = logging.getLogger(__name__)

SERVER_PORT = 67
CLIENT_PORT = 68
POOL_SIZE = 16
# How long a DECLINEd address stays out of the pool (dnsmasq waits 600 s too):
# long enough for whoever holds it to be noticed, short enough that a guest
# declining every address cannot empty the pool for good.
DECLINE_HOLD = 600.0
# Clients whose lapsed or released address is remembered (RFC 2131 §4.3.1 "the
# client's previous address"); bounded, a guest can invent any number of MACs.
HISTORY_SIZE = 64
MAGIC = b"\x63\x82\x53\x63"
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s4s")  # RFC 2131 §2, figure 1
_FIXED = _BOOTP.size - 4  # the BOOTP header before the magic cookie
_SNAME_AT, _FILE_AT = 44, 108
# RFC 2131 §2: a client must accept a 576-byte datagram; more only when it says
# so with option 57, and never more than the guest's link carries in one frame.
MIN_MESSAGE = 576
_IP_UDP = 28
BOOTP_MINIMUM = 300  # RFC 1542 §3.1.1: some relays and clients drop shorter BOOTP messages
ZERO = b"\0\0\0\0"
BROADCAST_IP = b"\xff\xff\xff\xff"
FLAG_BROADCAST = 0x8000
NAK_MESSAGE = b"requested address not available"
UEFI_HTTP_CLASS = b"HTTPClient"  # UEFI 2.x §24.7.2: the vendor class an HTTP boot server answers with

BOOTP, DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(0, 9)

OPT_PAD = 0
OPT_SUBNET = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN = 15
OPT_BROADCAST = 28
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MSG_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAMS = 55
OPT_MESSAGE = 56
OPT_MAX_SIZE = 57
OPT_VENDOR_CLASS = 60
OPT_TFTP_SERVER = 66
OPT_DOMAIN_SEARCH = 119
OPT_END = 255
# Options that may be cut into several instances (RFC 3396), also across the
# options, file and sname fields. RFC 3397 §3 asks clients of option 119 to
# join them; a client may not expect it of any other option that fits in one.
_SPLITTABLE = frozenset({OPT_DOMAIN_SEARCH})


class LeaseState(enum.Enum):
    FREE = "free"
    OFFERED = "offered"
    BOUND = "bound"


@dataclass(slots=True)
class Lease:
    mac: bytes
    ip: bytes
    state: LeaseState
    expires: float


@dataclass(slots=True, frozen=True)
class Message:
    """The fields of a client message the server acts on (copied out once)."""

    xid: int
    flags: int
    ciaddr: bytes
    chaddr: bytes
    msg_type: int  # BOOTP (0) for a message without option 53 (RFC 1534 §2)
    requested: bytes | None
    server_id: bytes | None
    giaddr: bytes = ZERO
    params: bytes = b""  # option 55, the client's parameter request list
    max_size: int = MIN_MESSAGE  # option 57, at least 576 (RFC 2132 §9.10)


def _scan(field: bytes, opts: dict[int, bytes]) -> bool:
    """Add one field's options to ``opts``; False if an option runs past the field."""
    i = 0
    while i < len(field):
        code = field[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return True
        if i + 1 >= len(field):
            return False
        n = field[i + 1]
        value = field[i + 2 : i + 2 + n]
        if len(value) != n:
            return False
        opts[code] = opts.get(code, b"") + value  # RFC 3396: repeated options concatenate
        i += 2 + n
    return True


def parse(payload: bytes | memoryview) -> Message | None:
    """A BOOTREQUEST from an Ethernet client, or None (RFC 2131 §2, RFC 2132 §9.3, §9.6)."""
    if len(payload) < _FIXED:
        return None
    data = bytes(payload)
    fields = _BOOTP.unpack_from(data.ljust(_BOOTP.size, b"\0"))
    op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yi, _si, giaddr, chaddr, sname, file, magic = fields
    if op != 1 or htype != 1 or hlen != 6:
        return None
    opts: dict[int, bytes] = {}
    if magic == MAGIC:
        if not _scan(data[_BOOTP.size :], opts):
            return None
        overload = opts.get(OPT_OVERLOAD, b"")
        # RFC 2131 §4.1: the options field first, then file, then sname.
        if len(overload) == 1 and overload[0] & 1 and not _scan(file, opts):
            return None
        if len(overload) == 1 and overload[0] & 2 and not _scan(sname, opts):
            return None
        mt = opts.get(OPT_MSG_TYPE)
        if mt is not None and len(mt) != 1:
            return None
        msg_type = mt[0] if mt is not None else BOOTP
    else:
        msg_type = BOOTP  # an RFC 951 client: its vendor area is not RFC 1497 options
    if msg_type not in (BOOTP, DISCOVER, REQUEST, DECLINE, RELEASE, INFORM):
        return None
    req = opts.get(OPT_REQUESTED_IP)
    sid = opts.get(OPT_SERVER_ID)
    size = opts.get(OPT_MAX_SIZE, b"")
    max_size = int.from_bytes(size, "big") if len(size) == 2 else 0
    return Message(
        xid,
        flags,
        ciaddr,
        chaddr[:6],
        msg_type,
        req if req is not None and len(req) == 4 else None,
        sid if sid is not None and len(sid) == 4 else None,
        giaddr,
        opts.get(OPT_PARAMS, b""),
        max(max_size, MIN_MESSAGE),
    )


def encode_search(domains: tuple[str, ...]) -> bytes:
    """RFC 3397 §2: DNS-encoded names, later ones compressed against earlier ones.

    Pointers are offsets into the concatenated option data (RFC 3397 §2,
    "the pointer is relative to the start of the option data"). As libslirp:
    names keep the case they were given and only suffixes equal byte for byte
    are shared, and a name with an empty label ("a..b", "."), a label over 63
    bytes or more than 255 bytes in all (RFC 1035 §2.3.4) is left out with a
    warning (one trailing dot is the root, as usual). Labels are the names' bytes
    (``domain_labels``), so no name makes this raise; which names get here is
    ``config._search_list``'s choice (as libslirp, none when one is not ASCII).
    """
    out = bytearray()
    seen: dict[tuple[bytes, ...], int] = {}
    for name in domains:
        labels = domain_labels(name)
        if labels is None:
            log.warning("dnssearch '%s' is not a domain name; left out of the search list", name)
            continue
        for i in range(len(labels)):
            suffix = labels[i:]
            if suffix in seen:
                out += struct.pack("!H", 0xC000 | seen[suffix])
                break
            if len(out) < 0x3FFF:
                seen[suffix] = len(out)
            out += bytes([len(labels[i])]) + labels[i]
        else:
            out.append(0)
    return bytes(out)


def _option(code: int, value: bytes) -> bytes:
    """One option, split into several instances when longer than 255 bytes (RFC 3396)."""
    parts = [value[i : i + 255] for i in range(0, len(value), 255)] or [b""]
    return b"".join(bytes([code, len(p)]) + p for p in parts)


def _pack(options: list[tuple[int, bytes]], room: list[int]) -> tuple[list[bytearray], list[int]]:
    """Lay ``options`` out in order over fields of ``room`` bytes each (END not counted).

    An option goes whole into the current field or, when it is too long for what is
    left, into a later one (never back to an earlier field, so that the pieces of a
    split option stay in order: RFC 3396 §7). Options in ``_SPLITTABLE`` are cut
    to fill each field. Returns the fields and the codes that did not fit.
    """
    fields = [bytearray() for _ in room]
    left = list(room)
    dropped: list[int] = []
    f = 0
    for code, value in options:
        if code in _SPLITTABLE and value:
            plan: list[tuple[int, int]] = []
            spare = list(left)
            g, rest = f, len(value)
            while rest and g < len(room):
                if spare[g] <= 2:
                    g += 1
                    continue
                take = min(255, spare[g] - 2, rest)
                plan.append((g, take))
                spare[g] -= 2 + take
                rest -= take
            if rest:
                dropped.append(code)
                continue
            at = 0
            for g, take in plan:
                fields[g] += bytes([code, take]) + value[at : at + take]
                at += take
            left, f = spare, plan[-1][0]
            continue
        enc = _option(code, value)
        g = f
        while g < len(room) and left[g] < len(enc):
            g += 1
        if g == len(room):
            dropped.append(code)
            continue
        fields[g] += enc
        left[g] -= len(enc)
        f = g
    return fields, dropped


Action = Callable[["DhcpServer", Message, "Lease | None"], None]


class DhcpServer:
    def __init__(self, net: UserNetwork) -> None:
        self.net = net
        cfg = net.config
        self.server_ip = cfg.host.packed
        start = int(cfg.dhcpstart)
        last = int(cfg.net.broadcast_address) - 1
        self.pool = [
            ipaddress.IPv4Address(a).packed
            for a in range(start, min(start + POOL_SIZE, last + 1))
            if a not in (int(cfg.host), int(cfg.dns))
        ]
        self.leases: dict[bytes, Lease] = {}
        self._declined: dict[bytes, float] = {}  # address → when it may be leased again
        self._previous: dict[bytes, bytes] = {}  # MAC → address of a released or lapsed lease
        # The configured options in libslirp's order (53 and 54 come first in every reply);
        # the broadcast address (28) is ours, libslirp does not send it.
        common: list[tuple[int, bytes]] = [(OPT_SUBNET, cfg.net.netmask.packed)]
        if not cfg.restrict:  # as libslirp: a restricted guest is given no way out
            common += [(OPT_ROUTER, cfg.host.packed), (OPT_DNS, cfg.dns.packed)]
        common.append((OPT_BROADCAST, cfg.net.broadcast_address.packed))
        self._before_lease = len(common)
        if cfg.hostname:
            common.append((OPT_HOSTNAME, raw_bytes(cfg.hostname)))
        if cfg.domainname:
            common.append((OPT_DOMAIN, raw_bytes(cfg.domainname)))
        if cfg.tftp_server_name:
            common.append((OPT_TFTP_SERVER, raw_bytes(cfg.tftp_server_name)))
        search = encode_search(cfg.dnssearch)
        if search:
            common.append((OPT_DOMAIN_SEARCH, search))
        bootfile = raw_bytes(cfg.bootfile or "")
        if bootfile.startswith(b"http://"):
            common.append((OPT_VENDOR_CLASS, UEFI_HTTP_CLASS))  # UEFI HTTP boot, as libslirp
        self._options = common
        self._common = b"".join(_option(c, v) for c, v in common)
        # PXE firmware reads the boot file from the BOOTP file field (RFC 951), as
        # libslirp gives it; the next-server field already names us.
        self._file = bootfile[:127].ljust(128, b"\0")
        self._warned: set[int] = set()

    # -- the table -------------------------------------------------------
    def _offer(self, m: Message, lease: Lease | None) -> None:
        if lease is not None and lease.state is LeaseState.BOUND:
            # RFC 2131 §4.3.1: the client's current binding. It stays bound: a DISCOVER
            # alone does not give the address up (it may still be in use).
            self._reply(m, OFFER, lease.ip)
            return
        ip = lease.ip if lease is not None else self._allocate(m.chaddr, m.requested)
        if ip is None:
            return  # pool exhausted: stay silent, the client retries (RFC 2131 §4.3.1)
        self.leases[m.chaddr] = Lease(m.chaddr, ip, LeaseState.OFFERED, self._now() + 60)
        self._reply(m, OFFER, ip)

    def _request(self, m: Message, lease: Lease | None) -> None:
        if m.server_id is not None and m.server_id != self.server_ip:
            # SELECTING, and the client chose another server (RFC 2131 §4.3.2).
            if lease is not None and lease.state is LeaseState.OFFERED:
                self._forget(m.chaddr)
            return
        wanted = m.requested or (m.ciaddr if m.ciaddr != ZERO else None)
        if wanted is None:
            self._bootp(m, lease)  # libslirp's answer to a client that remembers nothing
            return
        init_reboot = m.requested is not None and m.server_id is None and m.ciaddr == ZERO
        if lease is not None and lease.ip == wanted:
            ip: bytes | None = wanted
        elif init_reboot and self._previous.get(m.chaddr) != wanted:
            # RFC 2131 §4.3.2: an address remembered from elsewhere (or from before a restart) is
            # "incorrect" here; the NAK sends the client to DISCOVER, where it gets the address
            # this server gives it (10.0.2.15 for the first guest, where hostfwd points).
            ip = None
        elif self._free(wanted) and (lease is None or lease.state is not LeaseState.BOUND):
            ip = wanted  # its released address, a lapsed offer taken up, or a renewal after a restart
        else:
            ip = None
        if ip is None:
            self._nak(m)
            return
        self._bind(m, ip, ACK)

    def _bootp(self, m: Message, lease: Lease | None) -> None:
        """A BOOTP client, or a REQUEST naming no address: its binding or a new one, ACKed (libslirp)."""
        ip = lease.ip if lease is not None else self._allocate(m.chaddr, None)
        if ip is None:
            return
        self._bind(m, ip, ACK)

    def _release(self, m: Message, lease: Lease | None) -> None:
        # RFC 2131 §4.3.4: the address released is ciaddr; it must be this client's.
        if lease is None or m.ciaddr not in (ZERO, lease.ip):
            self.net.stats.dhcp_bad += 1
            return
        self._forget(m.chaddr)

    def _decline(self, m: Message, lease: Lease | None) -> None:
        # RFC 2131 §4.3.3: the address in use is the one the DECLINE names (option 50); one
        # naming another address than the client's lease says nothing about that lease.
        if lease is None or m.requested not in (None, lease.ip):
            self.net.stats.dhcp_bad += 1
            return
        self._declined[lease.ip] = self._now() + DECLINE_HOLD
        self.leases.pop(m.chaddr, None)
        self._previous.pop(m.chaddr, None)

    def _inform(self, m: Message, lease: Lease | None) -> None:
        self._reply(m, ACK, None, inform=True)  # RFC 2131 §4.3.5: no yiaddr, no lease time

    def _ignore(self, m: Message, lease: Lease | None) -> None:
        self.net.stats.dhcp_bad += 1

    TRANSITIONS: dict[tuple[LeaseState, int], Action] = {
        (LeaseState.FREE, DISCOVER): _offer,
        (LeaseState.OFFERED, DISCOVER): _offer,
        (LeaseState.BOUND, DISCOVER): _offer,
        (LeaseState.FREE, REQUEST): _request,
        (LeaseState.OFFERED, REQUEST): _request,
        (LeaseState.BOUND, REQUEST): _request,
        (LeaseState.FREE, BOOTP): _bootp,
        (LeaseState.OFFERED, BOOTP): _bootp,
        (LeaseState.BOUND, BOOTP): _bootp,
        (LeaseState.OFFERED, RELEASE): _release,
        (LeaseState.BOUND, RELEASE): _release,
        (LeaseState.OFFERED, DECLINE): _decline,
        (LeaseState.BOUND, DECLINE): _decline,
        (LeaseState.FREE, INFORM): _inform,
        (LeaseState.OFFERED, INFORM): _inform,
        (LeaseState.BOUND, INFORM): _inform,
    }

    def input(self, payload: memoryview) -> None:
        m = parse(payload)
        if m is None:
            self.net.stats.dhcp_bad += 1
            return
        now = self._now()
        lease = self.leases.get(m.chaddr)
        if lease is not None and lease.expires < now:
            self._forget(m.chaddr)
            lease = None
        if lease is None and len(self.leases) >= len(self.pool):
            # Lapsed entries of other clients go before a new one can be made: a guest
            # inventing client addresses would otherwise grow the table each time an
            # offer lapsed. Live entries hold distinct pool addresses, so at most
            # len(pool) remain.
            for mac in [k for k, le in self.leases.items() if le.expires < now]:
                self._forget(mac)
        state = lease.state if lease is not None else LeaseState.FREE
        self.TRANSITIONS.get((state, m.msg_type), DhcpServer._ignore)(self, m, lease)

    # -- helpers ---------------------------------------------------------
    @staticmethod
    def _now() -> float:
        return time.monotonic()

    def _forget(self, mac: bytes) -> None:
        """Drop a client's lease, remembering a bound address for when it comes back."""
        lease = self.leases.pop(mac, None)
        if lease is None or lease.state is not LeaseState.BOUND:
            return
        self._previous.pop(mac, None)
        self._previous[mac] = lease.ip
        if len(self._previous) > HISTORY_SIZE:
            del self._previous[next(iter(self._previous))]

    def _free(self, ip: bytes) -> bool:
        if ip not in self.pool:
            return False
        now = self._now()
        held = self._declined.get(ip)
        if held is not None:
            if held > now:
                return False
            del self._declined[ip]
        return not any(le.ip == ip and le.expires >= now for le in self.leases.values())

    def _allocate(self, mac: bytes, requested: bytes | None) -> bytes | None:
        # RFC 2131 §4.3.1: the client's previous address, else the one it asks for, else a new one.
        previous = self._previous.get(mac)
        for ip in (previous, requested):
            if ip is not None and self._free(ip):
                return ip
        for ip in self.pool:
            if self._free(ip):
                return ip
        return None

    def _bind(self, m: Message, ip: bytes, msg_type: int) -> None:
        self.leases[m.chaddr] = Lease(m.chaddr, ip, LeaseState.BOUND, self._now() + self.net.config.lease_time)
        self._previous.pop(m.chaddr, None)
        self._reply(m, msg_type, ip)

    def _nak(self, m: Message) -> None:
        self._send(m, self._build(m, NAK, None), None, NAK)

    def _reply(self, m: Message, msg_type: int, ip: bytes | None, *, inform: bool = False) -> None:
        self._send(m, self._build(m, msg_type, ip, inform=inform), ip, msg_type)

    def _build(self, m: Message, msg_type: int, ip: bytes | None, *, inform: bool = False) -> bytes:
        """A BOOTREPLY with the fields of RFC 2131 §4.3.1 table 3."""
        head = [MAGIC, _option(OPT_MSG_TYPE, bytes([msg_type])), _option(OPT_SERVER_ID, self.server_ip)]
        if msg_type == NAK:
            opts: list[tuple[int, bytes]] = [(OPT_MESSAGE, NAK_MESSAGE)]
        else:
            opts = list(self._options)
            if not inform:
                lease = (OPT_LEASE_TIME, struct.pack("!I", self.net.config.lease_time))
                opts.insert(self._before_lease, lease)
            if m.params:
                # RFC 2132 §9.8: requested options first, in the client's order; the rest
                # after them (RFC 2131 §4.3.1: the server MAY send options not asked for).
                rank = {code: i for i, code in reversed(list(enumerate(m.params)))}
                opts.sort(key=lambda o: rank.get(o[0], len(rank)))
        file = self._file if msg_type != NAK else bytes(128)
        # The room in the options field: what the client accepts (576 unless option 57
        # says more) less the IP/UDP and BOOTP headers, the cookie, our two options and END.
        size = min(m.max_size, max(MIN_MESSAGE, self.net.mtu))
        main = size - _IP_UDP - _BOOTP.size - sum(len(h) for h in head[1:]) - 1
        fields, dropped = _pack(opts, [main])
        sname = bytes(64)
        if dropped:
            # RFC 2131 §4.1: spill into file (unless it names a boot file) and sname,
            # announced by option 52 (3 bytes) in the options field; each ends with END.
            spill = [127] if not file.strip(b"\0") else []
            wide, still = _pack(opts, [main - 3, *spill, 63])
            if any(wide[1:]):
                fields, dropped = wide, still
                if spill:
                    file = bytes(wide[1] + b"\xff").ljust(128, b"\0")
                sname = bytes(wide[-1] + b"\xff").ljust(64, b"\0")
                fields = [bytearray(_option(OPT_OVERLOAD, b"\x03" if spill else b"\x02")) + wide[0]]
        for code in dropped:
            if code not in self._warned:
                self._warned.add(code)
                log.warning("DHCP reply too long for the client: option %d left out", code)
        yiaddr = ip if ip is not None and msg_type != NAK else ZERO
        ciaddr = m.ciaddr if msg_type == ACK else ZERO
        siaddr = self.server_ip if msg_type != NAK else ZERO
        fixed = _BOOTP.pack(
            2, 1, 6, 0, m.xid, 0, m.flags & FLAG_BROADCAST, ciaddr, yiaddr, siaddr, m.giaddr,
            m.chaddr + bytes(10), sname, file, b"",
        )[:_FIXED]  # fmt: skip
        body = fixed + b"".join(head) + fields[0] + b"\xff"
        return body + bytes(max(0, BOOTP_MINIMUM - len(body)))

    def _send(self, m: Message, body: bytes, yiaddr: bytes | None, msg_type: int) -> None:
        # RFC 2131 §4.1, in its order. A relayed message (giaddr set) is broadcast to the
        # client port as libslirp does, not sent to the relay: it is on the guest's link.
        if m.giaddr != ZERO or msg_type == NAK:
            dst_ip, dst_mac = BROADCAST_IP, BROADCAST_MAC
        elif m.ciaddr != ZERO:
            dst_ip, dst_mac = m.ciaddr, m.chaddr
        elif m.flags & FLAG_BROADCAST or yiaddr is None:
            dst_ip, dst_mac = BROADCAST_IP, BROADCAST_MAC
        else:
            dst_ip, dst_mac = yiaddr, m.chaddr
        frame = build_udp(
            dst_mac, self.net.host_mac, self.server_ip, SERVER_PORT, dst_ip, CLIENT_PORT, body,
            ident=self.net.next_ident(),
        )  # fmt: skip
        self.net.stats.dhcp_replies += 1
        self.net.output(frame)
