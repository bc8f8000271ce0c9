"""The split virtqueue, device side (virtio 1.2 §2.7).

A :class:`Virtqueue` knows guest memory and the three ring areas, nothing of
the device using it nor the transport that set it up. It hands out
:class:`DescriptorChain` s that are already validated: every descriptor was
copied out of guest memory exactly once, every buffer lies inside guest RAM,
device-writable buffers follow device-readable ones, chains are bounded (so a
loop cannot hang us) and indirect tables follow §2.7.5.3. A chain that breaks
these rules is returned to the driver with a written length of 0 and counted
(a dropped request); a ring that cannot be trusted any more (the avail index
running more than the queue size ahead, a head index out of range) raises
:class:`QueueError`, after which the queue stays dead until the device is
reset and the owning device should call ``fail()``.

Memory ordering. The driver runs on other CPUs while we read and write the
rings. CPython gives no fences, but every ring access here is a single
``struct`` load or store on an x86-64 host (TSO): loads are not reordered with
loads, stores not with stores. So writing a used element before the used
index publishes it in order (§2.7.8), and reading the avail index before the
ring entries it covers sees them (§2.7.13). The one reordering x86 does allow,
a later load passing an earlier store, matters where we store then check the
other side's event index; there :func:`_full_fence` takes a lock, whose
atomic read-modify-write is a full barrier.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from array import array
from operator import add

from appliance.kvm.memory import GuestMemory, GuestMemoryError
from appliance.virtio.errors import ChainError, QueueError

log = logging.getLogger(__name__)

# virtio 1.2 §2.7.5: descriptor flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# §2.7.6 / §2.7.8: ring flags.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
# Chains a device takes in one pass over a ring whose used entries it gives back as it goes,
# before the loop's other work gets a turn (the pass then goes on from a loop callback). A
# driver refilling the ring as fast as it drains would otherwise hold the loop, and every
# other device, NIC and monitor with it (QEMU's virtio-net has tx_burst=256 for this). Found
# by fuzzing: 200 000 frames in one transmit pass.
PASS_BUDGET = 1024
# An indirect table longer than this is refused. Linux sizes its tables by the
# device's seg_max (at most the queue size); 1024 matches QEMU's own ceiling.
MAX_INDIRECT_DESCRIPTORS = 1024
# A used element's length is a le32 (§2.7.8).
_MAX_CHAIN_BYTES = 0xFFFF_FFFF

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_USED_ELEM = struct.Struct("<II")  # id, len
# Batched ring accesses below read descriptors as two native u64 words and
# write used elements as native u32 pairs: both little-endian on x86-64.
assert array("I").itemsize == 4

_fence_lock = threading.Lock()
_NO_REGION = (0, 0, memoryview(b""))


def _full_fence() -> None:
    """A full memory barrier: the lock's atomic RMW orders our store before our next load."""
    _fence_lock.acquire()
    _fence_lock.release()


class RateLimitedLog:
    """At most ``burst`` guest-error lines per ``period`` seconds, then a summary."""

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 5.0) -> None:
        self._log = logger
        self._burst = burst
        self._period = period
        self._window = 0.0
        self._count = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window > self._period:
            if self._suppressed:
                self._log.warning("%d similar guest errors suppressed", self._suppressed)
            self._window, self._count, self._suppressed = now, 0, 0
        if self._count < self._burst:
            self._count += 1
            self._log.warning(msg, *args)
        else:
            self._suppressed += 1


guest_error_log = RateLimitedLog(log)


class DescriptorChain:
    """One validated request from the driver.

    :param head: index of the head descriptor, returned in the used ring.
    :param descriptors: ``(addr, len, writable)`` of every data descriptor, in
        chain order (indirect tables flattened).
    :param readable: zero-copy views of the device-readable buffers (zero-length
        ones omitted), in order.
    :param writable: the same for device-writable buffers.
    """

    # A plain slotted class rather than a dataclass: one is built per request,
    # and the generated __init__ with default factories cost ~0.3 us of the
    # ~2.5 us a pop took.
    __slots__ = ("head", "descriptors", "readable", "writable", "readable_len", "writable_len")

    def __init__(
        self,
        head: int,
        descriptors: list[tuple[int, int, bool]] | None = None,
        readable: list[memoryview] | None = None,
        writable: list[memoryview] | None = None,
        readable_len: int = 0,
        writable_len: int = 0,
    ) -> None:
        self.head = head
        self.descriptors = [] if descriptors is None else descriptors
        self.readable = [] if readable is None else readable
        self.writable = [] if writable is None else writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, descriptors={self.descriptors!r}, "
            f"readable_len={self.readable_len}, writable_len={self.writable_len})"
        )

    def readable_views(self) -> list[memoryview]:
        return self.readable

    def writable_views(self) -> list[memoryview]:
        return self.writable


def _views(mem: GuestMemory, addr: int, length: int) -> list[memoryview]:
    """Views covering ``[addr, addr+length)`` across touching regions.

    :raises GuestMemoryError: when any byte lies outside guest RAM.
    """
    # A buffer may straddle two adjacent regions (vhost-user front ends can
    # hand us touching regions); anything else is outside RAM.
    out: list[memoryview] = []
    pos, remaining = addr, length
    for r in mem.regions:
        if r.start <= pos < r.end:
            n = min(remaining, r.end - pos)
            out.append(mem.view(pos, n))
            pos += n
            remaining -= n
            if remaining == 0:
                return out
    raise GuestMemoryError(addr, length)


class Virtqueue:
    """Device side of one split virtqueue.

    :param mem: guest memory; all ring and buffer accesses go through it.
    :param size: queue size (a power of 2, at most 32768).
    :param desc_addr: guest physical address of the descriptor table.
    :param avail_addr: guest physical address of the driver (avail) ring.
    :param used_addr: guest physical address of the device (used) ring.
    :param event_idx: VIRTIO_RING_F_EVENT_IDX was negotiated.
    :param indirect: VIRTIO_F_INDIRECT_DESC was negotiated.
    :raises QueueError: When the size is invalid or a ring is misaligned or
        not inside guest RAM (the transport then sets DEVICE_NEEDS_RESET).

    The used index starts from what the used ring holds (0 for a fresh ring;
    the previous value when a vhost-user back end reconnects), and so does the
    next avail index to consume; vhost-user's SET_VRING_BASE overrides it
    through :attr:`last_avail_idx`.
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        if size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        # §2.7: descriptor table 16-byte, avail 2-byte, used 4-byte aligned.
        if desc_addr % 16 or avail_addr % 2 or used_addr % 4:
            raise QueueError("virtqueue ring is misaligned")
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        try:
            self._desc = mem.view(desc_addr, 16 * size)
            self._avail = mem.view(avail_addr, 6 + 2 * size)
            self._used = mem.view(used_addr, 6 + 8 * size)
        except GuestMemoryError as err:
            raise QueueError("virtqueue ring lies outside guest memory") from err
        self._mask = size - 1
        # Indices the driver reads or writes concurrently are accessed as whole
        # 16-bit words. ``struct`` packs and unpacks little-endian fields one
        # byte at a time, so a driver polling the used index on another CPU
        # could see half an update (0x00ff -> 0x0100 read as 0x0000) and
        # consume stale entries, and we could see half of its avail index.
        # A memoryview cast to 'H' moves each item with one 2-byte memcpy,
        # which is a single load or store on x86-64.
        self._avail16 = self._avail.cast("H")
        self._used16 = self._used.cast("H")
        # Each descriptor as two u64 words: addr, then len | flags << 32 | next << 48.
        self._desc64 = self._desc.cast("Q")
        self._used_event_i = 2 + size
        self._avail_event_i = 2 + 4 * size
        self._used_idx = int(self._used16[1])
        self._last_avail = self._used_idx
        self._avail_seen = self._last_avail
        self._signalled_used = self._used_idx
        self._unsignalled = False
        self.broken = False
        self.invalid_chains = 0
        # (start, end, view) of the region the last buffer lay in; see _walk.
        self._buf_region: tuple[int, int, memoryview] = _NO_REGION

    # -- indices (vhost-user GET/SET_VRING_BASE) ---------------------------

    @property
    def last_avail_idx(self) -> int:
        """The next avail ring index the device will consume (free-running u16)."""
        return self._last_avail

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        self._last_avail = value & 0xFFFF
        self._avail_seen = self._last_avail

    @property
    def used_idx(self) -> int:
        """The used index the device last published."""
        return self._used_idx

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        self._used_idx = value & 0xFFFF
        self._signalled_used = self._used_idx
        self._used16[1] = self._used_idx

    def avail_idx(self) -> int:
        """The driver's current avail index (a fresh read of guest memory)."""
        return int(self._avail16[1])

    # -- consuming requests ------------------------------------------------

    def _check_offered(self, seen: int) -> None:
        """Refuse an avail index that offers more chains than the ring holds, counting those taken
        and not yet used: a driver has at most ``size`` outstanding (each needs a descriptor of
        its own), so more means heads offered again while in flight. Unchecked, each would be
        one more request under way, without end (QEMU: "Virtqueue size exceeded").

        :raises QueueError: and the ring is broken from then on.
        """
        outstanding = (seen - self._used_idx) & 0xFFFF
        if outstanding > self.size:
            self.broken = True
            taken = (self._last_avail - self._used_idx) & 0xFFFF
            raise QueueError(f"avail index {seen} offers {outstanding} chains with {taken} in flight, "
                             f"in a queue of {self.size}")

    def has_available(self) -> bool:
        return not self.broken and self.avail_idx() != self._last_avail

    def pop(self) -> DescriptorChain | None:
        """The next valid chain, or ``None`` when the driver has offered nothing more.

        Malformed chains are returned to the driver (used length 0), counted in
        :attr:`invalid_chains` and skipped.

        :raises QueueError: When the ring is broken (avail index too far ahead,
            head index out of range); the queue is dead from then on.
        """
        while not self.broken:
            last = self._last_avail
            if last == self._avail_seen:
                # Guest-controlled: the avail index (§2.7.13.3, _check_offered).
                seen = self._avail_seen = self._avail16[1]
                if seen == last:
                    return None
                self._check_offered(seen)
            head = self._avail16[2 + (last & self._mask)]
            self._last_avail = (last + 1) & 0xFFFF
            if head >= self.size:
                self.broken = True
                raise QueueError(f"avail ring names descriptor {head} in a queue of {self.size}")
            try:
                return self._walk(head)
            except ChainError as err:
                self.invalid_chains += 1
                guest_error_log.warning("virtqueue: dropping request: %s", err)
                self.push_used(head, 0)
        return None

    def _walk(self, head: int) -> DescriptorChain:
        descs: list[tuple[int, int, bool]] = []
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        # The region the last buffer fell in: nearly every buffer lies in the
        # same one, so the bounds check is two comparisons here instead of a
        # bisect in GuestMemory per descriptor. Misses go through GuestMemory.
        rstart, rend, rview = self._buf_region
        unpack = _DESC.unpack_from
        table = self._desc
        table_len = self.size
        idx = head
        visited = 0
        in_indirect = False
        rlen = wlen = 0
        while True:
            visited += 1
            if visited > table_len:
                raise ChainError("descriptor chain is longer than its table (a loop?)", head=head)
            # Guest-controlled: one copy of the descriptor, validated below.
            addr, length, flags, nxt = unpack(table, idx << 4)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # §2.7.5.3.1: only with the feature, never inside an indirect
                # table, never together with NEXT; its WRITE flag is ignored.
                if not self.indirect:
                    raise ChainError("indirect descriptor without VIRTIO_F_INDIRECT_DESC", head=head)
                if in_indirect:
                    raise ChainError("nested indirect descriptor table", head=head)
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError("indirect descriptor also has NEXT set", head=head)
                if length == 0 or length % 16 or length // 16 > MAX_INDIRECT_DESCRIPTORS:
                    raise ChainError(f"indirect table of {length} bytes", head=head)
                try:
                    table = self.mem.view(addr, length)
                except GuestMemoryError:
                    raise ChainError("indirect table outside guest memory", head=head) from None
                table_len = length // 16
                in_indirect = True
                idx = 0
                visited = 0
                continue
            writes = flags & VIRTQ_DESC_F_WRITE
            if length:
                if rstart <= addr and addr + length <= rend:
                    views = [rview[addr - rstart : addr - rstart + length]]
                else:
                    views = self._buffer_views(addr, length, head)
                    rstart, rend, rview = self._buf_region
                if writes:
                    writable += views
                    wlen += length
                else:
                    # §2.7.4.2: device-writable buffers come after device-readable ones.
                    if writable:
                        raise ChainError("device-readable buffer after a writable one", head=head)
                    readable += views
                    rlen += length
            elif not writes and writable:
                raise ChainError("device-readable buffer after a writable one", head=head)
            descs.append((addr, length, writes != 0))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_len:
                raise ChainError(f"next descriptor {nxt} outside a table of {table_len}", head=head)
            idx = nxt
        if rlen > _MAX_CHAIN_BYTES or wlen > _MAX_CHAIN_BYTES:
            raise ChainError("descriptor chain is larger than 4 GiB", head=head)
        return DescriptorChain(head, descs, readable, writable, rlen, wlen)

    def _buffer_views(self, addr: int, length: int, head: int) -> list[memoryview]:
        """Views of a buffer outside the cached region; caches the region it starts in."""
        region = self.mem.region_at(addr)
        if region is not None:
            self._buf_region = (region.start, region.end, region.view)
        try:
            return [self.mem.view(addr, length)]
        except GuestMemoryError:
            pass
        try:
            return _views(self.mem, addr, length)
        except GuestMemoryError:
            raise ChainError(f"buffer {addr:#x}+{length:#x} outside guest memory", head=head) from None

    # -- completing requests -----------------------------------------------

    def push_used(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver, saying ``written`` bytes were written.

        The element is stored before the index that publishes it; on x86-64
        stores stay in program order, so the driver never sees the new index
        without the element (§2.7.8, §2.7.14 "used buffer notification").
        """
        if self.broken:
            return
        _USED_ELEM.pack_into(self._used, 4 + 8 * (self._used_idx & self._mask), head, written)
        self._used_idx = (self._used_idx + 1) & 0xFFFF
        self._used16[1] = self._used_idx
        self._unsignalled = True

    def pop_buffers(self, limit: int, writable: bool) -> list[tuple[int, list[memoryview], int]]:
        """Up to ``limit`` chains as ``(head, views, nbytes)``, for devices with one direction per queue.

        ``views`` are the chain's device-writable buffers when ``writable``,
        else its device-readable ones (the other kind is ignored, as a
        virtio-net tx or rx queue does). The same checks as :meth:`pop` apply;
        a chain of one plain descriptor in the cached region (nearly every
        virtio-net frame) is checked inline and costs no
        :class:`DescriptorChain`, which roughly halved a frame's loop-thread
        CPU on the tap path.

        :raises QueueError: When the ring is broken (as :meth:`pop`).
        """
        out: list[tuple[int, list[memoryview], int]] = []
        if self.broken or limit <= 0:
            return out
        last = self._last_avail
        # Guest-controlled: the avail index, bounded as in pop() (§2.7.13.3).
        seen = self._avail_seen = self._avail16[1]
        if seen == last:
            return out
        self._check_offered(seen)
        avail16, table, mask, size = self._avail16, self._desc, self._mask, self.size
        unpack = _DESC.unpack_from
        want_flags = VIRTQ_DESC_F_WRITE if writable else 0
        rstart, rend, rview = self._buf_region
        append = out.append
        taken = 0
        # As pop(): chains handed back as invalid do not count towards the limit.
        while taken < limit and last != seen:
            head = avail16[2 + (last & mask)]
            last = (last + 1) & 0xFFFF
            if head >= size:
                self._last_avail = last
                self.broken = True
                raise QueueError(f"avail ring names descriptor {head} in a queue of {size}")
            # Guest-controlled: one copy of the head descriptor; only a lone
            # descriptor of the wanted direction lying wholly inside the
            # cached region takes the short path, anything else is walked.
            addr, length, flags, _ = unpack(table, head << 4)
            if flags == want_flags and length and rstart <= addr and addr + length <= rend:
                append((head, [rview[addr - rstart : addr - rstart + length]], length))
                taken += 1
                continue
            self._last_avail = last
            try:
                chain = self._walk(head)
            except ChainError as err:
                self.invalid_chains += 1
                guest_error_log.warning("virtqueue: dropping request: %s", err)
                self.push_used(head, 0)
                rstart, rend, rview = self._buf_region
                continue
            rstart, rend, rview = self._buf_region
            if writable:
                append((head, chain.writable, chain.writable_len))
            else:
                append((head, chain.readable, chain.readable_len))
            taken += 1
        self._last_avail = last
        return out

    def pop_buffers_into(
        self,
        limit: int,
        writable: bool,
        heads: list[int],
        sizes: list[int],
        views: list[memoryview],
        nviews: list[int],
    ) -> int:
        """:meth:`pop_buffers`, appending to parallel lists instead of returning tuples.

        Chain ``i`` taken adds its head to ``heads``, its byte count to
        ``sizes``, its views in order to ``views`` and their number to
        ``nviews``; returns how many chains were added. Chains, buffers, used
        elements for invalid chains and :class:`QueueError` are exactly those
        of :meth:`pop_buffers`.

        A batch in which every chain is one descriptor of the wanted direction
        inside the cached region (a Linux guest's receive buffers) is checked
        and taken with list operations over the whole batch: the per-chain
        tuples and checks of :meth:`pop_buffers` were ~1 us a chain, and a
        64 KiB receive frame fills ~17 of them. Any other batch goes through
        :meth:`pop_buffers`.

        :raises QueueError: When the ring is broken (as :meth:`pop`).
        """
        if self.broken or limit <= 0:
            return 0
        last = self._last_avail
        # Guest-controlled: the avail index, bounded as in pop() (§2.7.13.3).
        seen = self._avail16[1]
        pending = (seen - last) & 0xFFFF
        n = min(limit, pending)
        rstart, rend, rview = self._buf_region
        if 0 < n and (seen - self._used_idx) & 0xFFFF <= self.size and rend:
            size = self.size
            start = last & self._mask
            stop = start + n
            avail16 = self._avail16
            # Guest-controlled: one copy of each ring entry and of each head
            # descriptor's two words; every check below is on these copies.
            if stop <= size:
                ring = avail16[2 + start : 2 + stop].tolist()
            else:
                ring = avail16[2 + start : 2 + size].tolist() + avail16[2 : 2 + stop - size].tolist()
            if max(ring) < size:
                d64 = self._desc64
                addrs = [d64[h << 1] for h in ring]
                words = [d64[(h << 1) | 1] for h in ring]
                lens = [w & 0xFFFF_FFFF for w in words]
                want_flags = VIRTQ_DESC_F_WRITE if writable else 0
                if (
                    {(w >> 32) & 0xFFFF for w in words} == {want_flags}
                    and min(lens)
                    and min(addrs) >= rstart
                    and max(map(add, addrs, lens)) <= rend
                ):
                    views += [rview[a - rstart : a - rstart + ln] for a, ln in zip(addrs, lens, strict=True)]
                    heads += ring
                    sizes += lens
                    nviews += [1] * n
                    self._avail_seen = seen
                    self._last_avail = (last + n) & 0xFFFF
                    return n
        got = self.pop_buffers(limit, writable)
        for head, bufs, nbytes in got:
            heads.append(head)
            sizes.append(nbytes)
            views += bufs
            nviews.append(len(bufs))
        return len(got)

    def push_used_heads(self, heads: list[int]) -> None:
        """:meth:`push_used` with a written length of 0 for each of ``heads``, in order."""
        if self.broken or not heads:
            return
        pack, used, used16, mask = _USED_ELEM.pack_into, self._used, self._used16, self._mask
        idx = self._used_idx
        for head in heads:
            pack(used, 4 + 8 * (idx & mask), head, 0)
            idx = (idx + 1) & 0xFFFF
        # One index store publishes them all; the elements were stored first
        # and x86-64 keeps stores in order (§2.7.8).
        used16[1] = idx
        self._used_idx = idx
        self._unsignalled = True

    def push_used_many(self, heads: list[int], lens: list[int]) -> None:
        """:meth:`push_used` for each of ``heads`` with the written length at the same place in ``lens``.

        The elements are stored in order and published by one index store.
        """
        if self.broken or not heads:
            return
        n = len(heads)
        if len(lens) != n:
            raise ValueError("push_used_many: heads and lens differ in length")
        if n > self.size:
            # More than the ring holds (no driver has that many outstanding):
            # in ring-sized runs, so each run's copy stays within the ring.
            for i in range(0, n, self.size):
                self.push_used_many(heads[i : i + self.size], lens[i : i + self.size])
            return
        idx = self._used_idx
        used = self._used
        if n == 1:
            _USED_ELEM.pack_into(used, 4 + 8 * (idx & self._mask), heads[0], lens[0])
        else:
            # The ring's elements as u32 words, heads into the even ones and
            # lengths into the odd ones by slice assignment, in at most two
            # runs (the ring wraps): packing one element at a time was ~0.3 us
            # each, and a 64 KiB receive frame returns ~17.
            words = array("I", heads)
            words.extend(lens)
            start = idx & self._mask
            first = min(n, self.size - start)
            run = used[4 + 8 * start : 4 + 8 * (start + first)].cast("I")
            run[0::2] = words[:first]
            run[1::2] = words[n : n + first]
            if first < n:
                run = used[4 : 4 + 8 * (n - first)].cast("I")
                run[0::2] = words[first:n]
                run[1::2] = words[n + first :]
        idx = (idx + n) & 0xFFFF
        # As push_used_heads: elements first, then one index store (§2.7.8).
        self._used16[1] = idx
        self._used_idx = idx
        self._unsignalled = True

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call.

        With EVENT_IDX, the driver asks to be told once the used index passes
        its ``used_event`` (§2.7.10); otherwise it may set NO_INTERRUPT
        (§2.7.7). Returns False when nothing was pushed since the last call.
        """
        if not self._unsignalled or self.broken:
            return False
        self._unsignalled = False
        # Our used-idx store must be visible before we read the driver's
        # used_event/flags, or we could miss the interrupt it asks for
        # (_full_fence, inlined: this runs for every interrupt).
        _fence_lock.acquire()
        _fence_lock.release()
        if self.event_idx:
            used_event = self._avail16[self._used_event_i]
            new, old = self._used_idx, self._signalled_used
            self._signalled_used = new
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        flags = self._avail16[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_avail_event(self, value: int) -> None:
        """Ask the driver to kick once the avail index passes ``value`` (EVENT_IDX only)."""
        if self.event_idx and not self.broken:
            self._used16[self._avail_event_i] = value & 0xFFFF

    def enable_notification(self) -> bool:
        """Re-arm driver kicks after draining; returns True if more requests already came.

        With EVENT_IDX the avail event is moved to the next index we will
        consume; the driver may have added requests before seeing it, so the
        avail index is read again after a fence (§2.7.10).
        """
        if self.broken:
            return False
        if self.event_idx:
            self._used16[self._avail_event_i] = self._last_avail
            _full_fence()
        return self.avail_idx() != self._last_avail

    def close(self) -> None:
        """Let go of the ring views (before guest memory is unmapped)."""
        self.broken = True
        self._buf_region = _NO_REGION
        for v in (self._avail16, self._used16, self._desc64, self._desc, self._avail, self._used):
            v.release()
