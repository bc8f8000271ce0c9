"""Real Linux virtio_net drivers (QEMU TCG) on our virtio-net through vhost-user.

Our net-daemon runs in the test's own loop, its tap inside a namespace the test
made; QEMU connects to the daemon's socket and has no network of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.kit.tcg import TcgGuest
from appliance.net.netdev import NetdevConfig, TapNetdev, open_netdev
from appliance.nic import constants as C
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.vhost_user.backend import VhostUserBackend
from appliance.virtio.vhost_user.server import VhostUserServer
from tests.conftest import needs_qemu, needs_root
from tests.net.netns import inside, namespace, ns_exec

pytestmark = [needs_root, needs_qemu]


@contextlib.asynccontextmanager
async def daemon(
    ns: str, sock: Path, ifname: str, queues: int = 1, netdev: NetdevConfig | None = None,
    servers: list[VhostUserServer] | None = None,
) -> AsyncIterator[VirtioNet]:
    """Our net-daemon, in this process: a vhost-user-net export of a tap made inside ``ns``
    (its server appended to ``servers``, for a test that looks at the rings)."""
    cfg = netdev or TapNetdev("n0", ifname=ifname, queues=queues)
    with inside(ns):
        backends, tap = await open_netdev(cfg, queues=queues)
    dev = VirtioNet(backends, bytes.fromhex("525400123456"), control_queue=False)
    server = VhostUserServer(sock, VhostUserBackend(dev))
    await server.start()
    if servers is not None:
        servers.append(server)
    try:
        yield dev
    finally:
        await server.close()
        with inside(ns):
            await tap.close()


def nic_args(sock: Path, mac: str, queues: int = 1) -> list[str]:
    # vectors=0: QEMU 7.2 (Debian 12) under TCG segfaults in its MSI-X vector
    # notifier path (msix_set_vector_notifiers → virtio_pci_vector_unmask) when a
    # vhost-user NIC starts; with INTx the same guest and back end run fine.
    mq = ",mq=on" if queues > 1 else ""
    return [
        "-chardev", f"socket,id=c0,path={sock}",
        "-netdev", f"vhost-user,id=n0,chardev=c0,queues={queues}",
        "-device", f"virtio-net-pci,netdev=n0,mac={mac},vectors=0{mq}",
    ]


async def test_linux_guest_pings_the_namespace_host(tmp_path: Path) -> None:
    sock = tmp_path / "net.sock"
    with namespace() as ns:
        async with daemon(ns, sock, "vhnet0") as dev:
            ns_exec(ns, "ip", "addr", "add", "10.91.0.1/24", "dev", "vhnet0")
            async with TcgGuest(nic_args(sock, "52:54:00:12:34:56"), machine="q35") as g:
                await g.run("ip link set eth0 up && ip addr add 10.91.0.2/24 dev eth0")
                out = await g.run("ping -c 3 -i 0.2 -W 2 10.91.0.1", timeout=30)
                assert "3 packets received" in out
                await g.poweroff()
            assert dev.stats[0].tx_frames >= 3 and dev.stats[0].rx_frames >= 3


async def test_two_queue_pairs_both_carry_traffic(tmp_path: Path) -> None:
    sock = tmp_path / "mq.sock"
    with namespace() as ns:
        async with daemon(ns, sock, "vhmq0", queues=2) as dev:
            ns_exec(ns, "ip", "addr", "add", "10.92.0.1/24", "dev", "vhmq0")
            async with TcgGuest(nic_args(sock, "52:54:00:12:34:57", queues=2), machine="q35", smp=2) as g:
                await g.run("ip link set eth0 up && ip addr add 10.92.0.2/24 dev eth0")
                assert (await g.run("ls /sys/class/net/eth0/queues")).split() == ["rx-0", "rx-1", "tx-0", "tx-1"]
                # One sender pinned to each CPU: XPS maps CPU n to tx queue n.
                await g.run(
                    "taskset 1 ping -c 20 -i 0.05 -W 2 10.92.0.1 >/tmp/p0 & "
                    "taskset 2 ping -c 20 -i 0.05 -W 2 10.92.0.1 >/tmp/p1 & wait; cat /tmp/p0 /tmp/p1",
                    timeout=60,
                )
                await g.poweroff()
            assert dev.stats[0].tx_frames > 0 and dev.stats[1].tx_frames > 0, dev.stats
            assert dev.stats[0].rx_frames + dev.stats[1].rx_frames >= 40


async def test_guest_ethtool_channels_moves_all_traffic_to_the_remaining_pair(tmp_path: Path) -> None:
    """``ethtool -L eth0 combined 1`` in the guest: QEMU's control queue turns it into
    SET_VRING_ENABLE 0 for pair 1; frames the tap would have steered to that pair's queue
    must reach the guest through pair 0 instead of being stranded (virtio 1.2 §5.1.6.5.5). Pair
    1's transmit ring, switched off while it ran, is from then on emptied unread (vhost-user.rst
    "Ring states")."""
    sock = tmp_path / "ch.sock"
    servers: list[VhostUserServer] = []
    with namespace() as ns:
        async with daemon(ns, sock, "vhch0", queues=2, servers=servers) as dev:
            ns_exec(ns, "ip", "addr", "add", "10.94.0.1/24", "dev", "vhch0")
            async with TcgGuest(nic_args(sock, "52:54:00:12:34:5a", queues=2), machine="q35", smp=2) as g:
                await g.run("ip link set eth0 up && ip addr add 10.94.0.2/24 dev eth0")
                assert re.findall(r"Combined:\s+(\d+)", await g.run("ethtool -l eth0")) == ["2", "2"]
                await g.run("ethtool -L eth0 combined 1")
                assert re.findall(r"Combined:\s+(\d+)", await g.run("ethtool -l eth0")) == ["2", "1"]
                # Pair 1 is counted from when the device serves pair 0 alone (QEMU's SET_VRING_ENABLE
                # 0 has been handled), not after a fixed 0.5 s that a loaded machine could outlast.
                deadline = asyncio.get_running_loop().time() + 10
                while not (dev._active_pairs == 1 and len(dev._queues) == 2):
                    assert asyncio.get_running_loop().time() < deadline, "pair 1 was never disabled"
                    await asyncio.sleep(0.01)
                rings = servers[0].backend.rings
                assert [(r.started, r.enabled, r.switched_off) for r in rings[2:4]] == [(True, False, True)] * 2
                assert 3 in servers[0].backend._discarding  # the transmit ring; the receive ring waits
                pair1 = (dev.stats[1].tx_frames, dev.stats[1].rx_frames)
                rx0 = dev.stats[0].rx_frames
                # Eight flows (one ICMP id each) from both CPUs: the tap hashes them over
                # every attached queue, so a stranded queue would lose some replies.
                out = await g.run(
                    "for i in 1 2 3 4 5 6 7 8; do taskset $(( (i % 2) + 1 )) "
                    "ping -c 5 -i 0.2 -W 10 10.94.0.1 >/tmp/p$i & done; wait; cat /tmp/p*",
                    timeout=90,
                )
                await g.poweroff()
            assert out.count("5 packets received") == 8, out
            assert (dev.stats[1].tx_frames, dev.stats[1].rx_frames) == pair1, dev.stats
            assert dev.stats[0].rx_frames - rx0 >= 40


async def test_two_guests_on_one_bridge_move_100_mb_intact(tmp_path: Path) -> None:
    """Two Linux guests, each on its own net-daemon tap, both taps in one bridge."""
    with namespace() as ns:
        ns_exec(ns, "ip", "link", "add", "labbr", "type", "bridge")
        ns_exec(ns, "ip", "link", "set", "labbr", "up")
        async with daemon(ns, tmp_path / "a.sock", "vha0") as dev_a, daemon(ns, tmp_path / "b.sock", "vhb0") as dev_b:
            for tap in ("vha0", "vhb0"):
                ns_exec(ns, "ip", "link", "set", tap, "master", "labbr")
            a_args = nic_args(tmp_path / "a.sock", "52:54:00:00:0a:01")
            b_args = nic_args(tmp_path / "b.sock", "52:54:00:00:0b:01")
            async with TcgGuest(a_args, machine="q35") as a, TcgGuest(b_args, machine="q35") as b:
                await a.run("ip link set eth0 up && ip addr add 10.93.0.1/24 dev eth0")
                await b.run("ip link set eth0 up && ip addr add 10.93.0.2/24 dev eth0")
                assert "0% packet loss" in await b.run("ping -c 2 -i 0.2 -W 3 10.93.0.1", timeout=30)
                await b.run("dd if=/dev/urandom of=/tmp/blob bs=1M count=100 2>/dev/null", timeout=120)
                sent = (await b.run("sha256sum /tmp/blob", timeout=120)).split()[0]
                await a.write("nc -l -p 5001 > /tmp/got; echo RECEIVED-DONE\n")
                # a's nc may not listen yet: b's connect is then refused (nothing reaches a's
                # one-shot nc) and b tries again.
                await b.run("until nc 10.93.0.1 5001 < /tmp/blob; do sleep 0.2; done", timeout=240)
                await a.expect("RECEIVED-DONE", 240)
                got = (await a.run("sha256sum /tmp/got", timeout=120)).split()[0]
                assert got == sent
                await a.poweroff()
                await b.poweroff()
            assert dev_b.stats[0].tx_bytes >= 100 * 1024 * 1024
            assert dev_a.stats[0].rx_bytes >= 100 * 1024 * 1024


SINK = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5002)); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

OFFLOADS_OFF = ",csum=off,guest_csum=off,host_tso4=off,host_tso6=off,guest_tso4=off,guest_tso6=off,mrg_rxbuf=off"


@pytest.mark.parametrize(
    ("vnet_hdr", "props"),
    [(True, ""), (True, OFFLOADS_OFF), (False, "")],
    ids=["offloads-on", "offloads-off", "tap-without-vnet-hdr"],
)
async def test_guest_sends_20_mb_to_the_host_intact(tmp_path: Path, vnet_hdr: bool, props: str) -> None:
    sock = tmp_path / "tx.sock"
    with namespace() as ns:
        cfg = TapNetdev("n0", ifname="vhtx0", vnet_hdr=vnet_hdr)
        async with daemon(ns, sock, "vhtx0", netdev=cfg) as dev:
            ns_exec(ns, "ip", "addr", "add", "10.94.0.1/24", "dev", "vhtx0")
            sink = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", SINK, "10.94.0.1"],
                stdout=subprocess.PIPE, text=True,
            )
            try:
                assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
                args = nic_args(sock, "52:54:00:12:34:58")
                args[-1] += props
                async with TcgGuest(args, machine="q35") as g:
                    await g.run("ip link set eth0 up && ip addr add 10.94.0.2/24 dev eth0")
                    await g.run("dd if=/dev/urandom of=/tmp/blob bs=1M count=20 2>/dev/null", timeout=60)
                    want = (await g.run("sha256sum /tmp/blob", timeout=60)).split()[0]
                    await g.run("nc 10.94.0.1 5002 < /tmp/blob", timeout=120)
                    n, got = (await asyncio.to_thread(sink.stdout.readline)).split()
                    assert (int(n), got) == (20 << 20, want)
                    # Offloads reach the guest only when the tap carries vnet headers.
                    assert dev.has_feature(C.F_HOST_TSO4) == (vnet_hdr and not props)
                    await g.poweroff()
            finally:
                sink.kill()
                sink.wait()
