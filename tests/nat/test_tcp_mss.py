"""The MSS we announce and the segments we send follow the guest link's MTU (RFC 9293 §3.7.1)."""

from __future__ import annotations

import asyncio
import socket

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from appliance.nat import UserNetConfig, UserNetwork

from .conftest import GUEST_MAC, GW_MAC, drain, feed
from .test_services import collect


def _listener(backlog: int) -> tuple[socket.socket, int]:
    """A non-blocking loopback TCP server the guest's connections reach through 10.0.2.2, and its port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(backlog)
    srv.setblocking(False)
    return srv, srv.getsockname()[1]


def _mss_of(pkt: Ether) -> int | None:
    return next((v for k, v in pkt[TCP].options if k == "MSS"), None)


async def _connect(net: UserNetwork, guest_mss: int, port: int, sport: int) -> Ether:
    syn = IP(src="10.0.2.15", dst="10.0.2.2") / TCP(sport=sport, dport=port, flags="S", seq=1000,
                                                    options=[("MSS", guest_mss)])  # fmt: skip
    feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / syn))
    [synack] = [f for f in await collect(net, lambda fs: any(TCP in f for f in fs)) if TCP in f]
    assert synack[TCP].flags == "SA"
    ack = IP(src="10.0.2.15", dst="10.0.2.2") / TCP(sport=sport, dport=port, flags="A", seq=1001,
                                                    ack=synack[TCP].seq + 1, window=65535)  # fmt: skip
    feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / ack))
    return synack


async def test_announced_mss_follows_the_link_mtu_and_segments_stay_inside_it() -> None:
    srv, port = _listener(4)
    loop = asyncio.get_running_loop()
    for mtu, guest_mss, announced, largest in ((1500, 8960, 1460, 1460), (9000, 8960, 8960, 8960),
                                               (1400, 1460, 1360, 1360)):  # fmt: skip
        net = UserNetwork(UserNetConfig(nameservers=()))
        await net.start()
        try:
            net.set_mtu(mtu)
            synack = await _connect(net, guest_mss, port, 40000 + mtu % 1000)
            assert _mss_of(synack) == announced
            conn, _ = await asyncio.wait_for(loop.sock_accept(srv), 5)
            with conn:
                conn.sendall(b"d" * 30000)
                data = await collect(net, lambda fs: sum(len(f[TCP].payload) for f in fs if TCP in f) >= 8000)
            sizes = [len(f[TCP].payload) for f in data if TCP in f and len(f[TCP].payload)]
            assert max(sizes) == largest, (mtu, sizes)
            assert all(len(f) <= 14 + mtu for f in data)
        finally:
            await net.stop()
    srv.close()


async def test_an_ack_that_shrinks_the_window_is_obeyed_by_what_that_ack_releases() -> None:
    # The window an ACK carries applies to what the ACK lets us send (RFC 9293 §3.10.7.4): it was
    # taken after the ACK's own output, so a guest filling up (window shrinking) got segments
    # beyond its right edge, which Linux drops (helper-48: 48-87 retransmissions per 8 MB).
    srv, port = _listener(1)
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    try:
        synack = await _connect(net, 1460, port, 41000)
        conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(srv), 5)
        with conn:
            conn.sendall(b"w" * 60000)
            first = await collect(net, lambda fs: sum(len(f[TCP].payload) for f in fs if TCP in f) >= 14600)
            iss = synack[TCP].seq
            top = max(f[TCP].seq - iss - 1 + len(f[TCP].payload) for f in first if TCP in f)
            # The guest takes the first segment and has 2000 bytes of room left.
            ack = iss + 1 + 1460
            feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.2")
                            / TCP(sport=41000, dport=port, flags="A", seq=1001, ack=ack, window=2000)))  # fmt: skip
            await asyncio.sleep(0.05)
            after = [f for f in (Ether(x) for x in drain(net)) if TCP in f and len(f[TCP].payload)]
            edge = ack - iss - 1 + 2000
            beyond = [(f[TCP].seq - iss - 1, len(f[TCP].payload)) for f in after
                      if f[TCP].seq - iss - 1 + len(f[TCP].payload) > max(edge, top)]  # fmt: skip
            assert not beyond, f"sent past the guest's window edge {edge}: {beyond}"
    finally:
        await net.stop()
        srv.close()
