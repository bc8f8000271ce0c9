"""MSI-X: the capability, the vector table and the pending-bit array (PCI 3.0 §6.8.2).

Each vector the guest unmasks gets a KVM GSI routed to its (address, data) and
an irqfd, so :meth:`Msix.notify` is one ``eventfd_write`` on the loop with no
exit and no ioctl. A notification for a masked vector (per-vector mask or the
function mask) sets its pending bit instead, and is delivered when the vector
is unmasked. Table writes come from vCPU threads and notifications from the
loop: state changes happen under a lock, and the hot path reads a per-vector
"live fd" that is -1 unless the vector can be delivered right now.
"""

from __future__ import annotations

import logging
import os
import struct
import threading

from appliance.pci.config import CAP_ID_MSIX, ConfigSpace
from appliance.pci.irq import MsiPlatform

log = logging.getLogger(__name__)

ENTRY_SIZE = 16
CONTROL_FUNCTION_MASK = 1 << 14
CONTROL_ENABLE = 1 << 15
MAX_VECTORS = 2048
VECTOR_MASKED = 1
# Of each 16-byte table entry only these bits are writable: the address (dword
# aligned), the data, and the vector-control mask bit (§6.8.2.6-9).
_ENTRY_WMASK = struct.pack("<IIII", 0xFFFF_FFFC, 0xFFFF_FFFF, 0xFFFF_FFFF, VECTOR_MASKED)
_ENTRY = struct.Struct("<IIII")


class Msix:
    """MSI-X state of one function.

    :param vectors: table size (1..2048).
    :param bar: the BAR holding both the table and the PBA.
    :param table_offset: offset of the table in the BAR (8-byte aligned).
    :param pba_offset: offset of the PBA in the BAR (8-byte aligned).
    :param platform: GSI routing and irqfds; None counts deliveries only.
    """

    def __init__(
        self,
        vectors: int,
        *,
        bar: int,
        table_offset: int,
        pba_offset: int,
        platform: MsiPlatform | None,
    ) -> None:
        if not 1 <= vectors <= MAX_VECTORS or table_offset % 8 or pba_offset % 8:
            raise ValueError("bad MSI-X geometry")
        self.vectors = vectors
        self.bar = bar
        self.table_offset = table_offset
        self.table_size = vectors * ENTRY_SIZE
        self.pba_offset = pba_offset
        self.pba_size = (vectors + 63) // 64 * 8
        self.platform = platform
        self.cap_offset = -1
        self.enabled = False
        self.function_masked = False
        self.delivered = 0
        self._config: ConfigSpace | None = None
        self._lock = threading.Lock()
        self._table = bytearray(self.table_size)
        for v in range(vectors):
            self._table[v * ENTRY_SIZE + 12] = VECTOR_MASKED
        self._pending = 0
        self._gsi: list[int | None] = [None] * vectors
        self._fd: list[int] = [-1] * vectors
        self._route: list[tuple[int, int] | None] = [None] * vectors
        self._live: list[int] = [-1] * vectors

    def install(self, config: ConfigSpace) -> int:
        """Add the capability to ``config``; returns its offset."""
        control = self.vectors - 1
        body = struct.pack(
            "<HII", control, self.table_offset | self.bar, self.pba_offset | self.bar
        )
        wmask = struct.pack("<HII", CONTROL_ENABLE | CONTROL_FUNCTION_MASK, 0, 0)
        self.cap_offset = config.add_capability(CAP_ID_MSIX, body, wmask)
        self._config = config
        return self.cap_offset

    @property
    def control_offset(self) -> int:
        return self.cap_offset + 2

    def control_written(self) -> None:
        """The guest wrote Message Control: pick up enable and function mask."""
        assert self._config is not None
        control = self._config.get(self.control_offset, 2)
        with self._lock:
            self.enabled = bool(control & CONTROL_ENABLE)
            self.function_masked = bool(control & CONTROL_FUNCTION_MASK)
            for v in range(self.vectors):
                self._refresh(v)

    # -- BAR accesses (vCPU threads) ----------------------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> bytes | None:
        """Table or PBA bytes, or None when the access is not ours."""
        if bar != self.bar:
            return None
        with self._lock:
            if self._inside(offset, size, self.table_offset, self.table_size):
                at = offset - self.table_offset
                return bytes(self._table[at : at + size])
            if self._inside(offset, size, self.pba_offset, self.pba_size):
                at = offset - self.pba_offset
                return self._pending.to_bytes(self.pba_size, "little")[at : at + size]
        return None

    def bar_write(self, bar: int, offset: int, data: bytes) -> bool:
        """Apply a table write; PBA writes are ignored. True when the access was ours."""
        if bar != self.bar:
            return False
        size = len(data)
        if self._inside(offset, size, self.pba_offset, self.pba_size):
            return True
        if not self._inside(offset, size, self.table_offset, self.table_size):
            return False
        at = offset - self.table_offset
        with self._lock:
            for i, byte in enumerate(data):
                mask = _ENTRY_WMASK[(at + i) % ENTRY_SIZE]
                self._table[at + i] = (self._table[at + i] & ~mask) | (byte & mask)
            for v in range(at // ENTRY_SIZE, (at + size - 1) // ENTRY_SIZE + 1):
                self._refresh(v)
        return True

    @staticmethod
    def _inside(offset: int, size: int, start: int, length: int) -> bool:
        return size > 0 and start <= offset and offset + size <= start + length

    # -- state --------------------------------------------------------------------

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """``(address, data, masked)`` of a table entry."""
        lo, hi, data, ctrl = _ENTRY.unpack_from(self._table, vector * ENTRY_SIZE)
        return hi << 32 | lo, data, bool(ctrl & VECTOR_MASKED)

    def pending(self, vector: int) -> bool:
        return bool(self._pending >> vector & 1)

    def _refresh(self, v: int) -> None:
        """Recompute whether vector ``v`` is deliverable; called under the lock."""
        address, data, masked = self.entry(v)
        if not self.enabled or self.function_masked or masked:
            self._live[v] = -1
            return
        fd = self._connect(v, address, data)
        self._live[v] = fd
        if fd >= 0 and self._pending >> v & 1:
            self._pending &= ~(1 << v)
            self._fire(fd)

    def _connect(self, v: int, address: int, data: int) -> int:
        """Make sure vector ``v`` has a GSI routed to its current message."""
        platform = self.platform
        if platform is None:
            return -2  # "live" without a platform: deliveries are only counted
        try:
            if self._gsi[v] is None:
                gsi = platform.allocate_gsi()
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                platform.set_msi_route(gsi, address, data)
                self._route[v] = (address, data)
                try:
                    platform.add_irqfd(gsi, fd)
                except BaseException:
                    os.close(fd)
                    raise
                self._gsi[v], self._fd[v] = gsi, fd
            elif self._route[v] != (address, data):
                routed = self._gsi[v]
                assert routed is not None
                platform.set_msi_route(routed, address, data)
                self._route[v] = (address, data)
        except Exception:
            log.exception("MSI-X vector %d could not be routed", v)
            return -1
        return self._fd[v]

    def _fire(self, fd: int) -> None:
        self.delivered += 1
        if fd >= 0:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                log.exception("MSI-X irqfd write failed")

    # -- delivery (the loop) -------------------------------------------------------

    def notify(self, vector: int) -> None:
        """Signal ``vector``, or leave it pending while it is masked."""
        if not 0 <= vector < self.vectors:
            return
        fd = self._live[vector]
        if fd != -1:
            self._fire(fd)
            return
        with self._lock:
            fd = self._live[vector]
            if fd != -1:
                self._fire(fd)
            elif self.enabled:
                self._pending |= 1 << vector

    def gsi(self, vector: int) -> int | None:
        return self._gsi[vector]

    def irqfd(self, vector: int) -> int:
        """The eventfd behind ``vector`` (-1 until the guest first unmasks it)."""
        return self._fd[vector]

    def close(self) -> None:
        """Detach every irqfd and route, and close the eventfds."""
        with self._lock:
            for v in range(self.vectors):
                gsi, fd = self._gsi[v], self._fd[v]
                self._live[v] = -1
                if gsi is None:
                    continue
                if self.platform is not None:
                    try:
                        self.platform.remove_irqfd(gsi, fd)
                        self.platform.remove_route(gsi)
                        release = getattr(self.platform, "release_gsi", None)
                        if release is not None:
                            release(gsi)
                    except Exception:
                        log.exception("MSI-X vector %d teardown failed", v)
                os.close(fd)
                self._gsi[v], self._fd[v] = None, -1
