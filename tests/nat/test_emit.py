"""Segments the stack builds toward an IPv4 guest: every header field and both checksums."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.nat import UserNetConfig, UserNetwork
from appliance.nat import tcp as tcpmod
from appliance.nat.frames import pseudo_sum, verify
from appliance.nic import constants as V

from .peer import GUEST_IP, GUEST_MAC, GW_IP


class _Owner:
    def forget(self, conn: tcpmod.TcpConn) -> None:
        pass

    def established(self, conn: tcpmod.TcpConn) -> None:
        pass

    def ack_later(self, conn: tcpmod.TcpConn) -> None:
        pass

    def time_wait(self, conn: tcpmod.TcpConn) -> None:
        pass


@settings(max_examples=150, deadline=None)
@given(
    offload=st.booleans(),
    flags=st.sampled_from([0x10, 0x18, 0x11, 0x12, 0x14, 0x04]),
    seq=st.integers(0, 1 << 33),
    rcv=st.integers(0, 1 << 33),
    payload=st.binary(max_size=3000),
    opts=st.sampled_from([b"", tcpmod.SACK_PERMITTED, b"\x01\x01\x05\x0a" + bytes(8)]),
    ident=st.integers(0, 0xFFFF),
    mss=st.sampled_from([536, 1460]),
)
def test_ipv4_segment_headers_and_checksums(
    offload: bool, flags: int, seq: int, rcv: int, payload: bytes, opts: bytes, ident: int, mss: int
) -> None:
    net = UserNetwork(UserNetConfig(nameservers=()), vnet_hdr=offload)
    net.set_offloads(offload, offload, False, False, False)
    net._ident = ident
    net._loop = object()  # type: ignore[assignment]  # never used: output() only queues here
    net._ready = None
    conn = tcpmod.TcpConn(net, _Owner(), GUEST_IP, 40000, GW_IP, 8080, inbound=False)
    conn.mac = GUEST_MAC
    conn.irs, conn.rcv_nxt, conn.mss = 77, rcv, mss
    assert conn._emit(flags, seq, memoryview(payload), opts)
    item = net._out.popleft()
    vhdr, frame = item if isinstance(item, tuple) else (None, item)
    frame = bytes(frame)
    assert frame[:14] == GUEST_MAC + net.host_mac + b"\x08\x00"
    ip = frame[14:34]
    assert verify(ip), "IPv4 header checksum"
    vihl, tos, total, got_ident, frag, ttl, proto, _c, src, dst = struct.unpack("!BBHHHBBH4s4s", ip)
    assert (vihl, tos, frag, ttl, proto, src, dst) == (0x45, 0, 0x4000, 64, 6, GW_IP, GUEST_IP)
    assert total == len(frame) - 14 and got_ident == (ident + 1) & 0xFFFF
    seg = frame[34:]
    sport, dport, s, a, off, win, csum, urg = struct.unpack_from("!HHIIHHHH", seg)
    assert (sport, dport, urg) == (8080, 40000, 0)
    assert s == (conn.iss + seq) & 0xFFFFFFFF
    assert a == ((77 + rcv) & 0xFFFFFFFF if flags & 0x10 else 0)
    assert off == ((20 + len(opts)) << 10) | flags
    assert seg[20 : 20 + len(opts)] == opts and seg[20 + len(opts) :] == payload
    psum = pseudo_sum(GW_IP, GUEST_IP, 6, len(seg))
    if offload:
        # NEEDS_CSUM: the field holds the folded pseudo-header sum (virtio 1.2 §5.1.6.4).
        assert csum == (psum % 0xFFFF or 0xFFFF)
        assert vhdr is not None
        f, gso, hdr_len, gso_size, start, coff, _n = V.HDR.unpack(vhdr)
        assert (f, start, coff) == (V.HDR_F_NEEDS_CSUM, 34, 16)
        if len(payload) > mss:
            assert (gso, hdr_len, gso_size) == (V.GSO_TCPV4, 34 + 20 + len(opts), mss)
        else:
            assert (gso, hdr_len, gso_size) == (V.GSO_NONE, 0, 0)
    else:
        assert vhdr is None
        assert verify(seg, psum), "TCP checksum"
