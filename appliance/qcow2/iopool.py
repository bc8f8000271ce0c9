"""The qcow2 engine's door to the block layer's I/O thread pool.

The engine and the raw backend share one process-wide pool
(:class:`appliance.storage.io.IoPool`): one set of threads for every image a
VMM, a storage daemon or ``appliance img`` has open, and one place where the
hand-offs between the loop and its workers are tuned. ``aio=threads`` data
requests go through :meth:`IoPool.start`; metadata and the slower paths
await :func:`run`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from appliance.storage.io import IoPool, io_pool

__all__ = ["IoPool", "pool", "run"]


def pool() -> IoPool:
    """The process-wide I/O pool."""
    return io_pool()


def run(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Run a blocking call in the I/O pool; await the returned future.

    These are metadata I/O and the bulk paths (convert, compare, commit copies):
    they never start a pinned burst, which suits only the small data requests
    of :meth:`IoPool.start`.
    """
    return io_pool().submit(fn, *args, pin=False)
