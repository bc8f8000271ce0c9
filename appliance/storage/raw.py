"""Raw image files (and host block devices) as a :class:`BlockBackend`.

Every request is one job in the I/O pool: ``os.preadv``/``os.pwritev``
straight between the file and the guest's memoryviews. Cache modes follow
QEMU's ``-drive cache=``:

==============  ==========  =========================================
mode            O_DIRECT    flush / write
==============  ==========  =========================================
``writeback``   no          flush = fdatasync
``writethrough`` no         fdatasync after every write as well
``none``        yes         flush = fdatasync (the disk's own cache)
``unsafe``      no          flush does nothing
==============  ==========  =========================================

With O_DIRECT the kernel wants buffers, offsets and lengths aligned to the
device's logical block size; guest buffers usually are, and only when one is
not does the request go through an aligned bounce buffer (read-modify-write
for a write that does not cover whole blocks; guests told our block size do
not send those). ``discard=unmap`` punches holes; write-zeroes uses
``FALLOC_FL_ZERO_RANGE`` or, when the guest allows unmapping, a hole.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal

from appliance.errors import ConfigError
from appliance.storage import io
from appliance.storage.aio import IOCB_CMD_PREADV, IOCB_CMD_PWRITEV, AioUnavailable, LinuxAio
from appliance.storage.errors import BackendOpenError, ReadOnlyError, StorageError
from appliance.storage.locking import lock_image

CacheMode = Literal["none", "writeback", "writethrough", "unsafe"]
DiscardMode = Literal["ignore", "unmap"]
CACHE_MODES = ("none", "writeback", "writethrough", "unsafe", "directsync")
DISCARD_MODES = ("ignore", "unmap", "off", "on")
AIO_MODES = ("threads", "native")

_ZERO_CHUNK = 1 << 20
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY, errno.EINVAL)


def _probe_direct_alignment(fd: int) -> int:
    """The smallest block size O_DIRECT accepts on ``fd`` (4096 when it cannot tell)."""
    buf = io.aligned_buffer(8192)
    try:
        for align in (512, 1024, 2048, 4096):
            try:
                n = os.preadv(fd, [memoryview(buf)[align : 2 * align]], 0)
            except OSError as err:
                if err.errno == errno.EINVAL:
                    continue
                return 4096
            # An empty file reads 0 bytes whatever the alignment: no answer.
            return align if n else 4096
        return 4096
    finally:
        buf.close()


class RawBackend:
    """An open raw image.

    :param path: image file or block device.
    :param read_only: open read-only and refuse writes.
    :param cache: ``none``, ``writeback``, ``writethrough``, ``unsafe`` (and
        ``directsync`` = O_DIRECT plus writethrough).
    :param discard: ``ignore`` or ``unmap`` (punch holes on discard).
    :param aio: ``threads`` (a thread pool) or ``native`` (Linux AIO; needs
        ``cache=none`` or ``directsync``, as in QEMU).
    :param locking: take QEMU-compatible image locks.
    :param pool: thread pool for blocking I/O (default :func:`io.io_pool`).
    :raises ConfigError: When an option value is unknown.
    :raises BackendOpenError: When the file cannot be opened or is locked.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        cache: str = "writeback",
        discard: str = "ignore",
        aio: str = "threads",
        locking: bool = True,
        pool: io.IoPool | None = None,
    ) -> None:
        if cache not in CACHE_MODES:
            raise ConfigError(f"cache={cache} is not one of {', '.join(CACHE_MODES)}")
        if discard not in DISCARD_MODES:
            raise ConfigError(f"discard={discard} is not one of ignore, unmap")
        if aio not in AIO_MODES:
            raise ConfigError(f"aio={aio} is not supported (threads or native)")
        if aio == "native" and cache not in ("none", "directsync"):
            raise ConfigError(
                "aio=native was specified, but it requires cache.direct=on (cache=none)"
            )
        self.path = os.fspath(path)
        self.read_only = read_only
        self.cache = cache
        self.discard_mode = "unmap" if discard in ("unmap", "on") else "ignore"
        self._pool = pool
        # The pool's completion side on the loop of the last start_rw (and that pool).
        self._pool_ring: Any = None
        self._ring_pool: Any = None
        self._direct = cache in ("none", "directsync")
        self._sync_writes = cache in ("writethrough", "directsync")
        self._rmw_lock = threading.Lock()
        self._native = aio == "native"
        self._aio: LinuxAio | None = None
        # O_DIRECT reads never hit the page cache: no point trying RWF_NOWAIT.
        self._nowait = not self._direct and hasattr(os, "RWF_NOWAIT")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if self._direct:
            flags |= os.O_DIRECT
        try:
            self._fd = os.open(self.path, flags)
        except OSError as err:
            if err.errno == errno.EINVAL and self._direct:
                raise BackendOpenError(
                    f"Could not open '{self.path}': the file system does not support "
                    "O_DIRECT (cache=none)"
                ) from None
            raise BackendOpenError(f"Could not open '{self.path}': {err.strerror}") from None
        try:
            st = os.fstat(self._fd)
            if stat.S_ISDIR(st.st_mode):
                raise BackendOpenError(f"Could not open '{self.path}': Is a directory")
            self.size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self._fd, 0, os.SEEK_END)
            if locking:
                lock_image(self._fd, self.path, write=not read_only)
            self._align = _probe_direct_alignment(self._fd) if self._direct else 1
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self.logical_block_size = max(512, self._align)
        self.supports_discard = self.discard_mode == "unmap" and not read_only

    # -- helpers run in the pool ---------------------------------------------

    def _aligned(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        a = self._align
        if a == 1:
            return True
        if offset % a:
            return False
        for b in bufs:
            if b.nbytes % a:
                return False
            addr = io.buffer_address(b)
            if addr is None or addr % a:
                return False
        return True

    def _do_read(self, offset: int, bufs: Sequence[memoryview]) -> int:
        if self._aligned(offset, bufs):
            return io.preadv_full(self._fd, bufs, offset)
        total = io.total_len(bufs)
        a = self._align
        lo = offset - offset % a
        hi = -(-(offset + total) // a) * a
        bounce = io.aligned_buffer(hi - lo)
        try:
            bv = memoryview(bounce)
            got = io.preadv_full(self._fd, [bv], lo) - (offset - lo)
            got = max(0, min(got, total))
            pos = offset - lo
            for b in bufs:
                n = b.nbytes
                io.byte_view(b)[:] = bv[pos : pos + n]
                pos += n
            bv.release()
            return got
        finally:
            bounce.close()

    def _do_write(self, offset: int, bufs: Sequence[memoryview]) -> int:
        if self._aligned(offset, bufs):
            n = io.pwritev_full(self._fd, bufs, offset)
        else:
            n = self._bounce_write(offset, bufs)
        if self._sync_writes:
            os.fdatasync(self._fd)
        return n

    def _bounce_write(self, offset: int, bufs: Sequence[memoryview]) -> int:
        total = io.total_len(bufs)
        a = self._align
        lo = offset - offset % a
        hi = -(-(offset + total) // a) * a
        bounce = io.aligned_buffer(hi - lo)
        bv = memoryview(bounce)
        try:
            # Serialise read-modify-write cycles so two unaligned writes into
            # one block do not undo each other.
            with self._rmw_lock:
                if lo != offset or hi != offset + total:
                    io.preadv_full(self._fd, [bv], lo)
                pos = offset - lo
                for b in bufs:
                    n = b.nbytes
                    bv[pos : pos + n] = io.byte_view(b)
                    pos += n
                io.pwritev_full(self._fd, [bv], lo)
            return total
        finally:
            bv.release()
            bounce.close()

    def _direct_read(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """:meth:`_do_read` for O_DIRECT that lets the kernel check alignment.

        Guest buffers are nearly always aligned, and asking for each
        buffer's address to check costs more than the kernel's own check:
        an unaligned request fails with EINVAL before moving any data and
        is then redone through the checked (bouncing) path.
        """
        try:
            if len(bufs) > io.IOV_MAX:
                return io.preadv_full(self._fd, bufs, offset)
            # One syscall nearly always does it; preadv_full only for the rest.
            n = os.preadv(self._fd, bufs, offset)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            return self._do_read(offset, bufs)
        if n == 0 or n == (bufs[0].nbytes if len(bufs) == 1 else io.total_len(bufs)):
            return n
        return n + io.preadv_full(self._fd, io.advance(list(bufs), n), offset + n)

    def _direct_write(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """:meth:`_do_write` for O_DIRECT; alignment as in :meth:`_direct_read`."""
        try:
            if len(bufs) > io.IOV_MAX:
                n = io.pwritev_full(self._fd, bufs, offset)
            else:
                n = os.pwritev(self._fd, bufs, offset)
                total = bufs[0].nbytes if len(bufs) == 1 else io.total_len(bufs)
                if n < total:
                    n += io.pwritev_full(self._fd, io.advance(list(bufs), n), offset + n)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            return self._do_write(offset, bufs)
        if self._sync_writes:
            os.fdatasync(self._fd)
        return n

    def _do_zero(self, offset: int, length: int, may_unmap: bool) -> None:
        if may_unmap and self.discard_mode == "unmap":
            try:
                io.fallocate(self._fd, io.FALLOC_FL_PUNCH_HOLE | io.FALLOC_FL_KEEP_SIZE, offset, length)
                return self._after_meta_write()
            except OSError as err:
                if err.errno not in _NOT_SUPPORTED:
                    raise
        try:
            io.fallocate(self._fd, io.FALLOC_FL_ZERO_RANGE | io.FALLOC_FL_KEEP_SIZE, offset, length)
            return self._after_meta_write()
        except OSError as err:
            if err.errno not in _NOT_SUPPORTED:
                raise
        buf = io.aligned_buffer(min(length, _ZERO_CHUNK))
        try:
            pos = 0
            while pos < length:
                n = min(len(buf), length - pos)
                io.pwritev_full(self._fd, [memoryview(buf)[:n]], offset + pos)
                pos += n
        finally:
            buf.close()
        self._after_meta_write()

    def _after_meta_write(self) -> None:
        if self._sync_writes:
            os.fdatasync(self._fd)

    def _do_discard(self, offset: int, length: int) -> None:
        try:
            io.fallocate(self._fd, io.FALLOC_FL_PUNCH_HOLE | io.FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as err:
            # A discard is a hint; a file system without holes just keeps the data.
            if err.errno not in _NOT_SUPPORTED:
                raise

    # -- BlockBackend ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._fd < 0:
            raise StorageError(f"'{self.path}' is closed")

    def _read_cached(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """Read what the page cache already holds, on the loop without blocking.

        ``RWF_NOWAIT`` makes ``preadv2`` fail with EAGAIN instead of waiting
        for the disk, so a cached read costs one syscall and no thread hop.
        """
        if not self._nowait:
            return 0
        try:
            return os.preadv(self._fd, bufs[: io.IOV_MAX], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as err:
            if err.errno in _NOT_SUPPORTED:
                self._nowait = False
                return 0
            raise

    def _linux_aio(self) -> LinuxAio | None:
        """This backend's AIO context on the running loop (None: use threads)."""
        aio = self._aio
        loop = asyncio.get_running_loop()
        if aio is not None and aio.loop is loop and not aio.closed:
            return aio
        if aio is not None:
            if not aio.loop.is_closed():
                return None  # in use by another live loop
            aio.close()
        try:
            self._aio = LinuxAio()
        except AioUnavailable:
            self._native = False
            return None
        return self._aio

    def start_rw(
        self,
        write: bool,
        offset: int,
        bufs: Sequence[memoryview],
        done: Callable[[Any, int, BaseException | None], None],
        token: Any,
    ) -> bool:
        """Start a read (or write) of ``bufs`` at ``offset`` without a coroutine.

        ``done(token, nbytes, error)`` is called later on the running loop
        (from inside this call only when the kernel refuses the request
        outright): the byte count (a read is short only at
        the end of the file; a write may be short only with native AIO, on a
        full disk) or 0 and the :class:`OSError`. This is the data-path form
        of :meth:`readv`/:meth:`writev` for virtio-blk: per request it saves
        three coroutines, a future and its callback, about half the loop's
        CPU for a 4 KiB request. Only O_DIRECT images take it: returns False
        (nothing started) for the page cache (whose reads are served inline
        by :meth:`readv`), a read-only image asked to write, a closed one, or
        a pool bound to another loop; the caller then awaits
        :meth:`readv`/:meth:`writev`.
        """
        if not self._direct or self._fd < 0 or not bufs or (write and self.read_only):
            return False
        if self._native and not (write and self._sync_writes):
            aio = self._linux_aio()
            if aio is not None and aio.start(
                IOCB_CMD_PWRITEV if write else IOCB_CMD_PREADV, self._fd, bufs, offset,
                done, token, eager=True, align=self._align,
            ):
                return True
            # Unaligned (bounce) or no AIO here: the thread pool does it.
        pool = self._pool or io.io_pool()
        fn = self._direct_write if write else self._direct_read
        ring = self._pool_ring
        if ring is None or self._ring_pool is not pool or not ring.here():
            # pool.start() would look the ring up per request, a getpid() each.
            ring = self._pool_ring = pool.ring()
            self._ring_pool = pool
        return pool.start(fn, (offset, bufs), done, token, ring)

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        self._check_open()
        if self._native and bufs and self._aligned(offset, bufs):
            aio = self._linux_aio()
            if aio is not None:
                try:
                    return await aio.submit(IOCB_CMD_PREADV, self._fd, bufs, offset)
                except OSError as err:
                    raise StorageError(f"read of '{self.path}' at {offset} failed") from err
        try:
            total = io.total_len(bufs)
            got = self._read_cached(offset, bufs)
            if got == total:
                return got
            if got:
                rest = io.advance(list(bufs), got)
                return got + await io.run_blocking(
                    self._do_read, offset + got, rest, pool=self._pool
                )
            return await io.run_blocking(self._do_read, offset, bufs, pool=self._pool)
        except OSError as err:
            raise StorageError(f"read of '{self.path}' at {offset} failed") from err

    async def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        self._check_open()
        if self.read_only:
            raise ReadOnlyError(f"'{self.path}' is read-only")
        try:
            if self._native and bufs and self._aligned(offset, bufs):
                aio = self._linux_aio()
                if aio is not None:
                    return await self._native_write(aio, offset, bufs)
            return await io.run_blocking(self._do_write, offset, bufs, pool=self._pool)
        except OSError as err:
            raise StorageError(f"write to '{self.path}' at {offset} failed") from err

    async def _native_write(self, aio: LinuxAio, offset: int, bufs: Sequence[memoryview]) -> int:
        total = io.total_len(bufs)
        n = await aio.submit(IOCB_CMD_PWRITEV, self._fd, bufs, offset)
        if n < total:
            # A short O_DIRECT write (disk full, signal): finish it with threads.
            rest = io.advance(list(bufs), n)
            n += await io.run_blocking(io.pwritev_full, self._fd, rest, offset + n, pool=self._pool)
        if self._sync_writes:
            await io.run_blocking(os.fdatasync, self._fd, pool=self._pool)
        return n

    async def flush(self) -> None:
        self._check_open()
        if self.read_only or self.cache == "unsafe":
            return
        try:
            await io.run_blocking(os.fdatasync, self._fd, pool=self._pool)
        except OSError as err:
            raise StorageError(f"flush of '{self.path}' failed") from err

    async def discard(self, offset: int, length: int) -> None:
        self._check_open()
        if self.read_only:
            raise ReadOnlyError(f"'{self.path}' is read-only")
        if self.discard_mode != "unmap" or length <= 0:
            return
        try:
            await io.run_blocking(self._do_discard, offset, length, pool=self._pool)
        except OSError as err:
            raise StorageError(f"discard on '{self.path}' at {offset} failed") from err

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self._check_open()
        if self.read_only:
            raise ReadOnlyError(f"'{self.path}' is read-only")
        if length <= 0:
            return
        try:
            await io.run_blocking(self._do_zero, offset, length, may_unmap, pool=self._pool)
        except OSError as err:
            raise StorageError(f"write-zeroes on '{self.path}' at {offset} failed") from err

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        """Close synchronously (drops the image locks)."""
        if self._aio is not None:
            self._aio.close()
            self._aio = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"RawBackend({self.path!r}, read_only={self.read_only}, cache={self.cache})"


def open_raw(
    path: str | os.PathLike[str],
    *,
    read_only: bool = False,
    cache: str = "writeback",
    discard: str = "ignore",
    aio: str = "threads",
    locking: bool = True,
) -> RawBackend:
    """Open a raw image; options as :class:`RawBackend`.

    :raises BackendOpenError: With a one-line message when it cannot be opened
        or another process holds a conflicting lock.
    :raises ConfigError: When an option value is unknown.
    """
    return RawBackend(
        path, read_only=read_only, cache=cache, discard=discard, aio=aio, locking=locking
    )
