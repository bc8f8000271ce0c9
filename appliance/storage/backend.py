"""The BlockBackend protocol: what virtio-blk and virtio-scsi need of a disk.

Implemented by :mod:`appliance.storage.raw` and :mod:`appliance.qcow2`. Offsets
and lengths are in bytes; buffers are memoryviews, usually slices of guest RAM,
so data moves between the file and the guest without copies in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class BlockBackend(Protocol):
    """An open disk image.

    ``size`` is the virtual size in bytes; ``read_only`` refuses writes;
    ``logical_block_size`` is 512 unless the backend needs more (O_DIRECT on a
    4K device); ``supports_discard`` tells devices whether to offer DISCARD.
    Every method may raise :class:`appliance.storage.errors.StorageError`.
    """

    size: int
    read_only: bool
    logical_block_size: int
    supports_discard: bool

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """Fill ``bufs`` in order from ``offset``; returns bytes read (short only at EOF)."""
        ...

    async def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """Write ``bufs`` in order at ``offset``; returns bytes written."""
        ...

    async def flush(self) -> None:
        """Make every completed write durable."""
        ...

    async def discard(self, offset: int, length: int) -> None:
        """Hint that the range is unused; reads may then return zeroes or old data."""
        ...

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """Make the range read as zeroes, deallocating it if ``may_unmap``."""
        ...

    async def close(self) -> None:
        ...
