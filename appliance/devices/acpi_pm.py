"""ACPI fixed-hardware power management registers: PM1a event/control and the PM timer.

The FADT points the guest at PM1a_EVT_BLK (status + enable, 2 bytes each),
PM1a_CNT_BLK (2 bytes) and PM_TMR_BLK (4 bytes), laid out back to back from
``layout.PM_BASE`` (ACPI 6.5 §4.8.3). Writing SLP_TYP = S5 with SLP_EN set
powers the machine off; the power button sets PWRBTN_STS and raises the SCI
(level-triggered, IRQ 9) while enabled. The timer counts at 3.579545 MHz from
the host's monotonic clock (24 bits, as the FADT does not set TMR_VAL_EXT).

Also here: the reset register (``layout.RESET_PORT``, value 6 resets, as the
FADT's RESET_REG says).
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable

from appliance.kvm import layout

PM1_STS = 0
PM1_EN = 2
PM1_CNT = 4
PM_TMR = 8
BLOCK_SIZE = 12

TMR_STS = 1 << 0
PWRBTN_STS = 1 << 8
WAK_STS = 1 << 15
PWRBTN_EN = 1 << 8
SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13

PM_TIMER_HZ = 3_579_545
PM_TIMER_MASK = 0xFF_FFFF


class AcpiPm:
    """The PM1a event, control and timer blocks (12 ports from ``layout.PM_BASE``).

    :param on_poweroff: called (on a vCPU thread) when the guest enters S5.
    :param set_sci: drives the SCI line.
    """

    def __init__(self, on_poweroff: Callable[[], None], set_sci: Callable[[bool], None]) -> None:
        self._on_poweroff = on_poweroff
        self._set_sci = set_sci
        self._lock = threading.Lock()
        self._sts = 0
        self._en = 0
        self._cnt = 0
        self._sci = False
        self._t0 = time.monotonic_ns()

    def press_power_button(self) -> None:
        """What the front-panel button does: PWRBTN_STS, and an SCI if enabled."""
        with self._lock:
            self._sts |= PWRBTN_STS
            self._update_sci()

    def _timer(self) -> int:
        ns = time.monotonic_ns() - self._t0
        return (ns * PM_TIMER_HZ // 1_000_000_000) & PM_TIMER_MASK

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            regs = struct.pack("<HHHHI", self._sts, self._en, self._cnt, 0, self._timer())
        if offset + size > BLOCK_SIZE:
            return b"\xff" * size
        return regs[offset : offset + size]

    def write(self, offset: int, data: bytes) -> None:
        poweroff = False
        with self._lock:
            for i, byte in enumerate(data):
                reg = offset + i
                if reg in (PM1_STS, PM1_STS + 1):
                    # Status bits are write-one-to-clear (ACPI 6.5 §4.8.3.1).
                    self._sts &= ~(byte << (8 * (reg - PM1_STS)))
                elif reg in (PM1_EN, PM1_EN + 1):
                    shift = 8 * (reg - PM1_EN)
                    self._en = (self._en & ~(0xFF << shift)) | (byte << shift)
                elif reg in (PM1_CNT, PM1_CNT + 1):
                    shift = 8 * (reg - PM1_CNT)
                    self._cnt = (self._cnt & ~(0xFF << shift)) | (byte << shift)
            if self._cnt & SLP_EN:
                slp_typ = (self._cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT
                # SLP_EN is write-only and reads back as zero.
                self._cnt &= ~SLP_EN
                poweroff = slp_typ == layout.S5_SLP_TYP
            self._update_sci()
        if poweroff:
            self._on_poweroff()

    def _update_sci(self) -> None:
        level = bool(self._sts & self._en & PWRBTN_STS)
        if level != self._sci:
            self._sci = level
            self._set_sci(level)


class ResetRegister:
    """The reset control port: writing ``layout.RESET_VALUE`` resets the machine."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> bytes:
        return b"\x00" * size

    def write(self, offset: int, data: bytes) -> None:
        # Bit 2 starts the reset; bit 1 picks hard over soft, which is the same here.
        if data and data[0] & 0x04:
            self._on_reset()
