"""The i8042 keyboard controller, reduced to what a VMM needs: the reset line.

Linux (``reboot=k``, and as a fallback of its default reboot method) resets
the machine by writing command 0xFE, "pulse output line 0", to port 0x64.
A few other commands are answered so that probing drivers see a quiet,
healthy controller with no keyboard or mouse behind it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

CMD_READ_CONFIG = 0x20
CMD_WRITE_CONFIG = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_SELF_TEST = 0xAA
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_RESET = 0xFE

STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM = 0x04
STATUS_COMMAND = 0x08

SELF_TEST_OK = 0x55


class I8042:
    """Ports 0x60 (data) and 0x64 (status/command) as two :class:`Port` views."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._config = 0x00
        self._output: int | None = None
        self._expect_config = False
        self._status = STATUS_SYSTEM
        self.data_port = _Port(self, is_command=False)
        self.command_port = _Port(self, is_command=True)

    def read(self, is_command: bool) -> int:
        with self._lock:
            if is_command:
                return self._status | (STATUS_OUTPUT_FULL if self._output is not None else 0)
            value, self._output = self._output, None
            return 0 if value is None else value

    def write(self, is_command: bool, value: int) -> None:
        reset = False
        with self._lock:
            if is_command:
                self._status |= STATUS_COMMAND
                self._expect_config = False
                if value == CMD_RESET:
                    reset = True
                elif value == CMD_READ_CONFIG:
                    self._output = self._config
                elif value == CMD_WRITE_CONFIG:
                    self._expect_config = True
                elif value == CMD_SELF_TEST:
                    self._output = SELF_TEST_OK
            else:
                self._status &= ~STATUS_COMMAND
                if self._expect_config:
                    self._config = value
                    self._expect_config = False
        if reset:
            self._on_reset()


class _Port:
    def __init__(self, ctl: I8042, *, is_command: bool) -> None:
        self._ctl = ctl
        self._is_command = is_command

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self._ctl.read(self._is_command)]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self._ctl.write(self._is_command, data[0])
