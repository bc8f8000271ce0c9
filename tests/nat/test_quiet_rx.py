"""rx_quiet: the stack tells the NIC which of its frames nothing in the guest waits on.

When the host closes first, the guest answers our FIN with its own from LAST-ACK,
and our ACK of it only ends the connection there: that ACK is quiet. Every other
frame of a connection (SYN-ACK, data, FIN, the ACK of a guest that closed first)
is not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from appliance.nat import UserNetConfig, UserNetwork

from .peer import ACK, FIN, GW_IP, Guest, tcp_flags


@pytest.fixture
async def net() -> AsyncIterator[UserNetwork]:
    n = UserNetwork(UserNetConfig(nameservers=()))
    await n.start()
    yield n
    await n.stop()


def record(net: UserNetwork) -> list[tuple[int, bool]]:
    """Each frame the guest takes from the stack: its TCP flags, and whether the stack
    called it quiet right after handing it over."""
    seen: list[tuple[int, bool]] = []
    take = net.recv_into

    def recv_into(bufs: Sequence[memoryview]) -> int:
        n = take(bufs)
        if n >= 0:
            seen.append((tcp_flags(bytes(bufs[0][:n])), net.rx_quiet(1)))
        return n

    net.recv_into = recv_into  # type: ignore[method-assign]
    return seen


async def serve(handler: object) -> tuple[asyncio.Server, int]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    return srv, srv.sockets[0].getsockname()[1]


async def test_our_ack_of_a_fin_from_last_ack_is_quiet(net: UserNetwork) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"bye")
        w.close()

    srv, port = await serve(handler)
    seen = record(net)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await c.wait(lambda: c.fin_rcvd, 10)
        assert not any(q for _, q in seen)
        c.shutdown()
        await c.wait(lambda: c.fin_acked, 10)
    srv.close()
    tcp = [(f, q) for f, q in seen if f >= 0]
    # The last frame is our ACK of the guest's FIN, and it alone is quiet.
    assert tcp[-1] == (ACK, True)
    assert [q for _, q in tcp[:-1]] == [False] * (len(tcp) - 1)
    assert any(f & FIN for f, _ in tcp[:-1])
    assert net.counters()["errors"] == 0


async def test_nothing_is_quiet_when_the_guest_closes_first(net: UserNetwork) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        w.close()

    srv, port = await serve(handler)
    seen = record(net)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await c.wait(lambda: c.state == "ESTABLISHED", 10)
        c.shutdown()
        # The guest waits for our FIN here (FIN-WAIT-2): it is not quiet, nor the ACK before it.
        await c.wait(lambda: c.fin_rcvd and c.fin_acked, 10)
    srv.close()
    assert seen and not any(q for _, q in seen)


def test_rx_quiet_asks_about_the_last_frames_handed_over() -> None:
    n = UserNetwork(UserNetConfig(nameservers=()))
    buf = memoryview(bytearray(2048))
    frames = [bytes([i]) * 60 for i in range(4)]
    n.output(frames[0])
    n.output(frames[1])
    n.quiet_output()  # frames[1]
    n.output(frames[2])
    n.quiet_output()  # frames[2]
    n.output(frames[3])
    assert not n.rx_quiet(1)  # nothing handed over yet
    assert n.recv_into([buf]) == 60
    assert not n.rx_quiet(1)
    assert n.recv_into([buf]) == 60
    assert n.rx_quiet(1)
    assert not n.rx_quiet(2)  # frames[0] is not quiet
    assert n.recv_into([buf]) == 60
    assert n.rx_quiet(1) and n.rx_quiet(2)
    assert not n.rx_quiet(3)
    assert not n.rx_quiet(0)
    assert n.recv_into([buf]) == 60
    assert not n.rx_quiet(1) and not n.rx_quiet(2)
    n.close()



def test_marks_nobody_asks_about_do_not_pile_up() -> None:
    # A NIC without rx_quiet (or none at all) never asks: the marks stay bounded.
    n = UserNetwork(UserNetConfig(nameservers=()))
    buf = memoryview(bytearray(2048))
    for _ in range(1000):
        assert n.output(b"a" * 60)
        n.quiet_output()
        assert n.recv_into([buf]) == 60
    assert len(n._quiet_rx) <= 65
    assert n.rx_quiet(4)
    n.close()
