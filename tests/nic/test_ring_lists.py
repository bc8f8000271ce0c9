"""The list-filling ring walk the mergeable rx window uses (``Virtqueue.pop_buffers_into``)
and the run-at-a-time used ring write (``Virtqueue.push_used_many``).

``pop_buffers_into`` takes a whole batch of lone descriptors at once, reading
the ring's entries and descriptors with list operations; anything else goes
through ``pop_buffers``. Hostile rings must get the same answer from both:
the same chains and bytes, the same used elements for invalid chains, the
same breakage, and nothing outside guest memory.
"""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.kvm.memory import GuestMemory, MemoryRegion
from appliance.virtio.errors import QueueError
from appliance.virtio.queue import Virtqueue
from appliance.virtio.testing import INDIRECT, NEXT, WRITE, DriverQueue, make_memory

RAM = 1 << 20
QSIZE = 16


def two_region_memory() -> GuestMemory:
    """1 MiB at 0 and 1 MiB at 2 MiB, with a 1 MiB hole between; random contents."""
    mem = GuestMemory([MemoryRegion(0, bytearray(RAM)), MemoryRegion(2 * RAM, bytearray(RAM))])
    pattern = random.Random(11).randbytes(RAM)
    mem.write(0, pattern)
    mem.write(2 * RAM, pattern[::-1])
    return mem


# Descriptors: what Linux posts for mergeable rx (one page-sized writable buffer,
# its next field left as whatever the free list held) in either region, with a
# few replaced by hostile ones of every kind; avail entries likewise.
_good = st.tuples(
    st.integers(0x10, 0xE0).map(lambda p: p << 12),
    st.sampled_from([4096, 4096, 1514, 12, 0]),
    st.sampled_from([WRITE, WRITE, WRITE, WRITE, 0]),
    st.integers(0, 0xFFFF),
)
_hostile = st.tuples(
    st.one_of(
        st.sampled_from([0, 0x8000, RAM - 64, RAM - 1, RAM, RAM + 0x100, 2 * RAM, 3 * RAM - 8, 3 * RAM, 2**64 - 8]),
        st.integers(0, 3 * RAM),
    ),
    st.sampled_from([0, 1, 11, 12, 64, 4096, 0x10000, 2**32 - 1]),
    st.sampled_from([0, WRITE, NEXT, NEXT | WRITE, INDIRECT, INDIRECT | NEXT, 7, 0x8002, 0xFFFF]),
    st.integers(0, QSIZE + 2),
)
_descs = st.tuples(
    st.lists(_good, min_size=QSIZE, max_size=QSIZE),
    st.lists(st.tuples(st.integers(0, QSIZE - 1), _hostile), max_size=3),
    st.booleans(),
).map(
    # The good ones all in the first region or all in the second.
    lambda t: [dict(t[1]).get(i, (d[0] + 2 * RAM * t[2],) + d[1:]) for i, d in enumerate(t[0])]
)
_heads = st.tuples(
    st.permutations(range(QSIZE)),
    st.lists(st.tuples(st.integers(0, QSIZE - 1), st.sampled_from([0, 3, QSIZE - 1, QSIZE, 0xFFFF])), max_size=2),
).map(lambda t: [dict(t[1]).get(i, h) for i, h in enumerate(t[0])])


def _ring(
    descs: list[tuple[int, int, int, int]], heads: list[int], start: int, avail: int
) -> tuple[GuestMemory, DriverQueue, Virtqueue]:
    """A ring whose next entry is ``start`` (free-running) with ``avail`` entries offered."""
    mem = two_region_memory()
    dq = DriverQueue.at(mem, 0x1000, QSIZE)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        dq.write_desc(i, addr, length, flags, nxt)
    # An indirect table some descriptors may point at: a readable and a writable buffer.
    mem.write(0x9000, struct.pack("<QIHHQIHH", 0x8000, 64, NEXT, 1, 0x8100, 64, WRITE, 0))
    for i, head in enumerate(heads):
        mem.write_u16(dq.avail_addr + 4 + 2 * ((start + i) % QSIZE), head)
    mem.write_u16(dq.used_addr + 2, start & 0xFFFF)
    dq.last_used = start & 0xFFFF
    dq.set_avail_idx(start + avail)
    return mem, dq, dq.virtqueue()


def _inside(mem: GuestMemory, v: memoryview) -> bool:
    return any(v.obj is r.buf for r in mem.regions)


Chains = list[tuple[int, list[bytes], int]]


def _offer(dq: DriverQueue, more: int) -> None:
    """The driver offers ``more`` entries (whatever their ring slots hold)."""
    dq.set_avail_idx(dq.next_avail + more)


def _walk_pop_buffers(
    dq: DriverQueue, vq: Virtqueue, writable: bool, calls: list[tuple[int, int]]
) -> tuple[list[Chains], str]:
    out: list[list[tuple[int, list[memoryview], int]]] = []
    try:
        for limit, more in calls:
            _offer(dq, more)
            out.append(vq.pop_buffers(limit, writable))
    except QueueError:
        return [], "broken"
    return [[(h, [bytes(v) for v in views], n) for h, views, n in got] for got in out], ""


def _rest(vq: Virtqueue) -> list[tuple[int, bytes, bytes]] | str:
    out = []
    try:
        while (chain := vq.pop()) is not None:
            out.append((chain.head, b"".join(chain.readable), b"".join(chain.writable)))
    except QueueError:
        return "broken"
    return out


def _walk_into(
    mem: GuestMemory, dq: DriverQueue, vq: Virtqueue, writable: bool, calls: list[tuple[int, int]]
) -> tuple[list[Chains], str]:
    heads: list[int] = [-1]  # the lists are appended to, never replaced
    sizes: list[int] = [-1]
    views: list[memoryview] = [memoryview(b"x")]
    nviews: list[int] = [1]
    counts: list[int] = []
    try:
        for limit, more in calls:
            _offer(dq, more)
            counts.append(vq.pop_buffers_into(limit, writable, heads, sizes, views, nviews))
    except QueueError:
        return [], "broken"
    assert (heads[0], sizes[0], nviews[0], bytes(views[0])) == (-1, -1, 1, b"x")
    assert len(heads) == len(sizes) == len(nviews) == 1 + sum(counts)
    assert len(views) == sum(nviews)
    assert all(_inside(mem, v) for v in views[1:])
    out: list[Chains] = []
    at, vat = 1, 1
    for count in counts:
        chains: Chains = []
        for h, n, nv in zip(heads[at : at + count], sizes[at : at + count], nviews[at : at + count], strict=True):
            bufs = views[vat : vat + nv]
            assert sum(len(v) for v in bufs) == n
            chains.append((h, [bytes(v) for v in bufs], n))
            vat += nv
        at += count
        out.append(chains)
    return out, ""


@settings(max_examples=200, deadline=None)
@given(
    _descs, _heads, st.integers(0, 0xFFFF), st.integers(0, QSIZE + 3), st.booleans(),
    st.lists(st.tuples(st.integers(0, QSIZE + 2), st.sampled_from([0, 0, 1, 5])), min_size=1, max_size=4),
    st.sampled_from([None, 0x8000, 2 * RAM + 0x8000]),
)
def test_pop_buffers_into_answers_as_pop_buffers_does(
    descs: list[tuple[int, int, int, int]],
    heads: list[int],
    start: int,
    avail: int,
    writable: bool,
    calls: list[tuple[int, int]],
    warm: int | None,
) -> None:
    """Random descriptor tables and avail rings, starting anywhere in the 16-bit index
    space (so the ring and the index wrap), taken over several calls (with the driver
    offering more between them, ``calls`` being (limit, more) pairs): the same chains,
    bytes, used elements, counters and breakage as pop_buffers. ``warm`` makes the
    first offered chain a good one in the region it names, so the batch path has
    that region cached from the first call on."""
    if not writable:
        # The same rings for the other direction: good chains are device-readable.
        descs = [(a, n, f ^ WRITE, nxt) for a, n, f, nxt in descs]
    if warm is not None:
        descs = [(warm, 64, WRITE if writable else 0, 0)] + descs[1:]
        heads = [0] + heads[1:]
    _, dq_a, vq_a = _ring(descs, heads, start, avail)
    mem_b, dq_b, vq_b = _ring(descs, heads, start, avail)
    want, broken_a = _walk_pop_buffers(dq_a, vq_a, writable, calls)
    got, broken_b = _walk_into(mem_b, dq_b, vq_b, writable, calls)
    assert broken_b == broken_a
    assert vq_b.broken == vq_a.broken
    if broken_a:
        return
    assert got == want
    assert vq_b.invalid_chains == vq_a.invalid_chains
    assert dq_b.used() == dq_a.used()
    assert vq_b.last_avail_idx == vq_a.last_avail_idx
    # pop() after either walk sees the same rest of the ring (the walks leave
    # the avail index they read behind for it).
    assert _rest(vq_b) == _rest(vq_a)


def test_a_batch_of_lone_page_buffers_is_taken_whole_across_the_ring_end() -> None:
    """What Linux posts for mergeable rx: the batch path, wrapping the ring and the index."""
    start = 0xFFFF - 3
    descs = [((0x10 + i) << 12, 4096, WRITE, 0) for i in range(QSIZE)]
    heads = [(5 * i + 1) % QSIZE for i in range(QSIZE)]
    mem, dq, vq = _ring(descs, heads, start, QSIZE)
    # The first call walks (no region cached yet), the rest take whole batches.
    got, _ = _walk_into(mem, dq, vq, True, [(1, 0), (10, 0), (QSIZE, 0)])
    assert [[h for h, _, _ in call] for call in got] == [heads[:1], heads[1:11], heads[11:]]
    assert all(n == 4096 for call in got for _, _, n in call)
    assert vq.last_avail_idx == (start + QSIZE) & 0xFFFF
    assert vq.invalid_chains == 0 and dq.used() == []


def test_one_bad_descriptor_in_a_batch_is_handed_back_as_pop_buffers_does() -> None:
    descs = [((0x10 + i) << 12, 4096, WRITE, 0) for i in range(QSIZE)]
    descs[7] = (RAM - 100, 4096, WRITE, 0)  # straddles the end of the first region
    heads = list(range(QSIZE))
    test_pop_buffers_into_answers_as_pop_buffers_does.hypothesis.inner_test(  # type: ignore[attr-defined]
        descs, heads, 0xFFF0, QSIZE, True, [(1, 0), (QSIZE, 0)], None
    )


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 0xFFFF),
    st.lists(st.tuples(st.integers(0, QSIZE - 1), st.integers(0, 2**32 - 1)), max_size=2 * QSIZE + 3),
)
def test_push_used_many_writes_what_push_used_writes(start: int, elems: list[tuple[int, int]]) -> None:
    """Any start in the index space and any run length (over the ring's end, longer than
    the ring): the used ring holds what one push_used per element leaves."""
    rings = []
    for many in (False, True):
        mem = make_memory(RAM)
        dq = DriverQueue.at(mem, 0x1000, QSIZE)
        mem.write_u16(dq.used_addr + 2, start)
        vq = dq.virtqueue()
        if many:
            vq.push_used_many([h for h, _ in elems], [n for _, n in elems])
        else:
            for h, n in elems:
                vq.push_used(h, n)
        assert vq.needs_notification() == bool(elems)
        rings.append((mem.read(dq.used_addr, 4 + 8 * QSIZE), vq.used_idx))
    assert rings[0] == rings[1]
    assert rings[1][1] == (start + len(elems)) & 0xFFFF
