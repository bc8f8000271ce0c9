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
from typing import Any

from appliance.qcow2 import header as H
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


# Bitmap table entries (qcow2.txt, "Bitmap table"): bits 9-55 the data
# cluster; with no cluster, bit 0 set means every bit of that stretch is 1.
_TABLE_OFFSET = 0x00FFFFFFFFFFFE00
_TABLE_RESERVED = 0xFF000000000001FE
_ALL_ONES = 1


def bitmap_bytes(disk_size: int, granularity_bits: int) -> int:
    """Bytes of bitmap data for a disk: one bit per granule, rounded up."""
    bits = -(-disk_size // (1 << granularity_bits))
    return -(-bits // 8)


async def read_bits(img: Any, b: Bitmap) -> bytearray:
    """The bitmap's data, bit ``i`` (LSB first in each byte) covering granule ``i``.

    :raises CorruptImage: A table entry with reserved bits set or a data
        cluster that is misaligned or outside the file.
    """
    cs = img._cs
    total = bitmap_bytes(img.size, b.granularity_bits)
    out = bytearray(total)
    raw = await img._pread(b.table_offset, b.table_size * 8)
    for i, e in enumerate(struct.unpack(f">{b.table_size}Q", raw)):
        start = i * cs
        if start >= total:
            break
        n = min(cs, total - start)
        off = e & _TABLE_OFFSET
        if e & _TABLE_RESERVED or off % cs or off + cs > img.file_size + cs:
            raise CorruptImage(f"bitmap '{b.name}' has a corrupt table entry", offset=b.table_offset)
        if off:
            out[start:start + n] = (await img._pread(off, cs))[:n]
        elif e & _ALL_ONES:
            out[start:start + n] = b"\xff" * n
    return out


async def add_bitmaps(img: Any, items: list[tuple[str, int, int, bytes]]) -> None:
    """Store persistent bitmaps (name, granularity bits, flags, data) in a version 3 image.

    Data clusters go first, then each bitmap table, then the directory, then
    the header extension with the autoclear bit (qcow2.txt, "Bitmaps
    extension"): until the header names them, the new clusters are only
    leaked space, so a crash leaves the image valid. A stretch of all-zero
    data gets no cluster (table entry 0), as QEMU stores it.
    """
    cs = img._cs
    cb = img._cb
    zero = bytes(cs)
    entries = []
    for name, gbits, flags, data in items:
        nclusters = -(-len(data) // cs)
        table = [0] * nclusters
        for i in range(nclusters):
            chunk = data[i * cs:(i + 1) * cs]
            if zero.startswith(chunk):
                continue
            off = (await img._alloc_clusters(1)) << cb
            table[i] = off
            await img._flush_refcounts()
            await img._pwrite(off, bytes(chunk) + bytes(cs - len(chunk)))
        t_len = max(8, nclusters * 8)
        t_off = (await img._alloc_clusters(-(-t_len // cs))) << cb
        await img._flush_refcounts()
        await img._pwrite(t_off, struct.pack(f">{nclusters}Q", *table))
        entries.append((t_off, nclusters, flags, gbits, name.encode()))
    directory = bytearray()
    for t_off, n, flags, gbits, nameb in entries:
        directory += _ENTRY.pack(t_off, n, flags, 1, gbits, len(nameb), 0) + nameb
        directory += bytes(-len(directory) % 8)
    d_off = (await img._alloc_clusters(-(-len(directory) // cs))) << cb
    await img._flush_refcounts()
    await img._pwrite(d_off, bytes(directory))
    await img._sync()
    h = img.header
    h.set_ext(H.EXT_BITMAPS, _EXT.pack(len(entries), 0, len(directory), d_off))
    h.autoclear_features |= H.AUTOCLEAR_BITMAPS
    await img._write_header()
    await img._sync()
    img.bitmaps = parse_directory(bytes(directory), d_off, len(entries))
    img._build_meta_set()


async def replace_bitmaps(img: Any, items: list[tuple[str, int, int, bytes]]) -> None:
    """Make ``items`` the image's whole set of bitmaps (none: the extension goes).

    The new structures are written and the header switched before the old
    directory, tables and data clusters are released, so a crash in between
    only leaks them.
    """
    cs = img._cs
    old: list[int] = []
    h = img.header
    ext = h.ext(H.EXT_BITMAPS)
    if ext is not None:
        _, size, off = parse_extension(ext)
        old += range(off // cs, -(-(off + size) // cs))
        for b in img.bitmaps:
            old += range(b.table_offset // cs, -(-(b.table_offset + b.table_size * 8) // cs))
            raw = await img._pread(b.table_offset, b.table_size * 8)
            old += [e_off // cs for e in struct.unpack(f">{b.table_size}Q", raw)
                    if (e_off := e & _TABLE_OFFSET)]
    async with img._lock:
        await img._flush_locked()
        if items:
            await add_bitmaps(img, items)
        else:
            h.set_ext(H.EXT_BITMAPS, None)
            h.autoclear_features &= ~H.AUTOCLEAR_BITMAPS
            await img._write_header()
            await img._sync()
            img.bitmaps = []
        for c in sorted(set(old)):
            await img._update_refcount(c, -1)
        await img._flush_locked()
        img._build_meta_set()
