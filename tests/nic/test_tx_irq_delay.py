"""The transmit interrupt waits TX_IRQ_DELAY and asks the ring again: a driver that
reaped its finished frames meanwhile (and moved used_event past them) is not
interrupted; one that did not is; a receive interrupt takes it along."""

from __future__ import annotations

import asyncio

from appliance.net.memory import MemoryLink
from appliance.nic import constants as C
from appliance.nic.virtio_net import TX_IRQ_DELAY, VirtioNet
from appliance.virtio.testing import FakeDriver
from tests.nic.test_virtio_net import MAC, OTHER, eth, hdr, post_rx, send_tx

PAST_DELAY = TX_IRQ_DELAY + 0.05


def make() -> tuple[VirtioNet, FakeDriver, MemoryLink]:
    link = MemoryLink(vnet_hdr_len=C.HDR_LEN)
    dev = VirtioNet([link], MAC)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20, event_idx=True)
    drv.activate()
    return dev, drv, link


async def test_an_unreaped_transmit_is_signalled_after_the_delay() -> None:
    dev, drv, link = make()
    drv.queues[1].set_used_event(0)  # wants to hear of the next completion
    send_tx(drv, 1, hdr() + eth(OTHER))
    drv.kick(1)
    assert len(link.sent) == 1 and drv.queues[1].used_idx == 1
    assert drv.interrupts[1].count == 0
    await drv.interrupts[1].wait(1.0)
    assert drv.interrupts[1].count == 1


async def test_a_transmit_the_driver_reaped_meanwhile_is_not_signalled() -> None:
    dev, drv, link = make()
    drv.queues[1].set_used_event(0)
    send_tx(drv, 1, hdr() + eth(OTHER))
    drv.kick(1)
    # The driver's next transmit reaps the finished one and asks to hear
    # only of completions after it (Linux's start_xmit does).
    assert drv.queues[1].used() != []
    drv.queues[1].set_used_event(drv.queues[1].used_idx)
    await asyncio.sleep(PAST_DELAY)
    assert drv.interrupts[1].count == 0


async def test_a_receive_interrupt_takes_the_deferred_transmit_one_along() -> None:
    dev, drv, link = make()
    post_rx(drv, 0, 2048, count=4)
    drv.kick(0)  # armed, nothing to read
    drv.queues[0].set_used_event(0)
    drv.queues[1].set_used_event(0)
    send_tx(drv, 1, hdr() + eth(OTHER))
    drv.kick(1)
    assert drv.interrupts[1].count == 0
    link.inject(hdr(num_buffers=1) + eth(MAC))
    await drv.interrupts[0].wait(1.0)
    assert drv.interrupts[0].count == 1 and drv.interrupts[1].count == 1
    await asyncio.sleep(PAST_DELAY)
    assert drv.interrupts[1].count == 1


async def test_a_reset_cancels_a_pending_transmit_interrupt() -> None:
    dev, drv, link = make()
    drv.queues[1].set_used_event(0)
    send_tx(drv, 1, hdr() + eth(OTHER))
    drv.kick(1)
    dev.reset()
    await asyncio.sleep(PAST_DELAY)
    assert drv.interrupts[1].count == 0
