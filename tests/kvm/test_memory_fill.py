"""Zeroing large ranges of anonymous guest RAM drops pages instead of writing them."""

from __future__ import annotations

import mmap

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.kvm.memory import GuestMemory, MemoryRegion

SIZE = 4 << 20


@settings(max_examples=50, deadline=None)
@given(st.integers(0, SIZE - 1), st.integers(0, SIZE), st.sampled_from([0, 0x5A]))
def test_fill_is_exact_at_any_offset_and_size(start: int, size: int, byte: int) -> None:
    size = min(size, SIZE - start)
    mem = GuestMemory.anonymous([(0x1000_0000, SIZE)])
    try:
        mem.fill(0x1000_0000, SIZE, 0xEE)
        mem.fill(0x1000_0000 + start, size, byte)
        data = mem.read(0x1000_0000, SIZE)
        assert data[:start] == b"\xee" * start
        assert data[start : start + size] == bytes([byte]) * size
        assert data[start + size :] == b"\xee" * (SIZE - start - size)
    finally:
        mem.close()


def test_shared_mappings_are_written_not_dropped() -> None:
    buf = mmap.mmap(-1, SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    mem = GuestMemory([MemoryRegion(0, buf)])
    mem.fill(0, SIZE, 0x11)
    mem.fill(0, SIZE, 0)
    assert mem.read(0, SIZE) == bytes(SIZE)
    mem.close()
