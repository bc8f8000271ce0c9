"""Refcounts computed from the metadata, and a refcount structure rebuilt from them.

The engine uses these to repair a dirty (lazy refcounts) image on open and to
change the refcount width (amend): every reference (header, L1 and L2 tables,
data and compressed clusters, snapshot table, bitmaps) is counted, and a new
refcount table and blocks are written in fresh clusters past the end of the
file before the header points at them, so a crash leaves the old structure in
charge. ``qemu-img check`` itself, with its messages and repairs, is
:mod:`appliance.qcow2.check_flow`.
"""

from __future__ import annotations

import array
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.qcow2 import header as H
from appliance.qcow2.image import COMPRESSED, OFFSET_MASK
from appliance.qcow2.refcount import encode_block

if TYPE_CHECKING:
    from appliance.qcow2.image import Qcow2Image


@dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    # (cluster, stored refcount, references found) of each leaked cluster.
    leaked: list[tuple[int, int, int]] = field(default_factory=list)


class _Walker:
    def __init__(self, img: Qcow2Image, res: CheckResult) -> None:
        self.img = img
        self.res = res
        self.cs = img._cs
        self.cb = img._cb
        self.nclusters = -(-img.file_size // self.cs)
        # 4 bytes per host cluster, like QEMU's in-memory refcount table.
        self.refs = array.array("I", bytes(4 * self.nclusters))
        self.copied_errors: list[str] = []
        self.l2_active: list[tuple[int, int, int, tuple[int, ...]]] = []

    def inc(self, off: int, length: int, what: str) -> bool:
        if length <= 0:
            return True
        first, last = off >> self.cb, (off + length - 1) >> self.cb
        if last >= self.nclusters:
            self.res.corruptions += 1
            self.res.messages.append(
                f"ERROR {what} at offset {off:#x} is beyond the end of the image file")
            return False
        for c in range(first, last + 1):
            self.refs[c] += 1
        return True

    async def walk_l1(self, l1: list[int], active: bool) -> None:
        img = self.img
        cs, cb = self.cs, self.cb
        next_contig = 0
        for l1i, e in enumerate(l1):
            off = e & OFFSET_MASK
            if not off:
                continue
            if off & (cs - 1):
                self.res.corruptions += 1
                self.res.messages.append(
                    f"ERROR l2_offset={off:x}: Table is not cluster aligned; L1 entry corrupted")
                continue
            if not self.inc(off, cs, "L2 table"):
                continue
            raw = await img._pread(off, cs)
            t = struct.unpack(f">{cs // 8}Q", raw)
            if active:
                self.l2_active.append((l1i, e, off, t))
            next_contig = 0  # qemu-img counts fragmentation within each L2 table
            for i in range(0, len(t), img._stride):
                le = t[i]
                if le & COMPRESSED:
                    coff, csize = img._compressed_span(le)
                    self.inc(coff, csize, "compressed cluster")
                    if active:
                        # Compressed clusters count as fragmented, as in qemu-img.
                        self.res.allocated_clusters += 1
                        self.res.compressed_clusters += 1
                        self.res.fragmented_clusters += 1
                    continue
                host = le & OFFSET_MASK
                if not host:
                    continue
                if host & (cs - 1):
                    self.res.corruptions += 1
                    self.res.messages.append(
                        f"ERROR offset={host:x}: Cluster is not properly aligned; L2 entry "
                        "corrupted.")
                    continue
                self.inc(host, cs, "data cluster")
                if active:
                    self.res.allocated_clusters += 1
                    if next_contig and host != next_contig:
                        self.res.fragmented_clusters += 1
                    next_contig = host + cs
        del cb


async def compute_refs(img: Qcow2Image, res: CheckResult, *, with_refcount_structs: bool = True
                       ) -> _Walker:
    w = _Walker(img, res)
    cs = img._cs
    h = img.header
    w.inc(0, cs, "header")
    w.inc(h.l1_table_offset, h.l1_size * 8, "L1 table")
    await w.walk_l1(img._l1, True)
    for s in img.snapshots:
        if s.l1_problem(cs) is not None:
            continue  # unreadable: QEMU's check skips it too (and reports it)
        w.inc(s.l1_table_offset, s.l1_size * 8, f"snapshot {s.id} L1 table")
        raw = await img._pread(s.l1_table_offset, s.l1_size * 8)
        await w.walk_l1(list(struct.unpack(f">{s.l1_size}Q", raw)), False)
    if h.nb_snapshots:
        from appliance.qcow2.snapops import _table_len

        w.inc(h.snapshots_offset, _table_len(img), "snapshot table")
    bm_ext = h.ext(H.EXT_BITMAPS)
    if bm_ext is not None and img.bitmaps:
        from appliance.qcow2.bitmaps import parse_extension

        _, size, off = parse_extension(bm_ext)
        w.inc(off, size, "bitmap directory")
        for b in img.bitmaps:
            w.inc(b.table_offset, b.table_size * 8, f"bitmap '{b.name}' table")
            raw = await img._pread(b.table_offset, b.table_size * 8)
            for e in struct.unpack(f">{b.table_size}Q", raw):
                if e & OFFSET_MASK:
                    w.inc(e & OFFSET_MASK, cs, f"bitmap '{b.name}' data")
    if with_refcount_structs:
        w.inc(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
        for e in img._rt:
            off = e & OFFSET_MASK
            if not off:
                continue
            if off & (cs - 1):
                res.corruptions += 1
                res.messages.append(f"ERROR refcount block is not cluster aligned ({off:#x})")
                continue
            w.inc(off, cs, "refcount block")
    return w


async def rebuild_refcounts(img: Qcow2Image) -> None:
    """Replace the refcount table and blocks with ones computed from the metadata."""
    res = CheckResult()
    w = await compute_refs(img, res, with_refcount_structs=False)
    refs = w.refs
    while refs and refs[-1] == 0:
        refs.pop()
    cs, cb = img._cs, img._cb
    E = img._rb_entries
    start = max(len(refs), -(-img.file_size // cs))
    # Grow the new structure until it covers itself.
    nblocks, tclusters = 1, 1
    while True:
        total = start + tclusters + nblocks
        need_blocks = -(-total // E)
        need_t = max(1, -(-need_blocks * 8 // cs))
        if need_blocks <= nblocks and need_t <= tclusters:
            break
        nblocks, tclusters = max(nblocks, need_blocks), max(tclusters, need_t)
    refs.extend([0] * (start + tclusters + nblocks - len(refs)))
    for c in range(start, start + tclusters + nblocks):
        refs[c] = 1
    table = [0] * (tclusters * cs // 8)
    blocks: dict[int, list[int]] = {}
    for b in range(nblocks):
        chunk = list(refs[b * E : (b + 1) * E])
        chunk += [0] * (E - len(chunk))
        blocks[b] = chunk
        table[b] = (start + tclusters + b) << cb
    for b, chunk in blocks.items():
        await img._pwrite(table[b], encode_block(chunk, img._rc_order))
    await switch_refcount_table(img, table, start << cb, tclusters, blocks)


async def switch_refcount_table(img: Qcow2Image, table: list[int], offset: int, clusters: int,
                                blocks: dict[int, list[int]]) -> None:
    """Write a new refcount table whose blocks are on disk already, point the
    header at it (one write, between barriers) and drop the engine's state of
    the old structure. ``blocks``: decoded blocks to keep cached ({} for none).
    """
    await img._pwrite(offset, struct.pack(f">{len(table)}Q", *table))
    await img._sync()
    h = img.header
    h.refcount_table_offset, h.refcount_table_clusters = offset, clusters
    await img._write_header()
    await img._sync()
    img._rt = table
    img._rb = blocks
    img._rb_dirty.clear()
    img._rt_dirty = False
    img._rt_reloc = None
    img._rc_dirty = False
    img._pending_frees.clear()
    img._free_hint = 1
    img._build_meta_set()
