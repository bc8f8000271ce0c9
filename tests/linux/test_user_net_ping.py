"""A real Linux guest pings past the gateway: `net-daemon --netdev user` forwards through ping sockets.

And where the host has no route, the guest is told so (ICMP unreachable from the gateway).

The daemon runs inside a network namespace the test makes (ping sockets need
``net.ipv4.ping_group_range``, which is per namespace and closed on this
host); 192.0.2.1 on that namespace's loopback is the only host the guest
reaches. QEMU stays outside and joins over the vhost-user unix socket.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.kit.tcg import TcgGuest
from tests.conftest import needs_qemu
from tests.linux.test_vhost_user_net import nic_args

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    needs_qemu,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 to make a network namespace"
    ),
]


@pytest.fixture
def ping_ns() -> Iterator[str]:
    name = f"appl-gping-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", "192.0.2.1/32", "dev", "lo"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"], check=True
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _rtt_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.search(r"bytes from 192\.0\.2\.1: seq=\d+ ttl=\d+", line)]


async def test_guest_ping_beyond_the_gateway_is_answered_by_the_host(ping_ns: str, tmp_path: Path) -> None:
    sock = tmp_path / "user.sock"
    daemon = subprocess.Popen(
        ["ip", "netns", "exec", ping_ns, sys.executable, "-m", "appliance.cli.main", "net-daemon",
         "--netdev", "user,id=u0",
         "--export", f"type=vhost-user-net,id=e0,netdev=u0,addr.type=unix,addr.path={sock}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert daemon.poll() is None, "net-daemon exited"
            assert time.monotonic() < deadline, "net-daemon made no socket"
            time.sleep(0.05)
        async with TcgGuest(nic_args(sock, "52:54:00:12:34:56"), machine="q35") as g:
            assert "10.0.2.15" in await g.run("udhcpc -i eth0 -n -q -t 5", timeout=60)
            out = await g.run("ping -c 3 -i 0.2 -W 5 192.0.2.1", timeout=60)
            assert len(_rtt_lines(out)) == 3, out
            assert "3 packets received" in out
            # 3000 bytes of payload: the guest's fragments are reassembled, sent as one echo, and
            # the reply is fragmented back to the guest's MTU.
            out = await g.run("ping -c 2 -i 0.2 -W 5 -s 3000 192.0.2.1", timeout=60)
            assert "2 packets received" in out, out
            assert all("3008 bytes from" in line for line in _rtt_lines(out)), out
            # No route in the namespace: the gateway says so (ICMP net unreachable), and the
            # guest's connect() ends at once with the host's reason, as on QEMU's libslirp.
            out = await g.run("ping -c 1 -W 2 198.51.100.7", timeout=30, check=False)
            assert "0 packets received" in out, out
            t0 = time.monotonic()
            out = await g.run("nc 198.51.100.7 80 </dev/null", timeout=30, check=False)
            assert "Network is unreachable" in out, out
            # At once, not after SYN retries (minutes); the bound leaves room for a TCG guest
            # held off the CPU by a loaded machine.
            assert time.monotonic() - t0 < 25
            assert "1 packets received" in await g.run("ping -c 1 -W 5 10.0.2.2", timeout=30)
            await g.poweroff()
    finally:
        daemon.terminate()
        daemon.wait(10)
