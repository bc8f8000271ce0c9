"""The virtio-net device (virtio 1.2 §5.1): multiqueue, control queue, offloads,
mergeable receive buffers.

Each queue pair has its own :class:`~appliance.net.backend.FrameBackend` and is
served on the loop from its own kicks: transmit drains the tx ring, receive
pulls frames from the backend straight into the buffers the guest posted (the
backend does ``readv`` on the guest's memoryviews), and each batch ends with
at most one interrupt (on receive, the first frame of a batch may also be
signalled on its own: see VirtioNet._rx). When the guest has posted no
receive buffers the backend is paused, so a flood from the host side waits in
the backend's bounded queue (or the kernel's tap queue) instead of in our
memory.

Offloads (checksum, TSO) are offered only when the backend carries
virtio-net headers itself (a tap with IFF_VNET_HDR): then headers pass through
untouched and the host kernel does the work. Otherwise the device writes a
plain header on receive and strips it on transmit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, ClassVar

from appliance.iovec import scatter
from appliance.net.backend import FrameBackend, LinkDownBackend
from appliance.net.errors import NetError
from appliance.nic import constants as C
from appliance.virtio.device import VIRTIO_F_VERSION_1, Interrupt, VirtioDevice
from appliance.virtio.errors import QueueError
from appliance.virtio.queue import PASS_BUDGET, guest_error_log

if TYPE_CHECKING:
    from appliance.kvm.memory import GuestMemory
    from appliance.virtio.queue import DescriptorChain, Virtqueue

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1
DEFAULT_QUEUE_SIZE = 256
CTRL_QUEUE_SIZE = 64
# The MAC filter table the guest may install (CTRL_MAC_TABLE_SET); Linux asks
# for every unicast/multicast address the interface has, QEMU keeps 64.
MAC_TABLE_ENTRIES = 64
BROADCAST = b"\xff" * 6


def skip_bytes(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes (the header), without copying."""
    out: list[memoryview] = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


def gather(views: Sequence[memoryview], n: int) -> bytes:
    """Copy the first ``n`` bytes of ``views`` (small control payloads only)."""
    out = bytearray()
    for v in views:
        if len(out) >= n:
            break
        out += v[: n - len(out)]
    return bytes(out)


def _is_tcp(views: Sequence[memoryview], off: int) -> bool:
    """Whether the Ethernet frame at ``off`` in ``views`` carries TCP over IPv4 or IPv6.

    Only TCP's small segments (ACKs, SYNs, FINs) may wait TX_IRQ_LAZY for their transmit
    interrupt: their peer answers, and the answer's receive interrupt reaps them. A UDP
    sender may hear nothing back, and Linux 6.10 and later (byte queue limits in
    virtio_net) stop the queue until the completions are reaped: each stop would cost
    the whole lazy wait.
    """
    head = views[0] if views else b""
    if len(head) < off + 24:
        head = gather(views, off + 24)
        if len(head) < off + 24:
            return False
    ethertype = head[off + 12 : off + 14]
    if ethertype == b"\x08\x00":
        return head[off + 23] == 6
    return ethertype == b"\x86\xdd" and head[off + 20] == 6


def _macs(table: bytes) -> set[bytes]:
    return {table[i : i + 6] for i in range(0, len(table), 6)}


def _lengthen_header(send: Callable[[Sequence[memoryview]], bool]) -> Callable[[Sequence[memoryview]], bool]:
    """``send`` for a legacy driver's 10-byte header: the backend gets the 12-byte one it takes."""

    def send_legacy(views: Sequence[memoryview]) -> bool:
        hdr = memoryview(gather(views, C.HDR_LEN - 2) + bytes(2))
        return send([hdr, *skip_bytes(views, C.HDR_LEN - 2)])

    return send_legacy


def _shorten_header(recv_into: Callable[[Sequence[memoryview]], int]) -> Callable[[Sequence[memoryview]], int]:
    """``recv_into`` for a legacy driver's 10-byte header: the backend's 12-byte one loses
    num_buffers, which only mergeable buffers have."""
    hdr = memoryview(bytearray(C.HDR_LEN))

    def recv_legacy(bufs: Sequence[memoryview]) -> int:
        n = recv_into([hdr, *skip_bytes(bufs, C.HDR_LEN - 2)])
        if n < 0:
            return n
        scatter(bufs, hdr[: C.HDR_LEN - 2])
        return n - 2

    return recv_legacy


@dataclass
class QueueStats:
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0
    rx_filtered: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0


# A chain as the rings hand it to us: (head, buffers, their total bytes).
Buffers = tuple[int, list[memoryview], int]
# Chains taken from a ring per call: the used ring is published after each
# batch, so a driver blocked on a full ring gets buffers back this often.
TX_BATCH = 64
RX_BATCH = 64
# Transmit batches of at most this many frames are followed by a receive pass
# (see VirtioNet._tx): a conversation's few frames, not a flood.
RX_AFTER_TX = 8
# How long a transmit interrupt waits for the driver to reap the frames itself
# (seconds; asyncio rounds a lone timer up to the next millisecond). See
# VirtioNet._tx.
TX_IRQ_DELAY = 0.0005
# The transmit interrupt for a few small TCP segments (at most TX_LAZY_FRAMES of at
# most TX_SMALL_FRAME bytes with their header: ACKs, SYNs, FINs; see _is_tcp)
# waits longer: nothing in the guest waits for those buffers (a TCP
# sender's small queues wait for its data segments, which are not small), its
# next transmit or receive interrupt reaps them, and the interrupt alone would
# cost the emulated guest an INTx and the front end a wake-up. Kept under the
# tests' 50 ms "past the delay" margin.
TX_IRQ_LAZY = 0.02
TX_SMALL_FRAME = 128
TX_LAZY_FRAMES = 16
# Frames the backend expects from the guest that nothing waits on (its
# take_quiet_tx: the ACK of a FIN that answered the guest's own) are left for
# the guest's next kick: the transmit ring asks for a kick only past them
# (avail_event, §2.7.10). At most this many, and the ring is looked at after
# TX_QUIET_WAIT whatever comes. That wait is shorter than a guest takes to open
# its next connection (busybox nc in a TCG guest: ~4.5 ms): otherwise the
# closing connection's last ACK, and its teardown (~40 us: the host socket's
# close and the flow's removal), was taken in the pass of the next SYN, ahead of
# its SYN-ACK; at 20 ms it nearly always was.
TX_QUIET_MAX = 8
TX_QUIET_WAIT = 0.002
# An Ethernet frame at the default MTU of 1500, without its FCS.
ETH_FRAME = 1514
# The longest transmit chain taken: a header and the largest GSO frame.
_MAX_TX_CHAIN = C.HDR_LEN + C.MAX_GSO_FRAME
# What VirtioNet._rx_staged says besides a delivered frame's length.
_RX_DRAINED = -1
_RX_HELD = -2


class RxWindow:
    """Receive buffers taken from the rx ring but not yet filled.

    A frame's size is only known once it is read, so with mergeable buffers
    enough of them for the largest frame are kept ready (§5.1.6.4.2); chains a
    frame did not fill stay for the next one.

    Under bulk TCP a Linux guest receives 64 KiB GSO frames into ~4 KiB
    buffers, ~17 chains a frame, and per-chain Python work was most of the
    loop's CPU on that path. So chains are kept as parallel lists (heads,
    sizes, views) with running byte totals (``ends``), consumed from index
    ``pos`` (views from ``vpos``) and compacted when a batch is added: taking
    a batch from the ring extends them with list comprehensions, ``bisect``
    on ``ends`` says how many chains a frame filled, ``readv`` gets one slice
    of the views (only as many chains as the largest frame needs, so a small
    frame's iovec stays short), and the used elements go back in one call.
    """

    __slots__ = ("heads", "sizes", "nviews", "views", "ends", "base", "pos", "vpos", "flat", "plain")

    def __init__(self) -> None:
        self.heads: list[int] = []
        self.sizes: list[int] = []
        self.nviews: list[int] = []        # views per chain (1 for nearly every chain)
        self.views: list[memoryview] = []  # every chain's views, in order
        self.ends: list[int] = []          # running byte total at the end of each chain
        self.base = 0                      # running total before the first chain held
        self.pos = 0                       # first chain held (those before are used)
        self.vpos = 0                      # its first view
        self.flat = True                   # every chain in the lists has exactly one view
        # Without mergeable buffers each frame fills one whole chain: those
        # chains wait here as the ring gave them.
        self.plain: deque[Buffers] = deque()

    def __len__(self) -> int:
        """Chains held: all taken from the ring, none returned."""
        return len(self.heads) - self.pos + len(self.plain)

    @property
    def room(self) -> int:
        """Bytes of buffers held."""
        ends = self.ends
        return ends[-1] - self.base if len(ends) > self.pos else 0

    def fill(self, q: Virtqueue, want: int, batch: int) -> bool:
        """Take chains from the ring, a batch at a time, until ``want`` bytes are held.

        Returns whether any chain is held.
        """
        heads, sizes, nviews, views, ends = self.heads, self.sizes, self.nviews, self.views, self.ends
        while self.room < want:
            if self.pos:
                pos = self.pos
                del heads[:pos], sizes[:pos], nviews[:pos], ends[:pos], views[: self.vpos]
                self.pos = self.vpos = 0
                if not heads:
                    self.flat = True
            old = len(heads)
            oldv = len(views)
            # The ring's entries go straight onto the window's lists.
            if not q.pop_buffers_into(batch, True, heads, sizes, views, nviews):
                break
            new_sizes = sizes[old:]
            if min(new_sizes) < C.HDR_LEN:
                self._drop_small(q, old, oldv)
                new_sizes = sizes[old:]
                if not new_sizes:
                    continue
            if self.flat and max(nviews[old:]) != 1:
                self.flat = False
            totals = accumulate(new_sizes, initial=ends[-1] if ends else self.base)
            next(totals)
            ends += totals
        return len(heads) > self.pos

    def _drop_small(self, q: Virtqueue, old: int, oldv: int) -> None:
        """Hand back, unused, the chains from ``old`` on too small to hold even the header."""
        heads, sizes, nviews, views = self.heads, self.sizes, self.nviews, self.views
        got = list(zip(heads[old:], sizes[old:], nviews[old:], strict=True))
        got_views = views[oldv:]
        del heads[old:], sizes[old:], nviews[old:], views[oldv:]
        at = 0
        for head, size, nv in got:
            if size < C.HDR_LEN:
                q.push_used(head, 0)
            else:
                heads.append(head)
                sizes.append(size)
                nviews.append(nv)
                views += got_views[at : at + nv]
            at += nv

    def reach(self, nbytes: int) -> int:
        """How many chains from the front it takes to hold ``nbytes`` (at most all held)."""
        pos = self.pos
        return min(bisect_left(self.ends, self.base + nbytes, pos) + 1, len(self.ends)) - pos

    def views_of(self, chains: int) -> list[memoryview]:
        """The views of the first ``chains`` chains held, in order."""
        vpos = self.vpos
        if self.flat:
            return self.views[vpos : vpos + chains]
        return self.views[vpos : vpos + sum(self.nviews[self.pos : self.pos + chains])]

    def take(self, q: Virtqueue, used: int, n: int) -> None:
        """Return the first ``used`` chains to the driver holding ``n`` bytes (the last one the rest)."""
        pos, ends = self.pos, self.ends
        stop = pos + used
        lens = self.sizes[pos:stop]
        lens[-1] = n - (ends[stop - 2] - self.base if used > 1 else 0)
        q.push_used_many(self.heads[pos:stop], lens)
        self.vpos += used if self.flat else sum(self.nviews[pos:stop])
        self.base = ends[stop - 1]
        self.pos = stop

    def clear(self) -> None:
        self.heads.clear()
        self.sizes.clear()
        self.nviews.clear()
        self.views.clear()
        self.ends.clear()
        self.base = self.pos = self.vpos = 0
        self.flat = True
        self.plain.clear()


class RxFilter:
    """The receive filter the guest programs through CTRL_RX and CTRL_MAC (§5.1.6.5.1-2)."""

    def __init__(self, mac: bytes) -> None:
        self.mac = mac
        self.reset()

    def reset(self) -> None:
        # Before the guest says otherwise the device is promiscuous (§5.1.6.5.1):
        # a driver without CTRL_RX must still receive what it expects.
        self.promisc = True
        self.allmulti = False
        self.alluni = False
        self.nomulti = False
        self.nouni = False
        self.nobcast = False
        self.uni: set[bytes] = set()
        self.multi: set[bytes] = set()
        # More addresses than MAC_TABLE_ENTRIES: that whole class passes (QEMU's
        # uni_overflow/multi_overflow), since Linux sends every address it has.
        self.uni_overflow = False
        self.multi_overflow = False

    def accepts(self, dst: bytes) -> bool:
        if self.promisc:
            return True
        if dst == BROADCAST:
            return not self.nobcast
        if dst[0] & 1:
            if self.nomulti:
                return False
            return self.allmulti or self.multi_overflow or dst in self.multi
        if self.nouni:
            return False
        return self.alluni or self.uni_overflow or dst == self.mac or dst in self.uni


class VirtioNet(VirtioDevice):
    """A virtio-net NIC with ``len(backends)`` queue pairs.

    :param backends: one frame backend per queue pair.
    :param mac: the NIC's MAC address (6 bytes).
    :param mtu: advertised MTU (VIRTIO_NET_F_MTU) or ``None``.
    :param queue_size: maximum size of each rx/tx queue.
    :param rx_queue_size: of each receive queue, if not ``queue_size``.
    :param tx_queue_size: of each transmit queue, if not ``queue_size``.
    :param speed: link speed in Mbit/s, or ``None`` for unknown.
    :param duplex: ``"half"``, ``"full"`` or ``None`` for unknown. With either known the
        device offers VIRTIO_NET_F_SPEED_DUPLEX, as QEMU's ``speed=``/``duplex=`` do.
    """

    device_id: ClassVar[int] = VIRTIO_ID_NET

    def __init__(
        self,
        backends: Sequence[FrameBackend],
        mac: bytes,
        *,
        mtu: int | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        rx_queue_size: int | None = None,
        tx_queue_size: int | None = None,
        link_up: bool = True,
        control_queue: bool = True,
        yield_after_rx_irq: bool = False,
        speed: int | None = None,
        duplex: str | None = None,
    ) -> None:
        super().__init__()
        if speed is not None and not 0 <= speed <= 0x7FFFFFFF:
            raise ValueError("speed must be from 0 to INT_MAX Mbit/s")
        if duplex not in (None, "half", "full"):
            raise ValueError("duplex must be 'half' or 'full'")
        self.speed = speed
        self.duplex = duplex
        if not backends:
            raise ValueError("virtio-net needs at least one backend")
        if len(mac) != 6:
            raise ValueError("MAC address must be 6 bytes")
        self.backends = list(backends)
        self.pairs = len(backends)
        self.mac = bytes(mac)
        # What a reset goes back to (a MAC the guest set lasts until then, as in QEMU).
        self.configured_mac = self.mac
        self.mtu = mtu
        self.link_up = link_up
        # The far side's link (set_link on a -net pair's back end or its hub port): frames stop
        # as for link_up, but the guest keeps its carrier, as QEMU leaves a NIC's own link alone
        # when its peer is a hub port.
        self.peer_link_up = True
        self._gate_backends()
        # A vhost-user front end keeps the control queue to itself and tells
        # us which pairs run by starting and enabling their rings.
        self.control_queue = control_queue
        # For a front end in another process (vhost-user): see _notify. In-process vCPUs take
        # the GIL from the loop thread, and yielding after each interrupt cost the KVM test
        # guest ~85% of its receive frame rate (bench/net.py (a): 221k -> 36k frames/s).
        self.yield_after_rx_irq = yield_after_rx_irq
        pair = (rx_queue_size or queue_size, tx_queue_size or queue_size)
        self.queue_sizes = pair * self.pairs + ((CTRL_QUEUE_SIZE,) if control_queue else ())
        vnet = {b.vnet_hdr_len for b in self.backends}
        if len(vnet) != 1 or vnet.pop() not in (0, C.HDR_LEN):
            raise ValueError("all backends must agree on a 0- or 12-byte virtio-net header")
        self.passthrough_hdr = self.backends[0].vnet_hdr_len == C.HDR_LEN
        if mtu is not None:
            self._tell_mtu(mtu)
        self.filter = RxFilter(self.mac)
        self.stats = [QueueStats() for _ in range(self.pairs)]
        self.ctrl_errors = 0
        self._mem: GuestMemory | None = None
        self._queues: list[Virtqueue] = []
        self._irqs: list[Interrupt] = []
        self._rx_windows: list[RxWindow] = []
        # Whether each pair's backend has our ready callback (None: not known).
        self._rx_armed: list[bool | None] = [None] * self.pairs
        self._active_pairs = 1
        self._usable_pairs = 1
        self._ctrl_index = 2
        self._max_rx_frame = 0
        self._mrg_rxbuf = False  # negotiated (set at activation)
        # The header the driver lays out: 12 bytes, or 10 for a legacy driver without
        # VIRTIO_NET_F_MRG_RXBUF (virtio 1.2 §5.1.6.1: no num_buffers field then).
        self._hdr_len = C.HDR_LEN
        # Per pair: a host buffer for frames read while the guest has posted
        # less than the largest frame needs, and the length of the frame held
        # in it waiting for more buffers (0: none).
        self._rx_stage: list[bytearray | None] = [None] * self.pairs
        self._rx_pending: list[int] = [0] * self.pairs
        # Per pair: the timer that sends a deferred transmit interrupt, whether
        # it is the lazy one, and the small frames used since the last transmit
        # interrupt (-1: a larger frame or too many).
        self._tx_irq_timers: list[asyncio.TimerHandle | None] = [None] * self.pairs
        self._tx_irq_lazy: list[bool] = [False] * self.pairs
        # Per pair: the timer that looks at a transmit ring whose kicks skip quiet frames.
        self._tx_quiet_timers: list[asyncio.TimerHandle | None] = [None] * self.pairs
        self._tx_small: list[int] = [0] * self.pairs
        # Inside _tx's ring loop: a quiet request waits for the loop's re-arm (_tx_skip_quiet).
        self._in_tx: list[bool] = [False] * self.pairs
        self._tx_quiet_deferred: list[bool] = [False] * self.pairs

    # -- feature and config space -------------------------------------------

    def device_features(self) -> int:
        f = super().device_features()
        f |= (1 << C.F_MAC) | (1 << C.F_STATUS) | (1 << C.F_MRG_RXBUF)
        if self.control_queue:
            f |= (1 << C.F_CTRL_VQ) | (1 << C.F_CTRL_RX) | (1 << C.F_CTRL_MAC_ADDR)
        if self.pairs > 1:
            f |= 1 << C.F_MQ
        if self.mtu is not None:
            f |= 1 << C.F_MTU
        if self.speed is not None or self.duplex is not None:
            f |= 1 << C.F_SPEED_DUPLEX
        if self.passthrough_hdr:
            for bit in (
                C.F_CSUM, C.F_GUEST_CSUM, C.F_CTRL_GUEST_OFFLOADS,
                C.F_HOST_TSO4, C.F_HOST_TSO6, C.F_HOST_ECN,
                C.F_GUEST_TSO4, C.F_GUEST_TSO6, C.F_GUEST_ECN,
            ):
                f |= 1 << bit
        return f

    def config_bytes(self) -> bytes:
        # §5.1.4: mac[6], status, max_virtqueue_pairs, mtu, then speed and duplex, which
        # (as in QEMU) the config space only reaches to when SPEED_DUPLEX is offered.
        status = C.S_LINK_UP if self.link_up else 0
        cfg = self.mac + status.to_bytes(2, "little") + self.pairs.to_bytes(2, "little") + (
            (self.mtu or 1500).to_bytes(2, "little")
        )
        if self.speed is None and self.duplex is None:
            return cfg
        speed = C.SPEED_UNKNOWN if self.speed is None else self.speed
        duplex = {"half": C.DUPLEX_HALF, "full": C.DUPLEX_FULL, None: C.DUPLEX_UNKNOWN}[self.duplex]
        return cfg + speed.to_bytes(4, "little") + bytes([duplex])

    def write_config(self, offset: int, data: bytes) -> None:
        # Legacy drivers without CTRL_MAC_ADDR set the MAC by writing config (§5.1.4.2).
        if offset + len(data) <= 6 and not self.has_feature(C.F_CTRL_MAC_ADDR):
            mac = bytearray(self.mac)
            mac[offset : offset + len(data)] = data
            self.mac = bytes(mac)
            self.filter.mac = self.mac

    def set_mtu(self, mtu: int | None) -> None:
        """The link MTU a vhost-user front end set (NET_SET_MTU: QEMU's ``host_mtu=``, which it
        offers the guest itself), or None for none (Ethernet's 1500); frames from the next
        activation are sized for it.

        :raises ValueError: Outside 68..65535 (the front end is told it is not supported).
        """
        if mtu is not None and not 68 <= mtu <= 0xFFFF:
            raise ValueError(f"MTU {mtu} is outside 68..65535")
        self.mtu = mtu
        self._tell_mtu(mtu or 1500)

    def _tell_mtu(self, mtu: int) -> None:
        # A backend that builds frames itself (the user-mode stack) must keep them within the
        # guest's MTU (§5.1.4.2); a tap's MTU is its host side's business.
        for b in self.backends:
            set_mtu = getattr(b, "set_mtu", None)
            if set_mtu is not None:
                set_mtu(mtu)

    def set_link(self, up: bool) -> None:
        """Carrier up or down (QMP ``set_link``): frames stop both ways while it is down, and the
        guest hears a config change where the config space is ours (`appliance run`, or a
        vhost-user front end that reads it over GET_CONFIG; QEMU's vhost-user-net keeps its own,
        so its guest keeps its carrier and only loses the frames).

        A Linux guest only turns its carrier off; its receive path does not look at it. QEMU's
        net layer drops what a link-down NIC sends or is sent (net/net.c), so ours does too:
        each pair's backend is swapped for a LinkDownBackend around it until the link is up.
        The device reads ``backends`` on every batch, so the swap takes the next frame.
        """
        if up != self.link_up:
            self.link_up = up
            self._gate_backends()
            self.on_config_change()

    def set_peer_link(self, up: bool) -> None:
        """The far side's link up or down: frames stop both ways, the carrier stays as it is."""
        if up != self.peer_link_up:
            self.peer_link_up = up
            self._gate_backends()

    def _gate_backends(self) -> None:
        passing = self.link_up and self.peer_link_up
        for i, b in enumerate(self.backends):
            if passing and isinstance(b, LinkDownBackend):
                self.backends[i] = b.inner
            elif not passing and not isinstance(b, LinkDownBackend):
                self.backends[i] = LinkDownBackend(b)

    # -- lifecycle ----------------------------------------------------------

    def discards_when_disabled(self, index: int) -> bool:
        # The transmit queues (odd, below the control queue; §5.1.2): what a guest sent on a pair
        # its front end has turned off is dropped, not held until the pair comes back.
        return index & 1 == 1 and index < 2 * self.pairs

    def activate(
        self, mem: GuestMemory, queues: Sequence[Virtqueue], interrupts: Sequence[Interrupt]
    ) -> None:
        self._mem = mem
        self._queues = list(queues)
        self._irqs = list(interrupts)
        self._rx_windows = [RxWindow() for _ in range(self.pairs)]
        # §5.1.2: without MQ the driver uses one pair and the control queue is queue 2.
        self._usable_pairs = self.pairs if self.has_feature(C.F_MQ) else 1
        self._ctrl_index = 2 * self._usable_pairs
        self._active_pairs = 1 if self.control_queue else min(self.pairs, len(queues) // 2)
        self.filter.reset()
        gso = any(self.has_feature(b) for b in (C.F_GUEST_TSO4, C.F_GUEST_TSO6, C.F_GUEST_UFO))
        # Without VIRTIO_NET_F_MTU negotiated a Linux driver lets its MTU be raised to 64 KiB,
        # and with mergeable buffers it takes a frame of any size across several (§5.1.6.4.2):
        # jumbo frames from a tap on a 9000-byte bridge, or a socket netdev, arrive whole, as
        # they do through QEMU's NIC. (The receive iovec then spans up to 64 KiB of buffers;
        # the kernel fills only what the frame needs.)
        # A backend that says how large its frames get (the user-mode stack: its MTU) is not
        # given room for more.
        limits = [getattr(b, "max_frame", None) for b in self.backends]
        large = any(m is None or m > ETH_FRAME for m in limits)
        jumbo = gso or (large and not self.has_feature(C.F_MTU) and self.has_feature(C.F_MRG_RXBUF))
        self._max_rx_frame = C.HDR_LEN + (C.MAX_GSO_FRAME if jumbo else (self.mtu or 1500) + 18)
        # Staging buffers outlive a reset unless the largest frame changed.
        self._rx_stage = [b if b is not None and len(b) == self._max_rx_frame else None for b in self._rx_stage]
        self._rx_pending = [0] * self.pairs
        self._mrg_rxbuf = self.has_feature(C.F_MRG_RXBUF)
        # QEMU's disable-modern=on,mrg_rxbuf=off: a legacy driver's 10-byte header. Only the
        # paths without mergeable buffers (_tx, _rx_plain) can meet it.
        legacy_short = not (self.has_feature(VIRTIO_F_VERSION_1) or self._mrg_rxbuf)
        self._hdr_len = C.HDR_LEN - 2 if legacy_short else C.HDR_LEN
        self._apply_offloads(self.driver_features)
        self._run_pairs(self._active_pairs)

    async def quiesce(self) -> None:
        """Give back the rx buffers we hold but never filled.

        They are the most recent chains taken from each rx ring, so moving the
        ring's next-avail index back by their number makes a rebuilt queue (a
        vhost-user front end stopping and restarting rings) offer them again
        instead of leaking them. A frame held for more buffers is dropped: the
        rings it was waiting for are going away.

        A transmit interrupt still deferred (TX_IRQ_DELAY, TX_IRQ_LAZY) is sent
        now: a rebuilt queue starts out taking every used entry as signalled,
        so a driver waiting on its used_event for those completions would
        otherwise never hear of them (QEMU forgets its last signalled index
        when a vhost back end stops, for the same reason).
        """
        for pair, timer in enumerate(self._tx_irq_timers):
            if timer is not None:
                timer.cancel()
                self._tx_irq_due(pair)
        for pair, win in enumerate(self._rx_windows):
            if len(win) and 2 * pair < len(self._queues):
                q = self._queues[2 * pair]
                q.last_avail_idx = (q.last_avail_idx - len(win)) & 0xFFFF
            win.clear()
        self._drop_pending()

    def _drop_pending(self) -> None:
        for pair, n in enumerate(self._rx_pending):
            if n:
                self.stats[pair].rx_dropped += 1
                self._rx_pending[pair] = 0

    def reset(self) -> None:
        for pair, timer in enumerate(self._tx_irq_timers):
            if timer is not None:
                timer.cancel()
                self._tx_irq_timers[pair] = None
        self._tx_small = [0] * self.pairs
        self._in_tx = [False] * self.pairs
        self._tx_quiet_deferred = [False] * self.pairs
        for pair, timer in enumerate(self._tx_quiet_timers):
            if timer is not None:
                timer.cancel()
                self._tx_quiet_timers[pair] = None
        for pair in range(self.pairs):
            self._rx_armed[pair] = None
            try:
                self.backends[pair].set_ready_callback(None)
            except RuntimeError:
                pass
            else:
                self._rx_armed[pair] = False
        for q in self._queues:
            q.close()
        self._queues = []
        self._irqs = []
        self._rx_windows = []
        self._drop_pending()
        self._mem = None
        self.mac = self.configured_mac
        self.filter.mac = self.mac
        super().reset()

    def close(self) -> None:
        self.reset()
        for b in self.backends:
            b.close()

    def _apply_offloads(self, features: int) -> None:
        if not self.passthrough_hdr:
            return

        def on(bit: int) -> bool:
            return bool(features >> bit & 1)

        for b in self.backends:
            b.set_offloads(
                on(C.F_GUEST_CSUM), on(C.F_GUEST_TSO4), on(C.F_GUEST_TSO6), on(C.F_GUEST_ECN), on(C.F_GUEST_UFO)
            )

    def _run_pairs(self, n: int) -> None:
        """Serve the first ``n`` pairs (§5.1.6.5.5); the host stops steering frames to the rest."""
        for pair in range(self.pairs):
            set_enabled = getattr(self.backends[pair], "set_queue_enabled", None)
            if set_enabled is not None:
                try:
                    set_enabled(pair < n)
                except NetError as err:
                    log.warning("virtio-net queue pair %d: %s", pair, err)
            self._set_rx_armed(pair, pair < n)

    def _set_rx_armed(self, pair: int, armed: bool) -> None:
        armed = armed and bool(self._queues)
        # Every rx kick re-arms: skip it when already armed, which saved the
        # tap a remove_reader/add_reader pair (two epoll_ctl calls) per kick.
        if self._rx_armed[pair] is armed:
            return
        cb = functools.partial(self._rx, pair) if armed else None  # no Python frame of its own
        self._rx_armed[pair] = None  # unknown if the backend raises
        self.backends[pair].set_ready_callback(cb)
        self._rx_armed[pair] = armed

    # -- queue kicks --------------------------------------------------------

    def queue_notify(self, index: int) -> None:
        if not self._queues or self.needs_reset or index >= len(self._queues):
            return
        try:
            if index == self._ctrl_index:
                self._ctrl()
            elif index > self._ctrl_index:
                return
            elif index % 2 == 0:
                pair = index // 2
                if pair < self._active_pairs:
                    # New rx buffers: take frames again (the backend was
                    # paused if we ran out). _rx re-arms the backend only if
                    # it drains it: under a flood the kick alone drives
                    # receive, without an epoll_ctl pair per posted batch.
                    self._rx(pair)
            else:
                self._tx(index // 2)
        except QueueError as err:
            guest_error_log.warning("virtio-net: queue %d broken: %s", index, err)
            self.fail(str(err))

    def _notify(self, index: int) -> None:
        if index & 1 and index < self._ctrl_index:
            self._tx_small[index // 2] = 0
        if self._queues[index].needs_notification():
            self._irqs[index].notify()
            pair = index // 2
            if index % 2 == 0 and index < self._ctrl_index:
                if self._tx_irq_timers[pair] is not None:
                    # A receive interrupt takes a deferred transmit one along
                    # (one INTx for both, as before the deferral).
                    self._tx_irq_timers[pair].cancel()  # type: ignore[union-attr]
                    self._tx_irq_timers[pair] = None
                    self._notify(index + 1)
                if self.yield_after_rx_irq:
                    # The guest may be waiting on these frames, and the thread our
                    # signal wakes to interrupt it (QEMU's main loop, for a vhost-user
                    # front end) is often queued on this CPU behind the rest of our
                    # pass: perf sched on a 2-CPU host, busybox nc connections through
                    # net-daemon --netdev user, QEMU's main thread was woken onto our
                    # CPU in 120 of 207 wake-ups, 10% of them waiting over 0.6 ms.
                    # Yielding lets it run first: 169 -> 178 connections/s (4 paired
                    # rounds), guest CPU per connection 5.47 -> 5.24 ms (it halts less).
                    os.sched_yield()

    def _tx_irq_later(self, pair: int, lazy: bool) -> None:
        timer = self._tx_irq_timers[pair]
        if timer is not None:
            if lazy or not self._tx_irq_lazy[pair]:
                return  # the pending one comes at least as soon
            timer.cancel()  # a larger frame came: the lazy wait is over
            self._tx_irq_timers[pair] = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._notify(2 * pair + 1)
            return
        self._tx_irq_lazy[pair] = lazy
        self._tx_irq_timers[pair] = loop.call_later(TX_IRQ_LAZY if lazy else TX_IRQ_DELAY, self._tx_irq_due, pair)

    def _tx_irq_due(self, pair: int) -> None:
        self._tx_irq_timers[pair] = None
        if self._queues and not self.needs_reset and 2 * pair + 1 < len(self._queues):
            self._notify(2 * pair + 1)

    def _tx_skip_quiet(self, pair: int) -> None:
        """Let the guest's next frames that nothing waits on go without a kick (see TX_QUIET_MAX)."""
        if self._in_tx[pair]:
            # Frames delivered from inside the transmit loop (the answer to a guest frame, sent
            # before that frame's pass ends): the loop re-arms kicks at the next index when the
            # ring runs dry, which would undo the skip; it is applied after that (_tx).
            self._tx_quiet_deferred[pair] = True
            return
        take = getattr(self.backends[pair], "take_quiet_tx", None)
        n = take() if take is not None else 0
        if n <= 0 or self._tx_quiet_timers[pair] is not None:
            return
        q = self._queues[2 * pair + 1]
        last = q.last_avail_idx
        if not q.event_idx or q.avail_idx() != last:
            return  # no avail_event, or the guest sent already and its kick is on the way
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        q.set_avail_event(last + min(n, TX_QUIET_MAX))
        self._tx_quiet_timers[pair] = loop.call_later(TX_QUIET_WAIT, self._tx_quiet_due, pair)

    def _tx_quiet_due(self, pair: int) -> None:
        self._tx_quiet_timers[pair] = None
        if self._queues and not self.needs_reset and 2 * pair + 1 < len(self._queues):
            self.queue_notify(2 * pair + 1)

    # -- transmit -----------------------------------------------------------

    def _tx(self, pair: int) -> None:
        q = self._queues[2 * pair + 1]
        quiet = self._tx_quiet_timers[pair]
        if quiet is not None:
            quiet.cancel()  # this pass re-arms kicks for every frame
            self._tx_quiet_timers[pair] = None
        # The per-frame loop runs on locals and counts into locals: at ~1 us a
        # frame, attribute lookups and method calls are most of the cost.
        send: Callable[[Sequence[memoryview]], bool] = self.backends[pair].send
        pop_buffers, push_used_heads = q.pop_buffers, q.push_used_heads
        passthrough = self.passthrough_hdr
        hdr_len = self._hdr_len
        if passthrough and hdr_len != C.HDR_LEN:
            send = _lengthen_header(send)
        max_len = _MAX_TX_CHAIN
        frames = nbytes = dropped = 0
        small = self._tx_small[pair]
        budget = PASS_BUDGET
        self._in_tx[pair] = True
        try:
            while True:
                batch = pop_buffers(TX_BATCH, False)
                if batch:
                    heads: list[int] = []
                    try:
                        for head, views, n in batch:
                            heads.append(head)
                            if small >= 0:
                                small = (small + 1 if n <= TX_SMALL_FRAME and small < TX_LAZY_FRAMES
                                         and _is_tcp(views, hdr_len) else -1)
                            # Guest-controlled: n, the chain's readable bytes.
                            if n < hdr_len or n > max_len:
                                dropped += 1
                                guest_error_log.warning("virtio-net: tx chain of %d bytes dropped", n)
                            elif send(views if passthrough else skip_bytes(views, hdr_len)):
                                frames += 1
                                nbytes += n - hdr_len
                            else:
                                dropped += 1
                    finally:
                        push_used_heads(heads)
                    if len(batch) == TX_BATCH:
                        budget -= TX_BATCH
                        if budget <= 0 and self.notify_later(2 * pair + 1):
                            break
                        continue
                # A short batch drained the ring as far as its avail index went;
                # re-arm and look again (§2.7.10), without another empty pass.
                if not q.enable_notification():
                    break
        finally:
            self._in_tx[pair] = False
            self._tx_small[pair] = small
            st = self.stats[pair]
            st.tx_frames += frames
            st.tx_bytes += nbytes
            if dropped:
                st.tx_dropped += dropped
        if self._tx_quiet_deferred[pair]:
            self._tx_quiet_deferred[pair] = False
            self._tx_skip_quiet(pair)
        # The transmit interrupt waits TX_IRQ_DELAY and then asks the ring
        # again whether the driver still wants it (§2.7.10). Linux reaps
        # finished transmits itself, on its next transmit and in its receive
        # poll, and moves used_event past them, so most of these interrupts
        # are then not needed; a receive interrupt sent meanwhile takes it
        # along (_notify). Armed before the receive pass below, so an answer
        # read there carries this batch's interrupt with it as before.
        # busybox nc guest->host through net-daemon on INTx, quiet machine,
        # 4 alternating pairs: 0.031-0.033 -> 0.035-0.037 Gbit/s, guest
        # interrupts per MiB ~1300 -> ~600. Only small frames since the last
        # one: TX_IRQ_LAZY instead (busybox nc connections through net-daemon:
        # ~3.5 -> ~2.2 guest interrupts a connection, the receive interrupts of
        # the next connection taking the last one's along).
        self._tx_irq_later(pair, small > 0)
        if (
            0 < frames <= RX_AFTER_TX
            and self._rx_armed[pair]
            and pair < self._active_pairs
            and self._rx_may_wait(pair)
        ):
            # A tap write runs the host's stack in our call, so its answer (a
            # TCP ACK for what the guest sent, or the sender's next segments
            # for the guest's ACKs) is often queued already. Taking it now
            # puts both used rings ahead of either interrupt, so an INTx
            # driver handles both in one, and saves the loop turn it would
            # wait for: busybox nc guest->host took ~25-50% fewer guest
            # interrupts and less daemon CPU per MiB. A backend that says it
            # holds nothing (queued(): the user-mode stack, which hands over
            # what it answers through its ready callback) is not read: an
            # empty pass was ~10% of net-daemon CPU per connection. Larger batches (a
            # flood, which nobody answers) skip it: its failed read cost
            # ~0.2 us a frame at 64-frame batches of 64 bytes.
            self._rx(pair)

    def _rx_may_wait(self, pair: int) -> bool:
        """Whether the pair's backend may hold frames for the guest: False only when it can
        tell (``queued()``, as the user-mode stack's) that it holds none."""
        queued = getattr(self.backends[pair], "queued", None)
        return queued is None or queued() > 0

    # -- receive ------------------------------------------------------------

    def _rx(self, pair: int) -> None:
        # Each receive batch asks the ring whether the driver wants an
        # interrupt right after its first frame, and again at its end
        # (§2.7.10 decides both times). A driver that went idle waiting
        # (Linux re-arms used_event when its poll runs dry) starts on that
        # frame while we copy the rest, as it would behind QEMU's own NIC,
        # which checks after every frame; one still polling does not ask, so
        # this costs nothing then. Under bulk TCP from the host (batches of up
        # to ~16 64 KiB frames, ~0.3 ms to copy) through net-daemon on INTx:
        # kitnet host->guest 5.35 -> 5.72 Gbit/s median of 5 alternating
        # pairs, 3.3 -> 4.5 guest interrupts per MiB.
        if not self._queues or self.needs_reset:
            return
        st = self.stats[pair]
        delivered = st.rx_frames
        try:
            if self._mrg_rxbuf:
                self._rx_batch(pair)
            else:
                self._rx_plain(pair)
            if st.rx_frames != delivered:
                # What the guest answers to these frames may be known to need nothing from us.
                self._tx_skip_quiet(pair)
        except QueueError as err:
            guest_error_log.warning("virtio-net: rx queue %d broken: %s", 2 * pair, err)
            self._set_rx_armed(pair, False)
            self.fail(str(err))

    def _rx_batch(self, pair: int) -> None:
        q = self._queues[2 * pair]
        backend = self.backends[pair]
        recv_into = backend.recv_into
        win = self._rx_windows[pair]
        passthrough = self.passthrough_hdr
        flt = self.filter
        hdr_len = C.HDR_LEN
        want = self._max_rx_frame
        # The window's lists change in place only, so these stay its own.
        heads, sizes, ends, views = win.heads, win.sizes, win.ends, win.views
        push_used = q.push_used
        pending = self._rx_pending
        # A backend that can tell it holds nothing more (the user-mode stack) is not asked for
        # another frame just to hear it has none: the last of a few frames ends the batch.
        queued = getattr(backend, "queued", None)
        frames = nbytes = dropped = filtered = 0
        drained = False
        # The window's place, kept in locals for the per-frame path and
        # written back before any RxWindow method runs and on the way out.
        pos, vpos, base, flat = win.pos, win.vpos, win.base, win.flat
        try:
            while True:
                if len(ends) == pos or ends[-1] - base < want:
                    win.pos, win.vpos, win.base = pos, vpos, base
                    ok = win.fill(q, want, RX_BATCH)
                    # Out of buffers: pause the backend until the guest posts more
                    # (re-checking after re-arming, as §2.7.10 asks).
                    if not ok:
                        ok = q.enable_notification() and win.fill(q, want, RX_BATCH)
                    pos, vpos, base, flat = win.pos, win.vpos, win.base, win.flat
                    if not ok:
                        self._set_rx_armed(pair, False)
                        break
                    if win.room < want or pending[pair]:
                        # Fewer buffers posted than the largest frame needs:
                        # go through the staging buffer so a frame that does
                        # not fit yet waits instead of being lost. A frame
                        # already waiting there goes first, however much came.
                        got = self._rx_staged(pair, q, win)
                        pos, vpos, base, flat = win.pos, win.vpos, win.base, win.flat
                        if got > 0:
                            frames += 1
                            nbytes += got - hdr_len
                            if frames == 1:
                                self._notify(2 * pair)
                        elif got == _RX_DRAINED:
                            drained = True
                            break
                        elif got == _RX_HELD:
                            break
                        continue
                len0 = sizes[pos]
                # Only as many chains as the largest frame needs (the window
                # holds at least that much here): a small frame's iovec
                # stays short.
                end = bisect_left(ends, base + want, pos) + 1
                bufs = views[vpos : vpos + end - pos] if flat else win.views_of(end - pos)
                room = ends[end - 1] - base
                if passthrough:
                    n = recv_into(bufs)
                else:
                    n = recv_into(skip_bytes(bufs, hdr_len))
                    if n >= 0:
                        n += hdr_len
                if n < 0:
                    drained = True
                    break
                if n > room or n < hdr_len + 14:
                    # Larger than the posted buffers (or a runt): the tail is lost,
                    # so the frame is dropped and the buffers are reused.
                    dropped += 1
                    continue
                if not flt.promisc and not flt.accepts(gather(skip_bytes(bufs, hdr_len), 6)):
                    filtered += 1
                    continue
                used = 1 if n <= len0 else bisect_left(ends, base + n, pos) + 1 - pos
                if not passthrough:
                    scatter(bufs, C.HDR.pack(0, C.GSO_NONE, 0, 0, 0, 0, used))
                else:
                    # The tap wrote num_buffers = 0 or 1; only we know how many we used.
                    w0 = bufs[0]
                    if len(w0) >= hdr_len:
                        w0[10] = used & 0xFF
                        w0[11] = used >> 8
                    else:
                        scatter(skip_bytes(bufs, 10), used.to_bytes(2, "little"))
                if used == 1 and flat:
                    # Nearly every frame that is not a GSO one, inline.
                    push_used(heads[pos], n)
                    base = ends[pos]
                    pos += 1
                    vpos += 1
                else:
                    win.pos, win.vpos, win.base = pos, vpos, base
                    win.take(q, used, n)
                    pos, vpos, base, flat = win.pos, win.vpos, win.base, win.flat
                frames += 1
                nbytes += n - hdr_len
                if frames == 1:
                    self._notify(2 * pair)
                if queued is not None and not queued():
                    drained = True
                    break
        finally:
            win.pos, win.vpos, win.base = pos, vpos, base
            st = self.stats[pair]
            st.rx_frames += frames
            st.rx_bytes += nbytes
            if dropped or filtered:
                st.rx_dropped += dropped
                st.rx_filtered += filtered
        if drained and pair < self._active_pairs and not self._rx_armed[pair]:
            # Buffers left and nothing to read: wake us when frames come.
            self._set_rx_armed(pair, True)
        if frames:
            self._notify(2 * pair)

    def _rx_plain(self, pair: int) -> None:
        """Receive without mergeable buffers: each frame fills the first chain (§5.1.6.3.1)."""
        q = self._queues[2 * pair]
        recv_into: Callable[[Sequence[memoryview]], int] = self.backends[pair].recv_into
        plain = self._rx_windows[pair].plain
        passthrough = self.passthrough_hdr
        flt = self.filter
        hdr_len = self._hdr_len
        if passthrough and hdr_len != C.HDR_LEN:
            recv_into = _shorten_header(recv_into)
        own_hdr = C.HDR.pack(0, C.GSO_NONE, 0, 0, 0, 0, 1)[:hdr_len]
        push_used = q.push_used
        frames = nbytes = dropped = filtered = 0
        drained = False
        try:
            while True:
                if not plain:
                    got = q.pop_buffers(RX_BATCH, True)
                    if not got:
                        # Out of buffers: pause the backend until the guest posts more
                        # (re-checking after re-arming, as §2.7.10 asks).
                        if not q.enable_notification() or not (got := q.pop_buffers(RX_BATCH, True)):
                            self._set_rx_armed(pair, False)
                            break
                    for chain in got:
                        if chain[2] < hdr_len:
                            # Too small to hold even the header: hand it back unused.
                            push_used(chain[0], 0)
                        else:
                            plain.append(chain)
                    continue
                head, bufs, room = plain[0]
                if passthrough:
                    n = recv_into(bufs)
                else:
                    n = recv_into(skip_bytes(bufs, hdr_len))
                    if n >= 0:
                        n += hdr_len
                if n < 0:
                    drained = True
                    break
                if n > room or n < hdr_len + 14:
                    # Larger than the buffer (or a runt): the tail is lost, so
                    # the frame is dropped and the buffer reused.
                    dropped += 1
                    continue
                if not flt.promisc and not flt.accepts(gather(skip_bytes(bufs, hdr_len), 6)):
                    filtered += 1
                    continue
                if not passthrough:
                    scatter(bufs, own_hdr)
                plain.popleft()
                push_used(head, n)
                frames += 1
                nbytes += n - hdr_len
                if frames == 1:
                    self._notify(2 * pair)
        finally:
            st = self.stats[pair]
            st.rx_frames += frames
            st.rx_bytes += nbytes
            st.rx_dropped += dropped
            st.rx_filtered += filtered
        if drained and pair < self._active_pairs:
            # Buffers left and nothing to read: wake us when frames come.
            self._set_rx_armed(pair, True)
        if frames:
            self._notify(2 * pair)

    def _rx_staged(self, pair: int, q: Virtqueue, win: RxWindow) -> int:
        """Receive one frame through the pair's staging buffer.

        Returns the frame's length (header included) once delivered, 0 if a
        frame was dropped or filtered or more buffers have come (go on),
        :data:`_RX_DRAINED` if the backend had nothing, or :data:`_RX_HELD`
        if the frame waits for the guest to post buffers (backend paused).
        """
        hdr_len = C.HDR_LEN
        st = self.stats[pair]
        stage = self._rx_stage[pair]
        if stage is None:
            stage = self._rx_stage[pair] = bytearray(self._max_rx_frame)
        n = self._rx_pending[pair]
        if not n:
            mv = memoryview(stage)
            if self.passthrough_hdr:
                n = self.backends[pair].recv_into([mv])
            else:
                n = self.backends[pair].recv_into([mv[hdr_len:]])
                if n >= 0:
                    n += hdr_len
            if n < 0:
                return _RX_DRAINED
            if n > len(stage) or n < hdr_len + 14:
                st.rx_dropped += 1
                return 0
            flt = self.filter
            if not flt.promisc and not flt.accepts(bytes(stage[hdr_len : hdr_len + 6])):
                st.rx_filtered += 1
                return 0
        if n > win.room:
            self._rx_pending[pair] = 0
            if len(win) >= q.size:
                # Every buffer the ring can hold is posted and it still
                # does not fit: it never will.
                st.rx_dropped += 1
                return 0
            # Keep it and stop reading until the guest posts more; its next
            # rx kick delivers this frame first. Re-check after re-arming
            # (§2.7.10): buffers posted meanwhile send no kick.
            self._rx_pending[pair] = n
            if q.enable_notification():
                return 0
            self._set_rx_armed(pair, False)
            return _RX_HELD
        self._rx_pending[pair] = 0
        used = win.reach(n)
        if self.passthrough_hdr:
            # The backend wrote num_buffers = 0 or 1; only we know how many we used.
            stage[10] = used & 0xFF
            stage[11] = used >> 8
        else:
            C.HDR.pack_into(stage, 0, 0, C.GSO_NONE, 0, 0, 0, 0, used)
        scatter(win.views_of(used), memoryview(stage)[:n])
        win.take(q, used, n)
        return n

    # -- control queue ------------------------------------------------------

    def _ctrl(self) -> None:
        q = self._queues[self._ctrl_index]
        budget = PASS_BUDGET
        while True:
            while (chain := q.pop()) is not None:
                self._ctrl_answer(q, chain)
                budget -= 1
                if budget <= 0 and self.notify_later(self._ctrl_index):
                    self._notify(self._ctrl_index)
                    return
            # Ask for the next command's kick (avail_event, §2.7.10). Linux notifies only when
            # asked and then spins until the answer is there, and its set_rx_mode sends
            # commands in a row: left at its first value, avail_event is stepped past by the
            # first command only, and the guest would spin on the second for ever.
            if not q.enable_notification():
                break
        self._notify(self._ctrl_index)

    def _ctrl_answer(self, q: Virtqueue, chain: DescriptorChain) -> None:
        ack = C.CTRL_ERR
        n = chain.readable_len
        if n >= 2 and chain.writable_len >= 1:
            cls, cmd = gather(chain.readable, 2)
            arg = skip_bytes(chain.readable, 2)
            try:
                if cls == C.CTRL_MAC and cmd == C.CTRL_MAC_TABLE_SET:
                    ack = self._mac_table_set(arg, n - 2)
                else:
                    ack = self._ctrl_command(cls, cmd, gather(arg, min(n - 2, 16)))
            except Exception as err:
                # Every command is answered: the driver spins until it is (virtnet_send_command).
                # Rate-limited: the guest may send the command again and again.
                guest_error_log.warning("virtio-net: control command %d/%d failed: %r", cls, cmd, err)
                log.debug("control command %d/%d failed", cls, cmd, exc_info=True)
                ack = C.CTRL_ERR
        if ack != C.CTRL_OK:
            self.ctrl_errors += 1
        if chain.writable_len >= 1:
            # The ack is the last device-writable byte (§5.1.6.5).
            last = chain.writable[-1]
            last[len(last) - 1] = ack
        q.push_used(chain.head, 1 if chain.writable_len else 0)

    def _ctrl_command(self, cls: int, cmd: int, arg: bytes) -> int:
        if cls == C.CTRL_RX and self.has_feature(C.F_CTRL_RX):
            if cmd > C.CTRL_RX_NOBCAST or len(arg) < 1:
                return C.CTRL_ERR
            name = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")[cmd]
            setattr(self.filter, name, bool(arg[0]))
            return C.CTRL_OK
        if cls == C.CTRL_MAC:
            if cmd == C.CTRL_MAC_ADDR_SET and self.has_feature(C.F_CTRL_MAC_ADDR) and len(arg) >= 6:
                self.mac = bytes(arg[:6])
                self.filter.mac = self.mac
                return C.CTRL_OK
            return C.CTRL_ERR
        if cls == C.CTRL_MQ and cmd == C.CTRL_MQ_VQ_PAIRS_SET and self.has_feature(C.F_MQ):
            n = int.from_bytes(arg[:2], "little")
            if len(arg) < 2 or not C.CTRL_MQ_VQ_PAIRS_MIN <= n <= self._usable_pairs:
                return C.CTRL_ERR
            self._active_pairs = n
            self._run_pairs(n)
            return C.CTRL_OK
        if cls == C.CTRL_GUEST_OFFLOADS and cmd == C.CTRL_GUEST_OFFLOADS_SET:
            if not self.has_feature(C.F_CTRL_GUEST_OFFLOADS) or len(arg) < 8:
                return C.CTRL_ERR
            wanted = int.from_bytes(arg[:8], "little")
            # Only offloads negotiated at feature time may be switched on (§5.1.6.5.6.1).
            if wanted & ~self.driver_features:
                return C.CTRL_ERR
            self._apply_offloads(wanted)
            return C.CTRL_OK
        if cls == C.CTRL_ANNOUNCE and cmd == C.CTRL_ANNOUNCE_ACK:
            return C.CTRL_OK
        if cls == C.CTRL_VLAN:
            # VLAN filtering is not offered (no CTRL_VLAN feature): all VLANs pass.
            return C.CTRL_ERR
        return C.CTRL_ERR

    def _mac_table_set(self, arg: list[memoryview], n: int) -> int:
        """VIRTIO_NET_CTRL_MAC_TABLE_SET: two tables, each a le32 count and that many MACs,
        unicast first (§5.1.6.5.2), in the ``n`` bytes of ``arg``.

        Linux sends every address the interface has, with no cap (virtnet_set_rx_mode).
        Beyond MAC_TABLE_ENTRIES in all, the class that does not fit passes whole and the
        answer is OK, as QEMU's filter does; a table longer than the command is an error and
        leaves the filter as it was.
        """
        if not self.has_feature(C.F_CTRL_RX):
            return C.CTRL_ERR
        # Guest-controlled: both counts, checked against the command's length before any read.
        if n < 4:
            return C.CTRL_ERR
        ucount = int.from_bytes(gather(arg, 4), "little")
        rest = n - 4 - 6 * ucount
        if rest < 4:
            return C.CTRL_ERR
        mtable = skip_bytes(arg, 4 + 6 * ucount)
        mcount = int.from_bytes(gather(mtable, 4), "little")
        if 6 * mcount > rest - 4:
            return C.CTRL_ERR
        f = self.filter
        f.uni_overflow = ucount > MAC_TABLE_ENTRIES
        f.uni = set() if f.uni_overflow else _macs(gather(skip_bytes(arg, 4), 6 * ucount))
        f.multi_overflow = (0 if f.uni_overflow else ucount) + mcount > MAC_TABLE_ENTRIES
        f.multi = set() if f.multi_overflow else _macs(gather(skip_bytes(mtable, 4), 6 * mcount))
        return C.CTRL_OK
