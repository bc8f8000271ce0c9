"""A fake guest driver: virtqueues laid out in a GuestMemory, for tests without a VM.

It plays the driver's half of virtio 1.2 §2.7 (descriptor table, avail ring,
reading the used ring) on a bytearray-backed :class:`GuestMemory`, so a
device can be activated, kicked and checked in plain pytest. Besides the
well-behaved :meth:`DriverQueue.add_chain`, it exposes the raw operations a
hostile driver uses (:meth:`DriverQueue.write_desc`, :meth:`DriverQueue.publish`,
:meth:`DriverQueue.set_avail_idx`).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence

from appliance.kvm.memory import GuestMemory, MemoryRegion
from appliance.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VirtioDevice
from appliance.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Virtqueue,
)

WRITE = VIRTQ_DESC_F_WRITE
NEXT = VIRTQ_DESC_F_NEXT
INDIRECT = VIRTQ_DESC_F_INDIRECT

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def make_memory(size: int = 4 << 20, start: int = 0) -> GuestMemory:
    """Guest RAM of ``size`` bytes at ``start`` backed by a bytearray."""
    return GuestMemory([MemoryRegion(start, bytearray(size))])


class FakeInterrupt:
    """Counts notifications; ``wait()`` returns once one more arrived."""

    def __init__(self) -> None:
        self.count = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.count += 1
        self._event.set()

    async def wait(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self._event.wait(), timeout)
        self._event.clear()


class DriverQueue:
    """The driver's view of one split virtqueue living in ``mem``."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = True,
    ) -> None:
        self.mem = mem
        self.size = size
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        self.event_idx = event_idx
        self.indirect = indirect
        mem.fill(desc_addr, 16 * size)
        mem.fill(avail_addr, 6 + 2 * size)
        mem.fill(used_addr, 6 + 8 * size)
        self._free = list(range(size - 1, -1, -1))
        self._chains: dict[int, list[int]] = {}
        self.next_avail = 0
        self.last_used = 0
        # The avail index at the last kick decision (kick_wanted).
        self._decided = 0

    @staticmethod
    def ring_bytes(size: int) -> int:
        """Bytes needed for the three rings laid out by :meth:`at`."""
        return 16 * size + ((6 + 2 * size + 3) & ~3) + 6 + 8 * size

    @classmethod
    def at(cls, mem: GuestMemory, base: int, size: int, **kw: bool) -> DriverQueue:
        """Lay the rings out contiguously from ``base`` (16-byte aligned)."""
        desc = base
        avail = desc + 16 * size
        used = (avail + 6 + 2 * size + 3) & ~3
        return cls(mem, size, desc, avail, used, **kw)

    def virtqueue(self) -> Virtqueue:
        """The device side of this queue, as a transport would build it."""
        return Virtqueue(
            self.mem, self.size, self.desc_addr, self.avail_addr, self.used_addr,
            event_idx=self.event_idx, indirect=self.indirect,
        )

    # -- raw (possibly hostile) operations ---------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        self.mem.write(self.desc_addr + 16 * index, _DESC.pack(addr, length, flags, next))

    def claim(self, *indices: int) -> None:
        """Take descriptors off the free list for a hand-written chain."""
        for i in indices:
            self._free.remove(i)
        if indices:
            self._chains[indices[0]] = list(indices)

    def publish(self, head: int) -> None:
        """Put ``head`` in the next avail slot and bump the avail index."""
        slot = self.next_avail % self.size
        self.mem.write_u16(self.avail_addr + 4 + 2 * slot, head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        self.mem.write_u16(self.avail_addr + 2, self.next_avail)

    def kick_wanted(self) -> bool:
        """Whether a driver that honours the device's suppression notifies now, for the chains
        published since the last decision (as Linux's ``virtqueue_kick_prepare`` decides).

        With EVENT_IDX: only if the avail index stepped past the device's ``avail_event``
        on the way (§2.7.10); without: unless the device set VIRTQ_USED_F_NO_NOTIFY (§2.7.7).
        """
        old, new = self._decided, self.next_avail
        self._decided = new
        if self.event_idx:
            return (new - self.avail_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self.mem.read_u16(self.used_addr) & VIRTQ_USED_F_NO_NOTIFY

    def set_avail_idx(self, idx: int) -> None:
        self.next_avail = idx & 0xFFFF
        self.mem.write_u16(self.avail_addr + 2, self.next_avail)

    def set_no_interrupt(self, on: bool) -> None:
        self.mem.write_u16(self.avail_addr, VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail_addr + 4 + 2 * self.size, value)

    @property
    def avail_event(self) -> int:
        return self.mem.read_u16(self.used_addr + 4 + 8 * self.size)

    @property
    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_addr + 2)

    # -- the well-behaved driver -------------------------------------------

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    def add_chain(
        self,
        bufs: Sequence[tuple[int, int, int]],
        *,
        indirect: bool = False,
        table_addr: int | None = None,
    ) -> int:
        """Offer a chain of ``(addr, len, flags)`` buffers; returns its head index.

        Only ``WRITE`` matters in ``flags``; NEXT is set here. With
        ``indirect`` the buffers go in a table at ``table_addr`` referenced by
        one descriptor.
        """
        if indirect:
            if table_addr is None:
                raise ValueError("an indirect chain needs table_addr")
            for i, (addr, length, flags) in enumerate(bufs):
                more = NEXT if i + 1 < len(bufs) else 0
                self.mem.write(table_addr + 16 * i, _DESC.pack(addr, length, flags | more, i + 1))
            head = self._free.pop()
            self.write_desc(head, table_addr, 16 * len(bufs), INDIRECT)
            self._chains[head] = [head]
        else:
            if len(bufs) > len(self._free):
                raise ValueError("not enough free descriptors")
            idxs = [self._free.pop() for _ in bufs]
            for i, (addr, length, flags) in enumerate(bufs):
                more = NEXT if i + 1 < len(bufs) else 0
                nxt = idxs[i + 1] if more else 0
                self.write_desc(idxs[i], addr, length, flags | more, nxt)
            head = idxs[0]
            self._chains[head] = idxs
        self.publish(head)
        return head

    def used(self) -> list[tuple[int, int]]:
        """Used elements returned since the last call, as ``(head, written_len)``."""
        out = []
        idx = self.used_idx
        while self.last_used != idx:
            slot = self.last_used % self.size
            head, length = self.mem.unpack_from(_USED_ELEM, self.used_addr + 4 + 8 * slot)
            out.append((head, length))
            self._free.extend(reversed(self._chains.pop(head, [])))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def pending(self) -> int:
        """Used elements not yet collected by :meth:`used`."""
        return (self.used_idx - self.last_used) & 0xFFFF


class FakeDriver:
    """Guest RAM, a bump allocator and one :class:`DriverQueue` per device queue.

    :param device: the device under test.
    :param mem_size: bytes of fake guest RAM.
    :param queue_size: size of every queue (capped by the device's maximum).
    :param event_idx: negotiate VIRTIO_RING_F_EVENT_IDX.
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        mem_size: int = 4 << 20,
        queue_size: int = 64,
        event_idx: bool = False,
        mem: GuestMemory | None = None,
    ) -> None:
        self.device = device
        self.mem = mem if mem is not None else make_memory(mem_size)
        self._next = self.mem.regions[0].start + 0x1000
        self.queues: list[DriverQueue] = []
        for i in range(device.num_queues):
            size = min(queue_size, device.max_queue_size(i))
            base = self.alloc(DriverQueue.ring_bytes(size), 4096)
            self.queues.append(DriverQueue.at(self.mem, base, size, event_idx=event_idx))
        self.interrupts = [FakeInterrupt() for _ in self.queues]
        wanted = device.device_features()
        if not event_idx:
            wanted &= ~(1 << VIRTIO_F_EVENT_IDX)
        self.features = wanted
        self.indirect = bool(wanted >> VIRTIO_F_INDIRECT_DESC & 1)
        for q in self.queues:
            q.indirect = self.indirect

    def alloc(self, size: int, align: int = 16) -> int:
        """Carve ``size`` bytes of guest RAM (never freed)."""
        addr = (self._next + align - 1) & ~(align - 1)
        self._next = addr + size
        if not self.mem.check(addr, size):
            raise MemoryError("fake guest memory exhausted")
        return addr

    def activate(self) -> list[Virtqueue]:
        """Negotiate features and start the device, as a transport does on DRIVER_OK."""
        self.device.ack_features(self.features)
        vqs = [q.virtqueue() for q in self.queues]
        self.device.activate(self.mem, vqs, self.interrupts)
        return vqs

    def kick(self, index: int = 0) -> None:
        self.device.queue_notify(index)

    def kick_if_wanted(self, index: int = 0) -> bool:
        """Notify queue ``index`` only if the device asked for it (:meth:`DriverQueue.kick_wanted`),
        as a real driver does; returns whether it did. :meth:`kick` notifies regardless."""
        if not self.queues[index].kick_wanted():
            return False
        self.device.queue_notify(index)
        return True

    async def wait_used(self, index: int, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until queue ``index`` has at least ``count`` uncollected used elements."""
        q = self.queues[index]
        deadline = asyncio.get_running_loop().time() + timeout
        while q.pending() < count:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"queue {index}: {q.pending()} of {count} used elements")
            await asyncio.sleep(0.001)
