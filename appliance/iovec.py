"""Scatter over a list of memoryviews (an iovec in Python): the shared copy of the device
paths that hand bytes to guest buffers or to a backend's reader (virtio-net, virtio-blk, the
network hub)."""

from __future__ import annotations

from collections.abc import Sequence


def scatter(views: Sequence[memoryview], data: bytes | memoryview) -> int:
    """Copy ``data`` into ``views`` in order, as far as they hold it; returns the bytes copied."""
    off = 0
    for v in views:
        if off >= len(data):
            break
        take = min(len(v), len(data) - off)
        v[:take] = data[off : off + take]
        off += take
    return off
