"""What the PCI layer needs from the hypervisor to deliver MSIs and take doorbells.

The KVM ``Vm`` implements this; tests use an in-memory fake. Keeping it a
Protocol lets ``appliance.pci`` and the virtio-pci transport run without
``/dev/kvm``.
"""

from __future__ import annotations

from typing import Protocol

from appliance.kvm.bus import Bus


class MsiPlatform(Protocol):
    """GSI routing, irqfds and ioeventfds (the KVM side of MSI-X and notify BARs)."""

    mmio_bus: Bus

    def allocate_gsi(self) -> int: ...

    def set_msi_route(self, gsi: int, address: int, data: int) -> None: ...

    def remove_route(self, gsi: int) -> None: ...

    def add_irqfd(self, gsi: int, fd: int) -> None: ...

    def remove_irqfd(self, gsi: int, fd: int) -> None: ...

    def add_ioeventfd(
        self, addr: int, length: int, fd: int, *, datamatch: int | None = None, pio: bool = False
    ) -> None: ...

    def remove_ioeventfd(
        self, addr: int, length: int, fd: int, *, datamatch: int | None = None, pio: bool = False
    ) -> None: ...
