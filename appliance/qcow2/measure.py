"""`appliance img measure`: how big a new image would be (qemu-img measure).

Tools size volumes from these numbers before they convert, so they follow
QEMU's arithmetic exactly (block/qcow2.c, qcow2_measure): a fully allocated
qcow2 file is its header cluster, L2 tables for every cluster, an L1 table
rounded to whole clusters, the refcount structure covering all of that and
the data; the required size swaps the data for the clusters the source
really holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from appliance.qcow2 import header as H
from appliance.qcow2.errors import Qcow2Error

_REFTABLE_ENTRY = 8
_BITMAP_DIR_ENTRY = 24  # qcow2.txt, "Bitmap directory": the fixed part of an entry
_BITMAP_TABLE_ENTRY = 8


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount table and blocks that count ``clusters`` and themselves.

    Every cluster is counted, refcount structures included, so grow both
    until another pass adds nothing.
    """
    per_table_cluster = cluster_size // _REFTABLE_ENTRY
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    n, last = 0, -1
    while n != last:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
    return (blocks + table) * cluster_size


def prealloc_size(virtual_size: int, cluster_size: int, refcount_order: int,
                  extended_l2: bool) -> int:
    """The file size of a fully allocated image of ``virtual_size`` bytes."""
    l2e = 16 if extended_l2 else 8
    total = _round_up(virtual_size, cluster_size)
    meta = cluster_size  # the header cluster
    l2_entries = _round_up(total // cluster_size, cluster_size // l2e)
    meta += l2_entries * l2e
    l1_entries = _round_up(l2_entries * l2e // cluster_size, cluster_size // 8)
    meta += l1_entries * 8
    meta += refcount_metadata_size((meta + total) // cluster_size, cluster_size,
                                   refcount_order)
    return meta + total


def bitmaps_size(bitmaps: Iterable[tuple[str, int]], virtual_size: int, cluster_size: int) -> int:
    """Room for copies of (name, granularity) persistent bitmaps, each taken
    as wholly allocated: its data, its table, its directory entry."""
    total = directory = 0
    for name, granularity in bitmaps:
        bits = -(-virtual_size // granularity)
        data = -(-bits // 8)
        clusters = -(-data // cluster_size)
        total += clusters * cluster_size
        total += _round_up(clusters * _BITMAP_TABLE_ENTRY, cluster_size)
        directory += _round_up(_BITMAP_DIR_ENTRY + len(name.encode()), 8)
    return total + _round_up(directory, cluster_size)


@dataclass
class Measure:
    required: int
    fully_allocated: int
    bitmaps: int | None = None  # None: not shown (target or source cannot hold bitmaps)


def measure_qcow2(virtual_size: int, *, cluster_size: int, refcount_bits: int, version: int,
                  extended_l2: bool, preallocation: str, has_backing: bool,
                  data: list[tuple[int, int]] | None,
                  bitmaps: list[tuple[str, int]] | None) -> Measure:
    """qemu-img measure -O qcow2 of a source with ``data`` extents (None: --size).

    :param bitmaps: the source's persistent bitmaps, or None when it can hold none.
    """
    l2e = 16 if extended_l2 else 8
    virtual_size = _round_up(virtual_size, cluster_size)
    l2_tables = -(-(virtual_size // cluster_size) // (cluster_size // l2e))
    if l2_tables * l2e > H.MAX_L1_BYTES:
        raise Qcow2Error("The image size is too large (try using a larger cluster size)")
    required = 0
    if data is not None:
        if has_backing:
            # The backing file may share nothing with the source: count it all.
            required = virtual_size
        else:
            pos = 0
            for start, end in data:
                if end <= pos:
                    continue
                start = max(start, pos)
                # Whole clusters, and the next look starts past this one.
                nxt = _round_up(end, cluster_size)
                required += nxt - start // cluster_size * cluster_size
                pos = nxt
    if preallocation in ("full", "falloc"):
        required = virtual_size
    full = prealloc_size(virtual_size, cluster_size, refcount_bits.bit_length() - 1, extended_l2)
    shown = None
    if version >= 3 and bitmaps is not None:
        shown = bitmaps_size(bitmaps, virtual_size, cluster_size)
    return Measure(full - virtual_size + required, full, shown)


def measure_raw(size: int, *, from_image: bool) -> Measure:
    """qemu-img measure -O raw: every byte of the disk, allocated or not."""
    return Measure(size if from_image else _round_up(size, 512), size if from_image
                   else _round_up(size, 512))
