"""Guest memory for the loader tests: anonymous mmaps laid out like a real VM's."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from appliance.kvm import layout
from appliance.kvm.memory import GuestMemory

MiB = 1 << 20


@pytest.fixture
def make_memory() -> Iterator[Callable[[int], GuestMemory]]:
    """Build GuestMemory of a given size (pages are only touched where the loader writes)."""
    made: list[GuestMemory] = []

    def make(size: int) -> GuestMemory:
        mem = GuestMemory.anonymous(layout.ram_ranges(size))
        made.append(mem)
        return mem

    yield make
    for mem in made:
        mem.close()


@pytest.fixture
def mem(make_memory: Callable[[int], GuestMemory]) -> GuestMemory:
    return make_memory(256 * MiB)
