"""The test guest's virtio-net driver against QEMU's own virtio-net-pci (with
KVM): DHCP and ping through QEMU's isolated user network, two guests linked by
a loopback UDP (`-netdev dgram`) wire exchanging frames, TSO frames to a tap."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import subprocess
import uuid

import pytest

from appliance.kit import build
from appliance.kit.console import GuestConsole
from appliance.kit.errors import TcgError
from tests.conftest import needs_kvm, needs_qemu, needs_root

pytestmark = [needs_kvm, needs_qemu, pytest.mark.kvm, pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module")
def guest_elf():
    return build(linux=False).guest_elf


def qemu(elf, netdev: str, mac: str, machine: str = "microvm,pcie=on") -> list[str]:
    """microvm,pcie=on boots in a fraction of a second (no firmware); q35 (SeaBIOS,
    ~4 s) is kept for the case that goes through 0xCF8 like our VMM."""
    return ["qemu-system-x86_64", "-enable-kvm", "-M", machine, "-nographic", "-nodefaults",
            "-serial", "stdio", "-kernel", str(elf), "-smp", "1", "-m", "128", "-no-reboot",
            "-netdev", f"{netdev},id=n0", "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]


def ip_checksum(b: bytes) -> int:
    s = sum(int.from_bytes(b[i : i + 2], "big") for i in range(0, len(b), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp_frame(dst_mac: str, src_mac: str, src_ip: bytes, dst_ip: bytes, sport: int, payload: bytes) -> bytes:
    udp = struct.pack(">HHHH", sport, 7, 8 + len(payload), 0) + payload
    ip = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src_ip, dst_ip))
    struct.pack_into(">H", ip, 10, ip_checksum(bytes(ip)))
    return bytes.fromhex(dst_mac.replace(":", "") + src_mac.replace(":", "")) + b"\x08\x00" + bytes(ip) + udp


def free_udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def test_dhcp_lease_and_ping_through_qemu_user_network(guest_elf) -> None:
    async with GuestConsole(qemu(guest_elf, "user,restrict=on", "52:54:00:12:34:99", "q35")) as g:
        await g.ready(timeout=40)
        await g.command("net info", "NET info mac=52:54:00:12:34:99 mtu=1500 link=up")
        await g.command("net dhcp", re.compile(r"NET dhcp ip=10\.0\.2\.15 mask=255\.255\.255\.0 .*server=10\.0\.2\.2"))
        await g.command("net ping 10.0.2.2 2", "NET ping done sent=2 received=2\n")
        await g.write("poweroff\n")
        assert await g.wait(10) == 0


async def test_two_guests_on_a_udp_wire_echo_and_exchange_frames(guest_elf) -> None:
    pa, pb = free_udp_ports(2)
    def wire(local: int, remote: int) -> str:
        return (f"dgram,local.type=inet,local.host=127.0.0.1,local.port={local},"
                f"remote.type=inet,remote.host=127.0.0.1,remote.port={remote}")

    wire_a, wire_b = wire(pa, pb), wire(pb, pa)
    async with GuestConsole(qemu(guest_elf, wire_a, "52:54:00:00:00:0a")) as a, \
            GuestConsole(qemu(guest_elf, wire_b, "52:54:00:00:00:0b")) as b:
        await asyncio.gather(a.ready(timeout=40), b.ready(timeout=40))
        await a.command("net ip 10.9.0.1", "NET ip 10.9.0.1 ok\n")
        await b.command("net ip 10.9.0.2", "NET ip 10.9.0.2 ok\n")
        # b pings a: ARP and ICMP echo are answered by a's responder.
        await b.command("net ping 10.9.0.1 3", "NET ping done sent=3 received=3\n")
        # A raw frame from a reaches b unchanged (ethertype 0x88b5, not for the responder).
        frame = "52540000000b" "52540000000a" "88b5" + "00112233445566778899aabbccddeeff" * 3
        await a.command(f"net send {frame}", f"NET sent len={len(frame) // 2}\n")
        m = await b.command("net recv 2000 0x88b5", re.compile(r"NET frame len=(\d+) ([0-9a-f]+)\n"))
        assert m.group(2) == frame
        # UDP to b's port 7 comes back with the ports swapped and the payload intact.
        udp = udp_frame("52:54:00:00:00:0b", "52:54:00:00:00:0a", bytes([10, 9, 0, 1]),
                        bytes([10, 9, 0, 2]), 40000, b"echo me, please")
        await a.command(f"net send {udp.hex()}", "NET sent")
        m = await a.command("net recv 2000 0x0800", re.compile(r"NET frame len=(\d+) ([0-9a-f]+)\n"))
        back = bytes.fromhex(m.group(2))
        assert back[:6] == udp[6:12] and back[23] == 17
        assert struct.unpack(">HH", back[34:38]) == (7, 40000) and back[42:57] == b"echo me, please"
        # A UDP socket backend carries no virtio-net header: no TSO offered.
        with pytest.raises(TcgError, match="does not offer CSUM and HOST_TSO4"):
            await a.net_bench("tso", 1)
        # a blasts at b's MAC while b counts.
        rx_task = asyncio.create_task(b.net_bench("rx", 4))
        await asyncio.sleep(0.2)
        tx = await a.net_bench("tx", 1, size=256, mac="52:54:00:00:00:0b")
        rx = await rx_task
        assert int(tx["frames"]) > 0 and 0 < int(rx["frames"]) <= int(tx["frames"])
        for g in (a, b):
            await g.write("poweroff\n")
            assert await g.wait(10) == 0


@needs_root
async def test_tso_frames_reach_a_tap_whole(guest_elf) -> None:
    """With a tap (vnet headers) QEMU offers CSUM + HOST_TSO4: 64 KiB frames arrive on the tap."""
    ns = f"tg{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "tap0", "mode", "tap"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "tap0", "up"], check=True)
        argv = ["ip", "netns", "exec", ns] + qemu(
            guest_elf, "tap,ifname=tap0,script=no,downscript=no,vhost=off", "52:54:00:00:00:0c")
        async with GuestConsole(argv) as g:
            await g.ready(timeout=40)
            frames = int((await g.net_bench("tso", 1))["frames"])
            await g.write("poweroff\n")
            assert await g.wait(10) == 0
        stats = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "tap0"], check=True,
                               capture_output=True, text=True).stdout
        rx = json.loads(stats)[0]["stats64"]["rx"]
        assert frames > 0 and rx["bytes"] >= frames * 65000
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
