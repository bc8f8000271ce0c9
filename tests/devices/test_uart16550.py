"""16550 UART register behaviour as Linux's 8250 driver and the test guest use it."""

from __future__ import annotations

from appliance.devices import uart16550 as u


class Harness:
    def __init__(self) -> None:
        self.irq: list[bool] = []
        self.out = bytearray()
        self.drained = 0
        self.uart = u.Uart16550(self.irq.append, self.out.extend, self._drained)

    def _drained(self) -> None:
        self.drained += 1

    def rd(self, reg: int) -> int:
        return self.uart.read(reg, 1)[0]

    def wr(self, reg: int, value: int) -> None:
        self.uart.write(reg, bytes([value]))


def test_transmit_goes_to_output_and_thr_stays_empty() -> None:
    h = Harness()
    for b in b"hi\n":
        assert h.rd(u.LSR) & u.LSR_THRE
        h.wr(u.RBR_THR, b)
    assert bytes(h.out) == b"hi\n"
    assert h.rd(u.LSR) & (u.LSR_THRE | u.LSR_TEMT) == u.LSR_THRE | u.LSR_TEMT


def test_received_bytes_set_data_ready_and_raise_irq_when_enabled() -> None:
    h = Harness()
    h.wr(u.IER, u.IER_RDA)
    assert h.irq == []
    assert h.uart.receive(b"ab") == 2
    assert h.irq == [True]
    assert h.rd(u.LSR) & u.LSR_DR
    assert h.rd(u.IIR_FCR) & 0x0F == u.IIR_RDA
    assert h.rd(u.RBR_THR) == ord("a")
    assert h.rd(u.RBR_THR) == ord("b")
    assert not h.rd(u.LSR) & u.LSR_DR
    assert h.irq == [True, False]
    assert h.drained == 1


def test_out2_gates_the_interrupt_line() -> None:
    h = Harness()
    h.wr(u.MCR, 0)
    h.wr(u.IER, u.IER_RDA)
    h.uart.receive(b"x")
    assert h.irq == []
    h.wr(u.MCR, u.MCR_OUT2)
    assert h.irq == [True]


def test_enabling_thre_interrupt_fires_and_iir_read_clears_it() -> None:
    h = Harness()
    h.wr(u.IER, u.IER_THRE)
    assert h.irq == [True]
    assert h.rd(u.IIR_FCR) & 0x0F == u.IIR_THRE
    assert h.irq == [True, False]
    assert h.rd(u.IIR_FCR) & 0x0F == u.IIR_NONE
    h.wr(u.RBR_THR, ord("z"))
    assert h.irq == [True, False, True]


def test_divisor_latch_does_not_touch_data_or_ier() -> None:
    h = Harness()
    h.wr(u.LCR, u.LCR_DLAB | 0x03)
    h.wr(u.RBR_THR, 0x01)
    h.wr(u.IER, 0x00)
    assert (h.rd(u.RBR_THR), h.rd(u.IER)) == (0x01, 0x00)
    h.wr(u.LCR, 0x03)
    assert bytes(h.out) == b""
    assert h.rd(u.IER) == 0


def test_loopback_mirrors_modem_bits_and_tx_into_rx() -> None:
    """Linux's 8250 autoconfig writes MCR=LOOP|0x0A and expects MSR bits 0x90."""
    h = Harness()
    h.wr(u.MCR, u.MCR_LOOP | 0x0A)
    assert h.rd(u.MSR) & 0xF0 == 0x90
    h.wr(u.RBR_THR, 0x5A)
    assert bytes(h.out) == b""
    assert h.rd(u.RBR_THR) == 0x5A


def test_fifo_enable_shows_in_iir_and_clear_drops_rx() -> None:
    h = Harness()
    h.uart.receive(b"junk")
    h.wr(u.IIR_FCR, u.FCR_ENABLE | u.FCR_CLEAR_RX)
    assert h.rd(u.IIR_FCR) & 0xC0 == 0xC0
    assert not h.rd(u.LSR) & u.LSR_DR


def test_receive_is_bounded_and_reports_what_it_took() -> None:
    h = Harness()
    assert h.uart.receive(b"x" * (u.RX_CAPACITY + 10)) == u.RX_CAPACITY
    assert h.uart.receive(b"y") == 0
    assert h.uart.rx_room() == 0


def test_wide_accesses_read_as_ones_and_are_ignored() -> None:
    h = Harness()
    assert h.uart.read(0, 2) == b"\xff\xff"
    h.uart.write(0, b"ab")
    assert bytes(h.out) == b""


def test_input_poll_is_reported_once_output_stops_and_again_after_more_output() -> None:
    polls: list[bytes] = []
    out = bytearray()
    uart = u.Uart16550(lambda level: None, out.extend, on_input_poll=lambda: polls.append(bytes(out)))

    def putc(b: int) -> None:  # as a polled driver writes: LSR (THRE) then THR
        assert uart.read(u.LSR, 1)[0] & u.LSR_THRE
        uart.write(u.RBR_THR, bytes([b]))

    for b in b"READY\n":
        putc(b)
    assert polls == [], "one LSR read per written byte is output, not a wait for input"
    uart.read(u.LSR, 1)
    assert polls == []
    uart.read(u.LSR, 1)  # a second read with nothing written in between: polling for input
    assert polls == [b"READY\n"]
    for _ in range(10):
        uart.read(u.LSR, 1)
    assert len(polls) == 1, "reported once per wait, not per poll"
    putc(ord(">"))
    uart.read(u.LSR, 1)
    uart.read(u.LSR, 1)
    assert polls == [b"READY\n", b"READY\n>"]


def test_lsr_reads_with_data_waiting_are_not_a_wait_for_input() -> None:
    polls: list[int] = []
    uart = u.Uart16550(lambda level: None, lambda data: None, on_input_poll=lambda: polls.append(1))
    uart.receive(b"ab")
    assert uart.read(u.LSR, 1)[0] & u.LSR_DR
    assert uart.read(u.LSR, 1)[0] & u.LSR_DR
    assert polls == []
