"""Connections in TIME-WAIT give their place in a full connection table to new ones.

A connection the host closed first ends in TIME-WAIT here, holding nothing but its
entry (its host socket is closed on the way in). A guest that opens such connections
faster than TIME_WAIT lets them go (an HTTP/1.0 client against a server that closes
first) would otherwise fill the table and have its next SYNs dropped. As Linux does
with its tw_buckets limit, the oldest one goes instead.
"""

from __future__ import annotations

import asyncio

import pytest

from appliance.nat import UserNetwork, tcp_nat

from .peer import GW_IP, Guest


@pytest.fixture(autouse=True)
def _small_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table of 8 (the stack reads MAX_CONNS when a connection comes; ``net`` is conftest's)."""
    monkeypatch.setattr(tcp_nat, "MAX_CONNS", 8)


async def test_a_full_table_of_time_wait_connections_takes_new_ones(net: UserNetwork) -> None:
    async def closes_first(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"bye")
        w.close()

    srv = await asyncio.start_server(closes_first, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with Guest(net) as g:
        for i in range(3 * tcp_nat.MAX_CONNS):
            c = g.connect(GW_IP, port)
            await c.wait(lambda c=c: c.fin_rcvd, 10)
            assert c.read() == b"bye", i
            c.shutdown()
            await c.wait(lambda c=c: c.fin_acked, 10)
            assert len(net.tcp.conns) <= tcp_nat.MAX_CONNS
        states = [conn.state_name for conn in net.tcp.conns.values()]
    srv.close()
    assert states == ["TIME_WAIT"] * tcp_nat.MAX_CONNS
    assert net.counters()["tcp_syn_dropped"] == 0
    assert net.counters()["errors"] == 0


async def test_other_connections_are_not_given_up(net: UserNetwork) -> None:
    async def holds(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        w.close()

    srv = await asyncio.start_server(holds, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with Guest(net) as g:
        open_ = [g.connect(GW_IP, port) for _ in range(tcp_nat.MAX_CONNS)]
        for c in open_:
            await c.wait(lambda c=c: c.state == "ESTABLISHED", 10)
        extra = g.connect(GW_IP, port)
        await asyncio.sleep(0.3)
        assert extra.state != "ESTABLISHED"
        assert net.counters()["tcp_syn_dropped"] >= 1
        assert all(conn.state_name == "ESTABLISHED" for conn in net.tcp.conns.values())
        for c in open_:
            c.abort()
        extra.abort()
    srv.close()
