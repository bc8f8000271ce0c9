"""Creating images: ``appliance img create`` and the ``-snapshot`` overlay.

The layout matches what QEMU writes: header in cluster 0, refcount table in
cluster 1, the first refcount block in cluster 2, the L1 table from cluster 3.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from appliance.qcow2 import header as H
from appliance.qcow2.errors import Qcow2Error
from appliance.qcow2.refcount import encode_block


@dataclass
class CreateOptions:
    size: int
    cluster_size: int = 65536
    compat: str = "1.1"
    lazy_refcounts: bool = False
    refcount_bits: int = 16
    compression_type: str = "zlib"
    extended_l2: bool = False
    preallocation: str = "off"
    backing_file: str | None = None
    backing_fmt: str | None = None


def build_image(opts: CreateOptions) -> bytes:
    """The bytes of an empty qcow2 image (before any preallocation)."""
    # Checked in qemu-img's order, with its words (the option parser's first).
    v3 = "(use version=v3 or greater)"
    if opts.preallocation not in ("off", "metadata", "falloc", "full"):
        raise Qcow2Error(f"Parameter 'preallocation' does not accept value '{opts.preallocation}'")
    if opts.compat not in ("0.10", "1.1", "v2", "v3"):
        raise Qcow2Error(f"Parameter 'version' does not accept value '{opts.compat}'")
    if opts.compression_type not in ("zlib", "zstd"):
        raise Qcow2Error(f"Parameter 'compression-type' does not accept value "
                         f"'{opts.compression_type}'")
    version = 2 if opts.compat in ("0.10", "v2") else 3
    cs = opts.cluster_size
    if opts.extended_l2 and version < 3:
        raise Qcow2Error(f"Extended L2 entries are only supported with compatibility level 1.1 "
                         f"and above {v3}")
    if opts.extended_l2 and cs < 16384:
        raise Qcow2Error("Extended L2 entries are only supported with cluster sizes of at "
                         "least 16384 bytes")
    if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
        raise Qcow2Error("Cluster size must be a power of two between 512 and 2048k")
    cb = cs.bit_length() - 1
    if opts.lazy_refcounts and version < 3:
        raise Qcow2Error(f"Lazy refcounts only supported with compatibility level 1.1 and "
                         f"above {v3}")
    rb = opts.refcount_bits
    if rb < 1 or rb > 64 or rb & (rb - 1):
        raise Qcow2Error("Refcount width must be a power of two and may not exceed 64 bits")
    if rb != 16 and version < 3:
        raise Qcow2Error(f"Different refcount widths than 16 bits require compatibility level "
                         f"1.1 or above {v3}")
    if opts.compression_type != "zlib" and version < 3:
        raise Qcow2Error(f"Non-zlib compression type is only supported with compatibility "
                         f"level 1.1 and above {v3}")
    # Disks are whole 512-byte sectors: QEMU rounds a size like 15 up to 512.
    opts.size = -(-opts.size // 512) * 512
    if opts.size < 0 or opts.size >= 1 << 63:
        raise Qcow2Error("Image size must be less than 8 EiB!")
    l2_entries = cs // (16 if opts.extended_l2 else 8)
    l1_size = -(-opts.size // (cs * l2_entries))
    if l1_size * 8 > H.MAX_L1_BYTES:
        raise Qcow2Error("Image size is too large for this cluster size")
    l1_clusters = -(-l1_size * 8 // cs)  # an empty disk has no L1 table at all
    order = rb.bit_length() - 1
    entries = cs * 8 // rb
    # Header, refcount table, first refcount block, L1 table, then any further
    # refcount blocks (QEMU's layout), grown until the structure covers itself.
    rt_clusters, n_rb = 1, 1
    while True:
        total = 2 + rt_clusters + l1_clusters + (n_rb - 1)
        need_rb = -(-total // entries)
        need_rt = -(-need_rb * 8 // cs)
        if need_rb <= n_rb and need_rt <= rt_clusters:
            break
        n_rb, rt_clusters = max(n_rb, need_rb), max(rt_clusters, need_rt)
    if rt_clusters * cs > H.MAX_REFTABLE_BYTES:
        raise Qcow2Error("Image size is too large for this cluster size and refcount width")
    l1_off = (2 + rt_clusters) * cs
    h = H.Header(
        version=version, cluster_bits=cb, size=opts.size, l1_size=l1_size,
        l1_table_offset=l1_off if l1_size else 0, refcount_table_offset=cs,
        refcount_table_clusters=rt_clusters, refcount_order=order,
    )
    if version == 3:
        if opts.lazy_refcounts:
            h.compatible_features |= H.COMPAT_LAZY_REFCOUNTS
        if opts.extended_l2:
            h.incompatible_features |= H.INCOMPAT_EXTL2
        if opts.compression_type == "zstd":
            h.incompatible_features |= H.INCOMPAT_COMPRESSION
            h.compression_type = H.COMPRESSION_ZSTD
        h.extensions.append((H.EXT_FEATURE_TABLE, H.feature_table()))
    if opts.backing_file is not None:
        h.backing_file = opts.backing_file
        if opts.backing_fmt:
            h.set_ext(H.EXT_BACKING_FORMAT, opts.backing_fmt.encode())
    total = 2 + rt_clusters + l1_clusters + (n_rb - 1)
    rb_clusters = [1 + rt_clusters] + [2 + rt_clusters + l1_clusters + i for i in range(n_rb - 1)]
    out = bytearray(total * cs)
    head = h.serialize()
    out[: len(head)] = head
    for i, c in enumerate(rb_clusters):
        struct.pack_into(">Q", out, cs + 8 * i, c * cs)
        first = i * entries
        rc = [1 if first + k < total else 0 for k in range(entries)]
        out[c * cs : (c + 1) * cs] = encode_block(rc, order)
    if n_rb == 1:
        # Like QEMU, the file ends with the L1 table rather than its cluster.
        return bytes(out[: l1_off + l1_size * 8] if l1_size else out[: l1_off])
    return bytes(out)


def _create_file(path: str | os.PathLike[str]) -> int:
    """The new image file, emptied; a failure in QEMU's file driver's words."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except IsADirectoryError:
        raise Qcow2Error(f"Could not create '{os.fspath(path)}': Is a directory") from None
    except OSError as err:
        raise Qcow2Error(f"Could not create '{os.fspath(path)}': {err.strerror}") from None


def create_raw(path: str | os.PathLike[str], size: int, preallocation: str = "off") -> None:
    """A raw image of ``size`` rounded up to whole sectors, as qemu-img makes one.

    Like QEMU's file driver it writes the first block (4 KiB, or the whole
    file if smaller) so the file has an allocated block to probe O_DIRECT
    alignment on; ``qemu-img map`` and the disk size show that block.

    :raises Qcow2Error: for a preallocation mode QEMU does not know (before
        the file is touched) or one a raw file cannot have (``metadata``:
        after it is created empty, as QEMU's file driver leaves it).
    """
    if preallocation not in ("off", "metadata", "falloc", "full"):
        raise Qcow2Error(f"invalid parameter value: {preallocation}")
    size = -(-size // 512) * 512
    fd = _create_file(path)
    try:
        if preallocation == "metadata":
            raise Qcow2Error("Unsupported preallocation mode: metadata")
        os.ftruncate(fd, size)
        if preallocation == "falloc" and size:
            os.posix_fallocate(fd, 0, size)
        elif preallocation == "full":
            zero = bytes(1 << 20)
            pos = 0
            while pos < size:
                pos += os.pwrite(fd, zero[: min(len(zero), size - pos)], pos)
        if size:
            os.pwrite(fd, bytes(min(size, 4096)), 0)
    finally:
        os.close(fd)


async def create_image(path: str | os.PathLike[str], opts: CreateOptions) -> None:
    data = build_image(opts)
    fd = _create_file(path)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if opts.preallocation != "off":
        from appliance.qcow2.image import Qcow2Image

        img = await Qcow2Image.open(path, read_only=False, backing_override=False)
        try:
            await preallocate(img, opts.preallocation)
        finally:
            await img.close()


async def preallocate(img: object, mode: str, first: int = 0) -> None:
    """Allocate L2 tables and data clusters (metadata|falloc|full) from guest cluster ``first`` on.

    ``first`` > 0 is a resize's new tail; the clusters there are unallocated.
    """
    from appliance.qcow2.image import COPIED, Qcow2Image

    assert isinstance(img, Qcow2Image)
    if mode not in ("metadata", "falloc", "full"):
        raise Qcow2Error(f"Invalid preallocation mode: '{mode}'")
    cs, cb = img._cs, img._cb
    total = -(-img.size // cs)
    count = max(0, total - first)
    async with img._lock:
        # Laid out as qemu-img lays them out: for metadata each L2 table
        # before its data; for falloc/full one contiguous data run first and
        # the L2 tables after it.
        run = await img._alloc_clusters(count) if mode != "metadata" and count else None
        gc = first
        while gc < total:
            l1i = gc >> img._l2_bits
            n = min(total - gc, img._l2_entries - (gc & (img._l2_entries - 1)))
            l2off, t = await img._l2_for_write(l1i)
            start = run + gc - first if run is not None else await img._alloc_clusters(n)
            for k in range(n):
                i = ((gc + k) & (img._l2_entries - 1)) * img._stride
                t[i] = ((start + k) << cb) | COPIED
                if img._ext:
                    # Host cluster kept, every subcluster still unallocated
                    # (qcow2.txt, extended L2 bitmap): reads keep going to the
                    # backing file, which is why QEMU allows preallocating an
                    # overlay only with extended L2 entries.
                    t[i + 1] = 0
            img._l2_dirty.add(l2off)
            gc += n
        await img._flush_locked()
    # The allocator hands out clusters up to the last one counted; the file
    # must reach that far even where nothing was written.
    last = 0
    c = 0
    while True:
        if await img.refcount(c):
            last = c
        if c > (img.file_size >> cb) + count + 16:
            break
        c += 1
    end = (last + 1) << cb
    os.ftruncate(img._fd, max(end, img.file_size))
    if run is not None and mode == "falloc":
        os.posix_fallocate(img._fd, run << cb, count << cb)
    elif run is not None:
        # full: the new data run holds written zeroes (no file holes).
        zero = bytes(1 << 20)
        pos, stop = run << cb, (run + count) << cb
        while pos < stop:
            pos += os.pwrite(img._fd, zero[:min(len(zero), stop - pos)], pos)
    img.file_size = max(end, img.file_size)


def temp_overlay_options(base: Path, base_fmt: str, size: int) -> CreateOptions:
    return CreateOptions(size=size, backing_file=str(base.resolve()), backing_fmt=base_fmt)
