"""i8042 reset line, CMOS RTC, ACPI PM1a registers and the reset register."""

from __future__ import annotations

import struct
import time

import pytest

from appliance.devices import acpi_pm
from appliance.devices.i8042 import I8042
from appliance.devices.rtc import Rtc
from appliance.kvm import layout


def test_i8042_reset_command_pulls_reset_line() -> None:
    resets: list[int] = []
    kbd = I8042(lambda: resets.append(1))
    kbd.command_port.write(0, b"\xfe")
    assert resets == [1]


def test_i8042_self_test_and_config_byte_round_trip() -> None:
    kbd = I8042(lambda: None)
    kbd.command_port.write(0, b"\xaa")
    assert kbd.command_port.read(0, 1)[0] & 0x01
    assert kbd.data_port.read(0, 1) == b"\x55"
    kbd.command_port.write(0, b"\x60")
    kbd.data_port.write(0, b"\x45")
    kbd.command_port.write(0, b"\x20")
    assert kbd.data_port.read(0, 1) == b"\x45"
    assert not kbd.command_port.read(0, 1)[0] & 0x01


def _cmos(rtc: Rtc, reg: int) -> int:
    rtc.write(0, bytes([reg]))
    return rtc.read(1, 1)[0]


def test_rtc_reports_host_utc_time_in_bcd() -> None:
    rtc = Rtc(256 * layout.MiB)
    t = time.gmtime()
    year = _cmos(rtc, 0x09)
    assert (year >> 4) * 10 + (year & 0xF) == t.tm_year % 100
    assert _cmos(rtc, 0x0B) & 0x02      # 24-hour mode
    assert not _cmos(rtc, 0x0B) & 0x04  # BCD
    assert _cmos(rtc, 0x0D) & 0x80
    hours = _cmos(rtc, 0x04)
    assert (hours >> 4) * 10 + (hours & 0xF) in (t.tm_hour, (t.tm_hour + 1) % 24)


def test_rtc_base_localtime_shows_the_hosts_local_hour(monkeypatch: pytest.MonkeyPatch) -> None:
    # A zone far from UTC, so the two hours differ.
    monkeypatch.setenv("TZ", "IST-5:30")  # POSIX form: needs no zoneinfo files
    time.tzset()
    try:
        local, utc = Rtc(localtime=True), Rtc()

        def hours(rtc: Rtc) -> int:
            h = _cmos(rtc, 0x04)
            return (h >> 4) * 10 + (h & 0xF)

        # 5:30 ahead: the hours differ by 5 or 6 whatever the minute.
        assert (hours(local) - hours(utc)) % 24 in (5, 6)
        assert hours(local) in (time.localtime().tm_hour, (time.localtime().tm_hour + 1) % 24)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_rtc_memory_size_bytes_follow_guest_ram() -> None:
    rtc = Rtc(256 * layout.MiB)
    above16 = _cmos(rtc, 0x34) | _cmos(rtc, 0x35) << 8
    assert above16 * 64 * layout.KiB == 240 * layout.MiB


def test_rtc_index_ignores_nmi_mask_bit() -> None:
    rtc = Rtc()
    rtc.write(0, bytes([0x80 | 0x0D]))
    assert rtc.read(1, 1)[0] & 0x80


class Pm:
    def __init__(self) -> None:
        self.poweroffs = 0
        self.sci: list[bool] = []
        self.pm = acpi_pm.AcpiPm(self._off, self.sci.append)

    def _off(self) -> None:
        self.poweroffs += 1


def test_s5_with_slp_en_powers_off() -> None:
    p = Pm()
    p.pm.write(acpi_pm.PM1_CNT, struct.pack("<H", (layout.S5_SLP_TYP << 10) | acpi_pm.SLP_EN))
    assert p.poweroffs == 1


def test_slp_typ_without_slp_en_or_other_state_does_not_power_off() -> None:
    p = Pm()
    p.pm.write(acpi_pm.PM1_CNT, struct.pack("<H", layout.S5_SLP_TYP << 10))
    p.pm.write(acpi_pm.PM1_CNT, struct.pack("<H", (1 << 10) | acpi_pm.SLP_EN))
    assert p.poweroffs == 0
    # SLP_EN reads back as zero.
    assert struct.unpack("<H", p.pm.read(acpi_pm.PM1_CNT, 2))[0] & acpi_pm.SLP_EN == 0


def test_s5_written_bytewise_powers_off() -> None:
    p = Pm()
    value = (layout.S5_SLP_TYP << 10) | acpi_pm.SLP_EN
    p.pm.write(acpi_pm.PM1_CNT, bytes([value & 0xFF]))
    p.pm.write(acpi_pm.PM1_CNT + 1, bytes([value >> 8]))
    assert p.poweroffs == 1


def test_power_button_raises_sci_only_when_enabled_and_clears_on_write_one() -> None:
    p = Pm()
    p.pm.press_power_button()
    assert p.sci == []
    assert struct.unpack("<H", p.pm.read(acpi_pm.PM1_STS, 2))[0] & acpi_pm.PWRBTN_STS
    p.pm.write(acpi_pm.PM1_EN, struct.pack("<H", acpi_pm.PWRBTN_EN))
    assert p.sci == [True]
    p.pm.write(acpi_pm.PM1_STS, struct.pack("<H", acpi_pm.PWRBTN_STS))
    assert p.sci == [True, False]


def test_pm_timer_counts_at_3_58_mhz() -> None:
    p = Pm()
    t0 = time.monotonic()
    a = struct.unpack("<I", p.pm.read(acpi_pm.PM_TMR, 4))[0]
    t1 = time.monotonic()
    time.sleep(0.05)
    t2 = time.monotonic()
    b = struct.unpack("<I", p.pm.read(acpi_pm.PM_TMR, 4))[0]
    t3 = time.monotonic()
    if t3 - t0 > 4.0:
        pytest.skip("the machine is too loaded to time a 24-bit counter")
    ticks = (b - a) & acpi_pm.PM_TIMER_MASK
    slack = 0.002 * acpi_pm.PM_TIMER_HZ
    assert (t2 - t1) * acpi_pm.PM_TIMER_HZ - slack <= ticks <= (t3 - t0) * acpi_pm.PM_TIMER_HZ + slack
    assert b <= acpi_pm.PM_TIMER_MASK


def test_reset_register_resets_on_value_6_only() -> None:
    resets: list[int] = []
    reg = acpi_pm.ResetRegister(lambda: resets.append(1))
    reg.write(0, b"\x02")
    assert resets == []
    reg.write(0, bytes([layout.RESET_VALUE]))
    assert resets == [1]
