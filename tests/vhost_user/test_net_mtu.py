"""A front end's link MTU reaches the user-mode stack behind our virtio-net.

QEMU's ``-device virtio-net-pci,host_mtu=N`` on a vhost-user netdev offers the
guest VIRTIO_NET_F_MTU itself and tells the back end with NET_SET_MTU, but only
when the back end offers the NET_MTU protocol feature; otherwise it keeps the
MTU to itself. Our user-mode stack builds frames for the guest, so without it
a 1400-byte-MTU guest was sent 1442-byte echo replies (found with a Linux guest
in tests/linux/test_user_net_features.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

from appliance.nat import UserNetConfig, UserNetwork
from appliance.nic import constants as C
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.vhost_user import VhostUserBackend, VhostUserServer
from appliance.virtio.vhost_user import protocol as p
from tests.vhost_user.frontend import FrontEnd

GUEST_MAC = "52:54:00:12:34:56"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[VirtioNet, UserNetwork, str]]:
    stack = UserNetwork(UserNetConfig(nameservers=()), vnet_hdr=True)
    await stack.start()
    dev = VirtioNet([stack], bytes.fromhex("525400123456"), control_queue=False)
    server = VhostUserServer(tmp_path / "net.sock", VhostUserBackend(dev))
    await server.start()
    yield dev, stack, str(server.path)
    await server.close()
    await stack.stop()


def echo_reply_frames(stack: UserNetwork, size: int) -> list[bytes]:
    """Ping the gateway with ``size`` bytes of data (one unfragmented packet) and collect what comes back."""
    req = Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / IP(src="10.0.2.15", dst="10.0.2.2") / ICMP(id=7, seq=1)
    frame = bytes(C.HDR_LEN) + bytes(req / (b"x" * size))
    assert stack.send([memoryview(frame)])
    out, buf = [], memoryview(bytearray(70000))
    while (n := stack.recv_into([buf])) >= 0:
        out.append(bytes(buf[C.HDR_LEN : n]))
    return [f for f in out if f[12:14] == b"\x08\x00" and f[23] == 1]  # IPv4 ICMP


async def test_net_set_mtu_from_qemus_host_mtu_reaches_the_user_stack(served) -> None:  # type: ignore[no-untyped-def]
    dev, stack, path = served
    fe = await FrontEnd.connect(path)
    try:
        proto = int.from_bytes(await fe.call(p.Request.GET_PROTOCOL_FEATURES), "little")
        assert proto >> p.ProtocolFeature.NET_MTU & 1, "QEMU sends host_mtu only when NET_MTU is offered"
        fe.send(p.Request.SET_PROTOCOL_FEATURES, p.u64(proto))
        assert await fe.acked(p.Request.NET_SET_MTU, p.u64(1400)) == 0
        assert (dev.mtu, stack.mtu) == (1400, 1400)
        # A 1400-byte ping (reassembled from the guest's fragments) is answered in fragments
        # that each fit the guest's MTU (virtio 1.2 §5.1.4.2), not in one 1442-byte frame.
        frames = echo_reply_frames(stack, 1400)
        assert len(frames) == 2 and max(len(f) for f in frames) <= 14 + 1400, [len(f) for f in frames]
        # Out of IPv4's range: refused, which QEMU reports as "MTU not supported by the backend".
        assert await fe.acked(p.Request.NET_SET_MTU, p.u64(40)) != 0
        assert stack.mtu == 1400
    finally:
        fe.close()
    # The next front end starts from the device's own MTU again.
    for _ in range(200):
        if stack.mtu == 1500:
            break
        await asyncio.sleep(0.01)
    assert (dev.mtu, stack.mtu) == (None, 1500)
    assert len(echo_reply_frames(stack, 1400)) == 1


def test_in_process_nic_host_mtu_reaches_the_user_stack() -> None:
    """``appliance run -device virtio-net-pci,host_mtu=1400 -netdev user``: the same, from the NIC's config."""
    stack = UserNetwork(UserNetConfig(nameservers=()), vnet_hdr=True)
    VirtioNet([stack], bytes.fromhex("525400123456"), mtu=1400)
    assert stack.mtu == 1400
