"""virtio-rng through the fake driver."""

from __future__ import annotations

from appliance.virtio.rng import MAX_BYTES_PER_REQUEST, VirtioRng
from appliance.virtio.testing import WRITE, FakeDriver


def test_fills_writable_buffers_with_random_bytes() -> None:
    rng = VirtioRng()
    drv = FakeDriver(rng)
    drv.activate()
    buf = drv.alloc(64)
    buf2 = drv.alloc(64)
    head = drv.queues[0].add_chain([(buf, 32, WRITE), (buf2, 64, WRITE)])
    drv.kick(0)
    assert drv.queues[0].used() == [(head, 96)]
    assert drv.mem.read(buf, 32) != bytes(32)
    assert drv.mem.read(buf2, 64) != bytes(64)
    assert drv.interrupts[0].count == 1
    rng.close()


def test_reads_from_the_named_file(tmp_path) -> None:
    src = tmp_path / "entropy"
    src.write_bytes(b"\xab" * 100)
    rng = VirtioRng(str(src))
    drv = FakeDriver(rng)
    drv.activate()
    buf = drv.alloc(16)
    drv.queues[0].add_chain([(buf, 16, WRITE)])
    drv.kick(0)
    assert drv.mem.read(buf, 16) == b"\xab" * 16
    rng.close()


def test_readable_only_chain_gets_zero_bytes_and_huge_request_is_capped() -> None:
    rng = VirtioRng()
    drv = FakeDriver(rng, mem_size=1 << 20)
    drv.activate()
    small = drv.alloc(16)
    big = drv.alloc(MAX_BYTES_PER_REQUEST * 2)
    h1 = drv.queues[0].add_chain([(small, 16, 0)])
    h2 = drv.queues[0].add_chain([(big, MAX_BYTES_PER_REQUEST * 2, WRITE)])
    drv.kick(0)
    assert drv.queues[0].used() == [(h1, 0), (h2, MAX_BYTES_PER_REQUEST)]
    rng.close()


def test_broken_ring_sets_needs_reset() -> None:
    rng = VirtioRng()
    resets = []
    rng.on_needs_reset = lambda: resets.append(1)
    drv = FakeDriver(rng, queue_size=16)
    drv.activate()
    drv.queues[0].set_avail_idx(100)
    drv.kick(0)
    assert rng.needs_reset and resets == [1]
    rng.close()


def test_missing_source_is_a_config_error(tmp_path) -> None:
    import pytest

    from appliance.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        VirtioRng(str(tmp_path / "nope"))
    assert "nope" in str(info.value)


async def test_max_bytes_per_period_holds_the_rest_until_the_next_period() -> None:
    import asyncio
    import time

    rng = VirtioRng(max_bytes=100, period_ms=300)
    drv = FakeDriver(rng)
    drv.activate()
    q = drv.queues[0]
    heads = [q.add_chain([(drv.alloc(64), 64, WRITE)]) for _ in range(4)]
    start = time.monotonic()
    drv.kick(0)
    # 100 bytes this period: one full buffer and 36 bytes of the next.
    assert q.used() == [(heads[0], 64), (heads[1], 36)]
    drv.kick(0)  # asking again changes nothing until the period is over
    assert q.used() == []
    await asyncio.sleep(0.45)
    got = q.used()
    assert got == [(heads[2], 64), (heads[3], 36)] and time.monotonic() - start >= 0.3
    assert rng.bytes_served == 200
    rng.reset()
    rng.close()


async def test_the_first_request_opens_a_period_whatever_the_monotonic_clock_reads(
        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import time

    monkeypatch.setattr(time, "monotonic", lambda: 5.0)  # a host booted seconds ago, period far longer
    rng = VirtioRng(max_bytes=32, period_ms=1 << 16)
    drv = FakeDriver(rng)
    drv.activate()
    head = drv.queues[0].add_chain([(drv.alloc(64), 64, WRITE)])
    drv.kick(0)
    assert drv.queues[0].used() == [(head, 32)]
    rng.reset()
    rng.close()


def test_requests_in_a_row_each_get_their_kick_with_event_idx() -> None:
    """A driver that notifies only when asked (§2.7.10) still has every request served."""
    rng = VirtioRng()
    drv = FakeDriver(rng, queue_size=16, event_idx=True)
    drv.activate()
    for i in range(40):  # past the ring's wrap
        buf = drv.alloc(16)
        head = drv.queues[0].add_chain([(buf, 16, WRITE)])
        assert drv.kick_if_wanted(0), f"request {i}: the device did not ask for its kick"
        assert drv.queues[0].used() == [(head, 16)]
    rng.close()
