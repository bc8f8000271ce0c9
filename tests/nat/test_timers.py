"""Retransmission timer choices that matter with a guest on an emulated CPU."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from appliance.nat import UserNetConfig, UserNetwork
from appliance.nat import tcp as tcpmod
from appliance.nat.tcp_nat import _NullOwner

from .conftest import drain
from .peer import GUEST_IP, GW_IP, Guest, GuestTcp, tcp_flags, tcp_frame


async def test_tail_loss_probe_waits_for_the_rtt_variance_not_just_twice_srtt() -> None:
    """SRTT 5 ms but RTTVAR 20 ms (a guest that is sometimes busy): the probe waits ~85 ms, not 10."""
    net = UserNetwork(UserNetConfig(nameservers=()))
    conn = tcpmod.TcpConn(net, _NullOwner(), GUEST_IP, 40000, GW_IP, 80, inbound=False)
    conn.srtt, conn.rttvar, conn.rto = 0.005, 0.020, 0.2
    before = time.monotonic()
    conn._arm_retransmit()
    after = time.monotonic()
    # The deadline is read from the clock between the two (however long this thread was held up).
    assert before + 0.08 <= conn._deadline <= after + 0.09
    conn._finish()


async def test_tail_loss_probe_never_waits_longer_than_the_rto() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    conn = tcpmod.TcpConn(net, _NullOwner(), GUEST_IP, 40000, GW_IP, 80, inbound=False)
    conn.srtt, conn.rttvar, conn.rto = 0.05, 0.2, 0.3
    conn._arm_retransmit()
    after = time.monotonic()
    assert conn._deadline <= after + 0.3
    conn._finish()


async def test_guest_fin_is_acked_together_with_our_fin_when_the_host_closes_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Guest closes first, the host closes on EOF: the guest sees one FIN|ACK, no separate ACK.

    The ACK's 20 ms wait is made 5 s here (and the test guest's retransmissions as slow): our FIN
    takes a few loop turns and two loopback hops, which a loaded machine can stretch past 20 ms.
    Code that acked the FIN at once still fails; the next test covers the delay itself."""
    from .test_tcp import serve

    monkeypatch.setattr(tcpmod, "FIN_ACK_DELAY", 5.0)
    monkeypatch.setattr(GuestTcp, "RTO", 5.0)

    async def closer(r, w) -> None:  # type: ignore[no-untyped-def]
        await r.read()
        w.close()

    srv, port = await serve(closer)
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    try:
        async with Guest(net) as g:
            seen: list[int] = []
            g.link.drop_from_stack = lambda f: seen.append(tcp_flags(f)) and False  # type: ignore[func-returns-value]
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
            bound = tcpmod.FIN_ACK_DELAY + 0.2
            delays: list[float] = []
            conns = []
            # Up to three connections, the quickest counted: a loaded machine can hold this
            # process up for 0.2 s once, where a late ACK would be late every time.
            for _ in range(3):
                c = g.connect(GW_IP, port)
                await c.wait(lambda c=c: c.state == "ESTABLISHED")
                t0 = time.monotonic()
                c.shutdown()
                await c.wait(lambda c=c: c.fin_acked, 5)
                delays.append(time.monotonic() - t0)
                assert not c.fin_rcvd
                conns.append(c)
                if delays[-1] < bound:
                    break
            assert min(delays) < bound, delays
            hold.set()
            for c in conns:
                await c.wait(lambda c=c: c.fin_rcvd, 5)
    finally:
        await net.stop()
        srv.close()


async def _established_raw(net: UserNetwork, port: int, sport: int) -> int:
    """Open a connection with raw frames (a loopback listener on ``port``); returns the stack's next seq."""
    from .test_connect import syn, tcp_flags

    net.send([memoryview(syn(port, sport=sport))])
    async with asyncio.timeout(5):
        while True:
            frames = [f for f in drain(net) if tcp_flags(f) == tcpmod.SYN | tcpmod.ACK]
            if frames:
                break
            await asyncio.sleep(0.001)
    their = int.from_bytes(frames[0][38:42], "big") + 1
    net.send([memoryview(tcp_frame(GUEST_IP, sport, GW_IP, port, 5001, their, tcpmod.ACK, 0xFFFF))])
    return their


async def test_small_segment_is_acked_after_the_delay_two_full_ones_at_once() -> None:
    """RFC 1122 §4.2.3.2: ACK at least every second full-sized segment, otherwise after a short delay."""
    from .test_connect import tcp_flags

    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(4)
        port = lsock.getsockname()[1]
        try:
            their = await _established_raw(net, port, 40300)
            drain(net)
            net.send([memoryview(tcp_frame(GUEST_IP, 40300, GW_IP, port, 5001, their, tcpmod.ACK | tcpmod.PSH,
                                           0xFFFF, b"x" * 100))])  # fmt: skip
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert not [f for f in drain(net) if tcp_flags(f) >= 0], "a lone small segment is not acked at once"
            await asyncio.sleep(tcpmod.DELAYED_ACK + 0.05)
            assert [tcp_flags(f) for f in drain(net)] == [tcpmod.ACK]
            seq = 5101
            for _ in range(2):
                net.send([memoryview(tcp_frame(GUEST_IP, 40300, GW_IP, port, seq, their, tcpmod.ACK, 0xFFFF,
                                               b"y" * 1460))])  # fmt: skip
                seq += 1460
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            acks = [f for f in drain(net) if tcp_flags(f) == tcpmod.ACK]
            assert acks and int.from_bytes(acks[-1][42:46], "big") == seq
        finally:
            await net.stop()


async def test_repeated_zero_window_acks_are_not_duplicate_acks() -> None:
    """A guest answering with window 0 again and again must not trigger a fast retransmit."""
    net = UserNetwork(UserNetConfig(nameservers=()))
    conn = tcpmod.TcpConn(net, _NullOwner(), GUEST_IP, 40000, GW_IP, 80, inbound=False)
    conn.state = tcpmod.ESTABLISHED
    conn.snd_una, conn.snd_nxt, conn.snd_max, conn.snd_wnd = 1, 1, 3000, 0
    conn.sndbuf = bytearray(5000)
    for _ in range(4):
        conn._process_ack(1, 1, 0, 0, tcpmod.ACK)
    assert conn.dupacks == 0 and net.counters()["tcp_retransmits"] == 0
    conn._finish()


async def test_loss_recovery_resends_a_whole_tso_frame_but_a_probe_one_mss() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()), vnet_hdr=True)
    net.set_offloads(True, True, True, False, False)
    conn = tcpmod.TcpConn(net, _NullOwner(), GUEST_IP, 40000, GW_IP, 80, inbound=False)
    conn.mac = b"\x52\x54\x00\x12\x34\x56"
    conn.state, conn.mss = tcpmod.ESTABLISHED, 1460
    conn.sndbuf = bytearray(200_000)
    conn.snd_una, conn.snd_nxt, conn.snd_max, conn.snd_wnd = 1, 150_001, 150_001, 1 << 20
    conn._retransmit_una(whole=True)
    conn._retransmit_una()
    buf = memoryview(bytearray(70_000))
    sizes = []
    while net.recv_into([buf]) >= 0:
        total = int.from_bytes(buf[12 + 16 : 12 + 18], "big")  # IPv4 total length after the vnet header
        sizes.append(total - 40)
    assert sizes == [65495 // 1460 * 1460, 1460]
    conn._finish()
