"""GSI routing table: default legacy routes, MSI routes and the GSI allocator."""

from __future__ import annotations

import pytest

from appliance.kvm import KvmError, layout
from appliance.kvm import ffi as k
from appliance.kvm.ffi import ffi
from appliance.kvm.irq import GsiRouting, IrqchipRoute, MsiRoute, default_routes


def test_default_routes_put_isa_irq0_on_ioapic_pin2_and_skip_the_cascade() -> None:
    routes = default_routes()
    ioapic = {r.gsi: r.pin for r in routes if r.chip == k.KVM_IRQCHIP_IOAPIC}
    assert ioapic[0] == 2
    assert 2 not in ioapic
    assert all(ioapic[g] == g for g in range(3, layout.IOAPIC_PINS))
    pic = {(r.gsi, r.chip, r.pin) for r in routes if r.chip != k.KVM_IRQCHIP_IOAPIC}
    assert (4, k.KVM_IRQCHIP_PIC_MASTER, 4) in pic
    assert (9, k.KVM_IRQCHIP_PIC_SLAVE, 1) in pic


def test_allocate_starts_above_ioapic_and_reuses_released() -> None:
    r = GsiRouting(max_gsi=layout.FIRST_MSI_GSI + 2)
    a, b = r.allocate(), r.allocate()
    assert (a, b) == (layout.FIRST_MSI_GSI, layout.FIRST_MSI_GSI + 1)
    with pytest.raises(KvmError):
        r.allocate()
    r.release(a)
    assert r.allocate() == a


def test_msi_routes_are_kept_and_built_after_legacy_routes() -> None:
    r = GsiRouting()
    gsi = r.allocate()
    assert r.set_msi(gsi, 0xFEE0_0000, 0x4031)
    assert not r.set_msi(gsi, 0xFEE0_0000, 0x4031)  # unchanged: no resubmission needed
    routes = r.routes()
    assert routes[-1] == MsiRoute(gsi, 0xFEE0_0000, 0x4031)
    raw = r.build()
    table = ffi.cast("struct kvm_irq_routing *", raw)
    assert table.nr == len(routes)
    last = table.entries[table.nr - 1]
    assert (last.gsi, last.type, last.u.msi.address_lo, last.u.msi.data) == (
        gsi, k.KVM_IRQ_ROUTING_MSI, 0xFEE0_0000, 0x4031,
    )
    first = table.entries[0]
    assert first.type == k.KVM_IRQ_ROUTING_IRQCHIP
    assert isinstance(routes[0], IrqchipRoute)
    assert r.remove(gsi)
    assert not any(isinstance(x, MsiRoute) for x in r.routes())


def test_msi_route_on_an_ioapic_gsi_is_refused() -> None:
    with pytest.raises(KvmError):
        GsiRouting().set_msi(5, 0xFEE0_0000, 0)
