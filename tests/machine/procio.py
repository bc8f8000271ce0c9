"""Reading a child process's console output with deadlines instead of blocking reads."""

from __future__ import annotations

import os
import select
import time


class Lines:
    """Lines from a child's stdout, with a deadline instead of a blocking readline."""

    def __init__(self, stream: object, timeout: float = 30.0) -> None:
        self.fd = stream.fileno()  # type: ignore[attr-defined]
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.timeout = timeout

    def until(self, needle: bytes) -> bytes:
        """Read up to and including the first line containing ``needle``; returns that line."""
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if needle in line:
                    return line
            self._read_more(deadline, needle)

    def through(self, needle: bytes) -> bytes:
        """Read up to and including ``needle`` (a prompt need not end a line); returns that much."""
        deadline = time.monotonic() + self.timeout
        while needle not in self.buf:
            self._read_more(deadline, needle)
        end = self.buf.index(needle) + len(needle)
        got, self.buf = self.buf[:end], self.buf[end:]
        return got

    def _read_more(self, deadline: float, needle: bytes) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {needle!r} in time; got {self.buf[-300:]!r}")
        ready, _, _ = select.select([self.fd], [], [], left)
        if ready:
            data = os.read(self.fd, 65536)
            if not data:
                raise AssertionError(f"output ended before {needle!r}; got {self.buf[-300:]!r}")
            self.buf += data

    def rest(self) -> bytes:
        os.set_blocking(self.fd, True)
        data = self.buf
        while chunk := os.read(self.fd, 65536):
            data += chunk
        return data
