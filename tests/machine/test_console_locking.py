"""The console and the UART call into each other from two threads without deadlocking.

A vCPU thread writing THR holds the UART's lock and calls the console
(guest_output); the loop typing input calls the UART (receive). Taking the two
locks in opposite orders hung a QMP test in CI-like runs.
"""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from appliance.devices.uart16550 import Uart16550
from appliance.machine.console import Console

RBR_THR = 0
LSR = 5


@pytest.mark.timeout(30)
async def test_guest_output_and_host_input_at_once_do_not_deadlock() -> None:
    console = Console()
    await console.start()
    uart = Uart16550(lambda level: None, console.guest_output, console.rx_drained)
    console.attach_uart(uart)
    stop = threading.Event()

    def vcpu() -> None:
        # What the test guest does: print, and poll/read the receive side.
        while not stop.is_set():
            uart.write(RBR_THR, b"x")
            if uart.read(LSR, 1)[0] & 1:
                uart.read(RBR_THR, 1)

    # Switch threads as often as possible so the two lock orders interleave.
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=vcpu, daemon=True)
    t.start()
    try:
        for _ in range(20000):
            console.send("y")
            if _ % 500 == 0:
                await asyncio.sleep(0)
    finally:
        stop.set()
        sys.setswitchinterval(old_interval)
        await asyncio.to_thread(t.join, 5)
    assert not t.is_alive(), "vCPU thread stuck on the console lock"
    assert uart.tx_bytes > 0 and uart.rx_bytes > 0
