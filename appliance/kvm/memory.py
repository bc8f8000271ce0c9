"""Guest physical memory: the only door into the guest.

Guest RAM is a set of non-overlapping regions, each backed by an mmap (anonymous
for our own VMs, a shared fd for vhost-user front ends). Every access is checked
against the region it starts in; an access that runs past a region's end or wraps
is refused with :class:`GuestMemoryError`, never clamped. Callers copy values out
once (``read``/``read_u32``…) and validate the copy; ``view`` returns a memoryview
slice for zero-copy I/O (``os.preadv`` straight into guest RAM).
"""

from __future__ import annotations

import bisect
import mmap
import struct
from collections.abc import Iterable

from appliance.errors import ApplianceError

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HUGE_PAGE = 2 << 20  # x86-64 transparent huge page (PMD) size
_DROP_MIN = 1 << 20


class GuestMemoryError(ApplianceError):
    """An access outside guest RAM (unmapped, straddling a region end, or wrapping)."""

    def __init__(self, addr: int, size: int) -> None:
        super().__init__(f"guest access of {size} bytes at {addr:#x} is outside guest memory")
        self.addr = addr
        self.size = size


class MemoryRegion:
    """One contiguous range of guest physical memory backed by a buffer.

    :param start: guest physical address of the first byte.
    :param buf: the backing buffer (an mmap, or any writable buffer in tests).
    :param user_addr: the front end's virtual address of the region (vhost-user
        translates vring addresses from it); equals ``start`` when unused.
    :param private_anonymous: a MAP_PRIVATE|MAP_ANONYMOUS mapping: zeroing may
        drop pages instead of writing them.

    (A plain class rather than a dataclass: `appliance run` would import
    dataclasses for it alone before its vCPUs start.)
    """

    def __init__(
        self,
        start: int,
        buf: mmap.mmap | bytearray,
        user_addr: int = -1,
        fd: int = -1,
        private_anonymous: bool = False,
    ) -> None:
        self.start = start
        self.buf = buf
        self.user_addr = start if user_addr < 0 else user_addr
        self.fd = fd
        self.private_anonymous = private_anonymous
        self.view = memoryview(buf)

    def __repr__(self) -> str:
        return (
            f"MemoryRegion(start={self.start:#x}, size={len(self.view):#x}, user_addr={self.user_addr:#x}, "
            f"fd={self.fd}, private_anonymous={self.private_anonymous})"
        )

    @property
    def size(self) -> int:
        return len(self.view)

    @property
    def end(self) -> int:
        return self.start + len(self.view)

    def host_address(self) -> int:
        """Address of the backing buffer in this process (for KVM memory slots)."""
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self.buf))


class GuestMemory:
    """Bounds-checked guest physical memory made of :class:`MemoryRegion` s."""

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        for r in regions:
            self.add_region(r)

    @classmethod
    def anonymous(cls, layout: Iterable[tuple[int, int]]) -> GuestMemory:
        """Allocate anonymous private mmaps for ``(start, size)`` ranges."""
        regions = []
        for start, size in layout:
            buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            # Transparent huge pages, as QEMU asks for its RAM: an O_DIRECT
            # request pins and maps 2 MiB pages instead of 4 KiB ones (a 1 MiB
            # read then fits one block request: ~330 us instead of ~600 us
            # here), and KVM can map the guest with large pages. Hosts with THP
            # "never" ignore the hint.
            if hasattr(mmap, "MADV_HUGEPAGE"):
                buf.madvise(mmap.MADV_HUGEPAGE)
            regions.append(MemoryRegion(start, buf, private_anonymous=True))
        return cls(regions)

    def add_region(self, region: MemoryRegion) -> None:
        i = bisect.bisect_right(self._starts, region.start)
        if i > 0 and self._regions[i - 1].end > region.start:
            raise ValueError("memory regions overlap")
        if i < len(self._regions) and region.end > self._regions[i].start:
            raise ValueError("memory regions overlap")
        self._regions.insert(i, region)
        self._starts.insert(i, region.start)

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    @property
    def size(self) -> int:
        """Total bytes of RAM across all regions."""
        return sum(r.size for r in self._regions)

    def close(self) -> None:
        for r in self._regions:
            r.view.release()
            if isinstance(r.buf, mmap.mmap):
                r.buf.close()
        self._regions.clear()
        self._starts.clear()

    def _locate(self, addr: int, size: int) -> tuple[MemoryRegion, int]:
        if addr < 0 or size < 0:
            raise GuestMemoryError(addr, size)
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            raise GuestMemoryError(addr, size)
        r = self._regions[i]
        off = addr - r.start
        if off + size > r.size:
            raise GuestMemoryError(addr, size)
        return r, off

    def region_at(self, addr: int) -> MemoryRegion | None:
        """The region holding byte ``addr``, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or addr >= self._regions[i].end:
            return None
        return self._regions[i]

    def check(self, addr: int, size: int) -> bool:
        """Whether ``[addr, addr+size)`` lies inside one region."""
        try:
            self._locate(addr, size)
        except GuestMemoryError:
            return False
        return True

    def view(self, addr: int, size: int) -> memoryview:
        """A zero-copy slice of guest RAM; raises :class:`GuestMemoryError` if out of range."""
        r, off = self._locate(addr, size)
        return r.view[off : off + size]

    def read(self, addr: int, size: int) -> bytes:
        r, off = self._locate(addr, size)
        return bytes(r.view[off : off + size])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        r, off = self._locate(addr, n)
        r.view[off : off + n] = data

    def fill(self, addr: int, size: int, byte: int = 0) -> None:
        r, off = self._locate(addr, size)
        if byte == 0 and r.private_anonymous and size >= _DROP_MIN and isinstance(r.buf, mmap.mmap):
            # Dropped pages of a private anonymous mapping read back as zeros
            # (madvise(2), MADV_DONTNEED): zeroing a kernel's .bss this way
            # neither writes nor makes resident megabytes of guest RAM. Only
            # whole 2 MiB units are dropped: dropping part of a transparent
            # huge page splits it, and the test guest's boot paid ~4 ms here
            # for that (and for the fault of the huge page its .bss ends in).
            first = -(-off // _HUGE_PAGE) * _HUGE_PAGE
            last = (off + size) // _HUGE_PAGE * _HUGE_PAGE
            if first < last:
                r.view[off:first] = bytes(first - off)
                r.view[last : off + size] = bytes(off + size - last)
                r.buf.madvise(mmap.MADV_DONTNEED, first, last - first)
                return
        r.view[off : off + size] = bytes([byte]) * size

    def read_u16(self, addr: int) -> int:
        r, off = self._locate(addr, 2)
        return int(_U16.unpack_from(r.view, off)[0])

    def read_u32(self, addr: int) -> int:
        r, off = self._locate(addr, 4)
        return int(_U32.unpack_from(r.view, off)[0])

    def read_u64(self, addr: int) -> int:
        r, off = self._locate(addr, 8)
        return int(_U64.unpack_from(r.view, off)[0])

    def write_u16(self, addr: int, value: int) -> None:
        r, off = self._locate(addr, 2)
        _U16.pack_into(r.view, off, value & 0xFFFF)

    def write_u32(self, addr: int, value: int) -> None:
        r, off = self._locate(addr, 4)
        _U32.pack_into(r.view, off, value & 0xFFFFFFFF)

    def write_u64(self, addr: int, value: int) -> None:
        r, off = self._locate(addr, 8)
        _U64.pack_into(r.view, off, value & 0xFFFFFFFFFFFFFFFF)

    def unpack_from(self, fmt: struct.Struct, addr: int) -> tuple[int, ...]:
        """Copy a fixed-layout structure out of guest RAM."""
        r, off = self._locate(addr, fmt.size)
        return fmt.unpack_from(r.view, off)

    def translate_user(self, user_addr: int, size: int) -> int:
        """Map a front end's virtual address (vhost-user) to a guest physical address."""
        for r in self._regions:
            if r.user_addr <= user_addr and user_addr + size <= r.user_addr + r.size:
                return r.start + (user_addr - r.user_addr)
        raise GuestMemoryError(user_addr, size)
