"""Whole-image qcow2 operations: resize and amend.

Both run on a flushed image under the metadata lock and write the new
structure before the header points at it, then free the old one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from appliance.errors import ConfigError
from appliance.qcow2 import header as H
from appliance.qcow2.errors import Qcow2Error
from appliance.qcow2.image import COMPRESSED, COPIED, OFFSET_MASK, ZERO_FLAG, Qcow2Image


async def resize(img: Qcow2Image, new: int) -> None:
    """Grow (or, with the caller's consent, shrink) the virtual disk."""
    img._check_writable()
    # Each snapshot keeps its own L1 table and its disk size (the extra data
    # field version 3 requires, qcow2.txt "Snapshots"), and applying one puts
    # that size back; version 2 did not require the field, so its snapshots
    # cannot be trusted to bring their size along.
    if img.snapshots and img.header.version < 3:
        raise Qcow2Error("Can't resize a v2 image which has snapshots")
    if new >= 1 << 63:
        raise Qcow2Error("Image size is too large")
    if new % 512:
        raise Qcow2Error("The new size must be a multiple of 512")
    from appliance.qcow2.bitmaps import FLAG_IN_USE

    for b in img.bitmaps:
        # QEMU would have to resize it and cannot trust it: refused as QEMU refuses it.
        if b.flags & FLAG_IN_USE:
            raise Qcow2Error(f"Bitmap '{b.name}' is inconsistent and cannot be used")
    await img.guest_data_changes()  # bitmaps no longer cover the disk
    cs, cb = img._cs, img._cb
    need = -(-new // (cs * img._l2_entries))
    if new < img.size:
        first = -(-new // cs) * cs
        if first < img.size:
            if first >> cb >> img._l2_bits < need:
                # QEMU's discard of the cut-off tail takes the L2 table of
                # the entry the new end falls in, even an unallocated one.
                async with img._lock:
                    await img._l2_for_write(first >> cb >> img._l2_bits)
            await img._zero_whole(first, img.size - first, "empty")
        await _shrink_tail(img, need)
    async with img._lock:
        await img._flush_locked()
        h = img.header
        if need * 8 > H.MAX_L1_BYTES:
            raise Qcow2Error("Image size is too large for this cluster size")
        if need > len(img._l1):
            new_l1 = img._l1 + [0] * (need - len(img._l1))
            n = -(-need * 8 // cs)
            off = (await img._alloc_clusters(n)) << cb
            await img._flush_refcounts()
            await img._pwrite(off, struct.pack(f">{need}Q", *new_l1))
            await img._sync()
            old_off, old_size = h.l1_table_offset, h.l1_size
            h.l1_table_offset, h.l1_size, h.size = off, need, new
            await img._write_header()
            await img._sync()
            img._l1 = new_l1
            await img._release_table(old_off, old_size * 8)
            await img._flush_refcounts()
        else:
            h.size = new
            await img._write_header()
            await img._sync()
        img.size = new
        img._build_meta_set()


async def _shrink_tail(img: Qcow2Image, keep: int) -> None:
    """After a shrink: free the L2 tables of L1 entries wholly past the new
    end (the L1 table keeps its size) and cut the file after its last used
    cluster, as QEMU leaves a shrunk image."""
    async with img._lock:
        await img._flush_locked()
        gone = [(i, e) for i, e in enumerate(img._l1[keep:], keep) if e & OFFSET_MASK]
        if gone:
            for i, _ in gone:
                img._l1[i] = 0
            # The L1 entries go before the tables they name are freed.
            await img._pwrite(img.header.l1_table_offset + keep * 8, bytes(8 * (len(img._l1) - keep)))
            await img._sync()
            for _, e in gone:
                off = e & OFFSET_MASK
                img._l2.pop(off, None)
                img._l2_dirty.discard(off)
                img._meta.discard(off >> img._cb)
                await img._update_refcount(off >> img._cb, -1)
            await img._flush_refcounts()
            await img._sync()
        last = (img.file_size - 1) >> img._cb
        while last > 0 and await img.refcount(last) == 0:
            last -= 1
        end = (last + 1) << img._cb
        if end < img.file_size:
            os.ftruncate(img._fd, end)
            img.file_size = end
            img._alloc_end = min(img._alloc_end, end)
            img._written_end = min(img._written_end, end)
            img._open_size = min(img._open_size, end)
            img._falloc_end = min(img._falloc_end, end)


async def _has_compressed_clusters(img: Qcow2Image) -> bool:
    return await _any_l2_entry(img, lambda v: bool(v & COMPRESSED))


async def _l2_tables(img: Qcow2Image) -> dict[int, int]:
    """Offset -> number of L1 entries (active and snapshots') naming it, per L2 table."""
    l1s = [img._l1]
    for s in img.snapshots:
        if s.l1_problem(img._cs) is not None:
            continue  # a table that cannot be loaded names no L2 table
        raw = await img._pread(s.l1_table_offset, s.l1_size * 8)
        l1s.append(list(struct.unpack(f">{s.l1_size}Q", raw)))
    users: dict[int, int] = {}
    for l1 in l1s:
        for e in l1:
            off = e & OFFSET_MASK
            if off:
                users[off] = users.get(off, 0) + 1
    return users


async def _any_l2_entry(img: Qcow2Image, test: Callable[[int], bool]) -> bool:
    """Whether an L2 entry of the active table or of any snapshot passes ``test``."""
    for off in await _l2_tables(img):
        t = await img._load_l2(off)
        for v in t[:: img._stride]:
            if test(v):
                return True
    return False


async def _expand_zero_clusters(img: Qcow2Image) -> None:
    """Turn every zero cluster into one v2 can read (amend -o compat=0.10). Under the lock.

    Version 2 has no zero flag (qcow2.txt, standard cluster descriptor bit
    0), so: a zero cluster that keeps its host cluster gets zeroes written
    there; one without, over a backing file, gets a new cluster of zeroes;
    one without and with no backing file becomes unallocated, which reads
    as zeroes anyway. An L2 table several L1 tables share is changed once,
    and a new cluster in it counts once per user (its COPIED flag only when
    there is one).
    """
    cs = img._cs
    zero = bytes(cs)
    for off, users in (await _l2_tables(img)).items():
        table = await img._load_l2(off)
        changed = False
        for i, v in enumerate(table):
            if not v & ZERO_FLAG or v & COMPRESSED:
                continue
            host = v & OFFSET_MASK
            if host:
                await img._pwrite(host, zero)
                table[i] = v & ~ZERO_FLAG
            elif not img.header.backing_file:
                table[i] = 0
            else:
                c = await img._alloc_clusters(1)
                if users > 1:
                    await img._update_refcount(c, users - 1)
                await img._pwrite(c * cs, zero)
                table[i] = (c * cs) | (COPIED if users == 1 else 0)
            changed = True
        if changed:
            # The zeroes and refcounts reach the disk before the entries naming them.
            await img._flush_refcounts()
            await img._sync()
            await img._write_l2(off, table)
    await img._sync()


async def _change_refcount_order(img: Qcow2Image, order: int) -> None:
    """Rewrite every refcount with ``2**order`` bits (amend -o refcount_bits). Under the lock.

    The new table and blocks are built from the counts the metadata implies,
    in fresh clusters past the end of the file, and the header switches width
    and table in one write (check.rebuild_refcounts): a crash before that
    write leaves the old structure in charge, after it the new one; the old
    clusters are simply not counted any more.
    """
    from appliance.qcow2.check import CheckResult, compute_refs, rebuild_refcounts

    res = CheckResult()
    w = await compute_refs(img, res, with_refcount_structs=False)
    if res.corruptions:
        raise Qcow2Error("Cannot change the refcount width of an image with corruptions")
    limit = (1 << (1 << order)) - 1
    for c, n in enumerate(w.refs):
        if n > limit:
            raise Qcow2Error(f"Cannot decrease refcount entry width to {1 << order} bits: "
                             f"Cluster at offset {c << img._cb:#x} has a refcount of {n}")
    img.header.refcount_order = order
    img._rc_order = order
    img._rc_max = limit
    img._rb_entries = img._cs * 8 // (1 << order)
    await rebuild_refcounts(img)


# qemu-img create options amend refuses by name, and QEMU's spellings of a boolean.
_CREATE_ONLY = frozenset({"cluster_size", "compression_type", "extended_l2", "preallocation",
                          "encryption", "encrypt"})
# What qcow2's amend takes (QCOW_COMMON_OPTIONS in QEMU's block/qcow2.c).
_AMEND_KEYS = frozenset({"compat", "size", "lazy_refcounts", "refcount_bits", "backing_file",
                         "backing_fmt", "data_file", "data_file_raw"})
_BOOLS = {"on": True, "yes": True, "true": True, "y": True,
          "off": False, "no": False, "false": False, "n": False}


def _quiet(pct: float) -> None:
    """No progress to report."""


async def amend(img: Qcow2Image, opts: dict[str, str],
                progress: Callable[[float], None] | None = None) -> None:
    """Change compat, lazy_refcounts, refcount_bits, backing file or size of an image.

    :param progress: told how far the work is (0 to 100) where qemu-img's
        qcow2 driver tells it, from once the options are taken: ``amend -p``.
    """
    from appliance.qcow2.cli import option_number, option_size

    img._check_writable()
    h = img.header
    new_size = 0
    # QEMU's option parser first: names, sizes, numbers and booleans, in the order given.
    for k, v in opts.items():
        if k == "size":
            new_size = option_size(k, v)
        elif k == "refcount_bits":
            option_number(k, v)
        elif k == "lazy_refcounts" and v not in _BOOLS:
            raise Qcow2Error("Parameter 'lazy_refcounts' expects 'on' or 'off'")
        elif k in _CREATE_ONLY or k.startswith("encrypt."):
            raise Qcow2Error(f"Invalid parameter '{k}'\nThis option is only supported for "
                             "image creation")
        elif k not in _AMEND_KEYS:
            raise ConfigError(f"Invalid parameter '{k}'")
    tell = progress or _quiet
    tell(0.0)
    compat = opts.pop("compat", None)
    lazy = opts.pop("lazy_refcounts", None)
    size = opts.pop("size", None)
    if "backing_file" in opts or "backing_fmt" in opts:
        # As qemu-img 7.2: changing the backing file is what rebase is for.
        raise Qcow2Error("Cannot amend the backing file: you can use 'appliance img rebase' instead")
    rbits = opts.pop("refcount_bits", None)
    new_order = None
    if rbits is not None:
        bits = option_number("refcount_bits", rbits)
        if bits < 1 or bits > 64 or bits & (bits - 1):
            raise Qcow2Error("Refcount width must be a power of two and may not exceed 64 bits")
        new_order = bits.bit_length() - 1
        v3 = compat in ("1.1", "v3") or (h.version >= 3 and compat not in ("0.10", "v2"))
        if new_order != 4 and not v3:
            raise Qcow2Error("Refcount widths other than 16 bits require compatibility level "
                             "1.1 or above (use compat=1.1 or greater)")
    if opts:  # data_file or data_file_raw: what is left
        raise Qcow2Error("data-file can only be set for images that use an external data file")
    async with img._lock:
        await img._flush_locked()
        if compat in ("1.1", "v3") and h.version == 2:
            tell(0.0)  # qemu-img's upgrade reports its two steps
            h.version = 3
            h.set_ext(H.EXT_FEATURE_TABLE, H.feature_table())
            tell(50.0)
            tell(100.0)
        elif compat in ("0.10", "v2") and h.version == 3:
            # v2 has 16-bit refcounts only; as qemu-img, rewriting them must be asked for.
            if h.refcount_order != 4 and new_order != 4:
                raise Qcow2Error("compat=0.10 requires refcount_bits=16")
            # v2 programs may ignore a snapshot's extra data: a snapshot of
            # another size, or whose VM state needs more than 32 bits, would
            # come back wrong there.
            if any(sn.vm_state_size > 0xFFFFFFFF or (sn.disk_size or h.size) != h.size
                   for sn in img.snapshots):
                raise Qcow2Error("Internal snapshots prevent downgrade of image")
            if h.compression_type and await _has_compressed_clusters(img):
                raise Qcow2Error("Cannot downgrade an image with zstd compression type and "
                                 "existing compressed clusters")
            # v2 knows no incompatible features; a dirty bit was settled by the flush
            # above and zlib is v2's compression, so only the others stand in the way.
            blocking = h.incompatible_features & ~(H.INCOMPAT_DIRTY | H.INCOMPAT_COMPRESSION)
            if blocking:
                raise Qcow2Error(f"Cannot downgrade an image with incompatible features {blocking:#x} set")
            await _expand_zero_clusters(img)
            h.compression_type = 0
            h.version = 2
            h.compatible_features = h.autoclear_features = h.incompatible_features = 0
            h.extra_fields = b""
            h.set_ext(H.EXT_FEATURE_TABLE, None)
            tell(100.0)
        elif compat not in (None, "1.1", "v3", "0.10", "v2"):
            raise Qcow2Error(f"Unknown compatibility level {compat}")
        if new_order is not None and new_order != h.refcount_order:
            tell(0.0)
            await _change_refcount_order(img, new_order)
            tell(100.0)
        if lazy is not None:
            on = _BOOLS[lazy]
            if on and h.version < 3:
                raise Qcow2Error("Lazy refcounts only supported with compatibility level 1.1 "
                                 "and above (use compat=1.1 or greater)")
            if on:
                h.compatible_features |= H.COMPAT_LAZY_REFCOUNTS
            else:
                h.compatible_features &= ~H.COMPAT_LAZY_REFCOUNTS
        await img._write_header()
        await img._sync()
    if size is not None:
        await resize(img, new_size)
