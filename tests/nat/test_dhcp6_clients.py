"""DHCPv6 clients we did not write against our stack: ISC dhclient in stateless mode (-S) and
dhcpcd --inform6, each of which sends an Information-request, in a namespace made by the test
(the harness of test_dhcp_clients: the stack on one end of a veth pair, the client's interface
in the namespace). Their scripts only log what they were given; nothing leaves the veth pair."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from tests.conftest import needs_root
from tests.nat.test_dhcp_clients import lines, log_script, needs, wire

pytestmark = needs_root
# The reason dhclient's script is run with for a stateless Reply: 4.4 says RENEW6 (INFORM6 elsewhere).
INFORMED = ("INFORM6 ", "RENEW6 ")


async def link_local_ready(w) -> None:  # type: ignore[no-untyped-def]
    """dhclient -6 binds to the interface's link-local address: wait until DAD has passed."""
    async with asyncio.timeout(15):
        while True:
            out = await w.arun("ip", "-6", "addr", "show", "dev", w.ifname, "scope", "link")
            if "fe80::" in out and "tentative" not in out:
                return
            await asyncio.sleep(0.1)


@needs("dhclient")
async def test_isc_dhclient_stateless_information_request_gets_dns_and_search_list(tmp_path: Path) -> None:
    log = tmp_path / "events"
    script = log_script(tmp_path / "hook", log, "$reason dns=$new_dhcp6_name_servers "
                        "search=$new_dhcp6_domain_search")  # fmt: skip
    common = ["-6", "-sf", str(script), "-lf", str(tmp_path / "leases"), "-pf", str(tmp_path / "pid")]
    async with wire(tmp_path) as w:
        await link_local_ready(w)
        try:
            # -S: an Information-request only (RFC 8415 §18.2.6); -1: one try, then to the background.
            out = await w.arun("dhclient", "-v", "-S", "-1", *common, w.ifname)
            async with asyncio.timeout(10):
                while not any(ln.startswith(INFORMED) for ln in lines(log)):
                    await asyncio.sleep(0.05)
            informed = next(ln for ln in lines(log) if ln.startswith(INFORMED))
            assert "dns=fec0::3" in informed, (informed, out)
            assert "search=lab.test. example.test." in informed, (informed, out)
            assert w.net.counters()["dhcp6_replies"] >= 1
            assert w.net.counters()["dhcp6_bad"] == 0
        finally:
            await w.arun("dhclient", "-x", *common, w.ifname)


@needs("dhcpcd")
async def test_dhcpcd_inform6_gets_dns_and_search_list(tmp_path: Path) -> None:
    log = tmp_path / "events"
    script = log_script(tmp_path / "hook", log, "$reason dns=$new_dhcp6_name_servers "
                        "search=$new_dhcp6_domain_search")  # fmt: skip
    async with wire(tmp_path) as w:
        lease = Path(f"/var/lib/dhcpcd/{w.ifname}.lease6")
        await link_local_ready(w)
        try:
            # -1 -B: one exchange in the foreground, and dhcpcd exits once its hook has run. With no
            # configuration file it asks only for what -o names (its Option Request option).
            # --noipv6rs: a router advertisement handled first would end a one-shot run before the
            # Information-request (dhcpcd delays it up to a second) is answered.
            out = await w.arun("timeout", "25", "dhcpcd", "-6", "--inform6", "--noipv6rs", "-1", "-B",
                               "-f", "/dev/null", "-o", "dhcp6_name_servers", "-o", "dhcp6_domain_search",
                               "-c", str(script), w.ifname, timeout=35)  # fmt: skip
            informed = [ln for ln in lines(log) if ln.startswith("INFORM6 ")]
            assert informed == ["INFORM6 dns=fec0::3 search=lab.test example.test"], (lines(log), out)
            assert w.net.counters()["dhcp6_replies"] >= 1
        finally:
            await w.arun("dhcpcd", "-6", "-x", w.ifname)
            with contextlib.suppress(OSError):
                lease.unlink()
