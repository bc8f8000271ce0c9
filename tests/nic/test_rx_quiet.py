"""Quiet receive frames: frames the backend says nothing in the guest waits on
(rx_quiet: our ACK of a FIN from a guest in LAST-ACK) go into the receive ring
without an interrupt of their own. The next interrupt takes them along, or the
one RX_QUIET_WAIT later."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from appliance.net.backend import ForwardingBackend
from appliance.net.memory import MemoryLink
from appliance.nic import constants as C
from appliance.nic import virtio_net
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.testing import FakeDriver
from tests.nic.test_virtio_net import MAC, eth, hdr, post_rx

WAIT = 0.05


@pytest.fixture(autouse=True)
def _short_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(virtio_net, "RX_QUIET_WAIT", WAIT)


class QuietRxLink(MemoryLink):
    """A backend whose frames injected with ``quiet=True`` are ones nothing waits on."""

    max_frame = 1514  # as the user-mode stack
    def __init__(self) -> None:
        super().__init__(vnet_hdr_len=C.HDR_LEN)
        self.quiet: set[int] = set()
        self.queued_n = 0  # frames injected
        self.taken = 0  # frames handed over

    def put(self, payload: bytes, *, quiet: bool = False, size: int = 60) -> None:
        self.queued_n += 1
        if quiet:
            self.quiet.add(self.queued_n)
        self.inbound.append(hdr(num_buffers=1) + eth(MAC, payload * size))

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        n = super().recv_into(bufs)
        if n >= 0:
            self.taken += 1
        return n

    def rx_quiet(self, n: int) -> bool:
        return n > 0 and all(i in self.quiet for i in range(self.taken - n + 1, self.taken + 1))


def make(mrg: bool = True) -> tuple[VirtioNet, FakeDriver, QuietRxLink]:
    link = QuietRxLink()
    dev = VirtioNet([link], MAC)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20, event_idx=True)
    if not mrg:
        drv.features &= ~(1 << C.F_MRG_RXBUF)
    drv.activate()
    # Room for the largest frame (64 KiB: the fake driver takes TSO), as Linux posts.
    post_rx(drv, 0, 2048, count=40)
    drv.kick(0)
    # The driver polled the ring dry and asks to hear of the next used element.
    drv.queues[0].set_used_event(0)
    return dev, drv, link


@pytest.mark.parametrize("mrg", [True, False])
async def test_a_quiet_frame_waits_for_the_timer(mrg: bool) -> None:
    dev, drv, link = make(mrg)
    link.put(b"q", quiet=True)
    dev._rx(0)
    assert len(drv.queues[0].used()) == 1
    assert drv.interrupts[0].count == 0
    await drv.interrupts[0].wait(timeout=5 + WAIT)
    assert drv.interrupts[0].count == 1


@pytest.mark.parametrize("mrg", [True, False])
async def test_the_next_frame_takes_a_quiet_one_along(mrg: bool) -> None:
    dev, drv, link = make(mrg)
    link.put(b"q", quiet=True)
    dev._rx(0)
    assert drv.interrupts[0].count == 0
    link.put(b"s")  # the next connection's SYN, say
    dev._rx(0)
    assert len(drv.queues[0].used()) == 2
    assert drv.interrupts[0].count == 1
    assert dev._rx_quiet_timers[0] is None
    await asyncio.sleep(2 * WAIT)
    assert drv.interrupts[0].count == 1


async def test_a_batch_with_a_frame_that_is_not_quiet_is_signalled() -> None:
    dev, drv, link = make()
    link.put(b"a")
    link.put(b"q", quiet=True)
    dev._rx(0)
    assert len(drv.queues[0].used()) == 2
    assert drv.interrupts[0].count == 1


async def test_a_frame_through_the_staging_buffer_is_signalled() -> None:
    # Fewer buffers posted than the largest frame needs: frames go through the staging
    # buffer, which may hold one read in an earlier pass, so the batch is signalled.
    link = QuietRxLink()
    dev = VirtioNet([link], MAC)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20, event_idx=True)
    drv.activate()
    post_rx(drv, 0, 2048, count=2)
    drv.kick(0)
    drv.queues[0].set_used_event(0)
    link.put(b"q", quiet=True)
    dev._rx(0)
    assert len(drv.queues[0].used()) == 1
    assert drv.interrupts[0].count == 1


async def test_a_quiet_frame_read_after_a_dropped_one_does_not_silence_the_batch() -> None:
    # Delivered: a frame the guest waits on; then read and dropped: one larger than any
    # buffer. The last frame read being quiet must not hold back the first's interrupt.
    dev, drv, link = make(mrg=False)
    link.put(b"a")
    link.put(b"b", size=4000)
    link.quiet.add(link.queued_n)
    dev._rx(0)
    assert len(drv.queues[0].used()) == 1
    assert dev.stats[0].rx_dropped == 1
    assert drv.interrupts[0].count == 1


async def test_reset_drops_the_pending_interrupt() -> None:
    dev, drv, link = make()
    link.put(b"q", quiet=True)
    dev._rx(0)
    dev.reset()
    assert dev._rx_quiet_timers[0] is None
    await asyncio.sleep(2 * WAIT)
    assert drv.interrupts[0].count == 0


async def test_quiesce_sends_the_pending_interrupt_now() -> None:
    # A vhost-user front end rebuilding its rings takes every used entry as signalled.
    dev, drv, link = make()
    link.put(b"q", quiet=True)
    dev._rx(0)
    await dev.quiesce()
    assert drv.interrupts[0].count == 1
    assert dev._rx_quiet_timers[0] is None


async def test_a_backend_without_rx_quiet_is_signalled_at_once() -> None:
    link = MemoryLink(vnet_hdr_len=C.HDR_LEN)
    dev = VirtioNet([link], MAC)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20, event_idx=True)
    drv.activate()
    post_rx(drv, 0, 2048, count=8)
    drv.kick(0)
    drv.queues[0].set_used_event(0)
    link.inbound.append(hdr(num_buffers=1) + eth(MAC))
    dev._rx(0)
    assert drv.interrupts[0].count == 1


def test_a_wrapper_asks_its_inner_backend() -> None:
    link = QuietRxLink()
    assert ForwardingBackend(link).rx_quiet == link.rx_quiet
    assert not hasattr(ForwardingBackend(MemoryLink()), "rx_quiet")
