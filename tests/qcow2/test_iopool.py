"""The qcow2 engine's I/O pool is the block layer's."""

from __future__ import annotations

import threading

from appliance.qcow2 import iopool
from appliance.storage import io


async def test_the_engine_and_the_raw_backend_share_one_pool() -> None:
    assert iopool.pool() is io.io_pool()
    assert await iopool.run(lambda a, b: a * b, 6, 7) == 42
    assert await iopool.run(threading.get_ident) != threading.get_ident()
