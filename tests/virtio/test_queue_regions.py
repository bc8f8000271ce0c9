"""Buffer bounds checks when guest RAM has several regions (the queue caches the last one hit)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.kvm.memory import GuestMemory, MemoryRegion
from appliance.virtio.testing import WRITE, DriverQueue

# Two regions with a hole between them, and a third touching the second.
LOW = (0, 0x10000)
MID = (0x20000, 0x10000)
HIGH = (0x30000, 0x8000)


def three_regions() -> GuestMemory:
    return GuestMemory(MemoryRegion(start, bytearray(size)) for start, size in (LOW, MID, HIGH))


def in_ram(addr: int, length: int) -> bool:
    # The hole is [0x10000, 0x20000); MID and HIGH touch, so a buffer may span them.
    end = addr + length
    return (0 <= addr and end <= 0x10000) or (0x20000 <= addr and end <= 0x38000)


def test_buffers_alternating_between_regions_see_the_right_bytes() -> None:
    mem = three_regions()
    dq = DriverQueue.at(mem, 0x1000, 16)
    vq = dq.virtqueue()
    mem.write(0x8000, b"low")
    mem.write(0x28000, b"mid")
    mem.write(0x9000, b"again")
    dq.add_chain([(0x8000, 3, 0), (0x28000, 3, 0), (0x9000, 5, 0)])
    chain = vq.pop()
    assert chain is not None
    assert [bytes(v) for v in chain.readable] == [b"low", b"mid", b"again"]


def test_buffer_running_from_the_cached_region_into_the_hole_is_dropped() -> None:
    mem = three_regions()
    dq = DriverQueue.at(mem, 0x1000, 16)
    vq = dq.virtqueue()
    # The first buffer makes LOW the cached region; the second starts in it
    # and runs one byte into the hole.
    dq.add_chain([(0x8000, 16, 0), (0xFFF0, 0x11, WRITE)])
    dq.add_chain([(0xFFF0, 0x10, WRITE)])
    chain = vq.pop()
    assert chain is not None and chain.writable_len == 0x10
    assert vq.invalid_chains == 1
    assert dq.used()[0][1] == 0


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0, 0x8000, 0xFFE0, 0xFFFF, 0x10000, 0x1FFFF, 0x20000, 0x2FFF0, 0x37FE0, 0x38000, 1 << 40]),
            st.integers(0, 0x20),
            st.integers(0, 0x40),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_chain_is_accepted_exactly_when_every_buffer_is_in_ram(bufs: list[tuple[int, int, int]]) -> None:
    mem = three_regions()
    dq = DriverQueue.at(mem, 0x1000, 16)
    vq = dq.virtqueue()
    descs = [(base + delta, length, WRITE) for base, delta, length in bufs]
    dq.add_chain(descs)
    chain = vq.pop()
    ok = all(length == 0 or in_ram(addr, length) for addr, length, _ in descs)
    if ok:
        assert chain is not None
        assert chain.writable_len == sum(length for _, length, _ in descs)
        assert sum(len(v) for v in chain.writable) == chain.writable_len
    else:
        assert chain is None and vq.invalid_chains == 1
