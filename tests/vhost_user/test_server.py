"""The vhost-user server and back end against a Python front end.

The front end shares a memfd as guest RAM, lays out rings with the fake guest
driver and speaks the protocol over the unix socket, including the malformed
messages, bad fds and abrupt disconnects a real front end might produce.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.virtio.testing import WRITE
from appliance.virtio.vhost_user import VhostUserBackend, VhostUserServer
from appliance.virtio.vhost_user import protocol as p
from tests.vhost_user.device import UpperDevice
from tests.vhost_user.frontend import FrontEnd


@pytest.fixture(params=[False, True], ids=["gil-kept", "single-threaded"])
async def served(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[VhostUserServer, UpperDevice, str]]:
    """Both ways of reading kicks: the ctypes read that keeps the GIL, and the net daemon's."""
    dev = UpperDevice(num_queues=2)
    server = VhostUserServer(tmp_path / "vu.sock", VhostUserBackend(dev, single_threaded=request.param))
    await server.start()
    yield server, dev, str(server.path)
    await server.close()


async def _until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


async def _roundtrip(fe: FrontEnd, index: int, text: bytes) -> bytes:
    q = fe.queues[index]
    src = fe.alloc(len(text))
    dst = fe.alloc(len(text))
    fe.mem.write(src, text)
    head = q.add_chain([(src, len(text), 0), (dst, len(text), WRITE)])
    fe.kick(index)
    await fe.wait_call(index)
    assert q.used() == [(head, len(text))]
    return fe.mem.read(dst, len(text))


async def test_negotiation_offers_protocol_features_mq_and_config(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    feats = int.from_bytes(await fe.call(p.Request.GET_FEATURES), "little")
    assert feats >> p.VHOST_USER_F_PROTOCOL_FEATURES & 1
    assert feats & dev.device_features() == dev.device_features()
    proto = int.from_bytes(await fe.call(p.Request.GET_PROTOCOL_FEATURES), "little")
    for bit in (p.ProtocolFeature.MQ, p.ProtocolFeature.REPLY_ACK, p.ProtocolFeature.CONFIG):
        assert proto >> bit & 1
    assert not proto >> p.ProtocolFeature.LOG_SHMFD & 1  # no migration support
    fe.send(p.Request.SET_PROTOCOL_FEATURES, p.u64(proto))
    assert int.from_bytes(await fe.call(p.Request.GET_QUEUE_NUM), "little") == 2
    body = await fe.call(p.Request.GET_CONFIG, p.config(0, 8))
    assert body == p.config(0, 8, 0, b"UPPERCFG")
    assert await fe.acked(p.Request.SET_CONFIG, p.config(0, 2, 0, b"up")) == 0
    assert dev.config == bytearray(b"upPERCFG")
    # Flags other than front end (0) and migration (1) are refused, not acknowledged and dropped.
    assert await fe.acked(p.Request.SET_CONFIG, p.config(0, 2, 0x8, b"xx")) != 0
    assert dev.config == bytearray(b"upPERCFG")
    assert int.from_bytes(await fe.call(p.Request.GET_QUEUE_NUM), "little") == 2  # still connected
    fe.close()


async def test_requests_flow_through_both_rings_with_interrupts(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    await fe.start_ring(0)
    await fe.start_ring(1)
    assert server.backend.active_queues == (0, 1)
    assert await _roundtrip(fe, 0, b"hello ring zero") == b"HELLO RING ZERO"
    assert await _roundtrip(fe, 1, b"and ring one") == b"AND RING ONE"
    assert dev.requests == [1, 1]
    assert [r.kicks for r in server.backend.rings] == [1, 1]
    fe.close()


async def test_unknown_request_gets_a_failed_ack_and_the_session_continues(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    assert await fe.acked(999, b"junk") != 0
    assert await fe.acked(p.Request.SET_VRING_NUM, b"\x01\x02\x03") != 0  # wrong size
    assert await fe.acked(p.Request.SET_VRING_NUM, p.vring_state(0, 100)) != 0  # not a power of 2
    assert await fe.acked(p.Request.SET_VRING_NUM, p.vring_state(7, 64)) != 0  # no such ring
    # Logging is never offered: SET_LOG_BASE has a reply of its own only under LOG_SHMFD,
    # so it gets none (the next answer is the next request's), or a failed ack if asked.
    fe.send(p.Request.SET_LOG_BASE, p.u64(0))
    assert await fe.acked(p.Request.SET_LOG_BASE, p.u64(0)) != 0
    assert await fe.acked(p.Request.SET_VRING_ENABLE, p.vring_state(0, 1)) == 0
    assert server.backend.errors >= 4
    await fe.start_ring(0)
    assert await _roundtrip(fe, 0, b"still alive") == b"STILL ALIVE"
    fe.close()


async def test_bad_version_drops_the_connection_and_the_next_one_is_served(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    fe.send_raw(struct.pack("<III", p.Request.GET_FEATURES, 0x2, 0))
    with pytest.raises(ConnectionResetError):
        await fe.recv_reply()
    fe.close()
    fe2 = await FrontEnd.connect(path)
    assert int.from_bytes(await fe2.call(p.Request.GET_QUEUE_NUM), "little") == 2
    fe2.close()
    assert server.connections == 2


async def test_oversized_payload_drops_the_connection(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    fe.send_raw(struct.pack("<III", p.Request.SET_MEM_TABLE, 0x1, 1 << 30))
    with pytest.raises(ConnectionResetError):
        await fe.recv_reply()
    fe.close()


async def test_too_many_fds_are_refused_and_closed(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    before = _open_fds()
    fds = [os.eventfd(0) for _ in range(12)]
    status = await fe.acked(p.Request.SET_VRING_CALL, p.u64(0), fds)
    assert status != 0
    for fd in fds:
        os.close(fd)
    await asyncio.sleep(0.05)
    assert _open_fds() <= before
    fe.close()


async def test_unmappable_memory_fd_fails_the_mem_table(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    r, w = os.pipe()
    region = p.MemRegion(0, 1 << 20, 0x1000_0000, 0)
    assert await fe.acked(p.Request.SET_MEM_TABLE, p.mem_table([region]), [r]) != 0
    # Region larger than the memfd behind it.
    big = p.MemRegion(0, 64 << 20, 0x1000_0000, 0)
    assert await fe.acked(p.Request.SET_MEM_TABLE, p.mem_table([big]), [fe.memfd]) != 0
    # Fewer fds than regions.
    assert await fe.acked(p.Request.SET_MEM_TABLE, p.mem_table([fe.region]), []) != 0
    assert server.backend.memory is None
    os.close(r)
    os.close(w)
    fe.close()


async def test_kick_fd_that_cannot_be_polled_is_refused(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    f = tmp_path / "regular"
    f.write_bytes(b"x")
    fd = os.open(f, os.O_RDONLY)
    assert await fe.acked(p.Request.SET_VRING_KICK, p.u64(0), [fd]) != 0
    os.close(fd)
    assert await fe.acked(p.Request.SET_VRING_KICK, p.u64(0x1FF)) != 0  # nofd: polling unsupported
    assert await fe.acked(p.Request.SET_VRING_KICK, p.u64(0x1000)) != 0  # unknown bits
    fe.close()


async def test_ring_outside_shared_memory_is_refused(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    assert await fe.acked(p.Request.SET_VRING_NUM, p.vring_state(0, 64)) == 0
    assert await fe.acked(p.Request.SET_VRING_ADDR, p.vring_addr(0, 0, 0x1000, 0x2000, 0x3000)) == 0
    kick = os.eventfd(0)
    assert await fe.acked(p.Request.SET_VRING_KICK, p.u64(0), [kick]) == 0
    # The ring is only built (and checked) once it is both started and enabled.
    assert await fe.acked(p.Request.SET_VRING_ENABLE, p.vring_state(0, 1)) != 0
    os.close(kick)
    assert server.backend.active_queues == ()
    fe.close()


async def test_get_vring_base_stops_the_ring_and_reports_next_avail(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    await fe.start_ring(0)
    for i in range(3):
        assert await _roundtrip(fe, 0, b"x%d" % i) == b"X%d" % i
    assert await fe.get_vring_base(0) == 3
    assert server.backend.active_queues == ()
    # A stopped ring is not served: a new request stays unanswered.
    q = fe.queues[0]
    src = fe.alloc(4)
    q.add_chain([(src, 4, 0), (fe.alloc(4), 4, WRITE)])
    await asyncio.sleep(0.05)
    assert q.pending() == 0
    fe.close()


async def test_front_end_vanishing_mid_request_is_cleaned_up(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    dev.delay = 0.1
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    q = await fe.start_ring(0)
    src, dst = fe.alloc(8), fe.alloc(8)
    fe.mem.write(src, b"inflight")
    q.add_chain([(src, 8, 0), (dst, 8, WRITE)])
    fe.kick(0)
    await _until(lambda: dev.requests[0] == 1)
    # Half a message, then gone: the server must stop the ring and unmap.
    fe.send_raw(struct.pack("<III", p.Request.SET_VRING_NUM, 0x1, 8) + b"\x00\x00")
    fe.close()
    await _until(lambda: not server.connected and server.backend.memory is None)
    assert server.backend.active_queues == ()
    assert not any(r.started or r.kick >= 0 or r.call >= 0 for r in server.backend.rings)

    dev.delay = 0.0
    fe2 = await FrontEnd.connect(path)
    await fe2.negotiate()
    await fe2.start_ring(0)
    assert await _roundtrip(fe2, 0, b"second life") == b"SECOND LIFE"
    fe2.close()


async def test_reconnect_resumes_a_ring_from_its_base(served) -> None:  # type: ignore[no-untyped-def]
    """A restarted front end hands back the ring where the old one stopped."""
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    await fe.start_ring(0, base=40)
    assert await _roundtrip(fe, 0, b"resumed") == b"RESUMED"
    assert await fe.get_vring_base(0) == 41
    fe.close()


async def test_mem_table_replaced_while_running_keeps_rings_working(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    await fe.start_ring(0)
    assert await _roundtrip(fe, 0, b"before") == b"BEFORE"
    assert await fe.acked(p.Request.SET_MEM_TABLE, p.mem_table([fe.region]), [fe.memfd]) == 0
    assert await _roundtrip(fe, 0, b"after") == b"AFTER"
    assert dev.activations == 2
    fe.close()


async def test_reset_owner_disables_the_rings(served) -> None:  # type: ignore[no-untyped-def]
    """RESET_OWNER is deprecated; as the spec recommends, it only disables rings."""
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    await fe.start_ring(0)
    assert await fe.acked(p.Request.RESET_OWNER) == 0
    assert server.backend.active_queues == ()
    assert server.backend.memory is not None
    assert await fe.acked(p.Request.SET_VRING_ENABLE, p.vring_state(0, 1)) == 0
    assert await _roundtrip(fe, 0, b"again") == b"AGAIN"
    fe.close()


async def test_reset_device_forgets_everything(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    await fe.start_ring(0)
    assert await fe.acked(p.Request.RESET_DEVICE) == 0
    assert server.backend.memory is None
    assert server.backend.active_queues == ()
    fe.close()


async def test_set_features_refuses_bits_not_offered(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    fe.send(p.Request.SET_PROTOCOL_FEATURES, p.u64(1 << p.ProtocolFeature.REPLY_ACK))
    assert await fe.acked(p.Request.SET_FEATURES, p.u64(1 << 63)) != 0
    assert await fe.acked(p.Request.SET_PROTOCOL_FEATURES, p.u64(1 << 20)) != 0
    fe.close()


async def test_server_close_removes_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    path.write_bytes(b"")  # a stale regular file is not ours to delete
    server = VhostUserServer(path, VhostUserBackend(UpperDevice()))
    with pytest.raises(Exception, match="cannot listen"):
        await server.start()
    path.unlink()
    async with VhostUserServer(path, VhostUserBackend(UpperDevice())):
        assert path.is_socket()
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.close()
    assert not path.exists()


class _BrokenConfigDevice(UpperDevice):
    def read_config(self, offset: int, size: int) -> bytes:
        raise RuntimeError("device bug")


async def test_device_bug_in_a_request_is_answered_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "b.sock"
    async with VhostUserServer(path, VhostUserBackend(_BrokenConfigDevice())) as server:
        fe = await FrontEnd.connect(str(path))
        assert await fe.call(p.Request.GET_CONFIG, p.config(0, 8)) == b""
        assert int.from_bytes(await fe.call(p.Request.GET_QUEUE_NUM), "little") == 2
        assert server.backend.errors == 1
        fe.close()


async def test_memory_regions_added_and_removed_one_at_a_time(served) -> None:  # type: ignore[no-untyped-def]
    """CONFIGURE_MEM_SLOTS: ADD_MEM_REG builds the table, REM_MEM_REG shrinks it.

    Guest RAM is split into two regions of the same memfd; a buffer that
    straddles the boundary still works, and removing the second region leaves
    rings in the first one running.
    """
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    proto = int.from_bytes(await fe.call(p.Request.GET_PROTOCOL_FEATURES), "little")
    assert proto >> p.ProtocolFeature.CONFIGURE_MEM_SLOTS & 1
    fe.send(p.Request.SET_PROTOCOL_FEATURES, p.u64(proto))
    assert int.from_bytes(await fe.call(p.Request.GET_MAX_MEM_SLOTS), "little") >= 8
    offered = int.from_bytes(await fe.call(p.Request.GET_FEATURES), "little")
    assert await fe.acked(p.Request.SET_FEATURES, p.u64(offered & ~(1 << 29))) == 0
    half = fe.region.size // 2
    lo = p.MemRegion(fe.region.guest_addr, half, fe.region.user_addr, 0)
    hi = p.MemRegion(fe.region.guest_addr + half, half, fe.region.user_addr + half, half)
    assert await fe.acked(p.Request.ADD_MEM_REG, p.mem_region(lo), [fe.memfd]) == 0
    assert await fe.acked(p.Request.ADD_MEM_REG, p.mem_region(hi), [fe.memfd]) == 0
    # The same region again (QEMU's multiqueue vhost-user-net has one vhost
    # device per queue pair on one connection): counted, not an error.
    assert await fe.acked(p.Request.ADD_MEM_REG, p.mem_region(hi), [fe.memfd]) == 0
    shifted = p.MemRegion(hi.guest_addr + 4096, half - 4096, hi.user_addr + 4096, half + 4096)
    assert await fe.acked(p.Request.ADD_MEM_REG, p.mem_region(shifted), [fe.memfd]) != 0  # overlaps
    assert len(server.backend.memory.regions) == 2
    q = await fe.start_ring(0)
    # A request whose buffers straddle the boundary between the two regions.
    src, dst = lo.guest_addr + half - 8, lo.guest_addr + half + 4096 - 4
    fe.mem.write(src, b"straddling bytes")
    head = q.add_chain([(src, 16, 0), (dst, 16, WRITE)])
    fe.kick(0)
    await fe.wait_call(0)
    assert q.used() == [(head, 16)]
    assert fe.mem.read(dst, 16) == b"STRADDLING BYTES"

    assert await fe.acked(p.Request.REM_MEM_REG, p.mem_region(hi)) == 0
    assert len(server.backend.memory.regions) == 2  # still added once more
    assert await fe.acked(p.Request.REM_MEM_REG, p.mem_region(hi)) == 0
    assert await fe.acked(p.Request.REM_MEM_REG, p.mem_region(hi)) != 0  # gone
    assert len(server.backend.memory.regions) == 1
    assert server.backend.active_queues == (0,)
    assert await _roundtrip(fe, 0, b"low region only") == b"LOW REGION ONLY"
    fe.close()


async def test_disabled_ring_waits_until_enabled(served) -> None:  # type: ignore[no-untyped-def]
    """With protocol features, rings start disabled; requests wait for SET_VRING_ENABLE."""
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    q = await fe.start_ring(0)
    assert await fe.acked(p.Request.SET_VRING_ENABLE, p.vring_state(0, 0)) == 0
    assert server.backend.active_queues == ()
    src, dst = fe.alloc(5), fe.alloc(5)
    fe.mem.write(src, b"later")
    head = q.add_chain([(src, 5, 0), (dst, 5, WRITE)])
    fe.kick(0)
    await asyncio.sleep(0.05)
    assert q.pending() == 0
    assert await fe.acked(p.Request.SET_VRING_ENABLE, p.vring_state(0, 1)) == 0
    await fe.wait_call(0)
    assert q.used() == [(head, 5)]
    assert fe.mem.read(dst, 5) == b"LATER"
    fe.close()


async def test_without_protocol_features_rings_are_enabled_by_set_features(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    offered = int.from_bytes(await fe.call(p.Request.GET_FEATURES), "little")
    legacy = offered & ~(1 << p.VHOST_USER_F_PROTOCOL_FEATURES) & ~(1 << 29)
    fe.send(p.Request.SET_FEATURES, p.u64(legacy))
    fe.send(p.Request.SET_MEM_TABLE, p.mem_table([fe.region]), [fe.memfd])
    assert int.from_bytes(await fe.call(p.Request.GET_QUEUE_NUM), "little") == 2  # a sync point
    assert all(r.enabled for r in server.backend.rings)
    fe.close()


async def test_set_features_on_live_rings_rebuilds_them(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    feats = await fe.negotiate()
    await fe.start_ring(0)
    assert not dev.queues[0].event_idx
    assert await _roundtrip(fe, 0, b"one") == b"ONE"
    assert await fe.acked(p.Request.SET_FEATURES, p.u64(feats | 1 << 29)) == 0  # EVENT_IDX on
    assert dev.queues[0].event_idx and dev.activations == 2
    # The rebuilt ring continues where the old one stopped.
    fe.queues[0].set_used_event(1)
    assert await _roundtrip(fe, 0, b"two") == b"TWO"
    fe.close()


async def test_many_front_ends_in_turn_leak_no_fds_or_mappings(served) -> None:  # type: ignore[no-untyped-def]
    server, dev, path = served

    def maps() -> int:
        with open("/proc/self/maps") as f:
            return sum("guest-ram" in line for line in f)

    async def one_session() -> None:
        fe = await FrontEnd.connect(path, mem_size=1 << 20)
        await fe.negotiate()
        await fe.start_ring(0)
        await fe.start_ring(1)
        assert await _roundtrip(fe, 1, b"cycle") == b"CYCLE"
        fe.close()
        await _until(lambda: server.backend.memory is None and not server.connected)

    await one_session()
    fds, mapped = len(_open_fds()), maps()
    for _ in range(20):
        await one_session()
    assert len(_open_fds()) <= fds
    assert maps() <= mapped
    assert server.connections == 21


async def test_broken_ring_signals_the_error_eventfd(served) -> None:  # type: ignore[no-untyped-def]
    """An avail index running past the ring size breaks it: the device fails
    and the front end hears of it on the ring's error eventfd (SET_VRING_ERR)."""
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    q = await fe.start_ring(0)
    err = os.eventfd(0, os.EFD_NONBLOCK)
    assert await fe.acked(p.Request.SET_VRING_ERR, p.u64(0), [err]) == 0
    q.set_avail_idx(q.size + 5)
    fe.kick(0)
    await _until(lambda: dev.needs_reset)
    assert os.eventfd_read(err) == 1
    os.close(err)
    # The session is still fine.
    assert int.from_bytes(await fe.call(p.Request.GET_QUEUE_NUM), "little") == 2
    fe.close()


async def test_error_fd_outlives_a_ring_stop_and_restart(served) -> None:  # type: ignore[no-untyped-def]
    """QEMU sends SET_VRING_ERR once (vhost_virtqueue_init) and stops and restarts rings at
    every guest reboot (GET_VRING_BASE, then SET_VRING_KICK): a ring broken after a restart
    must still be reported."""
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    err = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert await fe.acked(p.Request.SET_VRING_ERR, p.u64(0), [err]) == 0
        await fe.start_ring(0)
        assert await fe.get_vring_base(0) == 0
        await fe.start_ring(0)
        assert server.backend.rings[0].err >= 0
        server.backend.device.fail("test")
        assert os.eventfd_read(err) == 1
    finally:
        os.close(err)
        fe.close()


async def test_a_kick_fd_withheld_stops_the_ring_rather_than_leave_it_deaf(served) -> None:  # type: ignore[no-untyped-def]
    """SET_VRING_KICK with the NOFD bit asks for polling, which is refused; the ring must not
    stay started with nothing to wake it."""
    server, dev, path = served
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    await fe.start_ring(0)
    assert server.backend.active_queues == (0,)
    assert await fe.acked(p.Request.SET_VRING_KICK, p.u64(0 | p.VRING_NOFD_MASK)) != 0
    assert server.backend.active_queues == ()
    assert not server.backend.rings[0].started
    fe.close()


async def test_on_disconnect_runs_once_for_each_front_end_however_it_goes(tmp_path: Path) -> None:
    """A clean close, a protocol error, an EOF in the middle of a message and the server's own
    stop each end one front end: the callback runs once for each, after the back end is cleaned
    up and before the next front end is served."""
    seen: list[bool] = []
    server: VhostUserServer | None = None

    def gone() -> None:
        assert server is not None
        seen.append(server.connected)

    server = VhostUserServer(tmp_path / "d.sock", VhostUserBackend(UpperDevice()), on_disconnect=gone)
    await server.start()
    path = str(server.path)
    try:
        fe = await FrontEnd.connect(path)
        assert int.from_bytes(await fe.call(p.Request.GET_QUEUE_NUM), "little") == 2
        fe.close()
        await _until(lambda: len(seen) == 1)
        fe = await FrontEnd.connect(path)
        fe.send_raw(struct.pack("<III", p.Request.GET_FEATURES, 0x2, 0))  # bad version
        with pytest.raises(ConnectionResetError):
            await fe.recv_reply()
        fe.close()
        await _until(lambda: len(seen) == 2)
        fe = await FrontEnd.connect(path)
        fe.send_raw(struct.pack("<II", p.Request.GET_FEATURES, 0x1))  # half a header
        fe.close()
        await _until(lambda: len(seen) == 3)
        fe = await FrontEnd.connect(path)
        assert int.from_bytes(await fe.call(p.Request.GET_QUEUE_NUM), "little") == 2
    finally:
        await server.close()
    fe.close()
    assert seen == [False] * 4
    assert server.connections == 4


class _SlowCleanup(VhostUserBackend):
    """A back end whose clean-up after a front end takes until ``done`` is set."""

    def __init__(self) -> None:
        super().__init__(UpperDevice())
        self.done = asyncio.Event()

    async def disconnect(self) -> None:
        await self.done.wait()
        await super().disconnect()


async def test_on_disconnect_runs_when_the_server_stops_during_the_clean_up(tmp_path: Path) -> None:
    """The front end went and the server is stopped while the back end is still cleaning up after
    it: that front end is gone all the same, and its callback still runs (once)."""
    calls = 0

    def gone() -> None:
        nonlocal calls
        calls += 1

    backend = _SlowCleanup()
    server = VhostUserServer(tmp_path / "s.sock", backend, on_disconnect=gone)
    await server.start()
    fe = await FrontEnd.connect(str(server.path))
    assert int.from_bytes(await fe.call(p.Request.GET_QUEUE_NUM), "little") == 2
    fe.close()
    await _until(lambda: not server.connected and server.connections == 1)
    await asyncio.sleep(0.01)  # in the clean-up now
    closing = asyncio.create_task(server.close())
    await asyncio.sleep(0.01)
    backend.done.set()
    await closing
    await asyncio.sleep(0.01)
    assert calls == 1
