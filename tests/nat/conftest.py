"""Fixtures for the user-mode stack: a started UserNetwork and helpers to feed it frames."""

from __future__ import annotations

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
