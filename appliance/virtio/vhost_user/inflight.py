"""Inflight I/O tracking (vhost-user.rst "Inflight I/O tracking", split rings).

A back end that dies with requests popped but not completed leaves the driver
waiting for them, and the avail ring alone cannot say which they were (they may
complete out of order). So the back end keeps, in a memfd the front end holds
for it (GET_INFLIGHT_FD once, SET_INFLIGHT_FD on every start), one record per
descriptor head: in flight or not, and a counter giving the order it was
fetched in. A back end that starts on a region with records still in flight
resubmits those requests, oldest first, before taking new ones.

The area is ``num_queues`` regions of ``16 + 16 * queue_size`` bytes (rounded
up to 64); its layout is ours to choose, since only we read it.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct

from appliance.kvm.memory import GuestMemory
from appliance.virtio.errors import ChainError
from appliance.virtio.queue import DescriptorChain, Virtqueue
from appliance.virtio.vhost_user.errors import MemoryMapError, ProtocolError

log = logging.getLogger(__name__)

# QueueRegionSplit: features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16.
_HEADER = struct.Struct("<QHHHH")
# DescStateSplit: inflight u8, padding[5], next u16, counter u64.
_DESC = struct.Struct("<B5xHQ")
_VERSION = 1
MAX_AREA = 64 << 20


def region_size(queue_size: int) -> int:
    return (_HEADER.size + _DESC.size * queue_size + 63) & ~63


class InflightArea:
    """The shared tracking area: one region per queue."""

    def __init__(self, buf: mmap.mmap, num_queues: int, queue_size: int) -> None:
        self.buf = buf
        self.num_queues = num_queues
        self.queue_size = queue_size

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> tuple[InflightArea, int]:
        """A fresh, zeroed area and the memfd to hand to the front end (caller closes it).

        :raises ProtocolError: when the sizes are unreasonable.
        """
        size = cls._check(num_queues, queue_size)
        fd = os.memfd_create("vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # The front end keeps this fd across our restarts; sealed, it cannot shrink the file
            # under our mapping (a SIGBUS here), nor grow it.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        area = cls(buf, num_queues, queue_size)
        for i in range(num_queues):
            _HEADER.pack_into(buf, i * region_size(queue_size), 0, _VERSION, queue_size, 0, 0)
        return area, fd

    @classmethod
    def attach(cls, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int) -> InflightArea:
        """Map an area the front end hands back (SET_INFLIGHT_FD).

        :raises MemoryMapError: when it cannot be mapped or is too small.
        """
        need = cls._check(num_queues, queue_size)
        if mmap_size < need or mmap_offset % mmap.ALLOCATIONGRANULARITY:
            raise MemoryMapError(f"inflight area of {mmap_size} bytes at {mmap_offset} is unusable")
        try:
            buf = mmap.mmap(fd, need, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                            offset=mmap_offset)
        except (OSError, ValueError, OverflowError) as err:
            raise MemoryMapError("cannot map the inflight area") from err
        return cls(buf, num_queues, queue_size)

    @staticmethod
    def _check(num_queues: int, queue_size: int) -> int:
        if not 1 <= num_queues <= 1024 or not 1 <= queue_size <= 32768:
            raise ProtocolError(f"inflight area for {num_queues} queues of {queue_size} is unreasonable")
        size = num_queues * region_size(queue_size)
        if size > MAX_AREA:
            raise ProtocolError("inflight area is too large")
        return size

    def region(self, index: int) -> memoryview | None:
        """Queue ``index``'s region, or None when the area does not cover it."""
        if index >= self.num_queues:
            return None
        off = index * region_size(self.queue_size)
        return memoryview(self.buf)[off : off + region_size(self.queue_size)]

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:
            log.debug("inflight area still referenced; unmapped when released")


class TrackedQueue(Virtqueue):
    """A :class:`Virtqueue` that records every fetched head in its inflight region.

    On construction it repairs the region after a crash in the middle of a
    used-ring update and queues the heads still in flight for resubmission;
    :meth:`pop` hands those out first.
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        region: memoryview,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        super().__init__(mem, size, desc_addr, avail_addr, used_addr, event_idx=event_idx, indirect=indirect)
        self._region = region
        self._resubmit: list[int] = []
        # Where the next fetch is when the area carries a previous back end's state (see the
        # last_avail_idx setter); None for a fresh area.
        self._recovered_avail: int | None = None
        _features, version, desc_num, last_batch, used = _HEADER.unpack_from(region, 0)
        if version != _VERSION or desc_num != size:
            # A fresh or mismatched area: start it over for this ring.
            region[:] = bytes(len(region))
            _HEADER.pack_into(region, 0, 0, _VERSION, size, 0, self.used_idx)
            self._counter = 1
            return
        ring_used = self.used_idx
        if used != ring_used:
            # Died between publishing used entries and recording it: the last
            # batch (a list through ``next``) did complete.
            head = last_batch
            for _ in range((ring_used - used) & 0xFFFF):
                if head >= size:
                    break
                self._set_inflight(head, 0)
                head = self._state(head)[1]
            self._set_used(ring_used)
        pending = []
        counter = 0
        for head in range(size):
            inflight, _next, count = self._state(head)
            counter = max(counter, count)
            if inflight:
                pending.append((count, head))
        self._counter = counter + 1
        pending.sort()
        self._resubmit = [head for _, head in pending]
        if self._resubmit:
            log.warning("resubmitting %d requests a previous back end left in flight", len(self._resubmit))
        # Every request fetched before ours is either completed (below the used index) or in
        # flight (resubmitted now), so the next fetch is the one after those.
        self._recovered_avail = (ring_used + len(self._resubmit)) & 0xFFFF
        Virtqueue.last_avail_idx.fset(self, self._recovered_avail)  # type: ignore[attr-defined]

    @property
    def resubmitting(self) -> int:
        return len(self._resubmit)

    def _off(self, head: int) -> int:
        return _HEADER.size + _DESC.size * head

    def _state(self, head: int) -> tuple[int, int, int]:
        inflight, nxt, counter = _DESC.unpack_from(self._region, self._off(head))
        return int(inflight), int(nxt), int(counter)

    def _set_inflight(self, head: int, value: int) -> None:
        self._region[self._off(head)] = value

    def _set_used(self, used: int) -> None:
        struct.pack_into("<H", self._region, 14, used & 0xFFFF)

    @property
    def last_avail_idx(self) -> int:
        return Virtqueue.last_avail_idx.fget(self)  # type: ignore[attr-defined, no-any-return]

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        recovered = self._recovered_avail
        if recovered is not None:
            # The front end's SET_VRING_BASE after a back-end crash is a guess: QEMU restores
            # it to the used index, Cloud Hypervisor sends the guest's avail index, which
            # would skip requests published but never fetched. The area knows better
            # (libvhost-user decides the same way).
            self._recovered_avail = None
            if value != recovered:
                log.info("ring base %d from the front end, %d from the inflight area: using the area's",
                         value, recovered)
            value = recovered
        Virtqueue.last_avail_idx.fset(self, value)  # type: ignore[attr-defined]

    def pop(self) -> DescriptorChain | None:
        while self._resubmit and not self.broken:
            head = self._resubmit.pop(0)
            try:
                return self._walk(head)
            except ChainError:
                self.invalid_chains += 1
                self.push_used(head, 0)
        chain = super().pop()
        if chain is not None:
            _DESC.pack_into(self._region, self._off(chain.head), 1, 0, self._counter)
            self._counter += 1
        return chain

    def push_used(self, head: int, written: int) -> None:
        if self.broken:
            return
        # Record the batch (of one) before the used index moves, then clear.
        last_batch = struct.unpack_from("<H", self._region, 12)[0]
        struct.pack_into("<H", self._region, self._off(head) + 6, last_batch)
        struct.pack_into("<H", self._region, 12, head)
        super().push_used(head, written)
        self._set_inflight(head, 0)
        self._set_used(self.used_idx)

    def close(self) -> None:
        super().close()
        self._region.release()
