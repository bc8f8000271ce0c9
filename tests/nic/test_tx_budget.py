"""Found by fuzzing: a guest that refills its transmit ring as fast as the device drains it (its
other vCPUs at work) kept one pass going for 200 000 frames, and the event loop with it: every
other device, NIC and monitor waited. A pass now takes PASS_BUDGET chains, lets the loop's other
work run, and goes on from a callback of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from appliance.net.memory import MemoryLink
from appliance.nic.virtio_net import TX_BATCH, VirtioNet
from appliance.virtio.queue import PASS_BUDGET
from appliance.virtio.testing import FakeDriver

MAC = bytes.fromhex("525400123456")


async def test_a_guest_refilling_its_transmit_ring_does_not_hold_the_loop() -> None:
    link = MemoryLink()
    dev = VirtioNet([link], MAC)
    drv = FakeDriver(dev, queue_size=256)
    drv.activate()
    txq = drv.queues[1]
    txq.write_desc(0, drv.alloc(64), 64)  # one 64-byte frame, offered again and again
    for _ in range(256):
        txq.publish(0)
    sends = 0
    real_send = link.send

    def send(bufs: Sequence[memoryview]) -> bool:  # the guest's other vCPU offers the next frame
        nonlocal sends
        sends += 1
        if sends < 20_000:
            txq.publish(0)
        return real_send(bufs)

    link.send = send  # type: ignore[method-assign]
    turns: list[int] = []
    asyncio.get_running_loop().call_soon(lambda: turns.append(sends))  # the rest of the VMM
    drv.kick(1)
    assert PASS_BUDGET <= sends <= PASS_BUDGET + TX_BATCH
    for _ in range(100):
        await asyncio.sleep(0)
    assert turns and turns[0] <= PASS_BUDGET + TX_BATCH  # it ran between two passes
    assert sends == 20_000 + 255  # and every frame offered went out in the passes after
    assert not dev.needs_reset
