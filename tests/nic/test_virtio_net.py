"""virtio-net through the fake guest driver: tx, rx, mergeable buffers, control queue."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from appliance.net.memory import MemoryLink
from appliance.nic import constants as C
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.testing import WRITE, FakeDriver

MAC = bytes.fromhex("525400123456")
OTHER = bytes.fromhex("525400abcdef")


def eth(dst: bytes, payload: bytes = b"p" * 50, src: bytes = OTHER) -> bytes:
    return dst + src + b"\x08\x00" + payload


def hdr(num_buffers: int = 0, flags: int = 0) -> bytes:
    return C.HDR.pack(flags, 0, 0, 0, 0, 0, num_buffers)


def make(pairs: int = 1, vnet: int = 0, *, features_off: tuple[int, ...] = ()) -> tuple[VirtioNet, FakeDriver, list]:
    links = [MemoryLink(vnet_hdr_len=vnet) for _ in range(pairs)]
    dev = VirtioNet(links, MAC)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20)
    for bit in features_off:
        drv.features &= ~(1 << bit)
    drv.activate()
    return dev, drv, links


def post_rx(drv: FakeDriver, queue: int, size: int, count: int = 1) -> list[tuple[int, int]]:
    out = []
    for _ in range(count):
        addr = drv.alloc(size)
        head = drv.queues[queue].add_chain([(addr, size, WRITE)])
        out.append((head, addr))
    return out


def send_tx(drv: FakeDriver, queue: int, data: bytes, split: int | None = None) -> int:
    addr = drv.alloc(len(data))
    drv.mem.write(addr, data)
    if split is None:
        return drv.queues[queue].add_chain([(addr, len(data), 0)])
    return drv.queues[queue].add_chain([(addr, split, 0), (addr + split, len(data) - split, 0)])


async def test_tx_strips_the_header_for_a_plain_backend() -> None:
    dev, drv, (link,) = make()
    frame = eth(OTHER)
    head = send_tx(drv, 1, hdr() + frame, split=C.HDR_LEN)
    drv.kick(1)
    assert drv.queues[1].used() == [(head, 0)]
    assert link.sent == [frame]
    assert dev.stats[0].tx_frames == 1
    # The transmit interrupt comes after TX_IRQ_DELAY (see test_tx_irq_delay.py).
    await drv.interrupts[1].wait()
    assert drv.interrupts[1].count == 1


async def test_tx_passes_the_header_to_a_vnet_backend() -> None:
    dev, drv, (link,) = make(vnet=C.HDR_LEN)
    frame = eth(OTHER)
    h = C.HDR.pack(C.HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16, 0)
    send_tx(drv, 1, h + frame, split=5)  # header split across descriptors
    drv.kick(1)
    assert link.sent == [h + frame]


async def test_rx_writes_header_and_frame_into_posted_buffer() -> None:
    dev, drv, (link,) = make()
    ((head, addr),) = post_rx(drv, 0, 2048)
    drv.kick(0)
    frame = eth(MAC)
    link.inject(frame)
    await drv.wait_used(0)
    assert drv.queues[0].used() == [(head, C.HDR_LEN + len(frame))]
    got = drv.mem.read(addr, C.HDR_LEN + len(frame))
    assert C.HDR.unpack(got[: C.HDR_LEN])[6] == 1
    assert got[C.HDR_LEN :] == frame
    assert drv.interrupts[0].count == 1


async def test_frames_wait_in_the_backend_until_buffers_are_posted() -> None:
    dev, drv, (link,) = make()
    for i in range(3):
        link.inject(eth(MAC, bytes([i]) * 60))
    await asyncio.sleep(0.01)
    assert drv.queues[0].pending() == 0 and len(link.inbound) == 3
    post_rx(drv, 0, 2048, count=2)
    drv.kick(0)
    await drv.wait_used(0, 2)
    assert len(link.inbound) == 1
    post_rx(drv, 0, 2048)
    drv.kick(0)
    await drv.wait_used(0, 3)
    assert not link.inbound and dev.stats[0].rx_frames == 3


async def test_mergeable_buffers_carry_a_gso_frame_across_chains() -> None:
    dev, drv, (link,) = make(vnet=C.HDR_LEN)
    bufs = post_rx(drv, 0, 1024, count=4)
    drv.kick(0)
    frame = eth(MAC, bytes(range(256)) * 10)  # 2574 bytes + header: three buffers
    link.inject(hdr(num_buffers=1) + frame)
    await drv.wait_used(0, 3)
    used = drv.queues[0].used()
    assert [h for h, _ in used] == [h for h, _ in bufs[:3]]
    total = C.HDR_LEN + len(frame)
    assert [n for _, n in used] == [1024, 1024, total - 2048]
    data = b"".join(drv.mem.read(a, 1024) for _, a in bufs[:3])[:total]
    assert struct.unpack_from("<H", data, 10)[0] == 3
    assert data[C.HDR_LEN :] == frame
    # The fourth buffer is still the guest's, for the next frame.
    link.inject(hdr() + eth(MAC))
    await drv.wait_used(0, 1)
    assert drv.queues[0].used()[0][0] == bufs[3][0]


async def test_a_jumbo_frame_from_a_headerless_backend_spans_mergeable_buffers() -> None:
    """No GSO and no VIRTIO_NET_F_MTU: Linux lets its MTU go up to 64 KiB and takes a 9000-byte
    frame (a tap on a jumbo bridge, a socket netdev) across mergeable buffers, as QEMU gives it."""
    dev, drv, (link,) = make()
    assert dev.has_feature(C.F_MRG_RXBUF) and not dev.has_feature(C.F_GUEST_TSO4)
    bufs = post_rx(drv, 0, 4096, count=20)
    drv.kick(0)
    frame = eth(MAC, os.urandom(9000 - 14))
    link.inject(frame)
    await drv.wait_used(0, 3)
    used = drv.queues[0].used()
    assert [h for h, _ in used] == [h for h, _ in bufs[:3]]
    data = b"".join(drv.mem.read(a, n) for (_, a), (_, n) in zip(bufs, used, strict=False))
    assert struct.unpack_from("<H", data, 10)[0] == 3 and data[C.HDR_LEN :] == frame
    assert dev.stats[0].rx_dropped == 0


async def test_frame_larger_than_buffers_without_mergeable_is_dropped() -> None:
    dev, drv, (link,) = make(features_off=(C.F_MRG_RXBUF,))
    post_rx(drv, 0, 256)
    drv.kick(0)
    link.inject(eth(MAC, b"x" * 1000))
    link.inject(eth(MAC, b"y" * 100))
    await drv.wait_used(0)
    ((head, n),) = drv.queues[0].used()
    assert n == C.HDR_LEN + 14 + 100
    assert dev.stats[0].rx_dropped == 1


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
async def test_control_commands_in_a_row_each_get_their_kick(event_idx: bool) -> None:
    """A Linux driver notifies the control queue only when the device asks for it (§2.7.10)
    and then spins until the answer is there; its set_rx_mode sends PROMISC, ALLMULTI and
    MAC_TABLE_SET one after another. Each must be asked for: with EVENT_IDX the device has
    to move avail_event on, or the second command is never kicked and the guest spins for
    ever (avail_event stayed at 0, which only the first command steps past)."""
    dev = VirtioNet([MemoryLink()], MAC)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20, event_idx=event_idx)
    drv.activate()
    ctrl = 2
    ack = drv.alloc(1)
    table = (1).to_bytes(4, "little") + OTHER + bytes(4)
    commands = [(C.CTRL_RX, C.CTRL_RX_PROMISC, b"\x01"), (C.CTRL_RX, C.CTRL_RX_ALLMULTI, b"\x00"),
                (C.CTRL_MAC, C.CTRL_MAC_TABLE_SET, table)] * 30  # past the 64-entry ring's wrap
    for i, (cls, cmd, arg) in enumerate(commands):
        a = drv.alloc(2 + len(arg))
        drv.mem.write(a, bytes([cls, cmd]) + arg)
        drv.mem.write(ack, b"\xff")
        head = drv.queues[ctrl].add_chain([(a, 2 + len(arg), 0), (ack, 1, WRITE)])
        assert drv.kick_if_wanted(ctrl), f"command {i}: the device did not ask for its kick"
        assert drv.queues[ctrl].used() == [(head, 1)], f"command {i} not answered"
        assert drv.mem.read(ack, 1)[0] == C.CTRL_OK
    assert dev.filter.promisc and not dev.filter.allmulti and dev.filter.uni == {OTHER}


async def test_transmits_in_a_row_each_get_their_kick_with_event_idx() -> None:
    """The same for the transmit queue: each frame sent after the last was taken is asked for."""
    dev = VirtioNet([MemoryLink()], MAC)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20, event_idx=True)
    drv.activate()
    link = dev.backends[0]
    for i in range(100):
        head = send_tx(drv, 1, hdr() + eth(OTHER, bytes([i]) * 60))
        assert drv.kick_if_wanted(1), f"frame {i}: the device did not ask for its kick"
        assert drv.queues[1].used() == [(head, 0)]
    assert len(link.sent) == 100  # type: ignore[attr-defined]


def ctrl_command(drv: FakeDriver, cls: int, cmd: int, arg: bytes, ctrl: int = 2) -> int:
    """Send one control command the way Linux does (kick only if asked) and return its ack."""
    a, ack = drv.alloc(2 + len(arg)), drv.alloc(1)
    drv.mem.write(a, bytes([cls, cmd]) + arg)
    drv.mem.write(ack, b"\xff")
    head = drv.queues[ctrl].add_chain([(a, 2 + len(arg), 0), (ack, 1, WRITE)])
    drv.kick_if_wanted(ctrl)
    assert drv.queues[ctrl].used() == [(head, 1)], "command not answered"
    return drv.mem.read(ack, 1)[0]


def mac_tables(uni: list[bytes], multi: list[bytes]) -> bytes:
    return (len(uni).to_bytes(4, "little") + b"".join(uni) + len(multi).to_bytes(4, "little")
            + b"".join(multi))


async def test_mac_table_beyond_64_entries_lets_that_class_through() -> None:
    """Linux sends every address it has (macvlans, VLANs, multicast groups) with no cap;
    past 64 in all the class that does not fit passes whole and the answer is OK, as in
    QEMU, where we used to refuse the table and keep filtering to the old one."""
    dev, drv, (link,) = make()
    assert ctrl_command(drv, C.CTRL_RX, C.CTRL_RX_PROMISC, b"\x00") == C.CTRL_OK
    uni = [bytes([0x02, 0, 0, 0, 0, i]) for i in range(100)]
    multi = [bytes([0x01, 0, 0x5E, 0, 0, i]) for i in range(3)]
    assert ctrl_command(drv, C.CTRL_MAC, C.CTRL_MAC_TABLE_SET, mac_tables(uni, multi)) == C.CTRL_OK
    f = dev.filter
    assert f.uni_overflow and not f.multi_overflow and f.multi == set(multi)
    assert f.accepts(bytes.fromhex("0200000000ff")) and not f.accepts(bytes.fromhex("01005e0000ff"))
    # 60 unicast fit, but 60 + 10 multicast do not: the multicast class passes.
    uni, multi = uni[:60], [bytes([0x01, 0, 0x5E, 0, 1, i]) for i in range(10)]
    assert ctrl_command(drv, C.CTRL_MAC, C.CTRL_MAC_TABLE_SET, mac_tables(uni, multi)) == C.CTRL_OK
    assert not f.uni_overflow and f.uni == set(uni) and f.multi_overflow
    assert f.accepts(bytes.fromhex("01005e00ffff")) and not f.accepts(bytes.fromhex("0200000000ff"))
    # A count longer than the command is refused and leaves the filter as it was.
    bad = (70).to_bytes(4, "little") + b"".join(uni)
    assert ctrl_command(drv, C.CTRL_MAC, C.CTRL_MAC_TABLE_SET, bad) == C.CTRL_ERR
    assert f.uni == set(uni) and f.multi_overflow
    # Within 64 in all, both tables filter again.
    assert ctrl_command(drv, C.CTRL_MAC, C.CTRL_MAC_TABLE_SET, mac_tables([OTHER], multi[:2])) == C.CTRL_OK
    assert not f.uni_overflow and not f.multi_overflow and f.uni == {OTHER}
    post_rx(drv, 0, 2048, count=2)
    drv.kick(0)
    link.inject(eth(bytes.fromhex("0200000000ff")))  # filtered
    link.inject(eth(OTHER))
    await drv.wait_used(0)
    await asyncio.sleep(0.01)
    assert len(drv.queues[0].used()) == 1 and dev.stats[0].rx_filtered == 1


async def test_a_failing_control_command_is_still_answered() -> None:
    """Linux spins until its command comes back (virtnet_send_command, with rtnl held or in
    atomic context): a command whose handling raises is answered with an error instead of
    being left unanswered, and the queue keeps working."""

    class Refusing(MemoryLink):
        refuse = False

        def set_offloads(self, csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> None:
            if self.refuse:
                raise RuntimeError("the host refused the offloads")

    link = Refusing(vnet_hdr_len=C.HDR_LEN)
    dev = VirtioNet([link], MAC)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20, event_idx=True)
    drv.activate()
    link.refuse = True
    assert dev.has_feature(C.F_CTRL_GUEST_OFFLOADS)
    offloads = (1 << C.F_GUEST_CSUM).to_bytes(8, "little")
    assert ctrl_command(drv, C.CTRL_GUEST_OFFLOADS, C.CTRL_GUEST_OFFLOADS_SET, offloads) == C.CTRL_ERR
    assert not dev.needs_reset
    assert ctrl_command(drv, C.CTRL_RX, C.CTRL_RX_PROMISC, b"\x00") == C.CTRL_OK


async def test_reset_brings_back_the_configured_mac() -> None:
    """A MAC the guest set (CTRL_MAC_ADDR_SET) lasts until the device is reset; then the
    configured one is back in config space, for the next driver to read (QEMU's
    virtio_net_reset does the same)."""
    dev, drv, _ = make()
    assert ctrl_command(drv, C.CTRL_MAC, C.CTRL_MAC_ADDR_SET, OTHER) == C.CTRL_OK
    assert dev.config_bytes()[:6] == OTHER and dev.filter.mac == OTHER
    dev.reset()
    assert dev.config_bytes()[:6] == MAC and dev.filter.mac == MAC


async def test_link_down_drops_frames_both_ways() -> None:
    """set_link off is a pulled cable, as in QEMU (net/net.c drops what a link-down NIC sends
    or is sent): a Linux guest only turns its carrier off and still takes what arrives."""
    dev, drv, (link,) = make()
    post_rx(drv, 0, 2048, count=4)
    drv.kick(0)
    dev.set_link(False)
    assert not dev.config_bytes()[6] & C.S_LINK_UP
    head = send_tx(drv, 1, hdr() + eth(OTHER))
    drv.kick(1)
    assert drv.queues[1].used() == [(head, 0)]  # taken and dropped
    link.inject(eth(MAC, b"down" * 20))
    await asyncio.sleep(0.02)
    assert link.sent == [] and drv.queues[0].used() == []
    dev.set_link(True)
    send_tx(drv, 1, hdr() + eth(OTHER))
    drv.kick(1)
    assert link.sent == [eth(OTHER)]
    link.inject(eth(MAC, b"up" * 20))
    await drv.wait_used(0)
    ((_, n),) = drv.queues[0].used()
    assert n == C.HDR_LEN + 14 + 40  # the frame sent while down is gone


async def test_rx_filter_drops_other_unicast_once_promisc_is_off() -> None:
    dev, drv, (link,) = make()
    ctrl = 2
    ack_addr = drv.alloc(1)

    def command(cls: int, cmd: int, arg: bytes) -> int:
        a = drv.alloc(2 + len(arg))
        drv.mem.write(a, bytes([cls, cmd]) + arg)
        drv.queues[ctrl].add_chain([(a, 2 + len(arg), 0), (ack_addr, 1, WRITE)])
        drv.kick(ctrl)
        drv.queues[ctrl].used()
        return drv.mem.read(ack_addr, 1)[0]

    assert command(C.CTRL_RX, C.CTRL_RX_PROMISC, b"\x00") == C.CTRL_OK
    post_rx(drv, 0, 2048, count=2)
    drv.kick(0)
    link.inject(eth(OTHER))           # not for us: filtered
    link.inject(eth(b"\xff" * 6))     # broadcast: accepted
    await drv.wait_used(0)
    await asyncio.sleep(0.01)
    assert len(drv.queues[0].used()) == 1
    assert dev.stats[0].rx_filtered == 1
    assert command(C.CTRL_RX, 9, b"\x00") == C.CTRL_ERR
    assert command(C.CTRL_MAC, C.CTRL_MAC_TABLE_SET, (1).to_bytes(4, "little") + OTHER + bytes(4)) == C.CTRL_OK
    link.inject(eth(OTHER))
    await drv.wait_used(0)


async def test_multiqueue_pairs_are_enabled_by_the_control_queue() -> None:
    dev, drv, links = make(pairs=2)
    ctrl = 4
    ack = drv.alloc(1)
    a = drv.alloc(4)
    drv.mem.write(a, bytes([C.CTRL_MQ, C.CTRL_MQ_VQ_PAIRS_SET]) + (2).to_bytes(2, "little"))
    drv.queues[ctrl].add_chain([(a, 4, 0), (ack, 1, WRITE)])
    drv.kick(ctrl)
    assert drv.mem.read(ack, 1)[0] == C.CTRL_OK
    post_rx(drv, 2, 2048)
    drv.kick(2)
    links[1].inject(eth(MAC))
    await drv.wait_used(2)
    send_tx(drv, 3, hdr() + eth(OTHER))
    drv.kick(3)
    assert links[1].sent and not links[0].sent
    assert dev.stats[1].rx_frames == 1 and dev.stats[1].tx_frames == 1
    # Asking for more pairs than exist is refused.
    drv.mem.write(a + 2, (3).to_bytes(2, "little"))
    drv.queues[ctrl].add_chain([(a, 4, 0), (ack, 1, WRITE)])
    drv.kick(ctrl)
    assert drv.mem.read(ack, 1)[0] == C.CTRL_ERR


async def test_offloads_offered_only_with_a_vnet_header_backend() -> None:
    plain, _, _ = make()
    assert not plain.device_features() >> C.F_CSUM & 1
    dev, drv, (link,) = make(vnet=C.HDR_LEN)
    assert dev.device_features() >> C.F_HOST_TSO4 & 1
    assert link.offloads == (True, True, True, True, False)


async def test_broken_rx_ring_marks_the_device_for_reset_only() -> None:
    dev, drv, (link,) = make()
    drv.queues[0].set_avail_idx(500)
    drv.kick(0)
    assert dev.needs_reset
    # The tx queue of a broken device is not touched any more; nothing raised.
    drv.kick(1)


@pytest.mark.parametrize("length", [0, 5, C.HDR_LEN - 1])
async def test_tx_chain_shorter_than_the_header_is_dropped(length: int) -> None:
    dev, drv, (link,) = make()
    addr = drv.alloc(16)
    head = drv.queues[1].add_chain([(addr, length, 0)])
    drv.kick(1)
    assert drv.queues[1].used() == [(head, 0)]
    assert link.sent == [] and dev.stats[0].tx_dropped == 1


async def test_without_control_queue_every_started_pair_runs() -> None:
    links = [MemoryLink() for _ in range(2)]
    dev = VirtioNet(links, MAC, control_queue=False)
    assert dev.num_queues == 4
    assert not dev.device_features() >> C.F_CTRL_VQ & 1
    drv = FakeDriver(dev, queue_size=64)
    drv.activate()
    post_rx(drv, 2, 2048)
    drv.kick(2)
    links[1].inject(eth(MAC))
    await drv.wait_used(2)
    assert dev.stats[1].rx_frames == 1


async def test_quiesce_hands_unfilled_rx_buffers_back_to_the_ring() -> None:
    dev, drv, (link,) = make(vnet=C.HDR_LEN)
    post_rx(drv, 0, 1024, count=4)
    drv.kick(0)
    link.inject(hdr() + eth(MAC))
    await drv.wait_used(0)
    q0 = dev._queues[0]
    assert q0.last_avail_idx == 4  # all four taken into the window, one filled
    await dev.quiesce()
    assert q0.last_avail_idx == 1  # the three unfilled ones will be offered again
