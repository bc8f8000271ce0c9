"""The user-mode stack where it needs a network namespace of its own.

- Guest echo requests forwarded through the host's unprivileged ping sockets:
  ``net.ipv4.ping_group_range`` is per namespace, and the host's own range here
  forbids them (tests/nat/test_services.py covers that case).
- Host routing errors (no route; an on-link address nobody answers) told to the
  guest as ICMP unreachable.
- UDP flows to port 53, which needs a loopback port 53 nobody else holds.

The namespace has 192.0.2.1 and 2001:db8::1 on its loopback as hosts to reach;
the stack runs in a child process inside it, driven with scapy-built frames.
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
    for _ in range(2000):  # until the five replies and the big one's three pieces are in (~10 s at most)
        frames += [Ether(f) for f in drain(net)]
        done = [f for f in frames if (ICMP in f and not f[IP].flags.MF and not f[IP].frag) or ICMPv6EchoReply in f]
        if len(done) >= 5 and len([f for f in frames if IP in f and (f[IP].flags.MF or f[IP].frag)]) >= 3:
            break
        await asyncio.sleep(0.005)
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
    icmp_rows = [ln for ln in net.info().splitlines() if ln.startswith("  ICMP[")]
    await net.stop()
    print(json.dumps({"replies": replies, "big": big_reply, "big_ok": whole == b"z" * 3000,
                      "forwarded": counters["icmp_echo_forwarded"], "unpermitted": counters["icmp_unpermitted"],
                      "icmp_rows": icmp_rows}))

asyncio.run(main())
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _run(ns: str, driver: str) -> dict:
    """Run a driver script inside the namespace; what it printed last, as JSON."""
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", driver],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def ping_ns() -> Iterator[str]:
    name = f"appl-ping-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", "192.0.2.1/32", "dev", "lo")
        _ip("-n", name, "addr", "add", "2001:db8::1/128", "dev", "lo")
        # An on-link network where nothing answers ARP: 203.0.113.99 is unreachable after one
        # 100 ms probe (the host's "no route to host" case, as against "no route" at all).
        _ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _ip("-n", name, "addr", "add", "203.0.113.254/24", "dev", "v0")
        _ip("-n", name, "link", "set", "v1", "up")
        _ip("-n", name, "link", "set", "v0", "up")
        for key, value in (("mcast_solicit", "1"), ("retrans_time_ms", "100")):
            subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", f"net.ipv4.neigh.v0.{key}={value}"],
                           check=True, capture_output=True)  # fmt: skip
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"],
            check=True, capture_output=True,
        )  # fmt: skip
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def test_echo_requests_go_out_through_ping_sockets_and_come_back_with_the_guests_identifier(ping_ns: str) -> None:
    out = _run(ping_ns, DRIVER)
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
    # info usernet lists each ping socket as libslirp does: seconds left, guest -> destination, no ports.
    rows = [r.split() for r in out["icmp_rows"]]
    assert all(r[1] == "sec]" and 20 <= int(r[0].removeprefix("ICMP[")) <= 30 for r in rows), out["icmp_rows"]
    v4_rows = sorted((r[3], r[4], r[5], r[6]) for r in rows if ":" not in r[5])
    assert v4_rows == [("10.0.2.15", "-", "127.0.0.1", "-")] + 3 * [("10.0.2.15", "-", "192.0.2.1", "-")], rows


# Runs inside the namespace, which has no route but its loopback: traffic to 198.51.100.7 and
# 2001:db8:ffff::7 cannot leave. Prints the ICMP errors the guest got, as JSON.
NO_ROUTE_DRIVER = r"""
import asyncio, json
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6, IPerror6
from scapy.layers.l2 import Ether
from appliance.nat import UserNetConfig, UserNetwork
from tests.nat.conftest import GUEST_MAC, GW_MAC, drain, feed

def guest(pkt):
    return bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / pkt)

def csum_ok(frame, layer):
    again = frame.copy()
    field = "chksum" if layer is ICMP else "cksum"
    delattr(again[layer], field)
    return getattr(Ether(bytes(again))[layer], field) == getattr(frame[layer], field)

async def main():
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    far, far6 = "198.51.100.7", "2001:db8:ffff::7"
    feed(net, guest(IP(src="10.0.2.15", dst=far) / UDP(sport=5353, dport=53) / b"query"))
    feed(net, guest(IP(src="10.0.2.15", dst=far) / TCP(sport=40000, dport=80, flags="S", seq=123456789)))
    feed(net, guest(IP(src="10.0.2.15", dst=far) / ICMP(type=8, id=9, seq=1) / b"ping"))
    feed(net, guest(IPv6(src="fec0::15", dst=far6) / UDP(sport=5354, dport=53) / b"query6"))
    feed(net, guest(IPv6(src="fec0::15", dst=far6) / TCP(sport=40001, dport=80, flags="S", seq=987654321)))
    # On-link, never answers ARP: the host's connect() fails later, asynchronously. (A UDP
    # socket hears nothing then: Linux sends no ICMP to itself about its own datagrams.)
    near = "203.0.113.99"
    feed(net, guest(IP(src="10.0.2.15", dst=near) / TCP(sport=40002, dport=80, flags="S", seq=55555)))
    errors = []
    for _ in range(1000):  # the on-link connect fails after one 100 ms ARP probe; ~10 s at most
        for f in (Ether(x) for x in drain(net)):
            if ICMP in f and f[ICMP].type == 3:
                inner = f[IPerror]
                l4 = {6: TCPerror, 17: UDPerror}.get(inner.proto)
                errors.append({"v": 4, "src": f[IP].src, "code": f[ICMP].code, "proto": inner.proto,
                               "dst": inner.dst, "sport": f[l4].sport if l4 else None,
                               "seq": f[TCPerror].seq if inner.proto == 6 else None, "csum_ok": csum_ok(f, ICMP)})
            elif ICMPv6DestUnreach in f:
                inner = f[IPerror6]
                errors.append({"v": 6, "src": f[IPv6].src, "code": f[ICMPv6DestUnreach].code, "proto": inner.nh,
                               "dst": inner.dst, "sport": int.from_bytes(bytes(inner.payload)[:2], "big"),
                               "csum_ok": csum_ok(f, ICMPv6DestUnreach)})
            elif TCP in f:
                errors.append({"v": 0, "tcp_flags": str(f[TCP].flags)})
        if len(errors) >= 6:
            break
        await asyncio.sleep(0.01)
    counters = net.counters()
    await net.stop()
    print(json.dumps({"errors": errors, "sent": counters["icmp_unreachable_sent"],
                      "refused": counters["tcp_refused"], "rst": counters["tcp_rst_sent"]}))

asyncio.run(main())
"""


def test_no_route_on_the_host_comes_back_as_icmp_unreachable_from_the_gateway(ping_ns: str) -> None:
    # As libslirp does: the guest's connect() fails with "Network is unreachable" at once,
    # instead of "Connection refused" (RST) or a UDP/ping that is never answered.
    out = _run(ping_ns, NO_ROUTE_DRIVER)
    got = sorted((e["v"], e["proto"], e["sport"], e["code"], e["src"], e["dst"]) for e in out["errors"] if e["v"])
    assert got == [
        (4, 1, None, 0, "10.0.2.2", "198.51.100.7"),  # net unreachable (RFC 792 code 0)
        (4, 6, 40000, 0, "10.0.2.2", "198.51.100.7"),
        (4, 6, 40002, 1, "10.0.2.2", "203.0.113.99"),  # host unreachable (code 1), found out later
        (4, 17, 5353, 0, "10.0.2.2", "198.51.100.7"),
        (6, 6, 40001, 0, "fec0::2", "2001:db8:ffff::7"),  # no route to destination (RFC 4443 code 0)
        (6, 17, 5354, 0, "fec0::2", "2001:db8:ffff::7"),
    ]
    seqs = {e["sport"]: e["seq"] for e in out["errors"] if e["v"] == 4 and e["proto"] == 6}
    assert seqs == {40000: 123456789, 40002: 55555}  # the guest matches the error to its SYN by these
    assert all(e["csum_ok"] for e in out["errors"] if e["v"])
    assert not [e for e in out["errors"] if e["v"] == 0], "no RST as well as the error"
    assert out["sent"] == 6 and out["refused"] == 3 and out["rst"] == 0


DNS_FLOW_DRIVER = r"""
import asyncio, json, socket, time
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from appliance.nat import UserNetConfig, UserNetwork, udp_nat
from tests.nat.conftest import GUEST_MAC, GW_MAC, drain, feed

async def main():
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind(("127.0.0.1", 53))  # free: this namespace is the test's own
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 5353))
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    for port, srv in ((53, dns), (5353, other)):
        feed(net, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.2")
                        / UDP(sport=40000 + port, dport=port) / b"q"))
        data, peer = srv.recvfrom(100)
        srv.sendto(b"a", peer)
    for _ in range(500):  # both answers in: each flow has had its reply
        await asyncio.sleep(0.01)
        drain(net)
        if all(f.rx for f in net.udp._flows.values()):
            break
    now = time.monotonic()
    rows = sorted(f.label for f in net.udp.flows())
    net.udp.expire(now + udp_nat.ANSWERED_DNS_TIMEOUT + 1)
    after_dns = sorted(k[3] for k in net.udp._flows)
    net.udp.expire(now + udp_nat.IDLE_TIMEOUT + 1)
    print(json.dumps({"rows": rows, "after_dns": after_dns, "after_idle": len(net.udp._flows)}))
    await net.stop()

asyncio.run(main())
"""


def test_an_answered_flow_to_port_53_expires_after_10_s_others_after_240(ping_ns: str) -> None:
    # libslirp's SO_EXPIREFAST and SO_EXPIRE: a resolver's one-query source ports would
    # otherwise hold a host socket each for 4 minutes.
    out = _run(ping_ns, DNS_FLOW_DRIVER)
    left = sorted(int(label.removeprefix("UDP[").removesuffix(" sec]")) for label in out["rows"])
    assert 5 <= left[0] <= 10 and 235 <= left[1] <= 240, out  # what info usernet shows (a busy host may lag)
    assert out["after_dns"] == [5353]
    assert out["after_idle"] == 0
