"""A test guest on `appliance run` and one on QEMU (its own virtio-net-pci) share a wire.

Over a UDP link (``-netdev dgram``) and over a TCP stream (``-netdev stream``,
our side listening, QEMU connecting; frames length-prefixed as QEMU does) the
two guests ping each other. QEMU runs ``-M microvm,pcie=on`` with KVM: no
firmware, so it boots in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import pytest

from appliance.kit import paths
from appliance.kit.console import GuestConsole
from tests.conftest import needs_kvm, needs_qemu
from tests.machine_devices.test_testguest_net import free_udp_ports, guest

GUEST = paths().guest_elf
pytestmark = [needs_kvm, needs_qemu,
              pytest.mark.skipif(not GUEST.exists(), reason="test guest not built (appliance kit build)")]


def qemu(netdev: str) -> list[str]:
    return ["qemu-system-x86_64", "-enable-kvm", "-M", "microvm,pcie=on", "-nographic", "-nodefaults",
            "-serial", "stdio", "-kernel", str(GUEST), "-smp", "1", "-m", "128", "-no-reboot",
            "-netdev", f"{netdev},id=n0", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:0b"]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def ping_both_ways(ours_argv: list[str], theirs_argv: list[str]) -> None:
    """Start ours (it may be the listening side), then QEMU; each pings the other."""
    async with guest(*ours_argv) as g, GuestConsole(theirs_argv) as q:
        await q.ready(timeout=40)
        await g.net("net ip 10.9.0.1", "ip")
        await q.command("net ip 10.9.0.2", "NET ip 10.9.0.2 ok\n")
        await q.command("net ping 10.9.0.1 3", re.compile(r"NET ping done sent=3 received=3\n"), timeout=30)
        assert (await g.net("net ping 10.9.0.2 3", "ping done", timeout=30))["received"] == "3"
        await q.write("poweroff\n")
        assert await q.wait(10) == 0


async def test_udp_link_between_appliance_and_qemu() -> None:
    pa, pb = free_udp_ports(2)

    def wire(local: int, remote: int) -> str:
        return (f"dgram,local.type=inet,local.host=127.0.0.1,local.port={local},"
                f"remote.type=inet,remote.host=127.0.0.1,remote.port={remote}")

    await ping_both_ways(["-netdev", wire(pa, pb).replace("dgram,", "dgram,id=l0,"), "-device",
                          "virtio-net-pci,netdev=l0"], qemu(wire(pb, pa)))


async def test_stream_link_appliance_listens_qemu_connects() -> None:
    port = free_tcp_port()
    ours = ["-netdev", f"stream,id=s0,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
            "-device", "virtio-net-pci,netdev=s0"]
    theirs = qemu(f"stream,server=off,addr.type=inet,addr.host=127.0.0.1,addr.port={port}")
    await asyncio.wait_for(ping_both_ways(ours, theirs), 90)


async def test_unix_datagram_link_between_appliance_and_qemu(tmp_path: Path) -> None:
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"

    def wire(local: object, remote: object) -> str:
        return f"dgram,local.type=unix,local.path={local},remote.type=unix,remote.path={remote}"

    ours = ["-netdev", wire(a, b).replace("dgram,", "dgram,id=l0,"), "-device", "virtio-net-pci,netdev=l0"]
    await asyncio.wait_for(ping_both_ways(ours, qemu(wire(b, a))), 90)


async def test_multicast_segment_shared_by_appliance_and_qemu_inside_a_namespace() -> None:
    from tests.net.netns import inside, namespace, ns_exec

    port = free_udp_ports(1)[0]
    wire = (f"dgram,remote.type=inet,remote.host=239.255.77.3,remote.port={port},"
            "local.type=inet,local.host=127.0.0.1,local.port=0")
    with namespace() as ns:
        ns_exec(ns, "ip", "link", "set", "lo", "up")
        ns_exec(ns, "ip", "link", "set", "lo", "multicast", "on")
        # This thread's sockets, and the QEMU it starts, live in the namespace.
        with inside(ns):
            ours = ["-netdev", wire.replace("dgram,", "dgram,id=m0,"), "-device", "virtio-net-pci,netdev=m0"]
            await asyncio.wait_for(ping_both_ways(ours, qemu(wire)), 90)
