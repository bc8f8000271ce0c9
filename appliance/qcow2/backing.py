"""Backing chains and the small raw reader/writer used inside them.

Relative backing names are resolved against the directory of the overlay's
path as given (not its real path), as QEMU does; every layer's real path is
remembered so a chain that comes back to itself is refused instead of looping.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.qcow2.errors import ErrorKind, Qcow2Error
from appliance.qcow2.image import _preadv_full, _pwritev_full, probe_format
from appliance.qcow2.iopool import run as _iorun
from appliance.storage.formats import foreign_format_of, unsupported_message

MAX_CHAIN_DEPTH = 64


class RawImage:
    """A raw file as a BlockBackend (used for raw backing files, raw convert targets)."""

    logical_block_size = 512
    supports_discard = True

    def __init__(self, path: Path, fd: int, read_only: bool, direct_fd: int) -> None:
        self.path = path
        self._fd = fd
        self._dfd = direct_fd
        self.read_only = read_only
        st = os.fstat(fd)
        self._regular = stat.S_ISREG(st.st_mode)
        # A block device's size is where it ends; st_size is 0 for it. QEMU
        # counts a file in whole sectors: the end of the last one reads as zeroes.
        self.size = -(-st.st_size // 512) * 512 if self._regular else os.lseek(fd, 0, os.SEEK_END)
        self.backing = None
        self.snapshots: list[Any] = []
        self._unsafe = False

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, read_only: bool,
                   cache: str = "writeback") -> RawImage:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
            dfd = os.open(path, flags | os.O_DIRECT) if cache in ("none", "directsync") else fd
        except OSError as err:
            raise Qcow2Error(f"could not open '{path}': {err.strerror}", kind=ErrorKind.IO) from err
        img = cls(Path(path), fd, read_only, dfd)
        img._unsafe = cache == "unsafe"
        return img

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        total = sum(len(b) for b in bufs)
        n = max(0, min(total, self.size - offset))
        asyncio.get_running_loop()
        await _iorun(_preadv_full, self._dfd, list(bufs), offset)
        return n

    async def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        if self.read_only:
            raise Qcow2Error("image is read-only", kind=ErrorKind.READ_ONLY)
        total = sum(len(b) for b in bufs)
        if offset + total > self.size:
            raise Qcow2Error("write past the end of the disk", kind=ErrorKind.RANGE)
        asyncio.get_running_loop()
        await _iorun(_pwritev_full, self._dfd, list(bufs), offset)
        return total

    async def flush(self) -> None:
        if not self.read_only and not self._unsafe:
            await _iorun(os.fdatasync, self._fd)

    async def discard(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length, may_unmap=True)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        if self.read_only:
            raise Qcow2Error("image is read-only", kind=ErrorKind.READ_ONLY)
        try:
            _punch(self._fd, offset, length)
        except OSError:
            pos = offset
            zero = bytes(1 << 20)
            while pos < offset + length:
                n = min(len(zero), offset + length - pos)
                os.pwrite(self._fd, zero[:n], pos)
                pos += n

    async def close(self) -> None:
        if self._dfd != self._fd:
            os.close(self._dfd)
        os.close(self._fd)
        self._fd = self._dfd = -1

    async def block_status(self, offset: int, length: int) -> list[list[int]]:
        from appliance.qcow2.image import K_DATA, K_ZERO

        if not self._regular:
            return [[K_DATA, offset, length, offset]]  # a device keeps no holes we could ask about
        out: list[list[int]] = []
        pos, end = offset, offset + length
        while pos < end:
            try:
                d = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError:
                d = end
            d = min(d, end)
            if d > pos:
                out.append([K_ZERO, pos, d - pos, pos])  # a raw file maps 1:1, holes too
                pos = d
                if pos >= end:
                    break
            try:
                h = os.lseek(self._fd, pos, os.SEEK_HOLE)
            except OSError:
                h = end
            h = min(h, end)
            out.append([K_DATA, pos, h - pos, pos])
            pos = h
        return out


def _punch(fd: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
    r = libc.fallocate(ctypes.c_int(fd), ctypes.c_int(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE),
                       ctypes.c_long(offset), ctypes.c_long(length))
    if r != 0:
        raise OSError(ctypes.get_errno(), "fallocate")


def json_target(name: str) -> tuple[str, str | None] | None:
    """(file name, driver) of a ``json:{...}`` pseudo-filename (QEMU's options
    as JSON, nested or with dotted keys), or None for a plain name or one
    naming no file.

    :raises Qcow2Error: When the JSON does not parse.
    """
    if not name.startswith("json:"):
        return None
    import json

    try:
        tree = json.loads(name[5:])
    except ValueError as err:
        raise Qcow2Error(f"Could not open '{name}': Could not parse the JSON options: {err}") from None
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node

    walk("", tree)
    path = flat.get("file.filename", flat.get("filename"))
    if not isinstance(path, str):
        return None
    driver = flat.get("driver")
    return path, (str(driver) if driver is not None else None)


def resolve_backing(overlay: Path, name: str) -> Path:
    target = json_target(name)
    if target is not None:
        return Path(target[0])  # QEMU opens a JSON filename's file as given, not next to the overlay
    if os.path.isabs(name) or ":" in name.split("/")[0] and name.startswith("file:"):
        return Path(name.removeprefix("file:"))
    return Path(os.path.join(os.path.dirname(str(overlay)), name))


async def open_backing_file(overlay: Path, name: str, fmt: str | None, *, cache: str,
                            chain: tuple[str, ...]) -> Any:
    path = resolve_backing(overlay, name)
    if not path.exists():
        raise Qcow2Error(f"Could not open '{overlay}': Could not open backing file: "
                         f"Could not open '{path}': No such file or directory", kind=ErrorKind.IO)
    real = os.path.realpath(path)
    if real in chain:
        raise Qcow2Error(f"backing chain loop: '{path}' is its own backing file")
    if len(chain) >= MAX_CHAIN_DEPTH:
        raise Qcow2Error(f"backing chain is deeper than {MAX_CHAIN_DEPTH} images")
    try:
        return await open_any(path, fmt, read_only=True, cache=cache, chain=chain)
    except Qcow2Error as err:
        # A file missing further down is named under each image above it, as
        # QEMU nests its messages: 'Could not open backing file: ' a level.
        lead = f"Could not open '{path}': Could not open backing file: "
        if not str(err).startswith(lead):
            raise
        raise Qcow2Error(f"Could not open '{overlay}': Could not open backing file: "
                         f"Could not open backing file: {str(err)[len(lead):]}", kind=err.kind) from err


async def open_any(path: str | os.PathLike[str], fmt: str | None, *, read_only: bool,
                   cache: str = "writeback", chain: tuple[str, ...] = (),
                   backing_override: Any = None, **kw: Any) -> Any:
    if fmt is None:
        foreign = foreign_format_of(path)
        if foreign is not None:
            raise Qcow2Error(unsupported_message(path, foreign))
        fmt = probe_format(path, warn=not read_only)
    if fmt == "raw":
        return await RawImage.open(path, read_only=read_only, cache=cache)
    if fmt == "qcow2":
        from appliance.qcow2.image import Qcow2Image

        return await Qcow2Image.open(path, read_only=read_only, cache=cache,
                                     backing_override=backing_override, _chain=chain, **kw)
    raise Qcow2Error(f"Could not open '{os.fspath(path)}': Unknown driver '{fmt}'")


async def zero_over_backing(img: Any, backing: Any, offset: int, length: int) -> None:
    """Zero a range of qcow2 ``img`` so it reads zeroes over ``backing`` too.

    The engine leaves an unallocated cluster of an image with no backing file
    as it is (it reads as zeroes already); with ``backing`` about to show
    through (a safe rebase onto it, a grown overlay over a longer one), the
    range must hold zero clusters, and a partial cluster copies the rest from
    ``backing``. ``img``'s own backing file, when it has one open, is used.
    """
    saved = img.backing
    if saved is None:
        img.backing = backing
    try:
        await img.write_zeroes(offset, length)
    finally:
        img.backing = saved
