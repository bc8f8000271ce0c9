"""A minimal vhost-user front end for tests: QEMU's half of the protocol.

It shares a memfd as guest RAM (mapped here too, so the test plays the guest
driver with :mod:`appliance.virtio.testing`) and speaks to the server over the
unix socket with SCM_RIGHTS, including the malformed messages QEMU never sends.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import struct

from appliance.kvm.memory import GuestMemory, MemoryRegion
from appliance.virtio.device import VIRTIO_F_EVENT_IDX
from appliance.virtio.testing import DriverQueue
from appliance.virtio.vhost_user import protocol as p

# Where the "front end process" has guest RAM mapped: ring addresses are sent
# as these user addresses, and the back end must translate them.
USER_BASE = 0x7F00_0000_0000
GUEST_BASE = 0x10_0000


class FrontEnd:
    def __init__(self, sock: socket.socket, mem_size: int = 4 << 20) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.memfd = os.memfd_create("guest-ram", 0)
        os.ftruncate(self.memfd, mem_size)
        self.map = mmap.mmap(self.memfd, mem_size, flags=mmap.MAP_SHARED)
        self.mem = GuestMemory([MemoryRegion(GUEST_BASE, self.map, user_addr=USER_BASE)])
        self.region = p.MemRegion(GUEST_BASE, mem_size, USER_BASE, 0)
        self._next = GUEST_BASE + 0x1000
        self.queues: dict[int, DriverQueue] = {}
        self.kicks: dict[int, int] = {}
        self.calls: dict[int, int] = {}

    @classmethod
    async def connect(cls, path: str, mem_size: int = 4 << 20) -> FrontEnd:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
        return cls(sock, mem_size)

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self._next + align - 1) & ~(align - 1)
        self._next = addr + size
        return addr

    def close(self) -> None:
        self.sock.close()
        for fd in [*self.kicks.values(), *self.calls.values()]:
            os.close(fd)
        self.kicks.clear()
        self.calls.clear()
        self.mem.close()
        os.close(self.memfd)

    # -- raw messages ----------------------------------------------------

    def send_raw(self, data: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def send(self, request: int, payload: bytes = b"", fds: list[int] = (), *, need_reply: bool = False) -> None:  # type: ignore[assignment]
        flags = p.FLAG_NEED_REPLY if need_reply else 0
        self.send_raw(p.encode(request, payload, reply=False, flags=flags), list(fds))

    async def recv_reply(self, timeout: float = 5.0) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        hdr = await asyncio.wait_for(self._read(p.HEADER_SIZE), timeout)
        request, flags, size = p.HEADER.unpack(hdr)
        assert flags & p.FLAG_REPLY, "back end sent a message that is not a reply"
        payload = await asyncio.wait_for(self._read(size), timeout) if size else b""
        del loop
        return request, payload

    async def _read(self, n: int) -> bytes:
        buf = b""
        loop = asyncio.get_running_loop()
        while len(buf) < n:
            chunk = await loop.sock_recv(self.sock, n - len(buf))
            if not chunk:
                raise ConnectionResetError("back end closed the connection")
            buf += chunk
        return buf

    async def call(self, request: int, payload: bytes = b"", fds: list[int] = ()) -> bytes:  # type: ignore[assignment]
        """A request whose definition includes a reply."""
        self.send(request, payload, fds)
        req, body = await self.recv_reply()
        assert req == request
        return body

    async def acked(self, request: int, payload: bytes = b"", fds: list[int] = ()) -> int:  # type: ignore[assignment]
        """Send with NEED_REPLY and return the REPLY_ACK status (0 = success)."""
        self.send(request, payload, fds, need_reply=True)
        req, body = await self.recv_reply()
        assert req == request and len(body) == 8
        return int.from_bytes(body, "little")

    # -- the usual start-up sequence (what QEMU's vhost_dev_start does) ----

    async def negotiate(self, features: int | None = None) -> int:
        offered = int.from_bytes(await self.call(p.Request.GET_FEATURES), "little")
        proto = int.from_bytes(await self.call(p.Request.GET_PROTOCOL_FEATURES), "little")
        self.send(p.Request.SET_PROTOCOL_FEATURES, p.u64(proto))
        self.send(p.Request.SET_OWNER)
        # The fake driver does not maintain used_event, so EVENT_IDX stays off by default.
        feats = offered & ~(1 << VIRTIO_F_EVENT_IDX) if features is None else features
        assert await self.acked(p.Request.SET_FEATURES, p.u64(feats)) == 0
        assert await self.acked(p.Request.SET_MEM_TABLE, p.mem_table([self.region]), [self.memfd]) == 0
        return feats

    async def start_ring(
        self, index: int, size: int = 64, base: int = 0, *, event_idx: bool = False, enable: bool = True
    ) -> DriverQueue:
        ring_base = self.alloc(DriverQueue.ring_bytes(size), 4096)
        q = DriverQueue.at(self.mem, ring_base, size, event_idx=event_idx)
        if base:
            q.set_avail_idx(base)
            q.last_used = base
            self.mem.write_u16(q.used_addr + 2, base)
        u = USER_BASE - GUEST_BASE
        assert await self.acked(p.Request.SET_VRING_NUM, p.vring_state(index, size)) == 0
        assert await self.acked(p.Request.SET_VRING_BASE, p.vring_state(index, base)) == 0
        addr = p.vring_addr(index, 0, q.desc_addr + u, q.used_addr + u, q.avail_addr + u)
        assert await self.acked(p.Request.SET_VRING_ADDR, addr) == 0
        call = os.eventfd(0, os.EFD_NONBLOCK)
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        assert await self.acked(p.Request.SET_VRING_CALL, p.u64(index), [call]) == 0
        assert await self.acked(p.Request.SET_VRING_KICK, p.u64(index), [kick]) == 0
        if enable:
            assert await self.acked(p.Request.SET_VRING_ENABLE, p.vring_state(index, 1)) == 0
        self.queues[index], self.kicks[index], self.calls[index] = q, kick, call
        return q

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kicks[index], 1)

    async def wait_call(self, index: int, timeout: float = 5.0) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                return os.eventfd_read(self.calls[index])
            except BlockingIOError:
                if loop.time() > deadline:
                    raise TimeoutError(f"no interrupt on ring {index}") from None
                await asyncio.sleep(0.002)

    async def get_vring_base(self, index: int) -> int:
        body = await self.call(p.Request.GET_VRING_BASE, p.vring_state(index, 0))
        i, num = struct.unpack("<II", body)
        assert i == index
        return num
