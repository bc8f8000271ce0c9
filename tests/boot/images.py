"""Builders for the kernel images the boot tests load: real files, no toolchain needed.

``pvh_elf`` and ``vmlinux_elf`` write ELF executables with the program headers
and Xen note a loader reads; ``bzimage`` writes a setup header laid out as
``Documentation/arch/x86/boot.rst`` documents it, followed by a payload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_LOAD, PT_NOTE = 1, 4


@dataclass
class Load:
    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def elf(
    loads: list[Load], entry: int, *, notes: bytes = b"", is64: bool = True, machine: int | None = None
) -> bytes:
    """An ELF executable with one PT_LOAD per ``loads`` entry and an optional PT_NOTE."""
    ehsize, phentsize = (64, 56) if is64 else (52, 32)
    phnum = len(loads) + (1 if notes else 0)
    off = ehsize + phnum * phentsize
    body = b""
    phdrs = b""
    if notes:
        phdrs += _phdr(is64, PT_NOTE, off, 0, 0, len(notes), len(notes))
        body += notes
    for ld in loads:
        body += b"\0" * (-len(body) % 16)
        offset = off + len(body)
        vaddr = ld.paddr if ld.vaddr is None else ld.vaddr
        memsz = len(ld.data) if ld.memsz is None else ld.memsz
        phdrs += _phdr(is64, PT_LOAD, offset, vaddr, ld.paddr, len(ld.data), memsz)
        body += ld.data
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1]) + b"\0" * 9
    if machine is None:
        machine = 62 if is64 else 3
    if is64:
        ehdr = struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, ehsize, 0, 0, ehsize,
                           phentsize, phnum, 64, 0, 0)
    else:
        ehdr = struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, entry, ehsize, 0, 0, ehsize,
                           phentsize, phnum, 40, 0, 0)
    return ident + ehdr + phdrs + body


def _phdr(is64: bool, ptype: int, offset: int, vaddr: int, paddr: int, filesz: int, memsz: int) -> bytes:
    if is64:
        return struct.pack("<IIQQQQQQ", ptype, 5, offset, vaddr, paddr, filesz, memsz, 16)
    return struct.pack("<IIIIIIII", ptype, offset, vaddr, paddr, filesz, memsz, 5, 16)


GUEST_CODE = bytes.fromhex("fa f4 eb fd")   # cli; hlt; jmp $-1


def pvh_elf(*, entry: int = 0x100000, desc_size: int = 4, is64: bool = False,
            text: bytes = GUEST_CODE, bss: int = 0x1000) -> bytes:
    """A small PVH guest: code at 1 MiB and a Xen PHYS32_ENTRY note pointing at it."""
    desc = struct.pack("<I" if desc_size == 4 else "<Q", entry)
    return elf(
        [Load(0x100000, text, memsz=len(text) + bss)],
        entry,
        notes=note(b"Xen\0", 6, b"linux\0") + note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, desc),
        is64=is64,
    )


KERNEL_VIRT = 0xFFFFFFFF81000000


def vmlinux_elf(*, paddr: int = 0x1000000, entry: int | None = None, text: bytes = GUEST_CODE * 64,
                bss: int = 0x2000, extra: bytes = b"") -> bytes:
    """A vmlinux-like ELF: linked at the kernel's virtual base, loaded at ``paddr``."""
    return elf(
        [Load(paddr, text + extra, memsz=len(text) + len(extra) + bss, vaddr=KERNEL_VIRT)],
        paddr if entry is None else entry,
    )


# Setup header offsets (boot.rst "The Real-Mode Kernel Header").
SETUP_SECTS = 0x1F1
SYSSIZE = 0x1F4
BOOT_FLAG = 0x1FE
JUMP = 0x200
HEADER = 0x202
VERSION = 0x206
LOADFLAGS = 0x211
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
RELOCATABLE_KERNEL = 0x234
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238
PAYLOAD_OFFSET = 0x248
PAYLOAD_LENGTH = 0x24C
PREF_ADDRESS = 0x258
INIT_SIZE = 0x260


def bzimage(
    *,
    version: int = 0x020F,
    setup_sects: int = 4,
    loadflags: int = 0x01,
    xloadflags: int = 0x03,
    initrd_addr_max: int = 0x7FFFFFFF,
    kernel_alignment: int = 0x200000,
    relocatable: bool = True,
    cmdline_size: int = 2047,
    pref_address: int = 0x1000000,
    init_size: int = 0x400000,
    protected_mode: bytes = GUEST_CODE * 256,
    payload: bytes = b"",
    boot_flag: int = 0xAA55,
) -> bytes:
    """A bzImage whose protected-mode part is ``protected_mode`` + ``payload``."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[SETUP_SECTS] = setup_sects
    pm = protected_mode + payload
    struct.pack_into("<I", setup, SYSSIZE, (len(pm) + 15) // 16)
    struct.pack_into("<H", setup, BOOT_FLAG, boot_flag)
    setup[JUMP : JUMP + 2] = bytes([0xEB, 0x6A])   # header ends at 0x202 + 0x6a = 0x26c
    setup[HEADER : HEADER + 4] = b"HdrS"
    struct.pack_into("<H", setup, VERSION, version)
    setup[LOADFLAGS] = loadflags
    struct.pack_into("<II", setup, INITRD_ADDR_MAX, initrd_addr_max, kernel_alignment)
    setup[RELOCATABLE_KERNEL] = int(relocatable)
    struct.pack_into("<H", setup, XLOADFLAGS, xloadflags)
    struct.pack_into("<I", setup, CMDLINE_SIZE, cmdline_size)
    if payload:
        struct.pack_into("<II", setup, PAYLOAD_OFFSET, len(protected_mode), len(payload))
    struct.pack_into("<Q", setup, PREF_ADDRESS, pref_address)
    struct.pack_into("<I", setup, INIT_SIZE, init_size)
    return bytes(setup) + pm
