"""A guest played by the test: Ethernet/ARP/IPv4 and a compact TCP, driving a UserNetwork by frames.

This is deliberately an independent implementation (its own header packing
and checksum) so the stack is checked against something other than itself.
It has what a guest needs to move bulk data over an imperfect link:
go-back-N retransmission with a fixed-then-doubling timeout, fast retransmit
on three duplicate ACKs, an out-of-order queue, window scaling and FIN both
ways. ``Link`` can drop, duplicate and reorder frames in each direction,
and with ``vnet=True`` plays a virtio-net driver that negotiated checksum and
TCP segmentation offload: its TCP segments go out with a partial checksum and
a ``virtio_net_hdr``, and segments from the stack are checked against theirs.
"""

from __future__ import annotations

import array
import asyncio
import os
import random
import struct
import sys
import time
from collections.abc import Callable

from appliance.nat import UserNetwork

GUEST_MAC = b"\x52\x54\x00\x12\x34\x56"
GW_MAC = b"\x52\x55\x0a\x00\x02\x02"
GUEST_IP = bytes([10, 0, 2, 15])
GW_IP = bytes([10, 0, 2, 2])
M32 = 0xFFFFFFFF
FIN, SYN, RST, PSH, ACK = 1, 2, 4, 8, 16
# virtio 1.2 §5.1.6: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
VNET_HDR = struct.Struct("<BBHHHHH")
NEEDS_CSUM = 1
GSO_TCPV4 = 1


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    a = array.array("H", data)
    if sys.byteorder == "little":
        a.byteswap()
    s = sum(a)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip_packet(src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 0, frag: int = 0x4000) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, 64, proto, 0, src, dst))
    struct.pack_into("!H", hdr, 10, csum(bytes(hdr)))
    return bytes(hdr) + payload


def tcp_flags(frame: bytes) -> int:
    """The TCP flags of an IPv4 frame without IP options, or -1 when it is not one."""
    return frame[14 + 20 + 13] if len(frame) >= 54 and frame[12:14] == b"\x08\x00" and frame[23] == 6 else -1


def eth(dst: bytes, src: bytes, ethertype: int, body: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + body


def tcp_frame(
    src: bytes, sport: int, dst: bytes, dport: int, seq: int, ack: int, flags: int, win: int,
    payload: bytes = b"", opts: bytes = b"",
) -> bytes:  # fmt: skip
    hlen = 20 + len(opts)
    hdr = struct.pack("!HHIIHHHH", sport, dport, seq & M32, ack & M32, (hlen // 4) << 12 | flags, win, 0, 0) + opts
    seg = bytearray(hdr + payload)
    pseudo = struct.pack("!4s4sBBH", src, dst, 0, 6, len(seg))
    struct.pack_into("!H", seg, 16, csum(pseudo + bytes(seg)))
    return eth(GW_MAC, GUEST_MAC, 0x0800, ip_packet(src, dst, 6, bytes(seg)))


class Link:
    """The wire between the test guest and the stack, optionally lossy in both directions."""

    def __init__(self, net: UserNetwork, *, loss: float = 0.0, seed: int = 1, vnet: bool = False) -> None:
        self.net = net
        self.vnet = vnet
        self.headers: list[tuple[int, int, int, int, int, int, int]] = []  # vnet headers seen from the stack
        self.partial_from_stack = 0
        self.loss = loss
        self.rng = random.Random(seed)
        self._held_in: bytes | None = None
        self._held_out: bytes | None = None
        self._buf = bytearray(256 * 1024)
        self._mv = memoryview(self._buf)
        self.drop_from_stack: Callable[[bytes], bool] | None = None  # targeted loss for tests
        self.ready = asyncio.Event()
        net.set_ready_callback(self.ready.set)
        self.sent = 0

    def _mangle(self, frame: bytes, held: bytes | None) -> tuple[list[bytes], bytes | None]:
        """Apply drop / duplicate / reorder, each with probability ``loss``."""
        if not self.loss:
            return [frame], None
        r = self.rng.random()
        out: list[bytes] = []
        if r < self.loss:
            return ([held] if held else []), None  # dropped
        if r < 2 * self.loss:
            out = [frame, frame]
        elif r < 3 * self.loss and held is None:
            return [], frame  # held back: goes out after the next one
        else:
            out = [frame]
        if held is not None:
            out.append(held)
        return out, None

    def _offload(self, frame: bytes) -> bytes:
        """What a driver with CSUM/HOST_TSO4 sends: the TCP checksum left partial, a header saying so."""
        if frame[12:14] != b"\x08\x00" or frame[23] != 6:
            return bytes(VNET_HDR.size) + frame
        ihl = (frame[14] & 15) * 4
        total = int.from_bytes(frame[16:18], "big")
        start = 14 + ihl
        seg = bytearray(frame[start : 14 + total])
        pseudo = struct.pack("!4s4sBBH", frame[26:30], frame[30:34], 0, 6, len(seg))
        struct.pack_into("!H", seg, 16, ~csum(pseudo) & 0xFFFF)  # folded, not complemented
        payload = len(seg) - (seg[12] >> 4) * 4
        gso = GSO_TCPV4 if payload > 1460 else 0
        hdr = VNET_HDR.pack(NEEDS_CSUM, gso, start + (seg[12] >> 4) * 4, 1460 if gso else 0, start, 16, 0)
        return hdr + frame[:start] + bytes(seg)

    def to_stack(self, frame: bytes) -> None:
        frames, self._held_in = self._mangle(frame, self._held_in)
        for f in frames:
            self.sent += 1
            self.net.send([memoryview(self._offload(f) if self.vnet else f)])

    def _complete(self, raw: bytes) -> bytes:
        """Strip the stack's vnet header and finish a partial checksum, as a NIC forwarding it would."""
        hdr = VNET_HDR.unpack_from(raw)
        self.headers.append(hdr)
        frame = bytearray(raw[VNET_HDR.size :])
        flags, _gso, _hl, _gs, start, off, _nb = hdr
        if flags & NEEDS_CSUM:
            self.partial_from_stack += 1
            c = csum(bytes(frame[start:]))
            struct.pack_into("!H", frame, start + off, c or 0xFFFF)
        return bytes(frame)

    def from_stack(self) -> list[bytes]:
        out: list[bytes] = []
        while True:
            n = self.net.recv_into([self._mv])
            if n < 0:
                break
            frame = bytes(self._mv[:n])
            if self.vnet:
                frame = self._complete(frame)
            if self.drop_from_stack is not None and self.drop_from_stack(frame):
                continue
            frames, self._held_out = self._mangle(frame, self._held_out)
            out.extend(frames)
        if self._held_out is not None and not out:
            out.append(self._held_out)
            self._held_out = None
        return out

    def flush(self) -> None:
        if self._held_in is not None:
            f, self._held_in = self._held_in, None
            self.net.send([memoryview(f)])


class GuestTcp:
    """One TCP connection of the test guest."""

    RTO = 0.05
    RWND = 1 << 20
    WSCALE = 7

    def __init__(self, guest: Guest, lport: int, rip: bytes, rport: int, mss: int = 1460) -> None:
        self.g = guest
        self.lport, self.rip, self.rport = lport, rip, rport
        self.iss = int.from_bytes(os.urandom(4), "big")
        self.state = "CLOSED"
        self.mss = mss
        self.peer_mss = 536
        self.snd_una = 0
        self.snd_nxt = 0
        self.sndbuf = bytearray()  # bytes from seq max(snd_una, 1)
        self.fin_wanted = False
        self.fin_acked = False
        self.peer_wnd = 0
        self.peer_shift = 0
        self.irs = 0
        self.rcv_nxt = 0
        self.rx = bytearray()
        self.ooo: dict[int, bytes] = {}
        self.fin_rcvd = False
        self.reset = False
        self.deadline = 0.0
        self.rto = self.RTO
        self.dup = 0
        self.on_data: Callable[[bytes], None] | None = None
        self.window_override: int | None = None
        self.probes_seen = 0
        self.tso = False  # send segments of up to 64 KiB (a driver with HOST_TSO4), not the peer's MSS
        self.changed = asyncio.Event()

    # wire helpers
    def _send(self, flags: int, seq: int, payload: bytes = b"", opts: bytes = b"") -> None:
        if self.window_override is not None:
            win = self.window_override
        else:
            win = min((self.RWND - len(self.rx)) >> (self.WSCALE if self.peer_shift is not None else 0), 0xFFFF)
        if flags & SYN:
            win = 0xFFFF
        ack = (self.irs + self.rcv_nxt) if flags & ACK else 0
        self.g.link.to_stack(
            tcp_frame(self.g.ip, self.lport, self.rip, self.rport, self.iss + seq, ack, flags, win, payload, opts)
        )

    def _syn_opts(self) -> bytes:
        return struct.pack("!BBH", 2, 4, self.mss) + bytes([1, 3, 3, self.WSCALE])

    def connect(self) -> None:
        self.state = "SYN_SENT"
        self._send(SYN, 0, opts=self._syn_opts())
        self.snd_nxt = 1
        self.deadline = time.monotonic() + 0.2

    def _data_base(self) -> int:
        return max(self.snd_una, 1)

    def write(self, data: bytes) -> None:
        self.sndbuf += data
        self.pump()

    def shutdown(self) -> None:
        self.fin_wanted = True
        self.pump()

    def abort(self) -> None:
        self._send(RST | ACK, self.snd_nxt)
        self.state = "CLOSED"

    def unacked(self) -> int:
        return len(self.sndbuf) + (1 if self.fin_wanted and not self.fin_acked else 0)

    def pump(self) -> None:
        if self.state not in ("ESTABLISHED", "CLOSE_WAIT"):
            return
        end = self._data_base() + len(self.sndbuf)
        wnd = self.peer_wnd
        while self.snd_nxt < end:
            room = self.snd_una + wnd - self.snd_nxt
            k = min(44 * 1460 if self.tso else self.peer_mss, end - self.snd_nxt, room)
            if k <= 0:
                break
            off = self.snd_nxt - self._data_base()
            self._send(ACK | PSH, self.snd_nxt, bytes(self.sndbuf[off : off + k]))
            self.snd_nxt += k
        if self.fin_wanted and not self.fin_acked and self.snd_nxt == end:
            self._send(FIN | ACK, end)
            self.snd_nxt = end + 1
        if (self.snd_nxt > self.snd_una or self.snd_nxt < end) and not self.deadline:
            # Retransmission timer, or the persist timer when a closed window holds data back.
            self.deadline = time.monotonic() + self.rto

    def timer(self, now: float) -> None:
        if not self.deadline or now < self.deadline:
            return
        self.deadline = 0.0
        if self.state in ("SYN_SENT", "LISTEN_SYN"):
            flags = SYN if self.state == "SYN_SENT" else SYN | ACK
            self._send(flags, 0, opts=self._syn_opts())
            self.deadline = now + 0.2
            return
        if self.state not in ("ESTABLISHED", "CLOSE_WAIT"):
            return
        if self.snd_nxt > self.snd_una:
            self.snd_nxt = self.snd_una
            self.rto = min(self.rto * 2, 1.0)
            self.pump()
        unsent = self._data_base() + len(self.sndbuf) - self.snd_nxt
        if self.snd_nxt == self.snd_una and unsent > 0:
            # Zero-window probe: one byte, so a lost window update cannot stall us.
            off = self.snd_nxt - self._data_base()
            self._send(ACK, self.snd_nxt, bytes(self.sndbuf[off : off + 1]))
        if self.snd_nxt > self.snd_una or unsent > 0:
            self.deadline = now + self.rto

    def segment(self, seq_w: int, ack_w: int, flags: int, win: int, payload: bytes, opts: bytes) -> None:
        if flags & RST:
            if self.state == "SYN_SENT" and not (flags & ACK and (ack_w - self.iss) & M32 == 1):
                return
            if self.state != "SYN_SENT" and (seq_w - self.irs - self.rcv_nxt) & M32 != 0:
                return
            self.reset = True
            self.state = "CLOSED"
            self.changed.set()
            return
        if self.state == "SYN_SENT":
            if flags & SYN and flags & ACK and (ack_w - self.iss) & M32 == 1:
                self.irs = seq_w
                self.rcv_nxt = 1
                self._opts(opts)
                self.snd_una = 1
                self.peer_wnd = win
                self.state = "ESTABLISHED"
                self.deadline = 0.0
                self._send(ACK, 1)
                self.changed.set()
                self.pump()
            return
        if self.state == "LISTEN_SYN":  # passive open: we got a SYN and answered SYN-ACK
            if flags & SYN and not flags & ACK:
                self._send(SYN | ACK, 0, opts=self._syn_opts())
                return
            if flags & ACK and (ack_w - self.iss) & M32 == 1:
                self.state = "ESTABLISHED"
                self.snd_una = 1
                self.snd_nxt = max(self.snd_nxt, 1)
                self.deadline = 0.0
                self.changed.set()
            else:
                return
        if flags & SYN:
            self._send(ACK, self.snd_nxt)
            return
        # ACK processing
        ack = self.snd_una + (((ack_w - self.iss - self.snd_una) + 0x80000000) & M32) - 0x80000000
        if ack > self.snd_una and ack <= self.snd_nxt:
            base = self._data_base()
            data_end = base + len(self.sndbuf)
            acked = min(ack, data_end) - base
            if acked > 0:
                del self.sndbuf[:acked]
            if self.fin_wanted and ack == data_end + 1:
                self.fin_acked = True
            self.snd_una = ack
            self.dup = 0
            self.rto = self.RTO
            self.deadline = time.monotonic() + self.rto if self.snd_nxt > self.snd_una else 0.0
            self.changed.set()
        elif ack == self.snd_una and not payload and self.snd_nxt > self.snd_una:
            self.dup += 1
            if self.dup == 3:
                end = self._data_base() + len(self.sndbuf)
                k = min(self.peer_mss, end - self.snd_una)
                if k > 0:
                    self._send(ACK, self.snd_una, bytes(self.sndbuf[:k]))
        self.peer_wnd = win << self.peer_shift
        # data
        seq = self.rcv_nxt + (((seq_w - self.irs - self.rcv_nxt) + 0x80000000) & M32) - 0x80000000
        if payload and self.window_override == 0:
            self.probes_seen += 1
            self._send(ACK, self.snd_nxt)  # a closed window: the byte is refused, the window restated
            return
        need_ack = bool(payload)
        if payload:
            if seq <= self.rcv_nxt < seq + len(payload):
                self._take(payload[self.rcv_nxt - seq :])
                for s in sorted(self.ooo):
                    if s > self.rcv_nxt:
                        break
                    d = self.ooo.pop(s)
                    if s + len(d) > self.rcv_nxt:
                        self._take(d[self.rcv_nxt - s :])
            elif seq > self.rcv_nxt:
                self.ooo[seq] = payload
                self._send(ACK, self.snd_nxt)  # duplicate ACK at once, as real stacks do
                need_ack = False
            else:
                self._send(ACK, self.snd_nxt)
                need_ack = False
        if flags & FIN and seq + len(payload) == self.rcv_nxt and not self.fin_rcvd:
            self.fin_rcvd = True
            self.rcv_nxt += 1
            need_ack = True
            self.state = "CLOSE_WAIT" if self.state == "ESTABLISHED" else self.state
            self.changed.set()
        elif flags & FIN:
            need_ack = True
        if need_ack:
            self.g.ack_soon(self)
        self.pump()

    def _take(self, data: bytes) -> None:
        self.rcv_nxt += len(data)
        if self.on_data is not None:
            self.on_data(data)
        else:
            self.rx += data
        self.changed.set()

    def _opts(self, opts: bytes) -> None:
        i = 0
        self.peer_shift = 0
        while i < len(opts):
            k = opts[i]
            if k == 0:
                break
            if k == 1:
                i += 1
                continue
            n = opts[i + 1]
            if k == 2:
                self.peer_mss = int.from_bytes(opts[i + 2 : i + 4], "big")
            if k == 3:
                self.peer_shift = opts[i + 2]
            i += n

    def read(self) -> bytes:
        data = bytes(self.rx)
        self.rx.clear()
        self.g.ack_soon(self)  # window update
        return data

    async def wait(self, cond: Callable[[], bool], timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                self.changed.clear()
                await self.changed.wait()


class Guest:
    """The test guest: answers ARP, demultiplexes TCP and UDP, runs TCP timers."""

    def __init__(
        self, net: UserNetwork, *, loss: float = 0.0, seed: int = 1, ip: bytes = GUEST_IP, vnet: bool = False
    ) -> None:
        self.net = net
        self.ip = ip
        self.link = Link(net, loss=loss, seed=seed, vnet=vnet)
        self.tcp: dict[tuple[int, bytes, int], GuestTcp] = {}
        self.listeners: dict[int, list[GuestTcp]] = {}
        self.udp: list[tuple[bytes, int, int, bytes]] = []  # src, sport, dport, payload
        self.other: list[bytes] = []
        self._acks: dict[GuestTcp, None] = {}
        self._task: asyncio.Task[None] | None = None
        self._next_port = 40000
        self.bad_checksums = 0
        self._closing = False

    async def __aenter__(self) -> Guest:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        # A flag rather than cancel(): 3.11's wait_for() can swallow a cancellation.
        self._closing = True
        self.link.ready.set()
        await self._task

    def ack_soon(self, c: GuestTcp) -> None:
        self._acks[c] = None

    def connect(self, rip: bytes, rport: int, mss: int = 1460) -> GuestTcp:
        self._next_port += 1
        c = GuestTcp(self, self._next_port, rip, rport, mss)
        self.tcp[(c.lport, rip, rport)] = c
        c.connect()
        return c

    def listen(self, port: int) -> list[GuestTcp]:
        return self.listeners.setdefault(port, [])

    async def _run(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self.link.ready.wait(), 0.01)
            except TimeoutError:
                pass
            self.link.ready.clear()
            self.poll()
            await asyncio.sleep(0)

    def poll(self) -> None:
        for frame in self.link.from_stack():
            self.handle(frame)
        for c in list(self._acks):
            if c.state != "CLOSED":
                c._send(ACK, c.snd_nxt)
        self._acks.clear()
        now = time.monotonic()
        for c in list(self.tcp.values()):
            c.timer(now)
        self.link.flush()

    def handle(self, frame: bytes) -> None:
        if len(frame) < 14:
            return
        et = int.from_bytes(frame[12:14], "big")
        if et == 0x0806:
            op = int.from_bytes(frame[20:22], "big")
            tpa = frame[38:42]
            if op == 1 and tpa == self.ip:
                reply = struct.pack("!HHBBH6s4s6s4s", 1, 0x800, 6, 4, 2, GUEST_MAC, self.ip, frame[22:28], frame[28:32])
                self.link.to_stack(eth(frame[6:12], GUEST_MAC, 0x0806, reply))
            return
        if et != 0x0800:
            self.other.append(frame)
            return
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        total = int.from_bytes(ip[2:4], "big")
        if csum(ip[:ihl]) != 0:
            self.bad_checksums += 1
            return
        proto, src, dst = ip[9], ip[12:16], ip[16:20]
        body = ip[ihl:total]
        pseudo = struct.pack("!4s4sBBH", src, dst, 0, proto, len(body))
        if proto == 6:
            if csum(pseudo + body) != 0:
                self.bad_checksums += 1
                return
            sport, dport, seq, ack, offfl, win = struct.unpack_from("!HHIIHH", body)
            doff = (offfl >> 12) * 4
            flags = offfl & 0x3F
            c = self.tcp.get((dport, src, sport))
            if c is None:
                if flags & SYN and not flags & ACK and dport in self.listeners:
                    c = GuestTcp(self, dport, src, sport)
                    c.irs = seq
                    c.rcv_nxt = 1
                    c._opts(body[20:doff])
                    c.peer_wnd = win
                    c.state = "LISTEN_SYN"
                    self.tcp[(dport, src, sport)] = c
                    c._send(SYN | ACK, 0, opts=c._syn_opts())
                    c.snd_nxt = 1
                    c.deadline = time.monotonic() + 0.2
                    self.listeners[dport].append(c)
                return
            c.segment(seq, ack, flags, win, body[doff:], body[20:doff])
        elif proto == 17:
            if int.from_bytes(body[6:8], "big") and csum(pseudo + body) != 0:
                self.bad_checksums += 1
                return
            sport, dport = struct.unpack_from("!HH", body)
            self.udp.append((src, sport, dport, body[8:]))
        else:
            self.other.append(frame)

    def send_udp(self, dst: bytes, sport: int, dport: int, payload: bytes) -> None:
        udp = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
        pseudo = struct.pack("!4s4sBBH", self.ip, dst, 0, 17, len(udp))
        struct.pack_into("!H", udp, 6, csum(pseudo + bytes(udp)) or 0xFFFF)
        self.link.to_stack(eth(GW_MAC, GUEST_MAC, 0x0800, ip_packet(self.ip, dst, 17, bytes(udp))))
