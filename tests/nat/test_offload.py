"""The stack with virtio-net headers: checksum offload and TSO both ways, and hostile headers.

With ``vnet_hdr=True`` the NIC offers CSUM/HOST_TSO4 to the guest, so the
stack must take 64 KiB TCP segments with a partial checksum, and once the guest
accepts GUEST_CSUM/GUEST_TSO4 it hands the guest 64 KiB segments itself. The
test guest (``peer.Guest(vnet=True)``) completes every partial checksum the
stack leaves and verifies it, so a wrong pseudo-header sum shows up as a bad
checksum.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.nat import UserNetConfig, UserNetwork
from appliance.nic import constants as V

from .peer import GUEST_IP, GUEST_MAC, GW_IP, GW_MAC, VNET_HDR, Guest, csum, eth, ip_packet, tcp_frame
from .test_tcp import MB, Sink, connected_to_sink, serve


async def offload_net(*, csum_on: bool = True, tso: bool = True) -> UserNetwork:
    net = UserNetwork(UserNetConfig(nameservers=()), vnet_hdr=True)
    await net.start()
    net.set_offloads(csum_on, tso, tso, False, False)
    return net


def with_hdr(frame: bytes, flags: int = 0, gso: int = 0, gso_size: int = 0, start: int = 0, off: int = 0) -> bytes:
    return VNET_HDR.pack(flags, gso, 0, gso_size, start, off, 0) + frame


async def test_tso_both_ways_moves_8mb_each_way_with_matching_sha256() -> None:
    """A guest with HOST_TSO4 uploads in 64 KiB segments; the stack downloads to it in 64 KiB segments."""
    net = await offload_net()
    sink = Sink()
    down = os.urandom(8 * MB)
    sink.eof_then = down
    up = os.urandom(8 * MB)
    try:
        async with connected_to_sink(net, sink, vnet=True) as (g, c, _sink):
            c.tso = True
            h = hashlib.sha256()
            c.on_data = h.update
            c.write(up)
            c.shutdown()
            await asyncio.wait_for(sink.done.wait(), 60)
            assert sink.hash.hexdigest() == hashlib.sha256(up).hexdigest()
            await c.wait(lambda: c.fin_rcvd, 60)
            assert h.hexdigest() == hashlib.sha256(down).hexdigest()
            assert g.bad_checksums == 0
            gso = [hd for hd in g.link.headers if hd[1] == V.GSO_TCPV4]
            assert gso, "the stack never used TSO toward the guest"
            assert {hd[3] for hd in gso} == {1460}  # gso_size is the guest's MSS
            assert all(hd[0] == V.HDR_F_NEEDS_CSUM and hd[4] == 34 and hd[5] == 16 for hd in gso)
        c_ = net.counters()
        assert c_["rx_gso_frames"] > 0 and c_["tx_gso_frames"] > 0
        assert c_["bad_checksum"] == 0 and c_["errors"] == 0
    finally:
        await net.stop()


async def test_tso_segments_are_multiples_of_a_small_guest_mss() -> None:
    """With MSS 536 the stack's TSO segments say gso_size 536 and full ones are whole MSS multiples."""
    net = await offload_net()
    data = os.urandom(MB)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(data)
        await w.drain()
        w.close()

    srv, port = await serve(handler)
    try:
        async with Guest(net, vnet=True) as g:
            sizes: list[int] = []
            c = g.connect(GW_IP, port, mss=536)
            h = hashlib.sha256()

            def take(d: bytes) -> None:
                sizes.append(len(d))
                h.update(d)

            c.on_data = take
            await c.wait(lambda: c.fin_rcvd, 30)
            assert h.hexdigest() == hashlib.sha256(data).hexdigest()
            assert max(sizes) > 536
            assert max(sizes) == 65495 // 536 * 536  # full TSO segments are whole MSS multiples
            assert {hd[3] for hd in g.link.headers if hd[1]} == {536}
            assert g.bad_checksums == 0
    finally:
        srv.close()
        await net.stop()


async def test_guest_without_offloads_gets_zero_headers_and_full_checksums() -> None:
    """Headers on, but the guest accepted no offloads: MSS frames, flags 0, checksums complete."""
    net = await offload_net(csum_on=False, tso=False)
    data = os.urandom(MB)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(data)
        await w.drain()
        w.close()

    srv, port = await serve(handler)
    try:
        async with Guest(net, vnet=True) as g:
            c = g.connect(GW_IP, port)
            h = hashlib.sha256()
            c.on_data = h.update
            await c.wait(lambda: c.fin_rcvd, 30)
            assert h.hexdigest() == hashlib.sha256(data).hexdigest()
            assert g.link.headers and all(hd[:6] == (0,) * 6 for hd in g.link.headers)
            assert g.link.partial_from_stack == 0 and g.bad_checksums == 0
    finally:
        srv.close()
        await net.stop()


async def test_tso_without_checksum_offload_is_treated_as_off() -> None:
    """GUEST_TSO4 needs GUEST_CSUM (virtio 1.2 §5.1.3.1); alone it must not produce GSO frames."""
    net = UserNetwork(UserNetConfig(nameservers=()), vnet_hdr=True)
    net.set_offloads(False, True, True, False, False)
    assert not (net.guest_csum or net.guest_tso4 or net.guest_tso6)
    plain = UserNetwork(UserNetConfig(nameservers=()))
    plain.set_offloads(True, True, True, False, False)
    assert not plain.guest_csum, "a stack without headers cannot mark partial checksums"


def test_frame_scattered_over_small_buffers_keeps_its_header() -> None:
    """recv_into splits header and frame across several guest buffers in order."""
    net = UserNetwork(UserNetConfig(nameservers=()), vnet_hdr=True)
    frame = bytes(range(256)) * 4
    net._out.append((b"H" * 12, frame))
    net._out_bytes += len(frame)
    bufs = [bytearray(5), bytearray(10), bytearray(2000)]
    n = net.recv_into([memoryview(b) for b in bufs])
    assert n == 12 + len(frame)
    assert (bytes(bufs[0]) + bytes(bufs[1]) + bytes(bufs[2]))[:n] == b"H" * 12 + frame
    assert net.queued() == 0 and net._out_bytes == 0


# -- untrusted headers from the guest ------------------------------------------


def syn_to(port: int, *, good_csum: bool = True) -> bytes:
    opts = struct.pack("!BBH", 2, 4, 1460)
    f = bytearray(tcp_frame(GUEST_IP, 40001, GW_IP, port, 1000, 0, 0x02, 0xFFFF, opts=opts))
    if not good_csum:
        f[14 + 20 + 16] ^= 0xFF
    return bytes(f)


async def test_bad_tcp_checksum_is_dropped_unless_the_header_says_partial() -> None:
    net = await offload_net()
    try:
        with socket.socket() as lsock:
            lsock.bind(("127.0.0.1", 0))
            lsock.listen()
            port = lsock.getsockname()[1]
            net.send([memoryview(with_hdr(syn_to(port, good_csum=False)))])
            assert net.counters()["bad_checksum"] == 1 and net.counters()["tcp_conns"] == 0
            net.send([memoryview(with_hdr(syn_to(port, good_csum=False), V.HDR_F_NEEDS_CSUM, 0, 0, 34, 16))])
            assert net.counters()["tcp_conns"] == 1
    finally:
        await net.stop()


async def test_udp_with_partial_checksum_reaches_the_host() -> None:
    net = await offload_net()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
            rx.bind(("127.0.0.1", 0))
            rx.settimeout(5)
            port = rx.getsockname()[1]
            payload = b"partial checksum"
            udp = bytearray(struct.pack("!HHHH", 5555, port, 8 + len(payload), 0) + payload)
            pseudo = struct.pack("!4s4sBBH", GUEST_IP, GW_IP, 0, 17, len(udp))
            struct.pack_into("!H", udp, 6, ~csum(pseudo) & 0xFFFF)  # pseudo-header sum only
            frame = eth(GW_MAC, GUEST_MAC, 0x0800, ip_packet(GUEST_IP, GW_IP, 17, bytes(udp)))
            net.send([memoryview(with_hdr(frame, V.HDR_F_NEEDS_CSUM, 0, 0, 34, 6))])
            got = await asyncio.get_running_loop().run_in_executor(None, rx.recv, 100)
            assert got == payload
    finally:
        await net.stop()


async def test_header_with_an_unoffered_gso_type_or_flag_is_dropped_and_counted() -> None:
    net = await offload_net()
    try:
        frame = syn_to(9)
        for flags, gso in ((0, V.GSO_UDP), (0, 5), (0, 0x7F), (0x04, 0), (0x80, 0)):
            net.send([memoryview(with_hdr(frame, flags, gso, 1400))])
        c = net.counters()
        assert c["bad_vnet_hdr"] == 5 and c["tcp_conns"] == 0 and c["errors"] == 0
        net.send([memoryview(with_hdr(frame, 0, V.GSO_TCPV4 | V.GSO_ECN, 1460))])  # ECN bit is allowed
        assert net.counters()["bad_vnet_hdr"] == 5
    finally:
        await net.stop()


async def test_frames_shorter_than_the_header_are_counted_truncated() -> None:
    net = await offload_net()
    try:
        for n in range(12):
            assert net.send([memoryview(bytes(n))]) is True
        assert net.counters()["truncated"] == 12 and net.counters()["errors"] == 0
    finally:
        await net.stop()


async def test_gso_frame_whose_ip_length_lies_is_dropped() -> None:
    """A TSO header on a frame whose IPv4 total length exceeds the bytes present: truncated, not read past."""
    net = await offload_net()
    try:
        f = bytearray(syn_to(9))
        struct.pack_into("!H", f, 16, 60000)
        f[24:26] = b"\0\0"
        struct.pack_into("!H", f, 24, csum(bytes(f[14:34])))
        net.send([memoryview(with_hdr(bytes(f), V.HDR_F_NEEDS_CSUM, V.GSO_TCPV4, 1460, 34, 16))])
        c = net.counters()
        assert c["tcp_conns"] == 0 and c["errors"] == 0 and c["bad_checksum"] + c["truncated"] == 1
    finally:
        await net.stop()


@settings(max_examples=150, deadline=None)
@given(
    hdr=st.binary(min_size=12, max_size=12),
    body=st.binary(max_size=300),
    kind=st.sampled_from(["tcp", "udp", "raw"]),
)
async def test_random_vnet_headers_on_any_frame_never_escape(hdr: bytes, body: bytes, kind: str) -> None:
    net = await offload_net()
    try:
        if kind == "tcp":
            frame = tcp_frame(GUEST_IP, 40002, GW_IP, 9, 1, 0, 0x12, 1000, body)
        elif kind == "udp":
            udp = struct.pack("!HHHH", 5000, 9, 8 + len(body), 0) + body
            frame = eth(GW_MAC, GUEST_MAC, 0x0800, ip_packet(GUEST_IP, GW_IP, 17, udp))
        else:
            frame = body
        assert net.send([memoryview(hdr + frame)]) is True
        buf = memoryview(bytearray(70000))
        while net.recv_into([buf]) >= 0:
            pass
        assert net.counters()["errors"] == 0
    finally:
        await net.stop()
