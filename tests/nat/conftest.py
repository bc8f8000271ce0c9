"""Fixtures for the user-mode stack: a started UserNetwork, helpers to feed it frames, and a host
listener that never completes a connect."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from appliance.nat import UserNetConfig, UserNetwork

GUEST_MAC = "52:54:00:12:34:56"
GW_MAC = "52:55:0a:00:02:02"


@pytest.fixture
async def net() -> AsyncIterator[UserNetwork]:
    n = UserNetwork(UserNetConfig(nameservers=()))
    await n.start()
    yield n
    await n.stop()


def feed(net: UserNetwork, frame: bytes) -> None:
    """Hand one frame from the 'guest' to the stack."""
    assert net.send([memoryview(bytes(frame))]) is True


def drain(net: UserNetwork) -> list[bytes]:
    """Every frame the stack has queued for the guest."""
    buf = bytearray(70000)
    mv = memoryview(buf)
    out = []
    while (n := net.recv_into([mv])) >= 0:
        out.append(bytes(mv[:n]))
    return out


@contextlib.asynccontextmanager
async def full_listener() -> AsyncIterator[int]:
    """A loopback listener whose accept queue is full: the host kernel drops further SYNs to the
    port it yields, so the stack's connect() there stays in progress until it gives up."""
    lsock = socket.socket()
    fillers: list[socket.socket] = []
    try:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        port = lsock.getsockname()[1]
        for _ in range(3):  # a backlog of 0 still holds a connection or two
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        await asyncio.sleep(0.05)
        yield port
    finally:
        lsock.close()
        for c in fillers:
            c.close()
