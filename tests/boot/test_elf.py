"""ELF kernels: PVH entry through the Xen note, and Linux vmlinux through its 64-bit entry."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.kvm import layout
from appliance.kvm.boot import BootError, e820_map, load_kernel
from appliance.kvm.boot.elf import parse_elf
from appliance.kvm.memory import GuestMemory
from tests.boot import images

MiB = 1 << 20
RSDP = 0xE0000
# struct hvm_start_info (Xen include/public/arch-x86/hvm/start_info.h), version 1.
START_INFO = struct.Struct("<IIIIQQQQII")


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _load(mem: GuestMemory, kernel: Path, **kw: object):
    args: dict[str, object] = {"initrd": None, "cmdline": "console=ttyS0", "num_cpus": 1, "rsdp_addr": RSDP}
    args.update(kw)
    return load_kernel(mem, kernel, **args)  # type: ignore[arg-type]


# --- PVH --------------------------------------------------------------------


@pytest.mark.parametrize("desc_size", [4, 8])
@pytest.mark.parametrize("is64", [False, True])
def test_pvh_note_selects_32bit_entry_with_start_info_in_rbx(
    tmp_path: Path, mem: GuestMemory, desc_size: int, is64: bool
) -> None:
    kernel = _write(tmp_path, "guest.elf", images.pvh_elf(entry=0x100002, desc_size=desc_size, is64=is64))
    plan = _load(mem, kernel)
    assert plan.kind == "pvh"
    assert plan.rip == 0x100002
    assert plan.rbx == layout.PVH_START_INFO_ADDR
    # pvh.pandoc: cr0 PE set, paging off; cr4 clear; 32-bit flat code and data; TSS limit 0x67.
    assert plan.cr0 & 1 and not plan.cr0 & (1 << 31)
    assert plan.cr4 == 0 and plan.efer == 0
    assert plan.cs.db == 1 and plan.cs.l == 0 and plan.cs.base == 0 and plan.cs.limit == 0xFFFFFFFF
    assert plan.cs.type & 0xA == 0xA                          # execute/read
    assert plan.ds.db == 1 and plan.ds.type & 0xA == 0x2      # read/write data
    assert plan.tr.type == 0xB and plan.tr.s == 0 and plan.tr.limit == 0x67 and plan.tr.base == 0
    assert plan.rflags & ((1 << 9) | (1 << 8) | (1 << 17)) == 0   # IF, TF, VM clear


def test_pvh_segments_are_copied_and_bss_zeroed(tmp_path: Path, mem: GuestMemory) -> None:
    mem.fill(0x100000, 0x3000, 0xAA)
    _load(mem, _write(tmp_path, "guest.elf", images.pvh_elf(bss=0x1000)))
    assert mem.read(0x100000, 4) == images.GUEST_CODE
    assert mem.read(0x100004, 0x1000) == bytes(0x1000)
    assert mem.read(0x100004 + 0x1000, 1) == b"\xaa"


def test_pvh_start_info_layout(tmp_path: Path, mem: GuestMemory) -> None:
    initrd = _write(tmp_path, "initrd", b"\x42" * 3000)
    plan = _load(mem, _write(tmp_path, "guest.elf", images.pvh_elf()), initrd=initrd, cmdline="hello")
    (magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, memmap_entries, reserved) = (
        START_INFO.unpack(mem.read(plan.rbx, START_INFO.size))
    )
    assert START_INFO.size == 56
    assert (magic, version, flags, reserved) == (0x336EC578, 1, 0, 0)
    assert rsdp == RSDP
    assert mem.read(cmdline, 6) == b"hello\0"
    assert nr_modules == 1
    paddr, size, mod_cmdline, mod_reserved = struct.unpack("<QQQQ", mem.read(modlist, 32))
    assert size == 3000 and mem.read(paddr, 3000) == b"\x42" * 3000
    assert paddr % 4096 == 0 and mod_cmdline == 0 and mod_reserved == 0
    # hvm_memmap_table_entry: addr, size, type (e820 numbering), reserved.
    table = [struct.unpack("<QQII", mem.read(memmap + 24 * i, 24)) for i in range(memmap_entries)]
    assert [(a, s, t) for a, s, t, _ in table] == e820_map(256 * MiB)
    assert all(r == 0 for *_, r in table)


def test_pvh_without_initrd_has_no_modules(tmp_path: Path, mem: GuestMemory) -> None:
    plan = _load(mem, _write(tmp_path, "guest.elf", images.pvh_elf()))
    _, _, _, nr_modules, modlist, *_ = START_INFO.unpack(mem.read(plan.rbx, START_INFO.size))
    assert (nr_modules, modlist) == (0, 0)


def test_forcing_pvh_on_a_kernel_without_the_note_is_refused(tmp_path: Path, mem: GuestMemory) -> None:
    with pytest.raises(BootError, match="no PVH entry note"):
        _load(mem, _write(tmp_path, "vmlinux", images.vmlinux_elf()), protocol="pvh")


def test_32bit_elf_without_pvh_note_is_refused(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = images.elf([images.Load(0x100000, b"\x90" * 16)], 0x100000, is64=False)
    with pytest.raises(BootError, match="32-bit ELF without a PVH entry note"):
        _load(mem, _write(tmp_path, "k.elf", kernel))


def test_segment_below_1mib_is_refused(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = images.elf([images.Load(0xE0000, b"\x90" * 16)], 0xE0000)
    with pytest.raises(BootError, match="does not fit in guest RAM above 1 MiB"):
        _load(mem, _write(tmp_path, "k.elf", kernel))


def test_segment_beyond_ram_is_refused(tmp_path: Path, make_memory: Callable[[int], GuestMemory]) -> None:
    mem = make_memory(16 * MiB)
    with pytest.raises(BootError, match="does not fit"):
        _load(mem, _write(tmp_path, "vmlinux", images.vmlinux_elf(paddr=16 * MiB)))


# --- vmlinux ----------------------------------------------------------------


def test_vmlinux_loads_at_physical_addresses_and_enters_in_long_mode(
    tmp_path: Path, mem: GuestMemory
) -> None:
    mem.fill(0x1000000, 0x4000, 0xAA)
    image = images.vmlinux_elf(paddr=0x1000000, bss=0x1000)
    plan = _load(mem, _write(tmp_path, "vmlinux", image))
    text = images.GUEST_CODE * 64
    assert mem.read(0x1000000, len(text)) == text
    assert mem.read(0x1000000 + len(text), 0x1000) == bytes(0x1000)
    assert plan.kind == "linux64" and plan.rip == 0x1000000 and plan.rsi == layout.BOOT_PARAMS_ADDR
    assert plan.cs.selector == 0x10 and plan.ds.selector == 0x18


def test_vmlinux_virtual_entry_is_translated_to_physical(tmp_path: Path, mem: GuestMemory) -> None:
    image = images.vmlinux_elf(paddr=0x1000000, entry=images.KERNEL_VIRT + 0x40)
    assert _load(mem, _write(tmp_path, "vmlinux", image)).rip == 0x1000040


def test_vmlinux_gets_a_synthesized_setup_header(tmp_path: Path, mem: GuestMemory) -> None:
    initrd = _write(tmp_path, "initrd", b"\x07" * 4096)
    _load(mem, _write(tmp_path, "vmlinux", images.vmlinux_elf()), initrd=initrd, cmdline="earlyprintk=serial")
    bp = layout.BOOT_PARAMS_ADDR
    assert mem.read_u16(bp + 0x1FE) == 0xAA55
    assert mem.read(bp + 0x202, 4) == b"HdrS"
    assert mem.read(bp + 0x210, 1) == b"\xff"
    assert mem.read_u32(bp + 0x228) == layout.CMDLINE_ADDR
    assert mem.read(layout.CMDLINE_ADDR, 19) == b"earlyprintk=serial\0"
    ramdisk, size = mem.read_u32(bp + 0x218), mem.read_u32(bp + 0x21C)
    assert size == 4096 and mem.read(ramdisk, 4096) == b"\x07" * 4096
    assert ramdisk + size - 1 <= mem.read_u32(bp + 0x22C)
    assert mem.read_u64(bp + 0x070) == RSDP
    assert mem.read(bp + 0x1E8, 1)[0] == len(e820_map(256 * MiB))


def test_vmlinux_command_line_is_limited_to_command_line_size(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = _write(tmp_path, "vmlinux", images.vmlinux_elf())
    _load(mem, kernel, cmdline="a" * 2047)
    with pytest.raises(BootError, match="command line"):
        _load(mem, kernel, cmdline="a" * 2048)


def test_pvh_capable_vmlinux_can_be_forced_through_the_64bit_entry(tmp_path: Path, mem: GuestMemory) -> None:
    image = images.elf(
        [images.Load(0x1000000, b"\x90" * 64, vaddr=images.KERNEL_VIRT)],
        0x1000000,
        notes=images.note(b"Xen\0", images.XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", 0x1000020)),
    )
    kernel = _write(tmp_path, "vmlinux", image)
    assert _load(mem, kernel).kind == "pvh"
    assert _load(mem, kernel).rip == 0x1000020
    plan = _load(mem, kernel, protocol="linux")
    assert plan.kind == "linux64" and plan.rip == 0x1000000


def test_parser_reads_notes_after_other_notes() -> None:
    image = parse_elf(images.pvh_elf(entry=0x100000))
    assert image.pvh_entry == 0x100000 and not image.is64
