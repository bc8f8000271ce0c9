"""virtio-net over vhost-user as front ends other than our tests' drive it: GET_QUEUE_NUM in
queue pairs for a multiqueue export, and completions signalled across a ring rebuild."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.cli.net_daemon import announced_queue_num
from appliance.nat import UserNetConfig, UserNetwork
from appliance.nic import constants as C
from appliance.nic import virtio_net
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.vhost_user import VhostUserBackend, VhostUserServer
from appliance.virtio.vhost_user import protocol as p
from tests.net.test_net_daemon_qmp import daemon
from tests.vhost_user.frontend import FrontEnd


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
