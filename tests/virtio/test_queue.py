"""The split virtqueue against a fake driver, well-behaved and hostile."""

from __future__ import annotations

import pytest

from appliance.kvm.memory import GuestMemory, MemoryRegion
from appliance.virtio.errors import QueueError
from appliance.virtio.queue import MAX_INDIRECT_DESCRIPTORS, Virtqueue
from appliance.virtio.testing import INDIRECT, NEXT, WRITE, DriverQueue, make_memory

RAM = 1 << 20
RING = 0x1000
DATA = 0x10000


@pytest.fixture
def mem() -> GuestMemory:
    return make_memory(RAM)


def make(mem: GuestMemory, size: int = 16, *, event_idx: bool = False) -> tuple[DriverQueue, Virtqueue]:
    dq = DriverQueue.at(mem, RING, size, event_idx=event_idx, indirect=True)
    return dq, dq.virtqueue()


def test_pop_returns_chain_with_views_into_guest_memory(mem: GuestMemory) -> None:
    dq, vq = make(mem)
    mem.write(DATA, b"hello")
    head = dq.add_chain([(DATA, 5, 0), (DATA + 0x100, 8, WRITE)])
    chain = vq.pop()
    assert chain is not None and chain.head == head
    assert chain.descriptors == [(DATA, 5, False), (DATA + 0x100, 8, True)]
    assert bytes(chain.readable[0]) == b"hello"
    chain.writable[0][:3] = b"abc"
    assert mem.read(DATA + 0x100, 3) == b"abc"
    assert (chain.readable_len, chain.writable_len) == (5, 8)
    assert vq.pop() is None


def test_push_used_publishes_element_and_index(mem: GuestMemory) -> None:
    dq, vq = make(mem)
    head = dq.add_chain([(DATA, 16, WRITE)])
    chain = vq.pop()
    assert chain is not None
    vq.push_used(chain.head, 7)
    assert dq.used() == [(head, 7)]
    assert vq.used_idx == 1


def test_indirect_chain_after_direct_descriptors_is_flattened(mem: GuestMemory) -> None:
    dq, vq = make(mem)
    table = 0x8000
    # §2.7.5.3.2: direct descriptors followed by one indirect descriptor.
    mem.write(table, bytes(32))
    dq.write_desc(0, DATA, 4, NEXT, 1)
    dq.write_desc(1, table, 32, INDIRECT)
    import struct

    mem.write(table, struct.pack("<QIHH", DATA + 4, 4, NEXT, 1))
    mem.write(table + 16, struct.pack("<QIHH", DATA + 8, 4, WRITE, 0))
    dq.publish(0)
    chain = vq.pop()
    assert chain is not None
    assert chain.descriptors == [(DATA, 4, False), (DATA + 4, 4, False), (DATA + 8, 4, True)]


def test_indirect_helper_round_trip(mem: GuestMemory) -> None:
    dq, vq = make(mem)
    head = dq.add_chain([(DATA, 16, 0), (DATA + 16, 512, WRITE)], indirect=True, table_addr=0x9000)
    chain = vq.pop()
    assert chain is not None and chain.head == head
    assert [d[1] for d in chain.descriptors] == [16, 512]


def test_zero_length_descriptor_is_skipped_without_touching_its_address(mem: GuestMemory) -> None:
    dq, vq = make(mem)
    dq.add_chain([(DATA, 4, 0), (0xFFFF_FFFF_0000, 0, 0), (DATA + 8, 4, WRITE)])
    chain = vq.pop()
    assert chain is not None
    assert len(chain.readable) == 1 and len(chain.writable) == 1


@pytest.mark.parametrize(
    "bufs",
    [
        pytest.param([(RAM + 0x1000, 16, 0)], id="outside-ram"),
        pytest.param([(RAM - 8, 16, WRITE)], id="straddles-end-of-ram"),
        pytest.param([(DATA, 0xFFFF_FFFF, 0)], id="oversized"),
        pytest.param([(2**64 - 8, 16, 0)], id="address-wraps"),
        pytest.param([(DATA, 16, WRITE), (DATA + 16, 16, 0)], id="readable-after-writable"),
    ],
)
def test_bad_chain_is_returned_with_zero_length(mem: GuestMemory, bufs: list) -> None:
    dq, vq = make(mem)
    head = dq.add_chain(bufs)
    good = dq.add_chain([(DATA, 8, WRITE)])
    chain = vq.pop()
    assert chain is not None and chain.head == good
    assert dq.used() == [(head, 0)]
    assert vq.invalid_chains == 1


def test_descriptor_loop_is_dropped_not_followed_forever(mem: GuestMemory) -> None:
    dq, vq = make(mem)
    dq.write_desc(0, DATA, 8, NEXT, 1)
    dq.write_desc(1, DATA, 8, NEXT, 0)
    dq.publish(0)
    assert vq.pop() is None
    assert dq.used() == [(0, 0)]


def test_next_index_outside_table_is_dropped(mem: GuestMemory) -> None:
    dq, vq = make(mem, size=8)
    dq.write_desc(0, DATA, 8, NEXT, 8)
    dq.publish(0)
    assert vq.pop() is None
    assert dq.used() == [(0, 0)]


@pytest.mark.parametrize(
    "table_len, flags, entry_flags",
    [
        pytest.param(0, INDIRECT, 0, id="empty-table"),
        pytest.param(24, INDIRECT, 0, id="len-not-multiple-of-16"),
        pytest.param(16 * (MAX_INDIRECT_DESCRIPTORS + 1), INDIRECT, 0, id="too-long"),
        pytest.param(16, INDIRECT | NEXT, 0, id="indirect-with-next"),
        pytest.param(16, INDIRECT, INDIRECT, id="nested-indirect"),
    ],
)
def test_bad_indirect_table_is_dropped(
    mem: GuestMemory, table_len: int, flags: int, entry_flags: int
) -> None:
    import struct

    dq, vq = make(mem)
    table = 0x20000
    mem.write(table, struct.pack("<QIHH", DATA, 16, entry_flags, 0))
    dq.write_desc(0, table, table_len, flags, 1)
    dq.write_desc(1, DATA, 8, 0, 0)
    dq.publish(0)
    assert vq.pop() is None
    assert dq.used() == [(0, 0)]


def test_indirect_without_feature_is_dropped(mem: GuestMemory) -> None:
    dq = DriverQueue.at(mem, RING, 16, indirect=False)
    vq = dq.virtqueue()
    dq.add_chain([(DATA, 16, 0)], indirect=True, table_addr=0x9000)
    assert vq.pop() is None
    assert dq.used()[0][1] == 0


def test_indirect_table_outside_ram_is_dropped(mem: GuestMemory) -> None:
    dq, vq = make(mem)
    dq.write_desc(0, RAM - 16, 32, INDIRECT)
    dq.publish(0)
    assert vq.pop() is None
    assert dq.used() == [(0, 0)]


def test_avail_index_jumping_ahead_breaks_the_queue(mem: GuestMemory) -> None:
    dq, vq = make(mem, size=16)
    dq.set_avail_idx(17)
    with pytest.raises(QueueError):
        vq.pop()
    assert vq.broken
    assert vq.pop() is None
    vq.push_used(0, 0)
    assert dq.used_idx == 0


def test_head_index_out_of_range_breaks_the_queue(mem: GuestMemory) -> None:
    dq, vq = make(mem, size=16)
    dq.publish(16)
    with pytest.raises(QueueError):
        vq.pop()


@pytest.mark.parametrize(
    "desc, avail, used",
    [
        pytest.param(RAM - 16, RING + 0x1000, RING + 0x2000, id="desc-outside"),
        pytest.param(RING, RAM - 2, RING + 0x2000, id="avail-outside"),
        pytest.param(RING, RING + 0x1000, RAM + 0x1000, id="used-outside"),
        pytest.param(RING + 8, RING + 0x1000, RING + 0x2000, id="desc-misaligned"),
        pytest.param(RING, RING + 0x1000, RING + 0x2002, id="used-misaligned"),
    ],
)
def test_rings_outside_ram_or_misaligned_are_refused(
    mem: GuestMemory, desc: int, avail: int, used: int
) -> None:
    with pytest.raises(QueueError):
        Virtqueue(mem, 16, desc, avail, used)


@pytest.mark.parametrize("size", [0, 3, 65536])
def test_bad_queue_size_is_refused(mem: GuestMemory, size: int) -> None:
    with pytest.raises(QueueError):
        Virtqueue(mem, size, RING, RING + 0x1000, RING + 0x2000)


def test_free_running_indices_wrap_at_65536(mem: GuestMemory) -> None:
    dq, vq = make(mem, size=4)
    dq.set_avail_idx(0xFFFE)
    dq.mem.write_u16(dq.used_addr + 2, 0xFFFE)
    dq.last_used = 0xFFFE
    vq = dq.virtqueue()
    assert vq.last_avail_idx == 0xFFFE
    for _ in range(4):
        head = dq.add_chain([(DATA, 4, WRITE)])
        chain = vq.pop()
        assert chain is not None and chain.head == head
        vq.push_used(head, 4)
        assert dq.used() == [(head, 4)]
    assert vq.used_idx == 2


def test_no_interrupt_flag_suppresses_notification(mem: GuestMemory) -> None:
    dq, vq = make(mem)
    dq.add_chain([(DATA, 4, WRITE)])
    chain = vq.pop()
    assert chain is not None
    assert not vq.needs_notification()  # nothing pushed yet
    dq.set_no_interrupt(True)
    vq.push_used(chain.head, 0)
    assert not vq.needs_notification()
    dq.set_no_interrupt(False)
    dq.add_chain([(DATA, 4, WRITE)])
    chain = vq.pop()
    assert chain is not None
    vq.push_used(chain.head, 0)
    assert vq.needs_notification()


def test_event_idx_notifies_only_when_used_event_is_crossed(mem: GuestMemory) -> None:
    dq, vq = make(mem, event_idx=True)
    dq.set_used_event(2)  # driver: interrupt me once used idx passes 2
    results = []
    for _ in range(4):
        dq.add_chain([(DATA, 4, WRITE)])
        chain = vq.pop()
        assert chain is not None
        vq.push_used(chain.head, 4)
        results.append(vq.needs_notification())
    # used idx goes 1, 2, 3, 4: only the step 2 -> 3 crosses used_event.
    assert results == [False, False, True, False]


def test_enable_notification_publishes_avail_event_and_sees_late_requests(mem: GuestMemory) -> None:
    dq, vq = make(mem, event_idx=True)
    dq.add_chain([(DATA, 4, WRITE)])
    assert vq.pop() is not None
    assert vq.enable_notification() is False
    assert dq.avail_event == 1
    dq.add_chain([(DATA, 4, WRITE)])
    assert vq.enable_notification() is True


def test_last_avail_idx_can_be_restored(mem: GuestMemory) -> None:
    dq, vq = make(mem)
    for _ in range(3):
        dq.add_chain([(DATA, 4, WRITE)])
    vq.last_avail_idx = 2
    chain = vq.pop()
    assert chain is not None
    assert vq.last_avail_idx == 3 and vq.pop() is None


def test_buffer_across_touching_regions_gets_two_views() -> None:
    mem = GuestMemory([MemoryRegion(0, bytearray(0x10000)), MemoryRegion(0x10000, bytearray(0x10000))])
    dq = DriverQueue.at(mem, 0x1000, 8)
    vq = dq.virtqueue()
    dq.add_chain([(0xFFF0, 0x20, WRITE)])
    chain = vq.pop()
    assert chain is not None
    assert [len(v) for v in chain.writable] == [0x10, 0x10]


def test_closed_queue_pops_nothing(mem: GuestMemory) -> None:
    dq, vq = make(mem)
    dq.add_chain([(DATA, 4, WRITE)])
    vq.close()
    assert vq.pop() is None
    assert not vq.has_available()


def test_guest_error_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from appliance.virtio.queue import RateLimitedLog

    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), burst=3, period=60)
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        for i in range(100):
            limited.warning("bad thing %d", i)
    assert len(caplog.records) == 3
