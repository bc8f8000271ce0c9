"""One loop timer for the stack's many deadlines (TCP retransmission and delayed ACKs).

With asyncio's ``call_at`` each deadline is a TimerHandle: a Python object
whose heap comparisons are Python calls, and which a cancel leaves in the
loop's heap until it is due or swept. A short connection armed and cancelled
two of them. Here a deadline is a tuple in one ``heapq`` (compared in C), and
the loop holds a single TimerHandle, for the earliest entry.

Entries are never cancelled. A callback gets the time it was set for and
decides whether that is still its deadline (a connection keeps its own), so an
entry whose owner moved on returns at once when it comes due.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable

Callback = Callable[[float], None]


class TimerHeap:
    """Deadlines on ``time.monotonic()`` (asyncio's clock), run from one loop timer.

    :param loop: returns the running loop, asked on first use.
    :param on_error: called when a callback raises (the error is not propagated).
    """

    __slots__ = ("_get_loop", "_on_error", "_heap", "_seq", "_handle", "_handle_at", "_closed")

    def __init__(self, loop: Callable[[], asyncio.AbstractEventLoop], on_error: Callable[[], None]) -> None:
        self._get_loop = loop
        self._on_error = on_error
        self._heap: list[tuple[float, int, Callback]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = math.inf
        self._closed = False

    def call_at(self, when: float, fn: Callback) -> None:
        """Call ``fn(when)`` once ``time.monotonic()`` reaches ``when``."""
        if self._closed:
            return
        heapq.heappush(self._heap, (when, next(self._seq), fn))
        if when < self._handle_at:
            self._schedule(when)

    def __len__(self) -> int:
        return len(self._heap)

    def _schedule(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        loop = self._get_loop()
        self._handle_at = when
        self._handle = loop.call_at(loop.time() + (when - time.monotonic()), self._run)

    def _run(self) -> None:
        self._handle = None
        self._handle_at = math.inf
        heap = self._heap
        now = time.monotonic()
        due = []
        # Taken off first: what the callbacks set now waits for the next turn, even if already due.
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap))
        for when, _seq, fn in due:
            try:
                fn(when)
            except Exception:  # noqa: BLE001 - a timer must not break the loop or the other timers
                self._on_error()
        if heap and not self._closed and heap[0][0] < self._handle_at:
            self._schedule(heap[0][0])

    def close(self) -> None:
        """Drop every entry; later :meth:`call_at` calls are ignored."""
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._heap.clear()
