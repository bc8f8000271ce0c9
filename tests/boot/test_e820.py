"""The memory map handed to guests, as Linux's boot protocol and PVH describe it."""

from __future__ import annotations

import pytest

from appliance.kvm import layout
from appliance.kvm.boot import E820_RAM, E820_RESERVED, e820_map, linux_e820_lines

MiB = 1 << 20
GiB = 1 << 30


def test_small_guest_has_low_ram_reserved_bios_area_and_ram_from_1mib() -> None:
    assert e820_map(256 * MiB) == [
        (0, 0x9FC00, E820_RAM),
        (0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
        (0x100000, 255 * MiB, E820_RAM),
    ]


def test_ram_beyond_the_mmio_hole_continues_at_4gib() -> None:
    entries = e820_map(5 * GiB)
    assert entries[2] == (0x100000, layout.MMIO_HOLE_START - 0x100000, E820_RAM)
    assert entries[3] == (4 * GiB, 5 * GiB - layout.MMIO_HOLE_START, E820_RAM)
    assert len(entries) == 4


@pytest.mark.parametrize("size", [2 * MiB, 64 * MiB, 3 * GiB, 3 * GiB + 4096, 16 * GiB])
def test_map_is_sorted_disjoint_and_counts_all_ram(size: int) -> None:
    entries = e820_map(size)
    for (a, s, _), (b, _, _) in zip(entries, entries[1:], strict=False):
        assert a + s <= b
    assert sum(s for _, s, t in entries if t == E820_RAM) == size - (0x100000 - 0x9FC00)
    # Nothing of the map lies in the MMIO hole.
    for a, s, _ in entries:
        assert a + s <= layout.MMIO_HOLE_START or a >= layout.HIGH_RAM_START


def test_acpi_tables_and_boot_structures_are_covered_by_the_map() -> None:
    entries = e820_map(256 * MiB)

    def kind(addr: int) -> int:
        return next(t for a, s, t in entries if a <= addr < a + s)

    assert kind(layout.ACPI_TABLES_ADDR) == E820_RESERVED
    assert kind(layout.ACPI_TABLES_END - 1) == E820_RESERVED
    assert kind(layout.BOOT_PARAMS_ADDR) == E820_RAM


def test_linux_lines_match_what_the_kernel_prints() -> None:
    assert linux_e820_lines(512 * MiB) == [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
    ]
