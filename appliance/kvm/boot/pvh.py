"""``struct hvm_start_info``: what a PVH kernel finds in ``ebx`` at entry.

Layout from Xen ``include/public/arch-x86/hvm/start_info.h`` (version 1, which
adds the memory map)::

    0x00 u32 magic (0x336ec578)   0x04 u32 version   0x08 u32 flags
    0x0c u32 nr_modules           0x10 u64 modlist_paddr
    0x18 u64 cmdline_paddr        0x20 u64 rsdp_paddr
    0x28 u64 memmap_paddr         0x30 u32 memmap_entries   0x34 u32 reserved

followed here by the memory map (``hvm_memmap_table_entry``: u64 addr, u64 size,
u32 type, u32 reserved) and one module entry for the initrd
(``hvm_modlist_entry``: u64 paddr, u64 size, u64 cmdline_paddr, u64 reserved).
"""

from __future__ import annotations

import struct

from appliance.kvm import layout
from appliance.kvm.memory import GuestMemory

HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
START_INFO = struct.Struct("<IIIIQQQQII")
MEMMAP_ENTRY = struct.Struct("<QQII")
MODLIST_ENTRY = struct.Struct("<QQQQ")
START_INFO_AREA = 0x1000          # the page at PVH_START_INFO_ADDR holds all of it


def write_start_info(
    mem: GuestMemory,
    *,
    e820: list[tuple[int, int, int]],
    cmdline_addr: int,
    initrd: tuple[int, int] | None,
    rsdp_addr: int,
) -> int:
    """Write start info, memory map and module list; returns the start info address."""
    base = layout.PVH_START_INFO_ADDR
    memmap = base + START_INFO.size + (-START_INFO.size % 8)
    modlist = memmap + len(e820) * MEMMAP_ENTRY.size
    if modlist + MODLIST_ENTRY.size > base + START_INFO_AREA:
        raise ValueError("memory map too large for the PVH start info page")
    mem.fill(base, START_INFO_AREA)
    for i, (addr, size, kind) in enumerate(e820):
        mem.write(memmap + i * MEMMAP_ENTRY.size, MEMMAP_ENTRY.pack(addr, size, kind, 0))
    nr_modules = 0
    if initrd is not None:
        mem.write(modlist, MODLIST_ENTRY.pack(initrd[0], initrd[1], 0, 0))
        nr_modules = 1
    mem.write(
        base,
        START_INFO.pack(
            HVM_START_MAGIC,
            HVM_START_VERSION,
            0,
            nr_modules,
            modlist if nr_modules else 0,
            cmdline_addr,
            rsdp_addr,
            memmap,
            len(e820),
            0,
        ),
    )
    return base
