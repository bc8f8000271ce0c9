"""`appliance net-daemon --monitor`: the real qemu.qmp client observes and steers the daemon's NICs.

The daemon runs as a process (``--netdev user`` with a hostfwd, one
vhost-user-net export, a QMP monitor); where a test needs a guest on the
export, the vhost-user front end of tests/vhost_user plays it (shared memfd
RAM, its own rings), sending ARP requests to the user-mode gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from appliance.cli.net_daemon import parse_command_line
from appliance.errors import ConfigError
from appliance.virtio.testing import WRITE, DriverQueue
from appliance.virtio.vhost_user import protocol as p
from tests.conftest import ROOT, needs_qemu
from tests.ports import free_port
from tests.vhost_user.frontend import FrontEnd

GUEST_MAC = bytes.fromhex("525400123456")
HDR = 12  # virtio_net_hdr_v1 (virtio 1.2 §5.1.6): VERSION_1 always has num_buffers


async def ex(client: QMPClient | None, name: str, args: dict[str, Any] | None = None) -> Any:
    assert client is not None
    return await client.execute(name, args)


class Daemon:
    def __init__(self, proc: asyncio.subprocess.Process, qmp: QMPClient | None, tmp: Path, port: int) -> None:
        self.proc = proc
        self.qmp = qmp
        self.tmp = tmp
        self.port = port
        self.vu = tmp / "vu.sock"
        self.mon = tmp / "qmp.sock"


async def _wait_for(path: Path, proc: asyncio.subprocess.Process) -> None:
    for _ in range(400):
        if path.exists():
            return
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.025)
    raise AssertionError(f"net-daemon did not create {path} (exit {proc.returncode})")


@asynccontextmanager
async def daemon(tmp_path: Path, *, chardev: str = "server=on,wait=off", monitor: str = "chardev=m0",
                 netdev_id: str = "u0", client: bool = True, extra: tuple[str, ...] = ()) -> AsyncIterator[Daemon]:
    port = free_port()
    mon = tmp_path / "qmp.sock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "appliance.cli.main", "net-daemon",
        "--netdev", f"user,id={netdev_id},hostfwd=tcp:127.0.0.1:{port}-:22",
        "--export", f"type=vhost-user-net,id=e0,netdev={netdev_id},addr.type=unix,addr.path={tmp_path / 'vu.sock'}",
        "--chardev", f"socket,id=m0,path={mon},{chardev}", "--monitor", monitor, *extra,
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await _wait_for(mon, proc)
        if not client:
            yield Daemon(proc, None, tmp_path, port)
            return
        qmp = QMPClient("test")
        # The socket file exists a moment before listen().
        for attempt in range(40):
            try:
                await qmp.connect(str(mon))
                break
            except Exception:
                if attempt == 39:
                    raise
                await asyncio.sleep(0.025)
        try:
            yield Daemon(proc, qmp, tmp_path, port)
        finally:
            await qmp.disconnect()
    finally:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- a guest on the export ------------------------------------------------------------


def arp_request(target: str = "10.0.2.2") -> bytes:
    """Who has ``target``? asks 10.0.2.15 (RFC 826), behind a zero virtio-net header."""
    eth = b"\xff" * 6 + GUEST_MAC + b"\x08\x06"
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + socket.inet_aton("10.0.2.15")
    arp += bytes(6) + socket.inet_aton(target)
    return bytes(HDR) + eth + arp


class Guest:
    """The front end with one queue pair started: ring 0 receives, ring 1 transmits."""

    def __init__(self, fe: FrontEnd, rx: DriverQueue, tx: DriverQueue) -> None:
        self.fe, self.rx, self.tx = fe, rx, tx
        self.rx_bufs: dict[int, int] = {}

    @classmethod
    async def attach(cls, path: Path) -> Guest:
        fe = await FrontEnd.connect(str(path))
        await fe.negotiate()
        rx = await fe.start_ring(0)
        tx = await fe.start_ring(1)
        g = cls(fe, rx, tx)
        for _ in range(8):
            g.post_rx()
        fe.kick(0)
        return g

    def post_rx(self) -> None:
        addr = self.fe.alloc(2048)
        head = self.rx.add_chain([(addr, 2048, WRITE)])
        self.rx_bufs[head] = addr

    async def status(self) -> int:
        """The config space's status field (§5.1.4), as a front end reads it with GET_CONFIG."""
        body = await self.fe.call(p.Request.GET_CONFIG, p.config(0, 8))
        return int.from_bytes(body[12 + 6:12 + 8], "little")

    async def send(self, frame: bytes) -> None:
        addr = self.fe.alloc(len(frame))
        self.fe.mem.write(addr, frame)
        self.tx.add_chain([(addr, len(frame), 0)])
        self.fe.kick(1)
        await self.fe.wait_call(1)
        assert [length for _, length in self.tx.used()] == [0]

    def received(self) -> list[bytes]:
        out = []
        for head, length in self.rx.used():
            out.append(self.fe.mem.read(self.rx_bufs.pop(head), length)[HDR:])
            self.post_rx()
        self.fe.kick(0)
        return out

    async def arp_replies(self, wait: float) -> list[bytes]:
        """The ARP replies received within ``wait`` seconds (returning at the first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            got = [f for f in self.received() if f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02"]
            if got or loop.time() > deadline:
                return got
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self.fe.close()


# --- tests ----------------------------------------------------------------------------


@needs_qemu
async def test_info_usernet_prints_qemus_table(tmp_path: Path) -> None:
    from tests.qmp.test_machine_qmp import _qemu_hmp

    async with daemon(tmp_path, netdev_id="n0") as d:
        ours = await ex(d.qmp, "human-monitor-command", {"command-line": "info usernet"})
        assert ours == (await ex(d.qmp, "x-query-usernet"))["human-readable-text"]
        port = d.port
    theirs_port = free_port()
    theirs = await _qemu_hmp(f"user,id=n0,hostfwd=tcp:127.0.0.1:{theirs_port}-:22", "info usernet", tmp_path)

    def shape(text: str, port: int) -> list[str]:
        # Descriptor numbers and ports differ from process to process; the layout must not.
        return [re.sub(r"^(  \S+) +\d+ ", r"\1 FD ", line).replace(str(port), "PORT")
                for line in text.split("\r\n")]

    assert shape(ours, port) == shape(theirs, theirs_port)


@needs_qemu
async def test_help_and_info_network_answer_as_qemus(tmp_path: Path) -> None:
    """The daemon's usage errors point at ``help hostfwd_add``: it answers with QEMU's line."""
    from tests.qmp.test_machine_qmp import _qemu_hmp

    # Unknown commands are named as QEMU names them: the line up to the end of the name.
    like_qemu = ("help hostfwd_add", "help hostfwd_remove", "foo bar", "  foo/x bar", "info  nothing x",
                 "quit x", "set_link")
    async with daemon(tmp_path, netdev_id="n0") as d:
        hmp = {c: await ex(d.qmp, "human-monitor-command", {"command-line": c})
               for c in ("help", "info network", "help stop", "info", *like_qemu)}
    assert [hmp[c] for c in like_qemu] == await _qemu_hmp("user,id=n0", list(like_qemu), tmp_path)
    assert hmp["foo bar"] == "unknown command: 'foo'\r\n"
    listed = {line.split()[0] for line in hmp["help"].split("\r\n") if line}
    assert {"hostfwd_add", "hostfwd_remove", "info", "set_link", "quit|q", "help|?"} <= listed
    assert "stop|s" not in listed and hmp["help stop"] == "unknown command: 'stop'\r\n"  # no run states here
    # Bare "info" lists its subcommands, as QEMU's does; only the ones the daemon has.
    assert [ln.split()[1] for ln in hmp["info"].split("\r\n") if ln] == ["network", "usernet", "version"]
    lines = hmp["info network"].split("\r\n")
    assert re.fullmatch(r"e0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:[0-9a-f:]{8}", lines[0]), lines
    assert lines[1] == " \\ n0: index=0,type=user,net=10.0.2.0,restrict=off", lines


async def test_info_usernet_lists_the_hostfwd_listener(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        text = await ex(d.qmp, "human-monitor-command", {"command-line": "info usernet"})
    lines = text.split("\r\n")
    assert lines[:2] == ["Hub -1 (u0):",
                         "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ"]
    assert re.fullmatch(rf"  TCP\[HOST_FORWARD\] +\d+ +127\.0\.0\.1 +{d.port} +10\.0\.2\.15 +22 +0 +0", lines[2])


async def test_counters_flows_and_nic_stats_as_json_and_unknown_commands_refused(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        guest = await Guest.attach(d.vu)
        try:
            await guest.send(arp_request())
            assert len(await guest.arp_replies(5)) == 1
        finally:
            guest.close()
        [stats] = await ex(d.qmp, "x-appliance-query-usernet")
        assert stats["netdev"] == "u0"
        assert stats["counters"]["arp_replies"] == 1 and stats["counters"]["errors"] == 0
        assert {"tx_queue_drops", "restricted", "tcp_rst_sent"} <= set(stats["counters"])
        [listener] = [f for f in stats["flows"] if f["state"] == "LISTEN"]
        assert (listener["host_port"], listener["guest_port"]) == (d.port, 22)
        [nic] = await ex(d.qmp, "x-appliance-query-nics")
        assert (nic["id"], nic["netdev"], nic["path"], nic["link-up"]) == ("e0", "u0", str(d.vu), True)
        assert nic["queues"][0]["tx_frames"] == 1 and nic["queues"][0]["rx_frames"] == 1
        names = {c["name"] for c in await ex(d.qmp, "query-commands")}
        assert {"set_link", "object-add", "object-del", "human-monitor-command", "x-query-usernet",
                "x-appliance-query-usernet", "quit", "query-version"} <= names
        assert "stop" not in names
        with pytest.raises(ExecuteError) as err:
            await ex(d.qmp, "stop")
        assert err.value.error_class == "CommandNotFound"
        assert err.value.error.error.desc == "The command stop has not been found"
        with pytest.raises(ExecuteError) as err:
            await ex(d.qmp, "set_link", {"name": "nope", "up": False})
        assert (err.value.error_class, err.value.error.error.desc) == ("DeviceNotFound", "Device 'nope' not found")
        assert await ex(d.qmp, "human-monitor-command", {"command-line": "info nothing"}) == \
            "unknown command: 'info nothing'\r\n"
        # No vCPUs to name: QEMU's answer for a machine without them.
        with pytest.raises(ExecuteError) as err:
            await ex(d.qmp, "human-monitor-command", {"command-line": "info version", "cpu-index": 0})
        assert err.value.error.error.desc == "Parameter 'cpu-index' expects a CPU number"
        assert (await ex(d.qmp, "query-version"))["qemu"]["major"] == 7


async def test_set_link_clears_the_status_bit_and_drops_frames_until_up_again(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        guest = await Guest.attach(d.vu)
        try:
            assert await guest.status() & 1  # VIRTIO_NET_S_LINK_UP
            await guest.send(arp_request())
            assert len(await guest.arp_replies(5)) == 1

            # By netdev name, as QEMU's set_link takes it too.
            await ex(d.qmp, "set_link", {"name": "u0", "up": False})
            assert await guest.status() & 1 == 0
            await guest.send(arp_request())
            assert await guest.arp_replies(0.3) == []
            [nic] = await ex(d.qmp, "x-appliance-query-nics")
            assert nic["link-up"] is False and nic["link-down-tx-dropped"] == 1
            [stats] = await ex(d.qmp, "x-appliance-query-usernet")
            assert stats["counters"]["arp_replies"] == 1  # the stack never saw the request

            # By export (device) name, through the human monitor.
            assert await ex(d.qmp, "human-monitor-command", {"command-line": "set_link e0 on"}) == ""
            assert await guest.status() & 1
            await guest.send(arp_request())
            assert len(await guest.arp_replies(5)) == 1
        finally:
            guest.close()


def _pcap_frames(data: bytes) -> list[bytes]:
    magic, = struct.unpack_from("<I", data)
    assert magic == 0xA1B2C3D4
    frames, off = [], 24
    while off < len(data):
        _, _, incl, _ = struct.unpack_from("<IIII", data, off)
        frames.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return frames


async def test_filter_dump_added_and_deleted_while_running_holds_only_what_passed_between(tmp_path: Path) -> None:
    pcap = tmp_path / "live.pcap"
    async with daemon(tmp_path) as d:
        guest = await Guest.attach(d.vu)
        try:
            await guest.send(arp_request("10.0.2.3"))
            assert len(await guest.arp_replies(5)) == 1
            await ex(d.qmp, "object-add", {"qom-type": "filter-dump", "id": "f0", "netdev": "u0", "file": str(pcap)})
            with pytest.raises(ExecuteError, match="duplicate"):
                await ex(d.qmp, "object-add", {"qom-type": "filter-dump", "id": "f0", "netdev": "u0",
                                               "file": str(tmp_path / "other.pcap")})
            await guest.send(arp_request())
            assert len(await guest.arp_replies(5)) == 1
            await ex(d.qmp, "object-del", {"id": "f0"})
            await guest.send(arp_request("10.0.2.3"))
            assert len(await guest.arp_replies(5)) == 1
            with pytest.raises(ExecuteError, match="object 'f0' not found"):
                await ex(d.qmp, "object-del", {"id": "f0"})
        finally:
            guest.close()
    request, reply = _pcap_frames(pcap.read_bytes())
    assert request == arp_request()[HDR:]
    assert reply[12:14] == b"\x08\x06" and reply[20:22] == b"\x00\x02"
    assert reply[28:32] == socket.inet_aton("10.0.2.2")  # the sender: the gateway, not 10.0.2.3


async def test_capture_from_the_command_line_is_stopped_by_object_del(tmp_path: Path) -> None:
    pcap = tmp_path / "cli.pcap"
    async with daemon(tmp_path, extra=("--object", f"filter-dump,id=f1,netdev=u0,file={pcap}")) as d:
        guest = await Guest.attach(d.vu)
        try:
            await guest.send(arp_request())
            assert len(await guest.arp_replies(5)) == 1
            await ex(d.qmp, "object-del", {"id": "f1"})
            size = pcap.stat().st_size
            await guest.send(arp_request())
            assert len(await guest.arp_replies(5)) == 1
            assert pcap.stat().st_size == size
            with pytest.raises(ExecuteError, match="Parameter 'netdev' expects a network backend id"):
                await ex(d.qmp, "object-add", {"qom-type": "filter-dump", "id": "f2", "netdev": "nope",
                                               "file": str(tmp_path / "x.pcap")})
        finally:
            guest.close()
    assert len(_pcap_frames(pcap.read_bytes())) == 2


@pytest.mark.parametrize(("chardev", "monitor"), [
    ("server=on,wait=off", "chardev=m0,mode=control"),
    ("server,nowait", "m0,pretty=on"),  # QEMU's spelling before 6.0; chardev= implied
])
async def test_quit_replies_exits_0_and_removes_the_sockets(tmp_path: Path, chardev: str, monitor: str) -> None:
    async with daemon(tmp_path, chardev=chardev, monitor=monitor, client=False) as d:
        assert d.vu.exists()
        # Raw JSON: qemu.qmp reads neither indented replies nor a reply racing the hang-up.
        reader, writer = await asyncio.open_unix_connection(str(d.mon))
        dec = json.JSONDecoder()
        buf = ""
        raw: list[str] = []

        async def message() -> dict[str, Any]:
            nonlocal buf
            while True:
                with contextlib.suppress(ValueError):
                    obj, end = dec.raw_decode(buf.lstrip())
                    buf = buf.lstrip()[end:]
                    return dict(obj)
                chunk = await asyncio.wait_for(reader.read(4096), 5)
                assert chunk, "the monitor hung up before replying"
                buf += chunk.decode()
                raw.append(chunk.decode())

        assert "QMP" in await message()
        assert ('\n    "QMP"' in raw[0]) == ("pretty=on" in monitor)
        for name in ("qmp_capabilities", "quit"):
            writer.write(json.dumps({"execute": name, "id": name}).encode())
            assert await message() == {"return": {}, "id": name}
        assert await asyncio.wait_for(d.proc.wait(), 10) == 0
        assert await reader.read() == b""
        writer.close()
        assert d.proc.stderr is not None
        assert b"Traceback" not in await d.proc.stderr.read()
    assert not d.vu.exists() and not d.mon.exists()


async def test_tcp_monitor_and_hmp_quit(tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "appliance.cli.main", "net-daemon", "--netdev", "user,id=u0",
        "--export", f"type=vhost-user-net,id=e0,netdev=u0,addr.type=unix,addr.path={tmp_path / 'vu.sock'}",
        "--chardev", f"socket,id=m0,host=127.0.0.1,port={port},server=on,wait=off", "--monitor", "m0",
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await _wait_for(tmp_path / "vu.sock", proc)
        qmp = QMPClient("tcp")
        for attempt in range(80):
            try:
                await qmp.connect(("127.0.0.1", port))
                break
            except Exception:
                if attempt == 79:
                    raise
                await asyncio.sleep(0.025)
        assert await ex(qmp, "set_link", {"name": "e0", "up": False}) == {}
        with contextlib.suppress(EOFError, ConnectionError):
            await ex(qmp, "human-monitor-command", {"command-line": "quit"})
        with contextlib.suppress(EOFError, ConnectionError):
            await qmp.disconnect()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert not (tmp_path / "vu.sock").exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(("argv", "message"), [
    (["--monitor", "m9"], 'chardev "m9" not found'),
    (["--chardev", "socket,id=m0,path=/tmp/x,server=on,wait=off", "--monitor", "m0,mode=readline"],
     "Only QMP is supported"),
    (["--chardev", "file,id=m0,path=/tmp/x"], "backend 'file' is not supported"),
    (["--chardev", "socket,id=m0,path=/tmp/x,server=on,wait=off", "--monitor", "m0", "--monitor", "m0"],
     "Device 'm0' is in use"),
    (["--chardev", "socket,id=m0,path=/tmp/x,server=on,wait=off", "--monitor", "m0,pretty=maybe"], "pretty"),
])
def test_bad_monitor_options_are_refused_by_name(argv: list[str], message: str) -> None:
    export = ["--netdev", "user,id=u0", "--export", "type=vhost-user-net,id=e0,netdev=u0,addr.type=unix,addr.path=p"]
    with pytest.raises(ConfigError, match=message):
        parse_command_line(export + argv)


def test_help_names_the_monitor_options() -> None:
    r = subprocess.run([sys.executable, "-m", "appliance.cli.main", "net-daemon", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for word in ("--chardev socket,id=ID,path=PATH", "--monitor [chardev=]ID[,mode=control][,pretty=on|off]",
                 "set_link", "x-appliance-query-usernet", "x-appliance-query-nics", "quit"):
        assert word in r.stdout


def test_monitor_options_parse() -> None:
    a = parse_command_line(["--netdev", "user,id=u0",
                            "--export", "type=vhost-user-net,id=e0,netdev=u0,addr.type=unix,addr.path=p",
                            "--chardev", "socket,id=m0,path=/tmp/q.sock,server,nowait",
                            "--monitor=chardev=m0,pretty=on"])
    cd = a.chardevs["m0"]
    assert (cd.path, cd.server, cd.wait) == ("/tmp/q.sock", True, False)
    assert a.monitors == [("m0", True)]


async def test_a_hubs_user_network_is_observed_and_steered_from_the_monitor(tmp_path: Path) -> None:
    """``--netdev hubport``: info network lists the hub with its exports and back end, the user
    network behind the hub is in info usernet (as "Hub 0") and takes hostfwd_add, and set_link
    takes the ports' names."""
    mon, port = tmp_path / "qmp.sock", free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "appliance.cli.main", "net-daemon",
        "--netdev", "user,id=u", "--netdev", "hubport,id=up,hubid=0,netdev=u",
        "--netdev", "hubport,id=pa,hubid=0", "--netdev", "hubport,id=pb,hubid=0",
        "--export", f"type=vhost-user-net,id=ea,netdev=pa,addr.type=unix,addr.path={tmp_path / 'a.sock'}",
        "--export", f"type=vhost-user-net,id=eb,netdev=pb,addr.type=unix,addr.path={tmp_path / 'b.sock'}",
        "--chardev", f"socket,id=m0,path={mon},server=on,wait=off", "--monitor", "chardev=m0",
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    qmp = QMPClient("test")
    try:
        await _wait_for(mon, proc)
        await asyncio.sleep(0.1)  # the socket file exists a moment before listen()
        await qmp.connect(str(mon))

        async def hmp(line: str) -> str:
            return str(await qmp.execute("human-monitor-command", {"command-line": line}))

        network = (await hmp("info network")).split("\r\n")
        assert network[0] == "hub 0"
        assert network[1].startswith(" \\ pb: eb: index=0,type=nic,model=virtio-net-pci,macaddr=")
        assert network[2].startswith(" \\ pa: ea: index=0,type=nic")
        assert network[3] == " \\ up: u: index=0,type=user,net=10.0.2.0,restrict=off"
        assert await hmp(f"hostfwd_add u tcp:127.0.0.1:{port}-:22") == ""
        usernet = await hmp("info usernet")
        assert usernet.startswith("Hub 0 (u):\r\n") and f"{port}" in usernet
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the forward listens; no guest answers behind it
        for name in ("u", "up", "pa", "ea"):
            await qmp.execute("set_link", {"name": name, "up": False})
            await qmp.execute("set_link", {"name": name, "up": True})
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
