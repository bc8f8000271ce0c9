"""A hostile driver against virtio-blk: every abuse ends as a status byte, a
dropped request or DEVICE_NEEDS_RESET; never an exception, a hang or an access
outside guest memory; and other devices keep working."""

from __future__ import annotations

import asyncio

from appliance.kvm.memory import GuestMemory, MemoryRegion
from appliance.storage.blk_request import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from appliance.storage.errors import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK
from appliance.virtio.errors import QueueError
from appliance.virtio.testing import INDIRECT, NEXT, WRITE, DriverQueue, FakeDriver
from tests.storage.backends import MemoryBackend
from tests.storage.rig import BlkRig, blk_header

RAM = 8 << 20


def rig() -> BlkRig:
    return BlkRig(MemoryBackend(1 << 20), mem_size=RAM)


async def settle(r: BlkRig) -> None:
    await r.dev.quiesce()
    await asyncio.sleep(0)


async def still_works(r: BlkRig) -> None:
    res = await r.request(VIRTIO_BLK_T_IN, 0, read_len=512)
    assert res.status == VIRTIO_BLK_S_OK


async def offer(r: BlkRig, bufs: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    q = r.drv.queues[0]
    q.add_chain(bufs)
    r.drv.kick(0)
    await settle(r)
    return q.used()


async def test_descriptor_outside_ram_drops_the_request() -> None:
    r = rig()
    hdr = r.drv.alloc(16)
    r.mem.write(hdr, blk_header(VIRTIO_BLK_T_IN))
    st = r.drv.alloc(1)
    used = await offer(r, [(hdr, 16, 0), (RAM + 4096, 512, WRITE), (st, 1, WRITE)])
    assert [n for _, n in used] == [0]
    await still_works(r)


async def test_descriptor_straddling_end_of_ram_drops_the_request() -> None:
    r = rig()
    hdr = r.drv.alloc(16)
    r.mem.write(hdr, blk_header(VIRTIO_BLK_T_IN))
    used = await offer(r, [(hdr, 16, 0), (RAM - 256, 512, WRITE), (RAM - 1, 1, WRITE)])
    assert [n for _, n in used] == [0]
    await still_works(r)


async def test_descriptor_loop_is_dropped_without_hanging() -> None:
    r = rig()
    q = r.drv.queues[0]
    hdr = r.drv.alloc(16)
    r.mem.write(hdr, blk_header(VIRTIO_BLK_T_IN))
    q.write_desc(0, hdr, 16, NEXT, 1)
    q.write_desc(1, hdr, 16, NEXT | WRITE, 0)
    q.publish(0)
    q.claim(0, 1)
    r.drv.kick(0)
    await settle(r)
    assert q.used() == [(0, 0)]


async def test_zero_length_and_oversized_descriptors() -> None:
    r = rig()
    hdr = r.drv.alloc(16)
    r.mem.write(hdr, blk_header(VIRTIO_BLK_T_IN))
    st = r.drv.alloc(1)
    # A zero-length status buffer is no status buffer: dropped.
    used = await offer(r, [(hdr, 16, 0), (st, 0, WRITE)])
    assert [n for _, n in used] == [0]
    # Zero-length data: a read of nothing succeeds.
    used = await offer(r, [(hdr, 16, 0), (0xDEAD_0000_0000, 0, WRITE), (st, 1, WRITE)])
    assert [n for _, n in used] == [1] and r.mem.read(st, 1)[0] == VIRTIO_BLK_S_OK
    # 4 GiB - 1 bytes of "data": outside RAM, dropped.
    used = await offer(r, [(hdr, 16, 0), (0x1000, 0xFFFF_FFFF, WRITE), (st, 1, WRITE)])
    assert [n for _, n in used] == [0]
    await still_works(r)


async def test_write_only_header_gets_ioerr() -> None:
    r = rig()
    hdr = r.drv.alloc(16)
    r.mem.write(hdr, blk_header(VIRTIO_BLK_T_OUT))
    st = r.drv.alloc(1)
    used = await offer(r, [(hdr, 16, WRITE), (st, 1, WRITE)])
    assert [n for _, n in used] == [1]
    assert r.mem.read(st, 1)[0] == VIRTIO_BLK_S_IOERR


async def test_read_only_status_drops_the_request() -> None:
    r = rig()
    hdr = r.drv.alloc(16)
    r.mem.write(hdr, blk_header(VIRTIO_BLK_T_IN))
    st = r.drv.alloc(1)
    r.mem.write(st, b"\x77")
    used = await offer(r, [(hdr, 16, 0), (st, 1, 0)])
    assert [n for _, n in used] == [0]
    assert r.mem.read(st, 1) == b"\x77"
    assert r.dev.stats[0]["dropped"] == 1


async def test_avail_index_jump_needs_reset_and_other_devices_keep_working() -> None:
    r, other = rig(), rig()
    resets: list[int] = []
    r.dev.on_needs_reset = lambda: resets.append(1)
    r.drv.queues[0].set_avail_idx(1000)
    r.drv.kick(0)
    assert r.dev.needs_reset and resets == [1]
    r.drv.kick(0)  # further kicks are ignored quietly
    await still_works(other)
    # After a reset and re-activation the device serves again.
    r.dev.reset()
    fresh = FakeDriver(r.dev, mem=r.mem)
    r.drv = fresh
    fresh.activate()
    await still_works(r)


async def test_indirect_table_pointing_outside_ram_is_dropped() -> None:
    r = rig()
    q = r.drv.queues[0]
    q.write_desc(0, RAM - 32, 64, INDIRECT)
    q.publish(0)
    q.claim(0)
    r.drv.kick(0)
    await settle(r)
    assert q.used() == [(0, 0)]
    await still_works(r)


async def test_rings_outside_ram_are_refused_before_activation() -> None:
    mem = GuestMemory([MemoryRegion(0, bytearray(1 << 16))])
    dq = DriverQueue(mem, 16, 0x1000, 0x2000, 0x3000)
    dq.used_addr = 0x20000
    try:
        dq.virtqueue()
    except QueueError:
        pass
    else:
        raise AssertionError("a used ring outside RAM was accepted")


async def test_guest_rewriting_a_descriptor_after_publishing_cannot_escape() -> None:
    """The chain is copied out once at pop: a later rewrite of the descriptor
    to point outside RAM changes nothing about the request in flight."""
    r = rig()
    q = r.drv.queues[0]
    head, data, st = r.submit(VIRTIO_BLK_T_OUT, 0, payload=b"\xab" * 512, kick=False)
    r.drv.kick(0)
    for i in range(q.size):
        q.write_desc(i, RAM * 4, 0xFFFF_FFFF, WRITE)
    await settle(r)
    assert q.used() == [(head, 1)]
    assert r.mem.read(st, 1)[0] == VIRTIO_BLK_S_OK
