"""UDP NAT: one host socket per guest flow, closed after an idle timeout.

A flow is (guest address, guest port, destination address, destination
port). Its socket is connected to the destination, so only that peer's
datagrams come back (endpoint-dependent filtering, RFC 4787 §5). Inbound
``hostfwd=udp:`` listeners make flows the other way: datagrams from a host
client appear to come from the gateway address with the client's port.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from appliance.nat.config import HostForward
from appliance.nat.errors import NatError
from appliance.nat.frames import IPPROTO_UDP, ip_str
from appliance.nat.icmp import QUOTE_V6, udp_quote
from appliance.nat.stats import FlowInfo, sock_address

if TYPE_CHECKING:
    from appliance.nat.stack import UserNetwork

# As libslirp (SO_EXPIRE, SO_EXPIREFAST): a flow lives 240 s past its last datagram, but one
# to port 53 only 10 s past an answer, so a resolver's one-query source ports do not fill the table.
IDLE_TIMEOUT = 240.0
ANSWERED_DNS_TIMEOUT = 10.0
MAX_FLOWS = 512
_BATCH = 64
# What an ICMPv6 error quotes of a datagram after its UDP header (RFC 4443 §2.4(c)). A v6 flow
# keeps that much of its last datagram for the errors the host reports later (at most
# 512 x 1184 bytes); ICMP quotes only 8 bytes (RFC 792), which the flow's key rebuilds.
_QUOTE_UDP6 = QUOTE_V6 - 8

FlowKey = tuple[bytes, int, bytes, int]  # guest ip, guest port, remote ip (as the guest sees it), remote port


def udp_label(left: float) -> str:
    """QEMU's Protocol[State] for a UDP flow: how long it has left before it is dropped if idle."""
    return f"UDP[{max(0, int(left))} sec]"


class _Flow:
    __slots__ = ("key", "sock", "peer", "created", "last", "timeout", "inbound", "rx", "tx", "last_len", "last_head")

    def __init__(self, key: FlowKey, sock: socket.socket, peer: tuple[str, int] | None, inbound: bool) -> None:
        self.key = key
        self.sock = sock
        self.peer = peer  # None: connected socket; else sendto this address (hostfwd)
        self.created = self.last = time.monotonic()
        self.timeout = IDLE_TIMEOUT
        self.inbound = inbound
        self.rx = 0
        self.tx = 0
        self.last_len = 0
        self.last_head = b""  # the start of the last datagram sent, for ICMPv6 errors (v6 flows)


class UdpNat:
    def __init__(self, net: UserNetwork) -> None:
        self.net = net
        self._flows: dict[FlowKey, _Flow] = {}
        self._listeners: list[tuple[socket.socket, HostForward]] = []

    # -- guest → host ----------------------------------------------------
    def input(self, src: bytes, sport: int, dst: bytes, dport: int, payload: memoryview) -> None:
        key = (src, sport, dst, dport)
        flow = self._flows.get(key)
        c = self.net.stats
        if flow is None:
            if self.net.config.restrict:
                c.restricted += 1
                return
            if not self.net.routable(dst):
                c.not_for_us += 1
                return
            target = self.net.host_side(dst)
            if len(self._flows) >= MAX_FLOWS:
                self._close(min(self._flows.values(), key=lambda f: f.last))
            family = socket.AF_INET6 if len(target) == 16 else socket.AF_INET
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM)
            except OSError:
                c.udp_dropped += 1  # out of descriptors: drop, as a full NAT table would
                return
            try:
                sock.setblocking(False)
                sock.connect((ip_str(target), dport))
            except OSError as err:
                sock.close()
                c.udp_dropped += 1
                self._unreachable(err, key, len(payload), bytes(payload[:_QUOTE_UDP6]))
                return
            flow = self._flows[key] = _Flow(key, sock, None, False)
            c.udp_flows += 1
            self.net.loop.add_reader(sock.fileno(), self._readable, flow)
        flow.last = time.monotonic()
        flow.timeout = IDLE_TIMEOUT
        try:
            if flow.peer is None:
                flow.sock.send(payload)
            else:
                flow.sock.sendto(payload, flow.peer)
            flow.tx += len(payload)
            flow.last_len = len(payload)
            if len(src) == 16:
                flow.last_head = bytes(payload[:_QUOTE_UDP6])
        except ConnectionRefusedError:
            c.udp_dropped += 1
            self._refused(flow)  # about an earlier datagram (the host heard so since)
        except OSError as err:
            c.udp_dropped += 1
            self._unreachable(err, key, len(payload), bytes(payload[:_QUOTE_UDP6]))

    def _unreachable(self, err: OSError, key: FlowKey, length: int, head: bytes) -> None:
        """No route for the guest's datagram of ``length`` bytes that began with ``head``."""
        gip, gport, rip, rport = key
        self.net.icmp.unreachable(err.errno, gip, rip, IPPROTO_UDP, udp_quote(gport, rport, length, head), 8 + length)

    def _readable(self, flow: _Flow) -> None:
        gip, gport, rip, rport = flow.key
        for _ in range(_BATCH):
            try:
                data = flow.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                self._refused(flow)  # the host got "port unreachable" for an earlier datagram
                continue
            except OSError as err:
                if not flow.inbound:  # an earlier datagram met no route on the way
                    self._unreachable(err, flow.key, flow.last_len, flow.last_head)
                continue
            flow.last = time.monotonic()
            flow.timeout = ANSWERED_DNS_TIMEOUT if rport == 53 else IDLE_TIMEOUT
            flow.rx += len(data)
            self.net.emit_udp(gip, gport, rip, rport, data)

    def _refused(self, flow: _Flow) -> None:
        """Tell the guest, as the host was told, that nobody listens there."""
        if not flow.inbound:
            gip, gport, rip, rport = flow.key
            self.net.icmp.port_unreachable(gip, gport, rip, rport, flow.last_len, flow.last_head)

    # -- hostfwd=udp -----------------------------------------------------
    def listen(self, fwd: HostForward, *, first: bool = False) -> None:
        """Bind ``fwd``'s host port; ``first`` puts it at the head of the table (see UserNetwork)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((fwd.host_addr or "0.0.0.0", fwd.host_port))
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            raise NatError(f"Could not set up host forwarding rule 'udp:{fwd.host_addr}:{fwd.host_port}'") from err
        self._listeners.insert(0 if first else len(self._listeners), (sock, fwd))
        self.net.loop.add_reader(sock.fileno(), self._listener_readable, sock, fwd)

    def listener_ports(self) -> list[int]:
        return [s.getsockname()[1] for s, _ in self._listeners]

    def unlisten(self, host_addr: str, host_port: int) -> bool:
        for i, (sock, fwd) in enumerate(self._listeners):
            if (fwd.host_addr or "0.0.0.0") == (host_addr or "0.0.0.0") and host_port in (
                fwd.host_port,
                sock.getsockname()[1],
            ):
                for flow in [f for f in self._flows.values() if f.sock is sock]:
                    self._flows.pop(flow.key, None)
                try:
                    self.net.loop.remove_reader(sock.fileno())
                except (ValueError, OSError):
                    pass
                sock.close()
                del self._listeners[i]
                return True
        return False

    def _listener_readable(self, sock: socket.socket, fwd: HostForward) -> None:
        for _ in range(_BATCH):
            try:
                data, peer = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            gip = fwd.guest_addr.packed
            key = (gip, fwd.guest_port, self.net.gateway_ip, peer[1])
            flow = self._flows.get(key)
            if flow is None or flow.peer != peer:
                if flow is not None:
                    # Another client on the same port, or a flow the guest opened from the
                    # forwarded port to this client's port (a WireGuard or RTP endpoint talks
                    # from its one port both ways): replaced. The latter has a socket of its
                    # own, closed here; taken out of the table only, it stayed open and read.
                    self._close(flow)
                elif len(self._flows) >= MAX_FLOWS:
                    self._close(min(self._flows.values(), key=lambda f: f.last))
                flow = self._flows[key] = _Flow(key, sock, peer, True)
                self.net.stats.udp_flows += 1
            flow.last = time.monotonic()
            flow.rx += len(data)
            self.net.emit_udp(gip, fwd.guest_port, self.net.gateway_ip, peer[1], data)

    # -- housekeeping ----------------------------------------------------
    def _close(self, flow: _Flow) -> None:
        self._flows.pop(flow.key, None)
        if not flow.inbound:
            try:
                self.net.loop.remove_reader(flow.sock.fileno())
            except (ValueError, OSError):
                pass
            flow.sock.close()

    def expire(self, now: float) -> None:
        for flow in [f for f in self._flows.values() if now - f.last > f.timeout]:
            self._close(flow)

    def close_guest(self, ips: set[bytes]) -> None:
        """Close the flows of a guest at any of ``ips`` (one of several that has gone)."""
        for flow in [f for f in self._flows.values() if f.key[0] in ips]:
            self._close(flow)

    def __len__(self) -> int:
        return len(self._flows)

    def flows(self, others: list[tuple[float, FlowInfo]] | None = None) -> list[FlowInfo]:
        """Flows newest first, then the hostfwd listeners newest first (a listener added at run
        time heads libslirp's whole table, here the listeners only). A datagram
        arriving on a listener is served through that listener's socket, shown once (its row).

        :param others: more guest flows with their creation times (the DNS proxy's), placed
            among ours by age, as libslirp lists all its UDP sockets in one table.
        """
        rows = list(others or ())
        now = time.monotonic()
        for f in reversed(self._flows.values()):
            if f.inbound:
                continue
            gip, gport, rip, rport = f.key
            host = sock_address(f.sock)
            rows.append((f.created, FlowInfo("UDP", "", host[0], host[1], ip_str(gip), gport, 0, 0, f.sock.fileno(),
                                             udp_label(f.timeout - (now - f.last)), guest_started=True,
                                             peer_addr=ip_str(rip), peer_port=rport)))
        rows.sort(key=lambda r: r[0], reverse=True)
        out = [info for _, info in rows]
        for sock, fwd in self._listeners:
            host, port = sock.getsockname()[:2]
            out.append(FlowInfo("UDP[HOST_FORWARD]", "LISTEN", str(host), int(port), str(fwd.guest_addr),
                                fwd.guest_port, 0, 0, fd=sock.fileno(), label="UDP[HOST_FORWARD]"))
        return out

    def close(self) -> None:
        for flow in list(self._flows.values()):
            self._close(flow)
        for sock, _ in self._listeners:
            try:
                self.net.loop.remove_reader(sock.fileno())
            except (ValueError, OSError):
                pass
            sock.close()
        self._listeners.clear()
