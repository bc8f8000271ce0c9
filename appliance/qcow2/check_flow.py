"""``qemu-img check`` for qcow2, step for step: what it counts, prints and repairs.

Scripts compare our check against qemu-img's: the same messages in the same
order, the same counts, the same exit codes, and after ``-r`` the same image.
So the passes follow QEMU's order (block/qcow2-refcount.c, 7.2):

1. count every reference the metadata makes into an in-memory refcount
   table (header, active L1/L2 walk, snapshots' L1/L2, snapshot table,
   refcount table, bitmaps, refcount blocks), reporting malformed entries;
2. compare with the stored refcounts (``ERROR`` too low, ``Leaked`` too
   high); a stored 0 under a reference means the refcount structure cannot be
   trusted and must be rebuilt;
3. with ``-r all`` and a rebuild needed: write a new refcount structure from
   the in-memory table into clusters it marks free, switch the header to it,
   count again and repair the old structure's now leaked clusters; otherwise
   with ``-r``: compare again, this time repairing what the mode allows;
4. check the COPIED flag of active L1/L2 entries against the (repaired)
   refcounts, repairing it with ``-r all`` (or with ``-r leaks`` when nothing
   else is wrong).

The stored refcounts are read here without the engine's cache so a broken
refcount block is a counted problem, not a corrupt-bit event; repairs go
through the engine's refcount update and are flushed before the next pass.
A rebuild writes only clusters nothing references and switches the header in
one write, so a crash during repair leaves either structure, never a mix.
"""

from __future__ import annotations

import array
import errno
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.qcow2 import header as H
from appliance.qcow2 import snapshot_check
from appliance.qcow2.check import CheckResult, switch_refcount_table
from appliance.qcow2.image import COMPRESSED, COPIED, OFFSET_MASK, ZERO_FLAG
from appliance.qcow2.refcount import decode_block, encode_block

if TYPE_CHECKING:
    from appliance.qcow2.image import Qcow2Image

FIX_LEAKS = 1
FIX_ERRORS = 2
FIX_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}

L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
_INT64_MAX = (1 << 63) - 1
REFT_RESERVED_MASK = 0x1FF
BITMAP_ALL_ALLOC = 0xFFFFFFFF
BITMAP_ALL_ZERO = 0xFFFFFFFF << 32
MAX_L1_ENTRIES = (32 << 20) // 8  # QCOW_MAX_L1_SIZE / entry size
_IMRT_LIMIT = 1 << 31  # QEMU refuses images of more clusters (INT_MAX)


@dataclass
class CheckReport(CheckResult):
    """One check pass: QEMU's BdrvCheckResult, with the lines qemu-img writes to stderr."""

    # Set when the pass stopped early (qemu-img: "Check failed: <strerror>").
    failed: int = 0

    def counts(self) -> tuple[int, int, int, int, int]:
        return (self.corruptions, self.leaks, self.check_errors, self.corruptions_fixed,
                self.leaks_fixed)

    def set_counts(self, c: tuple[int, int, int, int, int]) -> None:
        (self.corruptions, self.leaks, self.check_errors, self.corruptions_fixed,
         self.leaks_fixed) = c


class _Failed(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.err = err


def _file_len(img: Qcow2Image) -> int:
    st = os.fstat(img._fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    return os.lseek(img._fd, 0, os.SEEK_END)


class _Pass:
    """One refcount computation over the image's metadata (QEMU's IMRT)."""

    def __init__(self, img: Qcow2Image, res: CheckReport, nb_clusters: int) -> None:
        self.img = img
        self.res = res
        self.cs = img._cs
        self.cb = img._cb
        self.rc_max = img._rc_max
        self.refs = array.array("Q", bytes(8 * nb_clusters))
        self.file_len = _file_len(img)
        self.say = res.messages.append

    @property
    def nb_clusters(self) -> int:
        return len(self.refs)

    def grow(self, n: int) -> None:
        if n > len(self.refs):
            self.refs.extend(array.array("Q", bytes(8 * (n - len(self.refs)))))

    def inc(self, off: int, size: int) -> None:
        if size <= 0:
            return
        cs, cb = self.cs, self.cb
        # Up to one cluster past the end may be referenced: the last cluster
        # of an image can be partly written.
        if off + size - self.file_len >= cs:
            self.say("ERROR: counting reference for region exceeding the end of the file by one "
                     f"cluster or more: offset {off:#x} size {size:#x}")
            self.res.corruptions += 1
            return
        refs = self.refs
        for k in range(off >> cb, ((off + size - 1) >> cb) + 1):
            if k >= len(refs):
                self.grow(k + 1)
            if refs[k] == self.rc_max:
                self.say(f"ERROR: overflow cluster offset={k << cb:#x}")
                self.say("Use qemu-img amend to increase the refcount entry width or qemu-img "
                         "convert to create a clean copy if the image cannot be opened for writing")
                self.res.corruptions += 1
                continue
            refs[k] += 1

    async def pread(self, off: int, n: int) -> bytes:
        return await self.img._pread(off, n)

    async def walk_l1(self, l1_off: int, l1_size: int, frag: bool, fix: int, active: bool) -> None:
        if not l1_size:
            return
        self.inc(l1_off, l1_size * 8)
        raw = await self.pread(l1_off, l1_size * 8)
        for e in struct.unpack(f">{l1_size}Q", raw):
            if not e:
                continue
            if e & L1E_RESERVED_MASK:
                self.say(f"ERROR found L1 entry with reserved bits set: {e:x}")
                self.res.corruptions += 1
            l2_off = e & OFFSET_MASK
            self.inc(l2_off, self.cs)
            if l2_off & (self.cs - 1):
                self.say(f"ERROR l2_offset={l2_off:x}: Table is not cluster aligned; "
                         "L1 entry corrupted")
                self.res.corruptions += 1
            await self.walk_l2(l2_off, frag, fix, active)

    async def walk_l2(self, l2_off: int, frag: bool, fix: int, active: bool) -> None:
        img, res, cs = self.img, self.res, self.cs
        stride = img._stride
        refs = self.refs
        raw = await self.pread(l2_off, cs)
        t = struct.unpack(f">{cs // 8}Q", raw)
        next_contig = 0
        for i in range(0, len(t), stride):
            e = t[i]
            bm = t[i + 1] if stride == 2 else 0
            if e & COMPRESSED:
                if e & COPIED:
                    self.say(f"ERROR: coffset={e & img._coff_mask:#x}: copied flag must never "
                             "be set for compressed clusters")
                    e &= ~COPIED
                    res.corruptions += 1
                if bm:
                    self.say(f"ERROR compressed cluster {i // stride} with non-zero subcluster "
                             f"allocation bitmap, entry={e:#x}")
                    res.corruptions += 1
                    continue
                coff, csize = img._compressed_span(e)
                self.inc(coff, csize)
                if frag:
                    # Compressed clusters count as fragmented: each is re-read on its own.
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
                continue
            if e & L2E_STD_RESERVED_MASK:
                self.say(f"ERROR found l2 entry with reserved bits set: {e:x}")
                res.corruptions += 1
            off = e & OFFSET_MASK
            zero_flag = bool(e & ZERO_FLAG) and stride == 1
            if not off:
                if stride == 2 and bm & BITMAP_ALL_ALLOC:
                    res.corruptions += 1
                    self.say("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                continue
            # Normal, or (v3 without subclusters) zero with a preallocated cluster.
            if (bm >> 32) & bm:
                res.corruptions += 1
                self.say(f"ERROR offset={off:x}: Allocated cluster has corrupted subcluster "
                         "allocation bitmap")
            if off & (cs - 1):
                res.corruptions += 1
                contains_data = bool(bm & BITMAP_ALL_ALLOC) if stride == 2 else not zero_flag
                if not contains_data:
                    self.say(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} offset={off:x}: "
                             "Preallocated cluster is not properly aligned; L2 entry corrupted.")
                    if fix & FIX_ERRORS and await self._zero_entry(l2_off, i, bm):
                        continue  # the entry no longer points anywhere
                else:
                    self.say(f"ERROR offset={off:x}: Data cluster is not properly aligned; "
                             "L2 entry corrupted.")
            if frag:
                res.allocated_clusters += 1
                if next_contig and off != next_contig:
                    res.fragmented_clusters += 1
                next_contig = off + cs
            k = off >> self.cb
            if not off & (cs - 1) and off + cs <= self.file_len and k < len(refs) and refs[k] < self.rc_max:
                refs[k] += 1  # the common case of inc(), inline: one whole cluster in the file
            else:
                self.inc(off, cs)

    async def _zero_entry(self, l2_off: int, i: int, bm: int) -> bool:
        """Make a misaligned preallocated entry a plain zero cluster, written in place."""
        img = self.img
        if img._stride == 2:
            bm |= bm << 32
            data = struct.pack(">QQ", 0, bm & BITMAP_ALL_ZERO)
        else:
            data = struct.pack(">Q", ZERO_FLAG)
        await img._pwrite(l2_off + i * 8, data)
        await img._sync()
        img._l2.clear()
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1
        return True

    async def walk_bitmaps(self) -> None:
        img = self.img
        h = img.header
        ext = h.ext(H.EXT_BITMAPS)
        if ext is None or not img.bitmaps:
            return
        from appliance.qcow2.bitmaps import parse_extension

        _, size, off = parse_extension(ext)
        self.inc(off, size)
        for b in img.bitmaps:
            self.inc(b.table_offset, b.table_size * 8)
            raw = await self.pread(b.table_offset, b.table_size * 8)
            for e in struct.unpack(f">{b.table_size}Q", raw):
                boff = e & OFFSET_MASK
                if e & 0xFF000000000001FE or (boff & (self.cs - 1)):
                    self.res.corruptions += 1
                    continue
                if boff:
                    self.inc(boff, self.cs)

    def check_refblocks(self, rebuild: list[bool]) -> None:
        img, res = self.img, self.res
        for i, e in enumerate(img._rt):
            off = e & REFT_OFFSET_MASK
            c = off >> self.cb
            if e & REFT_RESERVED_MASK:
                self.say(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild[0] = True
                continue
            if off & (self.cs - 1):
                self.say(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                         "entry corrupted")
                res.corruptions += 1
                rebuild[0] = True
                continue
            if c >= self.nb_clusters:
                # qemu-img -r all would grow the file to cover the block; we
                # rebuild the structure instead (no file of the block's offset).
                res.corruptions += 1
                self.say(f"ERROR refcount block {i} is outside image")
                rebuild[0] = True
                continue
            if off:
                self.inc(off, self.cs)
                if self.refs[c] != 1:
                    self.say(f"ERROR refcount block {i} refcount={self.refs[c]}")
                    res.corruptions += 1
                    rebuild[0] = True


async def _calculate(img: Qcow2Image, res: CheckReport, fix: int, rebuild: list[bool],
                     nb_clusters: int) -> _Pass:
    p = _Pass(img, res, nb_clusters)
    h = img.header
    cs = img._cs
    p.inc(0, cs)
    await p.walk_l1(h.l1_table_offset, h.l1_size, True, fix, True)
    for sn in img.snapshots:
        if sn.l1_table_offset & (cs - 1):
            p.say(f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: L1 table "
                  "is not cluster aligned; snapshot table entry corrupted")
            res.corruptions += 1
            continue
        if sn.l1_size > MAX_L1_ENTRIES:
            p.say(f"ERROR snapshot {sn.id} ({sn.name}) l1_size={sn.l1_size:#x}: L1 table is too "
                  "large; snapshot table entry corrupted")
            res.corruptions += 1
            continue
        await p.walk_l1(sn.l1_table_offset, sn.l1_size, False, fix, False)
    if h.nb_snapshots:
        from appliance.qcow2.snapops import _table_len

        p.inc(h.snapshots_offset, _table_len(img))
    p.inc(h.refcount_table_offset, h.refcount_table_clusters * cs)
    await p.walk_bitmaps()
    p.check_refblocks(rebuild)
    return p


_ZERO: tuple[int, ...] = ()  # a refcount block that is not there: every count 0
_WIDTH = {3: "B", 4: "H", 5: "I", 6: "Q"}


class _Stored:
    """The refcounts on disk, read block by block (the engine's cached blocks win)."""

    def __init__(self, img: Qcow2Image) -> None:
        self.img = img
        self.blocks: dict[int, Sequence[int]] = {}

    async def block(self, ti: int) -> Sequence[int] | None:
        """Refcount block ``ti``'s counts, :data:`_ZERO` if absent, None if unreadable."""
        img = self.img
        if ti >= len(img._rt):
            return _ZERO
        blk = img._rb.get(ti)
        if blk is not None:
            return blk
        off = img._rt[ti] & REFT_OFFSET_MASK
        if not off:
            return _ZERO
        if off & (img._cs - 1) or off > _INT64_MAX - img._cs:
            # Unaligned, or past the largest offset a file can have (a
            # reserved bit set): unreadable, as QEMU's read of it fails (EIO).
            return None
        cached = self.blocks.get(off)
        if cached is None:
            raw = await img._pread(off, img._cs)
            code = _WIDTH.get(img._rc_order)
            if code is None:
                cached = decode_block(raw, img._rc_order)
            else:
                a = array.array(code, raw)
                a.byteswap()  # stored big-endian (qcow2.txt, refcount blocks)
                cached = a
            self.blocks[off] = cached
        return cached

    def forget(self) -> None:
        self.blocks.clear()


def _last_nonzero(a: array.array[int]) -> int:
    """Index of the last nonzero item, -1 if none (at memcmp speed)."""
    raw = a.tobytes().rstrip(b"\x00")
    return (len(raw) - 1) // a.itemsize if raw else -1


async def _compare(img: Qcow2Image, res: CheckReport, fix: int, rebuild: list[bool],
                   p: _Pass, stored: _Stored) -> int:
    """Stored against computed refcounts; returns the highest cluster in use."""
    highest = 0
    refs = p.refs
    changed = False
    E = img._rb_entries
    n = len(refs)
    for lo in range(0, n, E):
        hi = min(n, lo + E)
        blk = await stored.block(lo // E)
        seg = refs[lo:hi]
        if blk is not None:
            # Whole blocks that agree (nearly all of them) are settled here.
            sb = array.array("Q", bytes(8 * (hi - lo))) if blk is _ZERO else array.array("Q", blk[:hi - lo])
            if sb == seg:
                last = _last_nonzero(seg)
                if last >= 0:
                    highest = lo + last
                continue
        for i in range(lo, hi):
            if blk is None:
                p.say(f"Can't get refcount for cluster {i}: {os.strerror(errno.EIO)}")
                res.check_errors += 1
                continue
            r1 = 0 if blk is _ZERO else blk[i - lo]
            r2 = refs[i]
            if r1 or r2:
                highest = i
            if r1 == r2:
                continue
            fixed: str | None = None
            if r1 == 0:
                rebuild[0] = True
            elif r1 > r2 and fix & FIX_LEAKS:
                fixed = "leaks_fixed"
            elif r1 < r2 and fix & FIX_ERRORS:
                fixed = "corruptions_fixed"
            what = "Repairing" if fixed else "ERROR" if r1 < r2 else "Leaked"
            p.say(f"{what} cluster {i} refcount={r1} reference={r2}")
            if fixed:
                try:
                    await img._update_refcount(i, r2 - r1)
                except Exception:  # noqa: BLE001 - counted below, as an unrepaired one
                    pass
                else:
                    setattr(res, fixed, getattr(res, fixed) + 1)
                    changed = True
                    continue
            if r1 < r2:
                res.corruptions += 1
            else:
                res.leaks += 1
    if changed:
        await img._flush_refcounts()
        await img._sync()
        stored.forget()
    return highest


async def _rebuild(img: Qcow2Image, p: _Pass) -> None:
    """New refcount blocks and table from ``p.refs``, in clusters it marks free."""
    cs, cb = img._cs, img._cb
    E = img._rb_entries
    refs = p.refs
    table: list[int] = []

    def alloc(count: int, first_free: int) -> tuple[int, int]:
        cluster, contig, first_gap = first_free, 0, True
        while cluster < len(refs) and contig < count:
            if not refs[cluster]:
                contig += 1
                if first_gap:
                    first_free, first_gap = cluster, False
            elif contig:
                contig = 0
            cluster += 1
        if contig < count:
            p.grow(cluster + count - contig)
        cluster -= contig
        for k in range(count):
            refs[cluster + k] = 1
        return cluster << cb, first_free

    async def write_blocks(first: int, end: int) -> bool:
        grown = False
        first_free = 0
        c = first
        while c < end:
            if c >= len(refs) or not refs[c]:
                c += 1
                continue
            idx = c // E
            start = idx * E
            if idx < len(table) and table[idx]:
                off = table[idx]
            else:
                first_free = max(first_free, start)
                off, first_free = alloc(1, first_free)
                if off >> cb >= end:
                    end = (off >> cb) + 1
                if idx >= len(table):
                    want = -(-(idx + 1) * 8 // cs) * cs // 8
                    table.extend([0] * (want - len(table)))
                    grown = True
                table[idx] = off
            chunk = list(refs[start:start + E])
            chunk += [0] * (E - len(chunk))
            await img._pwrite(off, encode_block(chunk, img._rc_order))
            c = start + E
        return grown

    await write_blocks(0, len(refs))
    while True:
        n = -(-len(table) * 8 // cs)
        rt_off, _ = alloc(n, 0)
        if not await write_blocks(rt_off >> cb, (rt_off >> cb) + n):
            break
    img.file_size = max(img.file_size, _file_len(img))
    await switch_refcount_table(img, table, rt_off, n, {})


async def _check_copied(img: Qcow2Image, res: CheckReport, fix: int, stored: _Stored) -> None:
    if fix & FIX_ERRORS:
        repair = True
    elif fix & FIX_LEAKS:
        # Safe only when the refcounts it trusts were all repaired.
        repair = not res.check_errors and not res.corruptions and not res.leaks
    else:
        repair = False
    cs, cb = img._cs, img._cb
    stride = img._stride
    say = res.messages.append
    h = img.header
    E = img._rb_entries
    blocks: dict[int, Sequence[int]] = {}
    for i, e in enumerate(img._l1):
        l2_off = e & OFFSET_MASK
        if not l2_off:
            continue
        rc = await _count(stored, l2_off >> cb, blocks)
        if rc is None:
            continue
        if (rc == 1) != bool(e & COPIED):
            res.corruptions += 1
            say(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 cluster: l1_index={i} "
                f"l1_entry={e:x} refcount={rc}")
            if repair:
                new = e | COPIED if rc == 1 else e & ~COPIED
                img._l1[i] = new
                await img._pwrite(h.l1_table_offset + 8 * i, struct.pack(">Q", new))
                await img._sync()
                res.corruptions -= 1
                res.corruptions_fixed += 1
        t = list(struct.unpack(f">{cs // 8}Q", await img._pread(l2_off, cs)))
        dirty = 0
        for j in range(0, len(t), stride):
            le = t[j]
            if le & COMPRESSED:
                continue
            off = le & OFFSET_MASK
            if not off:
                continue
            c = off >> cb
            blk = blocks.get(c // E)
            if blk is None:
                rc2 = await _count(stored, c, blocks)
            else:
                rc2 = 0 if blk is _ZERO else blk[c % E]
            if rc2 is None:
                continue
            if (rc2 == 1) != bool(le & COPIED):
                res.corruptions += 1
                say(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data cluster: "
                    f"l2_entry={le:x} refcount={rc2}")
                if repair:
                    t[j] = le | COPIED if rc2 == 1 else le & ~COPIED
                    dirty += 1
        if dirty:
            await img._pwrite(l2_off, struct.pack(f">{len(t)}Q", *t))
            await img._sync()
            img._l2.clear()
            res.corruptions -= dirty
            res.corruptions_fixed += dirty


async def _count(stored: _Stored, c: int, blocks: dict[int, Sequence[int]]) -> int | None:
    """Stored refcount of cluster ``c`` (None: unreadable), its block kept in ``blocks``."""
    E = stored.img._rb_entries
    blk = await stored.block(c // E)
    if blk is None:
        return None
    blocks[c // E] = blk
    return 0 if blk is _ZERO else blk[c % E]


def _merge(res: CheckReport, part: CheckReport) -> None:
    res.corruptions += part.corruptions
    res.leaks += part.leaks
    res.check_errors += part.check_errors
    res.corruptions_fixed += part.corruptions_fixed
    res.leaks_fixed += part.leaks_fixed


async def check_pass(img: Qcow2Image, fix: int) -> CheckReport:
    """One bdrv_check of a qcow2 image: count, compare, repair what ``fix`` allows."""
    res = CheckReport()
    res.total_clusters = -(-img.size // img._cs)
    size = _file_len(img)
    nb = -(-size // img._cs)
    if nb > _IMRT_LIMIT:
        res.check_errors += 1
        res.failed = errno.EFBIG
        return res
    if fix:
        img._failed = False  # a repair is the way out of an image marked failed
    async with img._lock:
        if fix:
            await img._flush_locked()
        # check's own reading of the snapshot table (an image opened in check mode has it
        # unread); its counts join the result after the refcount pass, as in qemu-img.
        snap = CheckReport(messages=res.messages)
        if img.check_mode:
            err = await snapshot_check.read_for_check(img, snap, bool(fix & FIX_ERRORS))
            if err:
                _merge(res, snap)
                res.failed = err
                return res
        rebuild = [False]
        try:
            p = await _calculate(img, res, fix, rebuild, nb)
            stored = _Stored(img)
            pre = res.counts()
            highest = await _compare(img, res, 0, rebuild, p, stored)
            if rebuild[0] and fix & FIX_ERRORS:
                old = res.counts()
                fresh_leaks = 0
                res.messages.append("Rebuilding refcount structure")
                await _rebuild(img, p)
                stored.forget()
                res.corruptions = res.leaks = 0
                rebuild[0] = False
                p2 = await _calculate(img, res, 0, rebuild, p.nb_clusters)
                if fix & FIX_LEAKS:
                    saved = res.counts()
                    res.set_counts((0, 0, 0, 0, 0))
                    highest = await _compare(img, res, FIX_LEAKS, rebuild, p2, stored)
                    if rebuild[0]:
                        res.messages.append("ERROR rebuilt refcount structure is still broken")
                    fresh_leaks = res.leaks
                    res.set_counts(saved)
                if res.corruptions < old[0]:
                    res.corruptions_fixed += old[0] - res.corruptions
                if res.leaks < old[1]:
                    res.leaks_fixed += old[1] - res.leaks
                res.leaks += fresh_leaks
            elif fix:
                if rebuild[0]:
                    res.messages.append("ERROR need to rebuild refcount structures")
                    res.check_errors += 1
                    raise _Failed(errno.EIO)
                if res.leaks or res.corruptions:
                    res.set_counts(pre)
                    highest = await _compare(img, res, fix, rebuild, p, stored)
            await _check_copied(img, res, fix, stored)
            res.image_end_offset = (highest + 1) * img._cs
            if img.check_mode:
                err = await snapshot_check.fix_for_check(img, snap, bool(fix & FIX_ERRORS))
                if err:
                    raise _Failed(err)
        except _Failed as err:
            _merge(res, snap)
            res.failed = err.err
            return res
        finally:
            if fix:
                await img._flush_locked()
    _merge(res, snap)
    if fix and not res.check_errors and not res.corruptions:
        h = img.header
        if h.incompatible_features & (H.INCOMPAT_DIRTY | H.INCOMPAT_CORRUPT):
            # Refcounts and flags are now right: the image is clean and consistent.
            h.incompatible_features &= ~(H.INCOMPAT_DIRTY | H.INCOMPAT_CORRUPT)
            await img._write_header()
            await img._sync()
        img._failed = False
    return res
