"""Mergeable receive as Linux drives it under bulk TCP: 64 KiB GSO frames spread over
many ~4 KiB buffers, one used element per buffer, published together (§5.1.6.4.2)."""

from __future__ import annotations

import struct

from appliance.net.memory import MemoryLink
from appliance.nic import constants as C
from appliance.virtio.testing import WRITE, DriverQueue, FakeDriver, make_memory
from tests.nic.test_virtio_net import MAC, eth, hdr, make, post_rx


def test_push_used_many_publishes_every_element_in_order() -> None:
    mem = make_memory(1 << 20)
    dq = DriverQueue.at(mem, 0x1000, 16)
    vq = dq.virtqueue()
    heads = [dq.add_chain([(0x8000 + 0x1000 * i, 4096, WRITE)]) for i in range(5)]
    assert len(vq.pop_buffers(16, True)) == 5
    vq.push_used_many(heads[:3], [4096, 4096, 7])
    assert dq.used() == [(heads[0], 4096), (heads[1], 4096), (heads[2], 7)]
    assert vq.needs_notification()
    vq.push_used_many([], [])
    assert not vq.needs_notification()
    vq.push_used_many(heads[3:], [1, 2])
    assert dq.used() == [(heads[3], 1), (heads[4], 2)]


async def test_gso_frames_fill_runs_of_page_sized_buffers_back_to_back() -> None:
    dev, drv, (link,) = make(vnet=C.HDR_LEN)
    bufs = post_rx(drv, 0, 4096, count=60)
    drv.kick(0)
    frames = [eth(MAC, bytes([i]) * (65000 - 14 * i)) for i in range(3)]
    for f in frames:
        link.inject(hdr(num_buffers=1) + f)
    await drv.wait_used(0, 3)
    used = drv.queues[0].used()
    at = 0
    for f in frames:
        total = C.HDR_LEN + len(f)
        need = -(-total // 4096)
        mine = used[at : at + need]
        assert [h for h, _ in mine] == [h for h, _ in bufs[at : at + need]]
        assert [n for _, n in mine] == [4096] * (need - 1) + [total - 4096 * (need - 1)]
        data = b"".join(drv.mem.read(a, 4096) for _, a in bufs[at : at + need])[:total]
        assert struct.unpack_from("<H", data, 10)[0] == need
        assert data[C.HDR_LEN :] == f
        at += need
    assert len(used) == at
    assert dev.stats[0].rx_frames == 3 and dev.stats[0].rx_dropped == 0


async def test_a_posted_buffer_too_small_for_the_header_is_handed_back_empty() -> None:
    links = [MemoryLink(vnet_hdr_len=C.HDR_LEN)]
    from appliance.nic.virtio_net import VirtioNet

    dev = VirtioNet(links, MAC)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20)
    drv.activate()
    tiny = drv.queues[0].add_chain([(drv.alloc(16), C.HDR_LEN - 2, WRITE)])
    bufs = post_rx(drv, 0, 2048, count=40)
    drv.kick(0)
    frame = eth(MAC, b"z" * 3000)
    links[0].inject(hdr(num_buffers=1) + frame)
    await drv.wait_used(0, 3)
    used = drv.queues[0].used()
    assert used[0] == (tiny, 0)
    assert [h for h, _ in used[1:]] == [bufs[0][0], bufs[1][0]]
    data = b"".join(drv.mem.read(a, 2048) for _, a in bufs[:2])[: C.HDR_LEN + len(frame)]
    assert data[C.HDR_LEN :] == frame
