"""The page tables and GDT the loaders build, checked by walking them as the CPU would."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from appliance.kvm import layout
from appliance.kvm.boot import BootPlan, Segment, load_kernel
from appliance.kvm.memory import GuestMemory
from tests.boot import images

GiB = 1 << 30


def walk(mem: GuestMemory, cr3: int, vaddr: int) -> int | None:
    """Translate ``vaddr`` through 4-level paging (SDM vol. 3 §4.5); None when not present."""
    table = cr3 & ~0xFFF
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = mem.read_u64(table + ((vaddr >> shift) & 0x1FF) * 8)
        if not entry & 1:
            return None
        assert entry & 2, "boot mappings are writable"
        frame = entry & 0x000F_FFFF_FFFF_F000
        if level in (1, 2) and entry & 0x80:        # 1 GiB or 2 MiB page
            size = 1 << shift
            return (frame & ~(size - 1)) | (vaddr & (size - 1))
        table = frame
    return table | (vaddr & 0xFFF)


def decode_descriptor(raw: int) -> Segment:
    """The hidden segment state a CPU loads from an 8-byte code/data/TSS descriptor."""
    limit = (raw & 0xFFFF) | ((raw >> 48) & 0xF) << 16
    access, flags = (raw >> 40) & 0xFF, (raw >> 52) & 0xF
    g = flags >> 3 & 1
    return Segment(
        selector=0,
        base=((raw >> 16) & 0xFFFFFF) | ((raw >> 56) & 0xFF) << 24,
        limit=(limit << 12 | 0xFFF) if g else limit,
        type=access & 0xF,
        s=access >> 4 & 1,
        dpl=access >> 5 & 3,
        present=access >> 7,
        avl=flags & 1,
        l=flags >> 1 & 1,
        db=flags >> 2 & 1,
        g=g,
    )


def _linux_plan(tmp_path: Path, mem: GuestMemory) -> BootPlan:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(images.bzimage())
    return load_kernel(mem, kernel, initrd=None, cmdline="", num_cpus=1, rsdp_addr=0)


def _pvh_plan(tmp_path: Path, mem: GuestMemory) -> BootPlan:
    kernel = tmp_path / "guest.elf"
    kernel.write_bytes(images.pvh_elf())
    return load_kernel(mem, kernel, initrd=None, cmdline="", num_cpus=1, rsdp_addr=0)


def test_first_4gib_is_identity_mapped(tmp_path: Path, mem: GuestMemory) -> None:
    plan = _linux_plan(tmp_path, mem)
    assert plan.cr3 == layout.PML4_ADDR
    rng = random.Random(7)
    probes = [0, 0x1000000, 0x1000200, layout.BOOT_PARAMS_ADDR, layout.CMDLINE_ADDR,
              layout.IOAPIC_ADDR, 4 * GiB - 1] + [rng.randrange(4 * GiB) for _ in range(500)]
    for vaddr in probes:
        assert walk(mem, plan.cr3, vaddr) == vaddr, hex(vaddr)


def test_nothing_above_4gib_is_mapped(tmp_path: Path, mem: GuestMemory) -> None:
    plan = _linux_plan(tmp_path, mem)
    for vaddr in (4 * GiB, 5 * GiB + 123, 512 * GiB, 0xFFFF_FFFF_8100_0000):
        assert walk(mem, plan.cr3, vaddr) is None


def test_page_tables_live_below_1mib_clear_of_boot_data() -> None:
    tables = range(layout.PML4_ADDR, layout.PAGE_TABLES_END)
    for addr in (layout.GDT_ADDR, layout.BOOT_PARAMS_ADDR, layout.PVH_START_INFO_ADDR,
                 layout.CMDLINE_ADDR, layout.BOOT_STACK_ADDR):
        assert addr not in tables
    assert layout.PAGE_TABLES_END <= layout.CMDLINE_ADDR


@pytest.mark.parametrize("which", ["linux", "pvh"])
def test_gdt_entries_match_the_segment_registers(tmp_path: Path, mem: GuestMemory, which: str) -> None:
    plan = (_linux_plan if which == "linux" else _pvh_plan)(tmp_path, mem)
    assert plan.gdt_base == layout.GDT_ADDR
    for seg in (plan.cs, plan.ds, plan.tr):
        assert seg.selector + 7 <= plan.gdt_limit
        raw = mem.read_u64(plan.gdt_base + seg.selector)
        decoded = decode_descriptor(raw)
        assert decoded == Segment(
            selector=0, base=seg.base, limit=seg.limit, type=seg.type, s=seg.s, dpl=seg.dpl,
            present=seg.present, avl=seg.avl, l=seg.l, db=seg.db, g=seg.g,
        ), f"selector {seg.selector:#x}"
    assert mem.read_u64(plan.gdt_base) == 0                   # null descriptor


def test_gdt_has_the_linux_boot_selectors(tmp_path: Path, mem: GuestMemory) -> None:
    """boot.rst: __BOOT_CS (0x10) 4G flat execute/read, __BOOT_DS (0x18) 4G flat read/write."""
    _linux_plan(tmp_path, mem)
    cs = decode_descriptor(mem.read_u64(layout.GDT_ADDR + 0x10))
    ds = decode_descriptor(mem.read_u64(layout.GDT_ADDR + 0x18))
    assert (cs.base, cs.limit, cs.type & 0xA, cs.l, cs.present) == (0, 0xFFFFFFFF, 0xA, 1, 1)
    assert (ds.base, ds.limit, ds.type & 0xA, ds.present) == (0, 0xFFFFFFFF, 0x2, 1)
    # The TSS takes two slots in long mode: the upper half must be zero.
    assert mem.read_u64(layout.GDT_ADDR + 0x28) == 0
