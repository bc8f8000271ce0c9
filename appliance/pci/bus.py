"""PCI bus 0: the host bridge, and configuration mechanism #1 on ports 0xCF8/0xCFC.

The guest writes ``enable | bus << 16 | device << 11 | function << 8 | reg``
as a dword to 0xCF8 and then accesses 0xCFC-0xCFF (PCI Local Bus 3.0 §3.2.2.3.2).
Only dword accesses to 0xCF8 reach the address latch: a byte write to 0xCF9 is
the reset control register, which we hand to ``on_reset_port``. Functions that
do not exist read as all ones. We are the firmware: :meth:`PciBus.add` places a
device's BARs in the PCI window and turns on memory decode.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from appliance.kvm import layout
from appliance.kvm.bus import Bus
from appliance.pci.allocator import BarAllocator, PciAddress
from appliance.pci.device import PciDevice
from appliance.pci.errors import SlotError

log = logging.getLogger(__name__)

CONFIG_PORT_SPAN = 8
ECAM_BUS_SPAN = 1 << 20  # 32 devices x 8 functions x 4 KiB (PCIe 4.0 §7.2.2)
_ENABLE = 1 << 31

# Intel's q35 host bridge ids (the MCH), which guests know as a plain host bridge.
HOST_BRIDGE_VENDOR = 0x8086
HOST_BRIDGE_DEVICE = 0x29C0
CLASS_HOST_BRIDGE = 0x060000


class HostBridge(PciDevice):
    """00.0: the host bridge, with no BARs and nothing to do."""

    def __init__(self) -> None:
        super().__init__(
            "host-bridge",
            vendor_id=HOST_BRIDGE_VENDOR,
            device_id=HOST_BRIDGE_DEVICE,
            class_code=CLASS_HOST_BRIDGE,
        )


class PciBus:
    """Bus 0 and its config-port BusDevice (register it at 0xCF8, size 8).

    :param mmio_bus: where BAR windows are registered.
    :param window: ``(start, end)`` of the memory window BARs are placed in.
    """

    def __init__(
        self,
        mmio_bus: Bus | None = None,
        *,
        window: tuple[int, int] = (layout.PCI_MMIO_START, layout.PCI_MMIO_END),
        host_bridge: bool = True,
    ) -> None:
        self.mmio_bus = mmio_bus
        self.allocator = BarAllocator(*window)
        self.devices: dict[PciAddress, PciDevice] = {}
        self.on_reset_port: Callable[[int], None] | None = None
        self._latch = 0
        self._lock = threading.Lock()
        if host_bridge:
            self.add(HostBridge(), PciAddress(0, 0))

    def add(self, device: PciDevice, address: PciAddress | None = None) -> PciAddress:
        """Plug ``device`` in at ``address`` (or the lowest free slot), place its BARs.

        :raises SlotError: When the address is taken or no slot is free.
        :raises BarSpaceError: When its BARs do not fit the window.
        """
        with self._lock:
            if address is None:
                used = {a.slot for a in self.devices}
                free = [s for s in range(32) if s not in used]
                if not free:
                    raise SlotError("no free PCI slot is left on bus 0")
                address = PciAddress(free[0], 0)
            if address in self.devices:
                raise SlotError(f"PCI address {address} is already in use")
            for bar in device.config.bars:
                if bar is not None:
                    device.place_bar(bar.index, self.allocator.allocate(bar.size))
            self.devices[address] = device
            if address.function:
                head = self.devices.get(PciAddress(address.slot, 0))
                if head is not None:
                    head.set_multifunction()
            elif any(a.slot == address.slot and a.function for a in self.devices):
                device.set_multifunction()
        device.attach(self.mmio_bus)
        return address

    def ecam(self) -> PciEcam:
        """A BusDevice for bus 0's ECAM window (register ``ECAM_BUS_SPAN`` bytes).

        Only useful when the ACPI tables carry an MCFG entry for it; guests
        without one use ports 0xCF8/0xCFC.
        """
        return PciEcam(self)

    def device_at(self, address: PciAddress) -> PciDevice | None:
        return self.devices.get(address)

    def close(self) -> None:
        """Close every device (virtio transports drop doorbells and MSI routes).

        Call it on the loop thread: transports remove their loop readers.
        """
        for device in self.devices.values():
            try:
                device.close()
            except Exception:
                log.exception("%s: close failed", device.name)
        self.devices.clear()

    # -- configuration mechanism #1 (vCPU threads) ---------------------------------

    def _target(self, latch: int) -> tuple[PciDevice | None, int]:
        if not latch & _ENABLE or latch >> 16 & 0xFF:
            return None, 0
        address = PciAddress(latch >> 11 & 0x1F, latch >> 8 & 0x7)
        return self.devices.get(address), latch & 0xFC

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0 and size == 4:
            with self._lock:
                return self._latch.to_bytes(4, "little")
        if 4 <= offset and offset + size <= CONFIG_PORT_SPAN and size in (1, 2, 4):
            with self._lock:
                device, reg = self._target(self._latch)
            if device is not None:
                value = device.config_read(reg + offset - 4, size)
                return value.to_bytes(size, "little")
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if offset == 0 and size == 4:
            with self._lock:
                self._latch = int.from_bytes(data, "little") & 0x80FF_FFFC
            return
        if offset == 1 and size == 1:
            hook = self.on_reset_port
            if hook is not None:
                hook(data[0])
            return
        if 4 <= offset and offset + size <= CONFIG_PORT_SPAN and size in (1, 2, 4):
            with self._lock:
                device, reg = self._target(self._latch)
            if device is not None:
                device.config_write(reg + offset - 4, size, int.from_bytes(data, "little"))


class PciEcam:
    """Enhanced configuration access for bus 0: one 4 KiB page per function.

    Our functions are conventional PCI, so the extended space above 256 bytes
    reads as zeros; absent functions read as all ones.
    """

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def _split(self, offset: int) -> tuple[PciDevice | None, int]:
        devfn, reg = offset >> 12, offset & 0xFFF
        return self.bus.devices.get(PciAddress(devfn >> 3 & 0x1F, devfn & 7)), reg

    def read(self, offset: int, size: int) -> bytes:
        device, reg = self._split(offset)
        if device is None or size not in (1, 2, 4) or reg + size > 0x1000:
            return b"\xff" * size
        if reg >= 256:
            return bytes(size)
        return device.config_read(reg, size).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        device, reg = self._split(offset)
        if device is not None and len(data) in (1, 2, 4) and reg < 256:
            device.config_write(reg, len(data), int.from_bytes(data, "little"))
