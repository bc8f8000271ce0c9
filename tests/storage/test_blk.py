"""virtio-blk commands through the fake driver, against every backend."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.kvm.memory import GuestMemory
from appliance.storage.backend import BlockBackend
from appliance.storage.blk import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VirtioBlk,
)
from appliance.storage.blk_request import (
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_GET_LIFETIME,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from appliance.storage.errors import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, StorageError
from appliance.storage.raw import RawBackend
from appliance.virtio.testing import WRITE
from tests.storage.backends import MemoryBackend, read_back
from tests.storage.conftest import DISK_SIZE
from tests.storage.rig import BlkRig, blk_header, segments

SECTORS = DISK_SIZE // 512


def pattern(n: int, seed: int = 1) -> bytes:
    """``n`` bytes that differ at every offset and with every seed."""
    parts = [
        hashlib.sha256(bytes([seed]) + i.to_bytes(8, "little")).digest() for i in range(0, n, 32)
    ]
    return b"".join(parts)[:n]


async def test_write_then_read_round_trips(backend: BlockBackend) -> None:
    rig = BlkRig(backend)
    data = pattern(8192)
    w = await rig.request(VIRTIO_BLK_T_OUT, 10, payload=data)
    assert (w.status, w.used_len) == (VIRTIO_BLK_S_OK, 1)
    r = await rig.request(VIRTIO_BLK_T_IN, 10, read_len=8192)
    assert (r.status, r.used_len) == (VIRTIO_BLK_S_OK, 8193)
    assert r.data == data
    assert await read_back(backend, 10 * 512, 8192) == data
    assert rig.dev.stats[0]["write_bytes"] == 8192 and rig.dev.stats[0]["read_bytes"] == 8192


async def test_read_past_end_returns_ioerr(backend: BlockBackend) -> None:
    rig = BlkRig(backend)
    r = await rig.request(VIRTIO_BLK_T_IN, SECTORS, read_len=512)
    assert (r.status, r.used_len) == (VIRTIO_BLK_S_IOERR, 1)
    r = await rig.request(VIRTIO_BLK_T_IN, SECTORS - 1, read_len=1024)
    assert r.status == VIRTIO_BLK_S_IOERR
    r = await rig.request(VIRTIO_BLK_T_IN, 2**64 - 1, read_len=512)
    assert r.status == VIRTIO_BLK_S_IOERR
    assert rig.dev.stats[0]["errors"] == 3


async def test_last_sector_is_readable(backend: BlockBackend) -> None:
    rig = BlkRig(backend)
    r = await rig.request(VIRTIO_BLK_T_IN, SECTORS - 1, read_len=512)
    assert r.status == VIRTIO_BLK_S_OK


async def test_write_to_read_only_device_returns_ioerr(ro_backend: BlockBackend) -> None:
    rig = BlkRig(ro_backend)
    assert rig.drv.features >> VIRTIO_BLK_F_RO & 1
    assert not rig.drv.features >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    w = await rig.request(VIRTIO_BLK_T_OUT, 0, payload=b"\xff" * 512)
    assert w.status == VIRTIO_BLK_S_IOERR
    assert await read_back(ro_backend, 0, 512) == bytes(512)
    r = await rig.request(VIRTIO_BLK_T_IN, 0, read_len=512)
    assert r.status == VIRTIO_BLK_S_OK


async def test_get_id_returns_serial(backend: BlockBackend) -> None:
    rig = BlkRig(backend, serial="disk-serial-0123456789abcdef")
    r = await rig.request(VIRTIO_BLK_T_GET_ID, read_len=20)
    assert r.status == VIRTIO_BLK_S_OK
    assert r.data == b"disk-serial-01234567"
    short = BlkRig(backend, serial="abc")
    r = await short.request(VIRTIO_BLK_T_GET_ID, read_len=20)
    assert r.data == b"abc" + bytes(17)


async def test_flush_succeeds(backend: BlockBackend) -> None:
    rig = BlkRig(backend)
    await rig.request(VIRTIO_BLK_T_OUT, 0, payload=pattern(512))
    f = await rig.request(VIRTIO_BLK_T_FLUSH)
    assert (f.status, f.used_len) == (VIRTIO_BLK_S_OK, 1)


async def test_write_zeroes_and_discard_clear_data(backend: BlockBackend) -> None:
    rig = BlkRig(backend)
    assert rig.drv.features >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    assert rig.drv.features >> VIRTIO_BLK_F_DISCARD & 1
    data = pattern(64 * 1024)
    await rig.request(VIRTIO_BLK_T_OUT, 0, payload=data)
    wz = await rig.request(VIRTIO_BLK_T_WRITE_ZEROES, payload=segments((8, 8, 0)))
    assert wz.status == VIRTIO_BLK_S_OK
    wz = await rig.request(VIRTIO_BLK_T_WRITE_ZEROES, payload=segments((32, 16, 1)))
    assert wz.status == VIRTIO_BLK_S_OK
    disk = await read_back(backend, 0, 64 * 1024)
    assert disk[: 8 * 512] == data[: 8 * 512]
    assert disk[8 * 512 : 16 * 512] == bytes(4096)
    assert disk[16 * 512 : 32 * 512] == data[16 * 512 : 32 * 512]
    assert disk[32 * 512 : 48 * 512] == bytes(8192)
    d = await rig.request(VIRTIO_BLK_T_DISCARD, payload=segments((64, 64, 0)))
    assert d.status == VIRTIO_BLK_S_OK


async def test_discard_with_unmap_flag_or_unknown_flags_is_unsupp(backend: BlockBackend) -> None:
    rig = BlkRig(backend)
    d = await rig.request(VIRTIO_BLK_T_DISCARD, payload=segments((0, 8, 1)))
    assert d.status == VIRTIO_BLK_S_UNSUPP
    wz = await rig.request(VIRTIO_BLK_T_WRITE_ZEROES, payload=segments((0, 8, 2)))
    assert wz.status == VIRTIO_BLK_S_UNSUPP


async def test_discard_past_end_or_too_many_segments_is_ioerr(backend: BlockBackend) -> None:
    rig = BlkRig(backend)
    d = await rig.request(VIRTIO_BLK_T_DISCARD, payload=segments((SECTORS - 4, 8, 0)))
    assert d.status == VIRTIO_BLK_S_IOERR
    d = await rig.request(VIRTIO_BLK_T_DISCARD, payload=segments((0, 8, 0), (8, 8, 0)))
    assert d.status == VIRTIO_BLK_S_IOERR
    d = await rig.request(VIRTIO_BLK_T_DISCARD, payload=b"\0" * 7)
    assert d.status == VIRTIO_BLK_S_IOERR


async def test_unknown_request_type_is_unsupp(backend: BlockBackend) -> None:
    rig = BlkRig(backend)
    for rtype in (VIRTIO_BLK_T_GET_LIFETIME, 0xDEAD):
        r = await rig.request(rtype, read_len=512)
        assert (r.status, r.used_len) == (VIRTIO_BLK_S_UNSUPP, 1)


async def test_data_length_not_multiple_of_512_is_ioerr(backend: BlockBackend) -> None:
    rig = BlkRig(backend)
    r = await rig.request(VIRTIO_BLK_T_IN, 0, read_len=100)
    assert r.status == VIRTIO_BLK_S_IOERR
    w = await rig.request(VIRTIO_BLK_T_OUT, 0, payload=b"x" * 513)
    assert w.status == VIRTIO_BLK_S_IOERR


async def test_header_and_status_may_share_descriptors_with_data(backend: BlockBackend) -> None:
    """§2.6.4: no framing assumptions. Header split 10+6 across two descriptors,
    payload in the second; status byte at the end of the data descriptor."""
    rig = BlkRig(backend)
    data = pattern(1024, seed=7)
    a = rig.drv.alloc(16)
    b = rig.drv.alloc(6 + 1024)
    hdr = blk_header(VIRTIO_BLK_T_OUT, 3)
    rig.mem.write(a, hdr[:10])
    rig.mem.write(b, hdr[10:] + data)
    st = rig.drv.alloc(1)
    q = rig.drv.queues[0]
    q.add_chain([(a, 10, 0), (b, 6 + 1024, 0), (st, 1, WRITE)])
    rig.drv.kick(0)
    await rig.drv.wait_used(0)
    q.used()
    assert rig.mem.read(st, 1) == bytes([VIRTIO_BLK_S_OK])
    # Read it back with data and status in one writable descriptor.
    h = rig.drv.alloc(16)
    rig.mem.write(h, blk_header(VIRTIO_BLK_T_IN, 3))
    buf = rig.drv.alloc(1025)
    head = q.add_chain([(h, 16, 0), (buf, 1025, WRITE)])
    rig.drv.kick(0)
    await rig.drv.wait_used(0)
    assert q.used() == [(head, 1025)]
    assert rig.mem.read(buf, 1024) == data
    assert rig.mem.read(buf + 1024, 1) == bytes([VIRTIO_BLK_S_OK])


async def test_indirect_chains_carry_requests(backend: BlockBackend) -> None:
    rig = BlkRig(backend)
    h = rig.drv.alloc(16)
    rig.mem.write(h, blk_header(VIRTIO_BLK_T_IN, 0))
    bufs = [(h, 16, 0)] + [(rig.drv.alloc(512, 512), 512, WRITE) for _ in range(20)]
    st = rig.drv.alloc(1)
    bufs.append((st, 1, WRITE))
    table = rig.drv.alloc(16 * len(bufs))
    q = rig.drv.queues[0]
    head = q.add_chain(bufs, indirect=True, table_addr=table)
    rig.drv.kick(0)
    await rig.drv.wait_used(0)
    assert q.used() == [(head, 20 * 512 + 1)]


async def test_many_requests_in_flight_all_complete(backend: BlockBackend) -> None:
    rig = BlkRig(backend, queue_size=256, mem_size=16 << 20)
    n = 64
    heads = [rig.submit(VIRTIO_BLK_T_OUT, i * 8, payload=pattern(4096, i), kick=False) for i in range(n)]
    rig.drv.kick(0)
    await rig.drv.wait_used(0, n)
    used = rig.drv.queues[0].used()
    assert sorted(h for h, _ in used) == sorted(h for h, _, _ in heads)
    assert all(rig.mem.read(st, 1) == b"\0" for _, _, st in heads)
    await asyncio.sleep(0.01)  # the batch interrupt is raised a loop turn later
    assert 1 <= rig.drv.interrupts[0].count <= n
    for i in (0, 17, 63):
        assert await read_back(backend, i * 4096, 4096) == pattern(4096, i)
    assert rig.dev.in_flight == 0


async def test_completions_in_one_loop_turn_raise_one_interrupt() -> None:
    rig = BlkRig(MemoryBackend(DISK_SIZE), queue_size=256)
    for i in range(32):
        rig.submit(VIRTIO_BLK_T_IN, i, read_len=512, kick=False)
    rig.drv.kick(0)
    await rig.drv.wait_used(0, 32)
    await asyncio.sleep(0.01)
    assert rig.drv.interrupts[0].count == 1


async def test_multiqueue_each_queue_carries_io(backend: BlockBackend) -> None:
    rig = BlkRig(backend, num_queues=4)
    assert rig.drv.features >> VIRTIO_BLK_F_MQ & 1
    assert rig.config()["num_queues"] == 4
    for qi in range(4):
        w = await rig.request(VIRTIO_BLK_T_OUT, qi * 8, payload=pattern(4096, qi), qi=qi)
        assert w.status == VIRTIO_BLK_S_OK
        assert rig.drv.interrupts[qi].count >= 1
    assert [s["requests"] for s in rig.dev.stats] == [1, 1, 1, 1]
    assert [s["write_bytes"] for s in rig.dev.stats] == [4096] * 4


async def test_event_idx_suppresses_interrupts_until_used_event(backend: BlockBackend) -> None:
    rig = BlkRig(backend, event_idx=True)
    q = rig.drv.queues[0]
    q.set_used_event(1)  # interrupt when used idx passes 1, i.e. on the 2nd completion
    await rig.request(VIRTIO_BLK_T_FLUSH)
    await asyncio.sleep(0.01)
    assert rig.drv.interrupts[0].count == 0
    await rig.request(VIRTIO_BLK_T_FLUSH)
    await asyncio.sleep(0.01)
    assert rig.drv.interrupts[0].count == 1
    assert q.avail_event == 2


async def test_requests_in_a_row_each_get_their_kick_with_event_idx(backend: BlockBackend) -> None:
    """A driver that notifies only when asked (§2.7.10) still has every request taken: after
    each drain the device moves avail_event to the next request."""
    rig = BlkRig(backend, event_idx=True)
    for i in range(100):  # past the ring's wrap
        head, _, status = rig.submit(VIRTIO_BLK_T_OUT, i, payload=pattern(512, i), kick=False)
        assert rig.drv.kick_if_wanted(0), f"request {i}: the device did not ask for its kick"
        await rig.drv.wait_used(0)
        assert rig.drv.queues[0].used()[0][0] == head
        assert rig.mem.read(status, 1)[0] == VIRTIO_BLK_S_OK


async def test_config_space_describes_the_disk(backend: BlockBackend) -> None:
    rig = BlkRig(backend, num_queues=2)
    cfg = rig.config()
    assert cfg["capacity"] == SECTORS
    assert cfg["seg_max"] == 254
    assert cfg["blk_size"] == backend.logical_block_size
    assert rig.dev.device_id == 2 and rig.dev.num_queues == 2


async def test_backend_failure_gives_ioerr_and_device_keeps_working() -> None:
    backend = MemoryBackend(DISK_SIZE)
    rig = BlkRig(backend)
    backend.fail_next = StorageError("disk on fire")
    r = await rig.request(VIRTIO_BLK_T_IN, 0, read_len=512)
    assert r.status == VIRTIO_BLK_S_IOERR
    backend.fail_next = RuntimeError("backend bug")
    r = await rig.request(VIRTIO_BLK_T_IN, 0, read_len=512)
    assert r.status == VIRTIO_BLK_S_IOERR
    r = await rig.request(VIRTIO_BLK_T_IN, 0, read_len=512)
    assert r.status == VIRTIO_BLK_S_OK
    assert rig.dev.stats[0]["errors"] == 2


async def test_reset_drops_completions_of_requests_in_flight() -> None:
    backend = MemoryBackend(DISK_SIZE)
    rig = BlkRig(backend)
    rig.submit(VIRTIO_BLK_T_IN, 0, read_len=512)
    rig.dev.reset()
    await rig.dev.quiesce()
    assert rig.drv.queues[0].used_idx == 0


async def test_page_aligned_guest_ram_goes_straight_to_o_direct(tmp_path: Path) -> None:
    """With mmap-backed guest RAM (as in a VM) aligned requests need no bounce:
    the kernel moves data to and from guest memory directly, with threads or
    native AIO; afterwards guest RAM can be unmapped (no view is left behind)."""
    for aio in ("threads", "native"):
        path = tmp_path / f"{aio}.raw"
        data = pattern(DISK_SIZE, seed=3)
        path.write_bytes(data)
        backend = RawBackend(path, cache="none", aio=aio)
        rig = BlkRig(backend, mem=GuestMemory.anonymous([(0, 8 << 20)]))
        r = await rig.request(VIRTIO_BLK_T_IN, 16, read_len=16384)
        assert r.status == VIRTIO_BLK_S_OK and r.data == data[16 * 512 : 16 * 512 + 16384]
        w = await rig.request(VIRTIO_BLK_T_OUT, 64, payload=pattern(8192, seed=9))
        assert w.status == VIRTIO_BLK_S_OK
        await rig.close()
        await backend.close()
        assert path.read_bytes()[64 * 512 : 64 * 512 + 8192] == pattern(8192, seed=9)


class GatedBackend(MemoryBackend):
    """Reads wait on a future the test resolves (the way pool work completes)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gates: list[asyncio.Future[None]] = []

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        gate = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        await gate
        return await super().readv(offset, bufs)


async def test_backend_completions_of_one_turn_raise_one_interrupt_in_that_turn() -> None:
    """Eight reads wait in the backend; all finish at once: one interrupt, raised without a further loop turn."""
    backend = GatedBackend(DISK_SIZE)
    rig = BlkRig(backend, queue_size=64)
    for i in range(8):
        rig.submit(VIRTIO_BLK_T_IN, i, read_len=512, kick=False)
    rig.drv.kick(0)
    assert len(backend.gates) == 8 and rig.dev.in_flight == 8
    for gate in backend.gates:
        gate.set_result(None)
    await asyncio.sleep(0)  # the gates' callbacks run: every request resumes and completes
    assert rig.drv.queues[0].pending() == 8
    assert rig.drv.interrupts[0].count == 1
    await rig.dev.quiesce()
    assert rig.dev.in_flight == 0


async def test_a_cancelled_backend_wait_ends_the_request_and_quiesce_returns() -> None:
    """A backend that gives up a wait (closing) drops that request; the device stays usable."""
    backend = GatedBackend(DISK_SIZE)
    rig = BlkRig(backend, queue_size=64)
    rig.submit(VIRTIO_BLK_T_IN, 0, read_len=512)
    backend.gates[0].cancel()
    await asyncio.wait_for(rig.dev.quiesce(), 5)
    assert rig.dev.in_flight == 0
    assert rig.drv.queues[0].pending() == 0
    rig.submit(VIRTIO_BLK_T_IN, 1, read_len=512)
    backend.gates[1].set_result(None)
    await rig.drv.wait_used(0, 1)


async def test_unaligned_guest_buffers_under_cache_none_round_trip_through_a_bounce(tmp_path: Path) -> None:
    """The O_DIRECT data path (start_rw) with buffers off the block alignment:
    the kernel refuses them (threads) or the AIO check does (native), and the
    request is redone through an aligned copy; the guest never notices."""
    for aio in ("threads", "native"):
        path = tmp_path / f"{aio}.raw"
        path.write_bytes(pattern(DISK_SIZE, seed=5))
        backend = RawBackend(path, cache="none", aio=aio)
        started: list[bool] = []
        real_start = backend.start_rw

        def spy(*args: Any, real: Any = real_start, started: list[bool] = started) -> bool:
            ok: bool = real(*args)
            started.append(ok)
            return ok

        backend.start_rw = spy  # type: ignore[method-assign, assignment]
        rig = BlkRig(backend, mem=GuestMemory.anonymous([(0, 8 << 20)]))
        q = rig.drv.queues[0]
        payload = pattern(4096, seed=11)
        buf = rig.drv.alloc(4096 + 8, 4096) + 8
        rig.mem.write(buf, payload)
        for rtype, flags in ((VIRTIO_BLK_T_OUT, 0), (VIRTIO_BLK_T_IN, WRITE)):
            if rtype == VIRTIO_BLK_T_IN:
                rig.mem.write(buf, bytes(4096))
            hdr = rig.drv.alloc(16)
            rig.mem.write(hdr, blk_header(rtype, 8))
            st = rig.drv.alloc(1, 1)
            q.add_chain([(hdr, 16, 0), (buf, 4096, flags), (st, 1, WRITE)])
            rig.drv.kick(0)
            await rig.drv.wait_used(0)
            q.used()
            assert rig.mem.read(st, 1) == b"\0", aio
        assert rig.mem.read(buf, 4096) == payload
        assert len(started) == 2 and (started == [True, True] or aio == "native"), (aio, started)
        await rig.close()
        await backend.close()
        assert path.read_bytes()[8 * 512 : 8 * 512 + 4096] == payload


async def test_kernel_errors_on_the_o_direct_data_path_give_ioerr(tmp_path: Path) -> None:
    """A write the kernel fails (the image's fd swapped for a read-only one:
    EBADF from pwritev or io_submit) ends as IOERR; reads keep working."""
    for aio in ("threads", "native"):
        path = tmp_path / f"{aio}.raw"
        path.write_bytes(pattern(DISK_SIZE, seed=6))
        backend = RawBackend(path, cache="none", aio=aio)
        rig = BlkRig(backend, mem=GuestMemory.anonymous([(0, 8 << 20)]))
        ro = os.open(path, os.O_RDONLY | os.O_DIRECT)
        os.dup2(ro, backend._fd)
        os.close(ro)
        w = await rig.request(VIRTIO_BLK_T_OUT, 0, payload=pattern(4096, seed=12))
        assert w.status == VIRTIO_BLK_S_IOERR, aio
        r = await rig.request(VIRTIO_BLK_T_IN, 0, read_len=4096)
        assert r.status == VIRTIO_BLK_S_OK and r.data == pattern(DISK_SIZE, seed=6)[:4096], aio
        assert rig.dev.stats[0]["errors"] == 1 and rig.dev.in_flight == 0
        await rig.close()
        await backend.close()


async def test_a_request_in_flight_when_native_aio_closes_is_left_unanswered(tmp_path: Path) -> None:
    """Closing the backend (daemon shutdown) drops what it had in flight, as a
    cancelled wait does: no IOERR reaches the guest, so a front end that
    reconnects to a new back end gets the request resubmitted."""
    path = tmp_path / "native.raw"
    path.write_bytes(pattern(DISK_SIZE, seed=7))
    backend = RawBackend(path, cache="none", aio="native")
    rig = BlkRig(backend, mem=GuestMemory.anonymous([(0, 8 << 20)]))
    rig.submit(VIRTIO_BLK_T_IN, 0, read_len=4096)
    assert rig.dev.in_flight == 1
    backend.close_now()  # io_destroy waits the read out; its completion is never reaped
    assert rig.dev.in_flight == 0
    await asyncio.wait_for(rig.dev.quiesce(), 5)
    await asyncio.sleep(0.01)
    assert rig.drv.queues[0].pending() == 0
    assert rig.dev.stats[0]["errors"] == 0
    await rig.close()


def test_block_sizes_belong_to_each_device_not_to_the_shared_backend() -> None:
    backend = MemoryBackend(1 << 20)
    plain = VirtioBlk(backend)
    big = VirtioBlk(backend, logical_block_size=4096, physical_block_size=16384)
    assert backend.logical_block_size == 512  # untouched
    assert int.from_bytes(plain.config_bytes()[20:24], "little") == 512
    assert int.from_bytes(big.config_bytes()[20:24], "little") == 4096
    assert big.config_bytes()[24] == 2 and plain.config_bytes()[24] == 0  # physical_block_exp
