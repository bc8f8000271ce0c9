"""DHCP server (RFC 2131, options from RFC 2132; domain search RFC 3397).

Leases are keyed by the client's MAC. What to do with a message is looked up
in ``TRANSITIONS`` by (lease state, message type), so the whole protocol is
readable in one table. The pool is 16 addresses from ``dhcpstart``, as in
libslirp.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.nat.config import raw_bytes
from appliance.nat.frames import BROADCAST_MAC, build_udp

if TYPE_CHECKING:
    from appliance.nat.stack import UserNetwork

SERVER_PORT = 67
CLIENT_PORT = 68
POOL_SIZE = 16
# How long a DECLINEd address stays out of the pool (dnsmasq waits 600 s too):
# long enough for whoever holds it to be noticed, short enough that a guest
# declining every address cannot empty the pool for good.
DECLINE_HOLD = 600.0
MAGIC = b"\x63\x82\x53\x63"
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s4s")  # RFC 2131 §2, figure 1

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)

OPT_PAD = 0
OPT_SUBNET = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN = 15
OPT_BROADCAST = 28
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_MSG_TYPE = 53
OPT_SERVER_ID = 54
OPT_TFTP_SERVER = 66
OPT_DOMAIN_SEARCH = 119
OPT_END = 255


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
    msg_type: int
    requested: bytes | None
    server_id: bytes | None


def parse(payload: bytes | memoryview) -> Message | None:
    """A BOOTREQUEST from an Ethernet client, or None (RFC 2131 §2, RFC 2132 §9.6)."""
    if len(payload) < _BOOTP.size:
        return None
    op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yi, _si, _gi, chaddr, _s, _f, magic = _BOOTP.unpack_from(
        payload
    )
    if op != 1 or htype != 1 or hlen != 6 or magic != MAGIC:
        return None
    opts: dict[int, bytes] = {}
    data = bytes(payload[_BOOTP.size :])
    i = 0
    while i < len(data):
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END or i + 1 >= len(data):
            break
        n = data[i + 1]
        value = data[i + 2 : i + 2 + n]
        if len(value) != n:
            return None
        opts[code] = opts.get(code, b"") + value  # RFC 3396: repeated options concatenate
        i += 2 + n
    mt = opts.get(OPT_MSG_TYPE)
    if mt is None or len(mt) != 1:
        return None
    req = opts.get(OPT_REQUESTED_IP)
    sid = opts.get(OPT_SERVER_ID)
    return Message(
        xid,
        flags,
        ciaddr,
        chaddr[:6],
        mt[0],
        req if req is not None and len(req) == 4 else None,
        sid if sid is not None and len(sid) == 4 else None,
    )


def encode_search(domains: tuple[str, ...]) -> bytes:
    """RFC 3397 §2: DNS-encoded names, later ones compressed against earlier ones.

    Pointers are offsets into the concatenated option data (RFC 3397 §2,
    "the pointer is relative to the start of the option data").
    """
    out = bytearray()
    seen: dict[tuple[str, ...], int] = {}
    for name in domains:
        labels = tuple(lab.lower() for lab in name.split(".") if lab)
        for i in range(len(labels)):
            suffix = labels[i:]
            if suffix in seen:
                out += struct.pack("!H", 0xC000 | seen[suffix])
                break
            if len(out) < 0x3FFF:
                seen[suffix] = len(out)
            lab = labels[i].encode("ascii")
            out += bytes([len(lab)]) + lab
        else:
            out.append(0)
    return bytes(out)


def _option(code: int, value: bytes) -> bytes:
    """One option, split into several instances when longer than 255 bytes (RFC 3396)."""
    parts = [value[i : i + 255] for i in range(0, len(value), 255)] or [b""]
    return b"".join(bytes([code, len(p)]) + p for p in parts)


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
        opts = bytearray()
        opts += _option(OPT_SUBNET, cfg.net.netmask.packed)
        opts += _option(OPT_ROUTER, cfg.host.packed)
        opts += _option(OPT_DNS, cfg.dns.packed)
        opts += _option(OPT_BROADCAST, cfg.net.broadcast_address.packed)
        if cfg.hostname:
            opts += _option(OPT_HOSTNAME, raw_bytes(cfg.hostname))
        if cfg.domainname:
            opts += _option(OPT_DOMAIN, raw_bytes(cfg.domainname))
        if cfg.dnssearch:
            opts += _option(OPT_DOMAIN_SEARCH, encode_search(cfg.dnssearch))
        if cfg.tftp_server_name:
            opts += _option(OPT_TFTP_SERVER, raw_bytes(cfg.tftp_server_name))
        self._common = bytes(opts)
        # PXE firmware reads the boot file from the BOOTP file field (RFC 951), as
        # libslirp gives it; the next-server field already names us.
        self._file = raw_bytes(cfg.bootfile or "")[:127].ljust(128, b"\0")

    # -- the table -------------------------------------------------------
    def _offer(self, m: Message, lease: Lease | None) -> None:
        ip = lease.ip if lease is not None else self._allocate(m.requested)
        if ip is None:
            return  # pool exhausted: stay silent, the client retries (RFC 2131 §4.3.1)
        self.leases[m.chaddr] = Lease(m.chaddr, ip, LeaseState.OFFERED, self._now() + 60)
        self._reply(m, OFFER, ip)

    def _request(self, m: Message, lease: Lease | None) -> None:
        if m.server_id is not None and m.server_id != self.server_ip:
            if lease is not None and lease.state is LeaseState.OFFERED:
                del self.leases[m.chaddr]  # the client chose another server
            return
        wanted = m.requested or (m.ciaddr if m.ciaddr != b"\0\0\0\0" else None)
        if wanted is None:
            self._nak(m)
            return
        if lease is not None and lease.ip == wanted:
            ip: bytes | None = wanted
        elif self._free(wanted) and (lease is None or lease.state is not LeaseState.BOUND):
            ip = wanted  # INIT-REBOOT or a REQUEST for an address we did not offer but can give
        else:
            ip = None
        if ip is None:
            self._nak(m)
            return
        self.leases[m.chaddr] = Lease(m.chaddr, ip, LeaseState.BOUND, self._now() + self.net.config.lease_time)
        self._reply(m, ACK, ip)

    def _release(self, m: Message, lease: Lease | None) -> None:
        self.leases.pop(m.chaddr, None)

    def _decline(self, m: Message, lease: Lease | None) -> None:
        # RFC 2131 §4.3.3: the address in use is the one the DECLINE names (option 50); one
        # naming another address than the client's lease says nothing about that lease.
        if lease is None or m.requested not in (None, lease.ip):
            self.net.stats.dhcp_bad += 1
            return
        self._declined[lease.ip] = self._now() + DECLINE_HOLD
        self.leases.pop(m.chaddr, None)

    def _inform(self, m: Message, lease: Lease | None) -> None:
        self._reply(m, ACK, None)  # RFC 2131 §4.3.5: no yiaddr, no lease time

    def _ignore(self, m: Message, lease: Lease | None) -> None:
        self.net.stats.dhcp_bad += 1

    TRANSITIONS: dict[tuple[LeaseState, int], Action] = {
        (LeaseState.FREE, DISCOVER): _offer,
        (LeaseState.OFFERED, DISCOVER): _offer,
        (LeaseState.BOUND, DISCOVER): _offer,
        (LeaseState.FREE, REQUEST): _request,
        (LeaseState.OFFERED, REQUEST): _request,
        (LeaseState.BOUND, REQUEST): _request,
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
            del self.leases[m.chaddr]
            lease = None
        if lease is None and len(self.leases) >= len(self.pool):
            # Lapsed entries of other clients go before a new one can be made: a guest
            # inventing client addresses would otherwise grow the table each time an
            # offer lapsed. Live entries hold distinct pool addresses, so at most
            # len(pool) remain.
            self.leases = {k: le for k, le in self.leases.items() if le.expires >= now}
        state = lease.state if lease is not None else LeaseState.FREE
        self.TRANSITIONS.get((state, m.msg_type), DhcpServer._ignore)(self, m, lease)

    # -- helpers ---------------------------------------------------------
    @staticmethod
    def _now() -> float:
        return time.monotonic()

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

    def _allocate(self, requested: bytes | None) -> bytes | None:
        if requested is not None and self._free(requested):
            return requested
        for ip in self.pool:
            if self._free(ip):
                return ip
        return None

    def _nak(self, m: Message) -> None:
        self._send(m, self._build(m, NAK, None), broadcast=True)

    def _reply(self, m: Message, msg_type: int, ip: bytes | None) -> None:
        self._send(m, self._build(m, msg_type, ip), broadcast=bool(m.flags & 0x8000), yiaddr=ip)

    def _build(self, m: Message, msg_type: int, ip: bytes | None) -> bytes:
        head = _BOOTP.pack(
            2, 1, 6, 0, m.xid, 0, m.flags & 0x8000,
            m.ciaddr, ip or b"\0\0\0\0", self.server_ip, b"\0\0\0\0",
            m.chaddr + bytes(10), bytes(64), self._file if msg_type != NAK else bytes(128), MAGIC,
        )  # fmt: skip
        opts = bytearray(_option(OPT_MSG_TYPE, bytes([msg_type])))
        opts += _option(OPT_SERVER_ID, self.server_ip)
        if msg_type != NAK:
            if ip is not None:
                opts += _option(OPT_LEASE_TIME, struct.pack("!I", self.net.config.lease_time))
            opts += self._common
        opts.append(OPT_END)
        body = head + opts
        return body + bytes(max(0, 300 - len(body)))  # BOOTP minimum (RFC 1542 §3.1.1)

    def _send(self, m: Message, body: bytes, *, broadcast: bool, yiaddr: bytes | None = None) -> None:
        src = self.server_ip
        if m.ciaddr != b"\0\0\0\0" and not broadcast:
            dst_ip, dst_mac = m.ciaddr, m.chaddr
        elif broadcast or yiaddr is None:
            dst_ip, dst_mac = b"\xff\xff\xff\xff", BROADCAST_MAC
        else:
            dst_ip, dst_mac = yiaddr, m.chaddr  # RFC 2131 §4.1: unicast to chaddr/yiaddr
        frame = build_udp(
            dst_mac, self.net.host_mac, src, SERVER_PORT, dst_ip, CLIENT_PORT, body, ident=self.net.next_ident()
        )
        self.net.stats.dhcp_replies += 1
        self.net.output(frame)
