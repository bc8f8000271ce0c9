"""DNS queries in ``info usernet``, checked against QEMU's own (libslirp) table.

libslirp opens a UDP socket for each guest port that queries the DNS address, so QEMU
lists one row for each: guest address and port to the DNS address and port 53, 240
seconds left from a query and 10 from an answer. Ours answers through one shared
socket, and lists the same rows.

Both stacks run in a network namespace of the test's own whose resolv.conf (``ip netns
exec`` mounts /etc/netns/NAME/resolv.conf) names a DNS server the driver runs on its
loopback, and both are sent the same frames: QEMU's through a UDP socket netdev on
hub 0 beside ``-net user`` (no guest, no NIC: ``-machine none``), ours straight in.
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

from tests.conftest import needs_qemu

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 to make a network namespace"
    ),
    needs_qemu,
]

DRIVER = r"""
import asyncio, json, os, socket, sys, tempfile
from qemu.qmp import QMPClient
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from appliance.nat import UserNetConfig, UserNetwork
from tests.nat.conftest import GUEST_MAC, GW_MAC, drain, feed

def query(sport, name):
    return bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.3")
                 / UDP(sport=sport, dport=53) / DNS(id=sport & 0xFFFF, rd=1, qd=DNSQR(qname=name)))

def rows(table):
    # "  UDP[239 sec]  9  10.0.2.15 40001  10.0.2.3  53  0  0": all but the descriptor
    out = []
    for line in table.splitlines():
        if line.startswith("  UDP"):
            label, _, rest = line.strip().partition("]")
            out.append([label + "]"] + rest.split()[1:])
    return out

async def settle(dns, answer_first, drain_ours):
    got = []
    for _ in range(100):
        await asyncio.sleep(0.02)
        drain_ours()
        try:
            while True:
                got.append(dns.recvfrom(4096))
        except BlockingIOError:
            pass
        if len(got) >= 2:
            break
    if answer_first:
        data, peer = got[0]
        q = DNS(data)
        dns.sendto(bytes(DNS(id=q.id, qr=1, rd=1, ra=1, qd=q.qd, an=DNSRR(rrname=q.qd.qname, rdata="192.0.2.7"))), peer)
        for _ in range(10):
            await asyncio.sleep(0.02)
            drain_ours()
    return len(got)

async def main():
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind(("127.0.0.1", 53))  # free: this namespace is the test's own
    dns.setblocking(False)
    me = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    me.bind(("127.0.0.1", 0))
    qemu_port = me.getsockname()[1] + 1 if me.getsockname()[1] < 65000 else 40999
    qmp = os.path.join(tempfile.mkdtemp(), "qmp.sock")
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "none", "-net", "user",
        "-net", f"socket,udp=127.0.0.1:{me.getsockname()[1]},localaddr=127.0.0.1:{qemu_port}",
        "-qmp", f"unix:{qmp},server=on,wait=off", stderr=asyncio.subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(qmp):
            break
        await asyncio.sleep(0.05)
    client = QMPClient("qemu")
    await client.connect(qmp)
    net = UserNetwork(UserNetConfig())  # the namespace's resolv.conf
    await net.start()

    async def tables():
        theirs = await client.execute("human-monitor-command", {"command-line": "info usernet"})
        return {"qemu": rows(str(theirs)), "ours": rows(net.info())}

    out = {}
    # Two guest ports ask; the first is answered.
    for frame in (query(40001, "a.example"), query(40002, "b.example")):
        me.sendto(frame, ("127.0.0.1", qemu_port))
    out["qemu_queries"] = await settle(dns, True, lambda: None)
    for frame in (query(40001, "a.example"), query(40002, "b.example")):
        feed(net, frame)
    out["our_queries"] = await settle(dns, True, lambda: drain(net))
    out["answered"] = await tables()
    # The answered port asks again: 240 s again.
    me.sendto(query(40001, "c.example"), ("127.0.0.1", qemu_port))
    feed(net, query(40001, "c.example"))
    await asyncio.sleep(0.2)
    out["asked_again"] = await tables()
    await client.disconnect()
    proc.kill()
    await proc.wait()
    await net.stop()
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.fixture
def dns_ns() -> Iterator[str]:
    name = f"appl-dns-{os.getpid()}"
    conf = Path("/etc/netns") / name
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        shutil.rmtree(conf, ignore_errors=True)


def _seconds(row: list[str]) -> int:
    return int(row[0].removeprefix("UDP[").removesuffix(" sec]"))


def _same(ours: list[list[str]], theirs: list[list[str]]) -> None:
    """Same rows in the same order; the seconds left may differ by the run's own lag."""
    assert [r[1:] for r in ours] == [r[1:] for r in theirs], (ours, theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert abs(_seconds(a) - _seconds(b)) <= 2, (ours, theirs)


def test_dns_queries_are_listed_as_libslirp_lists_them(dns_ns: str) -> None:
    proc = subprocess.run(
        ["ip", "netns", "exec", dns_ns, sys.executable, "-c", DRIVER],
        cwd=ROOT, capture_output=True, text=True, timeout=90, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["qemu_queries"] == 2 and out["our_queries"] == 2, out
    answered, again = out["answered"], out["asked_again"]
    # Newest first: port 40002 (asked, 240 s), then 40001 (answered, 10 s).
    assert [r[1:4] for r in answered["qemu"]] == [["10.0.2.15", p, "10.0.2.3"] for p in ("40002", "40001")], out
    assert _seconds(answered["qemu"][1]) <= 10 < 230 <= _seconds(answered["qemu"][0]), out
    _same(answered["ours"], answered["qemu"])
    assert _seconds(again["qemu"][1]) >= 230, out
    _same(again["ours"], again["qemu"])
