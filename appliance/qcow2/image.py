"""The async qcow2 engine: :class:`Qcow2Image` is a BlockBackend.

Shape (STYLE.md example 10): a request first maps its guest range to extents
under one asyncio.Lock (L1/L2 lookups, allocation), then moves data with
``os.preadv``/``os.pwritev`` in a bounded thread pool straight from/to the
caller's memoryviews, outside the lock. An allocating write registers its
guest clusters as in flight, so a second write to the same cluster waits and
re-plans instead of allocating twice; it publishes its L2 entries only after
the data is written.

Crash consistency (qcow2.txt, "Host cluster management"): metadata is cached
and written back in dependency order, with fdatasync barriers between:
refcount blocks, then the refcount table (and header on relocation), then L2
tables, then the L1 table. Refcount *increments* may therefore reach the disk
at any time (an early increment is only a leak). Decrements are held back as
pending frees until every L2 table that dropped the reference is durable, so a
crash can leak clusters but never leaves an L2 entry pointing at a free cluster.
With lazy refcounts the image is marked dirty instead and refcounts are
rebuilt on the next writable open.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import mmap
import os
import stat
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.qcow2 import header as H
from appliance.qcow2.compress import compress as _compress
from appliance.qcow2.compress import decompress as _decompress
from appliance.qcow2.errors import CorruptImage, ErrorKind, Qcow2Error, UnsupportedImage
from appliance.qcow2.iopool import pool as _iopool
from appliance.qcow2.iopool import run as _iorun
from appliance.qcow2.refcount import decode_block, encode_block
from appliance.qcow2.snapshot import Snapshot, parse_snapshot_table

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

# Kernel AIO opcodes (linux/aio_abi.h; appliance.storage.aio has the same).
# appliance.storage.aio (ctypes, ~5 ms) is imported only by an O_DIRECT open,
# so `appliance img` on the page cache does not pay for it at start-up.
IOCB_CMD_PREADV = 7
IOCB_CMD_PWRITEV = 8

OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
EXT_ALL_ALLOC = 0xFFFFFFFF
EXT_ALL_ZERO = 0xFFFFFFFF << 32

# Extent kinds produced by mapping a guest range.
K_UNALLOC = 0  # not in this layer: backing file, or zeroes without one
K_ZERO = 1  # reads as zeroes (zero flag / zero subclusters)
K_DATA = 2  # host bytes at ``host``
K_COMPRESSED = 3  # ``host`` is the raw L2 entry

IOV_MAX = 1024
DEFAULT_L2_CACHE_MAX = 32 * 1024 * 1024  # QEMU's default cap on Linux
ALIGN = 4096
_RESERVE_CHUNK = 8 << 20  # file space reserved ahead of fresh clusters at a time

_POOL: ThreadPoolExecutor | None = None


def io_pool() -> ThreadPoolExecutor:
    """The shared, bounded pool that runs blocking file I/O."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="qcow2-io")
    return _POOL


def _preadv_full(fd: int, views: Sequence[memoryview], off: int) -> None:
    """Fill every view from ``off``; bytes past EOF read as zeroes."""
    views = list(views)
    while views:
        batch = views[:IOV_MAX]
        want = sum(len(v) for v in batch)
        got = os.preadv(fd, batch, off)
        if got == want:
            views = views[IOV_MAX:]
            off += got
            continue
        if got == 0:
            for v in views:
                v[:] = bytes(len(v))
            return
        off += got
        rest: list[memoryview] = []
        for v in views:
            if got >= len(v):
                got -= len(v)
                continue
            rest.append(v[got:])
            got = 0
        views = rest


def _pwritev_full(fd: int, views: Sequence[Any], off: int) -> None:
    views = list(views)
    while views:
        batch = views[:IOV_MAX]
        want = sum(len(v) for v in batch)
        done = os.pwritev(fd, batch, off)
        off += done
        if done == want:
            views = views[IOV_MAX:]
            continue
        rest: list[memoryview] = []
        for v in views:
            mv = memoryview(v)
            if done >= len(mv):
                done -= len(mv)
                continue
            rest.append(mv[done:])
            done = 0
        views = rest


def copy_range(src_fd: int, src: int, dst_fd: int, dst: int, n: int,
               serialize: Any = None) -> None:
    """Copy ``n`` bytes between files at the given offsets without a user-space copy.

    copy_file_range, or, where the kernel or file system refuses it, pread and
    pwrite; bytes the source no longer has (it shrank) are written as zeroes.
    ``serialize``: a lock held for the copy.
    """
    if serialize is not None:
        with serialize:
            copy_range(src_fd, src, dst_fd, dst, n)
        return
    end = dst + n
    try:
        while dst < end:
            done = os.copy_file_range(src_fd, dst_fd, end - dst, src, dst)
            if done == 0:
                break
            src += done
            dst += done
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                             errno.EBADF):
            raise
    while dst < end:
        data = os.pread(src_fd, min(end - dst, 1 << 21), src) or bytes(min(end - dst, 1 << 21))
        _pwritev_full(dst_fd, [data], dst)
        src += len(data)
        dst += len(data)


def _aio_views(views: Sequence[Any]) -> bool:
    """Whether kernel AIO can take the buffers' addresses (writable, contiguous views)."""
    for v in views:
        if type(v) is not memoryview or v.readonly or not v.c_contiguous:
            return False
    return True


def _bounce_span(host: int, length: int, align: int) -> tuple[int, memoryview]:
    start = host & ~(align - 1)
    end = (host + length + align - 1) & ~(align - 1)
    return start, memoryview(mmap.mmap(-1, end - start))


def _bounce_read(fd: int, views: Sequence[memoryview], host: int) -> None:
    """O_DIRECT refused the caller's buffers (unaligned): read via an aligned copy."""
    length = sum(len(v) for v in views)
    start, buf = _bounce_span(host, length, ALIGN)
    _preadv_full(fd, [buf], start)
    pos = host - start
    for v in views:
        v[:] = buf[pos : pos + len(v)]
        pos += len(v)


def _bounce_write(fd: int, views: Sequence[Any], host: int, length: int) -> None:
    """O_DIRECT refused the caller's buffers or range (unaligned): write an aligned copy.

    Sector-aligned ranges are written as they are from a page-aligned copy
    (4 KiB sectors if 512 bytes are refused too). Bytes of the aligned span
    outside an unaligned range are read first: that read-modify-write is why
    the caller serializes unaligned writes (:meth:`Qcow2Image._data_write`).
    """
    for align in (512, ALIGN):
        start, buf = _bounce_span(host, length, align)
        if start != host or len(buf) != length:
            _preadv_full(fd, [buf], start)
        pos = host - start
        for v in views:
            mv = memoryview(v).cast("B")
            buf[pos : pos + len(mv)] = mv
            pos += len(mv)
        try:
            _pwritev_full(fd, [buf], start)
            return
        except OSError as err:
            if err.errno != errno.EINVAL or align == ALIGN:
                raise


class _Splitter:
    """Slices a list of caller buffers by byte ranges without copying."""

    def __init__(self, bufs: Sequence[memoryview]) -> None:
        self.bufs = [b if isinstance(b, memoryview) else memoryview(b) for b in bufs]
        self.starts: list[int] = []
        pos = 0
        for b in self.bufs:
            if b.ndim != 1 or b.itemsize != 1:
                raise Qcow2Error("buffers must be byte-addressed memoryviews")
            self.starts.append(pos)
            pos += len(b)
        self.total = pos

    def take(self, start: int, length: int) -> list[memoryview]:
        if len(self.bufs) == 1:
            return [self.bufs[0][start : start + length]]
        out = []
        i = bisect.bisect_right(self.starts, start) - 1
        end = start + length
        while start < end:
            b = self.bufs[i]
            s = start - self.starts[i]
            n = min(len(b) - s, end - start)
            if n > 0:
                out.append(b[s : s + n])
            start += n
            i += 1
        return out


def _too_large(err: OSError, off: int) -> Qcow2Error:
    """A write the file cannot take where it lands (EFBIG: an offset from damaged
    metadata past the file system's largest file), as a typed error. Other
    OSErrors stay as they are: callers tell ENOSPC and EIO apart by errno."""
    return Qcow2Error(f"write at offset {off:#x} failed: {err.strerror}", kind=ErrorKind.RANGE,
                      offset=off)


def _zero_views(views: Sequence[memoryview]) -> None:
    for v in views:
        n = len(v)
        if n <= len(_ZEROS):
            v[:] = _ZEROS[:n]
        else:
            v[:] = bytes(n)


_ZEROS = bytes(1 << 21)


class Qcow2Image:
    """An open qcow2 image; implements :class:`appliance.storage.backend.BlockBackend`.

    Open with :meth:`open`, never the constructor.
    """

    logical_block_size = 512
    supports_discard = True

    def __init__(self) -> None:
        self.path = Path()
        self.read_only = True
        self.size = 0
        self.header = H.Header()
        self.backing: Any = None
        self.backing_fmt: str | None = None
        self.snapshots: list[Snapshot] = []
        self.bitmaps: list[Any] = []
        self._fd = -1
        self._dfd = -1
        self._direct = False
        self._lock = asyncio.Lock()
        self._rmw_lock = asyncio.Lock()  # unaligned O_DIRECT writes, one at a time
        self._l1: list[int] = []
        self._l1_dirty = False
        self._l2: OrderedDict[int, list[int]] = OrderedDict()
        self._l2_dirty: set[int] = set()
        self._l2_cap = 16
        self._rt: list[int] = []
        self._rt_dirty = False
        self._rt_reloc: tuple[int, int] | None = None
        self._rb: dict[int, list[int]] = {}
        self._rb_dirty: set[int] = set()
        self._rc_dirty = False
        self._pending_frees: list[int] = []
        self._free_hint = 0
        self._inflight: dict[int, _Alloc] = {}
        self._io_count = 0
        self._retries: set[asyncio.Task[None]] = set()  # start_rw requests gone the slow way
        self._needs_sync = False
        self._failed = False
        # Enabled persistent bitmaps not yet marked in_use: the first change
        # of guest data marks them (see bitmaps.py), so opening an image
        # writable without changing its data leaves them valid.
        self._bm_pending = False
        self._closed = False
        self._closing = False  # close() started: start_rw takes nothing more
        self._meta: set[int] = set()
        # (structure, offset) pairs already checked against the other metadata
        # before a write (see _guard_meta_write).
        self._meta_ok: set[tuple[str, int]] = set()
        self._lazy_dirty = False
        self._comp_cache: tuple[int, bytes] | None = None
        self._table_bytes: int | None = None  # snapshot table length as last written
        self.check_mode = False  # see open()
        self.metadata_only = False  # see open()
        self._comp_tail = 0  # host byte offset where the next compressed cluster may go
        self._alloc_end = 0  # end of the highest cluster ever allocated
        self._no_falloc = False
        self._regular = False  # the image is a regular file (set by _open)
        self._unsafe = False
        self._writethrough = False
        self._written_end = 0  # end of the highest byte we wrote
        self._aio: Any = None  # Linux AIO context for O_DIRECT data I/O
        self._pool_ring: Any = None  # the I/O pool's completion side on our loop (start_rw)
        # O_DIRECT writes past the end of the file run inside the system call (ext4):
        # start_rw runs a lone one itself as pwritev (_start_alloc).
        self._sync_extend = False
        self._open_size = 0  # file size at open
        self._falloc_end = 0  # file space reserved ahead of allocation
        self.file_size = 0
        # The start_rw completions as bound once: a bound method made per request adds up.
        self._rw_done_cb = self._rw_done
        self._alloc_done_cb = self._alloc_done
        self._sync_told_cb = self._sync_told

    # ------------------------------------------------------------------ open

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        read_only: bool,
        cache: str = "writeback",
        backing_override: Any = None,
        l2_cache_size: int | None = None,
        open_backing: bool = True,
        repair_dirty: bool = True,
        allow_corrupt: bool = False,
        aio: str = "native",
        check_mode: bool = False,
        metadata_only: bool = False,
        _chain: tuple[str, ...] = (),
    ) -> Qcow2Image:
        """Open an image.

        :param backing_override: ``None`` to follow the header, ``False`` for no backing,
            or an already open BlockBackend to use instead.
        :param l2_cache_size: bytes of L2 cache (QEMU's l2-cache-size); default covers
            the whole disk up to 32 MiB.
        :param check_mode: for ``check``: the snapshot table is left unread (as QEMU's
            BDRV_O_CHECK), for :mod:`appliance.qcow2.snapshot_check` to read and repair.
        :param metadata_only: for ``info``: an encrypted image opens too (QEMU's
            BDRV_O_NO_IO); its data must then not be read or written.
        :raises Qcow2Error: When the file is not an image we can open safely.
        """
        self = cls()
        self.check_mode = check_mode
        self.metadata_only = metadata_only
        self.path = Path(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
        except OSError as err:
            raise Qcow2Error(f"could not open '{path}': {err.strerror}", kind=ErrorKind.IO) from err
        try:
            await self._open(cache, backing_override, l2_cache_size, open_backing,
                             repair_dirty, allow_corrupt, aio, _chain)
        except BaseException:
            self._close_fds()
            raise
        return self

    async def _open(self, cache: str, backing_override: Any, l2_cache_size: int | None,
                    open_backing: bool, repair_dirty: bool, allow_corrupt: bool,
                    aio: str, chain: tuple[str, ...]) -> None:
        st = os.fstat(self._fd)
        # An image on a block device (an LVM volume, say) is as long as the
        # device: st_size is 0 there.
        size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self._fd, 0, os.SEEK_END)
        self.file_size = size
        self._open_size = self._falloc_end = size
        self._regular = stat.S_ISREG(st.st_mode)  # a block device cannot grow
        first = await self._pread(0, min(size, 1 << 21))
        h = H.parse_header(first, size, check_mode=self.check_mode)
        if h.encrypted and not self.metadata_only:
            # We hold no key and decrypt nothing: QEMU's words without a secret.
            raise UnsupportedImage("Parameter 'encrypt.key-secret' is required for cipher")
        self.header = h
        self.size = h.size
        cs = h.cluster_size
        self._cs = cs
        self._cb = h.cluster_bits
        self._ext = h.extended_l2
        self._l2_entries = h.l2_entries
        self._l2_bits = (h.l2_entries).bit_length() - 1
        self._stride = 2 if self._ext else 1
        self._sc_size = cs // 32 if self._ext else cs
        self._rc_order = h.refcount_order
        self._rc_max = (1 << h.refcount_bits) - 1
        self._rb_entries = cs * 8 // h.refcount_bits
        self._csize_shift = 62 - (h.cluster_bits - 8)
        self._csize_mask = (1 << (h.cluster_bits - 8)) - 1
        self._coff_mask = (1 << self._csize_shift) - 1
        self._l2_fmt = struct.Struct(f">{cs // 8}Q")
        if cache in ("none", "directsync"):
            self._direct = True
            self._dfd = os.open(self.path, (os.O_RDONLY if self.read_only else os.O_RDWR)
                                | os.O_DIRECT | os.O_CLOEXEC)
        else:
            self._dfd = self._fd
        if self._direct and aio != "threads":
            try:
                from appliance.storage.aio import LinuxAio, extends_synchronously

                self._aio = LinuxAio(depth=128)
                self._sync_extend = extends_synchronously(self._dfd)
            except OSError:
                self._aio = None  # no kernel AIO here: the thread pool does it all
        self._writethrough = cache in ("writethrough", "directsync")
        self._unsafe = cache == "unsafe"
        if h.l1_size:
            raw = await self._pread(h.l1_table_offset, h.l1_size * 8)
            self._l1 = list(struct.unpack(f">{h.l1_size}Q", raw))
        n_rt = h.refcount_table_clusters * cs // 8
        raw = await self._pread(h.refcount_table_offset, n_rt * 8)
        self._rt = list(struct.unpack(f">{n_rt}Q", raw))
        if h.nb_snapshots and not self.check_mode:
            raw = await self._pread(h.snapshots_offset, min(self.file_size - h.snapshots_offset,
                                                            64 << 20))
            self.snapshots, self._table_bytes = parse_snapshot_table(raw, h.nb_snapshots, cs)
        await self._load_bitmaps()
        want = l2_cache_size
        if want is None:
            need = (-(-self.size // cs)) * self._stride * 8
            want = min(max(need, 1 << 20), DEFAULT_L2_CACHE_MAX)
        self._l2_cap = max(2, want // cs)
        self._build_meta_set()
        self._free_hint = 0  # cluster 0 too: a header counted 0 is caught, as in QEMU
        if not self.read_only:
            if h.corrupt and not allow_corrupt:
                raise CorruptImage("image is marked corrupt; it can only be opened read-only "
                                   "(or repaired with 'appliance img check -r all')")
            changed = False
            keep = 0
            if h.autoclear_features & H.AUTOCLEAR_BITMAPS and self.bitmaps:
                # Bitmaps stay; tracking ones are marked possibly inconsistent
                # when guest data first changes (see bitmaps.py).
                self._bm_pending = True
                keep = H.AUTOCLEAR_BITMAPS
            if h.autoclear_features & ~keep:
                # Anything else we do not maintain: clear the bits before the first
                # write, as the spec demands of writers that do not know them.
                h.autoclear_features &= keep
                changed = True
            if h.dirty and repair_dirty:
                from appliance.qcow2.check import rebuild_refcounts
                from appliance.qcow2.snapops import fix_copied_flags

                await rebuild_refcounts(self)
                await fix_copied_flags(self)
                await self._flush_locked()
                h.incompatible_features &= ~H.INCOMPAT_DIRTY
                changed = True
            if changed:
                await self._write_header()
                await self._sync()
        if backing_override is False or not open_backing:
            self.backing = None
        elif backing_override is not None:
            self.backing = backing_override
        elif h.backing_file:
            from appliance.qcow2.backing import open_backing_file

            self.backing_fmt = h.backing_format
            self.backing = await open_backing_file(
                self.path, h.backing_file, self.backing_fmt, cache=cache,
                chain=chain + (os.path.realpath(self.path),),
            )

    async def _load_bitmaps(self) -> None:
        data = self.header.ext(H.EXT_BITMAPS)
        self.bitmaps = []
        if data is None or not self.header.autoclear_features & H.AUTOCLEAR_BITMAPS:
            return
        from appliance.qcow2 import bitmaps

        nb, size, off = bitmaps.parse_extension(data)
        if off % self._cs or off + size > self.file_size:
            raise CorruptImage("bitmap directory lies outside the file", offset=off)
        raw = await self._pread(off, size)
        self.bitmaps = bitmaps.parse_directory(raw, off, nb)

    async def guest_data_changes(self) -> None:
        """Called before guest-visible data first changes: mark tracking bitmaps in_use."""
        if self._bm_pending:
            self._bm_pending = False
            await self._mark_bitmaps_in_use()

    async def _mark_bitmaps_in_use(self) -> None:
        from appliance.qcow2.bitmaps import FLAG_AUTO, FLAG_IN_USE

        # Only 'auto' bitmaps must follow every write (qcow2.txt, bitmap
        # directory entry flags); a disabled one stays valid as it is.
        for b in self.bitmaps:
            if b.flags & FLAG_AUTO and not b.flags & FLAG_IN_USE:
                b.flags |= FLAG_IN_USE
                await self._pwrite(b.entry_offset + 12, struct.pack(">I", b.flags))
        await self._sync()

    def _build_meta_set(self) -> None:
        cs = self._cs
        h = self.header
        m = {0}
        for base, length in (
            (h.l1_table_offset, h.l1_size * 8),
            (h.refcount_table_offset, h.refcount_table_clusters * cs),
        ):
            if length:
                m.update(range(base // cs, (base + length + cs - 1) // cs))
        for e in self._rt:
            if e & OFFSET_MASK:
                m.add((e & OFFSET_MASK) >> self._cb)
        for e in self._l1:
            if e & OFFSET_MASK:
                m.add((e & OFFSET_MASK) >> self._cb)
        for s in self.snapshots:
            # An oversized table (damaged entry) counts up to QEMU's L1 size limit:
            # its clusters past that are never read, and the set stays small.
            length = min(s.l1_size * 8, H.MAX_L1_BYTES + cs)
            m.update(range(s.l1_table_offset // cs, (s.l1_table_offset + length + cs - 1) // cs))
        if h.nb_snapshots:
            n = max(1, -(-(self._table_bytes or 1) // cs))
            m.update(range(h.snapshots_offset // cs, h.snapshots_offset // cs + n))
        self._meta = m
        self._meta_ok.clear()

    def _overlap_name(self, first: int, n: int, own: str) -> str | None:
        """The structure other than ``own`` that clusters [first, first+n) hold, in
        QEMU's words (qcow2_check_metadata_overlap), or None.

        qcow2.txt ("Host cluster management") gives every cluster one use; an image
        made elsewhere may break that, and a write through one structure would then
        overwrite another. Slow (scans the tables): callers cache what passed.
        """
        cs, cb = self._cs, self._cb
        h = self.header
        last = first + n

        def hit(off: int, length: int) -> bool:
            return length > 0 and off >> cb < last and (off + length - 1) >> cb >= first

        if own != "qcow2_header" and first == 0:
            return "qcow2_header"
        if own != "active L1 table" and hit(h.l1_table_offset, h.l1_size * 8):
            return "active L1 table"
        if own != "refcount table" and hit(h.refcount_table_offset,
                                           h.refcount_table_clusters * cs):
            return "refcount table"
        if own != "snapshot table" and h.nb_snapshots and hit(h.snapshots_offset,
                                                               self._table_bytes or 1):
            return "snapshot table"
        if own != "refcount block" and any(
                e & OFFSET_MASK and first <= (e & OFFSET_MASK) >> cb < last for e in self._rt):
            return "refcount block"
        if own != "active L2 table" and any(
                e & OFFSET_MASK and first <= (e & OFFSET_MASK) >> cb < last for e in self._l1):
            return "active L2 table"
        if own != "inactive L1 table":
            for s in self.snapshots:
                if hit(s.l1_table_offset, s.l1_size * 8):
                    return "inactive L1 table"
        return None

    async def _guard_meta_write(self, off: int, length: int, own: str) -> None:
        """Before writing metadata ``own`` at ``off``: refuse, marking the image
        corrupt as QEMU does, when those clusters hold another structure."""
        if self.check_mode or (own, off) in self._meta_ok:
            # check -r rewrites what it found damaged under its own rules, as
            # QEMU's repair does.
            return
        cb = self._cb
        name = self._overlap_name(off >> cb, ((off + length - 1) >> cb) - (off >> cb) + 1, own)
        if name is not None:
            raise await self.mark_corrupt(
                f"Preventing invalid write on metadata (overlaps with {name})", off)
        self._meta_ok.add((own, off))

    # ------------------------------------------------------------------ raw file I/O

    async def _pread(self, off: int, n: int) -> bytes:
        if off + n > (1 << 63) - 1:
            # A table offset from a damaged image with reserved high bits set:
            # no file reaches there (os.pread would overflow).
            raise CorruptImage(f"metadata offset {off:#x} lies past the largest file offset",
                               offset=off)
        data: bytes = await _iorun(os.pread, self._fd, n, off)
        if len(data) < n:
            data += bytes(n - len(data))
        return data

    async def _pwrite(self, off: int, data: bytes) -> None:
        if self._failed and off != 0:
            raise Qcow2Error("image is marked corrupt; refusing to write",
                             kind=ErrorKind.READ_ONLY)
        try:
            await _iorun(_pwritev_full, self._fd, [data], off)
        except OSError as err:
            if err.errno == errno.EFBIG:
                raise _too_large(err, off) from err
            raise
        self._wrote(off + len(data))

    def _wrote(self, end: int) -> None:
        """Bytes up to ``end`` were written: a flush is owed, and the file may have grown."""
        self._needs_sync = True
        if end > self._written_end:
            self._written_end = end
            if end > self.file_size:
                self.file_size = end

    async def _sync(self) -> None:
        if self._unsafe:
            # cache=unsafe (qemu-img convert's default): order writes, skip the barriers.
            self._needs_sync = False
            return
        await _iorun(os.fdatasync, self._fd)
        self._needs_sync = False

    def _buffer(self, n: int) -> memoryview:
        """A scratch buffer; page-aligned when data goes through O_DIRECT."""
        if self._direct:
            m = mmap.mmap(-1, max(ALIGN, (n + ALIGN - 1) & ~(ALIGN - 1)))
            return memoryview(m)[:n]
        return memoryview(bytearray(n))

    async def _write_header(self) -> None:
        data = self.header.serialize()
        await self._pwrite(0, data)

    async def mark_corrupt(self, message: str, offset: int | None = None) -> CorruptImage:
        """Set the corrupt bit (if writable), stop all writes, and return the error to raise."""
        if not self.read_only and not self._failed:
            self._failed = True
            self.header.incompatible_features |= H.INCOMPAT_CORRUPT
            try:
                await self._write_header()
                await self._sync()
            except OSError:
                pass
        self._failed = True
        return CorruptImage(message, offset=offset)

    # ------------------------------------------------------------------ refcounts

    async def _refblock(self, ti: int) -> list[int] | None:
        blk = self._rb.get(ti)
        if blk is not None:
            return blk
        if ti >= len(self._rt):
            return None
        off = self._rt[ti] & OFFSET_MASK
        if not off:
            return None
        if off % self._cs:
            raise await self.mark_corrupt("refcount block offset is not cluster-aligned", off)
        if off >= self.file_size:
            raise await self.mark_corrupt("refcount block lies past the end of the file", off)
        blk = decode_block(await self._pread(off, self._cs), self._rc_order)
        self._rb[ti] = blk
        return blk

    async def refcount(self, cluster: int) -> int:
        ti, bi = divmod(cluster, self._rb_entries)
        blk = self._rb.get(ti)
        if blk is None:
            blk = await self._refblock(ti)
            if blk is None:
                return 0
        return blk[bi]

    async def _release_table(self, off: int, length: int) -> None:
        """Drop the count a replaced table (an L1) held on each of its clusters.

        A damaged image may have put the table in the header cluster or past the
        end of the file, where it held no count of its own: those clusters are
        left alone (QEMU takes the header's count to 0 there; a later allocation
        would then hand the header out).
        """
        cb = self._cb
        if length <= 0:
            return
        for c in range(off >> cb, ((off + length - 1) >> cb) + 1):
            if c and await self.refcount(c) > 0:
                await self._update_refcount(c, -1)

    async def _update_refcount(self, cluster: int, delta: int) -> None:
        ti, bi = divmod(cluster, self._rb_entries)
        blk = self._rb.get(ti)
        if blk is None:
            blk = await self._refblock(ti)
            if blk is None:
                blk = await self._new_refblock(ti)
        v = blk[bi] + delta
        if v < 0:
            raise await self.mark_corrupt(f"refcount of cluster {cluster} would go negative",
                                          cluster * self._cs)
        if v > self._rc_max:
            raise Qcow2Error(f"refcount of cluster {cluster} would overflow "
                             f"{self.header.refcount_bits} bits", kind=ErrorKind.RANGE)
        blk[bi] = v
        self._rb_dirty.add(ti)
        self._rc_dirty = True
        if delta < 0 and self._comp_tail and self._comp_tail >> self._cb == cluster:
            # The cluster compressed data was being packed into lost a reference:
            # it may be freed and reused, so never pack into it again.
            self._comp_tail = 0
        if v == 0 and cluster < self._free_hint:
            self._free_hint = cluster

    async def _new_refblock(self, ti: int) -> list[int]:
        """Create refcount block ``ti`` in memory and place it in a free cluster.

        The block exists (all zero) before its own cluster is allocated, so the
        allocator can account for that cluster, possibly inside the new block.
        """
        if ti >= len(self._rt):
            await self._grow_reftable(ti)
            made = self._rb.get(ti)
            if made is not None:
                # The new table's clusters reached this block's range, so placing the table
                # made the block already: starting it again would drop their counts.
                return made
        blk = [0] * self._rb_entries
        self._rb[ti] = blk
        c = await self._alloc_clusters(1)
        self._rt[ti] = c << self._cb
        self._rt_dirty = True
        self._rb_dirty.add(ti)
        self._rc_dirty = True
        self._meta.add(c)
        return blk

    async def _grow_reftable(self, min_index: int) -> None:
        cs = self._cs
        per = cs // 8
        want = max(min_index + 1, len(self._rt) * 2)
        want = -(-want // per) * per
        if want * 8 > H.MAX_REFTABLE_BYTES:
            raise Qcow2Error("refcount table would exceed its size limit", kind=ErrorKind.RANGE)
        if self._rt_reloc is not None:
            start, n = self._rt_reloc
            self._rt_reloc = None
            for c in range(start, start + n):
                self._meta.discard(c)
                await self._update_refcount(c, -1)
        self._rt.extend([0] * (want - len(self._rt)))
        n = want * 8 // cs
        start = await self._alloc_clusters(n)
        self._rt_reloc = (start, n)
        self._meta.update(range(start, start + n))
        self._rc_dirty = True

    async def _alloc_clusters(self, n: int) -> int:
        """Reserve ``n`` contiguous free clusters (refcount 0 → 1); returns the first index.

        Refcount blocks covering the run must exist before the run is taken:
        creating one allocates its own cluster, which may land inside the run,
        so the search starts over after creating any.
        """
        E = self._rb_entries
        while True:
            run_start = await self._find_free_run(n)
            missing = []
            for ti in range(run_start // E, (run_start + n - 1) // E + 1):
                if self._rb.get(ti) is None and await self._refblock(ti) is None:
                    missing.append(ti)
            if not missing:
                break
            for ti in missing:
                if self._rb.get(ti) is None:
                    await self._new_refblock(ti)
        if run_start + n > (1 << 56) >> self._cb:
            raise Qcow2Error("image file would grow past 64 PiB", kind=ErrorKind.RANGE)
        # check -r allocates only after its refcount repair, under its own rules
        # (a damaged snapshot table's clusters may be reused): no guard there.
        meta = () if self.check_mode else self._meta
        for i in range(run_start, run_start + n):
            if i in meta:
                # A cluster some table uses, counted 0 (a damaged refcount, or a
                # refcount block read from the wrong place): handing it out would
                # overwrite that table. QEMU's overlap check stops the write the
                # same way, and marks the image corrupt.
                name = self._overlap_name(i, 1, "") or "metadata"
                raise await self.mark_corrupt(
                    f"Preventing invalid write on metadata (overlaps with {name})", i << self._cb)
        for i in range(run_start, run_start + n):
            await self._update_refcount(i, 1)
        end = (run_start + n) << self._cb
        if end > self._alloc_end:
            self._alloc_end = end
        if run_start == self._free_hint:
            self._free_hint = run_start + n
        return run_start

    async def _find_free_run(self, n: int) -> int:
        c = self._free_hint
        run_start, run = c, 0
        E = self._rb_entries
        while run < n:
            ti, bi = divmod(c, E)
            blk = self._rb.get(ti)
            if blk is None:
                blk = await self._refblock(ti)
            if blk is None:
                # No block: everything it would cover is free.
                take = min(n - run, E - bi)
                if run == 0:
                    run_start = c
                run += take
                c += take
                continue
            if blk[bi] == 0:
                if run == 0:
                    run_start = c
                run += 1
            else:
                run = 0
                if c == self._free_hint:
                    self._free_hint = c + 1
            c += 1
        return run_start

    async def _flush_refcounts(self) -> None:
        """Write dirty refcount blocks, then table/header changes, with barriers."""
        while self._rc_dirty:
            self._rc_dirty = False
            dirty = sorted(self._rb_dirty)
            self._rb_dirty.clear()
            for ti in dirty:
                off = self._rt[ti] & OFFSET_MASK
                await self._guard_meta_write(off, self._cs, "refcount block")
                await self._pwrite(off, encode_block(self._rb[ti], self._rc_order))
            if dirty or self._needs_sync:
                await self._sync()
            if self._rt_reloc is not None:
                start, n = self._rt_reloc
                raw = struct.pack(f">{len(self._rt)}Q", *self._rt)
                await self._pwrite(start << self._cb, raw)
                await self._sync()
                h = self.header
                old_off, old_n = h.refcount_table_offset, h.refcount_table_clusters
                h.refcount_table_offset, h.refcount_table_clusters = start << self._cb, n
                await self._write_header()
                await self._sync()
                self._rt_reloc = None
                self._rt_dirty = False
                for c in range(old_off >> self._cb, (old_off >> self._cb) + old_n):
                    self._meta.discard(c)
                    await self._update_refcount(c, -1)
            elif self._rt_dirty:
                self._rt_dirty = False
                raw = struct.pack(f">{len(self._rt)}Q", *self._rt)
                await self._guard_meta_write(self.header.refcount_table_offset, len(raw),
                                             "refcount table")
                await self._pwrite(self.header.refcount_table_offset, raw)
                await self._sync()

    # ------------------------------------------------------------------ L1/L2

    async def _load_l2(self, off: int) -> list[int]:
        t = self._l2.get(off)
        if t is not None:
            self._l2.move_to_end(off)
            return t
        if off % self._cs:
            raise await self.mark_corrupt(f"L2 table offset {off:#x} is not cluster-aligned", off)
        # An L2 table past the end of the file reads as zeroes (_pread pads), as in
        # QEMU, whose file layer reads zeroes there; check reports the table.
        raw = await self._pread(off, self._cs)
        t = self._l2.get(off)
        if t is not None:
            return t
        t = list(self._l2_fmt.unpack(raw))
        self._l2[off] = t
        while len(self._l2) > self._l2_cap:
            old, table = next(iter(self._l2.items()))
            if old in self._l2_dirty:
                await self._write_l2(old, table)
            self._l2.pop(old, None)
        return t

    async def _write_l2(self, off: int, table: list[int]) -> None:
        if self._rc_dirty and not self._lazy_dirty:
            await self._flush_refcounts()
        self._l2_dirty.discard(off)
        try:
            await self._guard_meta_write(off, self._cs, "active L2 table")
            await self._pwrite(off, self._l2_fmt.pack(*table))
        except BaseException:
            self._l2_dirty.add(off)  # still owed: the next flush fails again
            raise

    async def _l2_for_write(self, l1i: int) -> tuple[int, list[int]]:
        """The L2 table for ``l1i``, allocated or copied so it may be modified."""
        if l1i >= len(self._l1):
            raise await self.mark_corrupt("write past the L1 table")
        e = self._l1[l1i]
        off = e & OFFSET_MASK
        if off and e & COPIED:
            return off, await self._load_l2(off)
        if off:
            src = await self._load_l2(off)
            if await self.refcount(off >> self._cb) == 1:
                self._l1[l1i] = off | COPIED
                self._l1_dirty = True
                return off, src
            table = list(src)
        else:
            table = [0] * (self._cs // 8)
        await self._mark_lazy_dirty()
        new = (await self._alloc_clusters(1)) << self._cb
        self._meta.add(new >> self._cb)
        self._l2[new] = table
        self._l2_dirty.add(new)
        self._l1[l1i] = new | COPIED
        self._l1_dirty = True
        if off:
            self._pending_frees.append(off >> self._cb)
        while len(self._l2) > self._l2_cap:
            old, t = next(iter(self._l2.items()))
            if old == new:
                break
            if old in self._l2_dirty:
                await self._write_l2(old, t)
            self._l2.pop(old, None)
        return new, table

    async def _mark_lazy_dirty(self) -> None:
        h = self.header
        if h.lazy_refcounts and h.version >= 3 and not self._lazy_dirty:
            h.incompatible_features |= H.INCOMPAT_DIRTY
            await self._write_header()
            await self._sync()
            self._lazy_dirty = True

    async def _entry(self, gc: int) -> tuple[int, int]:
        """(L2 entry, extended bitmap) of guest cluster ``gc``; (0, 0) if no L2 table."""
        l1i = gc >> self._l2_bits
        if l1i >= len(self._l1):
            return 0, 0
        off = self._l1[l1i] & OFFSET_MASK
        if not off:
            return 0, 0
        t = self._l2.get(off)
        if t is None:
            t = await self._load_l2(off)
        i = (gc & (self._l2_entries - 1)) * self._stride
        return t[i], (t[i + 1] if self._ext else 0)

    # ------------------------------------------------------------------ mapping

    def _classify(self, gc: int, e: int, bm: int, a: int, b: int,
                  out: list[list[int]]) -> None:
        """Append extents [kind, guest_start, length, host] for bytes [a, b) of cluster gc."""
        base = gc << self._cb
        if e & COMPRESSED:
            _append(out, K_COMPRESSED, base + a, b - a, e)
            return
        host = e & OFFSET_MASK
        if not self._ext:
            if e & ZERO_FLAG and self.header.version >= 3:
                _append(out, K_ZERO, base + a, b - a, -1)
            elif host:
                _append(out, K_DATA, base + a, b - a, host + a)
            else:
                _append(out, K_UNALLOC, base + a, b - a, -1)
            return
        sc = self._sc_size
        pos = a
        while pos < b:
            i = pos // sc
            end = min(b, (i + 1) * sc)
            if bm >> i & 1:
                _append(out, K_DATA, base + pos, end - pos, host + pos)
            elif bm >> (32 + i) & 1:
                _append(out, K_ZERO, base + pos, end - pos, -1)
            else:
                _append(out, K_UNALLOC, base + pos, end - pos, -1)
            pos = end

    async def map_range(self, offset: int, length: int) -> list[list[int]]:
        """Extents covering [offset, offset+length) of this layer. Call under the lock."""
        out: list[list[int]] = []
        cb, cs = self._cb, self._cs
        l2n = self._l2_entries
        pos, end = offset, offset + length
        while pos < end:
            gc = pos >> cb
            l1i = gc >> self._l2_bits
            off = self._l1[l1i] & OFFSET_MASK if l1i < len(self._l1) else 0
            table_end = min(end, (l1i + 1) << (self._l2_bits + cb))
            if not off:
                _append(out, K_UNALLOC, pos, table_end - pos, -1)
                pos = table_end
                continue
            t = self._l2.get(off)
            if t is None:
                t = await self._load_l2(off)
            else:
                self._l2.move_to_end(off)
            stride = self._stride
            ext = self._ext
            while pos < table_end:
                gc = pos >> cb
                a = pos & (cs - 1)
                b = min(cs, table_end - (gc << cb))
                i = (gc & (l2n - 1)) * stride
                e = t[i]
                if not ext and not e & (COMPRESSED | ZERO_FLAG):
                    host = e & OFFSET_MASK
                    if host:
                        if host & (cs - 1):
                            raise await self.mark_corrupt(
                                f"Cluster allocation offset {host:#x} unaligned "
                                f"(L2 offset: {off:#x}, L2 index: {i // stride:#x})", host)
                        n = b - a
                        if b == cs:
                            # Whole clusters that follow at the next host offsets
                            # (same flags) extend this extent: one comparison each,
                            # which matters when convert maps a large image.
                            j = gc & (l2n - 1)
                            last = j + (table_end >> cb) - gc
                            nxt = e + cs
                            while j + 1 < last and t[j + 1] == nxt:
                                j += 1
                                nxt += cs
                                n += cs
                        _append(out, K_DATA, pos, n, host + a)
                        pos += n
                        continue
                    _append(out, K_UNALLOC, pos, b - a, -1)
                else:
                    if e & OFFSET_MASK & (cs - 1) and not e & COMPRESSED:
                        raise await self.mark_corrupt(
                            f"Cluster allocation offset {e & OFFSET_MASK:#x} unaligned "
                            f"(L2 offset: {off:#x}, L2 index: {i // stride:#x})", e & OFFSET_MASK)
                    if e & ZERO_FLAG and not e & COMPRESSED and not ext and self.header.version < 3:
                        # Bit 0 is reserved in version 2 (qcow2.txt, "Standard Cluster
                        # Descriptor"): QEMU's reads fail on it and mark the image corrupt.
                        raise await self.mark_corrupt(
                            "Zero cluster entry found in pre-v3 image "
                            f"(L2 offset: {off:#x}, L2 index: {i // stride:#x})", off)
                    self._classify(gc, e, t[i + 1] if ext else 0, a, b, out)
                pos = (gc << cb) + b
        return out

    # ------------------------------------------------------------------ reads

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Qcow2Error(f"request [{offset}, +{length}) is outside the disk",
                             kind=ErrorKind.RANGE)

    def _fast_host_of(self, offset: int, n: int) -> tuple[int, int] | None:
        """Host offset for a request inside one plain allocated cluster whose L2 table
        is cached (as (L2 entry, host offset)), or None. Synchronous: with no await it sees one consistent state."""
        cb = self._cb
        gc = offset >> cb
        a = offset & (self._cs - 1)
        if a + n > self._cs or self._ext or offset + n > self.size or offset < 0:
            return None
        l1i = gc >> self._l2_bits
        if l1i >= len(self._l1):
            return None
        t = self._l2.get(self._l1[l1i] & OFFSET_MASK)
        if t is None:
            return None
        e = t[gc & (self._l2_entries - 1)]
        host = e & OFFSET_MASK
        if not host or e & (COMPRESSED | ZERO_FLAG) or host & (self._cs - 1):
            return None
        return e, host + a

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        if len(bufs) == 1 and self._l2:
            buf = bufs[0]
            hit = self._fast_host_of(offset, len(buf))
            if hit is not None:
                host = hit[1]
                aio = self._aio
                self._io_count += 1
                try:
                    # _data_read inlined for the commonest request: one coroutine less.
                    if (aio is not None and type(buf) is memoryview and not buf.readonly
                            and buf.c_contiguous):
                        try:
                            got = await aio.submit(IOCB_CMD_PREADV, self._dfd, bufs, host,
                                                   eager=True)
                        except OSError:
                            await self._data_read([buf], host)  # bounces what O_DIRECT refused
                        else:
                            if got < len(buf):
                                from appliance.storage.io import zero_from

                                zero_from([buf], got)
                    else:
                        await self._data_read([buf], host)
                finally:
                    self._io_count -= 1
                return len(buf)
        sp = _Splitter(bufs)
        total = sp.total
        if offset >= self.size or total == 0:
            return 0
        if offset < 0:
            raise Qcow2Error("negative offset", kind=ErrorKind.RANGE)
        n = min(total, self.size - offset)
        async with self._lock:
            extents = await self.map_range(offset, n)
        await self._read_extents(extents, offset, sp)
        return n

    def start_rw(self, write: bool, offset: int, bufs: Sequence[memoryview],
                 done: Callable[[Any, int, BaseException | None], None], token: Any) -> bool:
        """Start a read or write with no coroutine; False if it cannot go so.

        The callback form of :meth:`readv`/:meth:`writev` that virtio-blk's
        data path and ``img bench`` use (as ``RawBackend.start_rw``): a
        future, its callback and two coroutines per request cost the loop
        more than the request's own work. ``done(token, nbytes, error)``
        follows on the loop, never from inside this call. Only the
        commonest requests go this way, all O_DIRECT with the L2 tables
        involved cached: inside one plain data cluster (or a few such
        clusters in one host run), for a write clusters only this image
        refers to (COPIED, not metadata) inside the file; and a write
        inside one fresh cluster that :meth:`_start_alloc` allocates, or
        that rides on such an allocation in flight. The lookup (and any
        allocation) and the submission happen with no await between them,
        and clusters freed meanwhile stay unused until no request is in
        flight (``_io_count``), as for readv/writev's own fast paths.
        Anything else returns False with nothing started, and the caller
        awaits :meth:`readv`/:meth:`writev`.
        """
        if not self._direct or self._closing or not self._l2 or not bufs:
            return False
        if write and (self.read_only or self._failed or self._writethrough or self._bm_pending):
            return False
        n = bufs[0].nbytes
        if len(bufs) > 1:
            for b in bufs[1:]:
                n += b.nbytes
        cs = self._cs
        a = offset & (cs - 1)
        if a + n <= cs and not self._ext:
            # Inside one cluster (the commonest request): _fast_host_of's
            # lookup inlined, its result shared with _start_alloc.
            if not n or offset < 0 or offset + n > self.size:
                return False
            gc = offset >> self._cb
            l1i = gc >> self._l2_bits
            if l1i >= len(self._l1):
                return False
            l1e = self._l1[l1i]
            t = self._l2.get(l1e & OFFSET_MASK)
            if t is None:
                return False
            i = gc & (self._l2_entries - 1)
            e = t[i]
            h = e & OFFSET_MASK
            if not h:
                return write and not e & COMPRESSED and self._start_alloc(
                    offset, bufs, n, done, token, gc, a, l1i, l1e, t, i, e)
            if e & (COMPRESSED | ZERO_FLAG) or h & (cs - 1):
                return False
            host = h + a
            if write and (not e & COPIED or (h >> self._cb) in self._meta
                          or host + n > self.file_size):
                return False
        else:
            host = self._fast_host_run(offset, n, write) if n else -1
            if host < 0 or write and host + n > self.file_size:
                return False
        job = (done, token, n, bufs, write, offset, host)
        aio = self._aio
        if aio is None:
            return self._submit(write, bufs, host, self._rw_done, job)
        # _submit inlined: this call is on every request's path (eager and align positional).
        self._io_count += 1
        if aio.start(IOCB_CMD_PWRITEV if write else IOCB_CMD_PREADV, self._dfd, bufs, host,
                     self._rw_done_cb, job, True, self.logical_block_size):
            return True
        self._io_count -= 1
        return False

    def _submit(self, write: bool, bufs: Sequence[memoryview], host: int,
                cb: Callable[[Any, int, BaseException | None], None], job: Any) -> bool:
        """Send one data request to kernel AIO or the pool; ``cb(job, nbytes, error)`` follows.

        False, with nothing started, when kernel AIO would refuse the buffers
        (O_DIRECT alignment): the coroutine path bounces them.
        """
        self._io_count += 1
        aio = self._aio
        if aio is not None:
            # eager: a lone request goes to the kernel now, not a loop turn later.
            if not aio.start(IOCB_CMD_PWRITEV if write else IOCB_CMD_PREADV, self._dfd, bufs,
                             host, cb, job, eager=True, align=self.logical_block_size):
                self._io_count -= 1
                return False
        else:
            pool = _iopool()
            ring = self._pool_ring
            if ring is None:
                ring = self._pool_ring = pool.ring()
            pool.start(os.pwritev if write else os.preadv, (self._dfd, bufs, host), cb, job, ring)
        return True

    def _start_alloc(self, offset: int, bufs: Sequence[memoryview], n: int,
                     done: Callable[[Any, int, BaseException | None], None], token: Any,
                     gc: int, a: int, l1i: int, l1e: int, t: list[int], i: int, e: int) -> bool:
        """:meth:`start_rw` for a write inside guest cluster ``gc`` (at ``a``), which
        has no host cluster yet (L1 entry ``l1e``, its L2 table ``t``, entry ``t[i] == e``).

        The :meth:`_fast_alloc_write` case (nothing to copy around the
        write, L2 table cached and this image's own, a free cluster at the
        allocator's hint in a cached refcount block, nobody holding the
        lock), done synchronously: the refcount is raised in the cache and
        the cluster registered in flight before the data is submitted, and
        :meth:`_alloc_done` publishes the L2 entry once the data is
        written (a lone whole cluster past the end of a file the kernel
        extends synchronously is written right here with pwritev and
        published at once, nothing left in flight but the caller's
        callback). Metadata reaches the disk later, from the write-back
        caches in flush order (refcount blocks, L2, L1), so no metadata I/O
        is issued here. A write into a cluster whose allocation is in
        flight puts its bytes at that host cluster and finishes once the
        allocation is published (:meth:`_piggy_write`'s case).
        """
        if self._lock.locked():
            return False
        inflight = self._inflight
        if inflight:
            inf = inflight.get(gc)
            if inf is not None:
                host = inf.host + a
                if not inf.piggy or host + n > self.file_size:
                    return False
                return self._submit(True, bufs, host, self._piggy_done,
                                    (done, token, n, bufs, offset, host, inf))
        if not l1e & COPIED:
            return False
        cb = self._cb
        cs = self._cs
        l2off = l1e & OFFSET_MASK
        h = self.header
        if (h.compatible_features & H.COMPAT_LAZY_REFCOUNTS and not self._lazy_dirty
                and h.version >= 3):
            return False  # the dirty bit goes to the disk first: an await
        whole = n == cs or offset + n == self.size and a == 0
        if not whole and not self._fill_is_zero(e, 0):
            return False  # backing data to copy around the write: the planner does that
        c = self._free_hint
        ti, bi = divmod(c, self._rb_entries)
        blk = self._rb.get(ti)
        if blk is None or blk[bi] or c + 1 > (1 << 56) >> cb or c in self._meta:
            return False  # (metadata counted 0: _alloc_clusters refuses it)
        host = c << cb
        fresh = host >= self._written_end and host >= self._alloc_end and host >= self._open_size
        if not (fresh or whole):
            return False  # the rest of a reused cluster must be zeroed: the planner does that
        if l2off not in self._l2_dirty and len(self._l2_dirty) >= self._l2_cap // 2:
            return False
        extend = False
        if fresh and host + cs > self._falloc_end:
            aio = self._aio
            # _extend_alone() inlined (self._direct holds: start_rw checked it).
            if whole and self._regular and not self._io_count and (
                    aio is None or not aio.in_flight()):
                # Past the end of the file (see _extend_alone): under kernel
                # AIO the loop waits out the device inside io_submit rather
                # than in epoll_wait. Only for a whole cluster: the next
                # writes into the rest of a partly written one would lie past
                # the end of the file too, off this fast path.
                extend = True
                if host + a + n > self._falloc_end:
                    self._falloc_end = host + a + n
            else:
                # Inside the file, the O_DIRECT write is asynchronous (see _reserve_space).
                self._reserve_space(host + cs)
        if host + a + n > self.file_size and not extend:
            return False  # no file space reserved: the coroutine path extends the file
        blk[bi] = 1
        self._rb_dirty.add(ti)
        self._rc_dirty = True
        self._free_hint = c + 1
        alloc_end = self._alloc_end
        if host + cs > alloc_end:
            self._alloc_end = host + cs
        aio = self._aio
        if extend and self._sync_extend and aio is not None and not aio.closed:
            # The kernel runs it inside the system call either way (see
            # _extend_alone): a plain pwritev here spares the loop the iocb,
            # the event ring and the eventfd. The data is on its way to the
            # disk when it returns and nothing was awaited since the lookup,
            # so the L2 entry goes into the cache at once (after the
            # refcount, like _alloc_done; both reach the disk at the flush,
            # refcounts first): no allocation is left in flight (no _Alloc,
            # no _alloc_done), only the caller's callback waits for the loop.
            try:
                got = os.pwritev(self._dfd, bufs, host + a)
            except OSError:
                got = -1
            if got == n:
                t[i] = host | COPIED
                self._l2_dirty.add(l2off)
                # _wrote inlined.
                self._needs_sync = True
                end = host + a + n
                if end > self._written_end:
                    self._written_end = end
                    if end > self.file_size:
                        self.file_size = end
                # In flight until told, for the writes a kick starts after this
                # one: they reserve file space ahead (_reserve_space) and go
                # out together, rather than one synchronous write after another.
                self._io_count += 1
                aio.later(self._sync_told_cb, (done, token), n)
                return True
            # Refused (O_DIRECT alignment, ENOSPC) or short: the cluster goes
            # back as _alloc_done gives back a failed one (deferred, as any
            # free) and the request is done again the careful way.
            self._pending_frees.append(c)
            self._spawn(self._rw_again((done, token, n, bufs, True, offset, host + a)))
            return True
        inf = _Alloc(None, host, True)
        inflight[gc] = inf
        job = (done, token, n, bufs, offset, host + a, inf, gc, l1i, l1e, l2off, t, i, e, c, fresh)
        if aio is not None:
            # _submit inlined, as in start_rw.
            self._io_count += 1
            if aio.start(IOCB_CMD_PWRITEV, self._dfd, bufs, host + a, self._alloc_done_cb, job,
                         True, self.logical_block_size):
                return True
            self._io_count -= 1
            submitted = False
        else:
            submitted = self._submit(True, bufs, host + a, self._alloc_done, job)
        if not submitted:
            # Nothing was awaited since the cluster was taken: give it straight back.
            blk[bi] = 0
            self._free_hint = c
            self._alloc_end = alloc_end
            del inflight[gc]
            return False
        return True

    def _sync_told(self, job: tuple[Any, ...], n: int, err: BaseException | None) -> None:
        """The loop tells a synchronous allocating write's caller (see _start_alloc)."""
        self._io_count -= 1
        job[0](job[1], n, err)

    def _alloc_done(self, job: tuple[Any, ...], got: int, err: BaseException | None) -> None:
        """The data of a :meth:`_start_alloc` write is written (or not): publish or undo."""
        self._io_count -= 1
        done, token, n, bufs, offset, host, inf, gc, l1i, l1e, l2off, table, i, e, c, fresh = job
        t: list[int] = table
        if err is None and got == n:
            base = host - (offset & (self._cs - 1))
            if (not self._lock.locked() and l1i < len(self._l1) and self._l1[l1i] == l1e
                    and self._l2.get(l2off) is t and t[i] == e):
                t[i] = base | COPIED
                self._l2_dirty.add(l2off)
                del self._inflight[gc]
                if inf._fut is None:  # nobody waits (the rule): settle() without the call
                    inf.ok = inf._settled = True
                else:
                    inf.settle(True)
                try:
                    done(token, n, None)
                finally:
                    # After done(): the caller's next request is submitted by now. Its
                    # allocation did not need this (_alloc_end already covers the cluster).
                    # _wrote inlined.
                    self._needs_sync = True
                    end = host + n
                    if end > self._written_end:
                        self._written_end = end
                        if end > self.file_size:
                            self.file_size = end
                return
            self._wrote(host + n)
            # Metadata moved while the data was in flight: publish the careful way.
            a = offset & (self._cs - 1)
            self._spawn(self._publish(
                [gc, a, a + n, e, 0, base, -2, fresh], done, token, n))
            return
        # Deferred like any free: a write riding on this allocation may still
        # be in flight to the cluster.
        self._pending_frees.append(c)
        self._inflight.pop(gc, None)
        inf.settle(False)
        self._rw_failed((done, token, n, bufs, True, offset, host), got, err)

    async def _publish(self, item: list[Any], done: Callable[[Any, int, BaseException | None], None],
                       token: Any, n: int) -> None:
        try:
            async with self._lock:
                await self._commit([item])
        except Exception as err:  # noqa: BLE001 - handed to the caller's callback
            done(token, 0, err)
        else:
            done(token, n, None)

    def _piggy_done(self, job: tuple[Any, ...], got: int, err: BaseException | None) -> None:
        """A write riding on an allocation in flight has its bytes written: wait for the allocation."""
        self._io_count -= 1
        done, token, n, bufs, offset, host, inf = job
        if err is not None or got != n:
            self._rw_failed((done, token, n, bufs, True, offset, host), got, err)
            return
        self._wrote(host + n)
        if inf._settled:
            self._piggy_settled(job)
        else:
            inf.fut.add_done_callback(lambda _f: self._piggy_settled(job))

    def _piggy_settled(self, job: tuple[Any, ...]) -> None:
        done, token, n, bufs, offset, host, inf = job
        if inf.ok:
            done(token, n, None)
        else:
            # The allocation failed: the bytes went nowhere. Write them again.
            self._spawn(self._rw_again((done, token, n, bufs, True, offset, host)))

    def _spawn(self, coro: Any) -> None:
        """Run a start_rw request's follow-up as a task :meth:`close` waits for."""
        task = asyncio.get_running_loop().create_task(coro)
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    def _fast_host_run(self, offset: int, n: int, write: bool) -> int:
        """Host offset of a request over a few plain data clusters laid out in one host
        run (an image written in order, a converted one), or -1.

        Each cluster as :meth:`_fast_host_of` wants it (L2 table cached, no
        flags but COPIED, aligned) and, for a write, only this image's and not
        metadata; at most 64 clusters, so the check stays cheaper than the
        coroutine path it saves.
        """
        cb = self._cb
        if self._ext or offset < 0 or offset + n > self.size:
            return -1
        gc = offset >> cb
        last = (offset + n - 1) >> cb
        if last - gc > 64:
            return -1
        mask = self._l2_entries - 1
        first = -1
        t: list[int] | None = None
        tl1 = -1
        for c in range(gc, last + 1):
            l1i = c >> self._l2_bits
            if l1i != tl1:
                if l1i >= len(self._l1):
                    return -1
                t = self._l2.get(self._l1[l1i] & OFFSET_MASK)
                if t is None:
                    return -1
                tl1 = l1i
            assert t is not None
            e = t[c & mask]
            h = e & OFFSET_MASK
            if not h or e & (COMPRESSED | ZERO_FLAG) or h & (self._cs - 1):
                return -1
            if write and (not e & COPIED or (h >> cb) in self._meta):
                return -1
            if first < 0:
                first = h
            elif h != first + ((c - gc) << cb):
                return -1
        return first + (offset & (self._cs - 1))

    def _rw_done(self, job: tuple[Any, ...], got: int, err: BaseException | None) -> None:
        """A :meth:`start_rw` request is over: what readv/writev do after their await."""
        self._io_count -= 1
        done, token, n, bufs, write, offset, host = job
        if err is None and got == n:
            if write:
                # _wrote inlined.
                self._needs_sync = True
                end = host + n
                if end > self._written_end:
                    self._written_end = end
                    if end > self.file_size:
                        self.file_size = end
            done(token, n, None)
            return
        self._rw_failed(job, got, err)

    def _rw_failed(self, job: tuple[Any, ...], got: int, err: BaseException | None) -> None:
        done, token, n, bufs, write, offset, host = job
        if err is None and got < n:
            if not write:
                # Past the end of the file: the rest of the cluster reads as zeroes.
                from appliance.storage.io import zero_from

                zero_from(bufs, got)
                done(token, n, None)
                return
            err = OSError(errno.EIO, "short write")
        if isinstance(err, OSError) and not self._closed:
            # EINVAL: O_DIRECT refused the buffers; a short write: ENOSPC at
            # its end. The coroutine path bounces, retries or raises the
            # error, as it would have had the request come that way.
            self._spawn(self._rw_again(job))
        else:
            done(token, 0, err)

    async def _rw_again(self, job: tuple[Any, ...]) -> None:
        done, token, n, bufs, write, offset, _host = job
        try:
            got = await (self.writev(offset, bufs) if write else self.readv(offset, bufs))
        except Exception as err:  # noqa: BLE001 - handed to the caller's callback
            done(token, 0, err)
        else:
            done(token, got, None)

    async def _read_extents(self, extents: list[list[int]], base: int, sp: _Splitter) -> None:
        waits: list[Any] = []
        self._io_count += 1
        try:
            for kind, start, length, host in extents:
                views = sp.take(start - base, length)
                if kind == K_DATA:
                    waits.append(self._data_read(views, host))
                elif kind == K_UNALLOC and self.backing is not None:
                    waits.append(self._read_backing(start, length, views))
                elif kind == K_COMPRESSED:
                    waits.append(self._read_compressed(start, length, host, views))
                else:
                    _zero_views(views)
            if len(waits) == 1:
                await waits[0]
            elif waits:
                await asyncio.gather(*waits)
        finally:
            self._io_count -= 1

    async def _data_read(self, views: list[memoryview], host: int) -> None:
        """Read data cluster bytes: kernel AIO under O_DIRECT, else the thread pool."""
        aio = self._aio
        try:
            if aio is not None and _aio_views(views):
                want = sum(v.nbytes for v in views)
                got = await aio.submit(IOCB_CMD_PREADV, self._dfd, views, host, eager=True)
                if got < want:  # past EOF: the rest of the cluster reads as zeroes
                    from appliance.storage.io import zero_from

                    zero_from(views, got)
                return
            await _iorun(_preadv_full, self._dfd, views, host)
        except OSError as err:
            if err.errno != errno.EINVAL or not self._direct:
                raise
            await _iorun(_bounce_read, self._dfd, views, host)

    async def _data_write(self, views: list[Any], host: int, length: int) -> None:
        """Write data cluster bytes; AIO only inside the file, where io_submit does
        not block (extending O_DIRECT writes run synchronously in ext4)."""
        aio = self._aio
        try:
            if aio is not None and host + length <= self.file_size and _aio_views(views):
                done = await aio.submit(IOCB_CMD_PWRITEV, self._dfd, views, host, eager=True)
                if done == length:
                    return
                rest = _Splitter(views).take(done, length - done)
                await _iorun(_pwritev_full, self._dfd, rest, host + done)
                return
            await _iorun(_pwritev_full, self._dfd, views, host)
        except OSError as err:
            if err.errno == errno.EFBIG:
                raise _too_large(err, host) from err
            if err.errno != errno.EINVAL or not self._direct:
                raise
            if (host | length) & 511:
                # A read-modify-write of the sectors at the edges: two at once
                # on neighbouring bytes would each put back the other's old bytes.
                async with self._rmw_lock:
                    await _iorun(_bounce_write, self._dfd, views, host, length)
            else:
                await _iorun(_bounce_write, self._dfd, views, host, length)

    async def _read_backing(self, start: int, length: int, views: list[memoryview]) -> None:
        bsize = self.backing.size
        if start >= bsize:
            _zero_views(views)
            return
        if start + length <= bsize:
            await self.backing.readv(start, views)
            return
        sp = _Splitter(views)
        n = bsize - start
        await self.backing.readv(start, sp.take(0, n))
        _zero_views(sp.take(n, length - n))

    async def _read_compressed(self, start: int, length: int, entry: int,
                               views: list[memoryview]) -> None:
        data = await self._inflate(entry)
        a = start & (self._cs - 1)
        pos = a
        for v in views:
            v[:] = data[pos : pos + len(v)]
            pos += len(v)

    def _compressed_span(self, entry: int) -> tuple[int, int]:
        coff = entry & self._coff_mask
        nsec = ((entry >> self._csize_shift) & self._csize_mask) + 1
        return coff, nsec * 512 - (coff & 511)

    async def _inflate(self, entry: int) -> bytes:
        cached = self._comp_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        coff, csize = self._compressed_span(entry)
        if coff + 1 > self.file_size:
            raise await self.mark_corrupt("compressed cluster lies past the end of the file",
                                          coff)
        raw = await self._pread(coff, csize)
        data = _decompress(raw, self._cs, self.header.compression_type, coff)
        self._comp_cache = (entry, data)
        return data

    # ------------------------------------------------------------------ writes

    def _check_writable(self) -> None:
        if self._closed:
            raise Qcow2Error("image is closed", kind=ErrorKind.IO)
        if self.read_only:
            raise Qcow2Error("image is read-only", kind=ErrorKind.READ_ONLY)
        if self._failed:
            raise Qcow2Error("image is marked corrupt; writes are refused",
                             kind=ErrorKind.READ_ONLY)

    async def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        self._check_writable()
        if self._bm_pending:
            await self.guest_data_changes()
        if len(bufs) == 1 and self._l2 and not self._writethrough:
            n = len(bufs[0])
            hit = self._fast_host_of(offset, n)
            if hit is not None:
                e, host = hit
                if e & COPIED and (host >> self._cb) not in self._meta:
                    buf = bufs[0]
                    aio = self._aio
                    self._io_count += 1
                    try:
                        if (aio is not None and host + n <= self.file_size
                                and type(buf) is memoryview and not buf.readonly
                                and buf.c_contiguous):
                            try:
                                done = await aio.submit(IOCB_CMD_PWRITEV, self._dfd, bufs,
                                                        host, eager=True)
                            except OSError:
                                done = 0
                            if done != n:
                                await self._data_write([buf[done:]], host + done, n - done)
                        else:
                            await self._data_write([buf], host, n)
                    finally:
                        self._io_count -= 1
                    self._wrote(host + n)
                    return n
            elif (self._inflight and n <= self._cs
                  and (inf := self._inflight.get(offset >> self._cb)) is not None
                  and inf.piggy and (offset & (self._cs - 1)) + n <= self._cs
                  and 0 <= offset and offset + n <= self.size):
                return await self._piggy_write(inf, offset, bufs)
            elif hit is None and not self._lock.locked():
                if n > self._cs:
                    done = await self._fast_alloc_run(offset, bufs[0], n)
                else:
                    done = await self._fast_alloc_write(offset, bufs[0], n)
                if done:
                    return n
        sp = _Splitter(bufs)
        total = sp.total
        self._check_range(offset, total)
        if total == 0:
            return 0
        while True:
            async with self._lock:
                plan = await self._plan_write(offset, total)
            if isinstance(plan, asyncio.Future):
                await asyncio.shield(plan)
                continue
            break
        segments, allocs, deps = plan
        self._io_count += 1
        try:
            if len(segments) == 1:
                await self._write_segment(segments[0], offset, sp)
            else:
                await asyncio.gather(*(self._write_segment(s, offset, sp) for s in segments))
        except BaseException:
            async with self._lock:
                for item in allocs:
                    if item[5] != item[6]:
                        # Deferred like any free: a write riding on this allocation
                        # may still be in flight to the cluster.
                        self._pending_frees.append(item[5] >> self._cb)
                    inf = self._inflight.pop(item[0], None)
                    if inf is not None:
                        inf.settle(False)
            raise
        finally:
            self._io_count -= 1
        if allocs:
            async with self._lock:
                await self._commit(allocs)
        for inf in deps:
            # Our bytes went into a cluster another write is allocating: done only
            # once that allocation is published; if it failed, write again.
            await asyncio.shield(inf.fut)
            if not inf.ok:
                return await self.writev(offset, bufs)
        if self._writethrough:
            await self.flush()
        return total

    async def _piggy_write(self, inf: _Alloc, offset: int, bufs: Sequence[memoryview]) -> int:
        """A write inside a fresh cluster whose allocating write is in flight.

        What the planner does for it (a data segment at the allocation's host
        cluster, done once that allocation is published, again if it failed),
        without the lock and the plan: sequential small writes at queue depth
        meet their cluster's allocation in flight most of the time.
        """
        buf = bufs[0]
        n = len(buf)
        host = inf.host + (offset & (self._cs - 1))
        self._io_count += 1
        try:
            await self._data_write([buf], host, n)
        finally:
            self._io_count -= 1
        self._wrote(host + n)
        await asyncio.shield(inf.fut)
        if not inf.ok:
            return await self.writev(offset, bufs)
        return n

    async def _fast_alloc_write(self, offset: int, buf: memoryview, n: int) -> bool:
        """Allocate one cluster and write into it without planning, if the case is simple.

        The case: a write inside one unallocated (or zero-flagged, host-less)
        cluster that needs no copy-on-write (nothing to keep around the write,
        or the write covers the whole cluster), whose L2 table is cached and
        already this image's own (COPIED), while nobody holds the lock, with
        a free cluster at the allocator's hint. The refcount increment and
        the in-flight registration happen here with no await in between, so
        they are as atomic as under the lock; the L2 entry is published after
        the data as in :meth:`_commit`. Returns False, having changed
        nothing, when the case is not simple.
        """
        cb = self._cb
        cs = self._cs
        gc = offset >> cb
        a = offset & (cs - 1)
        if (self._ext or a + n > cs or offset < 0 or offset + n > self.size or n == 0
                or gc in self._inflight or (self._lazy_dirty is False and self.header.lazy_refcounts
                                            and self.header.version >= 3)):
            return False
        l1i = gc >> self._l2_bits
        l1e = self._l1[l1i] if l1i < len(self._l1) else 0
        l2off = l1e & OFFSET_MASK
        t = self._l2.get(l2off) if l1e & COPIED else None
        if t is None:
            return False
        i = gc & (self._l2_entries - 1)
        e = t[i]
        if e & OFFSET_MASK or e & COMPRESSED:
            return False
        whole = n == cs or offset + n == self.size and a == 0
        if not whole and not self._fill_is_zero(e, 0):
            return False  # backing data to copy around the write: the planner does that
        c = self._free_hint
        ti, bi = divmod(c, self._rb_entries)
        blk = self._rb.get(ti)
        if blk is None or blk[bi] or c + 1 > (1 << 56) >> cb or c in self._meta:
            return False  # (metadata counted 0: _alloc_clusters refuses it)
        host = c << cb
        fresh = host >= max(self._written_end, self._alloc_end, self._open_size)
        if not (fresh or whole):
            return False  # the rest of a reused cluster must be zeroed: the planner does that
        if l2off not in self._l2_dirty and len(self._l2_dirty) >= self._l2_cap // 2:
            return False
        blk[bi] = 1
        self._rb_dirty.add(ti)
        self._rc_dirty = True
        self._free_hint = c + 1
        if host + cs > self._alloc_end:
            self._alloc_end = host + cs
        if fresh and whole and self._extend_alone():
            if host + cs > self._falloc_end:
                self._falloc_end = host + cs
        elif fresh and (self._direct or not whole):
            # O_DIRECT writes that extend the file run one at a time (ext4 takes
            # the inode lock for them), from the pool as from kernel AIO.
            self._reserve_space(host + cs)
        # Other writes into this cluster may go straight to ``host`` meanwhile: the
        # cluster reads as zeroes around them (fresh) or this write covers it all.
        inf = _Alloc(None, host, True)
        self._inflight[gc] = inf
        ok = False
        self._io_count += 1
        try:
            await self._data_write([buf], host + a, n)
            self._wrote(host + a + n)
            ok = True
        finally:
            self._io_count -= 1
            if not ok:
                self._pending_frees.append(c)
                self._inflight.pop(gc, None)
                inf.settle(False)
        item = [gc, a, a + n, e, 0, host, -2, fresh]
        if (self._lock.locked() or self._l1[l1i] != l1e or self._l2.get(l2off) is not t
                or t[i] != e):
            # Metadata moved while the data was in flight: publish the careful way.
            async with self._lock:
                await self._commit([item])
            return True
        t[i] = host | COPIED
        self._l2_dirty.add(l2off)
        del self._inflight[gc]
        inf.settle(True)
        return True

    async def _fast_alloc_run(self, offset: int, buf: memoryview, n: int) -> bool:
        """Allocate a run of whole clusters and write into it with one pwritev.

        :meth:`_fast_alloc_write` for a large sequential write (convert,
        a guest streaming to fresh space): every cluster of the write is
        whole, host-less and in one cached L2 table of this image, and the
        run at the allocator's hint is free within one cached refcount block.
        The refcounts are raised and the clusters registered in flight with
        no await in between; the L2 entries are published after the data,
        and a flush writes refcounts before L2 tables, so a crash leaks the
        run at worst. Returns False, having changed nothing, otherwise.
        """
        cb = self._cb
        cs = self._cs
        if (self._ext or offset & (cs - 1) or offset < 0 or offset + n > self.size
                or (n & (cs - 1) and offset + n != self.size)
                or (self._lazy_dirty is False and self.header.lazy_refcounts
                    and self.header.version >= 3)):
            return False
        gc0 = offset >> cb
        k = (n + cs - 1) >> cb
        l1i = gc0 >> self._l2_bits
        if (gc0 + k - 1) >> self._l2_bits != l1i:
            return False
        l1e = self._l1[l1i] if l1i < len(self._l1) else 0
        l2off = l1e & OFFSET_MASK
        t = self._l2.get(l2off) if l1e & COPIED else None
        if t is None:
            return False
        i0 = gc0 & (self._l2_entries - 1)
        olds = t[i0 : i0 + k]
        inflight = self._inflight
        for j, e in enumerate(olds):
            if e & (OFFSET_MASK | COMPRESSED) or (inflight and gc0 + j in inflight):
                return False
        c = self._free_hint
        ti, bi = divmod(c, self._rb_entries)
        blk = self._rb.get(ti)
        if (blk is None or bi + k > len(blk) or any(blk[bi : bi + k])
                or c + k > (1 << 56) >> cb or not self._meta.isdisjoint(range(c, c + k))):
            return False
        if l2off not in self._l2_dirty and len(self._l2_dirty) >= self._l2_cap // 2:
            return False
        blk[bi : bi + k] = [1] * k
        self._rb_dirty.add(ti)
        self._rc_dirty = True
        self._free_hint = c + k
        host = c << cb
        end = host + (k << cb)
        fresh = host >= max(self._written_end, self._alloc_end, self._open_size)
        if end > self._alloc_end:
            self._alloc_end = end
        if fresh and self._direct:
            self._reserve_space(end)
        infs = [_Alloc(None, host + (j << cb), True) for j in range(k)]
        for j, inf in enumerate(infs):
            inflight[gc0 + j] = inf
        ok = False
        self._io_count += 1
        try:
            await self._data_write([buf], host, n)
            self._wrote(host + n)
            ok = True
        finally:
            self._io_count -= 1
            if not ok:
                self._pending_frees.extend(range(c, c + k))
                for j, inf in enumerate(infs):
                    inflight.pop(gc0 + j, None)
                    inf.settle(False)
        if (self._lock.locked() or self._l1[l1i] != l1e or self._l2.get(l2off) is not t
                or t[i0 : i0 + k] != olds):
            # Metadata moved while the data was in flight: publish the careful way.
            items = [[gc0 + j, 0, min(cs, n - (j << cb)), olds[j], 0, host + (j << cb), -2,
                      fresh] for j in range(k)]
            async with self._lock:
                await self._commit(items)
            return True
        t[i0 : i0 + k] = [h | COPIED for h in range(host, end, cs)]
        self._l2_dirty.add(l2off)
        for j, inf in enumerate(infs):
            del inflight[gc0 + j]
            inf.settle(True)
        return True

    async def _plan_write(self, offset: int, total: int) -> Any:
        """Map a write. Returns (segments, allocations) or a future to wait for.

        A segment is [host, pieces]; a piece is ("d", guest_start, n) for caller data
        or ("f", gc, entry, bitmap, a, b) for bytes copied from the cluster's old contents.
        """
        cb, cs = self._cb, self._cs
        end = offset + total
        gc0, gc1 = offset >> cb, (end - 1) >> cb
        segments: list[list[Any]] = []
        allocs: list[list[Any]] = []
        need_new: list[list[Any]] = []
        deps: list[_Alloc] = []
        inflight = self._inflight
        for gc in range(gc0, gc1 + 1):
            cstart = gc << cb
            a = max(offset, cstart) - cstart
            b = min(end, cstart + cs) - cstart
            if inflight:
                inf = inflight.get(gc)
                if inf is not None:
                    if not inf.piggy:
                        return inf.fut
                    _add_segment(segments, inf.host + a, ("d", cstart + a, b - a))
                    deps.append(inf)
                    continue
            e, bm = await self._entry(gc)
            host = e & OFFSET_MASK
            fast = (e & COPIED and host and not e & COMPRESSED
                    and (not e & ZERO_FLAG or self._ext))
            if fast and self._ext:
                need = _sc_mask(a, b, self._sc_size)
                fast = bm & need == need
            if fast:
                if host & (cs - 1) or (host >> cb) in self._meta:
                    raise await self.mark_corrupt(
                        f"L2 entry for guest cluster {gc} points at metadata or is unaligned",
                        host)
                _add_segment(segments, host + a, ("d", cstart + a, b - a))
                continue
            reuse = False
            if host and not e & COMPRESSED and not host & (cs - 1):
                if (host >> cb) in self._meta:
                    raise await self.mark_corrupt(
                        f"L2 entry for guest cluster {gc} points at metadata", host)
                reuse = bool(e & COPIED) or await self.refcount(host >> cb) == 1
            item = [gc, a, b, e, bm, host if reuse else -1, host if reuse else -2, False]
            allocs.append(item)
            if not reuse:
                need_new.append(item)
        # Allocate runs of consecutive new clusters contiguously in the file.
        i = 0
        while i < len(need_new):
            j = i + 1
            while j < len(need_new) and need_new[j][0] == need_new[j - 1][0] + 1:
                j += 1
            fresh = max(self._written_end, self._alloc_end, self._open_size)
            start = await self._alloc_clusters(j - i)
            for k in range(i, j):
                need_new[k][5] = (start + k - i) << cb
                # Never handed out before: the file reads zeroes there without our help.
                need_new[k][7] = need_new[k][5] >= fresh
            run_end = (start + j - i) << cb
            if need_new[i][7] and not need_new[i][1] and need_new[j - 1][2] == cs \
                    and self._extend_alone():
                # Whole clusters and nothing else in flight: past the end of
                # the file, as _start_alloc does. Reserving here put the next
                # 8 MiB of writes into unwritten extents, each finished by a
                # kworker after its completion (a fresh image's first 128
                # 64 KiB writes at queue depth 1: ~350 us each, not ~90).
                if run_end > self._falloc_end:
                    self._falloc_end = run_end
            elif need_new[i][7] and (self._direct or need_new[i][1]
                                     or need_new[j - 1][2] < cs):
                # Partial writes will skip their zero fills, and O_DIRECT writes
                # only run in parallel (under kernel AIO: asynchronously) inside
                # the file: back them with file space.
                self._reserve_space(run_end)
            i = j
        for item in allocs:
            piggy = bool(item[7]) and self._fill_is_zero(item[3], item[4])
            self._inflight[item[0]] = _Alloc(None, item[5], piggy)
        # Turn allocations into segments (in guest order, merged when host-contiguous).
        if allocs:
            segments = self._segments_with_allocs(offset, end, segments, allocs)
        return segments, allocs, deps

    def _segments_with_allocs(self, offset: int, end: int, fast: list[list[Any]],
                              allocs: list[list[Any]]) -> list[list[Any]]:
        cb, cs = self._cb, self._cs
        by_gc = {item[0]: item for item in allocs}
        out: list[list[Any]] = []
        for gc in range(offset >> cb, ((end - 1) >> cb) + 1):
            cstart = gc << cb
            a = max(offset, cstart) - cstart
            b = min(end, cstart + cs) - cstart
            item = by_gc.get(gc)
            if item is None:
                e_host = self._fast_host(fast, cstart + a)
                _add_segment(out, e_host, ("d", cstart + a, b - a))
                continue
            _, a, b, e, bm, host, old, fresh = item
            if fresh and self._fill_is_zero(e, bm):
                lo_fill, hi_fill = a, b
            elif self._ext and host == old:
                sc = self._sc_size
                lo, hi = a, b
                if a % sc and not bm >> (a // sc) & 1:
                    lo = a - a % sc
                if b % sc and not bm >> ((b - 1) // sc) & 1:
                    hi = b + (-b % sc)
                lo_fill, hi_fill = lo, min(hi, cs)
            elif host == old and not e & ZERO_FLAG:
                lo_fill, hi_fill = a, b
            else:
                lo_fill, hi_fill = 0, cs
            if lo_fill < a:
                _add_segment(out, host + lo_fill, ("f", gc, e, bm, lo_fill, a))
            _add_segment(out, host + a, ("d", cstart + a, b - a))
            if b < hi_fill:
                _add_segment(out, host + b, ("f", gc, e, bm, b, hi_fill))
        return out

    def _reserve_space(self, end: int) -> None:
        """Allocate file space ahead of fresh clusters, 8 MiB (or 4 clusters) at a time.

        Writes into fresh clusters then land inside the file: ext4 runs
        O_DIRECT writes that extend a file synchronously (inside io_submit),
        and the parts of a cluster we skip read as zeroes. QEMU's preallocate
        filter does the same for the same reason. Runs on the loop: one short
        fallocate per chunk; close() gives back what was not used.
        """
        if end <= self._falloc_end or self._no_falloc:
            return
        new_end = max(end, self._falloc_end + max(_RESERVE_CHUNK, 4 * self._cs))
        try:
            # fallocate(2) itself: glibc's posix_fallocate would write zeroes
            # where the file system cannot reserve space.
            from appliance.storage.io import fallocate

            fallocate(self._fd, 0, self._falloc_end, new_end - self._falloc_end)
        except OSError:
            self._no_falloc = True
            return
        self._falloc_end = new_end
        if new_end > self.file_size:
            self.file_size = new_end

    def _extend_alone(self) -> bool:
        """May a write of whole fresh clusters go past the end of the file, unreserved?

        Yes when it is O_DIRECT into a regular file and no other data
        request is in flight. ext4 runs an O_DIRECT write that extends the
        file synchronously (inside io_submit, or the pool thread's pwritev)
        with written extents; into space reserved ahead it completes later,
        after a kworker converts the unwritten extents (a wake-up more and
        the conversion: 64k write qd1 ~130 -> ~110 us a request, ~350 us
        for the first writes of a fresh reservation). QEMU writes past the
        end too. With requests in flight the synchronous write would hold
        them up (and ext4 takes the inode lock exclusively for it), so
        space is reserved ahead then (:meth:`_reserve_space`).
        """
        if not self._direct or not self._regular or self._io_count:
            return False
        aio = self._aio
        return aio is None or not aio.in_flight()

    def _fill_is_zero(self, e: int, bm: int) -> bool:
        if e & COMPRESSED:
            return False
        if self._ext:
            return not bm & EXT_ALL_ALLOC and (self.backing is None or bm >> 32 == EXT_ALL_ALLOC)
        if e & ZERO_FLAG and self.header.version >= 3:
            return True
        return not e & OFFSET_MASK and self.backing is None

    @staticmethod
    def _fast_host(fast: list[list[Any]], guest: int) -> int:
        for seg in fast:
            pos = seg[0]
            for p in seg[1]:
                if p[0] == "d" and p[1] == guest:
                    return pos
                pos += p[2] if p[0] == "d" else p[5] - p[4]
        raise AssertionError("fast segment not found")

    async def _write_segment(self, seg: list[Any], base: int, sp: _Splitter) -> None:
        host, pieces, length = seg
        views: list[Any] = []
        fills = []
        for p in pieces:
            if p[0] == "d":
                views.extend(sp.take(p[1] - base, p[2]))
            else:
                buf = self._buffer(p[5] - p[4])
                views.append(buf)
                fills.append(self._read_old(p[1], p[2], p[3], p[4], p[5], buf))
        if fills:
            await asyncio.gather(*fills)
        await self._data_write(views, host, length)
        self._wrote(host + length)

    async def _read_old(self, gc: int, e: int, bm: int, a: int, b: int,
                        buf: memoryview) -> None:
        out: list[list[int]] = []
        self._classify(gc, e, bm, a, b, out)
        await self._read_extents(out, (gc << self._cb) + a, _Splitter([buf]))

    async def _commit(self, allocs: list[list[Any]]) -> None:
        """Publish allocating writes in their L2 tables and wake waiters."""
        ok = False
        try:
            await self._mark_lazy_dirty()
            cb = self._cb
            for gc, a, b, _e, bm, host, old, _ in allocs:
                l1i = gc >> self._l2_bits
                _, t = await self._l2_for_write(l1i)
                i = (gc & (self._l2_entries - 1)) * self._stride
                cur = t[i]
                if self._ext:
                    if host == old:
                        need = _sc_mask(a, b, self._sc_size)
                        alloc = (bm | need) & EXT_ALL_ALLOC
                        zero = (bm >> 32) & ~need & EXT_ALL_ALLOC
                        # Partially written subclusters were filled around the data.
                        t[i + 1] = alloc | (zero << 32)
                    else:
                        t[i + 1] = EXT_ALL_ALLOC
                t[i] = host | COPIED
                self._l2_dirty.add(_l2_off(self._l1[l1i]))
                if host != old:
                    self._free_entry(cur)
            if len(self._l2_dirty) > self._l2_cap // 2:
                for off in list(self._l2_dirty):
                    t2 = self._l2.get(off)
                    if t2 is not None:
                        await self._write_l2(off, t2)
            ok = True
        finally:
            for item in allocs:
                inf = self._inflight.pop(item[0], None)
                if inf is not None and not inf._settled:
                    inf.settle(ok)
        del cb

    def _free_entry(self, e: int) -> None:
        """Queue the host clusters an old L2 entry referenced for freeing."""
        if e & COMPRESSED:
            coff, csize = self._compressed_span(e)
            first = coff >> self._cb
            last = (coff + csize - 1) >> self._cb
            self._pending_frees.extend(range(first, last + 1))
        else:
            host = e & OFFSET_MASK
            if host:
                self._pending_frees.append(host >> self._cb)

    # ------------------------------------------------------------------ zeroes and discard

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        await self.guest_data_changes()
        await self._zero_whole(offset, length, "discard")

    async def make_empty(self, offset: int = 0, length: int | None = None) -> None:
        """Drop every whole cluster of the range so reads fall through to the backing file."""
        self._check_writable()
        if length is None:
            length = self.size - offset
        await self.guest_data_changes()
        await self._zero_whole(offset, length, "empty")

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self._check_writable()
        self._check_range(offset, length)
        await self.guest_data_changes()
        cs = self._cs
        end = offset + length
        first = -(-offset // cs) * cs
        last = end // cs * cs
        if end == self.size:
            last = end  # the disk's partial last cluster counts as whole
        if first >= last:
            await self._write_zero_bytes(offset, length)
            return
        if offset < first:
            await self._write_zero_bytes(offset, first - offset)
        if last < end:
            await self._write_zero_bytes(last, end - last)
        if self.header.version < 3:
            if self.backing is None:
                # No zero flag, and nothing below to show through: as QEMU, a discard.
                await self._zero_whole(first, last - first, "discard")
                return
            # No zero flag in v2: write real zeroes.
            pos = first
            while pos < last:
                n = min(last - pos, len(_ZEROS))
                await self._write_zero_bytes(pos, n)
                pos += n
            return
        await self._zero_whole(first, last - first, "unmap" if may_unmap else "zero")

    async def _write_zero_bytes(self, offset: int, length: int) -> None:
        if self._direct:
            buf = self._buffer(length)
        elif length <= len(_ZEROS):
            buf = memoryview(_ZEROS)[:length]
        else:
            buf = memoryview(bytes(length))
        await self.writev(offset, [buf])

    async def _zero_whole(self, offset: int, length: int, mode: str) -> None:
        """Apply discard/zero to every whole cluster in the range (partial ones are skipped)."""
        cs, cb = self._cs, self._cb
        gc0 = -(-offset // cs)
        end = offset + length
        gc1 = end // cs if end < self.size else -(-end // cs)
        if gc0 >= gc1:
            return
        while True:
            async with self._lock:
                waits = [self._inflight[g].fut for g in range(gc0, gc1) if g in self._inflight]
                if not waits:
                    await self._zero_locked(gc0, gc1, mode)
                    break
            await asyncio.gather(*(asyncio.shield(w) for w in waits))
        del cb
        if self._writethrough:
            await self.flush()

    async def _zero_locked(self, gc0: int, gc1: int, mode: str) -> None:
        # As QEMU's qcow2 driver: on version 3, write-zeroes ("zero", "unmap") leaves every
        # cluster reading zero in this layer (the zero flag, or all-zero subclusters), taking
        # an L2 table where none is; a discard does that for clusters that were allocated or
        # that a backing file would show through, and leaves unallocated ones alone.
        has_backing = self.backing is not None
        v3 = self.header.version >= 3
        zeroing = mode in ("zero", "unmap") and v3
        gc = gc0
        while gc < gc1:
            l1i = gc >> self._l2_bits
            table_end = min(gc1, (l1i + 1) << self._l2_bits)
            l1e = self._l1[l1i] if l1i < len(self._l1) else 0
            if not l1e & OFFSET_MASK and not zeroing and (mode == "empty" or not (has_backing and v3)):
                gc = table_end
                continue
            await self._mark_lazy_dirty()
            l2off, t = await self._l2_for_write(l1i)
            for g in range(gc, table_end):
                i = (g & (self._l2_entries - 1)) * self._stride
                e = t[i]
                bm = t[i + 1] if self._ext else 0
                host = e & OFFSET_MASK
                keep = False
                if mode == "zero" and host and not e & COMPRESSED:
                    keep = bool(e & COPIED) or await self.refcount(host >> self._cb) == 1
                    # refcount() may have evicted nothing: tables are only evicted on load
                if mode == "empty":
                    # make_empty (commit): the cluster goes back to the backing file.
                    new_e = 0
                    if self._ext:
                        t[i + 1] = 0
                elif self._ext:
                    if keep:
                        new_e, new_bm = e | COPIED, EXT_ALL_ZERO
                    elif zeroing or has_backing or e & (OFFSET_MASK | COMPRESSED):
                        new_e, new_bm = 0, EXT_ALL_ZERO
                    else:
                        new_e, new_bm = e, bm  # a discard of what reads zero already
                    t[i + 1] = new_bm
                else:
                    if keep:
                        new_e = host | COPIED | ZERO_FLAG
                    elif not v3:
                        new_e = 0
                    elif zeroing or has_backing or e & (OFFSET_MASK | COMPRESSED):
                        new_e = ZERO_FLAG
                    else:
                        new_e = e  # a discard of what reads zero already
                if new_e == e and (not self._ext or bm == t[i + 1]):
                    continue
                t[i] = new_e
                self._l2_dirty.add(l2off)
                if not keep:
                    self._free_entry(e)
            gc = table_end

    # ------------------------------------------------------------------ flush and close

    async def flush(self) -> None:
        if self.read_only or self._closed:
            return
        async with self._lock:
            await self._flush_locked()
        if self.backing is not None and not self.backing.read_only:
            await self.backing.flush()

    async def _flush_locked(self) -> None:
        if self._failed:
            return
        for _ in range(4):
            if not self._lazy_dirty:
                await self._flush_refcounts()
            wrote = False
            for off in sorted(self._l2_dirty):
                t = self._l2.get(off)
                if t is not None:
                    await self._write_l2(off, t)
                    wrote = True
            self._l2_dirty.clear()
            if wrote or self._needs_sync:
                await self._sync()
            if self._l1_dirty:
                self._l1_dirty = False
                try:
                    await self._guard_meta_write(self.header.l1_table_offset,
                                                 len(self._l1) * 8, "active L1 table")
                    await self._pwrite(self.header.l1_table_offset,
                                       struct.pack(f">{len(self._l1)}Q", *self._l1))
                except BaseException:
                    # Not on disk (an L1 table past the largest file, say): every
                    # later flush must fail too, never report the data safe.
                    self._l1_dirty = True
                    raise
                await self._sync()
            if self._pending_frees and self._io_count == 0:
                frees, self._pending_frees = self._pending_frees, []
                self._meta_ok.clear()
                for c in frees:
                    self._meta.discard(c)
                    await self._update_refcount(c, -1)
                continue
            break
        if not self._lazy_dirty:
            await self._flush_refcounts()
        if self._alloc_end > self.file_size:
            # Fresh clusters written only in part: make the file cover them.
            await _iorun(os.ftruncate, self._fd, self._alloc_end)
            self.file_size = self._alloc_end
            self._needs_sync = True
        if self._needs_sync:
            await self._sync()

    async def close(self) -> None:
        if self._closed:
            return
        self._closing = True
        # Outside the try: if this wait is cancelled, the descriptors stay open
        # (a later close() finishes the job) rather than close under a request.
        await self._drain()
        try:
            if not self.read_only and not self._failed:
                async with self._lock:
                    await self._flush_locked()
                    keep = max(self._alloc_end, self._written_end, self._open_size)
                    if self._falloc_end > keep and self.file_size > keep:
                        await _iorun(os.ftruncate, self._fd, keep)
                        self.file_size = keep
                    if self._lazy_dirty:
                        self._lazy_dirty = False
                        await self._flush_refcounts()
                        await self._sync()
                        self.header.incompatible_features &= ~H.INCOMPAT_DIRTY
                        await self._write_header()
                        await self._sync()
        finally:
            self._closed = self._closing = True
            self._close_fds()
            if self.backing is not None:
                await self.backing.close()

    async def _drain(self) -> None:
        """Wait until no request is in flight: start_rw's pool and AIO jobs, the tasks
        that follow some of them up (retries, publications), readv/writev calls.

        A pool job holds the descriptor number, not the file: closed under it,
        the number may already name another file when the job's syscall runs.
        """
        while self._retries or self._io_count:
            if self._retries:
                # asyncio.wait, not gather: cancelling close() must not cancel them.
                await asyncio.wait(set(self._retries))
            else:
                await asyncio.sleep(0.001)

    def _close_fds(self) -> None:
        if self._aio is not None:
            self._aio.close()
            self._aio = None
        if self._dfd >= 0 and self._dfd != self._fd:
            os.close(self._dfd)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = self._dfd = -1

    async def __aenter__(self) -> Qcow2Image:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ compressed writes

    async def write_compressed(self, offset: int, data: bytes) -> None:
        """Write one whole cluster compressed (used by ``convert -c``).

        The cluster must be unallocated in this layer. Falls back to a normal write
        when compression does not save space.
        """
        self._check_writable()
        cs, cb = self._cs, self._cb
        if offset % cs or len(data) != min(cs, self.size - offset):
            raise Qcow2Error("compressed writes must cover exactly one cluster")
        if len(data) < cs:
            data = data + bytes(cs - len(data))
        blob = await _iorun(_compress, data,
                                          self.header.compression_type)
        if len(blob) >= cs - 512:
            await self.writev(offset, [memoryview(data)[: min(cs, self.size - offset)]])
            return
        gc = offset >> cb
        async with self._lock:
            tail = self._comp_tail
            # Each compressed cluster holds one reference on every host cluster it
            # touches; a narrow refcount may run out before the cluster fills up.
            if not tail or (tail & (cs - 1)) + len(blob) > cs or \
                    await self.refcount(tail >> cb) >= self._rc_max:
                start = await self._alloc_clusters(1)
                tail = start << cb
            else:
                await self._update_refcount(tail >> cb, 1)
            n = len(blob)
            nsec = ((tail + n - 1) >> 9) - (tail >> 9)
            await self._pwrite(tail, blob)
            self._comp_tail = tail + n if (tail + n) & (cs - 1) else 0
            await self._mark_lazy_dirty()
            l2off, t = await self._l2_for_write(gc >> self._l2_bits)
            i = (gc & (self._l2_entries - 1)) * self._stride
            self._free_entry(t[i])
            t[i] = COMPRESSED | (nsec << self._csize_shift) | tail
            if self._ext:
                t[i + 1] = 0
            self._l2_dirty.add(l2off)

    # ------------------------------------------------------------------ whole-image operations

    async def block_status(self, offset: int, length: int) -> list[list[int]]:
        """Extents of this layer (kinds K_*) for ``map`` and ``convert``."""
        async with self._lock:
            return await self.map_range(offset, length)

    async def snapshot_create(self, name: str, *, vm_clock_nsec: int = 0) -> Snapshot:
        from appliance.qcow2.snapops import create_snapshot

        return await create_snapshot(self, name, vm_clock_nsec=vm_clock_nsec)

    async def set_header_field(self, **changes: Any) -> None:
        """Update header fields and write the header durably (after a full flush)."""
        async with self._lock:
            await self._flush_locked()
            for k, v in changes.items():
                setattr(self.header, k, v)
            await self._write_header()
            await self._sync()
            self.size = self.header.size

    def now(self) -> tuple[int, int]:
        t = time.time_ns()
        return t // 1_000_000_000, t % 1_000_000_000


class _Alloc:
    """A guest cluster whose allocating write is in flight.

    ``piggy``: the allocation writes only its own bytes into a fresh cluster,
    so other writes to the same cluster may put theirs at ``host`` meanwhile.
    ``fut`` resolves once the allocation is published (``ok``) or given up;
    made only when someone waits (most allocations finish unwatched).
    """

    __slots__ = ("_fut", "host", "piggy", "ok", "_settled")

    def __init__(self, fut: asyncio.Future[None] | None, host: int, piggy: bool) -> None:
        self._fut = fut
        self.host = host
        self.piggy = piggy
        self.ok = False
        self._settled = False

    @property
    def fut(self) -> asyncio.Future[None]:
        f = self._fut
        if f is None:
            f = self._fut = asyncio.get_running_loop().create_future()
            if self._settled:
                f.set_result(None)
        return f

    def settle(self, ok: bool) -> None:
        """The allocation is published (``ok``) or given up: wake whoever waits."""
        self.ok = ok
        self._settled = True
        f = self._fut
        if f is not None and not f.done():
            f.set_result(None)


def _append(out: list[list[int]], kind: int, start: int, length: int, host: int) -> None:
    if out:
        last = out[-1]
        if last[0] == kind and last[1] + last[2] == start and (
            kind in (K_UNALLOC, K_ZERO) or kind == K_DATA and last[3] + last[2] == host
        ):
            last[2] += length
            return
    out.append([kind, start, length, host])


def _add_segment(segs: list[list[Any]], host: int, piece: tuple[Any, ...]) -> None:
    n = piece[2] if piece[0] == "d" else piece[5] - piece[4]
    if segs:
        last = segs[-1]
        if last[0] + last[2] == host:
            last[1].append(piece)
            last[2] += n
            return
    segs.append([host, [piece], n])


def _sc_mask(a: int, b: int, sc: int) -> int:
    first, last = a // sc, (b - 1) // sc
    return ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)


def _l2_off(l1e: int) -> int:
    return l1e & OFFSET_MASK


def probe_format(path: str | os.PathLike[str], *, warn: bool = True) -> str:
    """'qcow2' if the file starts with the qcow2 magic, else 'raw'.

    :param warn: log QEMU's warning when raw is guessed. QEMU gives it only
        when the probed image is opened writable.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == H.MAGIC:
        return "qcow2"
    if warn:
        logging.getLogger("appliance.qcow2").warning(
            "WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
            "         Automatically detecting the format is dangerous for raw images, write "
            "operations on block 0 will be restricted.\n"
            "         Specify the 'raw' format explicitly to remove the restrictions.", path)
    return "raw"
