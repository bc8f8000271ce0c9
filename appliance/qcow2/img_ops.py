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
    count_arg,
    cvtnum,
    parse_o,
    parse_o_all,
    print_create_options,
    wants_help,
)
from appliance.qcow2.errors import ErrorKind, Qcow2Error
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
from appliance.qemu_numbers import INT_MAX

CHUNK = 2 * 1024 * 1024
# convert's unit of work (a read, a zero scan, a write): 8 MiB rather than 2
# took a 2 GiB convert from ~0.3 to ~0.2 s of user CPU (a quarter of the pool
# round trips and engine calls) and was faster in wall time both ways.
CONVERT_CHUNK = 8 * 1024 * 1024


def _aligned(n: int) -> memoryview:
    return memoryview(mmap.mmap(-1, max(4096, (n + 4095) & ~4095)))[:n]


def _f32(x: float) -> float:
    """``x`` as a C float holds it: qemu-img keeps its progress in one."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


class _Progress:
    """qemu-img's -p (QEMU util/qemu-progress.c): ``    (P/100%)\r`` with P
    to two decimals, printed at 0 and at 100 and whenever it passed the last
    printed figure by more than ``min_skip`` points; a newline at the end.

    The figure is kept in a C float as QEMU keeps it, so sums of many steps
    come out in the same digits. Unless ``start`` is off, the 0 is printed
    at once: the commands print it before any work.
    """

    def __init__(self, enabled: bool, total: int, *, min_skip: float = 1.0,
                 start: bool = True) -> None:
        self.enabled = enabled
        self.total = max(1, total)
        self.done = 0
        self.min_skip = _f32(min_skip)
        self.current = 0.0
        self.last = 0.0
        self.touched = False  # set() was called: a figure is (or, disabled, would be) shown
        if start:
            self.set(0.0)

    def advance(self, n: int) -> None:
        """``n`` more bytes of ``total`` done (convert's reckoning: the share done so far)."""
        self.done += n
        self.set(100.0 * self.done / self.total)

    def add(self, n: int) -> None:
        """``n`` more bytes of ``total`` done, as a step (compare's reckoning)."""
        self.step(_f32(_f32(_f32(n) / _f32(self.total)) * 100))

    def step(self, delta: float) -> None:
        """``delta`` more points: qemu_progress_print(delta, 100)."""
        self.set(_f32(self.current + _f32(_f32(_f32(delta) / 100) * 100)))

    def set(self, pct: float) -> None:
        """The figure is now ``pct``: qemu_progress_print(pct, 0)."""
        self.touched = True
        if not self.enabled:
            return
        cur = self.current = min(100.0, _f32(pct))
        if cur > _f32(self.last + self.min_skip) or cur in (0.0, 100.0):
            self.last = cur
            sys.stdout.write(f"    ({cur:3.2f}/100%)\r")
            sys.stdout.flush()

    def finish(self) -> None:
        """The end of a command that completed: 100 once more, then the newline."""
        self.set(100.0)
        self.end()

    def end(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()


def _rate_arg(text: str | None) -> int:
    """-r of convert and commit: bytes a second, 0 (or none given) for no limit."""
    return 0 if text is None else cvtnum("rate limit", text)


MAX_SPARSE = 16 << 20  # qemu-img's MAX_BUF_SECTORS, in bytes


def _sparse_arg(text: str) -> int:
    """convert -S: whole sectors up to qemu-img's largest buffer, 0 for no sparse detection."""
    n = cvtnum("buffer size for sparse output", text)
    if n % 512 or n > MAX_SPARSE:
        raise ConfigError("Invalid buffer size for sparse output specified. Valid sizes are "
                          f"multiples of 512 up to {MAX_SPARSE}. Select 0 to disable sparse "
                          "detection (fully allocates output).")
    return n


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
    p = _parser("convert")
    p.add_argument("--target-image-opts", dest="target_opts", action="store_true")
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
    p.add_argument("-m", dest="coroutines", default="8")
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
    # The values qemu-img checks as it reads its options, before anything else.
    coroutines = count_arg(a.coroutines, 16, "Invalid number of coroutines. Allowed number of "
                           "coroutines is between 1 and 16", low=1)
    sparse = _sparse_arg(a.sparse) if a.sparse is not None else 4096
    rate = _rate_arg(a.rate)
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
    if len(a.files) < 2:
        raise ConfigError("Must specify image file name")
    # qemu-img starts its progress here: a failure from now on still ends the line.
    prog = _Progress(a.progress and not a.quiet, 1)
    try:
        await _convert_files(a, argv, a.target_opts, prog, sparse=sparse, rate=rate,
                             coroutines=coroutines)
        prog.set(100.0)
    finally:
        prog.end()
    return 0


async def _convert_files(a: Any, argv: list[str], target_opts: bool, prog: _Progress, *,
                         sparse: int, rate: int, coroutines: int) -> None:
    """convert's work once its command line is read: open, create, copy."""
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

            _target_options(a.out_fmt, o)
            # As qemu-img: a target another process uses is refused before it is touched.
            try:
                refuse_if_in_use(dst_name)
            except Qcow2Error as err:
                raise Qcow2Error(str(err).replace(f"{dst_name}: ", f"{dst_name}: error while "
                                                  f"converting {a.out_fmt}: ", 1)) from None
            try:
                await _create_target(dst_name, a.out_fmt, src.size, o, a.backing, a.backing_fmt)
            except Qcow2Error as err:
                # Whatever the format's creation refuses, in qemu-img's words for convert.
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
                          progress=prog, workers=coroutines,
                          file_copy=not a.force_share and not a.salvage, rate=rate,
                          salvage=None if not a.salvage else (lambda m: None) if a.quiet else _warn,
                          top_only=a.backing is not None, in_order=not a.out_of_order)
            if a.bitmaps:
                await _copy_bitmaps(parts[0], dst, a.skip_broken_bitmaps)
        finally:
            await dst.close()
    finally:
        await src.close()


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


def _target_options(fmt: str, o: dict[str, str]) -> None:
    """The target's -o as QEMU's option parser takes them, before anything is
    created (qemu-img's words, no file name); each format's own checks of
    the values come when it is created."""
    from appliance.qcow2.cli import _create_options, raw_create_options

    if fmt == "raw":
        raw_create_options(o)
    else:
        _create_options(dict(o), 0)


async def _create_target(name: str, fmt: str, size: int, o: dict[str, str],
                         backing: str | None, backing_fmt: str | None) -> None:
    _target_options(fmt, o)
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
                  explicit_zeroes: bool = False, progress: _Progress | None = None,
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
    prog = progress or _Progress(False, size)
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
    to_copy = 0
    compress_end = 0
    pos = 0
    while pos < size:
        n = min(CONVERT_CHUNK * 4, size - pos)
        for start, length, _, _, _, kind, where in await _extents(src, pos, n, top_only):
            if kind == K_BACKING:
                continue  # left to the target's own backing file
            # -S 0 means no sparse output at all: zeroes are written as data too.
            if kind in (K_UNALLOC, K_ZERO) and sparse:
                if explicit_zeroes:
                    await dst.write_zeroes(start, length, may_unmap=True)
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
                to_copy += e - s
                s = e
        pos += n
    # As qemu-img's, the progress counts the bytes to copy, each chunk as it starts.
    prog.total = max(1, to_copy)
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
            for piece in range(0, length, CHUNK):  # qemu-img's 2 MiB reads, each counted as it starts
                prog.advance(min(CHUNK, length - piece))
            if sfd is not None:
                runs = await file_chunk(start, length, sfd, host)
                if explicit_zeroes:
                    async with write_lock:
                        await _zero_gaps(dst, start, length, runs)
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

    await asyncio.gather(*(worker() for _ in range(max(1, workers))))
    await dst.flush()


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


class CompareError(Qcow2Error):
    """compare could not finish; ``status`` is qemu-img's exit code for it
    (3: a block status failed, 4: a read failed)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, kind=ErrorKind.IO)
        self.status = status


async def cmd_compare(argv: list[str]) -> int:
    """qemu-img compare. Exit codes as qemu-img documents them: 0 the same,
    1 different, 2 an image would not open, 3 a block status failed, 4 a read
    failed (a refused command line stays the project's 2)."""
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
    # qemu-img starts its progress before it opens anything (min_skip 2).
    prog = _Progress(a.progress and not a.quiet, 1, min_skip=2.0, start=False)
    try:
        try:
            i1 = await _open(a.file1, a.fmt1, read_only=True, cache=a.cache, share=a.force_share)
        except Qcow2Error as err:
            print(f"appliance img: {err}", file=sys.stderr)
            return 2
        try:
            i2 = await _open(a.file2, a.fmt2, read_only=True, cache=a.cache, share=a.force_share)
        except Qcow2Error as err:
            await i1.close()
            print(f"appliance img: {err}", file=sys.stderr)
            return 2
        try:
            return await compare(i1, i2, strict=a.strict, quiet=a.quiet,
                                 names=(a.file1, a.file2), progress=prog)
        except CompareError as err:
            print(f"appliance img: {err}", file=sys.stderr)
            return err.status
        finally:
            await i1.close()
            await i2.close()
    finally:
        prog.end()


async def compare(i1: Any, i2: Any, *, strict: bool = False, quiet: bool = False,
                  names: tuple[str, str] = ("image 1", "image 2"),
                  progress: _Progress | None = None) -> int:
    """0 when ``i1`` and ``i2`` read the same (what the bigger one holds past the
    other's end reading as zeroes), 1 when not, saying where as qemu-img does.

    :raises CompareError: when a block status or a read of either fails.
    """
    def say(msg: str) -> None:
        if not quiet:
            print(msg)

    prog = progress or _Progress(False, 1)
    prog.total = max(i1.size, i2.size, 1)
    prog.set(0.0)
    common = min(i1.size, i2.size)
    if i1.size != i2.size and strict:
        say("Strict mode: Image size mismatch!")
        return 1
    # qemu-img walks both images by block status and reports the first
    # offset where status or contents differ: contents before the first
    # status mismatch are compared first, so that is the order here too.
    status_at = await _first_status_mismatch(i1, i2, names) if strict else None
    limit = common if status_at is None else status_at
    b1, b2 = bytearray(CHUNK), bytearray(CHUNK)
    zero = bytes(CHUNK)
    # Stretches the block status says read as zeroes are not read: both
    # zero is equal, one zero needs only the other side's bytes.
    z1 = _ZeroRuns(await _checked_zero_runs(i1, limit, names[0]))
    z2 = _ZeroRuns(await _checked_zero_runs(i2, limit, names[1]))
    reader = _CompareReader((i1, i2), names)
    pos = 0
    while pos < limit:
        zero1, end1 = z1.at(pos)
        zero2, end2 = z2.at(pos)
        n = min(CHUNK, limit - pos, end1 - pos, end2 - pos)
        if zero1 and zero2:
            nxt = min(limit, end1, end2)
            prog.add(nxt - pos)
            pos = nxt
            continue
        v1, v2 = memoryview(b1)[:n], memoryview(b2)[:n]
        if zero1:
            v1 = memoryview(zero)[:n]
            n = await reader.read((1,), pos, [v2])
        elif zero2:
            v2 = memoryview(zero)[:n]
            n = await reader.read((0,), pos, [v1])
        else:
            n = await reader.read((0, 1), pos, [v1, v2])
        v1, v2 = v1[:n], v2[:n]
        if not v1.tobytes().startswith(v2) if zero1 or zero2 else not b1[:n].startswith(v2):
            at = _first_diff(v1, v2)
            say(f"Content mismatch at offset {pos + at}!")
            return 1
        pos += n
        prog.add(n)
    if status_at is not None:
        say(f"Strict mode: Offset {status_at} block status mismatch!")
        return 1
    if i1.size != i2.size:
        # Only once the common part is equal: the rest of the bigger image must read as zeroes.
        say("Warning: Image size mismatch!")
    side = 0 if i1.size > i2.size else 1
    bigger = (i1, i2)[side]
    zb = _ZeroRuns(await _checked_zero_runs(bigger, bigger.size, names[side]))
    while pos < bigger.size:
        known, end = zb.at(pos)
        if known:
            prog.add(end - pos)
            pos = end
            continue
        n = min(CHUNK, bigger.size - pos, end - pos)
        v1 = memoryview(b1)[:n]
        n = await reader.read((side,), pos, [v1])
        v1 = v1[:n]
        if not zero.startswith(v1):
            at = _first_diff(v1, memoryview(zero)[:n])
            say(f"Content mismatch at offset {pos + at}!")
            return 1
        pos += n
        prog.add(n)
    say("Images are identical.")
    return 0


async def _checked_zero_runs(img: Any, limit: int, name: str) -> list[tuple[int, int]]:
    """:func:`_zero_runs`, a failure of the block status in qemu-img's words."""
    try:
        return await _zero_runs(img, limit)
    except (Qcow2Error, OSError) as err:
        raise CompareError(f"Sector allocation test failed for {name}", 3) from err


class _CompareReader:
    """compare's reads; one that fails is named as qemu-img names it: the start
    of the piece qemu-img would have been reading (its pieces end where a
    block status answer of either image ends, and are 2 MiB at most)."""

    def __init__(self, imgs: tuple[Any, Any], names: tuple[str, str]) -> None:
        self.imgs = imgs
        self.names = names
        self._cuts: list[int] | None = None

    async def read(self, sides: tuple[int, ...], pos: int, views: list[memoryview]) -> int:
        """Fill ``views`` (one for each image in ``sides``) from ``pos``; how
        many bytes were read: all, or those before the piece qemu-img would
        fail on, so that a mismatch before it is still reported first.

        :raises CompareError: when the piece that fails starts at ``pos``.
        """
        results = await asyncio.gather(
            *(self.imgs[i].readv(pos, [v]) for i, v in zip(sides, views, strict=True)),
            return_exceptions=True)
        failed = [(i, r) for i, r in zip(sides, results, strict=True) if isinstance(r, BaseException)]
        if not failed:
            return len(views[0])
        for _, r in failed:
            if not isinstance(r, (Qcow2Error, OSError)):
                raise r
        where = []
        for i, r in failed:
            at = await self._first_bad(self.imgs[i], pos, len(views[sides.index(i)]))
            where.append((await self._piece_start(at), i, r))
        start, i, err = min(where, key=lambda w: (w[0], w[1]))
        if start > pos:
            # Everything before that piece reads: take it again, whole.
            for side, v in zip(sides, views, strict=True):
                await self.imgs[side].readv(pos, [v[:start - pos]])
            return start - pos
        why = err.strerror if isinstance(err, OSError) and err.strerror else "Input/output error"
        raise CompareError(f"Error while reading offset {start} of {self.names[i]}: {why}", 4) from err

    async def _first_bad(self, img: Any, pos: int, n: int) -> int:
        """Where in [pos, pos+n) the first piece that will not read starts."""
        step = getattr(img, "_cs", 65536)
        buf = memoryview(bytearray(step))
        at = pos // step * step
        while at < pos + n:
            first = max(at, pos)
            try:
                await img.readv(first, [buf[:min(at + step, pos + n) - first]])
            except (Qcow2Error, OSError):
                return first
            at += step
        return pos

    async def _piece_start(self, at: int) -> int:
        if self._cuts is None:
            cuts = {0}
            for img in self.imgs:
                try:
                    cuts.update(e for _, e, _ in await _status_runs(img))
                except (Qcow2Error, OSError):
                    pass  # then the cuts of the other image, or none
            self._cuts = sorted(cuts)
        base = max(c for c in self._cuts if c <= at)
        return base + (at - base) // CHUNK * CHUNK


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


async def _first_status_mismatch(i1: Any, i2: Any, names: tuple[str, str]) -> int | None:
    """The first offset where ``compare -s`` finds the block status differs.

    As in qemu-img, the status of an answer that reaches the end of the
    image carries an end-of-file flag: two images with the same data laid
    out differently in their files differ for -s.
    """
    runs = []
    for img, name in zip((i1, i2), names, strict=True):
        try:
            runs.append(await _status_runs(img))
        except (Qcow2Error, OSError) as err:
            raise CompareError(f"Sector allocation test failed for {name}", 3) from err
    r1, r2 = runs
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
        if not a.unsafe:
            # A safe rebase opens the new backing file (named relative to the image) first.
            target = os.path.join(os.path.dirname(a.filename), new_name)
            try:
                os.close(os.open(target, os.O_RDONLY))
            except OSError as err:
                raise Qcow2Error(f"Could not open new backing file '{new_name}': "
                                 f"Could not open '{target}': {err.strerror}") from None
        raise Qcow2Error(f"Could not change the backing file to '{new_name}': "
                         "backing format must be specified")
    # qemu-img starts its progress here: a failure from now on still ends the line.
    prog = _Progress(a.progress and not a.quiet, 1, min_skip=2.0)
    try:
        if a.unsafe:
            img = await _open(a.filename, a.fmt or "qcow2", read_only=False, backing=False)
            try:
                _known_format(a.backing_fmt)
                await _set_backing(img, new_name, a.backing_fmt)
            finally:
                await img.close()
        else:
            await _rebase_safely(a, new_name, prog)
        prog.set(100.0)
    finally:
        prog.end()
    return 0


async def _rebase_safely(a: Any, new_name: str | None, prog: _Progress) -> None:
    """Rebase with a copy into the image of whatever reads differently through the new backing file."""
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
        # qemu-img's progress: one step for each 2 MiB piece it looks at.
        sectors = img.size // 512
        piece = _f32(100 / _f32(sectors // min(sectors, CHUNK // 512))) if sectors else 0.0
        old_size = getattr(img.backing, "size", 0)
        cuts = (old_size, new.size if new is not None else 0)
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
            for _ in range(_pieces(start, n, cuts)):
                prog.step(piece)
        await img.flush()
        await _set_backing(img, new_name, fmt)
    finally:
        if new is not None:
            await new.close()
        await img.close()


def _pieces(start: int, n: int, cuts: tuple[int, ...]) -> int:
    """How many reads qemu-img's rebase makes of an unallocated stretch: 2 MiB
    at most, each cut short at the end of either backing file."""
    count, pos, end = 0, start, start + n
    while pos < end:
        m = min(CHUNK, end - pos)
        for c in cuts:
            if pos < c < pos + m:
                m = c - pos
        pos += m
        count += 1
    return count


async def _set_backing(img: Any, name: str | None, fmt: str | None) -> None:
    from appliance.qcow2 import header as H

    if not isinstance(img, Qcow2Image):
        raise Qcow2Error("only qcow2 images have a backing file")
    img.header.backing_file = name
    img.header.set_ext(H.EXT_BACKING_FORMAT, fmt.encode() if name and fmt else None)
    await img.set_header_field()


__all__ = ["RawImage", "cmd_commit", "cmd_compare", "cmd_convert", "cmd_rebase", "convert"]


# ---------------------------------------------------------------- dd


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
    bs = cvtnum("bs", ops["bs"], 1, INT_MAX) if "bs" in ops else 512
    count = cvtnum("count", ops["count"]) if "count" in ops else None
    skip = cvtnum("skip", ops["skip"]) if "skip" in ops else 0
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
