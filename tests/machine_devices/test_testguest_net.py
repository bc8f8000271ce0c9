"""The kit's test guest drives our virtio-net over virtio-pci on `appliance run`'s machine.

Through the user-mode stack (DHCP lease, ping of the gateway, the exchange
captured by ``filter-dump`` and read back with scapy), between two VMs on a UDP
link (``-netdev dgram`` on loopback: each pings the other), and on a tap in a
test namespace (the guest pings the host, the host gets a UDP echo from the guest).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from appliance.cli.run import parse_args, to_config
from appliance.kit import paths
from appliance.machine.machine import Machine
from tests.conftest import needs_kvm, needs_root
from tests.machine.guest_replies import ask
from tests.net.netns import inside, namespace, ns_exec

GUEST = paths().guest_elf
pytestmark = [needs_kvm, pytest.mark.skipif(not GUEST.exists(), reason="test guest not built (appliance kit build)")]


class Guest:
    def __init__(self, vm: Machine) -> None:
        self.vm = vm

    async def net(self, text: str, reply: str, timeout: float = 20) -> dict[str, str]:
        return await ask(self.vm, text, f"NET {reply}", timeout)


@asynccontextmanager
async def guest(*argv: str) -> AsyncIterator[Guest]:
    config = to_config(parse_args(["-kernel", str(GUEST), *argv]))
    config.serial = None
    async with Machine(config) as vm:
        await vm.console.expect(r"TESTGUEST-READY[^\n]*\n", timeout=30)
        yield Guest(vm)
        vm.console.send("poweroff\n")
        assert await asyncio.wait_for(vm.wait(), 20) == 0


def free_udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


async def test_user_net_dhcp_and_ping_are_captured_in_order(tmp_path: Path) -> None:
    from scapy.layers.dhcp import DHCP
    from scapy.layers.inet import ICMP
    from scapy.layers.l2 import ARP
    from scapy.utils import rdpcap

    pcap = tmp_path / "u.pcap"
    async with guest("-netdev", "user,id=u0", "-device", "virtio-net-pci,netdev=u0,mac=52:54:00:00:00:42",
                     "-object", f"filter-dump,id=f0,netdev=u0,file={pcap}") as g:
        info = await g.net("net info", "info")
        assert info["mac"] == "52:54:00:00:00:42" and info["link"] == "up"
        lease = await g.net("net dhcp", "dhcp")
        assert (lease["ip"], lease["router"]) == ("10.0.2.15", "10.0.2.2")
        done = await g.net("net ping 10.0.2.2 2", "ping done")
        assert done["received"] == "2"
    kinds: list[str] = []
    for p in rdpcap(str(pcap)):
        kind = "dhcp" if DHCP in p else "arp" if ARP in p else "icmp" if ICMP in p else None
        if kind and (not kinds or kinds[-1] != kind):
            kinds.append(kind)
    assert kinds == ["dhcp", "arp", "icmp"]


async def test_two_vms_on_a_udp_link_ping_each_other() -> None:
    pa, pb = free_udp_ports(2)
    link = ("dgram,id=l0,local.type=inet,local.host=127.0.0.1,local.port={},"
            "remote.type=inet,remote.host=127.0.0.1,remote.port={}")
    nic = "virtio-net-pci,netdev=l0"
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(guest("-netdev", link.format(pa, pb), "-device", nic))
        b = await stack.enter_async_context(
            guest("-netdev", link.format(pb, pa), "-device", nic + ",mac=52:54:00:12:34:99")
        )
        await a.net("net ip 10.9.0.1", "ip")
        await b.net("net ip 10.9.0.2", "ip")
        assert (await a.net("net ping 10.9.0.2 3", "ping done"))["received"] == "3"
        assert (await b.net("net ping 10.9.0.1 3", "ping done"))["received"] == "3"


@needs_root
async def test_guest_pings_host_and_host_gets_udp_echo_over_a_tap_in_a_namespace() -> None:
    with namespace() as ns:
        with inside(ns):
            # The tap is made (and later removed) in the namespace; the VM keeps its fd.
            cm = guest("-netdev", "tap,id=t0,ifname=vmtap0,script=no,downscript=no",
                       "-device", "virtio-net-pci,netdev=t0")
            g = await cm.__aenter__()
        try:
            ns_exec(ns, "ip", "addr", "add", "10.77.0.1/24", "dev", "vmtap0")
            await g.net("net ip 10.77.0.2", "ip")
            assert (await g.net("net ping 10.77.0.1 2", "ping done"))["received"] == "2"
            with inside(ns):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                sock.settimeout(10)
                sock.sendto(b"echo me", ("10.77.0.2", 7))  # the guest echoes UDP port 7
                data, peer = await asyncio.to_thread(sock.recvfrom, 2048)
            assert (data, peer) == (b"echo me", ("10.77.0.2", 7))
        finally:
            with inside(ns):
                await cm.__aexit__(None, None, None)
        assert "vmtap0" not in ns_exec(ns, "ip", "link")


async def test_nic_works_again_after_a_guest_reset() -> None:
    async with guest("-nic", "user") as g:
        assert (await g.net("net dhcp", "dhcp"))["ip"] == "10.0.2.15"
        g.vm.console.send("reset\n")
        await g.vm.console.expect(r"TESTGUEST-READY[^\n]*\n", timeout=30)
        assert (await g.net("net dhcp", "dhcp"))["ip"] == "10.0.2.15"
        assert (await g.net("net ping 10.0.2.2 1", "ping done"))["received"] == "1"


async def test_legacy_net_nic_and_net_user_pair_on_hub_0() -> None:
    """QEMU's ``-net nic -net user``: the NIC and the back end meet on hub 0, here a straight link."""
    async with guest("-net", "nic,model=virtio,macaddr=52:54:00:00:00:43", "-net", "user") as g:
        assert (await g.net("net info", "info"))["mac"] == "52:54:00:00:00:43"
        lease = await g.net("net dhcp", "dhcp")
        assert (lease["ip"], lease["router"]) == ("10.0.2.15", "10.0.2.2")
        assert (await g.net("net ping 10.0.2.2 1", "ping done"))["received"] == "1"


@needs_root
async def test_two_vms_on_one_bridge_ping_each_other() -> None:
    """``-netdev bridge,br=`` and ``-nic bridge``: each VM gets its own tap enslaved to the
    bridge; both taps are gone after the VMs end (closing a tap's last fd removes it)."""
    with namespace() as ns:
        ns_exec(ns, "ip", "link", "add", "labbr0", "type", "bridge")
        async with AsyncExitStack() as stack:
            with inside(ns):
                a = await stack.enter_async_context(
                    guest("-netdev", "bridge,id=b0,br=labbr0", "-device", "virtio-net-pci,netdev=b0"))
                b = await stack.enter_async_context(
                    guest("-nic", "bridge,br=labbr0,mac=52:54:00:12:34:77"))
            links = ns_exec(ns, "ip", "-o", "link", "show", "master", "labbr0")
            assert links.count("master labbr0") == 2
            await a.net("net ip 10.8.0.1", "ip")
            await b.net("net ip 10.8.0.2", "ip")
            assert (await a.net("net ping 10.8.0.2 2", "ping done"))["received"] == "2"
            assert (await b.net("net ping 10.8.0.1 2", "ping done"))["received"] == "2"
        assert ns_exec(ns, "ip", "-o", "link", "show", "master", "labbr0").strip() == ""


async def test_feature_properties_turn_features_off_and_the_nic_still_works() -> None:
    from appliance.nic import constants as C
    from appliance.virtio.device import VIRTIO_F_EVENT_IDX

    props = "csum=off,guest_csum=off,mrg_rxbuf=off,event_idx=off,rx_queue_size=1024,tx_queue_size=512"
    async with guest("-netdev", "user,id=u0", "-device", f"virtio-net-pci,netdev=u0,{props}") as g:
        lease = await g.net("net dhcp", "dhcp")
        assert lease["ip"] == "10.0.2.15"
        assert (await g.net("net ping 10.0.2.2 2", "ping done"))["received"] == "2"
        spec = next(d for d in g.vm.config.devices if type(d).__name__ == "NicSpec")
        dev = spec.device
        # Left alone, the test guest takes CSUM and HOST_TSO4 (and MAC, STATUS, VERSION_1).
        assert dev.driver_features >> C.F_MAC & 1 and dev.driver_features >> C.F_STATUS & 1
        for bit in (C.F_CSUM, C.F_GUEST_CSUM, C.F_MRG_RXBUF, VIRTIO_F_EVENT_IDX,
                    # offered only with the checksum offloads (virtio 1.2 §5.1.3.1)
                    C.F_HOST_TSO4, C.F_HOST_TSO6, C.F_GUEST_TSO4, C.F_GUEST_TSO6):
            assert not dev.driver_features >> bit & 1, bit
        assert dev.max_queue_size(0) == 1024 and dev.max_queue_size(1) == 512


async def test_two_nics_and_a_user_network_share_hub_0(tmp_path: Path) -> None:
    """``-net nic -net nic -net user``: QEMU's hub gives both NICs the user network. Each gets
    its own lease (they differ by MAC) and pings the gateway; a hub port carries no virtio-net
    header, so neither NIC is offered checksum offload. A filter-dump on the user network
    records both NICs' exchanges."""
    from scapy.layers.dhcp import DHCP
    from scapy.layers.l2 import Ether
    from scapy.utils import rdpcap

    pcap = tmp_path / "hub.pcap"
    async with guest("-net", "nic,model=virtio", "-net", "nic,model=virtio,macaddr=52:54:00:00:00:44",
                     "-net", "user,id=u", "-object", f"filter-dump,id=f,netdev=u,file={pcap}") as g:
        for which, ip, mac in ((0, "10.0.2.15", "52:54:00:12:34:56"), (1, "10.0.2.16", "52:54:00:00:00:44")):
            await g.net(f"net use {which}", "use")
            info = await g.net("net info", "info")
            assert info["mac"] == mac and info["link"] == "up"
            assert int(info["features"], 16) & 1 == 0  # VIRTIO_NET_F_CSUM
            assert (await g.net("net dhcp", "dhcp"))["ip"] == ip
            assert (await g.net("net ping 10.0.2.2 2", "ping done"))["received"] == "2"
    requests = {p[Ether].src for p in rdpcap(str(pcap)) if DHCP in p and p[DHCP].options[0][1] == 3}
    assert requests == {"52:54:00:12:34:56", "52:54:00:00:00:44"}


async def test_a_hubport_repeats_the_guests_frames_to_every_back_end() -> None:
    """``-netdev hubport``: hub 1 joins the NIC, a user network and a UDP link to this test. The
    test sees the guest's DHCP exchange go by, and a host it plays on the UDP side pings the
    guest through the hub."""
    from scapy.layers.dhcp import DHCP
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import ARP, Ether

    mine, theirs = free_udp_ports(2)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", mine))
    sock.settimeout(10)
    dgram = (f"dgram,id=d,local.type=inet,local.host=127.0.0.1,local.port={theirs},"
             f"remote.type=inet,remote.host=127.0.0.1,remote.port={mine}")
    guest_mac = "52:54:00:00:00:45"
    try:
        async with guest("-netdev", "hubport,id=p0,hubid=1", "-device", f"virtio-net-pci,netdev=p0,mac={guest_mac}",
                         "-netdev", "user,id=u", "-netdev", "hubport,id=p1,hubid=1,netdev=u",
                         "-netdev", dgram, "-netdev", "hubport,id=p2,hubid=1,netdev=d") as g:
            assert (await g.net("net dhcp", "dhcp"))["ip"] == "10.0.2.15"
            seen = []
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    seen.append(Ether(sock.recv(2048)))
            dhcp = [(p[Ether].src, p[DHCP].options[0][1]) for p in seen if DHCP in p]
            # DISCOVER and REQUEST from the guest, OFFER and ACK from the user network.
            assert [t for _, t in dhcp] == [1, 2, 3, 5]
            assert {src for src, _ in dhcp} == {guest_mac, "52:55:0a:00:02:02"}
            sock.setblocking(True)

            host_mac = "02:00:00:00:00:99"
            loop = asyncio.get_running_loop()
            sock.sendto(bytes(Ether(src=host_mac, dst="ff:ff:ff:ff:ff:ff") /
                              ARP(op=1, hwsrc=host_mac, psrc="10.0.2.99", pdst="10.0.2.15")), ("127.0.0.1", theirs))
            sock.sendto(bytes(Ether(src=host_mac, dst=guest_mac) / IP(src="10.0.2.99", dst="10.0.2.15") /
                              ICMP(id=7, seq=1) / b"hub"), ("127.0.0.1", theirs))
            replies: list[Ether] = []
            while not any(ICMP in p and p[ICMP].type == 0 for p in replies):
                replies.append(Ether(await loop.run_in_executor(None, sock.recv, 2048)))
            arp = next(p for p in replies if ARP in p and p[ARP].op == 2)
            echo = next(p for p in replies if ICMP in p and p[ICMP].type == 0)
            assert (arp.src, arp[ARP].psrc, arp.dst) == (guest_mac, "10.0.2.15", host_mac)
            assert (echo[IP].dst, echo[ICMP].id, bytes(echo[ICMP].payload)) == ("10.0.2.99", 7, b"hub")
    finally:
        sock.close()


async def test_a_nic_without_a_netdev_runs_with_nothing_on_its_cable() -> None:
    """QEMU warns "nic virtio-net-pci.0 has no peer" and runs: the guest sees a NIC whose
    frames go nowhere."""
    async with guest("-device", "virtio-net-pci") as g:
        info = await g.net("net info", "info")
        assert info["mac"] == "52:54:00:12:34:56" and info["link"] == "up"
        await g.net("net ip 10.9.0.1", "ip")
        g.vm.console.send("net ping 10.9.0.2 1\n")
        await g.vm.console.expect(r"ERR net ping: no ARP reply from 10\.9\.0\.2", timeout=20)
        assert (await g.net("net info", "info"))["tx_frames"] != "0"
