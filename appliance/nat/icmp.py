"""ICMP (RFC 792): echo for the gateway's own addresses, and echo forwarded to the host.

Forwarding uses Linux's unprivileged ICMP datagram sockets
(``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``, allowed for the groups in
``net.ipv4.ping_group_range``). The kernel owns the echo identifier of such a
socket, so each guest (identifier, destination) gets its own socket and
replies get the guest's identifier written back. Where the host forbids
these sockets the request is dropped and counted, as libslirp does.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import TYPE_CHECKING

from appliance.nat.frames import IPPROTO_ICMP, IPPROTO_UDP, Ipv4, checksum, ip_str, verify

if TYPE_CHECKING:
    from appliance.nat.stack import UserNetwork

ECHO_REPLY = 0
ECHO_REQUEST = 8
ECHO_REPLY_V6 = 129
DEST_UNREACHABLE = 3
IDLE_TIMEOUT = 30.0
MAX_FLOWS = 64


def echo_reply(request: bytes | memoryview) -> bytes:
    """Turn an echo request message into its reply (type 0, same id/seq/data)."""
    msg = bytearray(request)
    msg[0] = ECHO_REPLY
    msg[1] = 0
    msg[2:4] = b"\0\0"
    struct.pack_into("!H", msg, 2, checksum(msg))
    return bytes(msg)


def port_unreachable(gip: bytes, gport: int, rip: bytes, rport: int, length: int) -> bytes:
    """Destination unreachable, code 3, quoting the guest's datagram header (RFC 792).

    The quoted IP and UDP headers are rebuilt from the flow: the guest matches
    the error to its socket by addresses and ports, which is all they carry.
    """
    quoted = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + length, 0, 0, 64, IPPROTO_UDP, 0, gip, rip)
    quoted = quoted[:10] + struct.pack("!H", checksum(quoted)) + quoted[12:]
    quoted += struct.pack("!HHHH", gport, rport, 8 + length, 0)
    msg = bytearray(struct.pack("!BBHI", DEST_UNREACHABLE, 3, 0, 0) + quoted)
    struct.pack_into("!H", msg, 2, checksum(msg))
    return bytes(msg)


class _PingFlow:
    __slots__ = ("guest", "ident", "dst", "sock", "last")

    def __init__(self, guest: bytes, ident: int, dst: bytes, sock: socket.socket) -> None:
        self.guest = guest
        self.ident = ident
        self.dst = dst
        self.sock = sock
        self.last = time.monotonic()


class Icmp:
    def __init__(self, net: UserNetwork) -> None:
        self.net = net
        self._flows: dict[tuple[bytes, int, bytes], _PingFlow] = {}
        self._allowed = True

    def input(self, ip: Ipv4) -> None:
        msg = ip.payload
        c = self.net.stats
        if len(msg) < 8:
            c.truncated += 1
            return
        if not verify(msg):
            c.bad_checksum += 1
            return
        if msg[0] != ECHO_REQUEST:
            c.unsupported += 1  # errors about our own packets need no action
            return
        if ip.dst in self.net.local_ips:
            c.icmp_echo_local += 1
            self.net.emit_ipv4(ip.src, ip.dst, IPPROTO_ICMP, echo_reply(msg))
            return
        if self.net.config.restrict:
            c.restricted += 1
            return
        if not self.net.routable(ip.dst):
            c.not_for_us += 1
            return
        self.forward(ip.src, ip.dst, bytes(msg))

    def forward(self, src: bytes, dst: bytes, msg: bytes) -> None:
        """Send a guest's echo request (ICMP or ICMPv6) out through a host ping socket."""
        c = self.net.stats
        ident = int.from_bytes(msg[4:6], "big")
        key = (src, ident, dst)
        flow = self._flows.get(key)
        if flow is None:
            if not self._allowed:
                c.icmp_unpermitted += 1
                return
            if len(self._flows) >= MAX_FLOWS:
                self._close(min(self._flows.values(), key=lambda f: f.last))
            try:
                if len(dst) == 16:
                    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6)
                else:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            except OSError:
                self._allowed = False  # ping_group_range excludes us; do not retry per packet
                c.icmp_unpermitted += 1
                return
            sock.setblocking(False)
            flow = self._flows[key] = _PingFlow(src, ident, dst, sock)
            self.net.loop.add_reader(sock.fileno(), self._readable, flow)
        flow.last = time.monotonic()
        try:
            flow.sock.sendto(msg, (ip_str(self.net.host_side(dst)), 0))
            c.icmp_echo_forwarded += 1
        except OSError:
            c.udp_dropped += 1

    def _readable(self, flow: _PingFlow) -> None:
        for _ in range(64):
            try:
                data = flow.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(flow)
                return
            v6 = len(flow.dst) == 16
            if len(data) < 8 or data[0] != (ECHO_REPLY_V6 if v6 else ECHO_REPLY):
                continue
            msg = bytearray(data)
            struct.pack_into("!HH", msg, 2, 0, flow.ident)
            flow.last = time.monotonic()
            if v6:
                if self.net.ipv6 is not None:
                    self.net.ipv6.emit_icmp(flow.dst, flow.guest, msg)  # checksummed with its pseudo-header
                continue
            struct.pack_into("!H", msg, 2, checksum(msg))
            self.net.emit_ipv4(flow.guest, flow.dst, IPPROTO_ICMP, msg)

    def _close(self, flow: _PingFlow) -> None:
        self._flows.pop((flow.guest, flow.ident, flow.dst), None)
        try:
            self.net.loop.remove_reader(flow.sock.fileno())
        except (ValueError, OSError):
            pass
        flow.sock.close()

    def expire(self, now: float) -> None:
        for flow in [f for f in self._flows.values() if now - f.last > IDLE_TIMEOUT]:
            self._close(flow)

    def flows(self) -> list[tuple[bytes, int, bytes]]:
        return list(self._flows)

    def close(self) -> None:
        for flow in list(self._flows.values()):
            self._close(flow)
