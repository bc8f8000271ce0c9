"""A small ACPI Machine Language encoder: just what our DSDT needs.

Encodings follow ACPI 6.5 §20.2 (AML grammar) and §6.4 (resource data types).
Each helper returns the bytes of one term, so a table body reads like the ASL
it stands for::

    scope("\\_SB_", device("PCI0", name("_HID", eisa_id("PNP0A08")), ...))
"""

from __future__ import annotations

import struct

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
RETURN_OP = 0xA4
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82                  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C                  # '\'
PARENT_PREFIX = 0x5E              # '^'
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F


def pkg_length(body_len: int) -> bytes:
    """PkgLength for a body of ``body_len`` bytes (§20.2.4); it counts its own bytes too."""
    if body_len + 1 < 0x40:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0x0F)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ValueError("AML package too long")


def name_seg(seg: str) -> bytes:
    """One NameSeg: up to four characters ``[A-Z_][A-Z0-9_]*``, padded with '_'."""
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_"):
        raise ValueError(f"bad AML name segment {seg!r}")
    if not all(c.isupper() or c.isdigit() or c == "_" for c in seg):
        raise ValueError(f"bad AML name segment {seg!r}")
    return seg.ljust(4, "_").encode()


def name_string(path: str) -> bytes:
    """A NameString such as ``_HID``, ``\\_SB_.PCI0`` or ``^COM1`` (§20.2.2)."""
    prefix = b""
    while path.startswith(("\\", "^")):
        prefix += bytes([ROOT_CHAR if path[0] == "\\" else PARENT_PREFIX])
        path = path[1:]
    segs = [name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + b"\x00"
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest ComputationalData for ``value`` (ZeroOp, OneOp or a prefixed constant)."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in (
        (BYTE_PREFIX, "<B", 1 << 8),
        (WORD_PREFIX, "<H", 1 << 16),
        (DWORD_PREFIX, "<I", 1 << 32),
        (QWORD_PREFIX, "<Q", 1 << 64),
    ):
        if 0 <= value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise ValueError(f"AML integer {value} out of range")


def string(text: str) -> bytes:
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\x00"


def eisa_id(text: str) -> bytes:
    """A compressed EISA id such as ``PNP0A08`` as a DWordConst (§19.6.35, EISAID)."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"bad EISA id {text!r}")
    value = (
        (ord(text[0]) - 0x40) << 26
        | (ord(text[1]) - 0x40) << 21
        | (ord(text[2]) - 0x40) << 16
        | int(text[3:], 16)
    )
    # The id is stored most significant byte first.
    return bytes([DWORD_PREFIX]) + struct.pack(">I", value)


def name(path: str, data: bytes) -> bytes:
    """``Name(path, data)``."""
    return bytes([NAME_OP]) + name_string(path) + data


def package(*elements: bytes) -> bytes:
    """``Package(){...}`` of already-encoded elements."""
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    """``Buffer(){...}`` holding ``data``."""
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(path: str, nargs: int, *terms: bytes, serialized: bool = False) -> bytes:
    flags = (nargs & 7) | (int(serialized) << 3)
    body = name_string(path) + bytes([flags]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


def return_(value: bytes) -> bytes:
    return bytes([RETURN_OP]) + value


# --- Resource descriptors (ACPI 6.5 §6.4) ----------------------------------

RES_IO = 0x47                     # small: I/O port descriptor, 7 data bytes
RES_IRQ_NOFLAGS = 0x22            # small: IRQ descriptor, 2 data bytes
RES_END_TAG = 0x79
RES_WORD_ADDRESS = 0x88           # large: word address space descriptor
RES_DWORD_ADDRESS = 0x87          # large: dword address space descriptor
SPACE_MEMORY = 0
SPACE_IO = 1
SPACE_BUS = 2
# General flags: producer (bit 0 clear), positive decode, min and max fixed.
ADDR_PRODUCER_FIXED = (1 << 3) | (1 << 2)
IO_RANGE_ENTIRE = 3               # I/O type-specific flags _RNG: ISA and non-ISA ranges
MEM_READ_WRITE = 1                # memory type-specific flags: _RW, non-cacheable


def io_port(base: int, length: int, align: int = 1) -> bytes:
    """``IO(Decode16, base, base, align, length)``: a fixed 16-bit decoded port range."""
    return struct.pack("<BBHHBB", RES_IO, 1, base, base, align, length)


def irq_noflags(*irqs: int) -> bytes:
    """``IRQNoFlags(){...}``: edge-triggered, active-high ISA IRQs."""
    mask = 0
    for irq in irqs:
        mask |= 1 << irq
    return struct.pack("<BH", RES_IRQ_NOFLAGS, mask)


def word_address(space: int, minimum: int, maximum: int, *, type_flags: int = 0) -> bytes:
    """A producer ``WordIO``/``WordBusNumber`` range ``[minimum, maximum]``."""
    return struct.pack(
        "<BHBBBHHHHH", RES_WORD_ADDRESS, 13, space, ADDR_PRODUCER_FIXED, type_flags,
        0, minimum, maximum, 0, maximum - minimum + 1,
    )


def dword_memory(minimum: int, maximum: int) -> bytes:
    """A producer, read/write, non-cacheable ``DWordMemory`` range ``[minimum, maximum]``."""
    return struct.pack(
        "<BHBBBIIIII", RES_DWORD_ADDRESS, 23, SPACE_MEMORY, ADDR_PRODUCER_FIXED, MEM_READ_WRITE,
        0, minimum, maximum, 0, maximum - minimum + 1,
    )


def resource_template(*descriptors: bytes) -> bytes:
    """``ResourceTemplate(){...}``: the descriptors plus an end tag, as a Buffer."""
    # A zero checksum in the end tag means "treat as valid" (§6.4.2.9).
    return buffer(b"".join(descriptors) + bytes([RES_END_TAG, 0]))
