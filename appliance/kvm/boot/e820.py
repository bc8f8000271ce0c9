"""The BIOS-style memory map we hand to guests (e820 and PVH memmap alike).

Both boot protocols carry the same table: Linux reads it from
``boot_params.e820_table`` and prints it as ``BIOS-e820:`` lines; PVH guests read
it from ``hvm_start_info.memmap_paddr`` (its entries use e820 type numbers).
The first MiB follows the PC convention: RAM up to the EBDA, then reserved up to
1 MiB (the EBDA, the legacy video hole and the BIOS area, where our ACPI tables
live, so the guest keeps its hands off them).
"""

from __future__ import annotations

from appliance.kvm import layout

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """The guest memory map for ``mem_size`` bytes of RAM as ``(addr, size, type)``.

    RAM below the EBDA, reserved 0x9FC00-0x100000, RAM from 1 MiB up to the
    32-bit MMIO hole, and the rest above 4 GiB (:func:`layout.ram_ranges`).
    """
    entries: list[tuple[int, int, int]] = []
    for start, size in layout.ram_ranges(mem_size):
        if start == 0:
            entries.append((0, min(size, layout.EBDA_START), E820_RAM))
            entries.append(
                (layout.EBDA_START, layout.HIMEM_START - layout.EBDA_START, E820_RESERVED)
            )
            if size > layout.HIMEM_START:
                entries.append((layout.HIMEM_START, size - layout.HIMEM_START, E820_RAM))
        else:
            entries.append((start, size, E820_RAM))
    return [e for e in entries if e[1] > 0]


_LINUX_TYPE_NAMES = {E820_RAM: "usable", E820_RESERVED: "reserved", E820_ACPI: "ACPI data",
                     E820_NVS: "ACPI NVS"}


def linux_e820_lines(mem_size: int) -> list[str]:
    """The ``BIOS-e820:`` lines Linux prints for our map (``e820__print_table``).

    E.g. ``BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable``; a
    test that boots Linux compares the console against these.
    """
    return [
        f"BIOS-e820: [mem {addr:#018x}-{addr + size - 1:#018x}] {_LINUX_TYPE_NAMES[kind]}"
        for addr, size, kind in e820_map(mem_size)
    ]
