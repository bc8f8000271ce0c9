"""A receive batch signals its first frame as soon as it is in the used ring (if the
driver asks), so a driver that went idle waiting starts on it while the rest are
read; the rest of the batch is signalled at its end, as the driver's used_event says."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from appliance.net.memory import MemoryLink
from appliance.nic import constants as C
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.testing import FakeDriver
from tests.nic.test_virtio_net import MAC, eth, hdr, post_rx


class CountingLink(MemoryLink):
    """Notes, at each read, how many receive interrupts the driver had taken."""

    def __init__(self, irqs: list[int]) -> None:
        super().__init__(vnet_hdr_len=C.HDR_LEN)
        self.irqs = irqs
        self.seen: list[int] = []
        self.drv: FakeDriver | None = None

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        assert self.drv is not None
        self.seen.append(self.drv.interrupts[0].count)
        return super().recv_into(bufs)


def make(event_idx: bool, mrg: bool = True) -> tuple[VirtioNet, FakeDriver, CountingLink]:
    link = CountingLink([])
    dev = VirtioNet([link], MAC)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20, event_idx=event_idx)
    if not mrg:
        drv.features &= ~(1 << C.F_MRG_RXBUF)
    link.drv = drv
    drv.activate()
    return dev, drv, link


@pytest.mark.parametrize("mrg", [True, False])
async def test_an_idle_driver_hears_of_the_first_frame_before_the_second_is_read(mrg: bool) -> None:
    dev, drv, link = make(event_idx=True, mrg=mrg)
    post_rx(drv, 0, 2048, count=8)
    drv.kick(0)  # nothing to read: armed
    # The driver polled the ring dry and asks to hear of the next used element.
    drv.queues[0].set_used_event(0)
    for i in range(3):
        link.inbound.append(hdr(num_buffers=1) + eth(MAC, bytes([i]) * 60))
    link.seen.clear()
    dev._rx(0)
    assert dev.stats[0].rx_frames == 3
    # Reads: frame 1, frame 2, frame 3, the empty one. The interrupt came after the first.
    assert link.seen == [0, 1, 1, 1]
    # used_event 0 was passed once: one interrupt for the whole batch.
    assert drv.interrupts[0].count == 1


async def test_a_driver_still_polling_gets_no_interrupt_mid_batch() -> None:
    dev, drv, link = make(event_idx=True)
    post_rx(drv, 0, 2048, count=8)
    drv.kick(0)
    # used_event far ahead: the driver is still working through what it has.
    drv.queues[0].set_used_event(100)
    for i in range(3):
        link.inbound.append(hdr(num_buffers=1) + eth(MAC, bytes([i]) * 60))
    dev._rx(0)
    assert dev.stats[0].rx_frames == 3
    assert drv.interrupts[0].count == 0


async def test_without_event_idx_the_batch_end_still_signals_what_followed() -> None:
    dev, drv, link = make(event_idx=False)
    post_rx(drv, 0, 2048, count=8)
    drv.kick(0)
    for i in range(3):
        link.inbound.append(hdr(num_buffers=1) + eth(MAC, bytes([i]) * 60))
    link.seen.clear()
    dev._rx(0)
    assert link.seen == [0, 1, 1, 1]
    # The first frame's interrupt, then one for the two after it.
    assert drv.interrupts[0].count == 2
    assert len(drv.queues[0].used()) == 3
