"""Retransmission timer choices that matter with a guest on an emulated CPU."""

from __future__ import annotations

import asyncio
import time

from appliance.nat import UserNetConfig, UserNetwork
from appliance.nat import tcp as tcpmod
from appliance.nat.tcp_nat import _NullOwner

from .peer import GUEST_IP, GW_IP, Guest


async def test_tail_loss_probe_waits_for_the_rtt_variance_not_just_twice_srtt() -> None:
    """SRTT 5 ms but RTTVAR 20 ms (a guest that is sometimes busy): the probe waits ~85 ms, not 10."""
    net = UserNetwork(UserNetConfig(nameservers=()))
    conn = tcpmod.TcpConn(net, _NullOwner(), GUEST_IP, 40000, GW_IP, 80, inbound=False)
    conn.srtt, conn.rttvar, conn.rto = 0.005, 0.020, 0.2
    before = time.monotonic()
    conn._arm_retransmit()
    assert 0.08 <= conn._deadline - before <= 0.09
    conn._finish()


async def test_tail_loss_probe_never_waits_longer_than_the_rto() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    conn = tcpmod.TcpConn(net, _NullOwner(), GUEST_IP, 40000, GW_IP, 80, inbound=False)
    conn.srtt, conn.rttvar, conn.rto = 0.05, 0.2, 0.3
    before = time.monotonic()
    conn._arm_retransmit()
    assert conn._deadline - before <= 0.3 + 0.01
    conn._finish()


def _tcp_flags(frame: bytes) -> int:
    return frame[14 + 20 + 13] if frame[12:14] == b"\x08\x00" and frame[23] == 6 else -1


async def test_guest_fin_is_acked_together_with_our_fin_when_the_host_closes_at_once() -> None:
    """Guest closes first, the host closes on EOF: the guest sees one FIN|ACK, no separate ACK."""
    from .test_tcp import serve

    async def closer(r, w) -> None:  # type: ignore[no-untyped-def]
        await r.read()
        w.close()

    srv, port = await serve(closer)
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    try:
        async with Guest(net) as g:
            seen: list[int] = []
            g.link.drop_from_stack = lambda f: seen.append(_tcp_flags(f)) and False  # type: ignore[func-returns-value]
            c = g.connect(GW_IP, port)
            await c.wait(lambda: c.state == "ESTABLISHED")
            seen.clear()
            c.shutdown()
            await c.wait(lambda: c.fin_rcvd and c.fin_acked, 5)
            assert seen[0] == tcpmod.FIN | tcpmod.ACK, seen
            assert tcpmod.ACK not in seen, "the FIN was acked on its own"
    finally:
        await net.stop()
        srv.close()


async def test_guest_fin_is_acked_within_the_delay_when_the_host_stays_open() -> None:
    """Half-close: the host keeps its end open, so the ACK of the guest's FIN goes out alone, soon."""
    from .test_tcp import serve

    hold = asyncio.Event()

    async def holder(r, w) -> None:  # type: ignore[no-untyped-def]
        await r.read()
        await hold.wait()
        w.close()

    srv, port = await serve(holder)
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    try:
        async with Guest(net) as g:
            c = g.connect(GW_IP, port)
            await c.wait(lambda: c.state == "ESTABLISHED")
            t0 = time.monotonic()
            c.shutdown()
            await c.wait(lambda: c.fin_acked, 5)
            assert time.monotonic() - t0 < tcpmod.FIN_ACK_DELAY + 0.2
            assert not c.fin_rcvd
            hold.set()
            await c.wait(lambda: c.fin_rcvd, 5)
    finally:
        await net.stop()
        srv.close()
