"""CMOS real-time clock (MC146818) on ports 0x70/0x71, reading the host's UTC time.

Only what guests read at boot: the time and date registers in BCD, 24-hour
mode (status B = 0x02), status A with no update in progress, status D "RAM
valid", and the memory-size bytes firmware conventionally stores (0x30/0x31
extended memory in KiB, 0x34/0x35 memory above 16 MiB in 64 KiB units,
0x5b-0x5d memory above 4 GiB in 64 KiB units). Writes land in the CMOS RAM
except for the clock registers, which always follow the host.
"""

from __future__ import annotations

import threading
import time

from appliance.kvm import layout

REG_SECONDS = 0x00
REG_MINUTES = 0x02
REG_HOURS = 0x04
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_STATUS_A = 0x0A
REG_STATUS_B = 0x0B
REG_STATUS_C = 0x0C
REG_STATUS_D = 0x0D
REG_CENTURY = 0x32

STATUS_B_24H = 0x02
STATUS_D_VRT = 0x80


def _bcd(n: int) -> int:
    return ((n // 10) << 4) | (n % 10)


class Rtc:
    """A CMOS RTC (2 ports: index, data)."""

    def __init__(self, mem_size: int = 0, *, localtime: bool = False) -> None:
        # QEMU's -rtc base=localtime: the clock shows the host's local time (Windows guests want it).
        self._now = time.localtime if localtime else time.gmtime
        self._lock = threading.Lock()
        self._index = 0
        self._ram = bytearray(128)
        self._ram[REG_STATUS_A] = 0x26   # 32.768 kHz base, 1024 Hz rate, UIP clear
        self._ram[REG_STATUS_B] = STATUS_B_24H
        self._ram[REG_STATUS_D] = STATUS_D_VRT
        low = min(mem_size, layout.MMIO_HOLE_START)
        ext_kib = min(max(low - layout.MiB, 0) // layout.KiB, 0xFFFF)
        self._ram[0x30], self._ram[0x31] = ext_kib & 0xFF, ext_kib >> 8
        above16 = min(max(low - 16 * layout.MiB, 0) // (64 * layout.KiB), 0xFFFF)
        self._ram[0x34], self._ram[0x35] = above16 & 0xFF, above16 >> 8
        high = max(mem_size - low, 0) // (64 * layout.KiB)
        self._ram[0x5B], self._ram[0x5C], self._ram[0x5D] = high & 0xFF, (high >> 8) & 0xFF, (high >> 16) & 0xFF

    def _clock(self, reg: int) -> int | None:
        t = self._now()
        value = {
            REG_SECONDS: t.tm_sec,
            REG_MINUTES: t.tm_min,
            REG_HOURS: t.tm_hour,
            REG_WEEKDAY: (t.tm_wday + 1) % 7 + 1,   # 1 = Sunday
            REG_DAY: t.tm_mday,
            REG_MONTH: t.tm_mon,
            REG_YEAR: t.tm_year % 100,
            REG_CENTURY: t.tm_year // 100,
        }.get(reg)
        return None if value is None else _bcd(value)

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0 or size != 1:
            return b"\xff" * size
        with self._lock:
            reg = self._index
            value = self._clock(reg)
            if value is None:
                value = self._ram[reg]
                if reg == REG_STATUS_C:
                    self._ram[reg] = 0   # reading C acknowledges its flags
        return bytes([value])

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 1:
            return
        with self._lock:
            if offset == 0:
                # Bit 7 is the NMI mask on PCs, not part of the index.
                self._index = data[0] & 0x7F
            elif self._clock(self._index) is None and self._index not in (REG_STATUS_C, REG_STATUS_D):
                self._ram[self._index] = data[0]
