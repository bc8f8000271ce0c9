"""In-memory stand-ins for the KVM side of MSI-X and doorbells, and a test "guest".

:class:`FakePlatform` records GSI routes, irqfds and ioeventfds the way KVM
would hold them. :class:`GuestPci` is a driver's-eye view: it reaches config
space only through ports 0xCF8/0xCFC and BARs only through the MMIO bus, and
rings a doorbell the way KVM does (the ioeventfd registered for the address,
or an MMIO exit when there is none).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from appliance.kvm.bus import Bus
from appliance.kvm.layout import PCI_CONFIG_ADDRESS
from appliance.pci.bus import CONFIG_PORT_SPAN, PciBus


@dataclass
class FakePlatform:
    mmio_bus: Bus = field(default_factory=lambda: Bus("mmio"))
    routes: dict[int, tuple[int, int]] = field(default_factory=dict)
    irqfds: dict[int, int] = field(default_factory=dict)
    ioeventfds: dict[int, tuple[int, int]] = field(default_factory=dict)
    next_gsi: int = 24
    route_updates: int = 0

    def allocate_gsi(self) -> int:
        gsi = self.next_gsi
        self.next_gsi += 1
        return gsi

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        self.routes[gsi] = (address, data)
        self.route_updates += 1

    def remove_route(self, gsi: int) -> None:
        del self.routes[gsi]

    def add_irqfd(self, gsi: int, fd: int) -> None:
        assert gsi in self.routes
        self.irqfds[gsi] = fd

    def remove_irqfd(self, gsi: int, fd: int) -> None:
        assert self.irqfds.pop(gsi) == fd

    def add_ioeventfd(
        self, addr: int, length: int, fd: int, *, datamatch: int | None = None, pio: bool = False
    ) -> None:
        if addr in self.ioeventfds:
            raise FileExistsError(addr)
        self.ioeventfds[addr] = (length, fd)

    def remove_ioeventfd(
        self, addr: int, length: int, fd: int, *, datamatch: int | None = None, pio: bool = False
    ) -> None:
        assert self.ioeventfds.pop(addr) == (length, fd)

    # -- what a test observes --------------------------------------------------

    def interrupts(self, gsi: int) -> int:
        """How many times the irqfd of ``gsi`` was signalled since the last look."""
        try:
            return os.eventfd_read(self.irqfds[gsi])
        except BlockingIOError:
            return 0

    def gsi_for(self, address: int, data: int) -> int:
        return next(g for g, r in self.routes.items() if r == (address, data))


class GuestPci:
    """A guest's configuration-mechanism-#1 and MMIO accesses."""

    def __init__(self, pci: PciBus, platform: FakePlatform) -> None:
        self.pci = pci
        self.platform = platform
        self.ports = Bus("pio")
        self.ports.register(PCI_CONFIG_ADDRESS, CONFIG_PORT_SPAN, pci)

    def cfg_read(self, slot: int, reg: int, size: int = 4, func: int = 0) -> int:
        self.ports.write(PCI_CONFIG_ADDRESS, struct.pack("<I", 1 << 31 | slot << 11 | func << 8 | reg & 0xFC))
        data = self.ports.read(0xCFC + (reg & 3), size)
        return int.from_bytes(data, "little")

    def cfg_write(self, slot: int, reg: int, value: int, size: int = 4, func: int = 0) -> None:
        self.ports.write(PCI_CONFIG_ADDRESS, struct.pack("<I", 1 << 31 | slot << 11 | func << 8 | reg & 0xFC))
        self.ports.write(0xCFC + (reg & 3), value.to_bytes(size, "little"))

    def bar(self, slot: int, index: int) -> int:
        low = self.cfg_read(slot, 0x10 + 4 * index)
        if low & 0x6 == 0x4:
            return (low & ~0xF) | self.cfg_read(slot, 0x14 + 4 * index) << 32
        return low & ~0xF

    def caps(self, slot: int) -> list[tuple[int, int]]:
        out = []
        at = self.cfg_read(slot, 0x34, 1)
        while at and len(out) < 48:
            out.append((self.cfg_read(slot, at, 1), at))
            at = self.cfg_read(slot, at + 1, 1)
        return out

    def mmio_read(self, addr: int, size: int) -> int:
        return int.from_bytes(self.platform.mmio_bus.read(addr, size), "little")

    def mmio_write(self, addr: int, value: int, size: int) -> None:
        self.platform.mmio_bus.write(addr, value.to_bytes(size, "little"))

    def doorbell(self, addr: int, value: int) -> None:
        """A 16-bit doorbell write: the ioeventfd takes it if one covers ``addr``."""
        hit = self.platform.ioeventfds.get(addr)
        if hit is not None:
            os.eventfd_write(hit[1], 1)
        else:
            self.mmio_write(addr, value, 2)
