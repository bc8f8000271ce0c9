"""virtio-net over vhost-user as front ends other than our tests' drive it: GET_QUEUE_NUM in
queue pairs for a multiqueue export, completions signalled across a ring rebuild, and a queue
pair switched off while it runs (its transmits given back unread)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from scapy.layers.l2 import ARP, Ether

from appliance.cli.net_daemon import announced_queue_num
from appliance.nat import UserNetConfig, UserNetwork
from appliance.nic import constants as C
from appliance.nic import virtio_net
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.vhost_user import VhostUserBackend, VhostUserServer
from appliance.virtio.vhost_user import protocol as p
from tests.net.test_net_daemon_qmp import daemon
from tests.vhost_user.frontend import FrontEnd
from tests.vhost_user.test_server import _until


async def _queue_num(path: str) -> int:
    fe = await FrontEnd.connect(path)
    try:
        proto = int.from_bytes(await fe.call(p.Request.GET_PROTOCOL_FEATURES), "little")
        assert proto >> p.ProtocolFeature.MQ & 1
        fe.send(p.Request.SET_PROTOCOL_FEATURES, p.u64(proto))
        return int.from_bytes(await fe.call(p.Request.GET_QUEUE_NUM), "little")
    finally:
        fe.close()


async def test_a_multiqueue_export_answers_get_queue_num_in_queue_pairs(tmp_path: Path) -> None:
    """QEMU's vhost-user netdev (vhost_user_start) and DPDK's virtio-user compare the answer with
    their queue pairs. Answering rings (4 for two pairs) let ``queues=4`` start on a two-pair
    export, whose guest (offered MQ) then sent on rings the back end had refused without a
    word (QEMU sends them without NEED_REPLY)."""
    stacks = [UserNetwork(UserNetConfig(nameservers=()), vnet_hdr=True) for _ in range(2)]
    dev = VirtioNet(stacks, bytes.fromhex("525400123456"), control_queue=False)
    assert dev.device_features() >> C.F_MQ & 1
    server = VhostUserServer(tmp_path / "mq.sock", VhostUserBackend(dev, queue_num=announced_queue_num(2)))
    await server.start()
    try:
        assert await _queue_num(str(server.path)) == 2
    finally:
        await server.close()


async def test_a_one_pair_export_lets_qemu_ask_for_two(tmp_path: Path) -> None:
    """With one pair the device offers no MQ, the guest drives pair 0 alone and QEMU starts only
    its rings: the daemon answers its 2 rings, so ``-netdev vhost-user,queues=2`` starts
    (tests/linux/test_user_net_features.py runs that guest)."""
    async with daemon(tmp_path, client=False):
        assert await _queue_num(str(tmp_path / "vu.sock")) == 2


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[str]:
    stack = UserNetwork(UserNetConfig(nameservers=()), vnet_hdr=True)
    await stack.start()
    dev = VirtioNet([stack], bytes.fromhex("525400123456"), control_queue=False)
    server = VhostUserServer(tmp_path / "net.sock", VhostUserBackend(dev, queue_num=1))
    await server.start()
    yield str(server.path)
    await server.close()
    await stack.stop()


async def test_a_deferred_transmit_interrupt_is_sent_when_the_rings_are_rebuilt(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small frame's completion interrupt waits (TX_IRQ_LAZY); a new memory table meanwhile
    rebuilds the queues, and the rebuilt queue takes every used entry as signalled. The
    interrupt must go out then, or a driver waiting on its used_event never hears of it."""
    monkeypatch.setattr(virtio_net, "TX_IRQ_LAZY", 30.0)  # nothing but the rebuild sends it
    fe = await FrontEnd.connect(served)
    try:
        await fe.negotiate()
        await fe.start_ring(0)
        tx = await fe.start_ring(1)
        await asyncio.sleep(0.05)  # past the TX_IRQ_DELAY the rings' first (empty) pass armed
        # 60 bytes that look like TCP (IPv4, protocol 6: what may wait lazily) but are no
        # packet the stack answers (IP version 0): no receive interrupt takes the transmit one along.
        frame = (bytes(C.HDR_LEN) + b"\xff" * 6 + bytes.fromhex("525400123456") + b"\x08\x00"
                 + bytes(9) + b"\x06" + bytes(36))
        addr = fe.alloc(len(frame))
        fe.mem.write(addr, frame)
        tx.add_chain([(addr, len(frame), 0)])
        fe.kick(1)
        for _ in range(500):
            if tx.pending():
                break
            await asyncio.sleep(0.002)
        assert [n for _, n in tx.used()] == [0]  # taken, and given back
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fe.calls[1])  # deferred
        assert await fe.acked(p.Request.SET_MEM_TABLE, p.mem_table([fe.region]), [fe.memfd]) == 0
        assert await fe.wait_call(1, timeout=2) >= 1
    finally:
        fe.close()


@pytest.fixture
async def two_pairs(tmp_path: Path) -> AsyncIterator[tuple[str, list[UserNetwork]]]:
    stacks = [UserNetwork(UserNetConfig(nameservers=()), vnet_hdr=True) for _ in range(2)]
    for s in stacks:
        await s.start()
    dev = VirtioNet(stacks, bytes.fromhex("525400123456"), control_queue=False)
    server = VhostUserServer(tmp_path / "mq.sock", VhostUserBackend(dev, queue_num=announced_queue_num(2)))
    await server.start()
    yield str(server.path), stacks
    await server.close()
    for s in stacks:
        await s.stop()


def _send_arp(fe: FrontEnd, ring: int) -> int:
    """Queue a guest's ARP request for the gateway on transmit ring ``ring``; its head."""
    frame = bytes(C.HDR_LEN) + bytes(
        Ether(dst="ff:ff:ff:ff:ff:ff", src="52:54:00:12:34:56")
        / ARP(op=1, hwsrc="52:54:00:12:34:56", psrc="10.0.2.15", pdst="10.0.2.2")
    )
    addr = fe.alloc(len(frame))
    fe.mem.write(addr, frame)
    head = fe.queues[ring].add_chain([(addr, len(frame), 0)])
    fe.kick(ring)
    return head


async def _both_pairs_running(path: str) -> FrontEnd:
    fe = await FrontEnd.connect(path)
    await fe.negotiate()
    for i in range(4):
        await fe.start_ring(i)
    return fe


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


async def test_a_pair_switched_off_has_its_transmits_discarded_not_sent_later(
    two_pairs: tuple[str, list[UserNetwork]],
) -> None:
    """vhost-user.rst "Ring states": a started but disabled ring is processed without side
    effects; a network device discards what is transmitted on it. A guest going to fewer queue
    pairs (ethtool -L) gets back the frames it queued on the pair QEMU switched off, and they are
    not sent when the pair comes back."""
    path, stacks = two_pairs
    fe = await _both_pairs_running(path)
    try:
        for i in (2, 3):
            assert await fe.acked(p.Request.SET_VRING_ENABLE, p.vring_state(i, 0)) == 0
        before = stacks[1].stats.rx_frames
        head = _send_arp(fe, 3)
        await fe.wait_call(3)
        assert fe.queues[3].used() == [(head, 0)]  # given back unread
        await _settle()
        assert stacks[1].stats.rx_frames == before
        for i in (2, 3):
            assert await fe.acked(p.Request.SET_VRING_ENABLE, p.vring_state(i, 1)) == 0
        await _settle()
        assert stacks[1].stats.rx_frames == before  # the discarded frame is not replayed
        head = _send_arp(fe, 3)
        await _until(lambda: stacks[1].stats.rx_frames > before)
        assert stacks[1].stats.rx_frames == before + 1
        assert [h for h, _ in fe.queues[3].used()] == [head]
        # Switched off again and stopped: GET_VRING_BASE counts the discarded buffer too.
        assert await fe.acked(p.Request.SET_VRING_ENABLE, p.vring_state(3, 0)) == 0
        _send_arp(fe, 3)
        await fe.wait_call(3)
        assert await fe.get_vring_base(3) == 3
        assert stacks[1].stats.rx_frames == before + 1
    finally:
        fe.close()


async def test_a_ring_not_yet_enabled_keeps_what_the_guest_queued(
    two_pairs: tuple[str, list[UserNetwork]],
) -> None:
    """A ring also starts disabled, until its front end enables it after SET_VRING_KICK (Cloud
    Hypervisor's order): a frame queued meanwhile, such as a first DHCP DISCOVER, is sent once
    the ring is enabled, not discarded."""
    path, stacks = two_pairs
    fe = await FrontEnd.connect(path)
    try:
        await fe.negotiate()
        await fe.start_ring(0)
        await fe.start_ring(1, enable=False)
        before = stacks[0].stats.rx_frames
        head = _send_arp(fe, 1)
        await _settle()
        assert fe.queues[1].pending() == 0
        assert stacks[0].stats.rx_frames == before
        assert await fe.acked(p.Request.SET_VRING_ENABLE, p.vring_state(1, 1)) == 0
        await _until(lambda: fe.queues[1].pending() > 0)
        assert fe.queues[1].used() == [(head, 0)]
        assert stacks[0].stats.rx_frames == before + 1
    finally:
        fe.close()


async def test_a_broken_switched_off_ring_is_left_alone(two_pairs: tuple[str, list[UserNetwork]]) -> None:
    """Guest-controlled: an avail index further ahead than the ring is long, on a ring being
    emptied while disabled, stops the emptying (logged); the pairs still enabled go on."""
    path, stacks = two_pairs
    fe = await _both_pairs_running(path)
    try:
        assert await fe.acked(p.Request.SET_VRING_ENABLE, p.vring_state(3, 0)) == 0
        fe.queues[3].set_avail_idx(1000)  # 1000 entries pending in a ring of 64
        fe.kick(3)
        await _settle()
        assert fe.queues[3].pending() == 0
        before = stacks[0].stats.rx_frames
        head = _send_arp(fe, 1)
        await _until(lambda: fe.queues[1].pending() > 0)
        assert fe.queues[1].used() == [(head, 0)]
        assert stacks[0].stats.rx_frames == before + 1
        assert await fe.get_vring_base(3) == 0  # nothing was taken from it
    finally:
        fe.close()
