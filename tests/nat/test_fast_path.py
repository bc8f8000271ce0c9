"""The TCP fast path (``UserNetwork._tcp4_input``) takes what the general path would, and nothing else.

Two stacks with the same initial sequence numbers get the same segments, one with the fast path
turned off; whatever is corrupted in the Ethernet, IP or TCP header, both send the guest the same
frames, count the same things and pass the host the same bytes.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from appliance.nat import UserNetConfig, UserNetwork, tcp

from .conftest import drain
from .peer import GUEST_IP, GW_IP, NEEDS_CSUM, VNET_HDR, tcp_frame

SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01
SPORT = 40600
MSS_1460 = struct.pack("!BBH", 2, 4, 1460)


def _no_fast_path(frame: memoryview) -> bool:
    return False


async def _connect(net: UserNetwork, port: int, hdr: bytes = b"") -> int:
    """Three-way handshake from the 'guest'; the stack's initial sequence number."""
    net.send([memoryview(hdr + tcp_frame(GUEST_IP, SPORT, GW_IP, port, 1000, 0, SYN, 0xFFFF,
                                         opts=struct.pack("!BBH", 2, 4, 1460)))])  # fmt: skip
    async with asyncio.timeout(5):
        while not (frames := drain(net)):
            await asyncio.sleep(0.001)
    iss = int.from_bytes(frames[0][len(hdr) + 38 : len(hdr) + 42], "big")
    net.send([memoryview(hdr + tcp_frame(GUEST_IP, SPORT, GW_IP, port, 1001, iss + 1, ACK, 0xFFFF))])
    await asyncio.sleep(0)
    return iss


@pytest.mark.parametrize("vnet", [False, True])
async def test_corrupted_headers_are_handled_as_the_general_path_handles_them(monkeypatch, vnet: bool) -> None:
    """With ``vnet`` the frames carry a NEEDS_CSUM header, as a Linux guest's do: TCP checksums are not
    checked, so corrupted TCP header fields reach the connection on both paths."""
    monkeypatch.setattr(tcp, "_new_iss", lambda: 0x0708090A)  # same ISS in both stacks
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    port = lsock.getsockname()[1]
    nets = [UserNetwork(UserNetConfig(nameservers=()), vnet_hdr=vnet) for _ in range(2)]
    hdr = VNET_HDR.pack(NEEDS_CSUM, 0, 0, 0, 34, 16, 0) if vnet else b""
    nets[1]._tcp4_input = _no_fast_path  # type: ignore[method-assign]
    hosts: list[socket.socket] = []
    try:
        for net in nets:
            await net.start()
            iss = await _connect(net, port, hdr)
            hosts.append(lsock.accept()[0])
        good = tcp_frame(GUEST_IP, SPORT, GW_IP, port, 1001, iss + 1, ACK | PSH, 0xFFFF, b"abcd")
        frames = []
        for off in range(54):  # every byte of Ethernet + IPv4 + TCP headers, two ways
            for x in (0xFF, 0x01):
                bad = bytearray(good)
                bad[off] ^= x
                # The good segment after each (a duplicate once taken) brings back the guest's MAC.
                frames += [hdr + bytes(bad), hdr + good]
        for i, f in enumerate(frames):
            out = []
            for net in nets:
                net.send([memoryview(f)])
                out.append(drain(net))
            assert out[0] == out[1], f"frame {i}: different replies"
            assert nets[0].counters() == nets[1].counters(), f"frame {i}: different counters"
        c0, c1 = (next(iter(n.tcp.conns.values())) for n in nets)
        assert (c0.rcv_nxt, c0.snd_una, c0.state) == (c1.rcv_nxt, c1.snd_una, c1.state)
        got = []
        fin = hdr + tcp_frame(GUEST_IP, SPORT, GW_IP, port, 1000 + c0.rcv_nxt, iss + 1, ACK | FIN, 0xFFFF)
        for net, h in zip(nets, hosts, strict=True):
            net.send([memoryview(fin)])
            h.settimeout(5)
            data = b""
            while chunk := await asyncio.to_thread(h.recv, 4096):
                data += chunk
            got.append(data)
        assert got[0] == got[1] and got[0].startswith(b"abcd")
        assert nets[0].counters()["errors"] == 0
    finally:
        for h in hosts:
            h.close()
        lsock.close()
        for net in nets:
            await net.stop()


@pytest.mark.parametrize("fast", [True, False])
async def test_segment_with_ip_options_or_from_a_new_mac_is_still_delivered(fast: bool) -> None:
    """The fast path leaves IP options and a changed guest MAC to the general path, which takes them."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    port = lsock.getsockname()[1]
    net = UserNetwork(UserNetConfig(nameservers=()))
    if not fast:
        net._tcp4_input = _no_fast_path  # type: ignore[method-assign]
    await net.start()
    try:
        iss = await _connect(net, port)
        host, _ = lsock.accept()
        seg = tcp_frame(GUEST_IP, SPORT, GW_IP, port, 1001, iss + 1, ACK | PSH, 0xFFFF, b"opt")
        ip = bytearray(seg[14:34])
        ip[0] = 0x46  # IHL 6: one word of options (a NOP then End of List padding)
        ip[2:4] = struct.pack("!H", len(seg) - 14 + 4)
        ip[10:12] = b"\0\0"
        hdr = bytes(ip) + b"\x01\x00\x00\x00"
        s = sum(struct.unpack("!12H", hdr))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        hdr = hdr[:10] + struct.pack("!H", ~s & 0xFFFF) + hdr[12:]
        net.send([memoryview(seg[:14] + hdr + seg[34:])])
        new_mac = b"\x52\x54\x00\xaa\xbb\xcc"
        seg2 = tcp_frame(GUEST_IP, SPORT, GW_IP, port, 1004, iss + 1, ACK | PSH, 0xFFFF, b"mac")
        net.send([memoryview(seg2[:6] + new_mac + seg2[12:])])
        host.settimeout(5)
        data = b""
        while len(data) < 6:
            data += await asyncio.to_thread(host.recv, 100)
        assert data == b"optmac"
        assert net.guest_mac == new_mac and net.arp_table.lookup(GUEST_IP) == new_mac
        host.close()
    finally:
        lsock.close()
        await net.stop()


@pytest.mark.parametrize("vnet", [False, True])
async def test_syns_that_open_connections_are_handled_as_the_general_path_handles_them(monkeypatch, vnet: bool) -> None:
    """Once the guest is known, a SYN without a connection is checked and opened on the fast path: every
    corrupted header byte of it, a SYN to a closed port and one to a listener give the same replies and
    counters as on the general path."""
    monkeypatch.setattr(tcp, "_new_iss", lambda: 0x0708090A)  # same ISS in both stacks
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(512)
    port = lsock.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    nets = [UserNetwork(UserNetConfig(nameservers=()), vnet_hdr=vnet) for _ in range(2)]
    hdr = VNET_HDR.pack(NEEDS_CSUM, 0, 0, 0, 34, 16, 0) if vnet else b""
    nets[1]._tcp4_input = _no_fast_path  # type: ignore[method-assign]
    taken = [0, 0]
    real = [n._tcp4_input for n in nets]

    def counting(i: int):  # type: ignore[no-untyped-def]
        def inner(frame: memoryview) -> bool:
            ok = real[i](frame)
            taken[i] += ok
            return ok

        return inner

    nets[0]._tcp4_input = counting(0)  # type: ignore[method-assign]
    try:
        for net in nets:
            await net.start()
            iss = await _connect(net, port, hdr)  # the guest's MAC and address are known from here on
        # A duplicate ACK of that connection (no reply) after each SYN brings back the guest's MAC.
        dup = hdr + tcp_frame(GUEST_IP, SPORT, GW_IP, port, 1001, iss + 1, ACK, 0xFFFF)
        frames = []
        for sport, dport in ((41000, port), (41001, closed_port)):
            frames.append(hdr + tcp_frame(GUEST_IP, sport, GW_IP, dport, 7000, 0, SYN, 0xFFFF,
                                          opts=struct.pack("!BBH", 2, 4, 1460)))  # fmt: skip
        for off in range(58):
            # A port of its own for each: a SYN taken by mistake opens a connection the other stack lacks.
            good = tcp_frame(GUEST_IP, 41100 + off, GW_IP, port, 9000, 0, SYN, 0xFFFF, opts=MSS_1460)
            bad = bytearray(good)
            bad[off] ^= 0x41
            frames += [hdr + bytes(bad), dup]
        before = taken[0]
        for i, f in enumerate(frames):
            out = []
            for net in nets:
                net.send([memoryview(f)])
                for _ in range(3):
                    await asyncio.sleep(0)
                # A loopback connect() usually completes inside the call; on a loaded machine the
                # kernel may finish it later, and its SYN-ACK then waits for the socket's wake-up.
                async with asyncio.timeout(10):
                    while net.tcp._pending:
                        await asyncio.sleep(0.001)
                for _ in range(3):
                    await asyncio.sleep(0)
                out.append(drain(net))
            assert out[0] == out[1], f"frame {i}: different replies"
            assert nets[0].counters() == nets[1].counters(), f"frame {i}: different counters"
            assert sorted(nets[0].tcp.conns) == sorted(nets[1].tcp.conns), f"frame {i}: different connections"
        assert taken[0] - before >= 40  # the good SYNs and every corruption the fast path lets through
        assert nets[0].counters()["errors"] == 0
    finally:
        lsock.close()
        for net in nets:
            await net.stop()
