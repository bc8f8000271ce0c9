"""virtio-rng: the host's entropy for the guest (virtio 1.2 §5.4).

One request queue; every chain is a set of device-writable buffers that the
device fills with random bytes read straight from the entropy file
(``/dev/urandom`` unless an ``rng-random`` object names another) into guest
RAM with ``os.readv``. Reads are short and non-blocking, so they run on the
loop. The spec only asks for at least one byte per non-empty buffer
(§5.4.6.2), so a request is capped at :data:`MAX_BYTES_PER_REQUEST` to keep a
greedy guest from hogging the loop.

QEMU's ``max-bytes``/``period`` limit what a guest may take: at most
``max_bytes`` per ``period`` milliseconds. Requests beyond the quota stay on
the ring, unanswered, until the next period begins (the driver simply waits,
as it would on a slow source).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence

from appliance.errors import ConfigError
from appliance.kvm.memory import GuestMemory
from appliance.virtio.device import Interrupt, VirtioDevice
from appliance.virtio.errors import QueueError
from appliance.virtio.queue import PASS_BUDGET, Virtqueue, guest_error_log

VIRTIO_ID_ENTROPY = 4
MAX_BYTES_PER_REQUEST = 64 * 1024
DEFAULT_PERIOD_MS = 1 << 16  # QEMU's default period


def _trim(views: list[memoryview], limit: int) -> list[memoryview]:
    out = []
    for v in views:
        if limit <= 0:
            break
        out.append(v[:limit])
        limit -= len(out[-1])
    return out


class VirtioRng(VirtioDevice):
    """Entropy device.

    :param filename: the entropy source (``rng-random,filename=``).
    :param max_bytes: bytes the guest may take per ``period_ms`` (None: no limit).
    :param period_ms: the length of a quota period in milliseconds.
    :raises ConfigError: When it cannot be opened.
    """

    device_id = VIRTIO_ID_ENTROPY
    queue_sizes = (256,)

    def __init__(self, filename: str = "/dev/urandom", *, max_bytes: int | None = None,
                 period_ms: int = DEFAULT_PERIOD_MS) -> None:
        super().__init__()
        self.filename = filename
        self.max_bytes = max_bytes
        self.period = period_ms / 1000
        self._period_start = float("-inf")  # the first request opens the first period
        self._quota = 0
        self._wakeup: asyncio.TimerHandle | None = None
        try:
            self._fd = os.open(filename, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            raise ConfigError(f"rng-random: cannot open {filename}: {err.strerror}") from None
        self._queue: Virtqueue | None = None
        self._irq: Interrupt | None = None
        self.bytes_served = 0
        self.requests = 0

    def activate(
        self, mem: GuestMemory, queues: Sequence[Virtqueue], interrupts: Sequence[Interrupt]
    ) -> None:
        self._queue = queues[0]
        self._irq = interrupts[0]

    def queue_notify(self, index: int) -> None:
        q = self._queue
        if index != 0 or q is None or self.needs_reset:
            return
        budget = PASS_BUDGET
        try:
            while True:
                while self._allowance() and (chain := q.pop()) is not None:
                    self.requests += 1
                    n = self._fill(_trim(chain.writable, self._allowance()))
                    self.bytes_served += n
                    self._quota -= n
                    q.push_used(chain.head, n)
                    budget -= 1
                    if budget <= 0:
                        break
                if budget <= 0:
                    if self.notify_later(0):
                        break  # the rest from a loop callback
                    budget = PASS_BUDGET  # no loop to come back from: go on
                if not self._allowance():
                    self._wait_for_next_period()
                    break
                if not q.enable_notification():
                    break
        except QueueError as err:
            self.fail(str(err))
        if q.needs_notification() and self._irq is not None:
            self._irq.notify()

    def _allowance(self) -> int:
        """Bytes the guest may still take now (starting a new period when one is over)."""
        if self.max_bytes is None:
            return MAX_BYTES_PER_REQUEST
        now = time.monotonic()
        if now - self._period_start >= self.period:
            self._period_start = now
            self._quota = self.max_bytes
        return min(self._quota, MAX_BYTES_PER_REQUEST)

    def _wait_for_next_period(self) -> None:
        if self._wakeup is not None:
            return
        delay = max(0.0, self._period_start + self.period - time.monotonic())
        self._wakeup = asyncio.get_running_loop().call_later(delay, self._next_period)

    def _next_period(self) -> None:
        self._wakeup = None
        self.queue_notify(0)

    def _fill(self, views: list[memoryview]) -> int:
        views = _trim(views, MAX_BYTES_PER_REQUEST)
        if not views:
            return 0
        try:
            return os.readv(self._fd, views)
        except BlockingIOError:
            # /dev/random can run dry; an empty answer tells the driver to retry.
            return 0
        except OSError as err:
            guest_error_log.warning("virtio-rng: reading %s failed: %s", self.filename, err)
            return 0

    def reset(self) -> None:
        super().reset()
        self._queue = None
        self._irq = None
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None

    def close(self) -> None:
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
