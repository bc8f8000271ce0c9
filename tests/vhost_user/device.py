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
