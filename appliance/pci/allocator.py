"""Where devices go: slots on bus 0 and BAR addresses in the PCI window.

Slots are stable: devices with ``addr=`` get exactly that slot, the others
take the lowest free slots in command-line order (explicit addresses are
reserved first, so an ``addr=`` later on the line never collides with an
automatic choice made earlier). QEMU writes PCI addresses as hex ``slot[.fn]``.
BARs are placed bottom-up in the window the DSDT announces, each aligned to
its size (and to at least a page, so no two devices share a page).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from appliance.kvm import layout
from appliance.pci.errors import BarSpaceError, SlotError

MAX_SLOT = 31
MAX_FUNCTION = 7
PAGE = 4096


class PciAddress(NamedTuple):
    """A device/function on bus 0."""

    slot: int
    function: int = 0

    @property
    def devfn(self) -> int:
        return self.slot << 3 | self.function

    def __str__(self) -> str:
        return f"{self.slot:02x}.{self.function:x}"


def parse_pci_address(text: str) -> PciAddress:
    """Parse QEMU's ``addr=`` value: ``slot[.function]`` in hex (``0x5``, ``05.0``, ``1f``).

    :raises SlotError: When the text is not an address or is out of range.
    """
    slot_text, dot, func_text = text.strip().partition(".")
    try:
        slot = int(slot_text, 16)
        function = int(func_text, 16) if dot else 0
    except ValueError:
        raise SlotError(f"invalid PCI address '{text}'") from None
    if slot_text.startswith("-") or func_text.startswith("-"):
        raise SlotError(f"invalid PCI address '{text}'")
    if not 0 <= slot <= MAX_SLOT or not 0 <= function <= MAX_FUNCTION:
        raise SlotError(f"PCI address '{text}' is out of range (slot 0-1f, function 0-7)")
    return PciAddress(slot, function)


def plan_slots(
    requests: Sequence[PciAddress | None], *, taken: Sequence[PciAddress] = (PciAddress(0, 0),)
) -> list[PciAddress]:
    """Give every device an address; ``None`` means "the next free slot".

    :param requests: one entry per device, in command-line order.
    :param taken: addresses already in use (the host bridge at 00.0).
    :raises SlotError: When two devices ask for one address, or the bus is full.
    """
    used = set(taken)
    for want in requests:
        if want is None:
            continue
        if want in used:
            raise SlotError(f"PCI address {want} is already in use")
        used.add(want)
    used_slots = {a.slot for a in used}
    out: list[PciAddress] = []
    next_slot = 0
    for want in requests:
        if want is not None:
            out.append(want)
            continue
        while next_slot <= MAX_SLOT and next_slot in used_slots:
            next_slot += 1
        if next_slot > MAX_SLOT:
            raise SlotError("no free PCI slot is left on bus 0")
        used_slots.add(next_slot)
        out.append(PciAddress(next_slot, 0))
    return out


class BarAllocator:
    """Bottom-up placement of memory BARs in ``[start, end)``."""

    def __init__(self, start: int = layout.PCI_MMIO_START, end: int = layout.PCI_MMIO_END) -> None:
        self.start = start
        self.end = end
        self._next = start

    def allocate(self, size: int) -> int:
        """An address aligned to ``size`` for a BAR of ``size`` bytes.

        :raises BarSpaceError: When the window has no room left.
        """
        align = max(size, PAGE)
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise BarSpaceError(
                f"PCI memory window {self.start:#x}-{self.end:#x} has no room for a "
                f"{size:#x}-byte BAR"
            )
        self._next = addr + size
        return addr
