"""Every BlockBackend the storage tests run against, by name.

To put another backend through the same device tests, add a factory to
:data:`BACKENDS`: ``async def make(tmp_path, size, *, read_only) -> BlockBackend``
returning a backend of ``size`` zeroed bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from appliance.storage.backend import BlockBackend
from appliance.storage.errors import ReadOnlyError, StorageError
from appliance.storage.raw import RawBackend


class MemoryBackend:
    """A disk in a bytearray: the in-memory fake of STYLE.md example 5."""

    def __init__(self, size: int, *, read_only: bool = False, discard: bool = True) -> None:
        self.data = bytearray(size)
        self.size = size
        self.read_only = read_only
        self.logical_block_size = 512
        self.supports_discard = discard
        self.flushes = 0
        self.fail_next: Exception | None = None

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            raise err

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        self._maybe_fail()
        pos = offset
        for b in bufs:
            chunk = self.data[pos : pos + len(b)]
            b[: len(chunk)] = chunk
            pos += len(chunk)
        return pos - offset

    async def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        self._maybe_fail()
        if self.read_only:
            raise ReadOnlyError("read-only")
        pos = offset
        for b in bufs:
            if pos + len(b) > self.size:
                raise StorageError("write past the end")
            self.data[pos : pos + len(b)] = b
            pos += len(b)
        return pos - offset

    async def flush(self) -> None:
        self._maybe_fail()
        self.flushes += 1

    async def discard(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        if self.read_only:
            raise ReadOnlyError("read-only")
        self.data[offset : offset + length] = bytes(length)

    async def close(self) -> None:
        pass


Factory = Callable[..., Awaitable[BlockBackend]]


async def make_memory(tmp_path: Path, size: int, *, read_only: bool = False) -> BlockBackend:
    return MemoryBackend(size, read_only=read_only)


async def make_raw(tmp_path: Path, size: int, *, read_only: bool = False) -> BlockBackend:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    return RawBackend(path, read_only=read_only, discard="unmap")


async def make_raw_direct(tmp_path: Path, size: int, *, read_only: bool = False) -> BlockBackend:
    path = tmp_path / "disk-direct.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    return RawBackend(path, read_only=read_only, cache="none", discard="unmap")


async def make_raw_native(tmp_path: Path, size: int, *, read_only: bool = False) -> BlockBackend:
    path = tmp_path / "disk-native.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    return RawBackend(path, read_only=read_only, cache="none", aio="native", discard="unmap")


BACKENDS: dict[str, Factory] = {
    "memory": make_memory,
    "raw": make_raw,
    "raw-cache-none": make_raw_direct,
    "raw-aio-native": make_raw_native,
}


async def read_back(backend: BlockBackend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await backend.readv(offset, [memoryview(buf)])
    return bytes(buf)
