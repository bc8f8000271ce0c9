"""A transmit batch is followed by a receive pass: what the host answered while we
wrote (a tap runs the host's stack inside the write) reaches the guest in the same
kick, its used element ahead of the transmit interrupt."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from appliance.net.memory import MemoryLink
from appliance.nic import constants as C
from appliance.nic.virtio_net import TX_IRQ_DELAY, VirtioNet
from appliance.virtio.testing import FakeDriver
from tests.nic.test_virtio_net import MAC, eth, hdr, post_rx, send_tx


class AnsweringLink(MemoryLink):
    """A backend whose host side answers each frame before send() returns, as a tap does."""

    def send(self, bufs: Sequence[memoryview]) -> bool:
        super().send(bufs)
        self.inbound.append(hdr(num_buffers=1) + eth(MAC, b"ack" * 20))
        return True


class Recorder:
    def __init__(self, log: list[int], index: int) -> None:
        self.log, self.index = log, index

    def notify(self) -> None:
        self.log.append(self.index)


def make() -> tuple[VirtioNet, FakeDriver, AnsweringLink, list[int]]:
    link = AnsweringLink(vnet_hdr_len=C.HDR_LEN)
    dev = VirtioNet([link], MAC)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20)
    order: list[int] = []
    drv.interrupts = [Recorder(order, i) for i in range(len(drv.queues))]  # type: ignore[misc]
    drv.activate()
    return dev, drv, link, order


async def test_the_hosts_answer_is_received_in_the_transmit_kick_before_its_interrupt() -> None:
    dev, drv, link, order = make()
    post_rx(drv, 0, 2048, count=8)
    drv.kick(0)  # nothing to read yet: the backend is armed
    assert drv.queues[0].pending() == 0
    send_tx(drv, 1, hdr() + eth(bytes.fromhex("525400000001")))
    drv.kick(1)
    # No loop turn: the answer was read inside the kick.
    assert drv.queues[1].used() != []
    assert len(drv.queues[0].used()) == 1
    assert not link.inbound
    assert dev.stats[0].rx_frames == 1 and dev.stats[0].tx_frames == 1
    assert order == [0, 1]


async def test_without_receive_buffers_the_answer_waits_for_them() -> None:
    dev, drv, link, order = make()
    send_tx(drv, 1, hdr() + eth(bytes.fromhex("525400000001")))
    drv.kick(1)
    assert len(drv.queues[1].used()) == 1
    assert len(link.inbound) == 1 and dev.stats[0].rx_frames == 0
    await asyncio.sleep(TX_IRQ_DELAY + 0.05)  # the transmit interrupt is deferred
    assert order == [1]
    post_rx(drv, 0, 2048, count=4)
    drv.kick(0)
    assert len(drv.queues[0].used()) == 1 and not link.inbound


async def test_an_empty_transmit_kick_does_not_read() -> None:
    dev, drv, link, _ = make()
    post_rx(drv, 0, 2048, count=4)
    drv.kick(0)
    link.inbound.append(hdr(num_buffers=1) + eth(MAC))  # queued, not yet signalled
    drv.kick(1)  # no frames on the tx ring
    assert dev.stats[0].rx_frames == 0 and len(link.inbound) == 1


async def test_a_large_transmit_batch_does_not_read() -> None:
    """A flood's batches skip the receive pass (nobody answers a flood; the failed read is a cost per batch)."""
    from appliance.nic.virtio_net import RX_AFTER_TX

    dev, drv, link, order = make()
    post_rx(drv, 0, 2048, count=4)
    drv.kick(0)
    for _ in range(RX_AFTER_TX + 1):
        send_tx(drv, 1, hdr() + eth(bytes.fromhex("525400000001")))
    drv.kick(1)
    assert len(drv.queues[1].used()) == RX_AFTER_TX + 1
    assert dev.stats[0].rx_frames == 0 and len(link.inbound) == RX_AFTER_TX + 1
    await asyncio.sleep(TX_IRQ_DELAY + 0.05)  # the transmit interrupt is deferred
    assert order == [1]
