"""Internal snapshot operations: create, apply, delete (qcow2.txt, "Snapshots").

Each operation runs on a flushed image under the metadata lock, and orders its
writes so a crash leaves leaks at worst: references are added (refcount
increments, durable) before anything points at them, and removed (header and
snapshot table, durable) before the refcounts drop.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from appliance.qcow2 import header as H
from appliance.qcow2.errors import CorruptImage, Qcow2Error
from appliance.qcow2.snapshot import Snapshot

if TYPE_CHECKING:
    from appliance.qcow2.image import Qcow2Image

from appliance.qcow2.image import COMPRESSED, COPIED, OFFSET_MASK


class SnapshotL1Invalid(CorruptImage):
    """A snapshot entry whose L1 table cannot be loaded (unaligned, too large).

    QEMU opens such an image; only the operations that load the table fail.
    ``errno`` is what QEMU fails them with (``-a``: "Failed to load snapshot: ...").
    """

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err


async def _tree_refs(img: Qcow2Image, l1: list[int], delta: int,
                     counted: list[int] | None = None) -> None:
    """Add ``delta`` to every L2 table and data cluster reachable from ``l1``.

    :param counted: each cluster whose count changed is appended, so that a
        failure half way (a count that would overflow) can be taken back.
    """
    cb = img._cb
    done = counted if counted is not None else []
    for e in l1:
        off = e & OFFSET_MASK
        if not off:
            continue
        table = list(await img._load_l2(off))
        await img._update_refcount(off >> cb, delta)
        done.append(off >> cb)
        for i in range(0, len(table), img._stride):
            le = table[i]
            if le & COMPRESSED:
                coff, csize = img._compressed_span(le)
                for c in range(coff >> cb, ((coff + csize - 1) >> cb) + 1):
                    await img._update_refcount(c, delta)
                    done.append(c)
            elif le & OFFSET_MASK:
                await img._update_refcount((le & OFFSET_MASK) >> cb, delta)
                done.append((le & OFFSET_MASK) >> cb)


async def fix_copied_flags(img: Qcow2Image) -> None:
    """Set bit 63 of active L1/L2 entries exactly where the refcount is 1."""
    cb = img._cb
    for l1i, e in enumerate(img._l1):
        off = e & OFFSET_MASK
        if not off:
            if e:
                img._l1[l1i] = 0
                img._l1_dirty = True
            continue
        rc = await img.refcount(off >> cb)
        want = off | (COPIED if rc == 1 else 0)
        if want != e:
            img._l1[l1i] = want
            img._l1_dirty = True
        # Entries of shared tables are fixed too: only the active L1 reads the flag.
        t = await img._load_l2(off)
        changed = False
        for i in range(0, len(t), img._stride):
            le = t[i]
            if le & COMPRESSED:
                if le & COPIED:
                    t[i] = le & ~COPIED
                    changed = True
                continue
            host = le & OFFSET_MASK
            if not host:
                if le & COPIED:
                    t[i] = le & ~COPIED
                    changed = True
                continue
            rc2 = await img.refcount(host >> cb)
            new = (le | COPIED) if rc2 == 1 else (le & ~COPIED)
            if new != le:
                t[i] = new
                changed = True
        if changed:
            img._l2[off] = t
            img._l2_dirty.add(off)


async def _begin(img: Qcow2Image) -> None:
    """Mark the image dirty for the span of a snapshot operation (v3 only).

    Adding or dropping a snapshot changes refcounts and the COPIED flags of the
    active tables in separate writes; no order makes every intermediate state
    pass a strict check, so a crash in between must look like a lazy-refcount
    crash: the dirty bit tells the next writable open to rebuild refcounts.
    """
    h = img.header
    if h.version >= 3 and not h.dirty:
        h.incompatible_features |= H.INCOMPAT_DIRTY
        await img._write_header()
        await img._sync()


async def _end(img: Qcow2Image) -> None:
    await img._flush_locked()
    h = img.header
    if h.dirty and not img._lazy_dirty:
        h.incompatible_features &= ~H.INCOMPAT_DIRTY
        await img._write_header()
        await img._sync()


async def _take_back(img: Qcow2Image, raised: list[int]) -> None:
    """An operation failed before anything on disk pointed at what it had
    counted (the snapshot table and the header are as they were): drop each
    reference it added, newest first, and end the dirty span. The image is
    then as it was, where qemu-img leaves the extra counts as leaks (and, for
    a snapshot's clusters, COPIED flags that no longer match).

    Should that fail too (the file failing under us), the dirty bit stays
    set, and the next writable open repairs the refcounts, as after a crash;
    the first failure is the one reported.
    """
    try:
        for c in reversed(raised):
            await img._update_refcount(c, -1)
        await _end(img)
    except (Qcow2Error, OSError):
        pass


async def _read_l1(img: Qcow2Image, snap: Snapshot) -> list[int]:
    """A snapshot's L1 table, its entries without the COPIED flag.

    :raises SnapshotL1Invalid: When the entry's table is unaligned or too large.
    """
    bad = snap.l1_problem(img._cs)
    if bad is not None:
        raise SnapshotL1Invalid(*bad)
    raw = await img._pread(snap.l1_table_offset, snap.l1_size * 8)
    return [e & ~COPIED for e in struct.unpack(f">{snap.l1_size}Q", raw)]


async def _write_table(img: Qcow2Image, snaps: list[Snapshot], *, lenient: bool = False) -> bool:
    """Write a new snapshot table and point the header at it; free the old one.

    :param lenient: for check's repair of a damaged table: old clusters that hold no
        reference (or lie where no refcount reaches) are left alone, and False is returned
        when any were, instead of the image being marked corrupt.
    """
    cs, cb = img._cs, img._cb
    h = img.header
    blob = b"".join(s.serialize(h.version) for s in snaps)
    old_off = h.snapshots_offset
    old_n = -(-_table_len(img) // cs) if h.nb_snapshots else 0
    new_off = 0
    if snaps:
        n = max(1, -(-len(blob) // cs))
        new_off = (await img._alloc_clusters(n)) << cb
        await img._flush_refcounts()
        await img._pwrite(new_off, blob)
        await img._sync()
    h.nb_snapshots = len(snaps)
    h.snapshots_offset = new_off
    await img._write_header()
    await img._sync()
    img.snapshots = snaps
    img._table_bytes = len(blob)
    freed_all = True
    new_clusters = range(new_off >> cb, (new_off + len(blob) + cs - 1) >> cb) if snaps else range(0)
    for c in range(old_off >> cb, (old_off >> cb) + old_n):
        # A damaged table may have spanned clusters nothing counted, which the new one took.
        if lenient and (c in new_clusters or c >= len(img._rt) * img._rb_entries
                        or await img.refcount(c) <= 0):
            freed_all = False
            continue
        await img._update_refcount(c, -1)
    await img._flush_refcounts()
    return freed_all


def _table_len(img: Qcow2Image) -> int:
    if img._table_bytes is not None:
        return img._table_bytes
    return sum(len(s.serialize(img.header.version)) for s in img.snapshots)


def find(img: Qcow2Image, name: str) -> Snapshot | None:
    for s in img.snapshots:
        if s.id == name:
            return s
    for s in img.snapshots:
        if s.name == name:
            return s
    return None


async def create_snapshot(img: Qcow2Image, name: str, *, vm_clock_nsec: int = 0) -> Snapshot:
    img._check_writable()
    async with img._lock:
        await img._flush_locked()
        await _begin(img)
        # Names need not be unique (qemu-img takes a second "s1"); IDs are.
        ids = [int(s.id) for s in img.snapshots if s.id.isdigit()]
        sid = str(max(ids, default=0) + 1)
        cs, cb = img._cs, img._cb
        l1 = [e & ~COPIED for e in img._l1]
        n = -(-len(l1) * 8 // cs)
        raised: list[int] = []  # clusters counted once more, until the table names the snapshot
        try:
            first = await img._alloc_clusters(n) if n else 0
            raised.extend(range(first, first + n))
            l1_off = first << cb
            await _tree_refs(img, img._l1, +1, raised)
            await img._flush_refcounts()
            if l1:
                await img._pwrite(l1_off, struct.pack(f">{len(l1)}Q", *l1))
            await img._sync()
        except Exception:
            await _take_back(img, raised)
            raise
        sec, nsec = img.now()
        # QEMU stamps snapshots to the microsecond and records an instruction
        # count of 0 when it runs without record/replay, as we always do.
        snap = Snapshot(l1_off, len(l1), sid, name, sec, nsec // 1000 * 1000, vm_clock_nsec, 0,
                        disk_size=img.size, icount=0)
        await _write_table(img, img.snapshots + [snap])
        img._l2.clear()
        await fix_copied_flags(img)
        await _end(img)
        img._build_meta_set()
    return snap


async def delete_snapshot(img: Qcow2Image, name: str) -> None:
    img._check_writable()
    async with img._lock:
        # Looked up before _begin: a name that is not there leaves the image untouched.
        snap = find(img, name)
        if snap is None:
            raise Qcow2Error(f"snapshot '{name}' not found")
        await img._flush_locked()
        l1 = await _read_l1(img, snap)
        await _begin(img)
        # From the table's rewrite on, a failure leaves the dirty bit set: the
        # counts may then be above what the tables hold, and the next
        # writable open repairs them.
        await _write_table(img, [s for s in img.snapshots if s is not snap])
        await _tree_refs(img, l1, -1)
        await img._release_table(snap.l1_table_offset, snap.l1_size * 8)
        img._l2.clear()
        await fix_copied_flags(img)
        await _end(img)
        img._build_meta_set()


async def view_snapshot(img: Qcow2Image, *, name: str | None = None, ident: str | None = None,
                        either: str | None = None) -> None:
    """Make a read-only ``img`` read as its internal snapshot does (``convert -l``).

    Only the in-memory L1 table changes, and nothing is written. The size
    stays the image's current one, as with qemu-img: what lies beyond the
    snapshot's tables reads as unallocated.

    :param name: the snapshot's name; :param ident: its ID. Either may be
        left out; given both, both must match. :param either: an ID or,
        failing that, a name (a bare ``-l`` value).
    :raises Qcow2Error: When the image is writable or no snapshot matches.
    """
    if not img.read_only:
        raise Qcow2Error("a snapshot can only be viewed on an image opened read-only")
    snap = None
    if either is not None:
        snap = find(img, either)  # an ID first, then a name: qemu-img's order
    else:
        for s in img.snapshots:
            if (ident is None or s.id == ident) and (name is None or s.name == name):
                snap = s
                break
    if snap is None:
        raise Qcow2Error("Failed to load snapshot: Can't find snapshot")
    bad = snap.l1_problem(img._cs)
    if bad is not None:
        raise SnapshotL1Invalid(f"Failed to load snapshot: {bad[0]}", bad[1])
    async with img._lock:
        img._l1 = await _read_l1(img, snap)
        img._l2.clear()


async def apply_snapshot(img: Qcow2Image, name: str) -> None:
    img._check_writable()
    await img.guest_data_changes()
    async with img._lock:
        # Looked up before _begin: a name that is not there leaves the image untouched.
        snap = find(img, name)
        if snap is None:
            raise Qcow2Error(f"snapshot '{name}' not found")
        await img._flush_locked()
        cs, cb = img._cs, img._cb
        new_l1 = await _read_l1(img, snap)
        await _begin(img)
        h = img.header
        size = snap.disk_size if snap.disk_size else h.size
        need = -(-size // (cs * img._l2_entries))
        if len(new_l1) < need:
            new_l1 += [0] * (need - len(new_l1))
        raised: list[int] = []  # clusters counted once more, until the header names the new L1
        try:
            await _tree_refs(img, new_l1, +1, raised)
            n = -(-len(new_l1) * 8 // cs)
            first = await img._alloc_clusters(n) if n else 0
            raised.extend(range(first, first + n))
            l1_off = first << cb
            await img._flush_refcounts()
            if new_l1:
                await img._pwrite(l1_off, struct.pack(f">{len(new_l1)}Q", *new_l1))
            await img._sync()
        except Exception:
            await _take_back(img, raised)
            raise
        old_l1, old_off, old_size = img._l1, h.l1_table_offset, h.l1_size
        h.l1_table_offset, h.l1_size, h.size = l1_off, len(new_l1), size
        await img._write_header()
        await img._sync()
        img._l1 = new_l1
        img.size = size
        await _tree_refs(img, old_l1, -1)
        await img._release_table(old_off, old_size * 8)
        img._l2.clear()
        await fix_copied_flags(img)
        await _end(img)
        img._build_meta_set()

