"""The batched ring walk virtio-net uses (``Virtqueue.pop_buffers`` / ``push_used_heads``).

The short path checks a lone descriptor against the region cached from the
previous buffer; these tests hand it the descriptors a hostile driver would:
straddling a region's end, in a hole between regions, wrapping the address
space, of the wrong direction, and rings that lie about their indices.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.kvm.memory import GuestMemory, MemoryRegion
from appliance.net.memory import MemoryLink
from appliance.nic import constants as C
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.errors import QueueError
from appliance.virtio.queue import Virtqueue
from appliance.virtio.testing import INDIRECT, NEXT, WRITE, DriverQueue, FakeDriver, make_memory

RAM = 1 << 20


def two_region_memory() -> GuestMemory:
    """1 MiB at 0 and 1 MiB at 2 MiB, with a 1 MiB hole between."""
    return GuestMemory([MemoryRegion(0, bytearray(RAM)), MemoryRegion(2 * RAM, bytearray(RAM))])


def queue(mem: GuestMemory, size: int = 16) -> tuple[DriverQueue, Virtqueue]:
    dq = DriverQueue.at(mem, 0x1000, size)
    return dq, dq.virtqueue()


def test_lone_descriptors_come_back_as_views_of_guest_ram() -> None:
    mem = make_memory(RAM)
    mem.write(0x8000, b"frame-one")
    dq, vq = queue(mem)
    h1 = dq.add_chain([(0x8000, 9, 0)])
    h2 = dq.add_chain([(0x9000, 100, 0)])
    got = vq.pop_buffers(16, False)
    assert [(h, n) for h, _, n in got] == [(h1, 9), (h2, 100)]
    assert bytes(got[0][1][0]) == b"frame-one"
    vq.push_used_heads([h1, h2])
    assert dq.used() == [(h1, 0), (h2, 0)]


def test_descriptor_straddling_the_region_end_is_returned_unused() -> None:
    mem = make_memory(RAM)
    dq, vq = queue(mem)
    good = dq.add_chain([(0x8000, 64, 0)])  # caches the region
    bad = dq.add_chain([(RAM - 10, 20, 0)])
    got = vq.pop_buffers(16, False)
    assert [h for h, _, _ in got] == [good]
    assert vq.invalid_chains == 1
    assert dq.used() == [(bad, 0)]


def test_descriptor_in_a_hole_between_regions_is_returned_unused() -> None:
    mem = two_region_memory()
    dq, vq = queue(mem)
    dq.add_chain([(0x8000, 64, 0)])
    bad = dq.add_chain([(RAM + 0x100, 64, 0)])
    ok2 = dq.add_chain([(2 * RAM + 0x100, 64, 0)])  # the other region: walked, then cached
    got = vq.pop_buffers(16, False)
    assert [h for h, _, _ in got][1:] == [ok2]
    assert vq.invalid_chains == 1
    assert dq.used() == [(bad, 0)]


def test_descriptor_wrapping_the_address_space_is_returned_unused() -> None:
    mem = make_memory(RAM)
    dq, vq = queue(mem)
    dq.add_chain([(0x8000, 64, 0)])
    bad = dq.add_chain([(2**64 - 8, 0xFFFF, 0)])
    assert len(vq.pop_buffers(16, False)) == 1
    assert dq.used() == [(bad, 0)]


def test_chain_of_the_other_direction_yields_no_buffers() -> None:
    mem = make_memory(RAM)
    dq, vq = queue(mem)
    h = dq.add_chain([(0x8000, 64, WRITE)])
    assert vq.pop_buffers(16, False) == [(h, [], 0)]
    h2 = dq.add_chain([(0x8000, 64, 0), (0x9000, 32, WRITE)])
    ((head, views, n),) = vq.pop_buffers(16, True)
    assert (head, n, [len(v) for v in views]) == (h2, 32, [32])


def test_limit_leaves_the_rest_on_the_ring() -> None:
    mem = make_memory(RAM)
    dq, vq = queue(mem)
    heads = [dq.add_chain([(0x8000 + 0x100 * i, 64, 0)]) for i in range(5)]
    assert [h for h, _, _ in vq.pop_buffers(2, False)] == heads[:2]
    assert [h for h, _, _ in vq.pop_buffers(16, False)] == heads[2:]
    assert vq.pop_buffers(16, False) == []


def test_avail_index_too_far_ahead_breaks_the_queue() -> None:
    mem = make_memory(RAM)
    dq, vq = queue(mem, size=8)
    dq.set_avail_idx(9)
    with pytest.raises(QueueError):
        vq.pop_buffers(16, False)
    assert vq.broken
    assert vq.pop_buffers(16, False) == []


def test_head_index_out_of_range_breaks_the_queue() -> None:
    mem = make_memory(RAM)
    dq, vq = queue(mem, size=8)
    dq.claim(0)
    mem.write_u16(dq.avail_addr + 4, 200)  # ring[0] names descriptor 200
    dq.set_avail_idx(1)
    with pytest.raises(QueueError):
        vq.pop_buffers(16, False)
    assert vq.broken


def test_tx_batch_larger_than_a_ring_pass_sends_every_frame_in_order() -> None:
    """200 frames through a 64-entry ring in four kicks go out in order, one used element each."""
    link = MemoryLink(vnet_hdr_len=C.HDR_LEN)
    dev = VirtioNet([link], bytes.fromhex("525400123456"))
    drv = FakeDriver(dev, queue_size=64, mem_size=4 << 20)
    drv.activate()
    txq = drv.queues[1]
    buf = drv.alloc(64 * 80)
    sent = 0
    while sent < 200:
        for i in range(min(64, 200 - sent)):
            frame = bytes(C.HDR_LEN) + (sent + i).to_bytes(4, "big") + bytes(56)
            drv.mem.write(buf + 80 * i, frame)
            txq.add_chain([(buf + 80 * i, len(frame), 0)])
        drv.kick(1)
        got = txq.used()
        assert all(n == 0 for _, n in got)
        sent += len(got)
    assert [int.from_bytes(f[C.HDR_LEN : C.HDR_LEN + 4], "big") for f in link.sent] == list(range(200))
    assert dev.stats[0].tx_frames == 200


# -- pop_buffers against pop: the same answer on any (hostile) ring ---------------

QSIZE = 8
_addrs = st.one_of(
    st.sampled_from([0, 0x8000, RAM - 64, RAM - 1, RAM, RAM + 0x100, 2 * RAM - 8, 3 * RAM, 2**64 - 8]),
    st.integers(0, 3 * RAM),
)
_descs = st.lists(
    st.tuples(_addrs, st.sampled_from([0, 1, 12, 64, 1514, 0x10000, 2**32 - 1]),
              st.sampled_from([0, WRITE, NEXT, NEXT | WRITE, INDIRECT, INDIRECT | NEXT, 7]),
              st.integers(0, QSIZE + 2)),
    min_size=QSIZE, max_size=QSIZE,
)


def _ring(descs: list[tuple[int, int, int, int]], heads: list[int], avail: int) -> tuple[DriverQueue, Virtqueue]:
    mem = two_region_memory()
    pattern = random.Random(7).randbytes(RAM)
    mem.write(0, pattern)
    mem.write(2 * RAM, pattern[::-1])
    dq = DriverQueue.at(mem, 0x1000, QSIZE)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        dq.write_desc(i, addr, length, flags, nxt)
    # An indirect table some descriptors may point at: a readable and a writable buffer.
    mem.write(0x9000, struct.pack("<QIHHQIHH", 0x8000, 64, NEXT, 1, 0x8100, 64, WRITE, 0))
    for slot, head in enumerate(heads):
        mem.write_u16(dq.avail_addr + 4 + 2 * slot, head)
    dq.set_avail_idx(avail)
    return dq, dq.virtqueue()


def _via_pop(vq: Virtqueue, writable: bool, limit: int) -> tuple[list[tuple[int, list[bytes], int]], str]:
    out: list[tuple[int, list[memoryview], int]] = []
    try:
        for _ in range(limit):
            chain = vq.pop()
            if chain is None:
                break
            views, n = (chain.writable, chain.writable_len) if writable else (chain.readable, chain.readable_len)
            out.append((chain.head, list(views), n))
    except QueueError:
        return [], "broken"
    # Contents are read once the walk is over, as _via_pop_buffers does: a buffer may
    # overlap the used ring, which the walk writes when it hands back invalid chains.
    return [(h, [bytes(v) for v in views], n) for h, views, n in out], ""


def _via_pop_buffers(vq: Virtqueue, writable: bool, limit: int) -> tuple[list[tuple[int, list[bytes], int]], str]:
    try:
        got = vq.pop_buffers(limit, writable)
    except QueueError:
        return [], "broken"
    return [(h, [bytes(v) for v in views], n) for h, views, n in got], ""


@settings(max_examples=150, deadline=None)
@given(_descs, st.lists(st.integers(0, QSIZE + 3), min_size=QSIZE, max_size=QSIZE),
       st.integers(0, 2 * QSIZE), st.booleans(), st.integers(1, QSIZE + 2), st.booleans())
def test_pop_buffers_answers_as_pop_does(
    descs: list[tuple[int, int, int, int]], heads: list[int], avail: int, writable: bool, limit: int, warm: bool
) -> None:
    """Random descriptor tables (loops, holes, straddles, indirect, wrong directions) and
    avail rings: the batched walk returns the same chains, buffers and used elements as
    pop(), or breaks the queue where pop() does. ``warm`` caches a region first."""
    if warm:
        # A valid first descriptor so the short path has a cached region to check against.
        descs = [(0x8000, 64, WRITE if writable else 0, 0)] + descs[1:]
    dq_a, vq_a = _ring(descs, heads, avail)
    dq_b, vq_b = _ring(descs, heads, avail)
    want, broken_a = _via_pop(vq_a, writable, limit)
    got, broken_b = _via_pop_buffers(vq_b, writable, limit)
    assert broken_b == broken_a
    if broken_a:
        return
    assert got == want
    assert vq_b.invalid_chains == vq_a.invalid_chains
    assert dq_b.used() == dq_a.used()
    assert vq_b.last_avail_idx == vq_a.last_avail_idx


def test_pop_buffers_answers_as_pop_does_when_a_buffer_overlaps_the_used_ring() -> None:
    """The fuzzer's case: a 64 KiB buffer at 0 covers the rings, and the invalid chain after
    it is handed back through the used ring, changing that buffer's bytes mid-walk."""
    descs = [(0, 0x10000, 0, 0), (3 * RAM, 64, 0, 0)] + [(0x8000, 64, 0, 0)] * (QSIZE - 2)
    heads = [0, 1] + [2] * (QSIZE - 2)
    test_pop_buffers_answers_as_pop_does.hypothesis.inner_test(  # type: ignore[attr-defined]
        descs, heads, 2, False, QSIZE, False
    )
