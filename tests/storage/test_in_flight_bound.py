"""Found by fuzzing: a guest that offers a head again while it is still in flight.

Each offer passed the avail-index check (never more than the ring size ahead of what the device
had taken), so with a slow disk every one became a request under way: 3200 of them on a ring of
16. Offered chains are now counted with those in flight; more than the ring holds breaks it,
and the device waits for a reset, as QEMU's "Virtqueue size exceeded".
"""

from __future__ import annotations

import asyncio

from appliance.storage.blk import VirtioBlk
from appliance.storage.blk_request import VIRTIO_BLK_T_IN
from appliance.virtio.testing import WRITE, FakeDriver, make_memory
from tests.storage.backends import MemoryBackend
from tests.storage.rig import blk_header

QSIZE = 16


class SlowDisk(MemoryBackend):
    """A disk whose reads wait until told (a busy host, a network filesystem)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.go = asyncio.Event()

    async def readv(self, offset: int, bufs: list[memoryview]) -> int:
        await self.go.wait()
        return await super().readv(offset, bufs)


async def test_heads_offered_again_in_flight_break_the_ring_not_the_heap() -> None:
    disk = SlowDisk(64 * 1024)
    dev = VirtioBlk(disk, queue_size=QSIZE, serial="x")
    drv = FakeDriver(dev, mem=make_memory(512 * 1024), queue_size=QSIZE)
    drv.activate()
    q = drv.queues[0]
    hdr, data, status = drv.alloc(16), drv.alloc(512), drv.alloc(1)
    drv.mem.write(hdr, blk_header(VIRTIO_BLK_T_IN, 0))
    head = q.add_chain([(hdr, 16, 0), (data, 512, WRITE), (status, 1, WRITE)])
    try:
        for _ in range(QSIZE - 1):  # a full ring of one (reused) head: each taken, none done
            q.publish(head)
        drv.kick(0)
        await asyncio.sleep(0)
        assert dev.in_flight == QSIZE and not dev.needs_reset
        for _ in range(200):
            for _ in range(QSIZE):
                q.publish(head)
            drv.kick(0)
            await asyncio.sleep(0)
        assert dev.in_flight == QSIZE
        assert dev.needs_reset
    finally:
        disk.go.set()
        await dev.quiesce()
