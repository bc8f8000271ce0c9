"""The VM's GSI routing table, kept whole in userspace.

KVM_SET_GSI_ROUTING replaces the entire table on every call, so adding one MSI
route means re-submitting all of them. :class:`GsiRouting` holds the table: the
default legacy routes (ISA IRQs to both PICs and the IOAPIC) plus one MSI route
per allocated GSI, and builds the ``struct kvm_irq_routing`` to submit.

The legacy routes follow the PC convention a MADT interrupt source override
describes: ISA IRQ 0 (the PIT) arrives on IOAPIC pin 2, and pin 0 is unused
(ACPI 6.5 §5.2.12.5; every PC firmware declares this override).
"""

from __future__ import annotations

import threading

from appliance.bootpath import NamedTuple
from appliance.kvm import KvmError, layout
from appliance.kvm import ffi as k
from appliance.kvm.ffi import ffi


class IrqchipRoute(NamedTuple):
    gsi: int
    chip: int
    pin: int


class MsiRoute(NamedTuple):
    gsi: int
    address: int
    data: int


Route = IrqchipRoute | MsiRoute


def default_routes() -> list[IrqchipRoute]:
    """ISA IRQs 0-15 on the PICs, GSIs 0-23 on the IOAPIC (IRQ 0 on pin 2)."""
    routes: list[IrqchipRoute] = []
    for gsi in range(16):
        if gsi == 2:
            continue  # the cascade: the slave PIC hangs off master pin 2
        chip = k.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else k.KVM_IRQCHIP_PIC_SLAVE
        routes.append(IrqchipRoute(gsi, chip, gsi % 8))
    for gsi in range(layout.IOAPIC_PINS):
        if gsi == 2:
            continue
        routes.append(IrqchipRoute(gsi, k.KVM_IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi))
    return routes


class GsiRouting:
    """The routing table and the GSI allocator for MSI routes (thread-safe)."""

    def __init__(self, max_gsi: int = 1024) -> None:
        self._lock = threading.Lock()
        self._legacy = default_routes()
        self._msi: dict[int, MsiRoute] = {}
        self._allocated: set[int] = set()
        self._next = layout.FIRST_MSI_GSI
        self._max_gsi = max_gsi

    def allocate(self) -> int:
        with self._lock:
            for gsi in range(self._next, self._max_gsi):
                if gsi not in self._allocated:
                    self._allocated.add(gsi)
                    self._next = gsi + 1
                    return gsi
            for gsi in range(layout.FIRST_MSI_GSI, self._next):
                if gsi not in self._allocated:
                    self._allocated.add(gsi)
                    return gsi
        raise KvmError("no free GSI for an MSI route")

    def release(self, gsi: int) -> None:
        with self._lock:
            self._allocated.discard(gsi)
            self._msi.pop(gsi, None)

    def set_msi(self, gsi: int, address: int, data: int) -> bool:
        """Record an MSI route; returns False if the table did not change."""
        if gsi < layout.FIRST_MSI_GSI:
            raise KvmError(f"GSI {gsi} belongs to the IOAPIC, not to MSI")
        route = MsiRoute(gsi, address & 0xFFFF_FFFF_FFFF_FFFF, data & 0xFFFF_FFFF)
        with self._lock:
            if self._msi.get(gsi) == route:
                return False
            self._msi[gsi] = route
            self._allocated.add(gsi)
            return True

    def remove(self, gsi: int) -> bool:
        with self._lock:
            return self._msi.pop(gsi, None) is not None

    def routes(self) -> list[Route]:
        with self._lock:
            return [*self._legacy, *sorted(self._msi.values(), key=lambda r: r.gsi)]

    def build(self) -> object:
        """The ``struct kvm_irq_routing`` for the current table (a cffi buffer owner)."""
        routes = self.routes()
        raw = ffi.new(
            "char[]",
            ffi.sizeof("struct kvm_irq_routing") + len(routes) * ffi.sizeof("struct kvm_irq_routing_entry"),
        )
        table = ffi.cast("struct kvm_irq_routing *", raw)
        table.nr = len(routes)
        for i, r in enumerate(routes):
            e = table.entries[i]
            e.gsi = r.gsi
            if isinstance(r, IrqchipRoute):
                e.type = k.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip = r.chip
                e.u.irqchip.pin = r.pin
            else:
                e.type = k.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo = r.address & 0xFFFF_FFFF
                e.u.msi.address_hi = r.address >> 32
                e.u.msi.data = r.data
        return raw
