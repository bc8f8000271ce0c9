"""A net-daemon user-mode network whose QEMU goes away and comes back (real Linux, QEMU TCG).

Network labs restart their VMs all the time: QEMU is killed and started again on
the same vhost-user socket, the guest reboots inside one QEMU, links go down and
up, the daemon itself is restarted under a ``reconnect=1`` chardev. With QEMU's
own ``-netdev user`` (libslirp) the user-mode stack lives and dies with QEMU, so
the host peers of its connections see them end the moment QEMU dies, and the next
QEMU starts from an empty stack. The daemon outlives its front ends, and these
tests hold it to the same standard: host peers hear of a vanished guest at once,
its flows and host sockets go, and the next guest gets the same lease, the
forwards, DNS and downloads.

The daemon runs as a process (the real command line, with a QMP monitor for
``info usernet``). Only loopback services the test starts are contacted; DNS is
checked with a name the daemon answers itself (``gateway``), which is never
forwarded to the host's resolvers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from appliance.kit.build import KitPaths
from appliance.kit.initramfs import READY_LINE
from appliance.kit.tcg import TcgGuest
from tests.conftest import ROOT, needs_qemu
from tests.linux.test_user_net import guest_listens
from tests.ports import free_port

pytestmark = [needs_qemu, pytest.mark.qemu]

MAC = "52:54:00:12:34:56"
OTHER_MAC = "52:54:00:ab:cd:ef"
GUEST_PORT = 7000
# How long a host peer may wait to hear that the guest end of its connection is gone. libslirp
# closes its sockets as QEMU dies; the daemon hears of it from the vhost-user socket as promptly.
END_WITHIN = 5.0
# /proc/net/tcp state codes (include/net/tcp_states.h) of sockets with no connection: LISTEN, CLOSE.
UNCONNECTED = ("0A", "07")


class Guest(TcgGuest):
    """The kit on QEMU q35 with the daemon's export as its NIC and a QMP socket of QEMU's own.

    Without ``-no-reboot``: a guest ``reboot -f`` resets the machine and boots the kit again.
    """

    def __init__(self, sock: Path, qmp: Path, mac: str = MAC, *, reconnect: bool = False) -> None:
        chardev = f"socket,id=c0,path={sock}" + (",reconnect=1" if reconnect else "")
        super().__init__([
            "-chardev", chardev,
            "-netdev", "vhost-user,id=n0,chardev=c0",
            # vectors=0: see tests/linux/test_vhost_user_net.nic_args.
            "-device", f"virtio-net-pci,id=nic0,netdev=n0,mac={mac},vectors=0",
            "-qmp", f"unix:{qmp},server=on,wait=off",
        ], machine="q35")  # fmt: skip
        self.qmp_path = qmp

    def qemu_argv(self, kit: KitPaths) -> list[str]:
        argv = super().qemu_argv(kit)
        argv.remove("-no-reboot")
        return argv

    async def rebooted(self) -> None:
        """``reboot -f`` in the guest; returns once the kit is up again.

        The link goes down first, as ``kit-poweroff`` does it: the kit's 6.1 kernel can spin for
        good in virtio_net's transmit after the shutdown path broke its queues (see
        :data:`appliance.kit.initramfs.KIT_POWEROFF`). The reset the reboot makes is the same.
        """
        await self.write("ip link set eth0 down; reboot -f\n")
        await self.expect(READY_LINE, self.boot_timeout)
        self._shell_ready = False

    async def qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        client = QMPClient("test")
        await client.connect(str(self.qmp_path))
        try:
            return await client.execute(cmd, args)
        finally:
            await client.disconnect()


class NetDaemon:
    """``appliance net-daemon`` with a user netdev (one hostfwd), its export and a QMP monitor."""

    def __init__(self, tmp: Path, fwd_port: int) -> None:
        self.vu = tmp / "vu.sock"
        self.mon = tmp / "qmp.sock"
        self.log = tmp / "daemon.log"
        self.fwd_port = fwd_port
        self.proc: asyncio.subprocess.Process | None = None
        self.client: QMPClient | None = None

    async def start(self) -> None:
        for path in (self.vu, self.mon):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with open(self.log, "a") as log:  # kept for diagnosis
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "appliance.cli.main", "net-daemon",
                "--netdev", f"user,id=u0,hostfwd=tcp:127.0.0.1:{self.fwd_port}-:{GUEST_PORT}",
                "--export", f"type=vhost-user-net,id=e0,netdev=u0,addr.type=unix,addr.path={self.vu}",
                "--chardev", f"socket,id=m0,path={self.mon},server=on,wait=off", "--monitor", "chardev=m0",
                cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        for _ in range(400):  # the monitor is the last socket it opens
            if self.mon.exists():
                break
            assert self.proc.returncode is None, f"net-daemon exited: {self.log.read_text()}"
            await asyncio.sleep(0.025)
        client = QMPClient("test")
        for _ in range(400):  # the file exists a moment before listen()
            try:
                await client.connect(str(self.mon))
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert self.proc.returncode is None, f"net-daemon exited: {self.log.read_text()}"
                await asyncio.sleep(0.025)
        else:
            raise AssertionError("net-daemon's monitor never answered")
        self.client = client

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def usernet(self) -> dict[str, Any]:
        assert self.client is not None
        stats: list[dict[str, Any]] = await self.client.execute("x-appliance-query-usernet")  # type: ignore[assignment]
        return stats[0]

    async def connections(self) -> int:
        """How many front ends the export has served."""
        assert self.client is not None
        nics: list[dict[str, Any]] = await self.client.execute("x-appliance-query-nics")  # type: ignore[assignment]
        return int(nics[0]["connections"])

    async def tcp_flows(self) -> list[dict[str, Any]]:
        """The flow table's TCP connections (the hostfwd listener left out)."""
        return [f for f in await self.flows() if f["proto"].startswith("TCP")]

    async def flows(self) -> list[dict[str, Any]]:
        """The flow table's rows of the guest's (the hostfwd listener left out): TCP, UDP (its
        resolver's ports among them) and ping."""
        return [f for f in (await self.usernet())["flows"] if f["state"] != "LISTEN"]

    async def kill(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.disconnect()
            self.client = None
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.disconnect()
            self.client = None
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def net_daemon(tmp: Path) -> AsyncIterator[NetDaemon]:
    d = NetDaemon(tmp, free_port())
    await d.start()
    try:
        yield d
    finally:
        await d.stop()


def tcp_states_of(pid: int) -> list[str]:
    """The /proc/net/tcp state of every TCP socket process ``pid`` holds (IPv4 and IPv6)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[9] in inodes:
                    states.append(fields[3])
    return states


class Peers:
    """The host side of the test: a web server with one blob, and a sink for guest connections
    that notes how (and when) each one ended."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.accepted: asyncio.Queue[None] = asyncio.Queue()
        self.ended: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        self.servers: list[asyncio.Server] = []
        self.writers: list[asyncio.StreamWriter] = []  # the sink's connections, newest last
        self.web_port = self.sink_port = 0

    async def start(self) -> None:
        web = await asyncio.start_server(self._web, "127.0.0.1", 0)
        sink = await asyncio.start_server(self._sink, "127.0.0.1", 0)
        self.servers = [web, sink]
        self.web_port = web.sockets[0].getsockname()[1]
        self.sink_port = sink.sockets[0].getsockname()[1]

    def close(self) -> None:
        for s in self.servers:
            s.close()

    async def _web(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(self.blob))  # fmt: skip
            w.write(self.blob)
            await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def _sink(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.writers.append(w)
        self.accepted.put_nowait(None)
        how = "eof"
        try:
            while await r.read(1 << 16):
                pass
        except ConnectionError:
            how = "reset"
        self.ended.put_nowait((how, time.monotonic()))
        w.close()


class Stream:
    """A host client reading a stream to its end, noting how much came and how it ended."""

    def __init__(self, r: asyncio.StreamReader) -> None:
        self.total = 0
        self.how = ""
        self.when = 0.0
        self.task = asyncio.create_task(self._read(r))

    async def _read(self, r: asyncio.StreamReader) -> None:
        self.how = "eof"
        try:
            while chunk := await r.read(1 << 16):
                self.total += len(chunk)
        except ConnectionError:
            self.how = "reset"
        self.when = time.monotonic()


async def peer_ended(peers: Peers, who: str) -> tuple[str, float]:
    """How and when the sink's next connection ended, if it does within END_WITHIN."""
    try:
        return await asyncio.wait_for(peers.ended.get(), END_WITHIN)
    except TimeoutError:
        raise AssertionError(f"{who} heard nothing of its connection's end in {END_WITHIN:g} s") from None


async def lease(g: TcgGuest) -> str:
    out = await g.run("udhcpc -i eth0 -n -q -t 5", timeout=60)
    assert "lease 10.0.2.15/24" in out, out
    return out


async def network_works(g: TcgGuest, d: NetDaemon, peers: Peers) -> None:
    """DNS (names the daemon answers itself), a download with its checksum, and a new hostfwd
    connection from a host client to a guest listener."""
    out = await g.run("nslookup gateway 10.0.2.3", timeout=30)
    assert "10.0.2.2" in out.split("gateway", 1)[-1], out
    got = await g.run(f"wget -q -O - http://10.0.2.2:{peers.web_port}/blob | sha256sum", timeout=120)
    assert got.split()[0] == hashlib.sha256(peers.blob).hexdigest()
    await g.run(f"( (echo from-guest | nc -l -p {GUEST_PORT} > /tmp/in; echo NC-DONE) & )")
    await guest_listens(g, GUEST_PORT)
    r, w = await asyncio.open_connection("127.0.0.1", d.fwd_port)
    w.write(b"from-host\n")
    await w.drain()
    assert (await asyncio.wait_for(r.readline(), 30)) == b"from-guest\n"
    w.close()
    await g.expect("NC-DONE", 30)
    assert (await g.run("cat /tmp/in")).strip() == "from-host"


async def gateway_answers(g: TcgGuest) -> None:
    assert ", 0% packet loss" in await g.run("ping -c 1 -W 5 10.0.2.2", check=False)


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what} not within {timeout:g} s"
        await asyncio.sleep(0.1)


async def test_qemu_killed_rebooted_and_relinked_under_one_daemon(tmp_path: Path) -> None:
    """QEMU is killed -9 while a host client streams from the guest through hostfwd and the
    guest holds a connection to a host server: both host peers see their connection end at
    once, and the daemon's flow table and host sockets are empty of them. A new QEMU on the
    same socket, then a reboot inside it, then the link going down and up (in the guest, by
    QEMU's set_link and by the daemon's): each time the guest has 10.0.2.15 again, DNS,
    downloads and forwards. Then a VM with another MAC gets 10.0.2.15 too."""
    peers = Peers(os.urandom(1 << 20))
    await peers.start()
    try:
        async with net_daemon(tmp_path) as d:
            qmp = tmp_path / "qemu-qmp.sock"
            async with Guest(d.vu, qmp) as g:
                await lease(g)
                # Its resolver's port is a UDP row of the flow table, gone with the guest.
                await g.run("nslookup gateway 10.0.2.3", timeout=30)
                # A guest → host connection, idle, and a host → guest one streaming to the host.
                await g.run(f"( (sleep 600 | nc 10.0.2.2 {peers.sink_port} >/dev/null) & )")
                await asyncio.wait_for(peers.accepted.get(), 30)
                await g.run(f"( (nc -l -p {GUEST_PORT} </dev/zero >/dev/null) & )")
                await guest_listens(g, GUEST_PORT)
                r, w = await asyncio.open_connection("127.0.0.1", d.fwd_port)
                stream = Stream(r)

                async def streaming() -> bool:
                    return stream.total > 0

                await wait_for("data through the forward", streaming, 30)
                assert len(await d.tcp_flows()) == 2
                assert g.proc is not None
                g.proc.kill()
                killed = time.monotonic()
                await g.proc.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stream.task), END_WITHIN)
            assert stream.when, f"the hostfwd client heard nothing in {END_WITHIN:g} s (it read {stream.total} bytes)"
            assert stream.when - killed < END_WITHIN
            how, when = await peer_ended(peers, "the host server")
            assert when - killed < END_WITHIN, f"the host server heard {how} {when - killed:.1f} s after"
            w.close()

            async def no_flows() -> bool:
                return not await d.flows()

            await wait_for("an empty flow table", no_flows, 5)
            held = [st for st in tcp_states_of(d.pid) if st not in UNCONNECTED]
            assert not held, f"the daemon still holds connected host sockets (states {held})"

            # A new QEMU on the same socket, the same MAC.
            async with Guest(d.vu, qmp) as g:
                await lease(g)
                await network_works(g, d, peers)
                # A reboot inside this QEMU: the device is reset and its rings started again. The
                # connection the guest held to a host server is not its any more: as with libslirp
                # (which lives on through a guest reboot too) it ends once the server sends on it
                # and the new guest kernel answers with a reset.
                await g.run(f"( (sleep 600 | nc 10.0.2.2 {peers.sink_port} >/dev/null) & )")
                await asyncio.wait_for(peers.accepted.get(), 30)
                await g.rebooted()
                await lease(g)
                peers.writers[-1].write(b"anyone there?\n")
                sent = time.monotonic()
                how, when = await peer_ended(peers, "the host server")
                assert when - sent < END_WITHIN, f"the host server heard {how} {when - sent:.1f} s after"
                await network_works(g, d, peers)
                # The guest's own link down and up. (After each link change a lease and a ping
                # show frames flow both ways; the whole set of checks runs once at the end.)
                await g.run("ip link set eth0 down; sleep 0.5; ip link set eth0 up")
                await lease(g)
                await gateway_answers(g)
                # QEMU's set_link, on the NIC (carrier) and on the vhost-user netdev (which stops
                # and restarts the back end's rings).
                for name in ("nic0", "n0"):
                    await g.qmp("set_link", {"name": name, "up": False})
                    await asyncio.sleep(0.5)
                    await g.qmp("set_link", {"name": name, "up": True})
                    await lease(g)
                    await gateway_answers(g)
                # The daemon's own set_link: frames stop both ways while the link is down, and
                # flow again once it is up. (The guest's carrier stays on: a vhost-user back end has
                # no way to change the config space QEMU's virtio-net shows the guest.)
                assert d.client is not None
                await d.client.execute("set_link", {"name": "e0", "up": False})
                assert "100% packet loss" in await g.run("ping -c 1 -W 1 10.0.2.2", check=False)
                await d.client.execute("set_link", {"name": "e0", "up": True})
                await gateway_answers(g)
                await network_works(g, d, peers)
                # All of that inside one QEMU: the export's second front end.
                assert await d.connections() == 2
                await g.poweroff()
            # Another VM on the socket, with a MAC of its own: as from a new libslirp, it gets
            # 10.0.2.15, where the forward points (the last guest's lease went with its QEMU).
            async with Guest(d.vu, qmp, OTHER_MAC) as g:
                await lease(g)
                await g.poweroff()
    finally:
        peers.close()


async def test_daemon_restarted_under_a_reconnecting_qemu(tmp_path: Path) -> None:
    """The daemon is killed -9 and started again on the same socket; QEMU's ``reconnect=1``
    chardev sets the NIC up again. The host server the guest was connected to sees the
    connection end (the kernel closes the dead daemon's sockets), the guest's connection is
    reset by the new daemon the next time it sends, and the guest gets its lease again,
    DNS, downloads and forwards."""
    peers = Peers(os.urandom(1 << 20))
    await peers.start()
    d = NetDaemon(tmp_path, free_port())
    await d.start()
    try:
        async with Guest(d.vu, tmp_path / "qemu-qmp.sock", reconnect=True) as g:
            await lease(g)
            # busybox nc sends each line it reads from the fifo, and says when it ends.
            # (A write to the fifo once nc is gone must not kill the console shell with SIGPIPE.)
            await g.run(f"trap '' PIPE; mkfifo /tmp/f; ( (nc 10.0.2.2 {peers.sink_port} </tmp/f; echo NC-ENDED) & ); "
                        "exec 3>/tmp/f; echo hello >&3")  # fmt: skip
            await asyncio.wait_for(peers.accepted.get(), 30)
            mark = len(g.output)
            await d.kill()
            killed = time.monotonic()
            how, when = await peer_ended(peers, "the host server")
            assert when - killed < END_WITHIN, f"the host server heard {how} {when - killed:.1f} s after"
            await d.start()

            async def reconnected() -> bool:
                carrier = await g.run("cat /sys/class/net/eth0/carrier", check=False)
                return await d.connections() == 1 and carrier.strip() == "1"

            await wait_for("QEMU's reconnection", reconnected, 30)
            # nc may be gone already: "hello" still unacknowledged when the daemon died is sent
            # again, and reset the same way (then its line is in a command's output above).
            await g.run("echo again >&3", check=False)
            if "NC-ENDED" not in g.output[mark:]:
                await g.expect("NC-ENDED", 30)
            await g.run("exec 3>&-")
            await lease(g)
            await network_works(g, d, peers)
            await g.poweroff()
    finally:
        await d.stop()
        peers.close()
