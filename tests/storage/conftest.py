"""Fixtures of the storage tests: a backend per entry of :data:`backends.BACKENDS`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.storage.backend import BlockBackend
from tests.storage.backends import BACKENDS

DISK_SIZE = 1 << 20


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlockBackend]:
    b = await BACKENDS[request.param](tmp_path, DISK_SIZE)
    yield b
    await b.close()


@pytest.fixture(params=sorted(BACKENDS))
async def ro_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlockBackend]:
    b = await BACKENDS[request.param](tmp_path, DISK_SIZE, read_only=True)
    yield b
    await b.close()
