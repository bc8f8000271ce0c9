"""ConnTimers: every connection's retransmission and delayed-ACK timers on one loop timer."""

from __future__ import annotations

import asyncio
import gc
import weakref

from appliance.nat import UserNetConfig, UserNetwork
from appliance.nat import tcp as tcpmod
from appliance.nat.tcp_nat import _NullOwner

from .peer import GUEST_IP, GW_IP


class _Counting(tcpmod.TcpConn):
    fired = 0

    def _on_timer(self) -> None:
        self.fired += 1
        super()._on_timer()


def _conn(net: UserNetwork, port: int = 40000) -> _Counting:
    return _Counting(net, _NullOwner(), GUEST_IP, port, GW_IP, 80, inbound=False)


async def test_many_connections_share_one_loop_handle() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    conns = [_conn(net, 40000 + i) for i in range(50)]
    conns[0]._arm(1.0)
    handle = net.conn_timers._handle
    for c in conns[1:]:
        c._arm(1.0)
    assert net.conn_timers._handle is handle and len(net.conn_timers) == 50
    for c in conns:
        c._finish()
    net.close()


async def test_a_timer_moved_earlier_runs_once_at_the_earlier_time() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    c = _conn(net)
    c._arm(0.2)
    c._arm(0.01)
    await asyncio.sleep(0.05)
    assert c.fired == 1
    c._disarm()
    await asyncio.sleep(0.25)
    assert c.fired == 1  # the entry for 0.2 s was stale
    c._finish()
    net.close()


async def test_a_finished_connection_is_not_run_nor_kept_alive_by_its_entries() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    c = _conn(net)
    c._arm(0.01)
    c._delack_at = at = tcpmod.time.monotonic() + 0.01
    net.conn_timers.add(at, c, tcpmod.ACK_TIMER)
    c._finish()
    ref = weakref.ref(c)
    del c
    gc.collect()
    assert ref() is None
    await asyncio.sleep(0.03)  # the entries come up and are dropped
    assert len(net.conn_timers) == 0 and net.counters()["errors"] == 0
    net.close()


async def test_a_delayed_ack_still_goes_out() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    c = _conn(net)
    c.mac = b"\x52\x54\x00\x12\x34\x56"
    c.state, c.rcv_nxt, c._acked_to = tcpmod.ESTABLISHED, 100, 1
    c.end_of_batch()  # 99 bytes unacknowledged: a delayed ACK
    assert c._delack_at and net.queued() == 0
    await asyncio.sleep(tcpmod.DELAYED_ACK + 0.02)
    assert net.queued() == 1 and c._delack_at == 0.0
    c._finish()
    net.close()
