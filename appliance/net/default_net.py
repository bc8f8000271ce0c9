"""The libvirt-style default network: ``virbr0`` with DHCP, DNS and NAT.

``appliance net default start`` makes bridge ``virbr0`` with 192.168.122.1/24,
turns on forwarding, installs nftables masquerade and forward rules in a table
of its own, and starts a small daemon (``appliance net default serve``) that
answers DHCP for 192.168.122.2-254 and DNS for lease names, forwarding other
names to the host's resolvers. Leases live in a JSON file; reservations by
MAC in another. ``stop`` removes all of it.

The daemon is ours, not dnsmasq: DHCP messages are read with the same codec
as the user-mode stack (RFC 2131/2132), and the DNS answers are built by its
DNS module.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

from appliance.nat import dhcp as dhcpmsg
from appliance.nat import dns as dnsmsg
from appliance.net.errors import NetError

BRIDGE = "virbr0"
NETWORK = ipaddress.IPv4Network("192.168.122.0/24")
GATEWAY = ipaddress.IPv4Address("192.168.122.1")
FIRST = ipaddress.IPv4Address("192.168.122.2")
LAST = ipaddress.IPv4Address("192.168.122.254")
LEASE_TIME = 3600
NFT_TABLE = "appliance_default"
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s4s")  # RFC 2131 §2


def state_dir() -> Path:
    """Where leases, reservations and the pid file live (``APPLIANCE_NET_STATE`` overrides)."""
    return Path(os.environ.get("APPLIANCE_NET_STATE", "/var/lib/appliance/network/default"))


@dataclass
class Lease:
    mac: str
    ip: str
    hostname: str
    expires: float


@dataclass
class Reservation:
    mac: str
    ip: str
    name: str = ""


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def load_leases(state: Path | None = None) -> list[Lease]:
    path = (state or state_dir()) / "leases.json"
    try:
        return [Lease(**d) for d in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return []


def load_reservations(state: Path | None = None) -> list[Reservation]:
    path = (state or state_dir()) / "reservations.json"
    try:
        return [Reservation(**d) for d in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return []


def add_reservation(mac: str, ip: str, name: str = "", state: Path | None = None) -> None:
    """Pin ``mac`` to ``ip`` (the running daemon reads the file on every request)."""
    from appliance.errors import ConfigError

    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        raise ConfigError(f"invalid address '{ip}'") from None
    if not FIRST <= addr <= LAST:
        raise ConfigError(f"address '{ip}' is outside {FIRST}-{LAST}")
    mac_l = mac.lower()
    if len(mac_l.split(":")) != 6 or not all(len(p) == 2 for p in mac_l.split(":")):
        raise ConfigError(f"invalid MAC address '{mac}'")
    d = state or state_dir()
    d.mkdir(parents=True, exist_ok=True)
    rows = [r for r in load_reservations(d) if r.mac != mac_l and r.ip != ip]
    rows.append(Reservation(mac_l, ip, name))
    _write_json(d / "reservations.json", [asdict(r) for r in rows])


def _client_hostname(payload: bytes) -> str:
    """Option 12 of a DHCP request, if any (RFC 2132 §3.14)."""
    i = _BOOTP.size
    while i + 1 < len(payload):
        code = payload[i]
        if code == 0:
            i += 1
            continue
        if code == 255:
            break
        n = payload[i + 1]
        if code == 12:
            raw = payload[i + 2 : i + 2 + n].decode("ascii", "replace")
            return "".join(c for c in raw if c.isalnum() or c == "-")[:63].lower()
        i += 2 + n
    return ""


def _opt(code: int, value: bytes) -> bytes:
    return bytes([code, len(value)]) + value


class LeaseDb:
    """Leases by MAC, persisted on every change."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.leases: dict[str, Lease] = {le.mac: le for le in load_leases(state)}

    def save(self) -> None:
        _write_json(self.state / "leases.json", [asdict(le) for le in self.leases.values()])

    def _taken(self, ip: str, mac: str) -> bool:
        now = time.time()
        for le in self.leases.values():
            if le.ip == ip and le.mac != mac and le.expires > now:
                return True
        return any(r.ip == ip and r.mac != mac for r in load_reservations(self.state))

    def choose(self, mac: str, requested: str | None) -> str | None:
        for r in load_reservations(self.state):
            if r.mac == mac:
                return r.ip
        current = self.leases.get(mac)
        if current is not None:
            return current.ip
        if requested is not None:
            try:
                req = ipaddress.IPv4Address(requested)
            except ValueError:
                req = None
            if req is not None and FIRST <= req <= LAST and not self._taken(requested, mac):
                return requested
        ip = int(FIRST)
        while ip <= int(LAST):
            text = str(ipaddress.IPv4Address(ip))
            if not self._taken(text, mac):
                return text
            ip += 1
        return None

    def bind(self, mac: str, ip: str, hostname: str) -> None:
        name = hostname
        for r in load_reservations(self.state):
            if r.mac == mac and r.name:
                name = r.name
        self.leases[mac] = Lease(mac, ip, name, time.time() + LEASE_TIME)
        self.save()

    def release(self, mac: str) -> None:
        if self.leases.pop(mac, None) is not None:
            self.save()

    def lookup_name(self, name: str) -> str | None:
        now = time.time()
        short = name.split(".", 1)[0]
        for le in self.leases.values():
            if le.hostname and le.hostname == short and le.expires > now:
                return le.ip
        return None


class DhcpResponder(asyncio.DatagramProtocol):
    """DHCP on the bridge: replies go to the broadcast address, as the client has no address yet."""

    def __init__(self, db: LeaseDb) -> None:
        self.db = db
        self.offered: dict[str, str] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.replies = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        m = dhcpmsg.parse(data)
        if m is None:
            return
        mac = _mac_text(m.chaddr)
        requested = str(ipaddress.IPv4Address(m.requested)) if m.requested else None
        ours = GATEWAY.packed
        if m.msg_type == dhcpmsg.DISCOVER:
            ip = self.db.choose(mac, requested)
            if ip is not None:
                self.offered[mac] = ip
                self._reply(m, dhcpmsg.OFFER, ip)
        elif m.msg_type == dhcpmsg.REQUEST:
            if m.server_id is not None and m.server_id != ours:
                self.offered.pop(mac, None)  # the client chose another server
                return
            want = requested or (str(ipaddress.IPv4Address(m.ciaddr)) if m.ciaddr != b"\0\0\0\0" else None)
            ip = self.db.choose(mac, want)
            if ip is None or (want is not None and want != ip):
                self._reply(m, dhcpmsg.NAK, None)
                return
            self.db.bind(mac, ip, _client_hostname(data))
            self._reply(m, dhcpmsg.ACK, ip)
        elif m.msg_type == dhcpmsg.RELEASE:
            self.db.release(mac)
        elif m.msg_type == dhcpmsg.INFORM:
            self._reply(m, dhcpmsg.ACK, None, inform=True)

    def _reply(self, m: dhcpmsg.Message, msg_type: int, ip: str | None, *, inform: bool = False) -> None:
        yi = ipaddress.IPv4Address(ip).packed if ip else b"\0\0\0\0"
        head = _BOOTP.pack(
            2, 1, 6, 0, m.xid, 0, m.flags & 0x8000, m.ciaddr, yi, GATEWAY.packed, b"\0\0\0\0",
            m.chaddr + bytes(10), bytes(64), bytes(128), dhcpmsg.MAGIC,
        )  # fmt: skip
        opts = _opt(dhcpmsg.OPT_MSG_TYPE, bytes([msg_type])) + _opt(dhcpmsg.OPT_SERVER_ID, GATEWAY.packed)
        if msg_type != dhcpmsg.NAK:
            opts += _opt(dhcpmsg.OPT_SUBNET, NETWORK.netmask.packed)
            opts += _opt(dhcpmsg.OPT_ROUTER, GATEWAY.packed)
            opts += _opt(dhcpmsg.OPT_DNS, GATEWAY.packed)
            opts += _opt(dhcpmsg.OPT_BROADCAST, NETWORK.broadcast_address.packed)
            if not inform:
                opts += _opt(dhcpmsg.OPT_LEASE_TIME, struct.pack("!I", LEASE_TIME))
        body = head + opts + b"\xff"
        body += bytes(max(0, 300 - len(body)))
        dst = m.ciaddr if inform and m.ciaddr != b"\0\0\0\0" else b"\xff\xff\xff\xff"
        if self.transport is not None:
            self.transport.sendto(body, (socket.inet_ntoa(dst), dhcpmsg.CLIENT_PORT))
            self.replies += 1


class DnsResponder(asyncio.DatagramProtocol):
    """Lease names answered here; anything else forwarded to the host's resolvers."""

    def __init__(self, db: LeaseDb, upstream: list[tuple[str, int]]) -> None:
        self.db = db
        self.upstream = upstream
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = dnsmsg.parse_question(data)
        if q is None or self.transport is None:
            return
        qid, flags, name, qtype, _qclass, qend = q
        ip = self.db.lookup_name(name)
        if ip is not None or not self.upstream:
            ans = dnsmsg.answer(data, qend, qid, flags, ipaddress.IPv4Address(ip).packed if ip else None, qtype)
            if ip is None:
                ans = ans[:3] + bytes([ans[3] | 3]) + ans[4:]  # NXDOMAIN
            self.transport.sendto(ans, addr)
            return
        asyncio.get_running_loop().create_task(self._forward(data, addr))

    async def _forward(self, data: bytes, client: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            try:
                await loop.sock_sendto(s, data, self.upstream[0])
                reply = await asyncio.wait_for(loop.sock_recv(s, 4096), 5)
            except (OSError, TimeoutError):
                return
        if self.transport is not None:
            self.transport.sendto(reply, client)


async def serve(state: Path, stop: asyncio.Event) -> None:
    """Run the DHCP and DNS responders on virbr0 until ``stop`` is set."""
    loop = asyncio.get_running_loop()
    db = LeaseDb(state)
    dhcp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dhcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    dhcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    dhcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, BRIDGE.encode())
    dhcp_sock.bind(("0.0.0.0", dhcpmsg.SERVER_PORT))
    dhcp_t, _ = await loop.create_datagram_endpoint(lambda: DhcpResponder(db), sock=dhcp_sock)
    # Its forwarder speaks IPv4 only; a loopback resolver (the default when resolv.conf names
    # none) is left out as before.
    upstream = [
        s for s in dnsmsg.host_nameservers()
        if (a := dnsmsg.upstream_address(*s)) is not None and a[0] == socket.AF_INET and not s[0].startswith("127.")
    ]
    dns_t, _ = await loop.create_datagram_endpoint(
        lambda: DnsResponder(db, upstream), local_addr=(str(GATEWAY), dnsmsg.DNS_PORT)
    )
    (state / "ready").write_text(str(os.getpid()))
    try:
        await stop.wait()
    finally:
        dhcp_t.close()
        dns_t.close()
        with contextlib.suppress(OSError):
            (state / "ready").unlink()


def _nft(ruleset: str) -> None:
    r = subprocess.run(["nft", "-f", "-"], input=ruleset, capture_output=True, text=True)
    if r.returncode != 0:
        raise NetError(f"nft refused the ruleset: {r.stderr.strip().splitlines()[0] if r.stderr else r.returncode}")


def nft_ruleset() -> str:
    net = str(NETWORK)
    return f"""
table ip {NFT_TABLE} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {net} ip daddr != {net} masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{BRIDGE}" ip saddr {net} accept
    oifname "{BRIDGE}" ip daddr {net} ct state established,related accept
    oifname "{BRIDGE}" drop
  }}
}}
"""


def nft_present() -> bool:
    r = subprocess.run(["nft", "list", "table", "ip", NFT_TABLE], capture_output=True, text=True)
    return r.returncode == 0


def _pid(state: Path) -> int | None:
    try:
        pid = int((state / "daemon.pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


async def start(state: Path | None = None) -> None:
    """Bring the default network up (idempotent)."""
    from appliance.net import bridge

    d = state or state_dir()
    d.mkdir(parents=True, exist_ok=True)
    await bridge.add_bridge(BRIDGE, address=f"{GATEWAY}/{NETWORK.prefixlen}")
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    if not nft_present():
        _nft(nft_ruleset())
    if _pid(d) is None:
        with contextlib.suppress(OSError):
            (d / "ready").unlink()
        log = open(d / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli.main", "net", "default", "serve"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "APPLIANCE_NET_STATE": str(d)},
        )
        log.close()
        (d / "daemon.pid").write_text(str(proc.pid))
        deadline = time.monotonic() + 10
        while not (d / "ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise NetError(f"the DHCP/DNS daemon did not start (see {d / 'daemon.log'})")
            await asyncio.sleep(0.05)


async def stop(state: Path | None = None) -> None:
    """Take the default network down: daemon, nftables table, bridge."""
    from appliance.net import bridge

    d = state or state_dir()
    pid = _pid(d)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except OSError:
                break
            await asyncio.sleep(0.05)
    with contextlib.suppress(OSError):
        (d / "daemon.pid").unlink()
    if nft_present():
        subprocess.run(["nft", "delete", "table", "ip", NFT_TABLE], check=False, capture_output=True)
    await bridge.del_bridge(BRIDGE)


async def status(state: Path | None = None) -> dict[str, object]:
    from appliance.net import bridge

    d = state or state_dir()
    brs = {b.name: b for b in await bridge.list_bridges()}
    now = time.time()
    return {
        "bridge": BRIDGE in brs,
        "ports": list(brs[BRIDGE].ports) if BRIDGE in brs else [],
        "daemon": _pid(d),
        "nat": nft_present(),
        "leases": [asdict(le) for le in load_leases(d) if le.expires > now],
        "reservations": [asdict(r) for r in load_reservations(d)],
    }
