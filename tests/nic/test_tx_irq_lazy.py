"""The transmit interrupt for a few small frames (ACKs, SYNs, FINs) waits TX_IRQ_LAZY,
not TX_IRQ_DELAY; a larger frame, or more than TX_LAZY_FRAMES small ones, brings it
back to TX_IRQ_DELAY. TX_IRQ_LAZY is stretched to 30 s here, so an interrupt seen
within a second came by the short delay and none seen means the lazy one."""

from __future__ import annotations

import asyncio

import pytest

from appliance.net.memory import MemoryLink
from appliance.nic import constants as C
from appliance.nic import virtio_net
from appliance.nic.virtio_net import TX_LAZY_FRAMES, TX_SMALL_FRAME, VirtioNet
from appliance.virtio.testing import FakeDriver
from tests.nic.test_virtio_net import MAC, OTHER, eth, hdr, post_rx, send_tx

# 66 bytes: a pure TCP ACK's size (IPv4, protocol 6), and a UDP datagram of the same size.
SMALL = hdr() + eth(OTHER, bytes(9) + b"\x06" + b"a" * 30)
SMALL_UDP = hdr() + eth(OTHER, bytes(9) + b"\x11" + b"a" * 30)
LARGE = hdr() + eth(OTHER, b"d" * 1000)
WELL_PAST_DELAY = 0.2


@pytest.fixture(autouse=True)
def long_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(virtio_net, "TX_IRQ_LAZY", 30.0)


def make() -> tuple[VirtioNet, FakeDriver, MemoryLink]:
    link = MemoryLink(vnet_hdr_len=C.HDR_LEN)
    dev = VirtioNet([link], MAC)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20, event_idx=True)
    drv.activate()
    drv.queues[1].set_used_event(0)  # wants to hear of every completion
    return dev, drv, link


def test_the_frames_sizes_are_on_the_right_side_of_the_limit() -> None:
    assert len(SMALL) <= TX_SMALL_FRAME < len(LARGE)


async def test_a_small_frame_waits_for_the_lazy_delay() -> None:
    dev, drv, link = make()
    send_tx(drv, 1, SMALL)
    drv.kick(1)
    assert len(link.sent) == 1
    await asyncio.sleep(WELL_PAST_DELAY)
    assert drv.interrupts[1].count == 0
    dev.reset()


async def test_a_small_tcp_segment_over_ipv6_waits_for_the_lazy_delay_too() -> None:
    dev, drv, link = make()
    send_tx(drv, 1, hdr() + OTHER + MAC + b"\x86\xdd" + bytes(6) + b"\x06" + b"a" * 40)
    drv.kick(1)
    await asyncio.sleep(WELL_PAST_DELAY)
    assert len(link.sent) == 1 and drv.interrupts[1].count == 0
    dev.reset()


async def test_a_small_udp_datagram_is_signalled_after_the_short_delay() -> None:
    """Nothing may answer a UDP sender, and Linux 6.10 and later stop a virtio_net queue
    (byte queue limits) until they reap its completions: the lazy wait would hold the
    sender's next datagram for all of it."""
    dev, drv, link = make()
    send_tx(drv, 1, SMALL_UDP)
    drv.kick(1)
    await drv.interrupts[1].wait(1.0)
    assert drv.interrupts[1].count == 1


async def test_a_large_frame_is_signalled_after_the_short_delay() -> None:
    dev, drv, link = make()
    send_tx(drv, 1, LARGE)
    drv.kick(1)
    await drv.interrupts[1].wait(1.0)
    assert drv.interrupts[1].count == 1


async def test_a_large_frame_after_small_ones_cuts_the_lazy_wait_short() -> None:
    dev, drv, link = make()
    send_tx(drv, 1, SMALL)
    drv.kick(1)
    send_tx(drv, 1, LARGE)
    drv.kick(1)
    await drv.interrupts[1].wait(1.0)
    assert drv.interrupts[1].count == 1 and len(link.sent) == 2


async def test_many_small_frames_are_signalled_after_the_short_delay() -> None:
    dev, drv, link = make()
    for _ in range(TX_LAZY_FRAMES + 1):
        send_tx(drv, 1, SMALL)
    drv.kick(1)
    await drv.interrupts[1].wait(1.0)
    assert drv.interrupts[1].count == 1


async def test_the_count_of_small_frames_starts_again_after_an_interrupt() -> None:
    """Small frames signalled by a receive interrupt do not count toward the next lazy wait."""
    dev, drv, link = make()
    post_rx(drv, 0, 2048, count=4)
    drv.kick(0)
    drv.queues[0].set_used_event(0)
    for _ in range(TX_LAZY_FRAMES):
        send_tx(drv, 1, SMALL)
    drv.kick(1)
    link.inject(hdr(num_buffers=1) + eth(MAC))
    await drv.interrupts[0].wait(1.0)
    assert drv.interrupts[1].count == 1  # taken along
    drv.queues[1].set_used_event(drv.queues[1].used_idx)
    send_tx(drv, 1, SMALL)
    drv.kick(1)
    await asyncio.sleep(WELL_PAST_DELAY)
    assert drv.interrupts[1].count == 1
    dev.reset()
