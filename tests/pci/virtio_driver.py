"""A modern virtio-pci driver for tests, speaking only through config ports and MMIO.

It walks the capability list as Linux's virtio_pci_modern does, then runs the
§3.1.1 initialisation sequence one register at a time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.kvm.memory import GuestMemory
from appliance.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)
from appliance.virtio.testing import DriverQueue
from tests.pci.fakes import GuestPci

MSG_ADDR = 0xFEE0_0000


@dataclass
class Caps:
    common: int = 0
    notify: int = 0
    multiplier: int = 0
    isr: int = 0
    device: int = 0
    pci_cfg: int = 0


class ModernDriver:
    def __init__(self, guest: GuestPci, slot: int) -> None:
        self.g = guest
        self.slot = slot
        self.caps = Caps()
        for cid, at in guest.caps(slot):
            if cid == 0x11:
                self.msix_cap = at
            if cid != 0x09:
                continue
            cfg_type = guest.cfg_read(slot, at + 3, 1)
            bar = guest.cfg_read(slot, at + 4, 1)
            offset = guest.cfg_read(slot, at + 8)
            if cfg_type == 5:
                self.caps.pci_cfg = at
                continue
            addr = guest.bar(slot, bar) + offset
            if cfg_type == 1:
                self.caps.common = addr
            elif cfg_type == 2:
                self.caps.notify = addr
                self.caps.multiplier = guest.cfg_read(slot, at + 16)
            elif cfg_type == 3:
                self.caps.isr = addr
            elif cfg_type == 4:
                self.caps.device = addr
        table_bir = guest.cfg_read(slot, self.msix_cap + 4)
        self.msix_table = guest.bar(slot, table_bir & 7) + (table_bir & ~7)

    # -- registers -----------------------------------------------------------------

    def rd(self, off: int, size: int) -> int:
        return self.g.mmio_read(self.caps.common + off, size)

    def wr(self, off: int, value: int, size: int) -> None:
        self.g.mmio_write(self.caps.common + off, value, size)

    @property
    def status(self) -> int:
        return self.rd(0x14, 1)

    def set_status(self, bits: int) -> None:
        self.wr(0x14, bits, 1)

    def reset(self, timeout: float = 5.0) -> None:
        self.set_status(0)
        deadline = time.monotonic() + timeout
        while self.status != 0:
            if time.monotonic() > deadline:
                raise TimeoutError("device did not finish its reset")
            time.sleep(0.001)

    def device_features(self) -> int:
        self.wr(0x00, 0, 4)
        low = self.rd(0x04, 4)
        self.wr(0x00, 1, 4)
        return self.rd(0x04, 4) << 32 | low

    def set_driver_features(self, features: int) -> None:
        self.wr(0x08, 0, 4)
        self.wr(0x0C, features & 0xFFFF_FFFF, 4)
        self.wr(0x08, 1, 4)
        self.wr(0x0C, features >> 32, 4)

    def negotiate(self, features: int) -> bool:
        self.reset()
        self.set_status(STATUS_ACKNOWLEDGE)
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        self.set_driver_features(features)
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        return bool(self.status & STATUS_FEATURES_OK)

    def enable_msix(self, vectors: Sequence[int]) -> None:
        self.g.cfg_write(self.slot, self.msix_cap + 2, 0x8000, 2)
        for v in vectors:
            entry = self.msix_table + 16 * v
            self.g.mmio_write(entry, MSG_ADDR, 4)
            self.g.mmio_write(entry + 4, 0, 4)
            self.g.mmio_write(entry + 8, 0x40 + v, 4)
            self.g.mmio_write(entry + 12, 0, 4)

    def setup_queue(self, index: int, q: DriverQueue, vector: int | None) -> None:
        self.wr(0x16, index, 2)
        assert self.rd(0x18, 2) >= q.size
        self.wr(0x18, q.size, 2)
        if vector is not None:
            self.wr(0x1A, vector, 2)
            assert self.rd(0x1A, 2) == vector
        # 64-bit fields written as two dwords, as Linux's vp_iowrite64_twopart does.
        for off, addr in ((0x20, q.desc_addr), (0x28, q.avail_addr), (0x30, q.used_addr)):
            self.wr(off, addr & 0xFFFF_FFFF, 4)
            self.wr(off + 4, addr >> 32, 4)
        self.wr(0x1C, 1, 2)

    def driver_ok(self) -> None:
        self.set_status(self.status | STATUS_DRIVER_OK)

    def notify_addr(self, index: int) -> int:
        self.wr(0x16, index, 2)
        return self.caps.notify + self.rd(0x1E, 2) * self.caps.multiplier

    def kick(self, index: int) -> None:
        self.g.doorbell(self.notify_addr(index), index)


def lay_out_queue(mem: GuestMemory, base: int, size: int) -> DriverQueue:
    return DriverQueue.at(mem, base, size, event_idx=False, indirect=True)
