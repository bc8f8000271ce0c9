"""Hypothesis: random (often hostile) driver operations against virtio-blk.

The rules are what a driver can do to shared memory (write descriptors,
publish heads, move the avail index, kick) plus well-formed requests and
device resets. Invariants: no exception escapes, the used index never runs
past what the device consumed, requests in flight never exceed the queue
size, and after a reset the device serves again.
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from appliance.storage.blk import VirtioBlk
from appliance.storage.blk_request import (
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlkLimits,
    BlkRequest,
)
from appliance.storage.errors import VIRTIO_BLK_S_OK, BlkError
from appliance.virtio.queue import DescriptorChain
from appliance.virtio.testing import INDIRECT, NEXT, WRITE, FakeDriver, make_memory
from tests.storage.backends import MemoryBackend
from tests.storage.rig import blk_header

RAM = 512 * 1024
QSIZE = 16
DISK = 64 * 1024

addresses = st.one_of(
    st.sampled_from([0, 0x1000, RAM - 1, RAM - 16, RAM, RAM + 0x1000, 2**63, 2**64 - 1]),
    st.integers(0, RAM - 1),
)
lengths = st.one_of(st.sampled_from([0, 1, 15, 16, 17, 512, 4096, 0xFFFF_FFFF]), st.integers(0, 8192))
flag_sets = st.sampled_from([0, WRITE, NEXT, NEXT | WRITE, INDIRECT, INDIRECT | NEXT, 0xFFFF])
kinds = st.sampled_from(
    [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
     VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, 77]
)


class HostileDriver(RuleBasedStateMachine):
    event_idx = False

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.mem = make_memory(RAM)
        self.dev = VirtioBlk(MemoryBackend(DISK), queue_size=QSIZE, serial="fuzz")
        self.resets = 0
        self.dev.on_needs_reset = self._on_reset
        self._new_driver()
        # Scratch space for headers, data and status bytes, past the rings.
        self.scratch = self.drv.alloc(128 * 1024, 4096)

    def _on_reset(self) -> None:
        self.resets += 1

    def _new_driver(self) -> None:
        self.drv = FakeDriver(self.dev, mem=self.mem, queue_size=QSIZE, event_idx=self.event_idx)
        self.q = self.drv.queues[0]

        async def activate() -> None:
            self.drv.activate()

        self.loop.run_until_complete(activate())

    def _run(self, fn: object) -> None:
        async def call() -> None:
            fn()  # type: ignore[operator]
            await asyncio.sleep(0)

        self.loop.run_until_complete(call())

    @rule(kind=kinds, sector=st.integers(0, DISK // 512 + 2), nsec=st.integers(0, 8),
          slot=st.integers(0, 15))
    def valid_request(self, kind: int, sector: int, nsec: int, slot: int) -> None:
        if self.q.free_descriptors < 3:
            return
        base = self.scratch + slot * 8192
        self.mem.write(base, blk_header(kind, sector))
        n = nsec * 512
        write = WRITE if kind in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID) else 0
        if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            self.mem.write(base + 16, sector.to_bytes(8, "little") + nsec.to_bytes(4, "little") + bytes(4))
            n = 16
        bufs = [(base, 16, 0)]
        if n:
            bufs.append((base + 16, n, write))
        bufs.append((base + 8191, 1, WRITE))
        self.q.add_chain(bufs)

    @rule(index=st.integers(0, QSIZE - 1), addr=addresses, length=lengths, flags=flag_sets,
          nxt=st.integers(0, QSIZE + 2))
    def scribble_descriptor(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.q.write_desc(index, addr, length, flags, nxt)

    @rule(head=st.integers(0, QSIZE + 1))
    def publish_head(self, head: int) -> None:
        self.q.publish(head)

    @rule(delta=st.integers(1, 2 * QSIZE))
    def move_avail_index(self, delta: int) -> None:
        self.q.set_avail_idx(self.q.next_avail + delta)

    @rule(value=st.integers(0, 0xFFFF), no_interrupt=st.booleans())
    def suppress_interrupts(self, value: int, no_interrupt: bool) -> None:
        self.q.set_used_event(value)
        self.q.set_no_interrupt(no_interrupt)

    @rule()
    def kick(self) -> None:
        self._run(lambda: self.drv.kick(0))

    @rule()
    def settle(self) -> None:
        self.loop.run_until_complete(self.dev.quiesce())
        self.q.used()

    @precondition(lambda self: self.dev.needs_reset)
    @rule()
    def reset(self) -> None:
        self.dev.reset()
        self.loop.run_until_complete(self.dev.quiesce())
        self._new_driver()

    @invariant()
    def used_never_passes_consumed(self) -> None:
        qs = self.dev._queues
        if qs and qs[0] is not None and not qs[0].broken:
            vq = qs[0]
            assert (vq.last_avail_idx - vq.used_idx) & 0xFFFF <= QSIZE
            assert (vq.last_avail_idx - self.q.used_idx) & 0xFFFF <= QSIZE

    @invariant()
    def in_flight_bounded(self) -> None:
        assert self.dev.in_flight <= QSIZE

    def teardown(self) -> None:
        async def final() -> None:
            await self.dev.quiesce()
            self.dev.reset()
            self._new_driver_sync()
            base = self.scratch
            self.mem.write(base, blk_header(VIRTIO_BLK_T_IN, 0))
            self.mem.write(base + 8191, b"\xee")
            head = self.q.add_chain([(base, 16, 0), (base + 512, 512, WRITE), (base + 8191, 1, WRITE)])
            self.drv.kick(0)
            await self.drv.wait_used(0, 1, timeout=2)
            assert self.q.used() == [(head, 513)]
            assert self.mem.read(base + 8191, 1)[0] == VIRTIO_BLK_S_OK

        try:
            self.loop.run_until_complete(final())
        finally:
            self.loop.close()

    def _new_driver_sync(self) -> None:
        self.drv = FakeDriver(self.dev, mem=self.mem, queue_size=QSIZE, event_idx=self.event_idx)
        self.q = self.drv.queues[0]
        self.drv.activate()


class HostileDriverEventIdx(HostileDriver):
    event_idx = True


_settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
HostileDriver.TestCase.settings = _settings
HostileDriverEventIdx.TestCase.settings = _settings
TestHostileDriver = HostileDriver.TestCase
TestHostileDriverEventIdx = HostileDriverEventIdx.TestCase


def _chain(parts: list[tuple[bytes, bool]]) -> DescriptorChain:
    c = DescriptorChain(0)
    for data, writable in parts:
        v = memoryview(bytearray(data))
        if not len(v):
            continue
        if writable:
            c.writable.append(v)
            c.writable_len += len(v)
        elif not c.writable:
            c.readable.append(v)
            c.readable_len += len(v)
    return c


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.tuples(st.binary(max_size=600), st.booleans()), max_size=6),
    ro=st.booleans(),
)
def test_parser_returns_request_or_typed_error(parts: list[tuple[bytes, bool]], ro: bool) -> None:
    chain = _chain(parts)
    limits = BlkLimits(capacity_sectors=128, read_only=ro, discard=True, write_zeroes=not ro)
    try:
        req = BlkRequest.parse(chain, limits)
    except BlkError as err:
        assert (err.status_buf is None) == (chain.writable_len == 0)
        return
    assert chain.writable_len >= 1 and chain.readable_len >= 16
    assert req.data_len == sum(len(v) for v in req.data)
    if req.type in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
        assert req.sector + req.data_len // 512 <= 128
        assert not (ro and req.type == VIRTIO_BLK_T_OUT)


def test_header_split_in_single_bytes_parses() -> None:
    """Found shape: a header delivered one byte per descriptor is still a header."""
    hdr = blk_header(VIRTIO_BLK_T_IN, 5)
    chain = _chain([(bytes([b]), False) for b in hdr] + [(bytes(513), True)])
    req = BlkRequest.parse(chain, BlkLimits(capacity_sectors=128))
    assert (req.type, req.sector, req.data_len) == (VIRTIO_BLK_T_IN, 5, 512)
