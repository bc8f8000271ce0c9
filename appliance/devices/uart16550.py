"""A 16550A UART: the serial console on COM1 (0x3f8, IRQ 4).

Registers follow the National Semiconductor PC16550D data sheet (§8, "Registers").
What the guest writes to THR goes to ``output`` at once (there is no baud
clock); what the host receives is queued in the receive FIFO and raises
"received data available". The interrupt line is level-driven and only
reported to ``set_irq`` when it changes. Loopback mode (MCR bit 4) mirrors the
modem control bits into MSR and TX into RX: Linux's 8250 driver probes the
port with it.

All register access happens on vCPU threads and :meth:`receive` on the loop,
so state is guarded by one lock. ``output`` and ``set_irq`` are called under
it and must not block.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

# Register offsets.
RBR_THR = 0  # DLL when LCR.DLAB
IER = 1      # DLM when LCR.DLAB
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01   # received data available
IER_THRE = 0x02  # transmitter holding register empty
IER_RLS = 0x04   # receiver line status
IER_MS = 0x08    # modem status

IIR_NONE = 0x01
IIR_MS = 0x00
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

RX_CAPACITY = 4096  # more than the 16-byte FIFO: the host side has no flow control


class Uart16550:
    """A 16550A on an I/O bus (8 ports).

    :param set_irq: drives the interrupt line (``True`` = asserted).
    :param output: receives bytes the guest transmits.
    :param on_rx_drained: called (on a vCPU thread) when the guest has read
        the receive queue empty, so a host side holding more input can resume.
    :param on_input_poll: called (on a vCPU thread, under the lock) when the
        guest starts polling for input: a second read of LSR with nothing
        received and nothing transmitted since the first. A driver writing
        reads LSR once per byte (for THRE), so this marks a guest that has
        finished its output and waits on the console.
    """

    def __init__(
        self,
        set_irq: Callable[[bool], None],
        output: Callable[[bytes], None],
        on_rx_drained: Callable[[], None] = lambda: None,
        on_input_poll: Callable[[], None] = lambda: None,
    ) -> None:
        self._set_irq = set_irq
        self._output = output
        self._on_rx_drained = on_rx_drained
        self._on_input_poll = on_input_poll
        self._idle_lsr_reads = 0  # LSR reads with DR clear since the last THR write
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._ier = 0
        self._lcr = 0x03  # 8N1
        self._mcr = MCR_OUT2
        self._fcr = 0
        self._scr = 0
        self._dll = 0x0C  # 9600 baud
        self._dlm = 0
        self._lsr_errors = 0
        self._thr_interrupt = False  # THRE interrupt pending (cleared by IIR read / THR write)
        self._irq_level = False
        self.tx_bytes = 0
        self.rx_bytes = 0

    # --- host side ---------------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Queue bytes for the guest to read; returns how many were accepted."""
        with self._lock:
            room = RX_CAPACITY - len(self._rx)
            take = data[:room]
            self._rx.extend(take)
            self.rx_bytes += len(take)
            self._update_irq()
            return len(take)

    def rx_room(self) -> int:
        with self._lock:
            return RX_CAPACITY - len(self._rx)

    # --- guest side --------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if size != 1:
            return b"\xff" * size
        with self._lock:
            value = self._read_reg(offset)
            self._update_irq()
        return bytes([value])

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 1:
            return
        with self._lock:
            self._write_reg(offset, data[0])
            self._update_irq()

    def _read_reg(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                return self._dll
            if not self._rx:
                return 0
            value = self._rx.popleft()
            if not self._rx:
                self._on_rx_drained()
            return value
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR_FCR:
            iir = self._pending_iir()
            if iir == IIR_THRE:
                # Reading IIR while THRE is the source clears it (PC16550D table 4).
                self._thr_interrupt = False
            return iir | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            lsr = LSR_THRE | LSR_TEMT | self._lsr_errors
            if self._rx:
                lsr |= LSR_DR
            else:
                self._idle_lsr_reads += 1
                if self._idle_lsr_reads == 2:
                    self._on_input_poll()
            self._lsr_errors = 0
            return lsr
        if offset == MSR:
            if self._mcr & MCR_LOOP:
                m = self._mcr
                return (
                    (MSR_CTS if m & MCR_RTS else 0)
                    | (MSR_DSR if m & MCR_DTR else 0)
                    | (MSR_RI if m & MCR_OUT1 else 0)
                    | (MSR_DCD if m & MCR_OUT2 else 0)
                )
            return MSR_CTS | MSR_DSR | MSR_DCD
        if offset == SCR:
            return self._scr
        return 0xFF

    def _write_reg(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                self._dll = value
                return
            self.tx_bytes += 1
            self._idle_lsr_reads = 0
            if self._mcr & MCR_LOOP:
                if len(self._rx) < RX_CAPACITY:
                    self._rx.append(value)
                else:
                    self._lsr_errors |= LSR_OE
            else:
                self._output(bytes([value]))
            # Transmission is instant: THR is empty again right away.
            self._thr_interrupt = True
        elif offset == IER:
            if dlab:
                self._dlm = value
                return
            was_thre = self._ier & IER_THRE
            self._ier = value & 0x0F
            if self._ier & IER_THRE and not was_thre:
                # Enabling THRE while THR is empty raises it at once; Linux's
                # 8250 driver waits for this interrupt to start transmitting.
                self._thr_interrupt = True
        elif offset == IIR_FCR:
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            self._fcr = value & 0xC9
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._mcr = value & 0x1F
        elif offset == SCR:
            self._scr = value

    def _pending_iir(self) -> int:
        if self._ier & IER_RLS and self._lsr_errors:
            return IIR_RLS
        if self._ier & IER_RDA and self._rx:
            return IIR_RDA
        if self._ier & IER_THRE and self._thr_interrupt:
            return IIR_THRE
        return IIR_NONE

    def _update_irq(self) -> None:
        # OUT2 gates the interrupt onto the ISA bus on PC-compatible boards.
        level = self._pending_iir() != IIR_NONE and bool(self._mcr & MCR_OUT2)
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq(level)
