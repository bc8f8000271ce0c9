"""Guest echo requests forwarded through the host's unprivileged ping sockets.

``net.ipv4.ping_group_range`` is per network namespace. The host's own range
here forbids these sockets (tests/nat/test_services.py covers that case), so
the forwarding path runs in a namespace this test makes, with the range
opened and 192.0.2.1 and 2001:db8::1 on its loopback as the host to reach. The
stack runs in a child process inside it, driven with scapy-built frames.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 to make a network namespace"
)

# Runs inside the namespace: feeds echo requests, prints what came back as JSON.
DRIVER = r"""
import asyncio, json, sys
from scapy.layers.inet import ICMP, IP, fragment
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from appliance.nat import UserNetConfig, UserNetwork
from tests.nat.conftest import GUEST_MAC, GW_MAC, drain, feed

def guest(pkt):
    return bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / pkt)

async def main():
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    for ident, dst in ((0x1111, "192.0.2.1"), (0x2222, "192.0.2.1"), (0x3333, "127.0.0.1")):
        feed(net, guest(IP(src="10.0.2.15", dst=dst) / ICMP(type=8, id=ident, seq=5) / b"probe"))
    big = IP(src="10.0.2.15", dst="192.0.2.1", id=4242) / ICMP(type=8, id=0x4444, seq=1) / (b"z" * 3000)
    for frag in fragment(big, 1480):
        feed(net, guest(frag))
    feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC)
                    / IPv6(src="fec0::15", dst="fec0::2") / ICMPv6EchoRequest(id=0x5555, seq=2, data=b"six")))
    feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC)
                    / IPv6(src="fec0::15", dst="2001:db8::1") / ICMPv6EchoRequest(id=0x6666, seq=3, data=b"far6")))
    replies, frames = [], []
    for _ in range(400):
        frames += [Ether(f) for f in drain(net)]
        await asyncio.sleep(0.005)
        if len([f for f in frames if ICMP in f or ICMPv6EchoReply in f]) >= 7:
            break
    pieces = [f for f in frames if IP in f and f[IP].proto == 1 and (f[IP].flags.MF or f[IP].frag)]
    for f in frames:
        if IP in f and ICMP in f and not f[IP].frag and not f[IP].flags.MF:
            replies.append({"v": 4, "src": f[IP].src, "dst": f[IP].dst, "type": f[ICMP].type, "id": f[ICMP].id,
                            "seq": f[ICMP].seq, "data": bytes(f[ICMP].payload).decode()})
        elif ICMPv6EchoReply in f:
            replies.append({"v": 6, "src": f[IPv6].src, "id": f[ICMPv6EchoReply].id,
                            "seq": f[ICMPv6EchoReply].seq, "data": bytes(f[ICMPv6EchoReply].data).decode()})
    whole = b""
    if pieces:
        from scapy.layers.inet import defragment
        [whole_pkt] = [p for p in defragment([p[IP] for p in pieces]) if ICMP in p]
        whole = bytes(whole_pkt[ICMP].payload)
        big_reply = {"id": whole_pkt[ICMP].id, "type": whole_pkt[ICMP].type, "len": len(whole),
                     "max_frame": max(len(p) for p in pieces)}
    else:
        big_reply = None
    counters = net.counters()
    await net.stop()
    print(json.dumps({"replies": replies, "big": big_reply, "big_ok": whole == b"z" * 3000,
                      "forwarded": counters["icmp_echo_forwarded"], "unpermitted": counters["icmp_unpermitted"]}))

asyncio.run(main())
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def ping_ns() -> Iterator[str]:
    name = f"appl-ping-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", "192.0.2.1/32", "dev", "lo")
        _ip("-n", name, "addr", "add", "2001:db8::1/128", "dev", "lo")
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"],
            check=True, capture_output=True,
        )  # fmt: skip
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def test_echo_requests_go_out_through_ping_sockets_and_come_back_with_the_guests_identifier(ping_ns: str) -> None:
    proc = subprocess.run(
        ["ip", "netns", "exec", ping_ns, sys.executable, "-c", DRIVER],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["unpermitted"] == 0
    v4 = sorted((r["id"], r["src"], r["dst"], r["type"], r["seq"], r["data"]) for r in out["replies"] if r["v"] == 4)
    # The kernel's ping socket rewrites the identifier to its own; the guest gets its own back,
    # and two guest identifiers to one host are two flows, neither answered with the other's.
    assert v4 == [
        (0x1111, "192.0.2.1", "10.0.2.15", 0, 5, "probe"),
        (0x2222, "192.0.2.1", "10.0.2.15", 0, 5, "probe"),
        (0x3333, "127.0.0.1", "10.0.2.15", 0, 5, "probe"),
    ]
    # A 3000-byte echo, reassembled from the guest's fragments, comes back fragmented to the MTU.
    assert out["big"] == {"id": 0x4444, "type": 0, "len": 3000, "max_frame": 1514}
    assert out["big_ok"]
    v6 = sorted((r["id"], r["src"], r["seq"], r["data"]) for r in out["replies"] if r["v"] == 6)
    assert v6 == [(0x5555, "fec0::2", 2, "six"), (0x6666, "2001:db8::1", 3, "far6")]
    assert out["forwarded"] == 5  # the echo to the gateway (fec0::2) is answered by the stack
