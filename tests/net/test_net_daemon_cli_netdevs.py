"""`appliance net-daemon` started from its command line with each kind of host back end.

The in-process tests drive the back ends on pytest's loop; these run the
daemon's own ``main`` (its own loop) the way users start it, inside a network
namespace the test makes, and check that each export comes up, that the host
side exists and is up, and that the daemon removes its socket and exits 0 on
SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .netns import namespace, ns_exec

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a network namespace and taps")


def _serve(ns: str, netdev: str, sock: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "appliance.cli.main", "net-daemon", "--netdev", netdev,
         "--export", f"type=vhost-user-net,id=e0,netdev=n0,addr.type=unix,addr.path={sock}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(sock: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None:
            pytest.fail(f"net-daemon exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, "net-daemon made no socket in 30 s"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("netdev", "setup", "link"),
    [
        ("tap,id=n0,ifname=dtap0", [], "dtap0"),
        ("tap,id=n0,ifname=dtap1,vhost=off,queues=1", [], "dtap1"),
        ("bridge,id=n0,br=dbr0", [["link", "add", "dbr0", "type", "bridge"]], "dbr0"),
        ("user,id=n0,hostfwd=tcp:127.0.0.1:0-:22", [], None),
        ("dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port=0,"
         "remote.type=inet,remote.host=127.0.0.1,remote.port=9", [], None),
    ],
)
def test_each_netdev_comes_up_from_the_command_line(
    netdev: str, setup: list[list[str]], link: str | None, tmp_path: Path
) -> None:
    sock = tmp_path / "n.sock"
    with namespace() as ns:
        ns_exec(ns, "ip", "link", "set", "lo", "up")
        for cmd in setup:
            ns_exec(ns, "ip", *cmd)
        proc = _serve(ns, netdev, sock)
        try:
            _wait_for(sock, proc)
            if link is not None:
                shown = ns_exec(ns, "ip", "-o", "link", "show", link)
                assert "state UP" in shown or ",UP" in shown, shown
            if netdev.startswith("bridge"):
                ports = ns_exec(ns, "ip", "-o", "link", "show", "master", "dbr0")
                assert "master dbr0" in ports and ",UP," in ports, ports  # its tap joined the bridge, up
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
        assert rc == 0, proc.stderr.read() if proc.stderr else ""
        assert not sock.exists(), "the daemon removes its socket on exit"
