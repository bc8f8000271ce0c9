"""A tiny PVH guest assembled at test time, for the vCPU path without the kit.

It prints a banner, then echoes what it receives on COM1 until it reads
``q`` (ACPI S5 power-off through PM1a_CNT) or ``r`` (i8042 reset). It runs in
32-bit protected mode, so under PVM every instruction is emulated: fine for a
few hundred instructions.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

LOAD_ADDR = 0x100000

ASM = r"""
    .code32
    .globl _start
_start:
    mov $0x3f8, %dx
    mov $(msg - _start + 0x100000), %esi
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $0x3fd, %dx
3:  in %dx, %al
    test $1, %al
    jz 3b
    mov $0x3f8, %dx
    in %dx, %al
    cmp $'q', %al
    je 4f
    cmp $'r', %al
    je 5f
    out %al, %dx
    jmp 2b
4:  mov $0x604, %dx
    mov $0x3400, %ax
    out %ax, %dx
    jmp .
5:  mov $0x64, %dx
    mov $0xfe, %al
    out %al, %dx
    jmp .
msg: .asciz "TINY-READY\n"
"""


def have_toolchain() -> bool:
    return shutil.which("as") is not None and shutil.which("objcopy") is not None


def pvh_elf(code: bytes, entry: int = LOAD_ADDR) -> bytes:
    """An ELF64 with one PT_LOAD at ``LOAD_ADDR`` and a Xen PHYS32_ENTRY note."""
    note_name = b"Xen\0"
    note = struct.pack("<III", len(note_name), 4, 18) + note_name + struct.pack("<I", entry)
    ehsize, phsize = 64, 56
    phoff = ehsize
    note_off = phoff + 2 * phsize
    code_off = (note_off + len(note) + 0xFFF) & ~0xFFF
    eh = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    eh += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, 0, 0, ehsize, phsize, 2, 64, 0, 0)
    ph_load = struct.pack("<IIQQQQQQ", 1, 7, code_off, LOAD_ADDR, LOAD_ADDR, len(code), len(code), 0x1000)
    ph_note = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    out = bytearray(eh + ph_load + ph_note + note)
    out += bytes(code_off - len(out))
    out += code
    return bytes(out)


def assemble(tmp: Path, name: str, asm: str) -> Path:
    """Assemble 32-bit ``asm`` (linked at ``LOAD_ADDR``) into ``tmp/NAME.elf``, a PVH ELF."""
    src = tmp / f"{name}.S"
    src.write_text(asm)
    obj = tmp / f"{name}.o"
    binary = tmp / f"{name}.bin"
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)], check=True)
    elf = tmp / f"{name}.elf"
    elf.write_bytes(pvh_elf(binary.read_bytes()))
    return elf


def build(tmp: Path) -> Path:
    return assemble(tmp, "tiny", ASM)
