"""``struct boot_params`` (the Linux "zero page") for the 64-bit boot protocol.

Offsets follow ``Documentation/arch/x86/zero-page.rst`` and ``boot.rst``; the
setup header occupies 0x1F1-0x290 of the page, at the same offsets as in the
bzImage file. For a bzImage the header is copied from the file and our fields
are written over it; for an ELF ``vmlinux`` (no header in the file) we write a
minimal one, as Firecracker does.
"""

from __future__ import annotations

import struct

from appliance.kvm import layout
from appliance.kvm.boot import bzimage as hdr
from appliance.kvm.memory import GuestMemory

BOOT_PARAMS_SIZE = 0x1000
ACPI_RSDP_ADDR = 0x070            # u64, protocol 2.14
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8              # u8
SENTINEL = 0x1EF                  # must stay 0, or the kernel wipes "uninitialised" fields
VID_MODE = 0x1FA
E820_TABLE = 0x2D0
E820_ENTRY = struct.Struct("<QQI")  # packed: addr, size, type
E820_MAX_ENTRIES_ZEROPAGE = 128

VID_MODE_NORMAL = 0xFFFF
VMLINUX_PROTOCOL = 0x020F         # what our synthesized header describes (2.15 fields)
VMLINUX_INITRD_ADDR_MAX = 0x7FFFFFFF
VMLINUX_KERNEL_ALIGNMENT = 0x200000
COMMAND_LINE_SIZE = 2048          # Linux x86 COMMAND_LINE_SIZE, NUL included


def synthesized_header(cmdline_size: int) -> bytes:
    """A setup header for a kernel that has none (ELF vmlinux)."""
    buf = bytearray(hdr.SETUP_HEADER_END - hdr.SETUP_HEADER_START)

    def put(fmt: str, off: int, value: int) -> None:
        struct.pack_into(fmt, buf, off - hdr.SETUP_HEADER_START, value)

    put("<H", hdr.BOOT_FLAG, hdr.BOOT_FLAG_MAGIC)
    buf[hdr.HEADER - hdr.SETUP_HEADER_START : hdr.HEADER - hdr.SETUP_HEADER_START + 4] = hdr.HDRS
    put("<H", hdr.VERSION, VMLINUX_PROTOCOL)
    put("<B", hdr.LOADFLAGS, hdr.LOADED_HIGH)
    put("<I", hdr.INITRD_ADDR_MAX, VMLINUX_INITRD_ADDR_MAX)
    put("<I", hdr.KERNEL_ALIGNMENT, VMLINUX_KERNEL_ALIGNMENT)
    put("<H", hdr.XLOADFLAGS, hdr.XLF_KERNEL_64)
    put("<I", hdr.CMDLINE_SIZE, cmdline_size)
    return bytes(buf)


def write_boot_params(
    mem: GuestMemory,
    *,
    header: bytes,
    e820: list[tuple[int, int, int]],
    cmdline_addr: int,
    initrd: tuple[int, int] | None,
    rsdp_addr: int,
    code32_start: int,
) -> None:
    """Fill the zero page at :data:`layout.BOOT_PARAMS_ADDR`.

    :param header: setup header bytes for offset 0x1F1 (from the bzImage, or
        :func:`synthesized_header`).
    :param initrd: ``(address, size)`` of the loaded initrd, or ``None``.
    """
    page = bytearray(BOOT_PARAMS_SIZE)
    page[hdr.SETUP_HEADER_START : hdr.SETUP_HEADER_START + len(header)] = header
    struct.pack_into("<H", page, VID_MODE, VID_MODE_NORMAL)
    page[hdr.TYPE_OF_LOADER] = hdr.LOADER_TYPE_UNDEFINED
    page[hdr.LOADFLAGS] |= hdr.LOADED_HIGH
    struct.pack_into("<I", page, hdr.CODE32_START, code32_start & 0xFFFFFFFF)
    struct.pack_into("<I", page, hdr.CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    if initrd is not None:
        addr, size = initrd
        struct.pack_into("<II", page, hdr.RAMDISK_IMAGE, addr & 0xFFFFFFFF, size & 0xFFFFFFFF)
        struct.pack_into("<II", page, EXT_RAMDISK_IMAGE, addr >> 32, size >> 32)
    struct.pack_into("<Q", page, ACPI_RSDP_ADDR, rsdp_addr)
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError("too many e820 entries for the zero page")
    page[E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        E820_ENTRY.pack_into(page, E820_TABLE + i * E820_ENTRY.size, addr, size, kind)
    mem.write(layout.BOOT_PARAMS_ADDR, page)
