"""A small virtio device for transport tests: it upper-cases what it is given.

Each chain's device-readable bytes come back upper-cased in its writable
buffers. With ``delay`` set, requests complete later on the loop, so tests can
have requests in flight when the front end stops a ring or disappears.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from appliance.kvm.memory import GuestMemory
from appliance.virtio.device import Interrupt, VirtioDevice
from appliance.virtio.errors import QueueError
from appliance.virtio.queue import DescriptorChain, Virtqueue


class UpperDevice(VirtioDevice):
    device_id = 0x7F

    def __init__(self, num_queues: int = 2, delay: float = 0.0) -> None:
        super().__init__()
        self.queue_sizes = (256,) * num_queues
        self.delay = delay
        self.config = bytearray(b"UPPERCFG")
        self.queues: Sequence[Virtqueue] = ()
        self.irqs: Sequence[Interrupt] = ()
        self.requests = [0] * num_queues
        self.activations = 0
        self.resets = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def config_bytes(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data

    def activate(self, mem: GuestMemory, queues: Sequence[Virtqueue], interrupts: Sequence[Interrupt]) -> None:
        self.queues, self.irqs = queues, interrupts
        self.activations += 1

    def queue_notify(self, index: int) -> None:
        q = self.queues[index]
        while True:
            try:
                chain = q.pop()
            except QueueError as err:
                self.fail(str(err))
                return
            if chain is None:
                return
            self.requests[index] += 1
            if self.delay:
                t = asyncio.get_running_loop().create_task(self._later(q, index, chain))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
            else:
                self._complete(q, index, chain)

    async def _later(self, q: Virtqueue, index: int, chain: DescriptorChain) -> None:
        await asyncio.sleep(self.delay)
        self._complete(q, index, chain)

    def _complete(self, q: Virtqueue, index: int, chain: DescriptorChain) -> None:
        data = b"".join(bytes(v) for v in chain.readable).upper()
        n = 0
        for v in chain.writable:
            k = min(len(v), len(data) - n)
            v[:k] = data[n : n + k]
            n += k
        q.push_used(chain.head, n)
        if q.needs_notification():
            self.irqs[index].notify()

    async def quiesce(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def reset(self) -> None:
        super().reset()
        self.resets += 1
        self.queues, self.irqs = (), ()


class MiniBlk(VirtioDevice):
    """A tiny in-memory virtio-blk (IN, OUT, FLUSH, GET_ID; virtio 1.2 §5.2).

    Only for checking the transport against QEMU's vhost-user-blk before (or
    independently of) the real device in :mod:`appliance.storage.blk`.
    """

    device_id = 2

    def __init__(self, disk: bytearray, num_queues: int = 1) -> None:
        super().__init__()
        self.disk = disk
        self.queue_sizes = (256,) * num_queues
        self.queues: Sequence[Virtqueue] = ()
        self.irqs: Sequence[Interrupt] = ()
        self.requests = [0] * num_queues

    def device_features(self) -> int:
        # FLUSH (9), BLK_SIZE (6), SEG_MAX (2), MQ (12)
        return super().device_features() | 1 << 9 | 1 << 6 | 1 << 2 | 1 << 12

    def config_bytes(self) -> bytes:
        import struct

        return struct.pack(
            "<QIIHBBIBBHIBBH",
            len(self.disk) // 512, 0, 126, 0, 0, 0, 512, 0, 0, 0, 0, 1, 0, len(self.queue_sizes),
        )

    def activate(self, mem: GuestMemory, queues: Sequence[Virtqueue], interrupts: Sequence[Interrupt]) -> None:
        self.queues, self.irqs = queues, interrupts

    def queue_notify(self, index: int) -> None:
        import struct

        q = self.queues[index]
        while True:
            try:
                chain = q.pop()
            except QueueError as err:
                self.fail(str(err))
                return
            if chain is None:
                # EVENT_IDX: re-arm kicks, then look once more (§2.7.10).
                if q.enable_notification():
                    continue
                break
            self.requests[index] += 1
            hdr = b"".join(bytes(v) for v in chain.readable)
            kind, _, sector = struct.unpack_from("<IIQ", hdr)
            status, written = 0, 0
            wviews = list(chain.writable)
            off = sector * 512
            if kind == 0:  # IN
                for v in wviews[:-1]:
                    v[:] = self.disk[off : off + len(v)]
                    off += len(v)
                    written += len(v)
            elif kind == 1:  # OUT
                data = hdr[16:]
                self.disk[off : off + len(data)] = data
            elif kind == 8:  # GET_ID
                v = wviews[0]
                ident = b"miniblk".ljust(len(v), b"\0")
                v[:] = ident[: len(v)]
                written += len(v)
            elif kind != 4:
                status = 2
            wviews[-1][:1] = bytes([status])
            q.push_used(chain.head, written + 1)
        if q.needs_notification():
            self.irqs[index].notify()
