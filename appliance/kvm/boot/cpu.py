"""The x86 state a loader sets up before the first instruction: GDT, page tables, registers.

One GDT serves both entry protocols, so its selectors mean the same thing
whichever kernel boots:

====== ================================ ===========================================
sel    descriptor                       used by
====== ================================ ===========================================
0x08   32-bit flat code (exec/read)     PVH entry (``cs``)
0x10   64-bit code                      Linux 64-bit entry: ``__BOOT_CS`` is 0x10
0x18   flat data (read/write)           both: ``__BOOT_DS`` is 0x18 (ds/es/ss)
0x20   busy TSS, base 0, limit 0x67     both (``tr``); 16 bytes, as long mode wants
====== ================================ ===========================================

The page tables identity-map the first 4 GiB with 2 MiB pages: enough for the
Linux 64-bit protocol (kernel, boot_params and command line must be identity
mapped) and needing no 1 GiB-page CPUID bit, which a PVM host may not pass on.
Everything is written through :class:`GuestMemory`.

References: Linux ``Documentation/arch/x86/boot.rst`` ("64-bit Boot Protocol");
Xen ``docs/misc/pvh.pandoc`` (the PVH entry state); Intel SDM vol. 3 §3.4.5
(segment descriptors) and §4.5 (4-level paging).
"""

from __future__ import annotations

import struct

from appliance.kvm import layout
from appliance.kvm.boot.plan import BootPlan, Segment
from appliance.kvm.memory import GuestMemory

SEL_CODE32 = 0x08
SEL_CODE64 = 0x10
SEL_DATA = 0x18
SEL_TSS = 0x20
GDT_ENTRIES = 6                   # null, code32, code64, data, TSS (two slots)
GDT_LIMIT = GDT_ENTRIES * 8 - 1

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1          # bit 1 always reads as 1; IF, TF, VM clear

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_LARGE = 1 << 7                # PS: a 2 MiB page in a page-directory entry
PAGE_2M = 2 << 20
IDENTITY_MAP_END = 4 << 30

CODE32 = Segment(selector=SEL_CODE32, type=0xB, db=1)
CODE64 = Segment(selector=SEL_CODE64, type=0xB, l=1)
DATA = Segment(selector=SEL_DATA, type=0x3, db=1)
# An active ("busy") TSS: VMX entry checks demand a usable busy TSS in TR, and
# the PVH spec asks for a 32-bit one with base 0 and limit 0x67.
TSS = Segment(selector=SEL_TSS, type=0xB, s=0, limit=0x67, g=0)


def descriptor(seg: Segment) -> int:
    """The 8-byte GDT descriptor whose hidden part equals ``seg`` (SDM vol. 3 §3.4.5)."""
    limit = seg.limit >> 12 if seg.g else seg.limit
    if limit > 0xFFFFF:
        raise ValueError(f"segment limit {seg.limit:#x} does not fit a descriptor")
    access = seg.type | (seg.s << 4) | (seg.dpl << 5) | (seg.present << 7)
    flags = seg.avl | (seg.l << 1) | (seg.db << 2) | (seg.g << 3)
    return (
        (limit & 0xFFFF)
        | (seg.base & 0xFFFFFF) << 16
        | access << 40
        | (limit >> 16) << 48
        | flags << 52
        | (seg.base >> 24 & 0xFF) << 56
    )


def write_gdt(mem: GuestMemory) -> None:
    """Write the boot GDT at :data:`layout.GDT_ADDR`."""
    entries = [0, descriptor(CODE32), descriptor(CODE64), descriptor(DATA), descriptor(TSS), 0]
    mem.write(layout.GDT_ADDR, struct.pack(f"<{GDT_ENTRIES}Q", *entries))


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Identity-map 0-4 GiB with 2 MiB pages; returns the CR3 value (the PML4 address)."""
    mem.fill(layout.PML4_ADDR, layout.PAGE_TABLES_END - layout.PML4_ADDR)
    mem.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | PTE_PRESENT | PTE_WRITE)
    n_pd = IDENTITY_MAP_END >> 30
    for i in range(n_pd):
        pd = layout.PD_ADDR + i * 0x1000
        mem.write_u64(layout.PDPT_ADDR + i * 8, pd | PTE_PRESENT | PTE_WRITE)
        base = i << 30
        mem.write(
            pd,
            struct.pack(
                "<512Q",
                *(base + j * PAGE_2M | PTE_PRESENT | PTE_WRITE | PTE_LARGE for j in range(512)),
            ),
        )
    return layout.PML4_ADDR


def pvh_plan(entry: int, start_info: int, description: str) -> BootPlan:
    """Entry state for a PVH kernel: 32-bit protected mode, paging off, ``ebx`` = start info."""
    return BootPlan(
        kind="pvh",
        rip=entry,
        rsp=layout.BOOT_STACK_ADDR,
        rsi=0,
        rbx=start_info,
        rflags=RFLAGS_RESERVED,
        cr0=CR0_PE | CR0_ET,
        cr3=0,
        cr4=0,
        efer=0,
        cs=CODE32,
        ds=DATA,
        tr=TSS,
        gdt_base=layout.GDT_ADDR,
        gdt_limit=GDT_LIMIT,
        description=description,
    )


def linux64_plan(entry: int, cr3: int, description: str) -> BootPlan:
    """Entry state for Linux's 64-bit protocol: long mode, ``rsi`` = boot_params."""
    return BootPlan(
        kind="linux64",
        rip=entry,
        rsp=layout.BOOT_STACK_ADDR,
        rsi=layout.BOOT_PARAMS_ADDR,
        rbx=0,
        rflags=RFLAGS_RESERVED,
        cr0=CR0_PE | CR0_ET | CR0_PG,
        cr3=cr3,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA,
        cs=CODE64,
        ds=DATA,
        tr=TSS,
        gdt_base=layout.GDT_ADDR,
        gdt_limit=GDT_LIMIT,
        description=description,
    )
