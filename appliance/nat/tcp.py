"""A TCP endpoint facing the guest (RFC 9293), whose other end is a host socket.

The guest talks to a real TCP implementation: three-way handshake, MSS and
window scaling (RFC 7323 §2), cumulative ACKs, retransmission with an RTT
estimate and exponential backoff (RFC 6298), fast retransmit on three
duplicate ACKs with a NewReno-style congestion window (RFC 5681, RFC 6582),
selective acknowledgements both ways (RFC 2018: holes the guest reports are
resent at once, RFC 6675-style; our duplicate ACKs carry our out-of-order
blocks), an out-of-order queue bounded by the advertised window, FIN and RST both ways,
half-close, zero-window probing (RFC 9293 §3.8.6.1) and RST/SYN checks
against blind injection (RFC 5961).

Sequence numbers are kept as unbounded integers counted from the initial
sequence numbers, so comparisons are plain ``<``; they are wrapped to 32 bits
only on the wire.

Memory is bounded both ways: bytes from the host wait in a send buffer of at
most ``SNDBUF`` (the host socket stops being read when it is full), and bytes
from the guest are accepted only inside a window that is the free room in the
host socket's write buffer, so a slow host reader closes the guest's window
instead of growing a queue.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from appliance.nat.frames import ETH_HLEN, ETH_P_IPV4, IP_DF, IPPROTO_TCP, fold, ones_sum, special_mac
from appliance.nat.ipv6 import build_ipv6
from appliance.nic import constants as V

if TYPE_CHECKING:
    from appliance.nat.stack import UserNetwork

M32 = 0xFFFFFFFF
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

OUR_MSS = 1460  # Ethernet MTU 1500 - 40
DEFAULT_GUEST_MSS = 536  # RFC 9293 §3.7.1: assume this without an MSS option
RCVBUF = 512 * 1024
RCV_WSCALE = 4  # 65535 << 4 covers RCVBUF
SNDBUF = 512 * 1024
INITIAL_RTO = 1.0
TLP_MIN = 0.05  # tail loss probe floor (see _arm_retransmit)
MIN_RTO = 0.2
MAX_RTO = 60.0
MAX_RETRIES = 10
MAX_SYN_RETRIES = 5
MAX_PROBES = 15
MAX_OOO_SEGMENTS = 256
MAX_SACK_BLOCKS = 16  # scoreboard entries kept (a guest reports at most 4 a segment)
SACK_RTX_BURST = 4  # hole segments (each up to a TSO frame) resent per ACK in recovery
SACK_PERMITTED = b"\x01\x01\x04\x02"  # NOP NOP SACK-permitted (RFC 2018 §2)
TIME_WAIT = 2.0
# FIN-WAIT-2 is the one state no timer of ours ends: the host closed, the guest acknowledged our
# FIN, and only the guest's own FIN (or RST) finishes the connection. A guest that never sends
# it (rebooted, or an application that never closes) would keep the connection and its host
# socket for the life of the stack. RFC 9293 sets no limit; BSD-derived stacks, libslirp among
# them, give up after 10 minutes without a segment from the peer, and Linux resets an orphaned
# FIN-WAIT-2 socket after tcp_fin_timeout. Same here: silent that long, it is reset.
FIN_WAIT_2_TIMEOUT = 600.0
ACK_EVERY = 8 * OUR_MSS
HOST_WRITE_BATCH = 64 * 1024
# How long the ACK of a guest's FIN may wait for our own FIN (RFC 9293 §3.8.6.3 allows
# up to 0.5 s). The host end usually closes within a millisecond of seeing EOF, and
# one FIN|ACK instead of ACK then FIN spares the guest a frame and an interrupt.
FIN_ACK_DELAY = 0.02
# Delayed ACK for in-order data (RFC 9293 §3.8.6.3, RFC 1122 §4.2.3.2): ACK at least
# every second full-sized segment, otherwise within this delay. ACKing every small
# segment at once defeats the guest's Nagle algorithm: a Linux guest piping 1 KiB
# writes (busybox nc) then sends 1 KiB segments, each costing its emulated CPU a
# transmit, a kick and an ACK to take in.
DELAYED_ACK = 0.002
# Largest TSO segment toward the guest: the IP length fields are 16 bits
# (IPv4 total length counts its own 20-byte header, IPv6 payload length does not).
TSO_MAX_V4 = 65535 - 20 - 20
TSO_MAX_V6 = 65535 - 20

_TCP = struct.Struct("!HHIIHHHH")
_LINUX_SYN_OPTS = struct.Struct("!HH4s8s3sB")  # see parse_options
# Ethernet, IPv4 (20 bytes) and TCP headers of one segment toward an IPv4 guest (_emit).
_ETH_IP4_TCP = struct.Struct("!6s6sHBBHHHBBH4s4sHHIIHHHH")
_L4_V4 = ETH_HLEN + 20
IP_TTL = 64
_VHDR_CSUM_V4 = V.HDR.pack(V.HDR_F_NEEDS_CSUM, V.GSO_NONE, 0, 0, _L4_V4, 16, 0)

CONNECTING, SYN_SENT, SYN_RCVD, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT, CLOSING, LAST_ACK, \
    TIME_WAIT_STATE, CLOSED = range(11)  # fmt: skip
STATE_NAMES = (
    "CONNECTING", "SYN_SENT", "SYN_RCVD", "ESTABLISHED", "FIN_WAIT_1", "FIN_WAIT_2",
    "CLOSE_WAIT", "CLOSING", "LAST_ACK", "TIME_WAIT", "CLOSED",
)  # fmt: skip
_SYNCHRONIZED = frozenset({ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT, CLOSING, LAST_ACK, TIME_WAIT_STATE})
_CAN_SEND = frozenset({ESTABLISHED, CLOSE_WAIT})
_CAN_RECV = frozenset({ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2})


class HostTransport(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def write_eof(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def get_write_buffer_size(self) -> int: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def is_closing(self) -> bool: ...


class Owner(Protocol):
    """What a connection needs from its table (:class:`appliance.nat.tcp_nat.TcpNat`)."""

    def forget(self, conn: TcpConn) -> None: ...
    def established(self, conn: TcpConn) -> None: ...
    def ack_later(self, conn: TcpConn) -> None: ...
    def time_wait(self, conn: TcpConn) -> None: ...


def parse_options(opts: bytes | memoryview) -> tuple[int | None, int | None, bool]:
    """(MSS, window scale, SACK permitted) from SYN options (RFC 9293 §3.1, RFC 7323 §2.2,
    RFC 2018 §2); malformed → ignored."""
    if len(opts) == 20:
        # Linux's SYN options (MSS, SACK-permitted, timestamps, NOP, window scale) in one unpack.
        kinds, mss_, mid, _ts, tail, ws = _LINUX_SYN_OPTS.unpack(opts)
        if kinds == 0x0204 and mid == b"\x04\x02\x08\x0a" and tail == b"\x01\x03\x03":
            return mss_, min(ws, 14), True
    mss = wscale = None
    sack = False
    # _options inlined: this runs for every SYN, and the generator was most of its cost.
    i = 0
    n = len(opts)
    while i < n:
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= n:
            break
        length = opts[i + 1]
        if length < 2 or i + length > n:
            break
        if kind == 2 and length == 4:
            mss = opts[i + 2] << 8 | opts[i + 3]
        elif kind == 3 and length == 3:
            wscale = min(opts[i + 2], 14)  # RFC 7323 §2.3: larger shifts are treated as 14
        elif kind == 4 and length == 2:
            sack = True
        i += length
    return mss, wscale, sack


def parse_sack(opts: bytes | memoryview) -> list[tuple[int, int]]:
    """The (left, right) wire edges of a SACK option (RFC 2018 §3); malformed → none."""
    for kind, i, length in _options(opts):
        if kind == 5 and length >= 10 and (length - 2) % 8 == 0:
            edges = struct.unpack_from(f"!{(length - 2) // 4}I", opts, i + 2)
            return list(zip(edges[0::2], edges[1::2], strict=True))
    return []


def _options(opts: bytes | memoryview) -> Iterator[tuple[int, int, int]]:
    """(kind, offset, length) of each option before End of List or the first malformed one (RFC 9293 §3.1)."""
    i = 0
    n = len(opts)
    while i < n:
        kind = opts[i]
        if kind == 0:
            return
        if kind == 1:
            i += 1
            continue
        if i + 1 >= n:
            return
        length = opts[i + 1]
        if length < 2 or i + length > n:
            return
        yield kind, i, length
        i += length


def _syn_option_bytes(v6: bool, wscale: bool, sack: bool, mss: int = OUR_MSS) -> bytes:
    """``mss``: the IPv4 figure (the link MTU less 40); IPv6 headers take 20 bytes more."""
    opts = struct.pack("!BBH", 2, 4, mss - 20 if v6 else mss)
    if wscale:
        opts += struct.pack("!BBBB", 1, 3, 3, RCV_WSCALE)
    if sack:
        opts += SACK_PERMITTED
    return opts


# Our SYN's options by (IPv6, window scaling, SACK): the same few bytes for every connection.
_BOOLS = (False, True)
_SYN_OPTIONS = {(v6, ws, sack): _syn_option_bytes(v6, ws, sack) for v6 in _BOOLS for ws in _BOOLS for sack in _BOOLS}


def unwrap(wire: int, base: int, ref: int) -> int:
    """The unbounded sequence number closest to ``ref`` whose wire form is ``wire``."""
    d = (wire - base - ref) & M32
    if d >= 0x80000000:
        d -= 0x100000000
    return ref + d


_ISS_BATCH = struct.Struct("!256I")
_iss_pool: list[int] = []


def _new_iss() -> int:
    """A random initial sequence number (RFC 9293 §3.4.1, RFC 6528: unpredictable), drawn from
    urandom in batches rather than by a getrandom() call on the path of every guest SYN."""
    if not _iss_pool:
        _iss_pool.extend(_ISS_BATCH.unpack(os.urandom(_ISS_BATCH.size)))
    return _iss_pool.pop()


class TcpConn:
    """One guest-facing TCP connection.

    ``gip:gport`` is the guest, ``rip:rport`` the remote end as the guest sees it.
    """

    def __init__(
        self,
        net: UserNetwork,
        owner: Owner,
        gip: bytes,
        gport: int,
        rip: bytes,
        rport: int,
        *,
        inbound: bool,
    ) -> None:
        self.net = net
        self.owner = owner
        self.key = (gip, gport, rip, rport)
        self.gip, self.gport, self.rip, self.rport = gip, gport, rip, rport
        self.inbound = inbound
        self.state = SYN_SENT if inbound else CONNECTING
        self.transport: HostTransport | None = None
        self.mac: bytes | None = None
        self._pseudo = int.from_bytes(rip, "big") + int.from_bytes(gip, "big") + IPPROTO_TCP
        self._v6 = len(gip) == 16
        self._l4 = ETH_HLEN + (40 if self._v6 else 20)  # where the TCP header starts in a frame
        # The IPv4 header words that never change (with its own 20-byte length): see _emit.
        self._ip_sum = 0x4500 + 20 + IP_DF + (IP_TTL << 8 | IPPROTO_TCP) + self._pseudo - IPPROTO_TCP
        self._loop = net.loop
        # Send side: sequence numbers relative to our ISS; SYN is seq 0.
        self.iss = _new_iss()
        self.snd_una = 0
        self.snd_nxt = 0
        self.snd_max = 0
        self.snd_wnd = 0
        self.snd_wl1 = -1
        self.snd_wl2 = 0
        self.snd_shift = 0
        self.mss = DEFAULT_GUEST_MSS
        self.sndbuf = bytearray()
        self._sndoff = 0  # bytes at the front of sndbuf already acknowledged
        self.fin_queued = False  # the host finished sending
        self.cwnd = 10 * OUR_MSS
        self.ssthresh = 1 << 30
        self.dupacks = 0
        self.recover = 0
        self.recovering = False  # in fast recovery until snd_una reaches ``recover``
        self.sack_ok = False  # both ends sent SACK-permitted
        self._sacked: list[list[int]] = []  # guest-reported [left, right) blocks above snd_una, sorted
        self._rxt_next = 0  # recovery has resent the holes below this
        self._ooo_last = -1  # our out-of-order segment received last (first SACK block, RFC 2018 §4)
        # Receive side: relative to the guest's ISN; its SYN is seq 0.
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_shift = 0
        self.ws_ok = False
        self._ooo: dict[int, bytes] = {}
        self._ooo_bytes = 0
        self._wq: list[memoryview | bytes] = []
        self._wq_len = 0
        self._acked_to = 0
        self._adv_edge = 0
        self.fin_received = False
        # Timers: one handle, re-armed lazily from a deadline.
        self.rto = INITIAL_RTO
        self.srtt = 0.0
        self.rttvar = 0.0
        self._rtt_seq = -1
        self._rtt_time = 0.0
        self.retries = 0
        self.probes = 0
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._delack: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.host_paused = False
        self.host_gone = False
        self._window_limited = False
        self.retransmits = 0
        self._probe_end = 0  # a zero-window probe byte the guest may acknowledge
        self._tlp_done = False  # one tail loss probe per flight (RFC 8985 §7)

    # -- accounting ------------------------------------------------------
    def _data_end(self) -> int:
        base = max(self.snd_una, 1)
        return base + len(self.sndbuf) - self._sndoff

    def send_queue(self) -> int:
        return len(self.sndbuf) - self._sndoff

    def recv_queue(self) -> int:
        t = self.transport
        return (t.get_write_buffer_size() if t is not None else 0) + self._wq_len + self._ooo_bytes

    def _rcv_space(self) -> int:
        t = self.transport
        buffered = t.get_write_buffer_size() if t is not None and not self.host_gone else 0
        return max(0, RCVBUF - buffered - self._wq_len - self._ooo_bytes)

    def _window_field(self) -> int:
        space = self._rcv_space()
        # Never move the right edge left (RFC 9293 §3.8.6.2.2).
        edge = max(self.rcv_nxt + space, self._adv_edge)
        self._adv_edge = edge
        space = edge - self.rcv_nxt
        return min(space >> self.rcv_shift, 0xFFFF)

    # -- building segments -----------------------------------------------
    def _emit(self, flags: int, seq: int, payload: bytes | bytearray | memoryview = b"", opts: bytes = b"") -> bool:
        mac = self.mac
        if mac is None:
            mac = self.mac = self.net.mac_for(self.gip)
            if mac is None:
                return False
        hlen = 20 + len(opts)
        n = len(payload)
        if flags & ACK:
            ack_wire = (self.irs + self.rcv_nxt) & M32
            self._acked_to = self.rcv_nxt
        else:
            ack_wire = 0
        if flags & SYN:
            win = min(self._rcv_space(), 0xFFFF)  # never scaled in a SYN (RFC 7323 §2.2)
            self._adv_edge = max(self._adv_edge, self.rcv_nxt + win)
        else:
            win = self._window_field()
        net = self.net
        if not self._v6:
            # Every header field of a segment to an IPv4 guest in one pack: the IP checksum is the
            # connection's constant words (summed once) plus length and ident; with checksum offload
            # the TCP field holds the folded pseudo-header sum (virtio 1.2 §5.1.6.4: the guest that
            # only receives the segment never computes the rest).
            tlen = hlen + n
            ident = net.next_ident()
            offload = net.guest_csum
            hdr = _ETH_IP4_TCP.pack(
                mac, net.host_mac, ETH_P_IPV4, 0x45, 0, 20 + tlen, ident, IP_DF, IP_TTL, IPPROTO_TCP,
                fold(self._ip_sum + tlen + ident), self.rip, self.gip,
                self.rport, self.gport, (self.iss + seq) & M32, ack_wire, (hlen << 10) | flags, win,
                ((self._pseudo + tlen) % 0xFFFF or 0xFFFF) if offload else 0, 0,
            )  # fmt: skip
            if offload:
                frame: bytes | bytearray = b"".join((hdr, opts, payload)) if tlen > 20 else hdr
                if n > self.mss:
                    net.stats.tx_gso_frames += 1
                    vhdr = V.HDR.pack(V.HDR_F_NEEDS_CSUM, V.GSO_TCPV4, _L4_V4 + hlen, self.mss, _L4_V4, 16, 0)
                    return net.output(frame, vhdr)
                return net.output(frame, _VHDR_CSUM_V4)
            frame = bytearray(hdr)
            if opts:
                frame += opts
            if n:
                frame += payload
            struct.pack_into("!H", frame, _L4_V4 + 16, fold(self._pseudo + tlen + ones_sum(memoryview(frame)[_L4_V4:])))
            return net.output(frame)
        frame = build_ipv6(mac, special_mac(self.rip), self.rip, self.gip, IPPROTO_TCP, hlen + n)
        frame += _TCP.pack(
            self.rport, self.gport, (self.iss + seq) & M32, ack_wire,
            (hlen << 10) | flags, win, 0, 0,
        )  # fmt: skip
        if opts:
            frame += opts
        if n:
            frame += payload
        l4 = self._l4
        if net.guest_csum:
            # Checksum offload toward the guest, as above. gso_size tells it how to cut a segment
            # larger than its MSS, were it to forward it.
            struct.pack_into("!H", frame, l4 + 16, (self._pseudo + hlen + n) % 0xFFFF or 0xFFFF)
            if n > self.mss:
                net.stats.tx_gso_frames += 1
                vhdr = V.HDR.pack(V.HDR_F_NEEDS_CSUM, V.GSO_TCPV6, l4 + hlen, self.mss, l4, 16, 0)
            else:
                vhdr = V.HDR.pack(V.HDR_F_NEEDS_CSUM, V.GSO_NONE, 0, 0, l4, 16, 0)
            return net.output(frame, vhdr)
        total = self._pseudo + hlen + n + ones_sum(memoryview(frame)[l4:])
        struct.pack_into("!H", frame, l4 + 16, fold(total))
        return net.output(frame)

    def send_ack(self) -> None:
        if self._ooo and self.sack_ok:
            self._emit(ACK, self.snd_nxt, opts=self._sack_option())
        else:
            self._emit(ACK, self.snd_nxt)

    def _sack_option(self) -> bytes:
        """Our out-of-order data as SACK blocks, the latest segment's first (RFC 2018 §4)."""
        ooo = self._ooo
        ranges: list[list[int]] = []
        for start in sorted(ooo):
            end = start + len(ooo[start])
            if ranges and start <= ranges[-1][1]:
                ranges[-1][1] = max(ranges[-1][1], end)
            else:
                ranges.append([start, end])
        last = self._ooo_last
        for i, (start, end) in enumerate(ranges):
            if start <= last < end:
                ranges.insert(0, ranges.pop(i))
                break
        ranges = ranges[:4]  # 2 + 4·8 bytes: the most that fits beside nothing else
        base = self.irs
        edges = [(base + e) & M32 for r in ranges for e in r]
        return b"\x01\x01\x05" + bytes([2 + 8 * len(ranges)]) + struct.pack(f"!{len(edges)}I", *edges)

    def send_rst(self) -> None:
        self.net.stats.tcp_rst_sent += 1
        self._emit(RST | ACK, self.snd_nxt)

    def _syn_options(self) -> bytes:
        ws, sack = self.inbound or self.ws_ok, self.inbound or self.sack_ok
        mtu = self.net.mtu
        if mtu == OUR_MSS + 40:
            return _SYN_OPTIONS[self._v6, ws, sack]
        # The MSS we announce fits the guest's link (RFC 9293 §3.7.1): a jumbo host_mtu lets a
        # guest without TSO send larger segments, a smaller one keeps them inside the link.
        return _syn_option_bytes(self._v6, ws, sack, mtu - 40)

    def _peer_mss(self, mss: int | None) -> int:
        """The segment size we send in: the guest's MSS (536 where it gave none) within the
        link's MTU, the smaller of the two (RFC 9293 §3.7.1)."""
        link = self.net.mtu - (60 if self._v6 else 40)
        return max(64, min(mss or DEFAULT_GUEST_MSS, link))

    def _send_syn(self) -> None:
        flags = SYN if self.state == SYN_SENT else SYN | ACK
        self._emit(flags, 0, opts=self._syn_options())
        self.snd_nxt = max(self.snd_nxt, 1)
        self.snd_max = max(self.snd_max, 1)
        self._arm(self.rto)

    # -- timers ----------------------------------------------------------
    def _arm(self, delay: float) -> None:
        self._deadline = time.monotonic() + delay
        if self._timer is None or self._timer_at > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._loop.time() + delay, self._on_timer)

    def _arm_retransmit(self) -> None:
        if self._tlp_done or self.srtt == 0.0:
            self._arm(self.rto)
        else:
            # RFC 8985 §7.2 uses 2·SRTT. A guest on an emulated CPU answers in 0.1 ms or
            # in 10 when busy, so the variance term is added too, and the floor covers a
            # Linux receiver whose reader lags: it then holds its ACK for its delayed-ACK
            # timer (40 ms at least). With 2·SRTT alone a Linux guest in TCG downloading
            # at full speed saw one spurious probe per ~6 segments, each answered with a
            # duplicate ACK (three of them cut the congestion window as a fast retransmit).
            self._arm(min(max(2 * self.srtt, self.srtt + 4 * self.rttvar, TLP_MIN), self.rto))

    def _disarm(self) -> None:
        self._deadline = 0.0

    def _on_timer(self) -> None:
        self._timer = None
        if self._deadline == 0.0 or self.state == CLOSED:
            return
        now = time.monotonic()
        if now < self._deadline:
            delay = self._deadline - now
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._loop.time() + delay, self._on_timer)
            return
        self._deadline = 0.0
        try:
            if not self._tlp_done and self.state in _SYNCHRONIZED and self.snd_nxt > self.snd_una:
                # Tail loss probe: resend the first unacked segment before the RTO proper.
                self._tlp_done = True
                self._retransmit_una()
                return
            self._timeout()
        except Exception:  # noqa: BLE001 - a timer must not kill the loop
            self.net._internal_error()

    def _timeout(self) -> None:
        if self.state == TIME_WAIT_STATE:
            self._finish()
            return
        if self.state == FIN_WAIT_2:
            self.abort(send_rst=True)  # silent for FIN_WAIT_2_TIMEOUT
            return
        flight = self.snd_nxt - self.snd_una
        if flight == 0 and self.state in _CAN_SEND and self.snd_wnd == 0 and self.send_queue():
            self._probe()
            return
        if flight == 0 and self.state not in (SYN_SENT, SYN_RCVD):
            return
        self.retries += 1
        limit = MAX_SYN_RETRIES if self.state in (SYN_SENT, SYN_RCVD) else MAX_RETRIES
        if self.retries > limit:
            self.abort(send_rst=True)
            return
        self.net.stats.tcp_timeouts += 1
        self.retransmits += 1
        self.rto = min(self.rto * 2, MAX_RTO)
        self._rtt_seq = -1  # Karn: no RTT samples from retransmitted data
        if self.state in (SYN_SENT, SYN_RCVD):
            self._send_syn()
            return
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss
        self.dupacks = 0
        self.recover = self.snd_max
        # RFC 2018 §8: the receiver may have dropped what it SACKed; start over from snd_una.
        self.recovering = False
        self._sacked.clear()
        self.snd_nxt = self.snd_una  # go back N
        self.output()
        if self.snd_nxt == self.snd_una:
            self._arm(self.rto)

    def _probe(self) -> None:
        """Zero-window probe: one byte past the window, never counted as sent."""
        self.probes += 1
        self.net.stats.tcp_window_probes += 1
        if self.probes > MAX_PROBES:
            self.abort(send_rst=True)
            return
        off = self._sndoff + (self.snd_nxt - self.snd_una)
        self._emit(ACK, self.snd_nxt, memoryview(self.sndbuf)[off : off + 1])
        self._probe_end = max(self._probe_end, self.snd_nxt + 1)
        self.rto = min(self.rto * 2, MAX_RTO)
        self._arm(self.rto)

    # -- host side events ------------------------------------------------
    def host_connected(self) -> None:
        """The outbound connect succeeded: answer the guest's SYN.

        The socket's transport comes a loop turn or two later (:meth:`attach`);
        whatever the guest sends before then waits in the host write queue.
        """
        self.state = SYN_RCVD
        self._send_syn()

    def attach(self, transport: HostTransport) -> None:
        """The host socket's transport is ready: pass on what the guest already sent."""
        self.transport = transport
        self.flush_host()
        if self.fin_received and not self.host_gone:
            try:
                if transport.can_write_eof():
                    transport.write_eof()
            except OSError:
                pass

    def host_data(self, data: bytes, eof: bool = False) -> None:
        """Bytes from the host socket; ``eof``: its FIN came right after them (one segment takes both)."""
        self.sndbuf += data
        if eof:
            self.fin_queued = True
        # Before the guest's ACK nothing can be sent: one read is held (a server's greeting), and
        # the rest waits in the host kernel, so half-open connections buffer little here.
        full = self.send_queue() >= SNDBUF or self.state == SYN_RCVD
        if full and not self.host_paused and self.transport is not None:
            self.host_paused = True
            self.transport.pause_reading()
        self.output()

    def host_eof(self) -> None:
        self.fin_queued = True
        self.output()

    def host_lost(self, exc: Exception | None) -> None:
        self.host_gone = True
        self.transport = None
        if self.state == CLOSED:
            return
        if exc is not None and not self.fin_queued:
            self.abort(send_rst=True)  # a host RST becomes a guest RST
            return
        self.fin_queued = True
        if self.state in (SYN_SENT, CONNECTING):
            self._finish()
            return
        self.output()

    def host_drained(self) -> None:
        if self._window_limited:
            self._window_limited = False
            self.send_ack()

    # -- guest segments --------------------------------------------------
    def input(
        self, seq_w: int, ack_w: int, flags: int, win: int, payload: memoryview, opts: bytes | memoryview
    ) -> None:
        st = self.state
        n = len(payload)
        if (
            st == ESTABLISHED
            and flags & ~PSH == ACK
            and n
            and (seq_w - self.irs - self.rcv_nxt) & M32 == 0
            and (ack_w - self.iss - self.snd_una) & M32 == 0
            and win << self.snd_shift == self.snd_wnd
            and not self._ooo
            and not opts
            and self.rcv_nxt + n <= self._adv_edge
            and not self.host_gone
        ):
            # Header prediction (RFC 9293 §3.10.7.4 in its common case): in-order data, no news in
            # the ACK or window. Everything the general path would check is known to hold.
            self.snd_wl1 = self.rcv_nxt
            self._deliver(payload)
            if self.rcv_nxt - self._acked_to >= ACK_EVERY:
                self.send_ack()
            return
        if (
            st == LAST_ACK
            and flags == ACK
            and not n
            and (seq_w - self.irs - self.rcv_nxt) & M32 == 0
            and self.snd_nxt == self.snd_max == self._data_end() + 1
            and (ack_w - self.iss - self.snd_max) & M32 == 0
        ):
            # The ACK of our FIN, after the guest closed first: all LAST-ACK waits for (RFC 9293
            # §3.10.7.4, "LAST-ACK STATE"). Exactly at RCV.NXT and SND.MAX, so every check of the
            # general path holds; nothing it would update matters once the connection is gone.
            self._finish()
            return
        if st == CONNECTING:
            if flags & RST:
                self._finish()
            return  # retransmitted SYNs wait for the host connect
        if st == SYN_SENT:
            self._input_syn_sent(seq_w, ack_w, flags, win, opts)
            return
        if st == FIN_WAIT_2:
            self._arm(FIN_WAIT_2_TIMEOUT)  # the guest is alive: its silence is counted from now
        seq = unwrap(seq_w, self.irs, self.rcv_nxt)
        n = len(payload)
        if flags & SYN and st == SYN_RCVD and seq == 0:
            self._send_syn()  # our SYN-ACK was lost
            return
        # RFC 9293 §3.10.7.4 first check: is the segment in the window?
        wnd = max(self._adv_edge - self.rcv_nxt, 0)
        seglen = n + (1 if flags & FIN else 0)
        if not self._acceptable(seq, seglen, wnd):
            self.net.stats.tcp_bad += 1
            if not flags & RST:
                self.send_ack()
            return
        if flags & RST:
            if seq == self.rcv_nxt:
                self.abort(send_rst=False)
            else:
                self.net.stats.tcp_bad += 1
                self.send_ack()  # RFC 5961 §3.2 challenge ACK
            return
        if flags & SYN:
            self.net.stats.tcp_bad += 1
            self.send_ack()  # RFC 5961 §4.2
            return
        if not flags & ACK:
            return
        ack = unwrap(ack_w, self.iss, self.snd_una)
        if st == SYN_RCVD:
            if ack != 1:
                self.net.stats.tcp_bad += 1
                self._emit_rst_for(ack_w)
                return
            self.state = st = ESTABLISHED
            self.owner.established(self)
            self.snd_una = 1
            self.retries = 0
            self._disarm()
            self.snd_wnd = win << self.snd_shift
            self.snd_wl1, self.snd_wl2 = seq, ack
            self.output()
            if self.host_paused and self.transport is not None:  # held since a read before this ACK
                self.host_paused = False
                self.transport.resume_reading()
        if not self._process_ack(ack, seq, win, n, flags, opts):
            return
        if self.state == CLOSED:
            return
        # Trim what is before rcv_nxt or beyond the window.
        if seq < self.rcv_nxt:
            cut = self.rcv_nxt - seq
            if cut >= n:
                payload = payload[:0]
                if flags & FIN and seq + n < self.rcv_nxt:
                    flags &= ~FIN
            else:
                payload = payload[cut:]
            seq = self.rcv_nxt
            n = len(payload)
        beyond = seq + n > self.rcv_nxt + wnd
        if beyond:
            payload = payload[: max(0, self.rcv_nxt + wnd - seq)]
            n = len(payload)
            flags &= ~FIN
        if n and self.host_gone:
            # Data after the host socket closed cannot be delivered: reset (RFC 9293 §3.6).
            self.abort(send_rst=True)
            return
        if n and self.state in _CAN_RECV:
            if seq == self.rcv_nxt:
                self._deliver(payload)
                if self._ooo:
                    self._drain_ooo()
            else:
                self._queue_ooo(seq, payload, flags & FIN)
                self.send_ack()  # duplicate ACK tells the guest what is missing
                return
        if flags & FIN and seq + n == self.rcv_nxt and not self.fin_received:
            self._fin_in()
            return
        if beyond or self.rcv_nxt - self._acked_to >= ACK_EVERY:
            self.send_ack()  # a window probe (or overrun) is answered at once with the window
        elif self.rcv_nxt != self._acked_to:
            self.owner.ack_later(self)

    def _acceptable(self, seq: int, seglen: int, wnd: int) -> bool:
        nxt = self.rcv_nxt
        if seglen == 0:
            return (seq == nxt) if wnd == 0 else nxt <= seq < nxt + wnd or seq == nxt
        if wnd == 0:
            # As Linux: a segment at RCV.NXT is processed for its ACK and FIN even when the
            # window is closed; its data is trimmed away below (RFC 9293 §3.10.7.4 allows ACKs).
            return seq == nxt
        return nxt <= seq < nxt + wnd or nxt <= seq + seglen - 1 < nxt + wnd or (seq < nxt < seq + seglen)

    def _emit_rst_for(self, ack_w: int) -> None:
        self.net.stats.tcp_rst_sent += 1
        self._emit(RST, (ack_w - self.iss) & M32)

    def _input_syn_sent(self, seq_w: int, ack_w: int, flags: int, win: int, opts: bytes | memoryview) -> None:
        if flags & ACK and (ack_w - self.iss) & M32 != 1:
            if not flags & RST:
                self._emit_rst_for(ack_w)
            return
        if flags & RST:
            if flags & ACK:
                self.abort(send_rst=False)
            return
        if not (flags & SYN and flags & ACK):
            return
        self.irs = seq_w
        self.rcv_nxt = 1
        self._adv_edge = 1
        mss, ws, sack = parse_options(opts)
        self.mss = self._peer_mss(mss)
        if ws is not None:
            self.snd_shift = ws
            self.rcv_shift = RCV_WSCALE
        self.sack_ok = sack
        self.snd_una = 1
        self.snd_nxt = max(self.snd_nxt, 1)
        self.snd_wnd = win << 0  # window in a SYN-ACK is never scaled (RFC 7323 §2.2)
        self.snd_wl1, self.snd_wl2 = 0, 1
        self.retries = 0
        self._disarm()
        self.state = ESTABLISHED
        self.rto = INITIAL_RTO
        if self.transport is not None:
            # What the host client has sent is often read here (HostSocket._read_inline) and
            # carries the ACK of the guest's SYN, as Linux's connect() does with data waiting
            # (RFC 9293 §3.10.7.3 lets the ACK go with data): one frame, not an ACK and then data.
            self.transport.resume_reading()
        self.output()
        if self._acked_to != self.rcv_nxt:
            self.send_ack()

    def accept_syn(self, seq_w: int, win: int, opts: bytes) -> None:
        """Record the guest's SYN for an outbound connection."""
        self.irs = seq_w
        self.rcv_nxt = 1
        self._adv_edge = 1
        mss, ws, sack = parse_options(opts)
        self.mss = self._peer_mss(mss)
        self.sack_ok = sack
        if ws is not None:
            self.ws_ok = True
            self.snd_shift = ws
            self.rcv_shift = RCV_WSCALE
        self.snd_wnd = win

    def _process_ack(self, ack: int, seq: int, win: int, n: int, flags: int, opts: bytes | memoryview = b"") -> bool:
        if ack > self.snd_max:
            if ack <= self._probe_end:
                self.snd_max = self.snd_nxt = ack
            else:
                self.net.stats.tcp_bad += 1
                self.send_ack()
                return False
        wnd = win << self.snd_shift
        self.probes = 0  # any acceptable ACK answers our probes, even with a zero window (as Linux)
        old_wnd = self.snd_wnd
        # RFC 9293 §3.10.7.4: take the window only from segments no older than the last update,
        # and take it before the ACK advances: what _ack_advance sends must fit the window this
        # ACK gives, not the last one (a guest whose buffer fills shrinks it, and Linux drops
        # what lands beyond: 48-87 retransmissions per 8 MB without guest TSO).
        update = ack >= self.snd_una and (seq > self.snd_wl1 or (seq == self.snd_wl1 and ack >= self.snd_wl2))
        if update:
            self.snd_wnd = wnd
            self.snd_wl1, self.snd_wl2 = seq, ack
        sacked = bool(opts) and self.sack_ok and ack >= self.snd_una and self._take_sack(opts, ack)
        advanced = ack > self.snd_una
        if advanced:
            self._ack_advance(ack)
            if self.state == CLOSED:
                return True
        elif ack == self.snd_una and n == 0 and not flags & FIN and wnd == old_wnd and wnd and \
                self.snd_max > self.snd_una and not sacked:  # fmt: skip
            # A zero window's repeated ACKs answer our probes; they are not duplicate ACKs.
            self.dupacks += 1
            if self.dupacks == 3 and not self.recovering:
                self._fast_retransmit()
            elif self.dupacks > 3:
                self.cwnd += self.mss
                self.output()
        if self._sacked and self.snd_max > self.snd_una and self.state in _SYNCHRONIZED:
            # The guest holds data above a hole. Segments through the virtio ring are never
            # reordered, so a hole is a loss: resend it now rather than after three duplicate
            # ACKs (a guest whose window moves sends none) or a timer (RFC 6675 §5, DupThresh 1).
            if not self.recovering:
                self._enter_recovery()
            self._sack_retransmit()
        if update:
            if not wnd and self.snd_nxt > self.snd_una and self.state in _CAN_SEND:
                # The window shrank to zero under data in flight: take it back and probe instead of
                # letting retransmissions time the connection out (RFC 9293 §3.8.6.1).
                self.snd_nxt = self.snd_una
                self.dupacks = 0
                self._disarm()
            if not wnd or (wnd > old_wnd and not advanced):
                self.output()  # send more, or arm the persist timer (RFC 9293 §3.8.6.1)
        return True

    def _ack_advance(self, ack: int) -> None:
        acked = ack - self.snd_una
        data_end = self._data_end()
        data_acked = min(ack, data_end) - max(self.snd_una, 1) if ack > 1 else 0
        if data_acked > 0:
            self._sndoff += data_acked
            if self._sndoff > 65536 and self._sndoff * 2 > len(self.sndbuf):
                del self.sndbuf[: self._sndoff]
                self._sndoff = 0
        self.snd_una = ack
        if self.snd_nxt < ack:
            self.snd_nxt = ack
        self.retries = 0
        # RFC 6298 §2: one RTT sample at a time, never from retransmitted data.
        if self._rtt_seq >= 0 and ack > self._rtt_seq:
            r = time.monotonic() - self._rtt_time
            if self.srtt == 0.0:
                self.srtt, self.rttvar = r, r / 2
            else:
                self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
                self.srtt = 0.875 * self.srtt + 0.125 * r
            self._rtt_seq = -1
        self.rto = min(max(MIN_RTO, self.srtt + 4 * self.rttvar), MAX_RTO)
        if self._sacked:
            # Blocks at or below the new snd_una are acknowledged now.
            while self._sacked and self._sacked[0][1] <= ack:
                del self._sacked[0]
            if self._sacked and self._sacked[0][0] < ack:
                self._sacked[0][0] = ack
        if not self.recovering and self._tlp_done and ack < self.snd_max and not self._sacked:
            # Our tail loss probe was answered with a partial ACK: more than the probed segment
            # is missing (RFC 8985 §7.4). Recover as NewReno does, a segment per partial ACK,
            # instead of a probe timer per segment.
            self._enter_recovery()
        if self.recovering:
            if ack >= self.recover:
                self.cwnd = self.ssthresh  # full recovery (RFC 6582 §3.2 step 3)
                self.dupacks = 0
                self.recovering = False
            elif self._sacked:
                pass  # the caller resends the holes the guest reports
            else:
                self._retransmit_una()  # partial ACK: next hole (whole frames here re-sent mostly duplicates)
        else:
            self.dupacks = 0
            if self.cwnd < self.ssthresh:
                self.cwnd += acked  # a link inside this host: grow by all that was acked
            else:
                self.cwnd += max(1, self.mss * self.mss // self.cwnd)
        self._tlp_done = False
        if self.snd_una >= self.snd_max:
            self._disarm()
        else:
            self._arm_retransmit()
        if self.host_paused and self.send_queue() < SNDBUF // 2 and self.transport is not None:
            self.host_paused = False
            self.transport.resume_reading()
        fin_acked = self.fin_queued and ack == data_end + 1
        if fin_acked:
            if self.state == FIN_WAIT_1:
                self.state = FIN_WAIT_2
                self._arm(FIN_WAIT_2_TIMEOUT)
            elif self.state == CLOSING:
                self._enter_time_wait()
            elif self.state == LAST_ACK:
                self._finish()
                return
        self.output()

    def _fast_retransmit(self) -> None:
        self._enter_recovery()
        self.cwnd = self.ssthresh + 3 * self.mss
        self._retransmit_una(whole=True)

    def _enter_recovery(self) -> None:
        flight = self.snd_max - self.snd_una
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.ssthresh
        self.recover = self.snd_max
        self.recovering = True
        self._rxt_next = self.snd_una

    def _take_sack(self, opts: bytes | memoryview, ack: int) -> bool:
        """Add the guest's SACK blocks to the scoreboard; True if one was new."""
        new = False
        board = self._sacked
        for lw, rw in parse_sack(opts):
            left = unwrap(lw, self.iss, self.snd_una)
            right = unwrap(rw, self.iss, self.snd_una)
            if not ack < left < right <= self.snd_max:
                continue  # stale, a D-SACK (RFC 2883) at or below the ACK, or beyond what we sent
            for i, (bl, br) in enumerate(board):
                if left <= br and right >= bl:  # overlaps or touches: merge
                    if left < bl or right > br:
                        new = True
                    left, right = min(left, bl), max(right, br)
                    board[i] = [left, right]
                    # Swallow the following blocks this one now reaches.
                    while i + 1 < len(board) and board[i + 1][0] <= right:
                        board[i][1] = max(right, board[i + 1][1])
                        del board[i + 1]
                    break
                if right < bl:
                    board.insert(i, [left, right])
                    new = True
                    break
            else:
                board.append([left, right])
                new = True
        if len(board) > MAX_SACK_BLOCKS:
            del board[MAX_SACK_BLOCKS:]  # the highest go first: only resending is delayed
        return new

    def _sack_retransmit(self) -> None:
        """Resend the holes below the guest's highest SACK block not yet resent in this recovery."""
        data_end = self._data_end()
        start = max(self._rxt_next, self.snd_una)
        seg_max = self._seg_max()
        budget = SACK_RTX_BURST
        net = self.net
        for left, right in self._sacked:
            if right <= start:
                continue
            while start < left and start < data_end and budget:
                if net.tx_space() < 4:
                    budget = 0  # our queue toward the guest is full; the next ACK goes on
                    break
                k = min(seg_max, left - start, data_end - start)
                off = self._sndoff + (start - max(self.snd_una, 1))
                if not self._emit(ACK, start, memoryview(self.sndbuf)[off : off + k]):
                    budget = 0
                    break
                net.stats.tcp_retransmits += 1
                self.retransmits += 1
                start += k
                budget -= 1
            if not budget:
                break
            start = max(start, right)
        if start > self._rxt_next:
            self._rxt_next = start
            self._rtt_seq = -1  # Karn: no RTT samples across resent data
            self._arm(self.rto)

    def _retransmit_una(self, *, whole: bool = False) -> None:
        self.net.stats.tcp_retransmits += 1
        self.retransmits += 1
        self._rtt_seq = -1
        data_end = self._data_end()
        if self.snd_una >= data_end:
            if self.fin_queued:
                self._emit(FIN | ACK, data_end)
                self._arm(self.rto)  # found by the lossy test: a lost retransmitted FIN once stalled here
            return
        off = self._sndoff
        # A guest that drops a TSO frame (its window full) drops all of it, so the fast
        # retransmit resends a whole frame rather than one MSS of it. Partial ACKs and tail
        # loss probes stay one MSS: the guest usually holds the rest out of order already.
        k = min(self._seg_max() if whole else self.mss, data_end - self.snd_una)
        # The last bytes went with our FIN (output): so do they again.
        fin = FIN if self.snd_una + k == data_end and self.snd_max > data_end and k <= self.mss else 0
        self._emit(ACK | PSH | fin, self.snd_una, memoryview(self.sndbuf)[off : off + k])
        self._arm(self.rto)

    # -- delivering guest data to the host ---------------------------------
    def _deliver(self, data: memoryview) -> None:
        self.rcv_nxt += len(data)
        if not self.host_gone:
            # Segments of one batch from the guest go to the host socket in one write (one syscall).
            self._wq.append(data)
            self._wq_len += len(data)
            if self._wq_len >= HOST_WRITE_BATCH:
                self.flush_host()
            else:
                self.owner.ack_later(self)

    def flush_host(self) -> None:
        """Write what the guest sent in this batch to the host socket."""
        t = self.transport
        if not self._wq or (t is None and not self.host_gone):
            return  # nothing yet, or the transport is still being attached
        data = self._wq[0] if len(self._wq) == 1 else b"".join(self._wq)
        self._wq = []
        self._wq_len = 0
        if t is not None and not self.host_gone:
            t.write(data)
            if t.get_write_buffer_size() > RCVBUF // 2:
                self._window_limited = True

    def _queue_ooo(self, seq: int, data: memoryview, fin: int) -> None:
        if seq in self._ooo and len(self._ooo[seq]) >= len(data):
            return
        if len(self._ooo) >= MAX_OOO_SEGMENTS:
            return
        old = self._ooo.get(seq)
        held = self._ooo_bytes - (len(old) if old is not None else 0)
        if held + len(data) > RCVBUF:
            # Segments that overlap each other each fit the window, but not all together: a
            # guest starting 256 of them a byte apart would have us hold 256 windows. What does
            # not fit is dropped, as past the window; the guest sends it again.
            return
        self._ooo_last = seq
        if old is not None:
            self._ooo_bytes -= len(old)
        self._ooo[seq] = bytes(data)
        self._ooo_bytes += len(data)

    def _drain_ooo(self) -> None:
        for s in sorted(self._ooo):
            if s > self.rcv_nxt:
                break
            d = self._ooo.pop(s)
            self._ooo_bytes -= len(d)
            if s + len(d) > self.rcv_nxt:
                self._deliver(memoryview(d)[self.rcv_nxt - s :])

    def _fin_in(self) -> None:
        self.fin_received = True
        self.rcv_nxt += 1
        self.flush_host()
        st = self.state
        if st == ESTABLISHED:
            # Before the host hears of it: the host's EOF may come back inside write_eof (a
            # socket read inline), and our FIN then leaves from CLOSE-WAIT.
            self.state = CLOSE_WAIT
        t = self.transport
        if t is not None and not self.host_gone:
            try:
                if t.can_write_eof():
                    t.write_eof()
            except OSError:
                pass
        if self.state == CLOSED:
            return
        if st == ESTABLISHED:
            # The guest closed first: data or our FIN may carry this ACK.
            self.output()
            if self.rcv_nxt != self._acked_to and self._delack is None:
                self._delack = self._loop.call_later(FIN_ACK_DELAY, self._delayed_ack)
            return
        if st == FIN_WAIT_1:
            self.state = CLOSING
        elif st == FIN_WAIT_2:
            self._enter_time_wait()
        self.send_ack()
        self.output()

    def end_of_batch(self) -> None:
        """The guest's frames of this loop turn are handled: pass them to the host, ACK if due."""
        self.flush_host()
        pending = self.rcv_nxt - self._acked_to
        if pending >= 2 * OUR_MSS:
            self.send_ack()
        elif pending > 0 and self._delack is None and self.state != CLOSED:
            self._delack = self._loop.call_later(DELAYED_ACK, self._delayed_ack)

    def _delayed_ack(self) -> None:
        self._delack = None
        if self.state != CLOSED and self.rcv_nxt != self._acked_to:
            try:
                self.send_ack()
            except Exception:  # noqa: BLE001 - a timer must not kill the loop
                self.net._internal_error()

    # -- sending host data to the guest ------------------------------------
    def _seg_max(self) -> int:
        """Largest segment: the guest's MSS, or with TSO toward it ~64 KiB in whole MSS multiples."""
        mss = self.mss
        if self.net.guest_tso6 if self._v6 else self.net.guest_tso4:
            return max((TSO_MAX_V6 if self._v6 else TSO_MAX_V4) // mss * mss, mss)
        return mss

    def output(self) -> None:
        st = self.state
        if st not in _CAN_SEND and not (st in (FIN_WAIT_1, CLOSING, LAST_ACK) and self.snd_nxt < self.snd_max):
            return
        data_end = self._data_end()
        if self.snd_nxt > data_end or (self.snd_nxt == data_end and not self.fin_queued):
            # Nothing new to send (most calls: after an ACK, a FIN, a window update); what is in
            # flight keeps its timer.
            if self.snd_nxt > self.snd_una and self._deadline == 0.0:
                self._arm_retransmit()
            return
        net = self.net
        wnd = min(self.snd_wnd, self.cwnd)
        sent = False
        mss = self.mss
        seg_max = self._seg_max()
        while True:
            if net.tx_space() < 4:
                net.wait_tx_space(self, self.output)
                break
            avail = data_end - self.snd_nxt
            room = self.snd_una + wnd - self.snd_nxt
            k = min(seg_max, avail, room)
            if k > 0:
                # Sender-side silly window avoidance (RFC 9293 §3.8.6.2.1).
                if k < mss and k < avail and self.snd_nxt > self.snd_una:
                    break
                if k > mss and k < avail:
                    k -= k % mss  # the tail of a TSO segment waits to fill a whole MSS
                off = self._sndoff + (self.snd_nxt - self.snd_una)
                flags = ACK | PSH if k == avail else ACK
                # The host's last bytes carry its FIN, as Linux sends them: one frame for the
                # guest to take instead of two. Not on a TSO frame: a guest that forwards it
                # resegments it, and the FIN then relies on its GSO clearing it on all but the
                # last piece.
                fin = FIN if k == avail and self.fin_queued and k <= mss else 0
                if not self._emit(flags | fin, self.snd_nxt, memoryview(self.sndbuf)[off : off + k]):
                    break
                if self._rtt_seq < 0 and self.snd_nxt >= self.snd_max:
                    self._rtt_seq, self._rtt_time = self.snd_nxt + k, time.monotonic()
                self.snd_nxt += k
                sent = True
                if fin:
                    self._fin_sent(data_end)
                    break
                if self.snd_nxt > self.snd_max:
                    self.snd_max = self.snd_nxt
                continue
            if avail == 0 and self.fin_queued and self.snd_nxt == data_end and room >= 0:
                if self._emit(FIN | ACK, data_end):
                    sent = True
                    self._fin_sent(data_end)
            break
        if self.snd_nxt > self.snd_una:
            if self._deadline == 0.0:
                self._arm_retransmit()
        elif self.snd_wnd == 0 and data_end > self.snd_nxt and self._deadline == 0.0:
            self._arm(max(self.rto, MIN_RTO))  # persist timer
        if sent:
            self._acked_to = self.rcv_nxt

    def _fin_sent(self, data_end: int) -> None:
        """Our FIN went out, after the last byte at ``data_end``."""
        self.snd_nxt = data_end + 1
        if self.snd_nxt > self.snd_max:
            self.snd_max = self.snd_nxt
        if self.state == ESTABLISHED:
            self.state = FIN_WAIT_1
        elif self.state == CLOSE_WAIT:
            self.state = LAST_ACK
            # The guest closed first: all it sends back is the ACK of this FIN, which
            # only ends our LAST-ACK (RFC 9293 §3.6) and need not wake the device.
            self.net.quiet_tx += 1

    # -- teardown --------------------------------------------------------
    def _enter_time_wait(self) -> None:
        self.state = TIME_WAIT_STATE
        self._arm(TIME_WAIT)
        if self.transport is not None:
            self.transport.close()
        self.owner.time_wait(self)

    def abort(self, *, send_rst: bool) -> None:
        if send_rst and self.state not in (CONNECTING, CLOSED):
            self.send_rst()
        t = self.transport
        self.transport = None
        if t is not None:
            t.abort()
        self._finish()

    def _finish(self) -> None:
        self.state = CLOSED
        self._deadline = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._delack is not None:
            self._delack.cancel()
            self._delack = None
        self.flush_host()
        self._wq = []
        self._wq_len = 0
        t = self.transport
        self.transport = None
        if t is not None:
            t.close()
        self.sndbuf = bytearray()
        self._ooo.clear()
        self._ooo_bytes = 0
        self.owner.forget(self)

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]
