"""MSI-X: capability, table, PBA, masking and pending delivery through a fake platform."""

from __future__ import annotations

import struct

import pytest

from appliance.pci.bus import PciBus
from appliance.pci.config import BarKind
from appliance.pci.device import PciDevice
from appliance.pci.msix import Msix
from tests.pci.fakes import FakePlatform, GuestPci

MSG_ADDR = 0xFEE0_0000


class MsixDevice(PciDevice):
    def __init__(self, platform: FakePlatform, vectors: int = 3) -> None:
        super().__init__("msix-dev", vendor_id=0x1234, device_id=0x2, class_code=0xFF0000)
        self.add_bar(2, 0x1000, kind=BarKind.MEM64)
        self.add_msix(Msix(vectors, bar=2, table_offset=0, pba_offset=0x800, platform=platform))


@pytest.fixture
def rig() -> tuple[FakePlatform, GuestPci, MsixDevice, int]:
    plat = FakePlatform()
    pci = PciBus(plat.mmio_bus)
    dev = MsixDevice(plat)
    slot = pci.add(dev).slot
    return plat, GuestPci(pci, plat), dev, slot


def _cap(guest: GuestPci, slot: int) -> int:
    return next(off for cid, off in guest.caps(slot) if cid == 0x11)


def _program(guest: GuestPci, table: int, vector: int, data: int, masked: bool) -> None:
    entry = table + 16 * vector
    guest.mmio_write(entry, MSG_ADDR, 4)
    guest.mmio_write(entry + 4, 0, 4)
    guest.mmio_write(entry + 8, data, 4)
    guest.mmio_write(entry + 12, int(masked), 4)


def test_capability_describes_table_and_pba(rig) -> None:  # type: ignore[no-untyped-def]
    plat, guest, dev, slot = rig
    cap = _cap(guest, slot)
    assert guest.cfg_read(slot, cap + 2, 2) == 2  # table size N-1
    assert guest.cfg_read(slot, cap + 4) == 0x000 | 2
    assert guest.cfg_read(slot, cap + 8) == 0x800 | 2
    table = guest.bar(slot, 2)
    # Reset state: every vector masked, nothing pending.
    for v in range(3):
        assert guest.mmio_read(table + 16 * v + 12, 4) == 1
    assert guest.mmio_read(table + 0x800, 8) == 0


def test_table_reserved_bits_are_read_only_and_pba_ignores_writes(rig) -> None:  # type: ignore[no-untyped-def]
    plat, guest, dev, slot = rig
    table = guest.bar(slot, 2)
    guest.mmio_write(table, 0xFEE0_0003, 4)
    guest.mmio_write(table + 12, 0xFFFF_FFFF, 4)
    assert guest.mmio_read(table, 4) == 0xFEE0_0000
    assert guest.mmio_read(table + 12, 4) == 1
    guest.mmio_write(table + 0x800, 0xFF, 8)
    assert guest.mmio_read(table + 0x800, 8) == 0
    guest.mmio_write(table + 8, struct.unpack("<Q", b"\x11" * 8)[0], 8)  # 64-bit access
    assert guest.mmio_read(table + 8, 4) == 0x1111_1111


def test_unmasked_vector_fires_its_irqfd(rig) -> None:  # type: ignore[no-untyped-def]
    plat, guest, dev, slot = rig
    cap, table = _cap(guest, slot), guest.bar(slot, 2)
    guest.cfg_write(slot, cap + 2, 0x8000, 2)
    _program(guest, table, 1, 0x41, masked=False)
    gsi = plat.gsi_for(MSG_ADDR, 0x41)
    dev.msix.notify(1)  # type: ignore[union-attr]
    dev.msix.notify(1)  # type: ignore[union-attr]
    assert plat.interrupts(gsi) == 2


def test_masked_vector_sets_pending_and_delivers_once_on_unmask(rig) -> None:  # type: ignore[no-untyped-def]
    plat, guest, dev, slot = rig
    cap, table = _cap(guest, slot), guest.bar(slot, 2)
    msix = dev.msix
    assert msix is not None
    guest.cfg_write(slot, cap + 2, 0x8000, 2)
    _program(guest, table, 2, 0x42, masked=True)
    msix.notify(2)
    msix.notify(2)
    assert guest.mmio_read(table + 0x800, 8) == 1 << 2
    assert plat.irqfds == {}
    guest.mmio_write(table + 16 * 2 + 12, 0, 4)
    gsi = plat.gsi_for(MSG_ADDR, 0x42)
    assert plat.interrupts(gsi) == 1
    assert guest.mmio_read(table + 0x800, 8) == 0


def test_function_mask_holds_all_vectors_pending(rig) -> None:  # type: ignore[no-untyped-def]
    plat, guest, dev, slot = rig
    cap, table = _cap(guest, slot), guest.bar(slot, 2)
    msix = dev.msix
    assert msix is not None
    guest.cfg_write(slot, cap + 2, 0xC000, 2)  # enable + function mask, as Linux starts
    _program(guest, table, 0, 0x40, masked=False)
    _program(guest, table, 1, 0x41, masked=False)
    msix.notify(0)
    msix.notify(1)
    assert guest.mmio_read(table + 0x800, 8) == 0b11
    guest.cfg_write(slot, cap + 2, 0x8000, 2)
    assert plat.interrupts(plat.gsi_for(MSG_ADDR, 0x40)) == 1
    assert plat.interrupts(plat.gsi_for(MSG_ADDR, 0x41)) == 1
    assert guest.mmio_read(table + 0x800, 8) == 0


def test_disabled_msix_delivers_nothing_and_sets_nothing(rig) -> None:  # type: ignore[no-untyped-def]
    plat, guest, dev, slot = rig
    table = guest.bar(slot, 2)
    _program(guest, table, 0, 0x40, masked=False)
    dev.msix.notify(0)  # type: ignore[union-attr]
    assert plat.irqfds == {}
    assert guest.mmio_read(table + 0x800, 8) == 0


def test_route_follows_a_reprogrammed_message(rig) -> None:  # type: ignore[no-untyped-def]
    plat, guest, dev, slot = rig
    cap, table = _cap(guest, slot), guest.bar(slot, 2)
    guest.cfg_write(slot, cap + 2, 0x8000, 2)
    _program(guest, table, 0, 0x40, masked=False)
    gsi = plat.gsi_for(MSG_ADDR, 0x40)
    _program(guest, table, 0, 0x55, masked=True)
    guest.mmio_write(table + 12, 0, 4)
    assert plat.routes[gsi] == (MSG_ADDR, 0x55)
    assert len(plat.irqfds) == 1  # same GSI and irqfd, new route


def test_out_of_range_vectors_and_accesses_are_ignored(rig) -> None:  # type: ignore[no-untyped-def]
    plat, guest, dev, slot = rig
    table = guest.bar(slot, 2)
    dev.msix.notify(3)  # type: ignore[union-attr]
    dev.msix.notify(-1)  # type: ignore[union-attr]
    guest.mmio_write(table + 0x7F8, 1, 8)  # between table and PBA
    assert guest.mmio_read(table + 0x7F8, 8) == 0xFFFF_FFFF_FFFF_FFFF
    assert guest.mmio_read(table + 16 * 3 - 2, 4) == 0xFFFF_FFFF  # straddles the table end


def test_close_releases_routes_and_irqfds(rig) -> None:  # type: ignore[no-untyped-def]
    plat, guest, dev, slot = rig
    cap, table = _cap(guest, slot), guest.bar(slot, 2)
    guest.cfg_write(slot, cap + 2, 0x8000, 2)
    _program(guest, table, 0, 0x40, masked=False)
    dev.msix.close()  # type: ignore[union-attr]
    assert plat.irqfds == {} and plat.routes == {}
