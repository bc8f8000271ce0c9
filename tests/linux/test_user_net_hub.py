"""Two real Linux guests (QEMU TCG) on one user network through a net-daemon hub.

``--netdev hubport`` puts both vhost-user exports and a ``user`` back end on hub 0: each
guest gets its own lease, they reach each other on the segment, and both reach a service
the test started on host loopback through 10.0.2.2. When one guest's QEMU is killed, its
connections end and the other guest's carry on. QEMU's ``-netdev user`` is one
libslirp per VM and cannot do this. Only loopback services the test starts are contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from appliance.cli.net_daemon import NetDaemon, parse_command_line
from appliance.kit.tcg import TcgGuest
from appliance.nat.stack import UserNetwork
from tests.conftest import needs_qemu
from tests.linux.test_vhost_user_net import nic_args

pytestmark = needs_qemu

MACS = ("52:54:00:12:34:61", "52:54:00:12:34:62")


async def test_two_guests_share_one_user_network_through_a_hub(tmp_path: Path) -> None:
    socks = [tmp_path / "a.sock", tmp_path / "b.sock"]
    args = parse_command_line([
        "--netdev", "user,id=u", "--netdev", "hubport,id=up,hubid=0,netdev=u",
        "--netdev", "hubport,id=pa,hubid=0", "--netdev", "hubport,id=pb,hubid=0",
        "--export", f"type=vhost-user-net,id=ea,netdev=pa,addr.type=unix,addr.path={socks[0]}",
        "--export", f"type=vhost-user-net,id=eb,netdev=pb,addr.type=unix,addr.path={socks[1]}",
    ])
    seen: list[bytes] = []

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(await r.read(100))
        w.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    daemon = NetDaemon(args.netdevs, args.exports, args.dumps)
    await daemon.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            a, b = await asyncio.gather(*(
                stack.enter_async_context(TcgGuest(nic_args(sock, mac), machine="q35"))
                for sock, mac in zip(socks, MACS, strict=True)))
            leases = []
            for g in (a, b):
                out = await g.run("udhcpc -i eth0 -n -q -t 5", timeout=60)
                leases.append(next(ip for ip in ("10.0.2.15", "10.0.2.16") if ip in out))
            assert sorted(leases) == ["10.0.2.15", "10.0.2.16"]
            # Guest to guest on the hub's segment, and each to the host through the user network.
            assert " 0% packet loss" in await b.run(f"ping -c 2 -W 5 {leases[0]}", timeout=60)
            for name, g in (("a", a), ("b", b)):
                await g.run(f"echo from-{name} | nc 10.0.2.2 {port}", timeout=60)
            assert sorted(s.strip() for s in seen) == [b"from-a", b"from-b"]

            # Each guest holds an idle connection to the host; guest a's QEMU is killed. Its
            # connection ends at once (the hub's user network forgets that guest), b's stays.
            held: asyncio.Queue[tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

            async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                await held.put((await r.readline(), r, w))

            holder = await asyncio.start_server(hold, "127.0.0.1", 0)
            hold_port = holder.sockets[0].getsockname()[1]
            conns = {}
            for name, g in (("a", a), ("b", b)):
                await g.run(f"( ( (echo {name}; sleep 600) | nc 10.0.2.2 {hold_port} >/dev/null) & )")
                line, r, w = await asyncio.wait_for(held.get(), 30)
                conns[line.strip()] = (r, w)
            assert a.proc is not None
            a.proc.kill()
            await a.proc.wait()
            assert await asyncio.wait_for(conns[b"a"][0].read(), 5) == b""  # EOF within 5 s
            await asyncio.sleep(1)
            assert not conns[b"b"][0].at_eof()
            assert " 0% packet loss" in await b.run("ping -c 1 -W 5 10.0.2.2", timeout=60)
            for _, w in conns.values():
                w.close()
            holder.close()
        user = daemon.hub_netdevs[0].owner
        assert isinstance(user, UserNetwork)
        assert user.counters()["errors"] == 0
    finally:
        server.close()
        await daemon.close()
