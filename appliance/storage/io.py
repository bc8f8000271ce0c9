"""Blocking file I/O for block backends, run in a bounded thread pool.

Data moves between image files and guest RAM with ``os.preadv``/``os.pwritev``
on memoryviews, so Python never copies the payload; the syscalls release the
GIL, so a pool of threads keeps many requests in flight while the loop goes on
(DESIGN.md §1). Everything here is synchronous and meant to run inside the pool
through :func:`run_blocking`; the raw backend uses it and so may the qcow2
engine for its data clusters.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# Linux limits one preadv/pwritev to this many iovecs (UIO_MAXIOV).
IOV_MAX = 1024
DEFAULT_WORKERS = 16

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_pool: ThreadPoolExecutor | None = None


def io_pool() -> ThreadPoolExecutor:
    """The process-wide pool for blocking block I/O (created on first use)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=DEFAULT_WORKERS, thread_name_prefix="blk-io")
    return _pool


async def run_blocking(
    fn: Callable[..., T], *args: object, pool: ThreadPoolExecutor | None = None
) -> T:
    """Run ``fn(*args)`` in the I/O pool and await its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(pool or io_pool(), fn, *args)


def total_len(bufs: Sequence[memoryview]) -> int:
    return sum(b.nbytes for b in bufs)


def advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The part of ``bufs`` after the first ``n`` bytes."""
    i = 0
    while i < len(bufs) and n >= bufs[i].nbytes:
        n -= bufs[i].nbytes
        i += 1
    rest = bufs[i:]
    if n and rest:
        rest[0] = rest[0][n:]
    return rest


def byte_view(b: memoryview) -> memoryview:
    return b if b.format == "B" and b.ndim == 1 else b.cast("B")


def preadv_full(fd: int, bufs: Sequence[memoryview], offset: int) -> int:
    """Fill ``bufs`` from ``offset``, retrying short reads; returns bytes read (less only at EOF)."""
    pending = [byte_view(b) for b in bufs if b.nbytes]
    done = 0
    while pending:
        n = os.preadv(fd, pending[:IOV_MAX], offset + done)
        if n == 0:
            break
        done += n
        pending = advance(pending, n)
    return done


def pwritev_full(fd: int, bufs: Sequence[memoryview], offset: int) -> int:
    """Write all of ``bufs`` at ``offset``, retrying short writes; returns bytes written."""
    pending = [byte_view(b) for b in bufs if b.nbytes]
    done = 0
    while pending:
        n = os.pwritev(fd, pending[:IOV_MAX], offset + done)
        if n == 0:
            raise OSError(28, "short write")
        done += n
        pending = advance(pending, n)
    return done


def zero_from(bufs: Sequence[memoryview], start: int) -> None:
    """Zero every byte of ``bufs`` from byte ``start`` on (the tail after EOF)."""
    pos = 0
    for b in bufs:
        n = b.nbytes
        if pos + n > start:
            skip = max(0, start - pos)
            bv = byte_view(b)
            bv[skip:] = bytes(n - skip)
        pos += n


def buffer_address(b: memoryview) -> int | None:
    """The host address of a writable buffer, or None (read-only or odd buffer)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(b))
    except (TypeError, ValueError):
        return None


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned anonymous buffer (for O_DIRECT bounces)."""
    return mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), which Python only offers without modes (posix_fallocate).

    :raises OSError: With the errno of the call (EOPNOTSUPP where the file
        system lacks the mode).
    """
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != 4:  # EINTR
            raise OSError(err, os.strerror(err))
