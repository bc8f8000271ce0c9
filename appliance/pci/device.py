"""The base of every PCI function: config space, BAR windows on the MMIO bus.

A device declares its BARs and capabilities; this class owns the parts every
function shares: guest config reads and writes through the masks, and keeping
each memory BAR's window registered on the MMIO bus where the BAR registers
and the command register's memory-decode bit say it is. Subclasses answer BAR
accesses (:meth:`PciDevice.read_bar` / :meth:`PciDevice.write_bar`) and hear
about BAR moves (:meth:`PciDevice.bar_moved`) to re-register doorbells.

Config and BAR accesses arrive on vCPU threads; the config side is serialised
by a per-device lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance.kvm.bus import Bus, BusError
from appliance.pci.config import (
    COMMAND,
    COMMAND_MEMORY,
    HEADER_MULTIFUNCTION,
    HEADER_TYPE,
    Bar,
    BarKind,
    ConfigSpace,
)

if TYPE_CHECKING:
    from appliance.pci.msix import Msix

log = logging.getLogger(__name__)


class _BarWindow:
    """The BusDevice for one BAR: routes MMIO exits to its PCI function."""

    def __init__(self, device: PciDevice, index: int) -> None:
        self.device = device
        self.index = index

    def read(self, offset: int, size: int) -> bytes:
        try:
            return self.device.bar_read(self.index, offset, size)
        except Exception:  # a guest access must never kill the vCPU thread
            log.exception("%s: BAR %d read at %#x failed", self.device.name, self.index, offset)
            return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        try:
            self.device.bar_write(self.index, offset, data)
        except Exception:
            log.exception("%s: BAR %d write at %#x failed", self.device.name, self.index, offset)


class PciDevice:
    """One PCI function.

    :param name: for log lines.
    """

    def __init__(
        self,
        name: str,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
    ) -> None:
        self.name = name
        self.config = ConfigSpace(
            vendor_id=vendor_id,
            device_id=device_id,
            class_code=class_code,
            revision=revision,
            subsystem_vendor_id=subsystem_vendor_id,
            subsystem_id=subsystem_id,
        )
        self.msix: Msix | None = None
        self._config_lock = threading.RLock()
        self._mmio_bus: Bus | None = None
        self._mapped: dict[int, tuple[int, _BarWindow]] = {}
        self._watchers: list[tuple[int, int, Callable[[], None]]] = []

    # -- set-up (before the guest runs) -----------------------------------------

    def add_bar(
        self, index: int, size: int, *, kind: BarKind = BarKind.MEM64, prefetchable: bool = False
    ) -> Bar:
        bar = Bar(index, size, kind, prefetchable)
        self.config.add_bar(bar)
        return bar

    def add_msix(self, msix: Msix) -> None:
        """Install the MSI-X capability; its table and PBA live in ``msix.bar``."""
        msix.install(self.config)
        self.msix = msix
        self.watch_config(msix.control_offset, 2, msix.control_written)

    def watch_config(self, offset: int, length: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` (under the device lock) after a guest write overlaps the range."""
        self._watchers.append((offset, length, callback))

    def set_multifunction(self) -> None:
        self.config.set_u8(HEADER_TYPE, self.config.get(HEADER_TYPE, 1) | HEADER_MULTIFUNCTION)

    def attach(self, mmio_bus: Bus | None) -> None:
        """Connect to the MMIO bus and map BARs that already have addresses."""
        with self._config_lock:
            self._mmio_bus = mmio_bus
            self._update_mappings()

    def place_bar(self, index: int, addr: int) -> None:
        """Assign a BAR address as firmware would, and turn on memory decode."""
        with self._config_lock:
            self.config.set_bar_address(index, addr)
            self.config.set_u16(COMMAND, self.config.get(COMMAND, 2) | COMMAND_MEMORY)
            self._update_mappings()

    def close(self) -> None:
        """Release what the device holds (its BAR windows here; more in subclasses)."""
        self.detach()

    def detach(self) -> None:
        with self._config_lock:
            for index in list(self._mapped):
                self._unmap(index)
            self._mmio_bus = None

    # -- guest config accesses ----------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        with self._config_lock:
            return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        with self._config_lock:
            if not self.config.valid_access(offset, size):
                return
            self.config.write(offset, size, value)
            for start, length, callback in self._watchers:
                if offset < start + length and start < offset + size:
                    try:
                        callback()
                    except Exception:
                        log.exception("%s: config watcher failed", self.name)
            self._update_mappings()

    def bar_address(self, index: int) -> int | None:
        """Where BAR ``index`` is mapped now, or None when it is not decoded."""
        with self._config_lock:
            hit = self._mapped.get(index)
            return None if hit is None else hit[0]

    # -- BAR windows --------------------------------------------------------------

    def _desired(self, index: int) -> int | None:
        bar = self.config.bars[index]
        if bar is None or bar.kind is BarKind.IO:
            return None
        if not self.config.get(COMMAND, 2) & COMMAND_MEMORY:
            return None
        addr = self.config.bar_address(index)
        # Guest-controlled: an address of 0 is "unassigned"; one that would wrap
        # the physical address space cannot be decoded.
        if addr == 0 or addr + bar.size > 1 << 64:
            return None
        return addr

    def _update_mappings(self) -> None:
        for index, bar in enumerate(self.config.bars):
            if bar is None:
                continue
            want = self._desired(index)
            have = self._mapped.get(index)
            if (have[0] if have else None) == want:
                continue
            old = have[0] if have else None
            if have is not None:
                self._unmap(index)
            new = None
            if want is not None and self._mmio_bus is not None:
                window = _BarWindow(self, index)
                try:
                    self._mmio_bus.register(want, bar.size, window)
                except BusError:
                    log.warning("%s: BAR %d at %#x overlaps another range; not decoded",
                                self.name, index, want)
                else:
                    self._mapped[index] = (want, window)
                    new = want
            if old != new:
                try:
                    self.bar_moved(index, old, new)
                except Exception:
                    log.exception("%s: bar_moved failed", self.name)

    def _unmap(self, index: int) -> None:
        addr, _ = self._mapped.pop(index)
        if self._mmio_bus is not None:
            self._mmio_bus.unregister(addr)

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        msix = self.msix
        if msix is not None:
            data = msix.bar_read(index, offset, size)
            if data is not None:
                return data
        return self.read_bar(index, offset, size)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        msix = self.msix
        if msix is not None and msix.bar_write(index, offset, data):
            return
        self.write_bar(index, offset, data)

    # -- for subclasses -----------------------------------------------------------

    def read_bar(self, index: int, offset: int, size: int) -> bytes:
        """A guest read of a BAR; unclaimed registers read as all ones."""
        return b"\xff" * size

    def write_bar(self, index: int, offset: int, data: bytes) -> None:
        """A guest write to a BAR; ignored by default."""

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        """BAR ``index`` stopped being decoded at ``old`` and is now decoded at ``new``."""
