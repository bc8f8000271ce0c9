"""take_quiet_tx: the stack tells the NIC which guest frames nothing waits on.

When the guest closes first, our FIN answers its FIN and the guest's only reply is
the ACK that ends our LAST-ACK; that ACK is counted as quiet. When the host closes
first, the guest's FIN still needs our ACK: nothing is counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from appliance.nat import UserNetConfig, UserNetwork

from .peer import GW_IP, Guest


@pytest.fixture
async def net() -> AsyncIterator[UserNetwork]:
    n = UserNetwork(UserNetConfig(nameservers=()))
    await n.start()
    yield n
    await n.stop()


async def test_a_connection_the_guest_closes_first_expects_one_quiet_ack(net: UserNetwork) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        w.close()

    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await c.wait(lambda: c.state == "ESTABLISHED", 10)
        assert net.take_quiet_tx() == 0
        c.shutdown()
        await c.wait(lambda: c.fin_rcvd and c.fin_acked, 10)
        assert net.take_quiet_tx() == 1
        assert net.take_quiet_tx() == 0
        # The ACK the count was about ends the connection all the same.
        async with asyncio.timeout(5):
            while net.tcp.conns:
                await asyncio.sleep(0.01)
    srv.close()
    assert net.counters()["errors"] == 0


async def test_a_connection_the_host_closes_first_expects_nothing_quiet(net: UserNetwork) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"bye")
        w.close()

    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await c.wait(lambda: c.fin_rcvd, 10)
        c.shutdown()
        await c.wait(lambda: c.fin_acked, 10)
        assert net.take_quiet_tx() == 0
    srv.close()
