"""A legacy driver without VIRTIO_NET_F_MRG_RXBUF lays out a 10-byte header (virtio 1.2
§5.1.6.1: no num_buffers). QEMU's ``disable-modern=on,mrg_rxbuf=off`` on a vhost-user
netdev hands us exactly that driver; with the 12-byte layout assumed, a Linux guest on
net-daemon never got its DHCP lease (tests/linux/test_user_net_features.py)."""

from __future__ import annotations

import pytest

from appliance.net.memory import MemoryLink
from appliance.nic import constants as C
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.device import VIRTIO_F_VERSION_1
from appliance.virtio.testing import WRITE, FakeDriver

MAC = bytes.fromhex("525400123456")
FRAME = MAC + bytes.fromhex("525400abcdef") + b"\x08\x00" + bytes(range(60))
LEGACY = C.HDR_LEN - 2


def make(vnet: int) -> tuple[VirtioNet, FakeDriver, MemoryLink]:
    link = MemoryLink(vnet_hdr_len=vnet)
    dev = VirtioNet([link], MAC)
    drv = FakeDriver(dev, queue_size=64, mem_size=4 << 20)
    drv.features &= ~(1 << VIRTIO_F_VERSION_1 | 1 << C.F_MRG_RXBUF)
    drv.activate()
    return dev, drv, link


@pytest.mark.parametrize("vnet", [C.HDR_LEN, 0], ids=["vnet-backend", "plain-backend"])
async def test_legacy_10_byte_header_without_mergeable_buffers(vnet: int) -> None:
    dev, drv, link = make(vnet)
    # Transmit: a 10-byte header (NEEDS_CSUM, csum_start 34, offset 16) split from the frame.
    legacy_hdr = C.HDR.pack(C.HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16, 0)[:LEGACY]
    addr = drv.alloc(LEGACY + len(FRAME))
    drv.mem.write(addr, legacy_hdr + FRAME)
    drv.queues[1].add_chain([(addr, LEGACY, 0), (addr + LEGACY, len(FRAME), 0)])
    drv.kick(1)
    assert link.sent == [legacy_hdr + bytes(2) + FRAME if vnet else FRAME]
    # Receive: the backend's 12-byte header becomes the driver's 10 bytes, the frame follows at 10.
    buf = drv.alloc(2048)
    head = drv.queues[0].add_chain([(buf, 2048, WRITE)])
    drv.kick(0)
    rx_hdr = C.HDR.pack(0, C.GSO_NONE, 0, 0, 0, 0, 1)
    link.inject(rx_hdr + FRAME if vnet else FRAME)
    await drv.wait_used(0)
    assert drv.queues[0].used() == [(head, LEGACY + len(FRAME))]
    assert drv.mem.read(buf, LEGACY + len(FRAME)) == rx_hdr[:LEGACY] + FRAME
    assert dev.stats[0].rx_frames == 1 and dev.stats[0].tx_frames == 1
