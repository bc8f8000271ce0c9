"""An in-memory FrameBackend: frames queued by a test or a program on the host side.

Used by device tests (every device test runs against it as well as a real
backend) and by anything that wants to feed a NIC frames from Python. The
receive queue is bounded; frames beyond ``limit`` are dropped and counted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence

from appliance.iovec import scatter


class MemoryLink:
    """Host side of a NIC held in Python: ``inject()`` frames in, read ``sent`` out."""

    def __init__(self, *, vnet_hdr_len: int = 0, limit: int = 1024) -> None:
        self.vnet_hdr_len = vnet_hdr_len
        self.limit = limit
        self.inbound: deque[bytes] = deque()
        self.sent: list[bytes] = []
        self.dropped = 0
        self.offloads: tuple[bool, bool, bool, bool, bool] | None = None
        self._ready: Callable[[], None] | None = None
        self.closed = False

    def inject(self, frame: bytes) -> bool:
        """Queue ``frame`` (with its header if ``vnet_hdr_len``) for the guest."""
        if len(self.inbound) >= self.limit:
            self.dropped += 1
            return False
        self.inbound.append(frame)
        if self._ready is not None:
            asyncio.get_running_loop().call_soon(self._kick)
        return True

    def _kick(self) -> None:
        if self._ready is not None and self.inbound:
            self._ready()

    def set_ready_callback(self, ready: Callable[[], None] | None) -> None:
        self._ready = ready
        if ready is not None and self.inbound:
            asyncio.get_running_loop().call_soon(self._kick)

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        if not self.inbound:
            return -1
        frame = self.inbound.popleft()
        scatter(bufs, frame)
        return len(frame)

    def send(self, bufs: Sequence[memoryview]) -> bool:
        self.sent.append(b"".join(bufs))
        return True

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> None:
        self.offloads = (csum, tso4, tso6, ecn, ufo)

    def close(self) -> None:
        self.closed = True
        self._ready = None
