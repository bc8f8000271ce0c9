"""Persistent dirty bitmaps (qcow2.txt, "Bitmaps"): kept, never maintained.

We do not track guest writes in bitmaps. When guest-visible data first
changes (a write, discard, zeroing, resize or snapshot switch), every bitmap
with the ``auto`` flag, the ones that must follow each write, is marked
``in_use`` (flag bit 0: "may be inconsistent"), as QEMU marks them while it
has an image open, and the autoclear bit stays set: the bitmaps stay
referenced and refcounted (no leaks), and QEMU reports them as inconsistent
instead of trusting stale data. Disabled bitmaps, and every bitmap of an
image opened writable whose data did not change (check -r, amend, snapshot
-c/-d, rebase -u), stay valid. ``check`` counts their clusters.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from appliance.qcow2.errors import CorruptImage

_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, directory offset
_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, gran bits, name, extra
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
MAX_DIRECTORY = 64 * 1024 * 1024
MAX_TABLE_ENTRIES = 1 << 26


@dataclass
class Bitmap:
    entry_offset: int  # file offset of the directory entry
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    name: str


def parse_extension(data: bytes) -> tuple[int, int, int]:
    """(nb_bitmaps, directory_size, directory_offset) of a bitmaps header extension."""
    if len(data) < _EXT.size:
        raise CorruptImage("bitmaps header extension is truncated")
    nb, _, size, off = _EXT.unpack_from(data)
    if size > MAX_DIRECTORY or nb > 65535:
        raise CorruptImage("bitmap directory is too large")
    return nb, size, off


def parse_directory(raw: bytes, base: int, count: int) -> list[Bitmap]:
    out = []
    pos = 0
    for _ in range(count):
        if pos + _ENTRY.size > len(raw):
            raise CorruptImage("bitmap directory is truncated")
        t_off, t_size, flags, _type, gbits, name_len, extra = _ENTRY.unpack_from(raw, pos)
        end = pos + _ENTRY.size + extra + name_len
        if end > len(raw) or t_size > MAX_TABLE_ENTRIES:
            raise CorruptImage("bitmap directory entry is invalid")
        name = bytes(raw[pos + _ENTRY.size + extra : end]).decode("utf-8", "replace")
        out.append(Bitmap(base + pos, t_off, t_size, flags, gbits, name))
        pos = end + (-end % 8)
    return out


def flag_names(flags: int) -> list[str]:
    return [n for bit, n in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto")) if flags & bit]
