"""virtio-net on a real tap in a namespace: the fake driver pings the host kernel."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

from appliance.net.tap import Tap
from appliance.nic import constants as C
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.testing import WRITE, FakeDriver
from tests.conftest import needs_root
from tests.net.netns import inside, namespace, ns_exec

pytestmark = needs_root
MAC = "52:54:00:00:aa:01"


async def exchange(drv: FakeDriver, frame: bytes, want) -> Ether:
    addr = drv.alloc(len(frame) + C.HDR_LEN)
    drv.mem.write(addr, C.HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame)
    drv.queues[1].add_chain([(addr, C.HDR_LEN, 0), (addr + C.HDR_LEN, len(frame), 0)])
    drv.kick(1)
    for _ in range(20):
        rx = drv.alloc(2048)
        drv.queues[0].add_chain([(rx, 2048, WRITE)])
        drv.kick(0)
        await drv.wait_used(0)
        ((_, n),) = drv.queues[0].used()
        pkt = Ether(drv.mem.read(rx + C.HDR_LEN, n - C.HDR_LEN))
        if want in pkt:
            return pkt
    raise AssertionError("no answer")


@pytest.mark.parametrize("vnet_hdr", [True, False])
async def test_guest_pings_host_through_tap(vnet_hdr: bool) -> None:
    with namespace() as ns:
        with inside(ns):
            tap = Tap("nictap0", vnet_hdr=vnet_hdr)
            queues = await tap.open()
        ns_exec(ns, "ip", "addr", "add", "10.88.0.1/24", "dev", "nictap0")
        dev = VirtioNet(queues, bytes.fromhex(MAC.replace(":", "")))
        drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20)
        drv.activate()
        try:
            arp = Ether(src=MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=MAC, psrc="10.88.0.2", pdst="10.88.0.1")
            reply = await exchange(drv, bytes(arp), ARP)
            assert reply[ARP].op == 2
            ping = Ether(src=MAC, dst=reply[ARP].hwsrc) / IP(src="10.88.0.2", dst="10.88.0.1") / ICMP(id=3) / b"hello"
            echo = await exchange(drv, bytes(ping), ICMP)
            assert echo[ICMP].type == 0 and bytes(echo[ICMP].payload) == b"hello"
            assert dev.stats[0].tx_frames == 2 and dev.stats[0].rx_frames >= 2
        finally:
            dev.reset()
            with inside(ns):
                await tap.close()
