"""ICMP (RFC 792): echo for the gateway's own addresses, and echo forwarded to the host.

Forwarding uses Linux's unprivileged ICMP datagram sockets
(``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``, allowed for the groups in
``net.ipv4.ping_group_range``). The kernel owns the echo identifier of such a
socket, so each guest (identifier, destination) gets its own socket and
replies get the guest's identifier written back. Where the host forbids
these sockets the request is dropped and counted, as libslirp does.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from typing import TYPE_CHECKING

from appliance.nat.frames import IPPROTO_ICMP, IPPROTO_UDP, Ipv4, checksum, ip_str, verify
from appliance.nat.stats import FlowInfo, sock_address

if TYPE_CHECKING:
    from appliance.nat.stack import UserNetwork

ECHO_REPLY = 0
ECHO_REQUEST = 8
ECHO_REPLY_V6 = 129
DEST_UNREACHABLE = 3
IDLE_TIMEOUT = 30.0
MAX_FLOWS = 64
# ICMP errors to the guest are rate limited (RFC 4443 §2.4(f) MUST, RFC 1812 §4.3.2.8 SHOULD):
# a token bucket with Linux's defaults (net.ipv4.icmp_msgs_per_sec, icmp_msgs_burst).
ERRORS_PER_SEC = 1000.0
ERRORS_BURST = 50.0
# RFC 4443 §2.4(c): an ICMPv6 error quotes as much of the invoking packet as fits without the
# error exceeding the IPv6 minimum MTU (1280): what is left after our IPv6 header (40), the
# ICMPv6 header (8) and the quoted packet's IPv6 header (40) is its upper-layer part.
QUOTE_V6 = 1280 - 40 - 8 - 40


def echo_reply(request: bytes | memoryview) -> bytes:
    """Turn an echo request message into its reply (type 0, same id/seq/data)."""
    msg = bytearray(request)
    msg[0] = ECHO_REPLY
    msg[1] = 0
    msg[2:4] = b"\0\0"
    struct.pack_into("!H", msg, 2, checksum(msg))
    return bytes(msg)


# Destination Unreachable codes (RFC 792; ICMPv6: RFC 4443 §3.1).
NET_UNREACHABLE = 0
HOST_UNREACHABLE = 1
PORT_UNREACHABLE = 3
DEST_UNREACHABLE_V6 = 1
V6_NO_ROUTE = 0
V6_ADDRESS_UNREACHABLE = 3
V6_PORT_UNREACHABLE = 4
IPPROTO_ICMPV6 = 58

# What socket() says when this host will not give us ping sockets at all (net.ipv4.ping_group_range
# excludes our group, or no kernel support), as against a passing shortage such as EMFILE.
_NO_PING_SOCKETS = {errno.EACCES, errno.EPERM, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT}

# A host socket's routing errors, as the codes a router would have sent the guest.
_ROUTING_ERRORS = {
    errno.ENETUNREACH: (NET_UNREACHABLE, V6_NO_ROUTE),
    errno.EHOSTUNREACH: (HOST_UNREACHABLE, V6_ADDRESS_UNREACHABLE),
}


def routing_error(err: int | None) -> bool:
    """Whether a host socket's ``err`` means the destination cannot be reached (not a refusal)."""
    return err in _ROUTING_ERRORS


def udp_quote(sport: int, dport: int, length: int, head: bytes) -> bytes:
    """The guest's UDP header rebuilt for an ICMP error to quote, followed by ``head``, the first
    payload bytes kept of its datagram of ``length`` payload bytes (the checksum is left 0:
    the quote only names the flow, RFC 792 and RFC 4443 §2.4(c))."""
    return struct.pack("!HHHH", sport, dport, 8 + length, 0) + head


def dest_unreachable(code: int, gip: bytes, rip: bytes, proto: int, l4_head: bytes, length: int) -> bytes:
    """Destination Unreachable for a guest datagram, quoting its IP header and first 8 bytes (RFC 792).

    The quoted header is rebuilt from the flow: the guest matches the error to its
    socket by addresses, protocol and the ports (and, for TCP, the sequence number)
    in those 8 bytes, which is all they need to carry (RFC 1122 §3.2.2.1).
    """
    quoted = struct.pack("!BBHHHBBH4s4s", 0x45, 0, min(20 + length, 0xFFFF), 0, 0, 64, proto, 0, gip, rip)
    quoted = quoted[:10] + struct.pack("!H", checksum(quoted)) + quoted[12:] + l4_head[:8]
    msg = bytearray(struct.pack("!BBHI", DEST_UNREACHABLE, code, 0, 0) + quoted)
    struct.pack_into("!H", msg, 2, checksum(msg))
    return bytes(msg)


def dest_unreachable_v6(code: int, gip: bytes, rip: bytes, proto: int, l4: bytes, length: int) -> bytearray:
    """ICMPv6 Destination Unreachable (RFC 4443 §3.1) quoting a rebuilt IPv6 header and as much
    of the guest's upper-layer packet ``l4`` (of ``length`` bytes in all) as is known, up to
    :data:`QUOTE_V6` bytes; the caller fills in the checksum with its pseudo-header."""
    quoted = struct.pack("!IHBB16s16s", 6 << 28, min(length, 0xFFFF), proto, 64, gip, rip) + l4[:QUOTE_V6]
    return bytearray(struct.pack("!BBHI", DEST_UNREACHABLE_V6, code, 0, 0) + quoted)


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
        self._tokens = ERRORS_BURST
        self._refilled = time.monotonic()
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
            except OSError as err:
                if err.errno not in _NO_PING_SOCKETS:
                    c.udp_dropped += 1  # out of descriptors, say: this request only
                    return
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
        except OSError as err:
            c.udp_dropped += 1
            self.unreachable(err.errno, src, dst, IPPROTO_ICMPV6 if len(dst) == 16 else IPPROTO_ICMP, msg, len(msg))

    def unreachable(self, err: int | None, gip: bytes, rip: bytes, proto: int, l4_head: bytes, length: int) -> bool:
        """Tell the guest that ``rip`` cannot be reached, when a host socket's ``err`` says so.

        The host's routing table is the guest's next hop: no route there ends the guest's
        connect() or ping at once, as libslirp's error to the guest does, instead of a
        refusal or silence. ``l4_head`` is the guest's transport header and as much of what
        followed as is known: ICMP quotes 8 bytes of it (RFC 792), ICMPv6 up to
        :data:`QUOTE_V6` (RFC 4443 §2.4(c)).
        """
        codes = _ROUTING_ERRORS.get(err) if err is not None else None
        if codes is None:
            return False
        # From the gateway: it is the router that had no way on (RFC 1812 §4.3.2.4).
        net = self.net
        router6 = net.ipv6.router if net.ipv6 is not None else None
        if not self._send_error(codes, net.gateway_ip, router6, gip, rip, proto, l4_head, length):
            return False
        net.stats.icmp_unreachable_sent += 1
        return True

    def port_unreachable(self, gip: bytes, gport: int, rip: bytes, rport: int, length: int, head: bytes = b"") -> None:
        """Nobody listens at ``rip:rport`` for the guest's UDP datagram of ``length`` payload bytes,
        which began with ``head`` (the host was told so): said from that address, as the host
        there would (RFC 792, RFC 4443 §3.1, RFC 1122 §3.2.2.1)."""
        codes = (PORT_UNREACHABLE, V6_PORT_UNREACHABLE)
        self._send_error(codes, rip, rip, gip, rip, IPPROTO_UDP, udp_quote(gport, rport, length, head), 8 + length)

    def _send_error(
        self, codes: tuple[int, int], src: bytes, src6: bytes | None, gip: bytes, rip: bytes, proto: int,
        l4_head: bytes, length: int,
    ) -> bool:  # fmt: skip
        """One Destination Unreachable to the guest (v4 code, v6 code), within the rate limit."""
        if not self.error_allowed():
            return False
        net = self.net
        if len(gip) == 16:
            if net.ipv6 is not None and src6 is not None:
                net.ipv6.emit_icmp(src6, gip, dest_unreachable_v6(codes[1], gip, rip, proto, l4_head, length))
            return True
        net.emit_ipv4(gip, src, IPPROTO_ICMP, dest_unreachable(codes[0], gip, rip, proto, l4_head, length))
        return True

    def error_allowed(self) -> bool:
        """Take a token for one ICMP error to the guest; False (counted) when the bucket is empty."""
        now = time.monotonic()
        self._tokens = min(ERRORS_BURST, self._tokens + (now - self._refilled) * ERRORS_PER_SEC)
        self._refilled = now
        if self._tokens < 1.0:
            self.net.stats.icmp_errors_limited += 1
            return False
        self._tokens -= 1.0
        return True

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

    def close_guest(self, ips: set[bytes]) -> None:
        """Close the ping sockets of a guest at any of ``ips``."""
        for flow in [f for f in self._flows.values() if f.guest in ips]:
            self._close(flow)

    def flows(self) -> list[FlowInfo]:
        """The ping sockets, newest first, with the seconds each has left before it is closed."""
        out = []
        now = time.monotonic()
        for f in reversed(self._flows.values()):
            left = max(0, int(IDLE_TIMEOUT - (now - f.last)))
            out.append(FlowInfo("ICMP", "", sock_address(f.sock)[0], 0, ip_str(f.guest), 0, 0, 0, f.sock.fileno(),
                                f"ICMP[{left} sec]", guest_started=True, peer_addr=ip_str(f.dst)))
        return out

    def close(self) -> None:
        for flow in list(self._flows.values()):
            self._close(flow)
