"""Counters and the per-flow table (the data behind QEMU's ``info usernet``).

Every frame the stack refuses lands in exactly one named counter, so tests
and operators can tell "the guest sent garbage" from "the host was slow".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True)
class Counters:
    rx_frames: int = 0  # guest → stack
    tx_frames: int = 0  # stack → guest (delivered through recv_into)
    tx_queue_drops: int = 0  # outgoing queue to the guest was full
    truncated: int = 0  # shorter than its headers say
    bad_checksum: int = 0
    bad_vnet_hdr: int = 0  # a virtio-net header with flags or a GSO type we do not offer
    rx_gso_frames: int = 0  # TSO segments from the guest (each taken as one TCP segment)
    tx_gso_frames: int = 0  # TSO segments handed to the guest
    not_for_us: int = 0  # wrong MAC, unknown ethertype, spoofed source
    unsupported: int = 0  # protocol or option we do not handle
    frag_reassembled: int = 0
    frag_dropped: int = 0  # overlaps, timeouts, too many, too large
    arp_replies: int = 0
    icmp_echo_local: int = 0
    icmp_echo_forwarded: int = 0
    icmp_unpermitted: int = 0  # host forbids unprivileged ping sockets
    icmp_unreachable_sent: int = 0  # host had no route: told the guest (net/host unreachable)
    icmp_errors_limited: int = 0  # ICMP errors to the guest held back by the rate limit
    dhcp_replies: int = 0
    dhcp_bad: int = 0
    dhcp6_replies: int = 0  # DHCPv6 Replies to Information-requests
    dhcp6_bad: int = 0  # malformed DHCPv6 messages, or ones asking for addresses
    dns_local: int = 0
    dns_forwarded: int = 0
    dns_dropped: int = 0
    udp_flows: int = 0
    udp_dropped: int = 0
    tcp_conns: int = 0
    tcp_refused: int = 0  # host connect failed → RST to the guest (ICMP unreachable: no route)
    tcp_syn_dropped: int = 0  # connection limits (SYN flood)
    tcp_rst_sent: int = 0
    tcp_retransmits: int = 0
    tcp_window_probes: int = 0
    tcp_timeouts: int = 0  # retransmission timer expiries (RTO or SYN)
    tcp_bad: int = 0  # out-of-window, bad ACK, challenge ACKs
    restricted: int = 0  # restrict=on refused a flow
    errors: int = 0  # internal failures caught at the frame boundary

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """One row of the flow table, like ``info usernet``."""

    proto: str  # "TCP", "TCP[HOST_FORWARD]", "UDP", "UDP[HOST_FORWARD]", "ICMP"
    state: str  # the connection's state; "LISTEN" for a hostfwd listener
    host_addr: str  # our host socket's own address ("0.0.0.0" when none is open)
    host_port: int
    guest_addr: str
    guest_port: int
    recv_q: int  # bytes waiting to go to the host
    send_q: int  # bytes waiting to go to the guest (including unacked)
    fd: int = -1  # the host socket's descriptor (-1: none open)
    label: str = ""  # QEMU's Protocol[State] column, when not derived from proto and state
    # The far end: for a flow the guest started, as the guest addresses it (10.0.2.2 for the
    # host); for a forwarded connection, the outside client.
    guest_started: bool = False
    peer_addr: str = ""
    peer_port: int = 0

    def line(self) -> str:
        """The row as QEMU's ``info usernet`` prints it (libslirp's ``slirp_connection_info``):
        a flow the guest started reads guest → peer, a forwarded one host socket → guest."""
        label = self.label or (self.proto if "[" in self.proto or not self.state
                               else f"{self.proto}[{self.state}]")
        if self.guest_started:
            src, sport, dst, dport = self.guest_addr, self.guest_port, self.peer_addr, self.peer_port
        else:
            src, sport, dst, dport = self.host_addr, self.host_port, self.guest_addr, self.guest_port
        src = "*" if src == "0.0.0.0" else src  # libslirp's INADDR_ANY
        if self.proto == "ICMP":  # no ports
            return (f"  {label:<17} {self.fd:3d} {src:>15}  -    {dst:>15}  -    "
                    f"{self.recv_q:5d} {self.send_q:5d}")
        return (
            f"  {label:<17} {self.fd:3d} {src:>15} {sport:5d} "
            f"{dst:>15} {dport:5d} {self.recv_q:5d} {self.send_q:5d}"
        )


def sock_address(sock: Any, peer: bool = False) -> tuple[str, int]:
    """A host socket's own address (or its peer's) for a flow row: ``0.0.0.0``, 0 when it is
    closed, not an IP socket (a guestfwd command's socketpair), or none."""
    try:
        name = (sock.getpeername() if peer else sock.getsockname()) if sock is not None else None
    except (OSError, ValueError):
        name = None
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), int(name[1])
    return "0.0.0.0", 0


HEADER = "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ"


def format_flows(flows: list[FlowInfo], eol: str = "\n") -> str:
    """The table under QEMU's header (HMP ends lines with CRLF: ``eol="\\r\\n"``)."""
    return eol.join([HEADER, *(f.line() for f in flows)]) + eol
