"""Hypothesis: random config-space and BAR accesses never raise, and a clean init still works."""

from __future__ import annotations

import asyncio
import logging

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.virtio.pci import _FIELDS
from appliance.virtio.testing import WRITE
from tests.pci.test_virtio_pci import Rig
from tests.pci.virtio_driver import ModernDriver, lay_out_queue

_SIZES = st.sampled_from([1, 2, 4, 8, 3, 0])
_VALUES = st.one_of(
    st.sampled_from([0, 1, 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF, 0x8000, 0xC000]),
    st.integers(0, 0x2_0000),
    st.integers(0, (1 << 64) - 1),
)
# Register starts (common config fields, ISR, device config, doorbells) and anything.
_BAR4_OFFSETS = st.one_of(
    st.sampled_from([start for _, start, _ in _FIELDS] + [0x1000, 0x2000, 0x2008, 0x3000, 0x3004]),
    st.integers(0, 0x40), st.integers(0, 0x4100),
)
_OPS = st.one_of(
    st.tuples(st.just("cfg"), st.one_of(st.sampled_from([0x04, 0x20, 0x24, 0x18, 0x1C]),
                                        st.integers(-4, 260)), _SIZES, _VALUES),
    st.tuples(st.just("bar4"), _BAR4_OFFSETS, _SIZES, _VALUES),
    st.tuples(st.just("bar2"), st.one_of(st.sampled_from([0, 8, 12, 16, 28, 0x30]),
                                         st.integers(0, 0x1010)), _SIZES, _VALUES),
    st.tuples(st.just("read4"), _BAR4_OFFSETS, _SIZES, st.just(0)),
    st.tuples(st.just("cfgread"), st.integers(-4, 260), _SIZES, st.just(0)),
    st.tuples(st.just("fail"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("spin"), st.just(0), st.just(0), st.just(0)),
)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _run(ops: list[tuple[str, int, int, int]]) -> None:
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    rig = Rig(loop)
    t = rig.t
    base4 = rig.guest.bar(rig.slot, 4)
    base2 = rig.guest.bar(rig.slot, 2)
    errors = _Errors()
    for name in ("appliance.pci", "appliance.virtio.pci"):
        logging.getLogger(name).addHandler(errors)
    try:
        for kind, off, size, value in ops:
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little") if size else b""
            # Straight to the device, not through the bus, so nothing can hide an exception.
            if kind == "cfg":
                t.config_write(off, size, value & ((1 << (8 * min(size, 8))) - 1))
            elif kind == "cfgread":
                t.config_read(off, size)
            elif kind == "bar4":
                t.bar_write(4, off, data)
            elif kind == "bar2":
                t.bar_write(2, off, data)
            elif kind == "read4":
                assert len(t.bar_read(4, off, size)) == size
            elif kind == "fail":
                rig.dev.fail("fuzz")
            else:
                await asyncio.sleep(0)
        await asyncio.sleep(0.005)
        assert not loop_errors
        assert not errors.records, [r.getMessage() for r in errors.records]

        # Whatever the guest did, a driver that puts the BARs back can start over.
        for reg, base in ((0x20, base4), (0x18, base2)):
            rig.guest.cfg_write(rig.slot, reg, base & 0xFFFF_FFFF)
            rig.guest.cfg_write(rig.slot, reg + 4, base >> 32)
        rig.guest.cfg_write(rig.slot, 0x04, 0x6, 2)
        rig.drv = ModernDriver(rig.guest, rig.slot)
        rig.queues = [lay_out_queue(rig.mem, 0x10000 * (i + 1), 16) for i in range(2)]
        rig.dev.activations = 0
        rig.drv.reset()
        rig.init()
        await rig.active()
        head = rig.queues[0].add_chain([(rig.buf, 8, WRITE)])
        rig.drv.kick(0)
        for _ in range(500):
            if rig.queues[0].pending():
                break
            await asyncio.sleep(0.001)
        assert rig.queues[0].used() == [(head, 8)]
        t.close()
    finally:
        for name in ("appliance.pci", "appliance.virtio.pci"):
            logging.getLogger(name).removeHandler(errors)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_OPS, max_size=60))
def test_random_config_and_bar_accesses_never_raise(ops: list[tuple[str, int, int, int]]) -> None:
    asyncio.run(_run(ops))


def test_reset_right_after_driver_ok_from_a_vcpu_thread_completes() -> None:
    """DRIVER_OK then an immediate reset from the vCPU thread: the device ends at status 0."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        rig = Rig(loop)
        await asyncio.to_thread(rig.init)
        await asyncio.to_thread(rig.drv.set_status, 0)
        await asyncio.sleep(0.01)
        assert rig.drv.status == 0
        rig.t.close()

    asyncio.run(scenario())
