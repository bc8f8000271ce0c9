"""Guest-driven register sequences never raise, and interrupt lines only ever toggle."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.devices import acpi_pm
from appliance.devices.i8042 import I8042
from appliance.devices.rtc import Rtc
from appliance.devices.uart16550 import LSR, LSR_DR, Uart16550

op = st.tuples(
    st.sampled_from(["r", "w", "rx"]),
    st.integers(0, 15),
    st.sampled_from([1, 2, 4]),
    st.binary(min_size=0, max_size=8),
)


def _toggles(levels: list[bool]) -> bool:
    return all(a != b for a, b in zip(levels, levels[1:], strict=False)) and (not levels or levels[0])


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=60))
def test_uart_survives_any_access_sequence(ops: list[tuple[str, int, int, bytes]]) -> None:
    irq: list[bool] = []
    out = bytearray()
    uart = Uart16550(irq.append, out.extend)
    for kind, off, size, data in ops:
        off &= 7
        if kind == "r":
            assert len(uart.read(off, size)) == size
        elif kind == "w":
            uart.write(off, data[:size] or b"\0")
        else:
            uart.receive(data)
    assert _toggles(irq)
    lsr = uart.read(LSR, 1)[0]
    assert bool(lsr & LSR_DR) == (uart.rx_room() < 4096)


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=60))
def test_pm_rtc_i8042_survive_any_access_sequence(ops: list[tuple[str, int, int, bytes]]) -> None:
    sci: list[bool] = []
    events: list[str] = []
    pm = acpi_pm.AcpiPm(lambda: events.append("off"), sci.append)
    rtc = Rtc(64 << 20)
    kbd = I8042(lambda: events.append("reset"))
    for kind, off, size, data in ops:
        payload = data[:size] or b"\0"
        if kind == "r":
            assert len(pm.read(off % acpi_pm.BLOCK_SIZE, size)) == size
            assert len(rtc.read(off & 1, size)) == size
            assert len(kbd.command_port.read(0, size)) == size
        elif kind == "w":
            pm.write(off % acpi_pm.BLOCK_SIZE, payload)
            rtc.write(off & 1, payload)
            kbd.data_port.write(0, payload)
        else:
            pm.press_power_button()
            kbd.command_port.write(0, payload)
    assert _toggles(sci)
