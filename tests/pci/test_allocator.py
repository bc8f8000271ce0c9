"""Slot planning, ``addr=`` parsing and BAR placement."""

from __future__ import annotations

import pytest

from appliance.errors import ConfigError
from appliance.pci.allocator import BarAllocator, PciAddress, parse_pci_address, plan_slots
from appliance.pci.bus import PciBus
from appliance.pci.errors import BarSpaceError, SlotError
from tests.pci.test_config import Dummy


@pytest.mark.parametrize(
    "text,want",
    [("0x5", (5, 0)), ("05.0", (5, 0)), ("5", (5, 0)), ("1f", (31, 0)), ("0a.3", (10, 3)),
     ("10", (16, 0))],
)
def test_qemu_pci_addresses_parse_as_hex_slot_dot_function(text: str, want: tuple[int, int]) -> None:
    assert parse_pci_address(text) == PciAddress(*want)


@pytest.mark.parametrize("text", ["", "x", "20", "05.8", "-1", "5.", "0x5.0x9", "05.0.1"])
def test_bad_pci_addresses_are_config_errors_naming_the_value(text: str) -> None:
    with pytest.raises(ConfigError, match="PCI address"):
        parse_pci_address(text)


def test_slots_follow_command_line_order_and_honour_addr() -> None:
    got = plan_slots([None, PciAddress(1), None, PciAddress(5, 1), None])
    assert got == [PciAddress(2), PciAddress(1), PciAddress(3), PciAddress(5, 1), PciAddress(4)]


def test_duplicate_addr_is_refused() -> None:
    with pytest.raises(SlotError, match="05.0"):
        plan_slots([PciAddress(5), None, PciAddress(5)])
    with pytest.raises(SlotError, match="00.0"):
        plan_slots([PciAddress(0)])


def test_full_bus_is_refused() -> None:
    assert len(plan_slots([None] * 31)) == 31
    with pytest.raises(SlotError, match="no free PCI slot"):
        plan_slots([None] * 32)


def test_bars_are_aligned_to_their_size_and_refused_when_the_window_is_full() -> None:
    alloc = BarAllocator(0xC000_0000, 0xC010_0000)
    assert alloc.allocate(0x100) == 0xC000_0000
    assert alloc.allocate(0x4000) == 0xC000_4000
    assert alloc.allocate(0x1000) == 0xC000_8000
    with pytest.raises(BarSpaceError):
        alloc.allocate(0x10_0000)
    with pytest.raises(ConfigError):
        alloc.allocate(0x10_0000)


def test_bus_refuses_taken_address_and_places_bars_in_add_order() -> None:
    pci = PciBus()
    a = pci.add(Dummy(), PciAddress(3))
    b = pci.add(Dummy())
    assert (a, b) == (PciAddress(3), PciAddress(1))
    with pytest.raises(SlotError):
        pci.add(Dummy(), PciAddress(3))
    da, db = pci.device_at(a), pci.device_at(b)
    assert da is not None and db is not None
    assert da.config.bar_address(0) < db.config.bar_address(0)


def test_second_function_marks_the_slot_multifunction() -> None:
    pci = PciBus()
    head = Dummy()
    pci.add(head, PciAddress(4, 0))
    pci.add(Dummy(), PciAddress(4, 2))
    assert head.config.read(0x0E, 1) & 0x80


def test_closing_the_bus_unmaps_every_bar() -> None:
    from tests.pci.fakes import FakePlatform

    plat = FakePlatform()
    pci = PciBus(plat.mmio_bus)
    dev = Dummy()
    pci.add(dev)
    base = dev.config.bar_address(0)
    assert plat.mmio_bus.read(base, 1) == b"\x10"
    pci.close()
    assert plat.mmio_bus.read(base, 1) == b"\xff"
