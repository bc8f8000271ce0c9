"""filter-dump on our net-daemon: a Linux guest's ARP, ping and TCP upload land in the pcap in order.

IPv6 is off in the namespace and in the guest so the wire carries only the
exchange the test makes.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import ARP
from scapy.utils import rdpcap

from appliance.cli.net_daemon import parse_all, serve
from appliance.kit.tcg import TcgGuest
from tests.conftest import needs_qemu, needs_root
from tests.linux.test_vhost_user_net import SINK, nic_args
from tests.net.netns import inside, namespace, ns_exec

pytestmark = [needs_root, needs_qemu]

GUEST, HOST = "10.96.0.2", "10.96.0.1"


async def test_pcap_holds_arp_ping_and_tcp_in_order(tmp_path: Path) -> None:
    sock = tmp_path / "cap.sock"
    pcap = tmp_path / "guest.pcap"
    with namespace() as ns:
        ns_exec(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        netdevs, exports, dumps = parse_all([
            "--netdev", "tap,id=t0,ifname=cap0,script=no,downscript=no",
            "--export", f"type=vhost-user-net,id=e0,netdev=t0,addr.type=unix,addr.path={sock}",
            "--object", f"filter-dump,id=f0,netdev=t0,file={pcap}",
        ])
        stop = asyncio.Event()
        with inside(ns):
            daemon = asyncio.create_task(serve(netdevs, exports, stop, dumps))
            for _ in range(100):
                if sock.exists():
                    break
                await asyncio.sleep(0.05)
        ns_exec(ns, "ip", "addr", "add", f"{HOST}/24", "dev", "cap0")
        sink = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SINK.replace("5002", "5005"), HOST],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
            async with TcgGuest(nic_args(sock, "52:54:00:12:34:60"), machine="q35") as g:
                await g.run("echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
                            "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; "
                            "echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6")
                await g.run(f"ip addr add {GUEST}/24 dev eth0 && ip link set eth0 up")
                assert "2 packets received" in await g.run(f"ping -c 2 -i 0.2 -W 3 {HOST}", timeout=30)
                await g.run(f"head -c 102400 /dev/zero | nc {HOST} 5005", timeout=60)
                n, _digest = (await asyncio.to_thread(sink.stdout.readline)).split()
                assert int(n) == 102400
                await g.poweroff()
        finally:
            sink.kill()
            sink.wait()
            stop.set()
            await daemon
    pkts = rdpcap(str(pcap))
    assert ARP in pkts[0] and pkts[0][ARP].op == 1 and pkts[0][ARP].psrc == GUEST
    assert ARP in pkts[1] and pkts[1][ARP].op == 2 and pkts[1][ARP].psrc == HOST
    icmp = pkts[2:6]
    assert [(p[IP].src, p[ICMP].type) for p in icmp] == [(GUEST, 8), (HOST, 0), (GUEST, 8), (HOST, 0)]
    tcp = pkts[6:]
    assert all(TCP in p for p in tcp), [p.summary() for p in tcp if TCP not in p]
    assert tcp[0][TCP].flags == "S" and tcp[0][IP].src == GUEST
    assert tcp[1][TCP].flags == "SA" and tcp[1][IP].src == HOST
    uploaded = sum(len(p[TCP].payload) for p in tcp if p[IP].src == GUEST)
    assert uploaded == 102400
    assert any(p[TCP].flags.F for p in tcp if p[IP].src == GUEST)
    if shutil.which("tshark"):
        out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.protocols"],
                             capture_output=True, text=True, check=True).stdout.split()
        assert out[:2] == ["eth:ethertype:arp"] * 2
        assert all(p.startswith("eth:ethertype:ip:icmp") for p in out[2:6])
        assert all(p.startswith("eth:ethertype:ip:tcp") for p in out[6:]) and len(out) == len(pkts)
    else:
        pytest.fail("tshark is installed by scripts/setup.sh")
