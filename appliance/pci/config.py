"""Type-0 PCI configuration space: 256 bytes plus what the guest may change.

Every byte has a write mask (bits the guest may set or clear) and a
write-one-to-clear mask (status error bits). BAR registers get their masks from
the BAR size, which is what makes the standard sizing probe work with no
special case: writing all ones leaves exactly the address bits the size allows,
so the guest reads back ``~(size - 1)`` plus the read-only flag bits (PCI Local
Bus 3.0 §6.2.5.1). Capabilities form a linked list from offset 0x34 (§6.7).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

CONFIG_SIZE = 256

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG_IF = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_PARITY = 1 << 6
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
_COMMAND_WRITABLE = (
    COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_PARITY | COMMAND_SERR
    | COMMAND_INTX_DISABLE
)
STATUS_CAP_LIST = 1 << 4
# Master/target abort, parity and SERR bits are cleared by writing one.
_STATUS_W1C = 0xF900

HEADER_MULTIFUNCTION = 0x80
FIRST_CAPABILITY = 0x40

CAP_ID_VENDOR = 0x09
CAP_ID_MSIX = 0x11


class BarKind(enum.Enum):
    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


@dataclass(frozen=True, slots=True)
class Bar:
    """A base address register's fixed shape; its address lives in config space."""

    index: int
    size: int
    kind: BarKind = BarKind.MEM64
    prefetchable: bool = False

    @property
    def flags(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.kind is BarKind.IO:
            return 0x1
        bits = 0x4 if self.kind is BarKind.MEM64 else 0x0
        return bits | (0x8 if self.prefetchable else 0)


class ConfigSpace:
    """The 256-byte type-0 header and capability area of one PCI function."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        header_type: int = 0,
    ) -> None:
        self._data = bytearray(CONFIG_SIZE)
        self._wmask = bytearray(CONFIG_SIZE)
        self._w1c = bytearray(CONFIG_SIZE)
        self.bars: list[Bar | None] = [None] * 6
        self._next_cap_link = CAPABILITIES_POINTER
        self._next_free = FIRST_CAPABILITY
        self.set_u16(VENDOR_ID, vendor_id)
        self.set_u16(DEVICE_ID, device_id)
        self.set_u8(REVISION_ID, revision)
        self.set_u8(CLASS_PROG_IF, class_code & 0xFF)
        self.set_u16(CLASS_PROG_IF + 1, class_code >> 8 & 0xFFFF)
        self.set_u8(HEADER_TYPE, header_type)
        self.set_u16(SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self.set_u16(SUBSYSTEM_ID, subsystem_id)
        self.set_wmask(COMMAND, 2, _COMMAND_WRITABLE)
        self.set_w1c(STATUS, 2, _STATUS_W1C)
        self.set_wmask(CACHE_LINE_SIZE, 1, 0xFF)
        self.set_wmask(LATENCY_TIMER, 1, 0xFF)
        self.set_wmask(INTERRUPT_LINE, 1, 0xFF)

    # -- device-side setters (ignore the guest masks) --------------------------

    def set_bytes(self, offset: int, data: bytes) -> None:
        self._data[offset : offset + len(data)] = data

    def set_u8(self, offset: int, value: int) -> None:
        self._data[offset] = value & 0xFF

    def set_u16(self, offset: int, value: int) -> None:
        self._data[offset : offset + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def set_u32(self, offset: int, value: int) -> None:
        self._data[offset : offset + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self._data[offset : offset + size], "little")

    def set_wmask(self, offset: int, size: int, mask: int) -> None:
        self._wmask[offset : offset + size] = mask.to_bytes(size, "little")

    def set_w1c(self, offset: int, size: int, mask: int) -> None:
        self._w1c[offset : offset + size] = mask.to_bytes(size, "little")

    # -- guest accesses ---------------------------------------------------------

    @staticmethod
    def valid_access(offset: int, size: int) -> bool:
        return size in (1, 2, 4) and 0 <= offset and offset + size <= CONFIG_SIZE

    def read(self, offset: int, size: int) -> int:
        """A guest read; anything outside the space reads as all ones."""
        if not self.valid_access(offset, size):
            return (1 << (8 * max(0, min(size, 8)))) - 1
        return self.get(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write through the masks; invalid accesses are dropped."""
        if not self.valid_access(offset, size):
            return
        for i in range(size):
            byte = value >> (8 * i) & 0xFF
            at = offset + i
            wmask = self._wmask[at]
            new = (self._data[at] & ~wmask) | (byte & wmask)
            self._data[at] = new & ~(byte & self._w1c[at]) & 0xFF

    # -- BARs --------------------------------------------------------------------

    def add_bar(self, bar: Bar) -> None:
        """Declare a BAR; its address starts at 0 (unassigned).

        :raises ValueError: When the size is not a power of two, the slot is taken,
            or a 64-bit BAR would not fit in two registers.
        """
        minimum = 4 if bar.kind is BarKind.IO else 16
        if bar.size < minimum or bar.size & (bar.size - 1):
            raise ValueError(f"BAR size {bar.size:#x} is not a power of two >= {minimum}")
        width = 2 if bar.kind is BarKind.MEM64 else 1
        if bar.size > 0xFFFF_FFFF + 1 and width == 1:
            raise ValueError("a 32-bit BAR cannot exceed 4 GiB")
        if not 0 <= bar.index <= 6 - width or any(
            self.bar_of_register(BAR0 + 4 * i) is not None
            for i in range(bar.index, bar.index + width)
        ):
            raise ValueError(f"BAR {bar.index} is taken or out of range")
        self.bars[bar.index] = bar
        reg = BAR0 + 4 * bar.index
        low_flags = 0x3 if bar.kind is BarKind.IO else 0xF
        mask = ~(bar.size - 1) & ~low_flags & ((1 << (32 * width)) - 1)
        self.set_u32(reg, bar.flags)
        self.set_wmask(reg, 4, mask & 0xFFFF_FFFF)
        if width == 2:
            self.set_u32(reg + 4, 0)
            self.set_wmask(reg + 4, 4, mask >> 32)

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        if bar is None:
            return 0
        reg = BAR0 + 4 * index
        low = self.get(reg, 4)
        if bar.kind is BarKind.IO:
            return low & ~0x3
        addr = low & ~0xF
        if bar.kind is BarKind.MEM64:
            addr |= self.get(reg + 4, 4) << 32
        return addr

    def set_bar_address(self, index: int, addr: int) -> None:
        bar = self.bars[index]
        if bar is None or addr % bar.size:
            raise ValueError(f"BAR {index} cannot be placed at {addr:#x}")
        reg = BAR0 + 4 * index
        self.set_u32(reg, (addr & 0xFFFF_FFFF) | bar.flags)
        if bar.kind is BarKind.MEM64:
            self.set_u32(reg + 4, addr >> 32)

    def bar_of_register(self, offset: int) -> int | None:
        """Index of the BAR whose register(s) cover config byte ``offset``."""
        if not BAR0 <= offset < BAR0 + 24:
            return None
        reg = (offset - BAR0) // 4
        for bar in self.bars:
            if bar is None:
                continue
            width = 2 if bar.kind is BarKind.MEM64 else 1
            if bar.index <= reg < bar.index + width:
                return bar.index
        return None

    # -- capabilities -------------------------------------------------------------

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability (``body`` follows the id and next bytes).

        :returns: the capability's config-space offset.
        :raises ValueError: When the capability area is full.
        """
        length = 2 + len(body)
        offset = self._next_free
        if offset + length > CONFIG_SIZE:
            raise ValueError("PCI capability area is full")
        self._data[offset] = cap_id
        self._data[offset + 1] = 0
        self._data[offset + 2 : offset + length] = body
        if wmask is not None:
            self._wmask[offset + 2 : offset + 2 + len(wmask)] = wmask
        self._data[self._next_cap_link] = offset
        self._next_cap_link = offset + 1
        self._next_free = (offset + length + 3) & ~3
        self.set_u16(STATUS, self.get(STATUS, 2) | STATUS_CAP_LIST)
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """``(id, offset)`` of each capability, walking the list as a driver would."""
        found: list[tuple[int, int]] = []
        seen: set[int] = set()
        at = self._data[CAPABILITIES_POINTER] & ~3
        while at and at not in seen and at + 2 <= CONFIG_SIZE:
            seen.add(at)
            found.append((self._data[at], at))
            at = self._data[at + 1] & ~3
        return found
