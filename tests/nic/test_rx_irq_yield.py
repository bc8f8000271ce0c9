"""With yield_after_rx_irq (net-daemon's vhost-user NICs), a receive interrupt is followed
by one sched_yield, so the front end's thread that turns the signal into the guest's
interrupt runs before the rest of the pass when the scheduler queued it on this CPU; a
transmit-only interrupt does not yield, nor does a NIC of our own VM (its vCPUs need the
loop thread's GIL)."""

from __future__ import annotations

import asyncio
import os

import pytest

from appliance.net.memory import MemoryLink
from appliance.nic import constants as C
from appliance.nic.virtio_net import TX_IRQ_DELAY, VirtioNet
from appliance.virtio.testing import FakeDriver
from tests.nic.test_virtio_net import MAC, OTHER, eth, hdr, post_rx, send_tx


def make(yields: bool = True) -> tuple[VirtioNet, FakeDriver, MemoryLink]:
    link = MemoryLink(vnet_hdr_len=C.HDR_LEN)
    dev = VirtioNet([link], MAC, yield_after_rx_irq=yields)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20, event_idx=True)
    drv.activate()
    return dev, drv, link


class Yields:
    """Each sched_yield, as the (receive, transmit) interrupt counts at that moment."""

    def __init__(self, drv: FakeDriver) -> None:
        self.drv = drv
        self.seen: list[tuple[int, int]] = []

    def __call__(self) -> None:
        self.seen.append((self.drv.interrupts[0].count, self.drv.interrupts[1].count))


def make_watched(
    monkeypatch: pytest.MonkeyPatch, yields: bool = True
) -> tuple[VirtioNet, FakeDriver, MemoryLink, Yields]:
    dev, drv, link = make(yields)
    y = Yields(drv)
    monkeypatch.setattr(os, "sched_yield", y)
    return dev, drv, link, y


async def test_a_receive_interrupt_yields_once_after_signalling_both_rings(monkeypatch: pytest.MonkeyPatch) -> None:
    dev, drv, link, y = make_watched(monkeypatch)
    post_rx(drv, 0, 2048, count=4)
    drv.kick(0)  # armed, nothing to read
    drv.queues[0].set_used_event(0)
    drv.queues[1].set_used_event(0)
    send_tx(drv, 1, hdr() + eth(OTHER))
    drv.kick(1)  # its interrupt is deferred (TX_IRQ_DELAY)
    assert y.seen == []
    link.inject(hdr(num_buffers=1) + eth(MAC))
    await drv.interrupts[0].wait(1.0)
    # One yield, after the receive interrupt and the transmit one it took along.
    assert y.seen == [(1, 1)]


async def test_a_transmit_interrupt_alone_does_not_yield(monkeypatch: pytest.MonkeyPatch) -> None:
    dev, drv, link, y = make_watched(monkeypatch)
    drv.queues[1].set_used_event(0)
    send_tx(drv, 1, hdr() + eth(OTHER))
    drv.kick(1)
    await asyncio.sleep(TX_IRQ_DELAY + 0.05)
    assert drv.interrupts[1].count == 1
    assert y.seen == []


async def test_no_yield_when_the_driver_wants_no_interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    dev, drv, link, y = make_watched(monkeypatch)
    post_rx(drv, 0, 2048, count=4)
    drv.kick(0)
    drv.queues[0].set_used_event(100)  # still polling: no interrupt wanted
    link.inject(hdr(num_buffers=1) + eth(MAC))
    await asyncio.sleep(0.05)
    assert dev.stats[0].rx_frames == 1
    assert drv.interrupts[0].count == 0
    assert y.seen == []


async def test_a_nic_of_our_own_vm_does_not_yield(monkeypatch: pytest.MonkeyPatch) -> None:
    dev, drv, link, y = make_watched(monkeypatch, yields=False)
    post_rx(drv, 0, 2048, count=4)
    drv.kick(0)
    drv.queues[0].set_used_event(0)
    link.inject(hdr(num_buffers=1) + eth(MAC))
    await drv.interrupts[0].wait(1.0)
    assert y.seen == []
