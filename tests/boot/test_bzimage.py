"""Loading a bzImage by the 64-bit boot protocol (Documentation/arch/x86/boot.rst).

Offsets in these tests are written out as boot.rst and zero-page.rst list them,
independently of the loader's own constants.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.kvm import layout
from appliance.kvm.boot import BootError, e820_map, load_kernel
from appliance.kvm.memory import GuestMemory
from tests.boot import images

MiB = 1 << 20
BP = layout.BOOT_PARAMS_ADDR
RSDP = 0xE0000


def _u8(mem: GuestMemory, off: int) -> int:
    return mem.read(BP + off, 1)[0]


def _u16(mem: GuestMemory, off: int) -> int:
    return mem.read_u16(BP + off)


def _u32(mem: GuestMemory, off: int) -> int:
    return mem.read_u32(BP + off)


def _u64(mem: GuestMemory, off: int) -> int:
    return mem.read_u64(BP + off)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _load(mem: GuestMemory, kernel: Path, *, initrd: Path | None = None, cmdline: str = "console=ttyS0"):
    return load_kernel(mem, kernel, initrd=initrd, cmdline=cmdline, num_cpus=2, rsdp_addr=RSDP)


def test_protected_mode_kernel_loads_at_pref_address_and_enters_at_plus_0x200(
    tmp_path: Path, mem: GuestMemory
) -> None:
    image = images.bzimage(pref_address=0x1000000)
    plan = _load(mem, _write(tmp_path, "bzImage", image))
    setup_size = (4 + 1) * 512
    assert mem.read(0x1000000, len(image) - setup_size) == image[setup_size:]
    assert plan.kind == "linux64"
    assert plan.rip == 0x1000200
    assert plan.rsi == BP
    # "__BOOT_CS(0x10) and __BOOT_DS(0x18)", 4G flat, CS execute/read, DS read/write.
    assert plan.cs.selector == 0x10 and plan.cs.l == 1 and plan.cs.type & 0x8
    assert plan.ds.selector == 0x18 and plan.ds.type & 0x2 and not plan.ds.type & 0x8
    assert plan.cr0 & (1 << 31) and plan.cr0 & 1          # paging and protection on
    assert plan.efer & (1 << 10) and plan.cr4 & (1 << 5)  # long mode active, PAE
    assert plan.rflags & (1 << 9) == 0                    # interrupts disabled


def test_boot_params_fields_sit_at_their_documented_offsets(tmp_path: Path, mem: GuestMemory) -> None:
    image = images.bzimage(initrd_addr_max=0x37FFFFFF, kernel_alignment=0x200000, init_size=0x500000)
    initrd = _write(tmp_path, "initrd", b"\x5a" * 10000)
    _load(mem, _write(tmp_path, "bzImage", image), initrd=initrd, cmdline="console=ttyS0 quiet")

    # The setup header is copied from the image (0x1F1 up to 0x202 + jump offset).
    assert _u16(mem, 0x1FE) == 0xAA55                     # boot_flag
    assert mem.read(BP + 0x202, 4) == b"HdrS"             # header
    assert _u16(mem, 0x206) == 0x020F                     # version
    assert _u32(mem, 0x22C) == 0x37FFFFFF                 # initrd_addr_max
    assert _u32(mem, 0x230) == 0x200000                   # kernel_alignment
    assert _u16(mem, 0x236) == 0x0003                     # xloadflags
    assert _u64(mem, 0x258) == 0x1000000                  # pref_address
    assert _u32(mem, 0x260) == 0x500000                   # init_size
    # Fields the boot loader writes.
    assert _u8(mem, 0x210) == 0xFF                        # type_of_loader: undefined
    assert _u8(mem, 0x211) & 0x01                         # loadflags: LOADED_HIGH
    assert _u16(mem, 0x1FA) == 0xFFFF                     # vid_mode: normal
    assert _u32(mem, 0x228) == layout.CMDLINE_ADDR        # cmd_line_ptr
    assert _u32(mem, 0x0C8) == 0                          # ext_cmd_line_ptr
    assert mem.read(layout.CMDLINE_ADDR, 20) == b"console=ttyS0 quiet\0"
    ramdisk_image, ramdisk_size = _u32(mem, 0x218), _u32(mem, 0x21C)
    assert ramdisk_size == 10000 and _u32(mem, 0x0C4) == 0
    assert mem.read(ramdisk_image, 10000) == b"\x5a" * 10000
    assert _u64(mem, 0x070) == RSDP                       # acpi_rsdp_addr (2.14)
    assert _u8(mem, 0x1EF) == 0                           # sentinel


def test_boot_params_e820_table_matches_the_map(tmp_path: Path, mem: GuestMemory) -> None:
    _load(mem, _write(tmp_path, "bzImage", images.bzimage()))
    expected = e820_map(256 * MiB)
    assert _u8(mem, 0x1E8) == len(expected)               # e820_entries
    table = [struct.unpack_from("<QQI", mem.read(BP + 0x2D0 + 20 * i, 20)) for i in range(len(expected))]
    assert table == expected


def test_relocatable_kernel_moves_down_when_pref_address_does_not_fit(
    tmp_path: Path, make_memory: Callable[[int], GuestMemory]
) -> None:
    mem = make_memory(18 * MiB)
    image = images.bzimage(pref_address=0x1000000, init_size=4 * MiB, kernel_alignment=0x200000)
    plan = _load(mem, _write(tmp_path, "bzImage", image))
    assert plan.rip == 0x200000 + 0x200


def test_fixed_kernel_that_does_not_fit_is_refused(
    tmp_path: Path, make_memory: Callable[[int], GuestMemory]
) -> None:
    mem = make_memory(18 * MiB)
    image = images.bzimage(relocatable=False, init_size=4 * MiB)
    with pytest.raises(BootError, match="kernel needs 4 MiB"):
        _load(mem, _write(tmp_path, "bzImage", image))


def test_initrd_goes_page_aligned_below_initrd_addr_max(
    tmp_path: Path, make_memory: Callable[[int], GuestMemory]
) -> None:
    mem = make_memory(1024 * MiB)
    image = images.bzimage(initrd_addr_max=0x37FFFFFF)
    initrd = _write(tmp_path, "initrd", b"\x01" * 12345)
    _load(mem, _write(tmp_path, "bzImage", image), initrd=initrd)
    addr, size = _u32(mem, 0x218), _u32(mem, 0x21C)
    assert addr % 4096 == 0
    assert addr + size - 1 <= 0x37FFFFFF
    assert addr == (0x38000000 - size) & ~0xFFF           # as high as allowed


def test_initrd_goes_below_the_top_of_low_ram(tmp_path: Path, mem: GuestMemory) -> None:
    initrd = _write(tmp_path, "initrd", b"\x01" * 5000)
    _load(mem, _write(tmp_path, "bzImage", images.bzimage()), initrd=initrd)
    addr, size = _u32(mem, 0x218), _u32(mem, 0x21C)
    assert size == 5000
    assert addr == (256 * MiB - 5000) & ~0xFFF
    assert addr >= 0x1000000 + 0x400000                   # above load + init_size


def test_initrd_larger_than_ram_is_refused(tmp_path: Path, mem: GuestMemory) -> None:
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as f:
        f.truncate(300 * MiB)                              # sparse: nothing is read
    with pytest.raises(BootError, match="larger than guest RAM"):
        _load(mem, _write(tmp_path, "bzImage", images.bzimage()), initrd=initrd)


def test_initrd_without_room_above_the_kernel_is_refused(
    tmp_path: Path, make_memory: Callable[[int], GuestMemory]
) -> None:
    mem = make_memory(32 * MiB)
    image = images.bzimage(pref_address=0x1000000, init_size=8 * MiB)
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as f:
        f.truncate(10 * MiB)
    with pytest.raises(BootError, match="no room for initrd"):
        _load(mem, _write(tmp_path, "bzImage", image), initrd=initrd)


def test_command_line_longer_than_cmdline_size_is_refused(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = _write(tmp_path, "bzImage", images.bzimage(cmdline_size=16))
    _load(mem, kernel, cmdline="x" * 16)
    with pytest.raises(BootError, match="command line is 17 bytes"):
        _load(mem, kernel, cmdline="x" * 17)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"version": 0x020B}, "older than 2.12"),
        ({"xloadflags": 0x02}, "no 64-bit entry"),
        ({"boot_flag": 0x1234}, "boot_flag"),
        ({"loadflags": 0x00}, "not loaded high"),
        ({"kernel_alignment": 0x300000}, "not a power of two"),
    ],
)
def test_setup_header_checks(tmp_path: Path, mem: GuestMemory, fields: dict[str, int], message: str) -> None:
    with pytest.raises(BootError, match=message):
        _load(mem, _write(tmp_path, "bzImage", images.bzimage(**fields)))  # type: ignore[arg-type]
