"""Retransmission timer choices that matter with a guest on an emulated CPU."""

from __future__ import annotations

import time

from appliance.nat import UserNetConfig, UserNetwork
from appliance.nat import tcp as tcpmod
from appliance.nat.tcp_nat import _NullOwner

from .peer import GUEST_IP, GW_IP


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
