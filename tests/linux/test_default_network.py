"""virbr0: a Linux guest gets a lease, its name resolves, and NAT takes it to a host upstream.

Two namespaces stand in for the machine: ``host`` runs `appliance net default`
and our net-daemon; ``upstream`` is a web server reachable from ``host`` over a
veth, which knows nothing of 192.168.122.0/24 — replies only come back through
the masquerade.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from appliance.kit.tcg import TcgGuest
from appliance.net.netdev import BridgeNetdev
from tests.conftest import needs_qemu, needs_root
from tests.linux.test_vhost_user_net import daemon, nic_args
from tests.net.netns import namespace, ns_exec

pytestmark = [needs_root, needs_qemu]


def appliance_in(ns: str, state: Path, *args: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "appliance.cli.main", *args],
        check=True, capture_output=True, text=True, env={**os.environ, "APPLIANCE_NET_STATE": str(state)},
    ).stdout


async def test_guest_leases_resolves_and_reaches_upstream_through_nat(tmp_path: Path) -> None:
    state = tmp_path / "state"
    blob = os.urandom(3_000_000)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "blob").write_bytes(blob)
    with namespace() as host, namespace() as upstream:
        ns_exec(host, "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns", upstream)
        ns_exec(host, "ip", "addr", "add", "10.200.0.1/24", "dev", "up0")
        ns_exec(host, "ip", "link", "set", "up0", "up")
        ns_exec(upstream, "ip", "addr", "add", "10.200.0.2/24", "dev", "up1")
        ns_exec(upstream, "ip", "link", "set", "up1", "up")
        ns_exec(upstream, "ip", "link", "set", "lo", "up")
        web = subprocess.Popen(
            ["ip", "netns", "exec", upstream, sys.executable, "-m", "http.server", "8080",
             "--bind", "10.200.0.2", "--directory", str(tmp_path / "www")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            appliance_in(host, state, "net", "default", "start")
            appliance_in(host, state, "net", "default", "reserve", "52:54:00:aa:bb:01", "192.168.122.50")
            sock = tmp_path / "nic.sock"
            async with daemon(host, sock, "", netdev=BridgeNetdev("n0", "virbr0")):
                async with TcgGuest(nic_args(sock, "52:54:00:aa:bb:01"), machine="q35") as g:
                    out = await g.run("udhcpc -i eth0 -x hostname:labvm -n -q -t 5", timeout=60)
                    assert "192.168.122.50" in out
                    assert "192.168.122.50/24" in await g.run("ip addr show eth0")
                    assert "default via 192.168.122.1" in await g.run("ip route")
                    look = await g.run("nslookup labvm 192.168.122.1", timeout=30)
                    assert "192.168.122.50" in look.split("labvm", 1)[1]
                    got = await g.run("wget -q -O - http://10.200.0.2:8080/blob | sha256sum", timeout=120)
                    assert got.split()[0] == hashlib.sha256(blob).hexdigest()
                    await g.poweroff()
            status = appliance_in(host, state, "net", "default", "status")
            assert "52:54:00:aa:bb:01" in status and "labvm" in status and "running" in status
        finally:
            appliance_in(host, state, "net", "default", "stop")
            web.terminate()
            web.wait()
        assert "virbr0" not in ns_exec(host, "ip", "link", "show")
        assert "appliance_default" not in ns_exec(host, "nft", "list", "tables")
        assert "daemon:  not running" in appliance_in(host, state, "net", "default", "status")
