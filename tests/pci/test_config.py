"""Config space semantics: masks, BAR sizing, capability list, config mechanism #1."""

from __future__ import annotations

import pytest

from appliance.pci.bus import PciBus
from appliance.pci.config import BarKind, ConfigSpace
from appliance.pci.device import PciDevice
from tests.pci.fakes import FakePlatform, GuestPci


def make_space() -> ConfigSpace:
    return ConfigSpace(vendor_id=0x1234, device_id=0x5678, class_code=0x020000, revision=3,
                       subsystem_vendor_id=0xAAAA, subsystem_id=0xBBBB)


def test_ids_and_class_are_read_only() -> None:
    cs = make_space()
    cs.write(0x00, 4, 0xFFFF_FFFF)
    cs.write(0x08, 4, 0xFFFF_FFFF)
    cs.write(0x2C, 4, 0)
    assert cs.read(0x00, 4) == 0x5678_1234
    assert cs.read(0x08, 4) == 0x0200_0003
    assert cs.read(0x2C, 4) == 0xBBBB_AAAA


def test_command_register_keeps_only_writable_bits() -> None:
    cs = make_space()
    cs.write(0x04, 2, 0xFFFF)
    assert cs.read(0x04, 2) == 0x0547


def test_status_error_bits_are_write_one_to_clear() -> None:
    cs = make_space()
    cs.set_u16(0x06, 0x8000 | 0x2000 | 0x10)
    cs.write(0x06, 2, 0x8000)
    assert cs.read(0x06, 2) == 0x2010
    cs.write(0x06, 2, 0x0010)  # capability-list bit is read-only
    assert cs.read(0x06, 2) == 0x2010


@pytest.mark.parametrize("offset,size", [(256, 4), (254, 4), (-1, 1), (0, 3), (0, 8), (0, 0)])
def test_out_of_range_or_odd_accesses_read_all_ones_and_write_nothing(offset: int, size: int) -> None:
    cs = make_space()
    before = bytes(cs.read(i, 1) for i in range(256))
    assert cs.read(offset, size) == (1 << (8 * max(0, min(size, 8)))) - 1
    cs.write(offset, size, 0)
    assert bytes(cs.read(i, 1) for i in range(256)) == before


def test_unaligned_in_range_accesses_work() -> None:
    cs = make_space()
    assert cs.read(0x01, 2) == 0x7812
    assert cs.read(0x3D, 1) == 0


def test_64bit_bar_sizing_probe_returns_size_mask_and_flags() -> None:
    cs = make_space()
    cs.add_bar(_bar(4, 0x4000, BarKind.MEM64))
    cs.write(0x20, 4, 0xFFFF_FFFF)
    cs.write(0x24, 4, 0xFFFF_FFFF)
    assert cs.read(0x20, 4) == 0xFFFF_C004
    assert cs.read(0x24, 4) == 0xFFFF_FFFF
    cs.write(0x20, 4, 0xC000_0000)
    cs.write(0x24, 4, 0x1)
    assert cs.bar_address(4) == 0x1_C000_0000


def test_32bit_prefetchable_and_io_bars_probe() -> None:
    cs = make_space()
    cs.add_bar(_bar(0, 0x1000, BarKind.MEM32, prefetchable=True))
    cs.add_bar(_bar(1, 0x20, BarKind.IO))
    cs.write(0x10, 4, 0xFFFF_FFFF)
    cs.write(0x14, 4, 0xFFFF_FFFF)
    assert cs.read(0x10, 4) == 0xFFFF_F008
    assert cs.read(0x14, 4) == 0xFFFF_FFE1
    assert cs.read(0x18, 4) == 0  # no BAR 2: reads 0, not writable
    cs.write(0x18, 4, 0xFFFF_FFFF)
    assert cs.read(0x18, 4) == 0


def test_bar_declarations_are_checked() -> None:
    cs = make_space()
    with pytest.raises(ValueError):
        cs.add_bar(_bar(5, 0x1000, BarKind.MEM64))  # needs two registers
    with pytest.raises(ValueError):
        cs.add_bar(_bar(0, 0x1800, BarKind.MEM32))
    cs.add_bar(_bar(0, 0x1000, BarKind.MEM64))
    with pytest.raises(ValueError):
        cs.add_bar(_bar(1, 0x1000, BarKind.MEM32))  # upper half of BAR 0


def test_capability_chain_walks_in_order() -> None:
    cs = make_space()
    a = cs.add_capability(0x09, b"\x10" + bytes(13))
    b = cs.add_capability(0x11, bytes(10))
    c = cs.add_capability(0x09, b"\x14" + bytes(17))
    assert cs.capabilities() == [(0x09, a), (0x11, b), (0x09, c)]
    assert cs.read(0x06, 2) & 0x10
    assert a == 0x40 and b % 4 == 0 and c % 4 == 0


def test_host_bridge_and_missing_functions_over_cf8() -> None:
    plat = FakePlatform()
    guest = GuestPci(PciBus(plat.mmio_bus), plat)
    assert guest.cfg_read(0, 0x00) == 0x29C0_8086
    assert guest.cfg_read(0, 0x0A, 2) == 0x0600
    assert guest.cfg_read(3, 0x00) == 0xFFFF_FFFF
    guest.ports.write(0xCF8, (0x0001_0000 | 1 << 31).to_bytes(4, "little"))  # bus 1
    assert guest.ports.read(0xCFC, 4) == b"\xff" * 4
    guest.ports.write(0xCF8, (0).to_bytes(4, "little"))  # enable bit clear
    assert guest.ports.read(0xCFC, 2) == b"\xff\xff"


def test_config_address_latch_reads_back_and_cf9_reaches_reset_hook() -> None:
    plat = FakePlatform()
    pci = PciBus(plat.mmio_bus)
    seen: list[int] = []
    pci.on_reset_port = seen.append
    guest = GuestPci(pci, plat)
    guest.ports.write(0xCF8, (0x8000_0813).to_bytes(4, "little"))
    assert guest.ports.read(0xCF8, 4) == (0x8000_0810).to_bytes(4, "little")
    guest.ports.write(0xCF9, b"\x06")
    assert seen == [0x06]
    assert guest.ports.read(0xCF8, 4) == (0x8000_0810).to_bytes(4, "little")


def test_byte_and_word_accesses_through_cfc_offsets() -> None:
    plat = FakePlatform()
    guest = GuestPci(PciBus(plat.mmio_bus), plat)
    assert guest.cfg_read(0, 0x02, 2) == 0x29C0
    assert guest.cfg_read(0, 0x01, 1) == 0x80
    guest.cfg_write(0, 0x3C, 0x0B, 1)
    assert guest.cfg_read(0, 0x3C, 1) == 0x0B


class Dummy(PciDevice):
    def __init__(self) -> None:
        super().__init__("dummy", vendor_id=0x1234, device_id=0x1, class_code=0xFF0000)
        self.add_bar(0, 0x1000, kind=BarKind.MEM64)
        self.writes: list[tuple[int, bytes]] = []
        self.moves: list[tuple[int | None, int | None]] = []

    def read_bar(self, index: int, offset: int, size: int) -> bytes:
        return bytes([index + 0x10]) * size

    def write_bar(self, index: int, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        self.moves.append((old, new))


def test_bar_is_placed_mapped_and_follows_guest_rewrites() -> None:
    plat = FakePlatform()
    pci = PciBus(plat.mmio_bus)
    dev = Dummy()
    addr = pci.add(dev)
    guest = GuestPci(pci, plat)
    base = guest.bar(addr.slot, 0)
    assert 0xC000_0000 <= base < 0xFC00_0000 and base % 0x1000 == 0
    assert guest.cfg_read(addr.slot, 0x04, 2) & 0x2
    assert guest.mmio_read(base + 8, 4) == 0x1010_1010
    guest.mmio_write(base + 4, 7, 4)
    assert dev.writes == [(4, b"\x07\0\0\0")]

    # Linux-style sizing with decode off, then a move.
    guest.cfg_write(addr.slot, 0x04, 0, 2)
    assert plat.mmio_bus.read(base, 4) == b"\xff" * 4
    guest.cfg_write(addr.slot, 0x10, 0xFFFF_FFFF)
    assert guest.cfg_read(addr.slot, 0x10) == 0xFFFF_F004
    guest.cfg_write(addr.slot, 0x10, 0xD000_0000)
    guest.cfg_write(addr.slot, 0x04, 0x2, 2)
    assert guest.mmio_read(0xD000_0000, 1) == 0x10
    assert plat.mmio_bus.read(base, 1) == b"\xff"
    assert dev.moves == [(None, base), (base, None), (None, 0xD000_0000)]


def test_bar_moved_onto_another_device_is_not_decoded() -> None:
    plat = FakePlatform()
    pci = PciBus(plat.mmio_bus)
    a, b = Dummy(), Dummy()
    sa, sb = pci.add(a), pci.add(b)
    guest = GuestPci(pci, plat)
    base_a = guest.bar(sa.slot, 0)
    guest.cfg_write(sb.slot, 0x10, base_a)
    assert guest.mmio_read(base_a, 1) == 0x10
    assert b.bar_address(0) is None
    assert a.bar_address(0) == base_a


def _bar(index: int, size: int, kind: BarKind, prefetchable: bool = False):  # type: ignore[no-untyped-def]
    from appliance.pci.config import Bar

    return Bar(index, size, kind, prefetchable)


def test_ecam_window_reaches_the_same_config_space() -> None:
    from appliance.pci.bus import ECAM_BUS_SPAN

    plat = FakePlatform()
    pci = PciBus(plat.mmio_bus)
    dev = Dummy()
    slot = pci.add(dev).slot
    base = 0xB000_0000
    plat.mmio_bus.register(base, ECAM_BUS_SPAN, pci.ecam())
    guest = GuestPci(pci, plat)
    assert guest.mmio_read(base, 4) == 0x29C0_8086
    fn = base + (slot << 15)
    assert guest.mmio_read(fn, 4) == 0x0001_1234
    guest.mmio_write(fn + 0x3C, 0x0A, 1)
    assert guest.cfg_read(slot, 0x3C, 1) == 0x0A
    assert guest.mmio_read(fn + 0x100, 4) == 0  # extended space of a conventional function
    assert guest.mmio_read(base + (7 << 15), 4) == 0xFFFF_FFFF
