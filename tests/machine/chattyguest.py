"""A tiny PVH guest that prints a long, known byte sequence the moment it starts.

It prints ``COUNT`` letters (``a``..``z`` cycling, a newline after every 64),
then ``DONE``, then echoes COM1 input until ``q`` (ACPI power-off). Under PVM
each instruction is emulated and each byte is a port exit, so the sequence
takes a few hundred milliseconds: long enough to span `appliance run`'s
hand-over from the pre-loop console to the loop, which is what it tests.
"""

from __future__ import annotations

from pathlib import Path

from tests.machine.tinyguest import assemble

COUNT = 64 * 160

ASM = rf"""
    .code32
    .globl _start
_start:
    xor %ecx, %ecx
1:  mov %ecx, %eax
    xor %edx, %edx
    mov $26, %ebx
    div %ebx
    mov %dl, %al
    add $'a', %al
    mov $0x3f8, %dx
    out %al, %dx
    inc %ecx
    test $63, %ecx
    jnz 2f
    mov $'\n', %al
    out %al, %dx
2:  cmp ${COUNT}, %ecx
    jne 1b
    mov $0x3f8, %dx
    mov $(msg - _start + 0x100000), %esi
3:  lodsb
    test %al, %al
    jz 4f
    out %al, %dx
    jmp 3b
4:  mov $0x3fd, %dx
5:  in %dx, %al
    test $1, %al
    jz 5b
    mov $0x3f8, %dx
    in %dx, %al
    cmp $'q', %al
    je 6f
    out %al, %dx
    jmp 4b
6:  mov $0x604, %dx
    mov $0x3400, %ax
    out %ax, %dx
    jmp .
msg: .asciz "DONE\n"
"""


def expected() -> bytes:
    """Everything the guest prints before it starts echoing."""
    out = bytearray()
    for i in range(COUNT):
        out.append(ord("a") + i % 26)
        if (i + 1) % 64 == 0:
            out += b"\n"
    return bytes(out) + b"DONE\n"


def build(tmp: Path) -> Path:
    return assemble(tmp, "chatty", ASM)
