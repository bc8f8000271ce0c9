"""Message parsing: layouts, refusals, and fuzzing of everything a front end sends."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.virtio.vhost_user import VhostUserBackend, VhostUserServer
from appliance.virtio.vhost_user import protocol as p
from appliance.virtio.vhost_user.errors import ProtocolError
from tests.vhost_user.device import UpperDevice
from tests.vhost_user.frontend import FrontEnd


def test_vring_addr_layout_is_index_flags_desc_used_avail_log() -> None:
    raw = bytes(
        [
            0x01, 0x00, 0x00, 0x00,  # index
            0x00, 0x00, 0x00, 0x00,  # flags
            *(0x1000).to_bytes(8, "little"),  # descriptor table
            *(0x3000).to_bytes(8, "little"),  # used ring
            *(0x2000).to_bytes(8, "little"),  # avail ring
            *(0).to_bytes(8, "little"),  # log
        ]
    )
    assert p.decode(p.Request.SET_VRING_ADDR, raw) == p.VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0)


def test_mem_table_round_trips() -> None:
    regions = (
        p.MemRegion(0, 0xA0000, 0x7F00_0000_0000, 0),
        p.MemRegion(0xC0000, 0x1FF40000, 0x7F00_000C_0000, 0xC0000),
    )
    assert p.decode(p.Request.SET_MEM_TABLE, p.mem_table(regions)) == regions


def test_mem_table_with_nine_regions_is_refused() -> None:
    raw = struct.pack("<II", 9, 0) + bytes(32 * 9)
    with pytest.raises(ProtocolError, match="at most 8"):
        p.decode(p.Request.SET_MEM_TABLE, raw)


def test_wrapping_region_is_refused() -> None:
    with pytest.raises(ProtocolError, match="wraps"):
        p.decode(p.Request.SET_MEM_TABLE, p.mem_table([p.MemRegion(2**64 - 4096, 8192, 0, 0)]))


def test_config_size_must_match_payload() -> None:
    with pytest.raises(ProtocolError):
        p.decode(p.Request.GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(10))
    with pytest.raises(ProtocolError):
        p.decode(p.Request.GET_CONFIG, struct.pack("<III", 250, 10, 0) + bytes(10))
    assert p.decode(p.Request.GET_CONFIG, p.config(0, 60)) == p.ConfigAccess(0, 60, 0, bytes(60))


def test_header_version_and_size_are_checked() -> None:
    assert p.parse_header(struct.pack("<III", 1, 1, 0)) == p.Header(1, 1, 0)
    with pytest.raises(ProtocolError) as e:
        p.parse_header(struct.pack("<III", 1, 0, 0))
    assert e.value.fatal
    with pytest.raises(ProtocolError) as e:
        p.parse_header(struct.pack("<III", 1, 1, p.MAX_PAYLOAD + 1))
    assert e.value.fatal


def test_vring_fd_index_and_nofd_flag() -> None:
    assert p.decode(p.Request.SET_VRING_CALL, p.u64(0x101)) == p.VringFd(1, True)
    with pytest.raises(ProtocolError):
        p.decode(p.Request.SET_VRING_CALL, p.u64(0x200))


@settings(max_examples=200, deadline=None)
@given(request=st.integers(0, 64), payload=st.binary(max_size=300))
def test_decode_accepts_or_refuses_but_never_crashes(request: int, payload: bytes) -> None:
    try:
        p.decode(request, payload)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=12, max_size=12))
def test_parse_header_accepts_or_refuses_but_never_crashes(raw: bytes) -> None:
    try:
        h = p.parse_header(raw)
    except ProtocolError:
        return
    assert h.size <= p.MAX_PAYLOAD


_messages = st.lists(
    st.tuples(
        st.sampled_from(list(p.Request) + [0, 99]),
        st.integers(0, 0xF) .map(lambda f: (f & ~p.VERSION_MASK) | p.VERSION),
        st.binary(max_size=80),
    ),
    max_size=12,
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=_messages)
def test_server_survives_random_message_streams(tmp_path: Path, messages: list[tuple[int, int, bytes]]) -> None:
    """Random well-framed messages, then a clean session: the server answers it."""

    async def run() -> None:
        dev = UpperDevice(num_queues=1)
        path = tmp_path / "fuzz.sock"
        async with VhostUserServer(path, VhostUserBackend(dev)) as server:
            fe = await FrontEnd.connect(str(path), mem_size=1 << 20)
            for request, flags, payload in messages:
                fe.send_raw(struct.pack("<III", request, flags, len(payload)) + payload)
            fe.close()
            await asyncio.sleep(0)
            fe2 = await FrontEnd.connect(str(path), mem_size=1 << 20)
            assert int.from_bytes(await fe2.call(p.Request.GET_QUEUE_NUM), "little") == 1
            fe2.close()
            assert server.connections == 2

    asyncio.run(run())


def _op_strategy() -> st.SearchStrategy[tuple[str, int, int, int]]:
    ops = ["num", "addr_ok", "addr_bad", "base", "kick", "call", "enable", "disable", "get_base",
           "mem", "features", "reset", "request", "config", "start", "start"]
    return st.tuples(st.sampled_from(ops), st.integers(0, 3), st.integers(0, 300), st.booleans().map(int))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op_strategy(), max_size=25))
def test_server_survives_random_well_formed_sessions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, ops: list[tuple[str, int, int, int]]
) -> None:
    """Well-formed messages in random order and with random values, mixed with
    driver requests: every request gets its reply, nothing raises inside the
    server, and a fresh front end is served afterwards."""
    from appliance.virtio.testing import WRITE, DriverQueue

    served: list[tuple[int, ...]] = []

    async def run() -> None:
        dev = UpperDevice(num_queues=2)
        path = tmp_path / "sm.sock"
        async with VhostUserServer(path, VhostUserBackend(dev)) as server:
            fe = await FrontEnd.connect(str(path), mem_size=1 << 20)
            u = 0x7F00_0000_0000 - 0x10_0000
            rings = [DriverQueue.at(fe.mem, fe.alloc(DriverQueue.ring_bytes(64), 4096), 64) for _ in range(2)]
            fe.send(p.Request.SET_PROTOCOL_FEATURES, p.u64(0xF))
            for op, ring, value, need in ops:
                r = rings[ring % 2]
                if op == "num":
                    size = value if value % 3 else 64
                    fe.send(p.Request.SET_VRING_NUM, p.vring_state(ring, size), need_reply=bool(need))
                elif op == "addr_ok":
                    fe.send(p.Request.SET_VRING_ADDR,
                            p.vring_addr(ring, 0, r.desc_addr + u, r.used_addr + u, r.avail_addr + u),
                            need_reply=bool(need))
                elif op == "addr_bad":
                    bad = p.vring_addr(ring, 0, value * 4096, 8, value)
                    fe.send(p.Request.SET_VRING_ADDR, bad, need_reply=bool(need))
                elif op == "base":
                    fe.send(p.Request.SET_VRING_BASE, p.vring_state(ring, value), need_reply=bool(need))
                elif op in ("kick", "call"):
                    efd = os.eventfd(0)
                    req = p.Request.SET_VRING_KICK if op == "kick" else p.Request.SET_VRING_CALL
                    fe.send(req, p.u64(ring), [efd], need_reply=bool(need))
                    os.close(efd)
                elif op in ("enable", "disable"):
                    fe.send(p.Request.SET_VRING_ENABLE, p.vring_state(ring, int(op == "enable")), need_reply=bool(need))
                elif op == "get_base":
                    await fe.call(p.Request.GET_VRING_BASE, p.vring_state(ring, 0))
                    continue
                elif op == "mem":
                    fe.send(p.Request.SET_MEM_TABLE, p.mem_table([fe.region]), [fe.memfd], need_reply=bool(need))
                elif op == "features":
                    fe.send(p.Request.SET_FEATURES, p.u64((1 << 32) | (1 << 30) | (value << 28 & (1 << 28))),
                            need_reply=bool(need))
                elif op == "reset":
                    fe.send(p.Request.RESET_OWNER, need_reply=bool(need))
                elif op == "config":
                    await fe.call(p.Request.GET_CONFIG, p.config(value % 16, 8))
                    continue
                elif op == "start":
                    # A whole valid ring set-up, so runs reach served rings often.
                    fe.send(p.Request.SET_MEM_TABLE, p.mem_table([fe.region]), [fe.memfd])
                    fe.send(p.Request.SET_VRING_NUM, p.vring_state(ring % 2, 64))
                    fe.send(p.Request.SET_VRING_ADDR,
                            p.vring_addr(ring % 2, 0, r.desc_addr + u, r.used_addr + u, r.avail_addr + u))
                    efd = os.eventfd(0)
                    fe.send(p.Request.SET_VRING_KICK, p.u64(ring % 2), [efd])
                    os.eventfd_write(efd, 1)
                    os.close(efd)
                    fe.send(p.Request.SET_VRING_ENABLE, p.vring_state(ring % 2, 1))
                    await fe.call(p.Request.GET_QUEUE_NUM)
                    served.append(server.backend.active_queues)
                    continue
                elif op == "request":
                    if r.free_descriptors >= 2:
                        a = fe.alloc(8)
                        r.add_chain([(a, 8, 0), (a, 8, WRITE)])
                    efd = os.eventfd(0)
                    fe.send(p.Request.SET_VRING_CALL, p.u64(ring), [efd])
                    os.close(efd)
                    continue
                if need:
                    await fe.recv_reply()
            assert int.from_bytes(await fe.call(p.Request.GET_QUEUE_NUM), "little") == 2
            fe.close()
            fe2 = await FrontEnd.connect(str(path), mem_size=1 << 20)
            assert int.from_bytes(await fe2.call(p.Request.GET_QUEUE_NUM), "little") == 2
            fe2.close()
            assert server.connections == 2

    with caplog.at_level("ERROR"):
        caplog.clear()
        asyncio.run(run())
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text
