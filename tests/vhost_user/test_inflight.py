"""Inflight I/O tracking: the records a back end keeps so its successor can
resubmit what it had in flight (vhost-user.rst "Inflight I/O tracking")."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.virtio.testing import WRITE, DriverQueue
from appliance.virtio.vhost_user import VhostUserBackend, VhostUserServer
from appliance.virtio.vhost_user import protocol as p
from tests.vhost_user.device import UpperDevice
from tests.vhost_user.frontend import GUEST_BASE, USER_BASE, FrontEnd

HDR = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC = struct.Struct("<B5xHQ")  # inflight, next, counter
SIZE = 64


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[VhostUserServer, UpperDevice, str]]:
    dev = UpperDevice(num_queues=2)
    server = VhostUserServer(tmp_path / "vu.sock", VhostUserBackend(dev, inflight=True))
    await server.start()
    yield server, dev, str(server.path)
    await server.close()


async def _get_area(fe: FrontEnd) -> tuple[int, int, mmap.mmap]:
    fe.send(p.Request.GET_INFLIGHT_FD, p.inflight(0, 0, 2, SIZE))
    # The reply carries the area's fd.
    data, anc, _, _ = await _recvmsg(fe)
    request, flags, size = p.HEADER.unpack_from(data)
    assert request == p.Request.GET_INFLIGHT_FD and size == 24
    mmap_size, offset, nq, qs = struct.unpack_from("<QQHH", data, 12)
    assert (offset, nq, qs) == (0, 2, SIZE) and mmap_size >= 2 * (16 + 16 * SIZE)
    fd = struct.unpack("i", anc[0][2][:4])[0]
    return fd, mmap_size, mmap.mmap(fd, mmap_size, flags=mmap.MAP_SHARED)


async def _recvmsg(fe: FrontEnd) -> tuple[bytes, list, int, object]:  # type: ignore[type-arg]
    import asyncio
    import socket

    loop = asyncio.get_running_loop()
    for _ in range(500):
        try:
            return fe.sock.recvmsg(4096, socket.CMSG_SPACE(4 * 8))  # type: ignore[return-value]
        except BlockingIOError:
            await asyncio.sleep(0.01)
    del loop
    raise TimeoutError("no reply")


async def _setup_ring(fe: FrontEnd, q: DriverQueue, base: int) -> None:
    u = USER_BASE - GUEST_BASE
    assert await fe.acked(p.Request.SET_VRING_NUM, p.vring_state(0, SIZE)) == 0
    assert await fe.acked(p.Request.SET_VRING_BASE, p.vring_state(0, base)) == 0
    addr = p.vring_addr(0, 0, q.desc_addr + u, q.used_addr + u, q.avail_addr + u)
    assert await fe.acked(p.Request.SET_VRING_ADDR, addr) == 0
    call, kick = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    assert await fe.acked(p.Request.SET_VRING_CALL, p.u64(0), [call]) == 0
    assert await fe.acked(p.Request.SET_VRING_KICK, p.u64(0), [kick]) == 0
    fe.queues[0], fe.kicks[0], fe.calls[0] = q, kick, call
    assert await fe.acked(p.Request.SET_VRING_ENABLE, p.vring_state(0, 1)) == 0


async def test_requests_are_recorded_and_cleared(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    fd, size, area = await _get_area(fe)
    assert HDR.unpack_from(area, 0)[1:3] == (1, SIZE)
    assert await fe.acked(p.Request.SET_INFLIGHT_FD, p.inflight(size, 0, 2, SIZE), [fd]) == 0
    q = DriverQueue.at(fe.mem, fe.alloc(DriverQueue.ring_bytes(SIZE), 4096), SIZE)
    await _setup_ring(fe, q, 0)
    for text in (b"abc", b"defg"):
        src, dst = fe.alloc(8), fe.alloc(8)
        fe.mem.write(src, text)
        head = q.add_chain([(src, len(text), 0), (dst, len(text), WRITE)])
        fe.kick(0)
        await fe.wait_call(0)
        assert fe.mem.read(dst, len(text)) == text.upper()
        inflight, _nxt, counter = DESC.unpack_from(area, 16 + 16 * head)
        assert inflight == 0 and counter > 0
        assert HDR.unpack_from(area, 0)[3:] == (head, q.used_idx)
    os.close(fd)
    fe.close()


async def test_successor_resubmits_inflight_requests_in_fetch_order(served) -> None:  # type: ignore[no-untyped-def]
    """A back end died with two requests in flight and one completed: the next
    one answers the two (oldest fetch first) and leaves the completed one alone."""
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    fd, size, area = await _get_area(fe)
    q = DriverQueue.at(fe.mem, fe.alloc(DriverQueue.ring_bytes(SIZE), 4096), SIZE)
    heads, dsts = [], []
    for text in (b"done", b"second", b"first"):
        src, dst = fe.alloc(8), fe.alloc(8)
        fe.mem.write(src, text)
        heads.append(q.add_chain([(src, len(text), 0), (dst, len(text), WRITE)]))
        dsts.append(dst)
    # What the dead back end left: heads[0] completed (used idx 1), heads[2]
    # fetched before heads[1], both still in flight.
    fe.mem.write(q.used_addr + 4, struct.pack("<II", heads[0], 4))
    fe.mem.write_u16(q.used_addr + 2, 1)
    fe.mem.write(dsts[0], b"DONE")
    HDR.pack_into(area, 0, 0, 1, SIZE, heads[0], 1)
    DESC.pack_into(area, 16 + 16 * heads[0], 0, 0, 3)
    DESC.pack_into(area, 16 + 16 * heads[2], 1, 0, 5)
    DESC.pack_into(area, 16 + 16 * heads[1], 1, 0, 7)

    assert await fe.acked(p.Request.SET_INFLIGHT_FD, p.inflight(size, 0, 2, SIZE), [fd]) == 0
    await _setup_ring(fe, q, 1)  # QEMU restores the base to the used index after a crash
    await fe.wait_call(0)
    assert q.used() == [(heads[0], 4), (heads[2], 5), (heads[1], 6)]
    assert fe.mem.read(dsts[2], 5) == b"FIRST" and fe.mem.read(dsts[1], 6) == b"SECOND"
    assert dev.requests[0] == 2
    # New requests continue after the resubmitted ones.
    src, dst = fe.alloc(8), fe.alloc(8)
    fe.mem.write(src, b"next")
    head = q.add_chain([(src, 4, 0), (dst, 4, WRITE)])
    fe.kick(0)
    await fe.wait_call(0)
    assert q.used() == [(head, 4)]
    assert await fe.get_vring_base(0) == 4
    os.close(fd)
    fe.close()


async def test_a_base_at_the_avail_index_does_not_skip_unfetched_requests(served) -> None:  # type: ignore[no-untyped-def]
    """Cloud Hypervisor reconnects with SET_VRING_BASE at the guest's avail index. The dead
    back end had fetched one request of two: that one is resubmitted, and the one it never
    fetched is served after it, not skipped."""
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    fd, size, area = await _get_area(fe)
    q = DriverQueue.at(fe.mem, fe.alloc(DriverQueue.ring_bytes(SIZE), 4096), SIZE)
    heads, dsts = [], []
    for text in (b"fetched", b"waiting"):
        src, dst = fe.alloc(8), fe.alloc(8)
        fe.mem.write(src, text)
        heads.append(q.add_chain([(src, len(text), 0), (dst, len(text), WRITE)]))
        dsts.append(dst)
    HDR.pack_into(area, 0, 0, 1, SIZE, 0, 0)
    DESC.pack_into(area, 16 + 16 * heads[0], 1, 0, 1)
    assert await fe.acked(p.Request.SET_INFLIGHT_FD, p.inflight(size, 0, 2, SIZE), [fd]) == 0
    await _setup_ring(fe, q, 2)
    fe.kick(0)
    got: list[tuple[int, int]] = []
    for _ in range(2):
        if len(got) < 2:
            await fe.wait_call(0)
            got += q.used()
    assert got == [(heads[0], 7), (heads[1], 7)]
    assert fe.mem.read(dsts[1], 7) == b"WAITING"
    assert await fe.get_vring_base(0) == 2
    os.close(fd)
    fe.close()


async def test_a_crash_during_the_used_update_is_repaired(served) -> None:  # type: ignore[no-untyped-def]
    """The used index moved but the record did not: the last batch completed."""
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    fd, size, area = await _get_area(fe)
    q = DriverQueue.at(fe.mem, fe.alloc(DriverQueue.ring_bytes(SIZE), 4096), SIZE)
    src, dst = fe.alloc(8), fe.alloc(8)
    fe.mem.write(src, b"once")
    head = q.add_chain([(src, 4, 0), (dst, 4, WRITE)])
    fe.mem.write(q.used_addr + 4, struct.pack("<II", head, 4))
    fe.mem.write_u16(q.used_addr + 2, 1)
    HDR.pack_into(area, 0, 0, 1, SIZE, head, 0)  # used_idx not yet updated
    DESC.pack_into(area, 16 + 16 * head, 1, 0, 9)  # nor the inflight flag
    assert await fe.acked(p.Request.SET_INFLIGHT_FD, p.inflight(size, 0, 2, SIZE), [fd]) == 0
    await _setup_ring(fe, q, 1)
    assert dev.requests[0] == 0
    assert q.used() == [(head, 4)]
    assert HDR.unpack_from(area, 0)[4] == 1
    os.close(fd)
    fe.close()


async def test_inflight_is_offered_only_when_asked_for(tmp_path: Path) -> None:
    async with VhostUserServer(tmp_path / "x.sock", VhostUserBackend(UpperDevice())) as server:
        fe = await FrontEnd.connect(str(server.path))
        proto = int.from_bytes(await fe.call(p.Request.GET_PROTOCOL_FEATURES), "little")
        assert not proto >> p.ProtocolFeature.INFLIGHT_SHMFD & 1
        assert await fe.call(p.Request.GET_INFLIGHT_FD, p.inflight(0, 0, 2, SIZE)) == b""
        fe.close()
