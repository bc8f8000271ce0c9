"""``info usernet`` checked against QEMU's own (libslirp) table, frame for frame.

QEMU 7.2 runs with ``-net user`` and a UDP socket netdev on hub 0 (no guest, no NIC:
``-machine none``), so the driver plays the guest to libslirp through that socket; ours
gets the same frames straight in. After each step both tables are taken and compared,
all but the descriptor column (and the hostfwd listen port, one each).

- TCP: a connection the host closes first, one the guest closes first (with data the
  guest has not acknowledged), and a hostfwd connection from SYN to the client's close:
  states, addresses, ports and queues.
- DNS: libslirp opens a UDP socket for each guest port that queries the DNS address, so
  QEMU lists one row for each, 240 seconds left from a query and 10 from an answer. Ours
  answers through one shared socket and lists the same rows.

Both run in a network namespace of the test's own whose resolv.conf (``ip netns exec``
mounts /etc/netns/NAME/resolv.conf) names a DNS server the driver runs on its loopback.
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

# The two stacks side by side: ``Side.send`` hands a guest frame to one, ``Side.recv`` the
# TCP frames it answered with, ``Side.table`` its info usernet rows (label and columns,
# without the descriptor; the ports that differ by name: FWD, SINK).
HARNESS = r"""
import asyncio, json, os, socket, sys, tempfile
from qemu.qmp import QMPClient
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from appliance.nat import UserNetConfig, UserNetwork
from tests.nat.conftest import GUEST_MAC, GW_MAC, drain, feed
from tests.ports import free_port

def rows(table, names):
    out = []
    for line in table.splitlines():
        if line.startswith(("  TCP", "  UDP")):
            label, _, rest = line.strip().partition("]")
            out.append([label + "]"] + [names.get(c, c) for c in rest.split()[1:]])
    return out

def tcp(sport, dst, dport, flags, seq, ack, data=b""):
    return bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst=dst)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=65535) / data)

def data_len(f):
    return f[IP].len - f[IP].ihl * 4 - f[TCP].dataofs * 4

def seq_after(frames):
    return max(f[TCP].seq + data_len(f) + (int(f[TCP].flags) & 1) for f in frames) & 0xFFFFFFFF

class Side:
    # Ports that differ from one stack to the other, by the name the rows show instead.
    names: dict

    async def recv(self):
        await asyncio.sleep(0.2)
        return [f for f in self._frames() if TCP in f]

class Qemu(Side):
    async def start(self, hostfwd):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = free_port()
        self.fwd = free_port()
        self.names = {str(self.fwd): "FWD"}
        qmp = os.path.join(tempfile.mkdtemp(), "qmp.sock")
        self.proc = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "none",
            "-net", f"user,hostfwd=tcp:127.0.0.1:{self.fwd}-:{hostfwd}",
            "-net", f"socket,udp=127.0.0.1:{self.sock.getsockname()[1]},localaddr=127.0.0.1:{self.port}",
            "-qmp", f"unix:{qmp},server=on,wait=off", stderr=asyncio.subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(qmp):
                break
            await asyncio.sleep(0.05)
        self.qmp = QMPClient("qemu")
        await self.qmp.connect(qmp)

    def send(self, frame):
        self.sock.sendto(frame, ("127.0.0.1", self.port))

    def _frames(self):
        out = []
        try:
            while True:
                out.append(Ether(self.sock.recvfrom(70000)[0]))
        except BlockingIOError:
            return out

    async def table(self):
        text = await self.qmp.execute("human-monitor-command", {"command-line": "info usernet"})
        return rows(str(text), self.names)

    async def stop(self):
        await self.qmp.disconnect()
        self.proc.kill()
        await self.proc.wait()

class Ours(Side):
    async def start(self, hostfwd):
        self.fwd = free_port()
        self.names = {str(self.fwd): "FWD"}
        self.net = UserNetwork(UserNetConfig.from_string(f"user,hostfwd=tcp:127.0.0.1:{self.fwd}-:{hostfwd}"))
        await self.net.start()

    def send(self, frame):
        feed(self.net, frame)

    def _frames(self):
        return [Ether(f) for f in drain(self.net)]

    async def table(self):
        return rows(self.net.info(), self.names)

    async def stop(self):
        await self.net.stop()

async def both(scenario):
    out = {}
    for name, side in (("qemu", Qemu()), ("ours", Ours())):
        await side.start(7000)
        side.send(bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
                        / ARP(op=1, hwsrc=GUEST_MAC, psrc="10.0.2.15", pdst="10.0.2.2")))
        await side.recv()
        try:
            out[name] = await scenario(side)
        finally:
            await side.stop()
    print(json.dumps(out))
"""

TCP_SCENARIO = r"""
accepted = []

async def serve(r, w):
    accepted.append(w)

async def scenario(side):
    steps = {}
    async def step(name):
        steps[name] = await side.table()
    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    side.names[str(port)] = "SINK"

    async def connect(sport):
        # The guest's handshake (its ISN 1000); the next sequence number it acknowledges.
        side.send(tcp(sport, "10.0.2.2", port, "S", 1000, 0))
        [sa] = [f for f in await side.recv() if f[TCP].flags & 0x12 == 0x12]
        side.send(tcp(sport, "10.0.2.2", port, "A", 1001, sa[TCP].seq + 1))
        return sa[TCP].seq + 1

    # The host closes first, after 10 bytes the guest has not acknowledged.
    ours = await connect(41000)
    side.send(tcp(41000, "10.0.2.2", port, "PA", 1001, ours, b"hello"))
    await side.recv()
    await step("established")
    accepted[-1].write(b"x" * 10)
    accepted[-1].close()
    frames = await side.recv()
    await step("host closed")
    side.send(tcp(41000, "10.0.2.2", port, "A", 1006, seq_after(frames)))
    await side.recv()
    await step("host closed, acked")
    # The guest closes first; then the host sends 20 bytes and closes.
    ours = await connect(42000)
    await side.recv()
    side.send(tcp(42000, "10.0.2.2", port, "FA", 1001, ours))
    await side.recv()
    await step("guest closed")
    accepted[-1].write(b"y" * 20)
    await asyncio.sleep(0.1)
    accepted[-1].close()
    frames = await side.recv()
    await step("both closed, unacked")
    side.send(tcp(42000, "10.0.2.2", port, "A", 1002, seq_after(frames)))
    await side.recv()
    await step("both closed, acked")
    # A hostfwd connection: SYN to the guest, handshake, 2 bytes unacknowledged, client's close.
    client = socket.socket()
    client.setblocking(False)
    try:
        client.connect(("127.0.0.1", side.fwd))
    except BlockingIOError:
        pass
    [syn] = [f for f in await side.recv() if f[TCP].flags & 2]
    await step("hostfwd syn")
    side.send(tcp(7000, syn[IP].src, syn[TCP].sport, "SA", 5000, syn[TCP].seq + 1))
    await side.recv()
    await step("hostfwd established")
    client.send(b"zz")
    await side.recv()
    await step("hostfwd data unacked")
    client.close()
    await side.recv()
    await step("hostfwd client closed")
    srv.close()
    return steps

asyncio.run(both(scenario))
"""

DNS_SCENARIO = r"""
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind(("127.0.0.1", 53))  # free: this namespace is the test's own
dns.setblocking(False)

def query(sport, name):
    return bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.3")
                 / UDP(sport=sport, dport=53) / DNS(id=sport, rd=1, qd=DNSQR(qname=name)))

async def scenario(side):
    steps = {}
    try:
        while True:
            dns.recvfrom(4096)  # what the other stack asked last
    except BlockingIOError:
        pass
    # Two guest ports ask; the first is answered.
    side.send(query(40001, "a.example"))
    side.send(query(40002, "b.example"))
    got = []
    for _ in range(100):
        await asyncio.sleep(0.02)
        side._frames()
        try:
            while True:
                got.append(dns.recvfrom(4096))
        except BlockingIOError:
            pass
        if len(got) >= 2:
            break
    steps["queries"] = len(got)
    data, peer = got[0]
    q = DNS(data)
    dns.sendto(bytes(DNS(id=q.id, qr=1, rd=1, ra=1, qd=q.qd, an=DNSRR(rrname=q.qd.qname, rdata="192.0.2.7"))), peer)
    await side.recv()
    steps["answered"] = [r for r in await side.table() if r[0].startswith("UDP")]
    # The answered port asks again: 240 s again.
    side.send(query(40001, "c.example"))
    await side.recv()
    steps["asked again"] = [r for r in await side.table() if r[0].startswith("UDP")]
    return steps

asyncio.run(both(scenario))
"""


@pytest.fixture
def dns_ns() -> Iterator[str]:
    name = f"appl-usernet-{os.getpid()}"
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


def _run(ns: str, scenario: str) -> dict:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", HARNESS + scenario],
        cwd=ROOT, capture_output=True, text=True, timeout=90, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _seconds(row: list[str]) -> int:
    return int(row[0].removeprefix("UDP[").removesuffix(" sec]"))


def test_tcp_rows_follow_qemus_through_each_connection_state(dns_ns: str) -> None:
    out = _run(dns_ns, TCP_SCENARIO)
    theirs, ours = out["qemu"], out["ours"]
    assert list(ours) == list(theirs)
    for step, rows in theirs.items():
        assert ours[step] == rows, (step, ours[step], rows)
    # What the steps went through, as QEMU shows it (so the comparison covered them).
    labels = [r[0] for rows in theirs.values() for r in rows]
    for state in ("ESTABLISHED", "FIN_WAIT_1", "FIN_WAIT_2", "CLOSE_WAIT", "LAST_ACK", "SYN_SENT", "HOST_FORWARD"):
        assert f"TCP[{state}]" in labels, (state, theirs)
    assert any(r[-1] == "20" for r in theirs["both closed, unacked"]), theirs
    assert any(r[-1] == "2" for r in theirs["hostfwd data unacked"]), theirs


def test_dns_queries_are_listed_as_libslirp_lists_them(dns_ns: str) -> None:
    out = _run(dns_ns, DNS_SCENARIO)
    theirs, ours = out["qemu"], out["ours"]
    assert theirs["queries"] == 2 and ours["queries"] == 2, out
    answered = theirs["answered"]
    # Newest first: port 40002 (asked, 240 s), then 40001 (answered, 10 s).
    assert [r[1:4] for r in answered] == [["10.0.2.15", p, "10.0.2.3"] for p in ("40002", "40001")], out
    assert _seconds(answered[1]) <= 10 < 230 <= _seconds(answered[0]), out
    assert _seconds(theirs["asked again"][1]) >= 230, out
    for step in ("answered", "asked again"):
        # The same rows in the same order; the seconds left may differ by the run's own lag.
        assert [r[1:] for r in ours[step]] == [r[1:] for r in theirs[step]], (step, out)
        for a, b in zip(ours[step], theirs[step], strict=True):
            assert abs(_seconds(a) - _seconds(b)) <= 2, (step, out)
