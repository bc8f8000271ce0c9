"""busybox udhcpc in a real Linux guest (QEMU TCG) against our DHCP server: the broadcast flag,
the parameter request list, renew (SIGUSR1), release (SIGUSR2) and release on exit (-R).

The guest's NIC is a vhost-user virtio-net served by our user-mode network in
this process (as ``appliance net-daemon --netdev user`` serves it). Nothing
beyond the stack is contacted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from appliance.kit.tcg import TcgGuest
from appliance.nat.dhcp import LeaseState
from tests.conftest import needs_qemu
from tests.linux.test_user_net import user_daemon
from tests.linux.test_vhost_user_net import nic_args

pytestmark = needs_qemu

MAC = bytes.fromhex("525400123456")
BCAST = b"\xff\xff\xff\xff"
# Applies each event, then logs it with the values udhcpc parsed from our options. In that order:
# the kit's script takes the address away and adds it again on a renew, so a test that read the
# address as soon as the event was logged could catch it in between (seen once in a full run).
SCRIPT = (
    "#!/bin/sh\n"
    '/usr/share/udhcpc/default.script "$@"\n'
    'echo "$1 ip=$ip server=$serverid lease=$lease router=$router dns=$dns domain=$domain '
    'host=$hostname search=$search bcast=$broadcast" >> /tmp/ev\n'
)


async def events(g: TcgGuest, word: str, count: int, timeout: float = 20.0) -> list[str]:
    """The event log once it holds ``count`` lines starting with ``word``."""
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            lines = (await g.run("cat /tmp/ev 2>/dev/null; true")).splitlines()
            if sum(ln.startswith(word + " ") for ln in lines) >= count:
                return lines
            await asyncio.sleep(0.3)


async def test_udhcpc_broadcast_flag_options_renew_and_release(tmp_path: Path) -> None:
    sock = tmp_path / "user.sock"
    async with user_daemon(sock, "hostname=vm1,domainname=lab.test,dnssearch=lab.test,dnssearch=example.test") as stack:
        server = stack.dhcp  # type: ignore[attr-defined]
        replies: list[tuple[bytes, int, int]] = []  # (IP destination, BOOTP flags, DHCP type) of our replies
        output = stack.output  # type: ignore[attr-defined]

        def record(frame, vnet_hdr=None):  # type: ignore[no-untyped-def]
            f = bytes(frame)
            if f[12:14] == b"\x08\x00" and f[23] == 17 and f[34:38] == b"\x00\x43\x00\x44":
                replies.append((f[30:34], int.from_bytes(f[52:54], "big"), f[284]))
            return output(frame, vnet_hdr)

        stack.output = record  # type: ignore[attr-defined]
        async with TcgGuest(nic_args(sock, "52:54:00:12:34:56"), machine="q35") as g:
            await g.run(f"printf '%s' '{SCRIPT}' > /tmp/s && chmod +x /tmp/s")
            # -B: the BROADCAST flag; -O search: option 119 in the request list; -R: release on exit.
            # In a subshell: the kit's console shell exits when a job of its own ends.
            await g.run("(udhcpc -f -i eth0 -B -R -O search -p /tmp/u.pid -s /tmp/s > /tmp/log 2>&1 &)")
            lines = await events(g, "bound", 1)
            bound = next(ln for ln in lines if ln.startswith("bound "))
            for want in ("ip=10.0.2.15", "server=10.0.2.2", "lease=86400", "router=10.0.2.2", "dns=10.0.2.3",
                         "domain=lab.test", "host=vm1", "search=lab.test example.test",
                         "bcast=10.0.2.255"):  # fmt: skip
                assert want in bound, (want, bound)
            # -B: OFFER and ACK broadcast, the flag echoed (RFC 2131 §4.1, table 3).
            assert replies[:2] == [(BCAST, 0x8000, 2), (BCAST, 0x8000, 5)], replies
            lease = server.leases[MAC]
            assert lease.state is LeaseState.BOUND and lease.ip == bytes([10, 0, 2, 15])
            first = lease.expires

            # Renew: a unicast REQUEST with ciaddr (RENEWING), ACKed to ciaddr.
            await g.run("kill -USR1 $(cat /tmp/u.pid)")
            await events(g, "renew", 1)
            assert server.leases[MAC].expires > first
            assert replies[2] == (bytes([10, 0, 2, 15]), 0, 5), replies  # RENEWING: unicast to ciaddr
            assert "10.0.2.15" in await g.run("ip -4 addr show dev eth0")

            # Release: the lease is gone from the table; a new DISCOVER gets the same address back.
            await g.run("kill -USR2 $(cat /tmp/u.pid)")
            await events(g, "deconfig", 2)  # one at start-up, one for the release
            async with asyncio.timeout(10):
                while MAC in server.leases:
                    await asyncio.sleep(0.1)
            await g.run("kill -USR1 $(cat /tmp/u.pid)")
            lines = await events(g, "bound", 2)
            assert [ln for ln in lines if ln.startswith("bound ")][1].split()[1] == "ip=10.0.2.15"
            assert server.leases[MAC].state is LeaseState.BOUND

            # -R: a RELEASE on exit.
            await g.run("kill -TERM $(cat /tmp/u.pid)")
            async with asyncio.timeout(10):
                while MAC in server.leases:
                    await asyncio.sleep(0.1)
            assert stack.counters()["errors"] == 0  # type: ignore[attr-defined]
            await g.poweroff()
