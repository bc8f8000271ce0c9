"""Address buses for port I/O and MMIO exits.

vCPU threads call :meth:`Bus.read`/:meth:`Bus.write` for every PIO or MMIO exit.
Dispatch is a bisect over sorted, non-overlapping ranges. Devices are called on
the vCPU thread: they must be quick and thread-safe, and hand anything slow to
the loop with ``call_soon_threadsafe``. An access nobody claims reads as all
ones and writes are dropped, as on real hardware.
"""

from __future__ import annotations

import bisect
import threading

from appliance.log import get_logger

log = get_logger(__name__)


TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see appliance.bootpath)
if TYPE_CHECKING:
    from typing import Protocol

    class BusDevice(Protocol):
        """A device on a bus; ``offset`` is relative to the range it registered."""

        def read(self, offset: int, size: int) -> bytes: ...

        def write(self, offset: int, data: bytes) -> None: ...


class BusError(ValueError):
    """A registration that overlaps an existing range."""


class Bus:
    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, BusDevice]] = []
        self._lock = threading.Lock()
        self.unclaimed = 0

    def register(self, base: int, size: int, device: BusDevice) -> None:
        if size <= 0:
            raise BusError(f"{self.name}: empty range at {base:#x}")
        with self._lock:
            i = bisect.bisect_right(self._starts, base)
            if i > 0 and self._entries[i - 1][1] > base:
                raise BusError(f"{self.name}: {base:#x}+{size:#x} overlaps a registered range")
            if i < len(self._entries) and base + size > self._entries[i][0]:
                raise BusError(f"{self.name}: {base:#x}+{size:#x} overlaps a registered range")
            self._starts.insert(i, base)
            self._entries.insert(i, (base, base + size, device))

    def unregister(self, base: int) -> None:
        with self._lock:
            i = bisect.bisect_left(self._starts, base)
            if i < len(self._starts) and self._starts[i] == base:
                del self._starts[i]
                del self._entries[i]

    def _find(self, addr: int, size: int) -> tuple[int, BusDevice] | None:
        # Lock-free read of the lists is safe: register/unregister replace
        # entries under the lock and CPython list ops are atomic.
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        try:
            start, end, dev = self._entries[i]
        except IndexError:
            return None
        if addr + size > end:
            return None
        return addr - start, dev

    def read(self, addr: int, size: int) -> bytes:
        hit = self._find(addr, size)
        if hit is None:
            self.unclaimed += 1
            return b"\xff" * size
        return hit[1].read(hit[0], size)

    def write(self, addr: int, data: bytes) -> None:
        hit = self._find(addr, len(data))
        if hit is None:
            self.unclaimed += 1
            return
        hit[1].write(hit[0], data)
