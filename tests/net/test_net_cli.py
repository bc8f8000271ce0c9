"""`appliance net bridge|tap` inside a namespace made by the test."""

from __future__ import annotations

import sys

from appliance.net.tap import Tap
from appliance.net.taps import tap_owners
from tests.conftest import needs_root
from tests.net.netns import inside, namespace, ns_exec

pytestmark = needs_root


def appliance_in(ns: str, *args: str) -> str:
    return ns_exec(ns, sys.executable, "-m", "appliance.cli.main", *args)


def test_bridge_add_ls_del() -> None:
    with namespace() as ns:
        appliance_in(ns, "net", "bridge", "add", "labbr0", "--addr", "10.66.0.1/24")
        out = appliance_in(ns, "net", "bridge", "ls")
        row = next(line for line in out.splitlines() if line.startswith("labbr0"))
        assert "up" in row and "10.66.0.1/24" in row
        assert "10.66.0.1/24" in ns_exec(ns, "ip", "addr", "show", "labbr0")
        appliance_in(ns, "net", "bridge", "del", "labbr0")
        assert "labbr0" not in appliance_in(ns, "net", "bridge", "ls")


async def test_tap_ls_names_this_process_and_its_queue_fds() -> None:
    with namespace() as ns:
        with inside(ns):
            tap = Tap("lstap0", queues=2)
            qs = await tap.open()
        try:
            mine = [o for o in tap_owners() if o.tap == "lstap0"]
            assert len(mine) == 1
            assert mine[0].fds == sorted(q.fd for q in qs)
            out = appliance_in(ns, "net", "tap", "ls")
            assert any(line.split()[:1] == ["lstap0"] and str(qs[0].fd) in line for line in out.splitlines())
        finally:
            with inside(ns):
                await tap.close()
