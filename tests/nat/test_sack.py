"""Selective acknowledgements (RFC 2018) and loss recovery that does not wait for a timer."""

from __future__ import annotations

import asyncio
import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.nat import UserNetConfig, UserNetwork
from appliance.nat import tcp as tcpmod
from appliance.nat.tcp_nat import _NullOwner

from .conftest import drain
from .peer import GUEST_IP, GW_IP, tcp_frame

GUEST_MAC = b"\x52\x54\x00\x12\x34\x56"
MSS_OPT = struct.pack("!BBH", 2, 4, 1460)


def tcp_of(frame: bytes) -> tuple[int, int, int, bytes, int]:
    """(seq, ack, flags, options, payload length) of an IPv4 TCP frame without a vnet header."""
    seq, ack, off_flags = struct.unpack_from("!IIH", frame, 38)
    hlen = (off_flags >> 12) * 4
    total = int.from_bytes(frame[16:18], "big")
    return seq, ack, off_flags & 0x3F, bytes(frame[54 : 34 + hlen]), total - 20 - hlen


def sack_option(iss: int, blocks: list[tuple[int, int]]) -> bytes:
    edges = [(iss + e) & 0xFFFFFFFF for b in blocks for e in b]
    return b"\x01\x01\x05" + bytes([2 + 8 * len(blocks)]) + struct.pack(f"!{len(edges)}I", *edges)


def established(net: UserNetwork, *, sack: bool, sent: int) -> tcpmod.TcpConn:
    """A connection that has sent ``sent`` bytes the guest has not acknowledged yet."""
    conn = tcpmod.TcpConn(net, _NullOwner(), GUEST_IP, 40000, GW_IP, 80, inbound=False)
    conn.mac = GUEST_MAC
    conn.state, conn.mss, conn.sack_ok = tcpmod.ESTABLISHED, 1460, sack
    conn.irs, conn.rcv_nxt, conn._adv_edge = 7000, 1, 1 + tcpmod.RCVBUF
    conn.sndbuf = bytearray(sent + 100_000)
    conn.snd_una, conn.snd_nxt, conn.snd_max, conn.snd_wnd = 1, 1 + sent, 1 + sent, 1 << 20
    conn.snd_wl1, conn.snd_wl2 = 1, 1
    return conn


def guest_ack(conn: tcpmod.TcpConn, ack: int, win: int, opts: bytes = b"") -> None:
    conn.input((conn.irs + conn.rcv_nxt) & 0xFFFFFFFF, (conn.iss + ack) & 0xFFFFFFFF, tcpmod.ACK, win,
               memoryview(b""), opts)  # fmt: skip


def data_seqs(net: UserNetwork, conn: tcpmod.TcpConn) -> list[tuple[int, int]]:
    out = []
    for f in drain(net):
        seq, _ack, _flags, _opts, n = tcp_of(f)
        if n:
            out.append(((seq - conn.iss) & 0xFFFFFFFF, n))
    return out


async def test_syn_ack_offers_sack_only_to_a_guest_that_offered_it() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    try:
        with socket.socket() as lsock:
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(8)
            port = lsock.getsockname()[1]
            for sport, opts, want in ((40500, MSS_OPT + b"\x01\x01\x04\x02", True), (40501, MSS_OPT, False)):
                net.send([memoryview(tcp_frame(GUEST_IP, sport, GW_IP, port, 5000, 0, tcpmod.SYN, 0xFFFF,
                                               opts=opts))])  # fmt: skip
                for _ in range(200):
                    got = [tcp_of(f) for f in drain(net)]
                    if got:
                        break
                    await asyncio.sleep(0.005)
                (_seq, _ack, flags, synack_opts, _n) = got[0]
                assert flags == tcpmod.SYN | tcpmod.ACK
                assert (b"\x04\x02" in synack_opts) is want
                assert net.tcp.conns[(GUEST_IP, sport, GW_IP, port)].sack_ok is want
    finally:
        await net.stop()


async def test_a_reported_hole_is_resent_at_once_even_when_the_window_moves() -> None:
    """A Linux guest's duplicate ACKs carry SACK blocks and a growing window: not duplicate ACKs
    by RFC 5681, so without SACK recovery a lost segment waited for a probe timer per MSS."""
    net = UserNetwork(UserNetConfig(nameservers=()))
    conn = established(net, sack=True, sent=100_000)
    hole_end = 1 + 10 * 1460
    guest_ack(conn, 1, 3000, sack_option(conn.iss, [(hole_end, 1 + 100_000)]))
    assert data_seqs(net, conn) == [(1 + i * 1460, 1460) for i in range(tcpmod.SACK_RTX_BURST)]
    assert conn.recovering
    # The window moved and nothing new was SACKed: the next hole segments go on each ACK.
    guest_ack(conn, 1 + 1460, 3100, sack_option(conn.iss, [(hole_end, 1 + 100_000)]))
    assert data_seqs(net, conn)[0] == (1 + tcpmod.SACK_RTX_BURST * 1460, 1460)
    # The hole is filled: the ACK covers all we sent and recovery ends.
    for _ in range(3):
        guest_ack(conn, 1 + 100_000, 3200)
    assert not conn.recovering and not conn._sacked
    conn._finish()


async def test_holes_between_sack_blocks_are_resent_and_sacked_data_is_not() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    conn = established(net, sack=True, sent=20 * 1460)
    blocks = [(1 + 2 * 1460, 1 + 5 * 1460), (1 + 6 * 1460, 1 + 20 * 1460)]
    guest_ack(conn, 1, 3000, sack_option(conn.iss, blocks))
    sent = data_seqs(net, conn)
    assert sent == [(1, 1460), (1 + 1460, 1460), (1 + 5 * 1460, 1460)]


async def test_sack_scoreboard_merges_and_ignores_blocks_outside_the_flight() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    conn = established(net, sack=True, sent=50_000)
    opts = sack_option(conn.iss, [(3000, 4000), (1000, 2000), (1900, 3100), (60_000, 70_000), (0, 500)])
    assert conn._take_sack(opts, 1)
    assert conn._sacked == [[1000, 4000]]
    assert not conn._take_sack(sack_option(conn.iss, [(1500, 2500)]), 1)
    conn._finish()


async def test_our_duplicate_acks_report_out_of_order_data_as_sack_blocks() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    conn = established(net, sack=True, sent=0)
    for rel in (3001, 1001):  # two segments past a hole at 1..1001; the latest comes first
        conn.input((conn.irs + rel) & 0xFFFFFFFF, (conn.iss + 1) & 0xFFFFFFFF, tcpmod.ACK, 3000,
                   memoryview(b"z" * 1000), b"")  # fmt: skip
    acks = [tcp_of(f) for f in drain(net)]
    assert len(acks) == 2
    _seq, ack, _flags, opts, _n = acks[-1]
    assert ack == (conn.irs + 1) & 0xFFFFFFFF
    blocks = tcpmod.parse_sack(opts)
    assert [((a - conn.irs) & 0xFFFFFFFF, (b - conn.irs) & 0xFFFFFFFF) for a, b in blocks] == [
        (1001, 2001),
        (3001, 4001),
    ]
    conn._finish()


async def test_without_sack_a_partial_ack_after_a_tail_loss_probe_resends_the_next_segment() -> None:
    """The probe filled the first hole; the rest of a lost TSO frame must not take a probe each."""
    net = UserNetwork(UserNetConfig(nameservers=()))
    conn = established(net, sack=False, sent=30 * 1460)
    conn._tlp_done = True  # the probe (first segment again) went out
    guest_ack(conn, 1 + 1460, 3000)
    assert data_seqs(net, conn) == [(1 + 1460, 1460)]
    assert conn.recovering
    guest_ack(conn, 1 + 2 * 1460, 3000)  # each partial ACK: the next segment, at once
    assert data_seqs(net, conn) == [(1 + 2 * 1460, 1460)]
    conn._finish()


def test_sack_option_parsing_is_bounded() -> None:
    assert tcpmod.parse_sack(b"\x05\x0a" + bytes(8)) == [(0, 0)]
    assert tcpmod.parse_sack(b"\x05\x0b" + bytes(9)) == []  # not a multiple of 8
    assert tcpmod.parse_sack(b"\x05\x12" + bytes(8)) == []  # longer than the options
    assert tcpmod.parse_sack(b"\x01\x01\x05") == []
    assert tcpmod.parse_options(MSS_OPT + b"\x04\x02") == (1460, None, True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    blocks=st.lists(st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)), max_size=4),
    junk=st.binary(max_size=12),
    ack=st.integers(0, 60_000),
)
def test_hostile_sack_blocks_stay_bounded(blocks: list[tuple[int, int]], junk: bytes, ack: int) -> None:
    """Any SACK option, well formed or not, leaves a sorted, bounded scoreboard inside the flight."""

    async def run() -> None:
        net = UserNetwork(UserNetConfig(nameservers=()))
        conn = established(net, sack=True, sent=50_000)
        edges = [e for b in blocks for e in b]
        opts = b""
        if edges:
            opts = b"\x01\x01\x05" + bytes([2 + 4 * len(edges)]) + struct.pack(f"!{len(edges)}I", *edges)
        for _ in range(3):
            before = net.counters()["tcp_retransmits"]
            guest_ack(conn, min(ack, 1 + 50_000), 3000, opts + junk)
            board = conn._sacked
            assert len(board) <= tcpmod.MAX_SACK_BLOCKS
            assert all(conn.snd_una < left < right <= conn.snd_max for left, right in board)
            assert all(a[1] < b[0] for a, b in zip(board, board[1:], strict=False))
            assert net.counters()["tcp_retransmits"] - before <= tcpmod.SACK_RTX_BURST + 1
            drain(net)
        assert net.counters()["errors"] == 0
        conn._finish()

    asyncio.run(run())
