"""``appliance img`` data-moving subcommands: convert, commit, rebase, compare.

They move data through the same BlockBackend calls the VMM uses, in large
chunks with a few requests in flight, and keep outputs sparse: ranges the
source reports as unallocated or zero are skipped, and data chunks are scanned
for all-zero blocks (``-S``, default 4 KiB) that need not be written.
"""

from __future__ import annotations

import asyncio
import functools
import mmap
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError
from appliance.qcow2 import header as H
from appliance.qcow2.backing import RawImage, open_any, resolve_backing, zero_over_backing
from appliance.qcow2.cli import (
    _open,
    _parser,
    chain_status,
    parse_o,
    parse_o_all,
    parse_size_arg,
    print_create_options,
    wants_help,
)
from appliance.qcow2.errors import Qcow2Error
from appliance.qcow2.image import (
    K_COMPRESSED,
    K_DATA,
    K_UNALLOC,
    K_ZERO,
    Qcow2Image,
    _Splitter,
    copy_range,
)
from appliance.qcow2.iopool import run as _iorun
from appliance.qcow2.refcount import encode_block

CHUNK = 2 * 1024 * 1024
# convert's unit of work (a read, a zero scan, a write): 8 MiB rather than 2
# took a 2 GiB convert from ~0.3 to ~0.2 s of user CPU (a quarter of the pool
# round trips and engine calls) and was faster in wall time both ways.
CONVERT_CHUNK = 8 * 1024 * 1024


def _aligned(n: int) -> memoryview:
    return memoryview(mmap.mmap(-1, max(4096, (n + 4095) & ~4095)))[:n]


class _Progress:
    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = max(1, total)
        self.done = 0
        self.shown = -1.0

    def add(self, n: int) -> None:
        if not self.enabled:
            return
        self.done = min(self.total, self.done + n)  # convert -c counts a cluster's zero part twice
        pct = self.done * 100.0 / self.total
        if pct - self.shown >= 1.0 or self.done >= self.total:
            self.shown = pct
            sys.stdout.write(f"    ({pct:.2f}/100%)\r")
            sys.stdout.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stdout.write("    (100.00/100%)\n")


def _rate_arg(text: str | None) -> int:
    """-r of convert and commit: bytes a second, 0 (or none given) for no limit."""
    if text is None:
        return 0
    try:
        rate = parse_size_arg(text)
    except ConfigError:
        rate = -1
    if rate < 0:
        raise ConfigError("Invalid rate limit specified. You may use k, M, G, T, P or E "
                          "suffixes for kilobytes, megabytes, gigabytes, terabytes, "
                          "petabytes and exabytes.")
    return rate


class _RateLimit:
    """convert -r: bytes a second, 0 for no limit. Each chunk waits until the
    bytes before it have had their time."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.booked = 0
        self.start = time.monotonic()

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        due = self.start + self.booked / self.rate
        self.booked += n
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)


_FLAG = bytes([0] + [1] * 255)  # translate table: any non-zero byte to 1


def _nonzero_runs(buf: memoryview, gran: int) -> list[tuple[int, int]]:
    """Byte ranges of ``buf`` holding non-zero ``gran``-sized blocks (merged).

    A block whose first or last byte is non-zero holds data; two strided
    slices find those for the whole buffer at C speed, so only blocks with
    both ends zero get a full comparison (on ordinary data, a few a chunk).
    Comparisons here go through ``bytes.startswith``, a memcmp: ``==``
    between a memoryview and bytes goes item by item (~60 us a 64 KiB block,
    two seconds for every GiB of zeroes).
    """
    n = len(buf)
    full = n // gran
    zero = bytes(gran)
    # data[i] == 1: block i holds data.
    ends = (int.from_bytes(buf[: full * gran : gran], "little")
            | int.from_bytes(buf[gran - 1 : full * gran : gran], "little"))
    data = bytearray(ends.to_bytes(full, "little").translate(_FLAG))
    i = data.find(0)
    while i >= 0:
        if not zero.startswith(buf[i * gran : (i + 1) * gran]):
            data[i] = 1
        i = data.find(0, i + 1)
    if full * gran < n:
        data.append(not zero.startswith(buf[full * gran :]))
    runs: list[tuple[int, int]] = []
    i = data.find(1)
    while i >= 0:
        e = data.find(0, i)
        if e < 0:
            e = len(data)
        runs.append((i * gran, min(n, e * gran)))
        i = data.find(1, e)
    return runs


# ---------------------------------------------------------------- convert


class Concatenation:
    """Several read-only images end to end, as ``convert`` sees more than one source.

    Offers what :func:`convert` uses of a source: ``size``, ``readv`` and
    ``block_status`` (each part's whole backing chain folded in, so the
    concatenation itself has no backing file).
    """

    backing = None

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.starts: list[int] = []
        pos = 0
        for part in parts:
            self.starts.append(pos)
            pos += part.size
        self.size = pos
        self.read_only = True
        self._direct = any(getattr(part, "_direct", False) for part in parts)

    def _pieces(self, offset: int, length: int) -> list[tuple[Any, int, int, int]]:
        """(part, offset in part, length, offset in the request) covering the range."""
        out = []
        end = min(offset + length, self.size)
        for part, base in zip(self.parts, self.starts, strict=True):
            a, b = max(offset, base), min(end, base + part.size)
            if a < b:
                out.append((part, a - base, b - a, a - offset))
        return out

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        sp = _Splitter(bufs)
        n = 0
        for part, local, length, at in self._pieces(offset, sp.total):
            await part.readv(local, sp.take(at, length))
            n += length
        return n

    async def block_status(self, offset: int, length: int) -> list[list[int]]:
        out: list[list[int]] = []
        for part, local, n, at in self._pieces(offset, length):
            for start, m, _, _, _, kind, _ in await chain_status(part, local, n):
                out.append([kind, offset + at + start - local, m, -1])
        return out

    async def close(self) -> None:
        for part in self.parts:
            await part.close()


def _snapshot_param(text: str) -> tuple[str | None, str | None, str | None]:
    """(name, id, either) from ``convert -l``: ``snapshot.name=N,snapshot.id=I`` (one or both),
    or a bare value, which is an ID or a name."""
    if not text.startswith("snapshot."):
        return None, None, text
    o = parse_o(text)
    extra = set(o) - {"snapshot.name", "snapshot.id"}
    if extra:
        raise ConfigError(f"Invalid parameter '{sorted(extra)[0]}'")
    return o.get("snapshot.name"), o.get("snapshot.id"), None


def _target_opts(text: str, a: Any, argv: list[str]) -> tuple[str, str]:
    """--target-image-opts: the target named by an option string
    (``driver=qcow2,file.filename=t.qcow2``), into an image that must exist (-n)."""
    from appliance.cli.options import split_option
    from appliance.qcow2.image import probe_format

    if not a.no_create:
        raise ConfigError("--target-image-opts requires use of -n flag")
    if any(x == "-O" or x.startswith("-O") and len(x) > 2 for x in argv):
        raise ConfigError("--image-opts and --format are mutually exclusive")
    keys = dict(kv.partition("=")[::2] for kv in split_option(text))
    path = keys.get("file.filename", keys.get("filename"))
    if "=" not in text or not path:
        raise Qcow2Error(f"Could not open '{text}': Cannot find device='{text}' nor node-name='{text}'")
    driver = keys.get("driver")
    if driver is None:
        driver = probe_format(path, warn=False) if os.path.exists(path) else "raw"
    return path, "raw" if driver == "file" else driver


async def cmd_convert(argv: list[str]) -> int:
    target_opts = "--target-image-opts" in argv
    if target_opts:
        argv = [x for x in argv if x != "--target-image-opts"]
    p = _parser("convert")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-O", dest="out_fmt", default="raw")
    p.add_argument("-c", dest="compress", action="store_true")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-S", dest="sparse", default=None)
    p.add_argument("-t", dest="cache", default="unsafe")
    p.add_argument("-T", dest="src_cache", default="writeback")
    p.add_argument("-n", dest="no_create", action="store_true")
    p.add_argument("-B", dest="backing")
    p.add_argument("-F", dest="backing_fmt")
    p.add_argument("-m", dest="coroutines", type=int, default=8)
    p.add_argument("-W", dest="out_of_order", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("-l", dest="snapshot")
    p.add_argument("-C", dest="copy_offload", action="store_true")
    p.add_argument("-r", dest="rate")
    p.add_argument("--target-is-zero", action="store_true")
    p.add_argument("--bitmaps", action="store_true")
    p.add_argument("--skip-broken-bitmaps", action="store_true")
    p.add_argument("--salvage", action="store_true")
    p.add_argument("files", nargs="*")
    a = p.parse_intermixed_args(argv)
    if a.skip_broken_bitmaps and not a.bitmaps:
        raise ConfigError("Use of --skip-broken-bitmaps requires --bitmaps")
    if any(wants_help(parse_o(t)) for t in a.options):
        return print_create_options(a.out_fmt)
    if a.target_is_zero and not a.no_create:
        raise ConfigError("--target-is-zero requires use of -n flag")
    if a.copy_offload and a.compress:
        raise ConfigError("Cannot enable copy offloading when -c is used")
    if a.copy_offload and a.sparse is not None:
        raise ConfigError("Cannot enable copy offloading when -S is used")
    if a.copy_offload and a.salvage:
        raise ConfigError("Cannot use copy offloading in salvaging mode")
    if a.sparse is None:
        a.sparse = "4k"
    rate = _rate_arg(a.rate)
    if len(a.files) < 2:
        raise ConfigError("Must specify image file name")
    *src_names, dst_name = a.files
    if target_opts:
        dst_name, a.out_fmt = _target_opts(dst_name, a, argv)
    if a.snapshot is not None and len(src_names) > 1:
        raise ConfigError("No support for concatenating multiple snapshot")
    snap_name, snap_id, snap_either = (
        _snapshot_param(a.snapshot) if a.snapshot is not None else (None, None, None))
    o = parse_o_all(a.options)
    # -o backing_file= names the target's backing file as -B does.
    a.backing = a.backing or o.get("backing_file") or None
    if a.backing and a.out_fmt == "raw":
        raise Qcow2Error("Backing file not supported for file format 'raw'")
    if len(src_names) > 1 and a.backing:
        raise Qcow2Error("Having a backing file for the target makes no sense when "
                         "concatenating multiple input images")
    if a.backing and not a.no_create and not (a.backing_fmt or o.get("backing_fmt")):
        # qemu-img (since 6.1) will not write a backing file whose format must be probed.
        raise Qcow2Error("Use of backing file requires explicit backing format")
    if a.out_fmt not in ("raw", "qcow2"):
        raise ConfigError(f"Unknown file format '{a.out_fmt}'")
    if a.compress and a.out_fmt != "qcow2":
        raise ConfigError("Compression not supported for this file format")
    if not 1 <= a.coroutines <= 16:
        raise ConfigError("Invalid number of coroutines. Allowed number of coroutines is "
                          "between 1 and 16")
    sparse = parse_size_arg(a.sparse)
    if sparse and sparse % 512:
        raise ConfigError("Invalid buffer size for sparse output specified")
    parts: list[Any] = []
    try:
        for name in src_names:
            parts.append(await _open(name, a.fmt, read_only=True, cache=a.src_cache,
                                     share=a.force_share))
        if a.snapshot is not None:
            from appliance.qcow2 import snapops

            if not isinstance(parts[0], Qcow2Image):
                raise Qcow2Error(f"Failed to load snapshot: '{src_names[0]}' has no internal snapshots")
            await snapops.view_snapshot(parts[0], name=snap_name, ident=snap_id, either=snap_either)
    except BaseException:
        for part in parts:
            await part.close()
        raise
    src = parts[0] if len(parts) == 1 else Concatenation(parts)
    try:
        if a.bitmaps:
            _check_bitmaps(parts, a.skip_broken_bitmaps)
        if not a.no_create:
            from appliance.qcow2.cli import refuse_if_in_use

            # As qemu-img: a target another process uses is refused before it is touched.
            try:
                refuse_if_in_use(dst_name)
            except Qcow2Error as err:
                raise Qcow2Error(str(err).replace(f"{dst_name}: ", f"{dst_name}: error while "
                                                  f"converting {a.out_fmt}: ", 1)) from None
            try:
                await _create_target(dst_name, a.out_fmt, src.size, o, a.backing, a.backing_fmt)
            except Qcow2Error as err:
                if not str(err).startswith("Could not create"):
                    raise
                raise Qcow2Error(f"{dst_name}: error while converting {a.out_fmt}: {err}") from None
        else:
            from appliance.qcow2.cli import refuse_unopenable

            refuse_unopenable(dst_name)
        dst = await open_any(dst_name, a.out_fmt, read_only=False, cache=a.cache)
        try:
            from appliance.qcow2.cli import lock_for_command

            lock_for_command(dst, dst_name, write=True)
        except BaseException:
            await dst.close()
            raise
        try:
            if a.no_create and dst.size < src.size:
                raise Qcow2Error("output file is smaller than input file")
            if a.target_is_zero and a.backing:
                # -B names one; a target that has a backing file of its own is taken at
                # its word, as qemu-img takes it.
                raise Qcow2Error("Cannot use --target-is-zero when the destination image "
                                 "has a backing file")
            if a.bitmaps and not (isinstance(dst, Qcow2Image) and dst.header.version >= 3):
                raise Qcow2Error(f"Format driver '{a.out_fmt}' does not support bitmaps")
            if a.bitmaps:
                _check_target_bitmaps(parts[0], dst, a.skip_broken_bitmaps)
            await convert(src, dst, compress=a.compress, sparse=sparse,
                          explicit_zeroes=(a.no_create and not a.target_is_zero
                                           or a.backing is not None),
                          progress=a.progress and not a.quiet, workers=a.coroutines,
                          file_copy=not a.force_share and not a.salvage, rate=rate,
                          salvage=None if not a.salvage else (lambda m: None) if a.quiet else _warn,
                          top_only=a.backing is not None, in_order=not a.out_of_order)
            if a.bitmaps:
                await _copy_bitmaps(parts[0], dst, a.skip_broken_bitmaps)
        finally:
            await dst.close()
    finally:
        await src.close()
    return 0


def _check_bitmaps(parts: list[Any], skip_broken: bool) -> None:
    """qemu-img's checks before a convert --bitmaps copies anything."""
    from appliance.qcow2.bitmaps import FLAG_IN_USE

    if len(parts) > 1:
        raise Qcow2Error("Copying bitmaps only possible with single source")
    src = parts[0]
    if not isinstance(src, Qcow2Image) or src.header.version < 3:
        raise Qcow2Error("Source lacks bitmap support")
    for b in src.bitmaps:
        if b.flags & FLAG_IN_USE and not skip_broken:
            raise Qcow2Error(f"Cannot copy inconsistent bitmap '{b.name}'\n"
                             "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' "
                             "to delete it")


def _check_target_bitmaps(src: Qcow2Image, dst: Qcow2Image, skip_broken: bool) -> None:
    """Before any data moves: a bitmap name the target (-n) has already, or a
    target of another size, would stop the copy (qemu-img's words); better
    to stop while the target is untouched."""
    from appliance.qcow2.bitmaps import FLAG_IN_USE

    names = [b.name for b in src.bitmaps if not (skip_broken and b.flags & FLAG_IN_USE)]
    have = {b.name for b in dst.bitmaps}
    for name in names:
        if name in have:
            raise Qcow2Error(f"Failed to create bitmap {name}: Bitmap already exists: {name}")
    if names and dst.size != src.size:
        raise Qcow2Error(f"Failed to populate bitmap {names[0]}: Bitmaps are of different sizes "
                         f"(destination size is {dst.size}, source size is {src.size}) and can't be merged")


async def _copy_bitmaps(src: Qcow2Image, dst: Qcow2Image, skip_broken: bool) -> None:
    """Copy the source's persistent bitmaps, enabled ones staying enabled."""
    from appliance.qcow2.bitmaps import FLAG_AUTO, FLAG_IN_USE, add_bitmaps, read_bits, replace_bitmaps

    items = []
    for b in src.bitmaps:
        if b.flags & FLAG_IN_USE:
            if skip_broken:
                print(f"appliance img: warning: Skipping inconsistent bitmap '{b.name}'",
                      file=sys.stderr)
            continue
        items.append((b.name, b.granularity_bits, b.flags & FLAG_AUTO, bytes(await read_bits(src, b))))
    if not items:
        return
    # A target that existed (-n) keeps its own bitmaps (_check_target_bitmaps
    # made sure none is in the way).
    kept = [(b.name, b.granularity_bits, b.flags, bytes(await read_bits(dst, b))) for b in dst.bitmaps]
    await dst.flush()
    if kept:
        await replace_bitmaps(dst, kept + items)
    else:
        async with dst._lock:
            await add_bitmaps(dst, items)


async def _create_target(name: str, fmt: str, size: int, o: dict[str, str],
                         backing: str | None, backing_fmt: str | None) -> None:
    if fmt == "raw":
        from appliance.qcow2.create import create_raw

        create_raw(name, size, o.get("preallocation", "off"))
        return
    from appliance.qcow2.cli import _create_options
    from appliance.qcow2.create import create_image

    opts = _create_options(dict(o), size)
    opts.size = size
    if backing:
        opts.backing_file = backing
        opts.backing_fmt = backing_fmt or opts.backing_fmt
        if opts.backing_fmt is None:
            from appliance.qcow2.image import probe_format

            opts.backing_fmt = probe_format(resolve_backing(Path(name), backing))
    await create_image(name, opts)


def _source_file(layer: Any, host: int, length: int) -> int | None:
    """The buffered fd holding a data extent's bytes at ``host``, if it can be mapped."""
    fd = getattr(layer, "_fd", -1)
    if (host < 0 or fd < 0 or getattr(layer, "_direct", False)
            or getattr(layer, "_dfd", fd) != fd):
        return None
    end = getattr(layer, "file_size", None) if isinstance(layer, Qcow2Image) else layer.size
    if end is None or host + length > end:
        return None  # bytes past the end of the file read as zeroes: the engine does that
    return int(fd)


_scan_buffers = threading.local()
SCAN_SLICE = 1 << 18  # read, scan and write a chunk in pieces that stay in the CPU cache


def _read_file(fd: int, host: int, view: memoryview) -> None:
    """Fill ``view`` from the file at ``host``; bytes past its end read as zeroes.

    A read, not a mapping: a source file truncated under us must read as
    zeroes (what the engine gives past EOF), where touching a mapped page
    past the new end would kill the process with SIGBUS.
    """
    got, length = 0, len(view)
    while got < length:
        n = os.preadv(fd, [view[got:]], host + got)
        if n <= 0:
            view[got:] = bytes(length - got)
            return
        got += n


def _thread_buffer(length: int) -> memoryview:
    buf: bytearray | None = getattr(_scan_buffers, "buf", None)
    if buf is None or len(buf) < length:
        buf = _scan_buffers.buf = bytearray(length)
    return memoryview(buf)[:length]


def _file_pieces(fd: int, host: int, length: int,
                 gran: int) -> Iterator[tuple[int, memoryview, list[tuple[int, int]]]]:
    """(offset, bytes, their data runs) of [host, host+length) of a file, a
    cache-sized piece at a time in the pool thread's buffer (``gran`` > 0)."""
    step = max(gran, SCAN_SLICE // gran * gran)
    with _thread_buffer(min(length, step)) as buf:
        for off in range(0, length, step):
            view = buf[: min(step, length - off)]
            _read_file(fd, host + off, view)
            yield off, view, _nonzero_runs(view, gran)


def _merge_runs(runs: list[tuple[int, int]], off: int, more: list[tuple[int, int]]) -> None:
    """Append ``more`` (offsets relative to ``off``) to ``runs``, joining touching ones."""
    for a, b in more:
        if runs and runs[-1][1] == off + a:
            runs[-1] = (runs[-1][0], off + b)
        else:
            runs.append((off + a, off + b))


def _copy_file_chunk(src_fd: int, host: int, dst_fd: int, start: int, length: int,
                     gran: int, lock: threading.Lock) -> list[tuple[int, int]]:
    """One convert chunk into a raw file, in one pool job: each piece's data
    runs are written from the buffer while it is still in the CPU cache."""
    if not gran:
        copy_range(src_fd, host, dst_fd, start, length, lock)
        return [(0, length)]
    runs: list[tuple[int, int]] = []
    for off, view, piece in _file_pieces(src_fd, host, length, gran):
        with lock:
            for a, b in piece:
                _write_all(dst_fd, start + off + a, view[a:b])
        _merge_runs(runs, off, piece)
    return runs


def _write_all(fd: int, pos: int, view: memoryview) -> None:
    while len(view):
        n = os.pwritev(fd, [view], pos)
        view, pos = view[n:], pos + n


async def convert(src: Any, dst: Any, *, compress: bool = False, sparse: int = 4096,
                  explicit_zeroes: bool = False, progress: bool = False,
                  workers: int = 8, file_copy: bool = True, rate: int = 0,
                  salvage: Callable[[str], None] | None = None, top_only: bool = False,
                  in_order: bool = True) -> None:
    """Copy every byte of ``src`` into ``dst`` (same size or larger).

    Into a qcow2 image the writes go in disk order unless ``in_order`` is
    off (qemu-img convert -W), so its clusters are laid out as qemu-img lays
    them out; with ``compress`` every target cluster holding data is
    compressed whole, its zero part too, as qemu-img does.

    With ``top_only`` (a target with a backing file of its own, qemu-img
    convert -B) only what the source's top image holds is copied: what it
    leaves to its backing file is left to the target's, as qemu-img does.

    With ``salvage`` (qemu-img --salvage) a read that fails is retried one
    512-byte sector at a time, and each sector that still fails is written as
    zeroes after ``salvage`` is told about it.

    With ``file_copy`` (not for sources others may be writing: ``-U``), data
    held in a buffered source file goes to a buffered target in the kernel:
    the source bytes are read once to find zero blocks and the data runs are
    copied file to file with copy_file_range (the write side never passes
    through a user-space buffer).
    """
    size = min(src.size, dst.size)
    prog = _Progress(progress, size)
    limit = _RateLimit(rate)
    qdst = isinstance(dst, Qcow2Image)
    cs = dst._cs if qdst else 4096
    gran = (max(sparse, cs) if qdst else sparse) if sparse else 0
    dst_fd = -1
    # Into a qcow2 image the bytes are read once and written from that buffer:
    # scanning the source and then copying it file to file read it twice
    # (measured ~10% slower for 1 GiB of random data).
    if file_copy and not compress and not qdst:
        fd = getattr(dst, "_fd", -1)
        if not getattr(dst, "_direct", False) and getattr(dst, "_dfd", fd) == fd:
            dst_fd = fd
    jobs: asyncio.Queue[tuple[int, int, int | None, int, int] | None] = asyncio.Queue()
    order: list[int] = []  # each job's start, in disk order
    compress_end = 0
    pos = 0
    while pos < size:
        n = min(CONVERT_CHUNK * 4, size - pos)
        for start, length, _, _, _, kind, where in await _extents(src, pos, n, top_only):
            if kind == K_BACKING:
                prog.add(length)  # left to the target's own backing file
                continue
            # -S 0 means no sparse output at all: zeroes are written as data too.
            if kind in (K_UNALLOC, K_ZERO) and sparse:
                if explicit_zeroes:
                    await dst.write_zeroes(start, length, may_unmap=True)
                prog.add(length)
                continue
            host, sfd = -1, None
            if dst_fd >= 0 and kind == K_DATA and where is not None:
                host = where[0]
                sfd = _source_file(where[1], host, length)
            if compress:
                # Whole target clusters: a neighbour's run in the same cluster is already there.
                e = min(size, -(-(start + length) // cs) * cs)
                start = max(start // cs * cs, compress_end)
                length = e - start
                compress_end = max(compress_end, e)
            # Split data extents into chunks aligned to the target's clusters.
            s = start
            while s < start + length:
                e = min(start + length, (s // CONVERT_CHUNK + 1) * CONVERT_CHUNK)
                jobs.put_nowait((s, e - s, sfd, host + s - start, len(order)))
                order.append(s)
                s = e
        pos += n
    direct = getattr(src, "_direct", False) or getattr(dst, "_direct", False)
    # Reads run in parallel, writes one at a time: buffered writes to one file
    # serialize on the inode lock anyway, and several writers waiting there
    # spin on it (measured ~8% of the CPU of a 2 GiB convert on 2 cores).
    write_lock = asyncio.Lock()
    # qemu-img writes in disk order (unless -W): a qcow2 target's clusters
    # are then allocated in that order whichever read finishes first.
    ordered = qdst and in_order and not compress
    turn = asyncio.Condition()
    next_write = [0]
    file_lock = threading.Lock()  # the same, for copies a pool job makes into a raw file

    async def file_chunk(start: int, length: int, sfd: int, host: int) -> list[tuple[int, int]]:
        # Only raw targets come here (dst_fd is set for those alone).
        return list(await _iorun(_copy_file_chunk, sfd, host, dst_fd, start, length, gran,
                                 file_lock))

    async def worker() -> None:
        buf: memoryview | None = None
        while True:
            job = jobs.get_nowait() if not jobs.empty() else None
            if job is None:
                return
            start, length, sfd, host, seq = job
            await limit.take(length)
            if sfd is not None:
                runs = await file_chunk(start, length, sfd, host)
                if explicit_zeroes:
                    async with write_lock:
                        await _zero_gaps(dst, start, length, runs)
                prog.add(length)
                continue
            if buf is None:
                buf = (_aligned(CONVERT_CHUNK) if direct
                       else memoryview(bytearray(CONVERT_CHUNK)))
            view = buf[:length]
            if salvage is None:
                try:
                    await src.readv(start, [view])
                except (Qcow2Error, OSError) as err:
                    # qemu-img's words; what broke is the image's business (check).
                    raise Qcow2Error(f"error while reading at byte {start}: "
                                     "Input/output error") from err
            else:
                await _read_salvaging(src, start, view, salvage)
            if compress:
                await _write_compressed_chunk(dst, start, view, sparse=bool(sparse))
            else:
                runs = _nonzero_runs(view, gran) if gran else [(0, length)]
                if ordered:
                    async with turn:
                        await turn.wait_for(functools.partial(_is_turn, next_write, seq))
                async with write_lock:
                    for a, b in runs:
                        if qdst:
                            await _l2_ahead(dst, start + a)
                        await dst.writev(start + a, [view[a:b]])
                    if explicit_zeroes:
                        await _zero_gaps(dst, start, length, runs)
                if ordered:
                    async with turn:
                        next_write[0] += 1
                        turn.notify_all()
            prog.add(length)

    await asyncio.gather(*(worker() for _ in range(max(1, workers))))
    await dst.flush()
    prog.finish()


def _is_turn(next_write: list[int], seq: int) -> bool:
    return next_write[0] == seq


async def _l2_ahead(dst: Qcow2Image, offset: int) -> None:
    """Give ``dst`` the L2 table for ``offset`` before its first data cluster
    there, as QEMU allocates them: a converted image then has each table
    ahead of the data it maps, where data first and table after would count
    as fragmented in ``check`` and lay the file out unlike qemu-img's."""
    l1i = offset >> dst._cb >> dst._l2_bits
    if l1i < len(dst._l1) and not dst._l1[l1i]:
        async with dst._lock:
            if not dst._l1[l1i]:
                await dst._l2_for_write(l1i)


K_BACKING = -1  # an extent a top-only convert leaves to the target's backing file


async def _extents(src: Any, pos: int, n: int, top_only: bool) -> list[tuple[int, int, int, bool, bool, int, Any]]:
    """What convert copies of [pos, pos+n): the whole chain's view, or only the top image's."""
    if not top_only:
        return await chain_status(src, pos, n)
    has_backing = getattr(src, "backing", None) is not None
    out: list[tuple[int, int, int, bool, bool, int, Any]] = []
    for kind, start, length, _ in await src.block_status(pos, n):
        if kind == K_UNALLOC:
            # Unallocated over a backing file: the backing file's business;
            # with none, it reads as zeroes, which the target must be told.
            kind = K_BACKING if has_backing else K_ZERO
        out.append((start, length, 0, True, kind == K_ZERO, kind, None))
    return out


def _warn(message: str) -> None:
    print(f"appliance img: warning: {message}", file=sys.stderr)


async def _read_salvaging(src: Any, start: int, view: memoryview, warn: Callable[[str], None]) -> None:
    try:
        await src.readv(start, [view])
        return
    except (Qcow2Error, OSError):
        pass
    for off in range(0, len(view), 512):
        sector = view[off:off + 512]
        try:
            await src.readv(start + off, [sector])
        except (Qcow2Error, OSError):
            warn(f"error while reading offset {start + off}: Input/output error")
            sector[:] = bytes(len(sector))


async def _zero_gaps(dst: Any, start: int, length: int, runs: list[tuple[int, int]]) -> None:
    """Zero the parts of a chunk between its data runs (targets that are not blank)."""
    prev = 0
    for a, b in runs + [(length, length)]:
        if a > prev:
            await dst.write_zeroes(start + prev, a - prev, may_unmap=True)
        prev = b


async def _write_compressed_chunk(dst: Qcow2Image, start: int, view: memoryview,
                                  sparse: bool = True) -> None:
    """Compress whole clusters of ``view`` into ``dst``; zero ones only without ``sparse`` (-S 0)."""
    cs = dst._cs
    pos = 0
    zero = bytes(cs)
    while pos < len(view):
        off = start + pos
        head = off % cs
        n = min(cs - head, len(view) - pos)
        piece = view[pos : pos + n]
        if head or (n < cs and off + n < dst.size):
            await _l2_ahead(dst, off)
            await dst.writev(off, [piece])
        elif not sparse or not zero.startswith(piece):
            await _l2_ahead(dst, off)
            await dst.write_compressed(off, bytes(piece))
        pos += n


# ---------------------------------------------------------------- compare


async def cmd_compare(argv: list[str]) -> int:
    p = _parser("compare")
    p.add_argument("-f", dest="fmt1")
    p.add_argument("-F", dest="fmt2")
    p.add_argument("-s", dest="strict", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-T", dest="cache", default="writeback")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("file1")
    p.add_argument("file2")
    a = p.parse_args(argv)
    try:
        i1 = await _open(a.file1, a.fmt1, read_only=True, cache=a.cache, share=a.force_share)
        i2 = await _open(a.file2, a.fmt2, read_only=True, cache=a.cache, share=a.force_share)
    except Qcow2Error as err:
        print(f"appliance img: {err}", file=sys.stderr)
        return 2
    try:
        return await compare(i1, i2, strict=a.strict, quiet=a.quiet)
    except Qcow2Error as err:
        print(f"appliance img: {err}", file=sys.stderr)
        return 2
    finally:
        await i1.close()
        await i2.close()


async def compare(i1: Any, i2: Any, *, strict: bool = False, quiet: bool = False) -> int:
    def say(msg: str) -> None:
        if not quiet:
            print(msg)

    common = min(i1.size, i2.size)
    if i1.size != i2.size and strict:
        say("Strict mode: Image size mismatch!")
        return 1
    # qemu-img walks both images by block status and reports the first
    # offset where status or contents differ: contents before the first
    # status mismatch are compared first, so that is the order here too.
    status_at = await _first_status_mismatch(i1, i2) if strict else None
    limit = common if status_at is None else status_at
    b1, b2 = bytearray(CHUNK), bytearray(CHUNK)
    zero = bytes(CHUNK)
    # Stretches the block status says read as zeroes are not read: both
    # zero is equal, one zero needs only the other side's bytes.
    z1, z2 = _ZeroRuns(await _zero_runs(i1, limit)), _ZeroRuns(await _zero_runs(i2, limit))
    pos = 0
    while pos < limit:
        zero1, end1 = z1.at(pos)
        zero2, end2 = z2.at(pos)
        n = min(CHUNK, limit - pos, end1 - pos, end2 - pos)
        if zero1 and zero2:
            pos = min(limit, end1, end2)
            continue
        v1, v2 = memoryview(b1)[:n], memoryview(b2)[:n]
        if zero1:
            v1 = memoryview(zero)[:n]
            await i2.readv(pos, [v2])
        elif zero2:
            v2 = memoryview(zero)[:n]
            await i1.readv(pos, [v1])
        else:
            await asyncio.gather(i1.readv(pos, [v1]), i2.readv(pos, [v2]))
        if not v1.tobytes().startswith(v2) if zero1 or zero2 else not b1.startswith(v2):
            at = _first_diff(v1, v2)
            say(f"Content mismatch at offset {pos + at}!")
            return 1
        pos += n
    if status_at is not None:
        say(f"Strict mode: Offset {status_at} block status mismatch!")
        return 1
    if i1.size != i2.size:
        # Only once the common part is equal: the rest of the bigger image must read as zeroes.
        say("Warning: Image size mismatch!")
    bigger = i1 if i1.size > i2.size else i2
    zb = _ZeroRuns(await _zero_runs(bigger, bigger.size))
    while pos < bigger.size:
        known, end = zb.at(pos)
        if known:
            pos = end
            continue
        n = min(CHUNK, bigger.size - pos, end - pos)
        v1 = memoryview(b1)[:n]
        await bigger.readv(pos, [v1])
        if not zero.startswith(v1):
            at = _first_diff(v1, memoryview(zero)[:n])
            say(f"Content mismatch at offset {pos + at}!")
            return 1
        pos += n
    say("Images are identical.")
    return 0


async def _zero_runs(img: Any, limit: int) -> list[tuple[int, int]]:
    """Merged [start, end) stretches below ``limit`` that read as zeroes through the chain."""
    out: list[tuple[int, int]] = []
    if limit <= 0:
        return out
    for start, n, _, _, reads_zero, kind, _ in await chain_status(img, 0, limit):
        if not (reads_zero or kind == K_UNALLOC):  # unallocated through the chain: zeroes
            continue
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], start + n)
        else:
            out.append((start, start + n))
    return out


class _ZeroRuns:
    """Walks sorted zero stretches: at(pos) -> (reads zero, where that answer ends)."""

    def __init__(self, runs: list[tuple[int, int]]) -> None:
        self.runs = runs
        self.i = 0

    def at(self, pos: int) -> tuple[bool, int]:
        runs = self.runs
        while self.i < len(runs) and runs[self.i][1] <= pos:
            self.i += 1
        if self.i == len(runs):
            return False, 1 << 63
        s, e = runs[self.i]
        return (True, e) if s <= pos else (False, s)


async def _status_runs(img: Any) -> list[tuple[int, int, tuple[bool, bool, bool, bool]]]:
    """(start, end, (allocated, data, zero, has-offset)) pieces of an image,
    cut where QEMU's block-status answers end: at every L2 slice of a qcow2
    image (the driver answers for one at a time) and around each compressed
    cluster (the driver answers for those one by one)."""
    from appliance.qcow2.cli import map_rows

    cs = img._cs if isinstance(img, Qcow2Image) else 0
    span = cs * (cs // (16 if img._ext else 8)) if cs else 0
    out: list[tuple[int, int, tuple[bool, bool, bool, bool]]] = []
    for r in await map_rows(img, 0, img.size):
        st = (r["present"], r["data"], r["zero"], "offset" in r)
        step = cs if r["_compressed"] else span
        pos, end = r["start"], r["start"] + r["length"]
        while pos < end:
            nxt = min(end, (pos // step + 1) * step) if step else end
            out.append((pos, nxt, st))
            pos = nxt
    return out


async def _first_status_mismatch(i1: Any, i2: Any) -> int | None:
    """The first offset where ``compare -s`` finds the block status differs.

    As in qemu-img, the status of an answer that reaches the end of the
    image carries an end-of-file flag: two images with the same data laid
    out differently in their files differ for -s.
    """
    r1, r2 = await _status_runs(i1), await _status_runs(i2)
    i = j = 0
    pos = 0
    while i < len(r1) and j < len(r2):
        s1, e1, st1 = r1[i]
        s2, e2, st2 = r2[j]
        if (st1, e1 == i1.size) != (st2, e2 == i2.size):
            return pos
        # QEMU asks again at the end of the shorter answer.
        pos = min(e1, e2)
        if e1 == pos:
            i += 1
        else:
            r1[i] = (pos, e1, st1)
        if e2 == pos:
            j += 1
        else:
            r2[j] = (pos, e2, st2)
    return None


def _first_diff(a: memoryview, b: memoryview) -> int:
    lo, hi = 0, len(a)
    while hi - lo > 512:
        mid = (lo + (hi - lo) // 2) // 512 * 512
        if mid <= lo:
            break
        if a[lo:mid].tobytes() != b[lo:mid].tobytes():
            hi = mid
        else:
            lo = mid
    return lo


# ---------------------------------------------------------------- commit


async def cmd_commit(argv: list[str]) -> int:
    p = _parser("commit")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-t", dest="cache", default="writeback")
    p.add_argument("-b", dest="base")
    p.add_argument("-d", dest="keep", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-r", dest="rate")
    p.add_argument("filename")
    a = p.parse_args(argv)
    rate = _rate_arg(a.rate)
    # qemu-img: -b implies -d, since the images between base and top are no
    # longer valid afterwards and only the top's own data keeps it right.
    empty_top = not a.keep and not a.base
    from appliance.qcow2.cli import refuse_missing_backing, refuse_unopenable

    refuse_unopenable(a.filename)
    refuse_missing_backing(a.filename, a.fmt or "qcow2")
    from appliance.qcow2.image import probe_format

    if a.fmt is None and not empty_top and probe_format(a.filename, warn=False) == "raw":
        probe_format(a.filename)  # qemu-img opens it writable either way: the probing warning
    top = await _open(a.filename, a.fmt, read_only=not empty_top, backing=False)
    layers: list[Any] = [top]
    base: Any = None
    whole = False  # the top emptied by laying it out afresh
    try:
        if not isinstance(top, Qcow2Image) or not top.header.backing_file:
            if a.base:
                raise Qcow2Error(f"Did not find '{a.base}' in the backing chain of '{a.filename}'")
            raise Qcow2Error("Image does not have a backing file")
        bpath, bfmt = await _find_base(layers, a.base, a.filename)
        if not bpath.exists():
            raise Qcow2Error(f"Could not open '{a.filename}': Could not open backing file: "
                             f"Could not open '{bpath}': No such file or directory")
        base = await open_any(bpath, bfmt, read_only=False, cache=a.cache)
        if top.size > base.size:
            # qemu-img grows the base to the top's size first, or what the top
            # holds past the base's end would be lost.
            await _grow(base, top.size)
        for upper, lower in zip(layers, layers[1:] + [base], strict=True):
            upper.backing = lower
        prog = _Progress(a.progress and not a.quiet, top.size * len(layers))
        limit = _RateLimit(rate)
        buf = memoryview(bytearray(CHUNK))
        # Bottom layer first: what an upper layer holds lands in base last.
        for layer in reversed(layers):
            size = min(layer.size, base.size)
            for kind, start, n, _ in await layer.block_status(0, size):
                if kind == K_ZERO:
                    # QEMU's commit job writes zeroes with leave to unmap them.
                    await base.write_zeroes(start, n, may_unmap=True)
                elif kind in (K_DATA, K_COMPRESSED):
                    s = start
                    while s < start + n:
                        m = min(CHUNK, start + n - s)
                        await limit.take(m)
                        await layer.readv(s, [buf[:m]])
                        if isinstance(base, Qcow2Image):
                            await _l2_ahead(base, s)
                        await base.writev(s, [buf[:m]])
                        s += m
                prog.add(n)
        await base.flush()
        if empty_top:
            whole = _can_empty_completely(top)
            if not whole:
                await top.make_empty()
            await top.flush()
        prog.finish()
    finally:
        # Closing a layer closes what it is linked to below it.
        for layer in layers if base is None else layers[:1]:
            await layer.close()
    if empty_top and whole:
        await _iorun(_empty_completely, a.filename)
    if not a.quiet:
        print("Image committed.")
    return 0


def _can_empty_completely(img: Any) -> bool:
    """Whether QEMU would empty ``img`` by laying it out afresh (make_completely_empty):
    version 3, no snapshots, bitmaps, encryption or data file, and room for its
    first clusters in one refcount block."""
    if not isinstance(img, Qcow2Image):
        return False
    h = img.header
    cs = img._cs
    l1_clusters = -(-h.l1_size * 8 // cs)
    return (h.version >= 3 and not img.snapshots and h.ext(H.EXT_BITMAPS) is None
            and not h.crypt_method and not h.incompatible_features & H.INCOMPAT_DATA_FILE
            and 3 + l1_clusters <= cs * 8 // h.refcount_bits)


def _empty_completely(path: str) -> None:
    """Empty a closed qcow2 image as QEMU's make_completely_empty does: the
    refcount table in cluster 1, its one block in cluster 2, a zeroed L1 table
    from cluster 3, and the file cut after it. The dirty bit covers the
    rewrite: a crash half way leaves refcounts a repair rebuilds."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        first = os.pread(fd, 2 << 20, 0)
        h = H.parse_header(first, check_mode=True)
        cs = h.cluster_size
        l1_clusters = -(-h.l1_size * 8 // cs)
        n = 3 + l1_clusters
        incompat = h.incompatible_features
        os.pwrite(fd, struct.pack(">Q", incompat | H.INCOMPAT_DIRTY), 72)
        os.fsync(fd)
        os.pwrite(fd, bytes(cs * (n - 1)), cs)
        os.pwrite(fd, struct.pack(">Q", 2 * cs), cs)
        os.pwrite(fd, encode_block([1] * n + [0] * (cs * 8 // h.refcount_bits - n), h.refcount_order), 2 * cs)
        os.fsync(fd)
        os.pwrite(fd, struct.pack(">QQI", 3 * cs, cs, 1), 40)  # L1 table, refcount table, its size
        os.fsync(fd)
        os.ftruncate(fd, n * cs)
        os.fsync(fd)
        os.pwrite(fd, struct.pack(">Q", incompat & ~H.INCOMPAT_DIRTY), 72)
        os.fsync(fd)
    finally:
        os.close(fd)


async def _grow(img: Any, size: int) -> None:
    if isinstance(img, Qcow2Image):
        from appliance.qcow2.ops import resize

        await resize(img, size)
    else:
        os.ftruncate(img._fd, size)
        img.size = size


async def _find_base(layers: list[Any], base_name: str | None,
                     top_name: str) -> tuple[Path, str | None]:
    """Walk down from ``layers[0]`` to the commit target; open the layers in between.

    Appends each intermediate image (read-only, unlinked) to ``layers`` and
    returns the target's path and format. Without ``base_name`` the target is
    the top's immediate backing file.
    """
    cur = layers[0]
    while True:
        name = cur.header.backing_file if isinstance(cur, Qcow2Image) else None
        if not name:
            raise Qcow2Error(f"Did not find '{base_name}' in the backing chain of '{top_name}'")
        path = resolve_backing(cur.path, name)
        # QEMU reads a relative -b from each layer's own directory, as that
        # layer's backing file name is read (bdrv_find_backing_image), so the
        # same words may name the base at one layer and nothing at another.
        if base_name is None or (os.path.exists(path) and os.path.realpath(path) == os.path.realpath(
                resolve_backing(cur.path, base_name))):
            return path, cur.header.backing_format
        if len(layers) > 64:
            raise Qcow2Error("backing chain is too deep")
        cur = await _open(str(path), cur.header.backing_format, read_only=True, backing=False)
        layers.append(cur)


# ---------------------------------------------------------------- rebase


# Every format name qemu-img 7.2 knows ('Supported formats' in its --help):
# rebase records any of them as a backing format, as qemu-img does.
QEMU_FORMATS = frozenset(
    "blkdebug blklogwrites blkverify bochs cloop compress copy-before-write copy-on-read dmg "
    "file ftp ftps gluster host_cdrom host_device http https iscsi iser luks nbd nfs null-aio "
    "null-co nvme parallels preallocate qcow qcow2 qed quorum raw rbd replication "
    "snapshot-access ssh throttle vdi vhdx vmdk vpc vvfat".split())


def _known_format(fmt: str | None) -> None:
    if fmt is not None and fmt not in QEMU_FORMATS:
        raise Qcow2Error(f"Invalid format name: '{fmt}'")


async def cmd_rebase(argv: list[str]) -> int:
    p = _parser("rebase")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-t", dest="cache", default="writeback")
    p.add_argument("-T", dest="src_cache", default="writeback")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-u", dest="unsafe", action="store_true")
    p.add_argument("-b", dest="backing")
    p.add_argument("-F", dest="backing_fmt")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("filename")
    a = p.parse_args(argv)
    if a.backing is None and not a.unsafe:
        raise ConfigError("Must specify backing file (-b) or use unsafe mode (-u)")
    new_name = a.backing or None
    if new_name and a.backing_fmt is None:
        raise Qcow2Error(f"Could not change the backing file to '{new_name}': "
                         "backing format must be specified")
    if a.unsafe:
        img = await _open(a.filename, a.fmt or "qcow2", read_only=False, backing=False)
        try:
            _known_format(a.backing_fmt)
            await _set_backing(img, new_name, a.backing_fmt)
        finally:
            await img.close()
        return 0
    img = await _open(a.filename, a.fmt or "qcow2", read_only=False, cache=a.cache)
    new: Any = None
    try:
        _known_format(a.backing_fmt)
        if new_name:
            try:
                new = await _open(str(resolve_backing(img.path, new_name)), a.backing_fmt,
                                  read_only=True, cache=a.src_cache)
            except Qcow2Error as err:
                from appliance.qcow2.cli import once_named

                raise Qcow2Error(f"Could not open new backing file '{new_name}': "
                                 f"{once_named(err)}") from err
        fmt = a.backing_fmt or (None if new is None else
                                ("qcow2" if isinstance(new, Qcow2Image) else "raw"))
        prog = _Progress(a.progress and not a.quiet, img.size)
        old_buf = memoryview(bytearray(CHUNK))
        new_buf = memoryview(bytearray(CHUNK))
        cs = img._cs
        zero = bytes(cs)
        zeroes = img.header.version >= 3  # version 2 has no zero clusters
        # Where the old view and the new backing file both read as zeroes
        # (by their block status) nothing needs reading.
        gran = cs // 32 if img._ext else cs
        zold = _ZeroRuns(await _zero_runs(img, img.size))
        znew = _ZeroRuns(await _zero_runs(new, min(new.size, img.size)) if new is not None else [])
        for kind, start, n, _ in await img.block_status(0, img.size):
            if kind != K_UNALLOC:
                prog.add(n)
                continue
            s = start
            while s < start + n:
                zo, eo = zold.at(s)
                zn, en = znew.at(s) if new is not None and s < new.size else (True, 1 << 63)
                lim = min(eo, en)
                if zo and zn and lim // gran * gran > s:
                    s = min(start + n, lim // gran * gran)
                    continue
                # Whole clusters (subclusters) at a time, so zeroes can stay zero clusters.
                m = min(CHUNK, start + n - s, -(-lim // gran) * gran - s)
                ov, nv = old_buf[:m], new_buf[:m]
                await img.readv(s, [ov])
                if new is not None and s < new.size:
                    k = min(m, new.size - s)
                    await new.readv(s, [nv[:k]])
                    nv[k:] = bytes(m - k)
                else:
                    nv[:] = bytes(m)
                old = ov.tobytes()  # compared with memcmp (bytes.startswith), not item by item
                if not old.startswith(nv):
                    pos = 0
                    while pos < m:
                        e = min(m, (s + pos) // cs * cs + cs - s)
                        if not old[pos:e].startswith(nv[pos:e]):
                            if zeroes and zero.startswith(ov[pos:e]):
                                # As qemu-img: where the old view was zeroes a
                                # zero cluster keeps it, no data is written.
                                await zero_over_backing(img, new, s + pos, e - pos)
                            else:
                                await img.writev(s + pos, [ov[pos:e]])
                        pos = e
                s += m
            prog.add(n)
        await img.flush()
        await _set_backing(img, new_name, fmt)
        prog.finish()
    finally:
        if new is not None:
            await new.close()
        await img.close()
    return 0


async def _set_backing(img: Any, name: str | None, fmt: str | None) -> None:
    from appliance.qcow2 import header as H

    if not isinstance(img, Qcow2Image):
        raise Qcow2Error("only qcow2 images have a backing file")
    img.header.backing_file = name
    img.header.set_ext(H.EXT_BACKING_FORMAT, fmt.encode() if name and fmt else None)
    await img.set_header_field()


__all__ = ["RawImage", "cmd_commit", "cmd_compare", "cmd_convert", "cmd_rebase", "convert"]


# ---------------------------------------------------------------- dd

_SUFFIX_HELP = ("You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, "
                "terabytes, petabytes and exabytes.")


def _dd_number(key: str, text: str, low: int, high: int) -> int:
    try:
        n = parse_size_arg(text)
    except ConfigError:
        raise ConfigError(f"Invalid {key} specified. {_SUFFIX_HELP}") from None
    if not low <= n <= high:
        if key == "bs":
            raise ConfigError(f"Invalid bs specified. Must be between {low} and {high}.")
        raise ConfigError(f"Invalid {key} specified. {_SUFFIX_HELP}")
    return n


async def cmd_dd(argv: list[str]) -> int:
    """qemu-img dd: copy ``count`` blocks of ``bs`` bytes after ``skip`` of them into a new image.

    As qemu-img's, ``count`` counts from the start of the input (not from
    ``skip``), and every byte is written, zeroes too.
    """
    p = _parser("dd")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-O", dest="out_fmt", default="raw")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("operands", nargs="*")
    a = p.parse_args(argv)
    ops: dict[str, str] = {}
    for op in a.operands:
        key, sep, value = op.partition("=")
        if not sep or key not in ("bs", "count", "skip", "if", "of"):
            raise ConfigError(f"unrecognized operand {key}")
        ops[key] = value  # the last one counts, as in qemu-img
    bs = _dd_number("bs", ops["bs"], 1, 2**31 - 1) if "bs" in ops else 512
    count = _dd_number("count", ops["count"], 0, 2**63 - 1) if "count" in ops else None
    skip = _dd_number("skip", ops["skip"], 0, 2**63 - 1) if "skip" in ops else 0
    if not ops.get("if") or not ops.get("of"):
        raise ConfigError("Must specify both input and output files")
    if a.out_fmt not in ("raw", "qcow2"):
        raise ConfigError(f"Unknown file format '{a.out_fmt}'")
    try:
        src = await _open(ops["if"], a.fmt, read_only=True, share=a.force_share)
    except Qcow2Error as err:
        if str(err).startswith("Could not open"):
            raise
        raise Qcow2Error(f"Could not open '{ops['if']}': {err}") from err
    try:
        size = src.size
        if count is not None and count * bs < size:
            size = count * bs
        start = skip * bs
        out_size = max(0, size - start)
        await _create_target(ops["of"], a.out_fmt, out_size, {}, None, None)
        dst = await open_any(ops["of"], a.out_fmt, read_only=False, cache="unsafe")
        try:
            buf = memoryview(bytearray(CONVERT_CHUNK))
            pos = start
            while pos < size:
                n = min(CONVERT_CHUNK, size - pos)
                await src.readv(pos, [buf[:n]])
                if isinstance(dst, Qcow2Image):
                    await _l2_ahead(dst, pos - start)
                await dst.writev(pos - start, [buf[:n]])
                pos += n
            await dst.flush()
        finally:
            await dst.close()
    finally:
        await src.close()
    return 0
