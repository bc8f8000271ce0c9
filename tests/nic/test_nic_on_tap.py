"""virtio-net on a real tap in a namespace: the fake driver pings the host kernel."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

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
ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def nic_on_tap(
    ifname: str, host_addr: str, *, vnet_hdr: bool = True
) -> AsyncIterator[tuple[str, VirtioNet, FakeDriver]]:
    """A namespace with tap ``ifname`` (host side ``host_addr``) under a virtio-net the fake driver runs."""
    with namespace() as ns:
        with inside(ns):
            tap = Tap(ifname, vnet_hdr=vnet_hdr)
            queues = await tap.open()
        ns_exec(ns, "ip", "addr", "add", host_addr, "dev", ifname)
        dev = VirtioNet(queues, bytes.fromhex(MAC.replace(":", "")))
        drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20)
        drv.activate()
        try:
            yield ns, dev, drv
        finally:
            dev.reset()
            with inside(ns):
                await tap.close()


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
    async with nic_on_tap("nictap0", "10.88.0.1/24", vnet_hdr=vnet_hdr) as (_ns, dev, drv):
        arp = Ether(src=MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=MAC, psrc="10.88.0.2", pdst="10.88.0.1")
        reply = await exchange(drv, bytes(arp), ARP)
        assert reply[ARP].op == 2
        ping = Ether(src=MAC, dst=reply[ARP].hwsrc) / IP(src="10.88.0.2", dst="10.88.0.1") / ICMP(id=3) / b"hello"
        echo = await exchange(drv, bytes(ping), ICMP)
        assert echo[ICMP].type == 0 and bytes(echo[ICMP].payload) == b"hello"
        assert dev.stats[0].tx_frames == 2 and dev.stats[0].rx_frames >= 2


async def test_malformed_vnet_headers_are_dropped_and_the_nic_keeps_working() -> None:
    """GSO claims the kernel refuses (bad gso_size, bad csum offsets) cost one frame each, nothing more."""
    async with nic_on_tap("nictap1", "10.88.1.1/24") as (_ns, dev, drv):
        frame = bytes(Ether(src=MAC, dst="ff:ff:ff:ff:ff:ff") / IP(src="10.88.1.2", dst="10.88.1.1") / (b"x" * 40))
        bad_headers = [
            C.HDR.pack(0, C.GSO_TCPV4, 0, 0, 0, 0, 0),              # TSO without NEEDS_CSUM and no MSS
            C.HDR.pack(C.HDR_F_NEEDS_CSUM, 0, 0, 0, 60000, 16, 0),  # checksum start past the frame
            C.HDR.pack(0, 0x7F, 54, 1400, 0, 0, 0),                 # unknown GSO type
        ]
        for h in bad_headers:
            addr = drv.alloc(len(frame) + C.HDR_LEN)
            drv.mem.write(addr, h + frame)
            drv.queues[1].add_chain([(addr, C.HDR_LEN + len(frame), 0)])
        drv.kick(1)
        assert len(drv.queues[1].used()) == 3 and not dev.needs_reset
        assert dev.stats[0].tx_dropped == 3
        arp = Ether(src=MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=MAC, psrc="10.88.1.2", pdst="10.88.1.1")
        reply = await exchange(drv, bytes(arp), ARP)
        assert reply[ARP].op == 2


async def test_flood_without_rx_buffers_stays_in_the_kernel_queue(tmp_path: Path) -> None:
    """With no buffers posted we stop reading: the tap's own queue fills and drops, our memory does not grow."""
    import resource

    blast = tmp_path / "blast"
    subprocess.run(["gcc", "-O2", "-o", str(blast), str(ROOT / "bench" / "tools" / "blast.c")], check=True)
    async with nic_on_tap("nictap2", "10.88.2.1/24") as (ns, dev, drv):
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        flood = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, str(blast), "nictap2", "1400", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await flood.communicate()
        counts = dict(kv.split("=") for kv in out.decode().split()[1:])
        await asyncio.sleep(0.1)
        assert dev.stats[0].rx_frames == 0
        # The tap's queue took about a thousand frames; the kernel refused the
        # rest at the sender. Nothing piled up in this process.
        assert int(counts["sent"]) <= 5000 and int(counts["failed"]) > 10000
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 20_000  # KiB
        # Buffers arrive: the NIC delivers again.
        rx = drv.alloc(2048)
        drv.queues[0].add_chain([(rx, 2048, WRITE)])
        drv.kick(0)
        await drv.wait_used(0)
        assert dev.stats[0].rx_frames == 1
