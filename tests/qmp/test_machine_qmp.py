"""The real qemu.qmp client drives a running test guest through our QMP server.

In-process machines (``Machine`` built from an `appliance run` command line
with ``-qmp``) for the commands, and a real `appliance run` process for the
end of life: SHUTDOWN events and exit status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ConnectError, ExecuteError, QMPClient

from appliance.cli.run import parse_args, to_config
from appliance.kit import paths
from appliance.machine.console import ConsoleTimeout
from appliance.machine.machine import Machine
from tests.conftest import ROOT, needs_kvm, needs_qemu
from tests.machine.guest_replies import ask
from tests.ports import free_port

GUEST = paths().guest_elf
pytestmark = [needs_kvm, pytest.mark.skipif(not GUEST.exists(), reason="test guest not built (appliance kit build)")]

async def ex(client: QMPClient, name: str, args: dict[str, Any] | None = None) -> Any:
    """``client.execute`` typed as what it returns here: plain JSON values."""
    return await client.execute(name, args)


class Vm:
    def __init__(self, vm: Machine, qmp: QMPClient, sock: Path) -> None:
        self.vm = vm
        self.qmp = qmp
        self.sock = sock

    async def guest(self, text: str, reply: str, timeout: float = 20) -> dict[str, str]:
        return await ask(self.vm, text, reply, timeout)


@asynccontextmanager
async def machine(tmp_path: Path, *argv: str) -> AsyncIterator[Vm]:
    sock = tmp_path / "qmp.sock"
    config = to_config(parse_args(["-kernel", str(GUEST), "-qmp", f"unix:{sock},server=on,wait=off", *argv]))
    config.serial = None
    async with Machine(config) as vm:
        await vm.console.expect(r"TESTGUEST-READY[^\n]*\n", timeout=30)
        client = QMPClient("test")
        await client.connect(str(sock))
        try:
            yield Vm(vm, client, sock)
        finally:
            await client.disconnect()
        vm.console.send("poweroff\n")
        assert await asyncio.wait_for(vm.wait(), 20) == 0


async def test_stop_pauses_the_vcpus_and_cont_resumes_them(tmp_path: Path) -> None:
    async with machine(tmp_path) as m:
        assert await ex(m.qmp, "query-status") == {"status": "running", "running": True, "singlestep": False}
        with m.qmp.listener() as events:
            await ex(m.qmp, "stop")
            assert (await asyncio.wait_for(events.get(), 5))["event"] == "STOP"
            assert (await ex(m.qmp, "query-status"))["status"] == "paused"
            # A paused guest does not answer its console...
            m.vm.console.send("echo still-here\n")
            with pytest.raises(ConsoleTimeout):
                await m.vm.console.expect(r"(?m)^still-here", timeout=0.5)
            await ex(m.qmp, "cont")
            assert (await asyncio.wait_for(events.get(), 5))["event"] == "RESUME"
        # ...and answers once it runs again.
        await m.vm.console.expect(r"(?m)^still-here", timeout=10)
        assert (await ex(m.qmp, "query-status"))["running"] is True
        cpus = await ex(m.qmp, "query-cpus-fast")
        assert [c["cpu-index"] for c in cpus] == [0]


async def _qemu_returns(machine_type: str, argv: tuple[str, ...], command: dict[str, Any]) -> Any:
    """What QEMU's own QMP answers ``command`` with, on a PC (never started) made with ``argv``."""
    script = b"".join(json.dumps(c).encode() + b"\n" for c in (
        {"execute": "qmp_capabilities"}, {**command, "id": "asked"}, {"execute": "quit"}))
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-nodefaults", "-display", "none", "-S", "-M", machine_type, *argv, "-qmp", "stdio",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(script), 30)
    [answer] = [msg["return"] for msg in map(json.loads, out.decode().splitlines()) if msg.get("id") == "asked"]
    return answer


@needs_qemu
@pytest.mark.parametrize("smp", ["2", "4,sockets=2", "4,dies=2,threads=2"])
async def test_query_cpus_fast_gives_qemus_topology_and_paths(tmp_path: Path, smp: str) -> None:
    async with machine(tmp_path, "-smp", smp) as m:
        ours = await ex(m.qmp, "query-cpus-fast")
    theirs = await _qemu_returns("q35", ("-smp", smp), {"execute": "query-cpus-fast"})
    # thread-id is each process's own thread.
    assert [{k: v for k, v in c.items() if k != "thread-id"} for c in ours] == [
        {k: v for k, v in c.items() if k != "thread-id"} for c in theirs]
    assert [list(c["props"]) for c in ours] == [list(c["props"]) for c in theirs]


async def test_set_link_down_and_up_is_seen_by_the_guest(tmp_path: Path) -> None:
    async with machine(tmp_path, "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,id=nic0") as m:
        assert (await m.guest("net info", "NET info"))["link"] == "up"
        await ex(m.qmp, "set_link", {"name": "nic0", "up": False})
        assert (await m.guest("net info", "NET info"))["link"] == "down"
        await ex(m.qmp, "set_link", {"name": "n0", "up": True})  # the netdev's name works too
        assert (await m.guest("net info", "NET info"))["link"] == "up"


async def test_nics_without_an_id_have_qemus_names_in_board_order(tmp_path: Path) -> None:
    """QEMU 7.2 names a NIC without an id by its model and a count (virtio-net-pci.0, .1, …), the
    -nic ones first as its board makes them: ``info network`` shows those names and ``set_link``
    takes them."""
    async with machine(tmp_path, "-netdev", "user,id=u0", "-device", "virtio-net-pci,netdev=u0",
                       "-nic", "user,model=virtio,id=n1") as m:
        text = await ex(m.qmp, "human-monitor-command", {"command-line": "info network"})
        lines = text.split("\r\n")
        assert lines[0].startswith("virtio-net-pci.0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56")
        assert lines[1] == " \\ n1: index=0,type=user,net=10.0.2.0,restrict=off"
        assert lines[2].startswith("virtio-net-pci.1: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:57")
        assert lines[3] == " \\ u0: index=0,type=user,net=10.0.2.0,restrict=off"
        await ex(m.qmp, "set_link", {"name": "virtio-net-pci.0", "up": False})
        # QEMU 7.2 prints no carrier state in info network: the line stays as it was.
        assert await ex(m.qmp, "human-monitor-command", {"command-line": "info network"}) == text


async def _qemu_info_network(*argv: str) -> str:
    """QEMU's own ``info network`` for a PC (never started) made with ``argv``."""
    return str(await _qemu_returns("pc", argv, {"execute": "human-monitor-command",
                                                "arguments": {"command-line": "info network"}}))


@needs_qemu
@pytest.mark.parametrize("argv", [("-net", "nic,model=virtio", "-net", "user"),
                                  ("-net", "user", "-net", "nic,model=virtio")])
async def test_info_network_shows_a_net_pair_on_hub_0_as_qemu_does(tmp_path: Path, argv: tuple[str, ...]) -> None:
    async with machine(tmp_path, *argv) as m:
        ours = await ex(m.qmp, "human-monitor-command", {"command-line": "info network"})
    theirs = await _qemu_info_network(*argv)
    # QEMU's anonymous back end is "#net" and a counter of its own; ours counts from 0.
    assert re.sub(r"#net\d+", "#net", ours) == re.sub(r"#net\d+", "#net", theirs)


@needs_qemu
async def test_info_network_lists_a_netdevs_filters_as_qemu_does(tmp_path: Path) -> None:
    argv = ("-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,id=nic0",
            "-object", f"filter-dump,id=f0,netdev=n0,file={tmp_path / 'a.pcap'}",
            "-object", f"filter-dump,id=f1,netdev=n0,file={tmp_path / 'b.pcap'},maxlen=100")
    async with machine(tmp_path, *argv) as m:
        ours = await ex(m.qmp, "human-monitor-command", {"command-line": "info network"})
    theirs = await _qemu_info_network(*argv)
    assert "filters:\r\n  - f0: type=filter-dump," in theirs
    assert ours == theirs


async def test_capture_started_and_stopped_while_running_holds_only_what_passed_between(tmp_path: Path) -> None:
    from scapy.layers.dhcp import DHCP
    from scapy.layers.inet import ICMP
    from scapy.utils import rdpcap

    pcap = tmp_path / "live.pcap"
    async with machine(tmp_path, "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,id=nic0") as m:
        # Traffic before the capture starts...
        await m.guest("net ip 10.0.2.15 10.0.2.2", "NET ip")
        assert (await m.guest("net ping 10.0.2.2 1", "NET ping done"))["received"] == "1"
        await ex(m.qmp, "object-add", {"qom-type": "filter-dump", "id": "cap0", "netdev": "n0",
                                           "file": str(pcap)})
        lease = await m.guest("net dhcp", "NET dhcp")
        assert lease["ip"] == "10.0.2.15"
        await ex(m.qmp, "object-del", {"id": "cap0"})
        # ...and after it stops is not in the file.
        assert (await m.guest("net ping 10.0.2.2 2", "NET ping done"))["received"] == "2"
        with pytest.raises(ExecuteError) as err:
            await ex(m.qmp, "object-del", {"id": "cap0"})
        assert "not found" in str(err.value)
    frames = rdpcap(str(pcap))
    dhcp = [p for p in frames if DHCP in p]
    types: list[Any] = [dict[str, Any](o for o in p[DHCP].options if isinstance(o, tuple))["message-type"]
                       for p in dhcp]
    assert types == [1, 2, 3, 5]  # DISCOVER, OFFER, REQUEST, ACK: both directions
    assert not any(ICMP in p for p in frames)


async def test_capture_from_the_command_line_can_be_stopped_through_qmp(tmp_path: Path) -> None:
    from scapy.layers.dhcp import DHCP
    from scapy.layers.inet import ICMP
    from scapy.utils import rdpcap

    pcap = tmp_path / "cmdline.pcap"
    async with machine(tmp_path, "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
                       "-object", f"filter-dump,id=f0,netdev=n0,file={pcap}") as m:
        await m.guest("net dhcp", "NET dhcp")
        await ex(m.qmp, "object-del", {"id": "f0"})
        assert (await m.guest("net ping 10.0.2.2 2", "NET ping done"))["received"] == "2"
    frames = rdpcap(str(pcap))
    assert sum(DHCP in p for p in frames) == 4
    assert not any(ICMP in p for p in frames)


async def test_malformed_json_gets_an_error_the_session_goes_on_and_the_vm_runs(tmp_path: Path) -> None:
    async with machine(tmp_path) as m:
        loop = asyncio.get_running_loop()
        raw = socket.socket(socket.AF_UNIX)
        raw.setblocking(False)
        await loop.sock_connect(raw, str(m.sock))
        reader, writer = await asyncio.open_unix_connection(sock=raw)
        try:
            assert "QMP" in json.loads(await reader.readline())

            async def send(data: bytes) -> dict[str, Any]:
                writer.write(data)
                return dict(json.loads(await asyncio.wait_for(reader.readline(), 5)))

            assert (await send(b'{"execute": "query-status"}'))["error"]["class"] == "CommandNotFound"
            assert (await send(b'{"execute":"qmp_capabilities"}'))["return"] == {}
            assert (await send(b'{"execute": "stop", "id": 1,}\n'))["error"]["class"] == "GenericError"
            assert (await send(b'{"execute": query-status}'))["error"]["class"] == "GenericError"
            assert (await send(b'"just a string"\n'))["error"]["desc"] == "QMP input must be a JSON object"
            assert (await send(b'{"execute": "query-status", "id": 3}'))["return"]["status"] == "running"
        finally:
            writer.close()
        assert (await m.guest("echo alive", "alive")) == {}


async def test_system_reset_reboots_the_guest_with_a_host_reset_event(tmp_path: Path) -> None:
    async with machine(tmp_path) as m:
        with m.qmp.listener() as events:
            await ex(m.qmp, "system_reset")
            event = await asyncio.wait_for(events.get(), 5)
        assert (event["event"], event["data"]) == ("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
        await m.vm.console.expect(r"TESTGUEST-READY[^\n]*\n", timeout=30)
        assert m.vm.boots == 2


# --- compared with QEMU 7.2 over a raw socket -------------------------------------------------


@asynccontextmanager
async def qemu_process(tmp_path: Path, *argv: str, paused: bool = False) -> AsyncIterator[Path]:
    """QEMU 7.2 (a q35 PC under KVM, no devices but ``argv``'s) with a QMP socket, until the block ends."""
    sock = tmp_path / "qemu-qmp.sock"
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-machine", "q35,accel=kvm", "-nodefaults", "-display", "none",
        *(["-S"] if paused else []), *argv, "-qmp", f"unix:{sock},server=on,wait=off",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(400):
            if sock.exists():
                break
            assert proc.returncode is None, "QEMU did not start"
            await asyncio.sleep(0.05)
        yield sock
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def _said(msg: dict[str, Any]) -> str:
    """One message as the comparisons see it: the event or the reply, with no timestamp."""
    if "event" in msg:
        return f"event {msg['event']} {json.dumps(msg.get('data'), sort_keys=True)}"
    if "error" in msg:
        return f"error {msg['error']['class']} {msg['error']['desc']}"
    return f"return {json.dumps(msg['return'], sort_keys=True)}"


class RawClient:
    """A QMP client that reads line by line, as a shell script would."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    async def line(self) -> bytes:
        """The next line, or b"" once the server has hung up."""
        loop = asyncio.get_running_loop()
        while b"\n" not in self.buf:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 10)
            except ConnectionResetError:
                # QEMU hangs up with a reset when a byte it never read is left (the request's
                # newline); what it sent before is read first all the same.
                data = b""
            if not data:
                line, self.buf = self.buf, b""
                return line
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    async def send(self, obj: dict[str, Any]) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, json.dumps(obj).encode() + b"\n")


async def raw_exchange(sock: Path, requests: list[dict[str, Any]], *, until_eof: bool = False) -> list[list[str]]:
    """What a client reading line by line gets for each request in turn: the events that came
    before its reply, then the reply (and "EOF" after the last one, with ``until_eof``)."""
    with socket.socket(socket.AF_UNIX) as raw:
        raw.setblocking(False)
        await asyncio.get_running_loop().sock_connect(raw, str(sock))
        client = RawClient(raw)
        assert "QMP" in json.loads(await client.line())
        await client.send({"execute": "qmp_capabilities"})
        assert json.loads(await client.line()) == {"return": {}}
        out: list[list[str]] = []
        for request in requests:
            await client.send(request)
            got: list[str] = []
            while not got or got[-1].startswith("event "):
                got.append(_said(json.loads(await client.line())))
            out.append(got)
        if until_eof:
            while line := await client.line():
                out[-1].append(_said(json.loads(line)))
            out[-1].append("EOF")
        return out


@needs_qemu
async def test_system_reset_of_a_paused_vm_leaves_it_in_prelaunch_as_qemus(tmp_path: Path) -> None:
    """QEMU's main loop puts a VM that was not running in prelaunch after a reset: it waits
    for ``cont``, which sends RESUME. The RESET event comes before the command's reply."""
    script: list[dict[str, Any]] = [{"execute": c} for c in
                                    ("stop", "system_reset", "query-status", "stop", "query-status", "cont")]
    async with machine(tmp_path) as m:
        ours = await raw_exchange(m.sock, script)
        # Rebuilt at the reset, the guest boots only once "cont" lets it run.
        await m.vm.console.expect(r"TESTGUEST-READY[^\n]*\n", timeout=30)
        assert m.vm.boots == 2
        assert (await ex(m.qmp, "query-status"))["status"] == "running"
    async with qemu_process(tmp_path) as sock:
        theirs = await raw_exchange(sock, script)
    prelaunch = 'return {"running": false, "singlestep": false, "status": "prelaunch"}'
    assert ours == theirs == [
        ["event STOP null", "return {}"],
        ['event RESET {"guest": false, "reason": "host-qmp-system-reset"}', "return {}"],
        [prelaunch], ["return {}"], [prelaunch],
        ["event RESUME null", "return {}"],
    ]


async def _outcomes(client: QMPClient, requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    out: list[Any] = []
    for name, args in requests:
        try:
            out.append(("ok", await client.execute(name, args)))
        except ExecuteError as err:
            out.append((err.error_class, err.error.error.desc))
    return out


@needs_qemu
async def test_human_monitor_command_checks_cpu_index_as_qemu_does(tmp_path: Path) -> None:
    # One vCPU on both; QEMU reads the index as a C int, so 2**32 is CPU 0.
    requests = [("human-monitor-command", {"command-line": "info kvm", "cpu-index": i})
                for i in (0, 1, 5, -1, 1 << 32)]
    async with machine(tmp_path) as m:
        ours = await _outcomes(m.qmp, requests)
    async with qemu_process(tmp_path, paused=True) as sock:
        client = QMPClient("qemu")
        await client.connect(str(sock))
        try:
            theirs = await _outcomes(client, requests)
        finally:
            await client.disconnect()
    bad = ("GenericError", "Parameter 'cpu-index' expects a CPU number")
    assert ours == theirs == [("ok", "kvm support: enabled\r\n"), bad, bad, bad, ("ok", "kvm support: enabled\r\n")]


def _disk_argv(where: Path) -> list[str]:
    """Disks of every kind query-block tells apart, their images made in ``where``."""
    from appliance.qcow2.create import CreateOptions, build_image

    where.mkdir()
    for name in ("d1.img", "f0.img", "f1.img"):
        with open(where / name, "wb") as f:
            f.truncate(8 << 20)
    (where / "q.qcow2").write_bytes(build_image(CreateOptions(16 << 20)))
    return [
        "-drive", f"file={where / 'd1.img'},format=raw,if=none,id=d1,cache=writethrough",
        "-device", "virtio-rng-pci",
        "-blockdev", f"driver=file,node-name=f0,filename={where / 'f0.img'}",
        "-device", "virtio-blk-pci,drive=f0",
        "-drive", f"file={where / 'q.qcow2'},if=virtio,readonly=on,cache=unsafe",
        "-blockdev", f"driver=file,node-name=f1,filename={where / 'f1.img'}",
        "-blockdev", "driver=raw,node-name=r1,file=f1",
        "-device", "virtio-blk-pci,drive=r1,id=vd1",
        "-device", "virtio-blk-pci,drive=d1,id=blk1",
    ]


@needs_qemu
async def test_query_block_answers_as_qemus(tmp_path: Path) -> None:
    """Names (the drive id or "", the QOM path of the device, with or without an id), the order
    (-drive backends first) and every member QEMU reports, with its values where they are not
    the host's (QEMU's own node names and the bytes a file takes on disk)."""
    async with machine(tmp_path, *_disk_argv(tmp_path / "ours")) as m:
        ours = await ex(m.qmp, "query-block")
    async with qemu_process(tmp_path, *_disk_argv(tmp_path / "qemu"), paused=True) as sock:
        client = QMPClient("qemu")
        await client.connect(str(sock))
        try:
            theirs = await ex(client, "query-block")
        finally:
            await client.disconnect()

    def same(info: dict[str, Any], where: Path) -> dict[str, Any]:
        text = json.dumps(info, sort_keys=True).replace(str(where), "DIR")
        text = re.sub(r'"#block\d+"', '"#blockN"', text)
        return dict(json.loads(re.sub(r'"actual-size": \d+', '"actual-size": 0', text)))

    assert [same(b, tmp_path / "ours") for b in ours] == [same(b, tmp_path / "qemu") for b in theirs]
    assert [(b["device"], b["qdev"]) for b in ours] == [
        ("d1", "/machine/peripheral/blk1/virtio-backend"),
        ("virtio0", "/machine/peripheral-anon/device[2]/virtio-backend"),
        ("", "/machine/peripheral-anon/device[1]/virtio-backend"),
        ("", "/machine/peripheral/vd1/virtio-backend"),
    ]
    assert ours[1]["inserted"]["image"]["virtual-size"] == 16 << 20


# --- `appliance run` ------------------------------------------------------------------


@asynccontextmanager
async def appliance_run(
    tmp_path: Path, *argv: str, booted: bool = True
) -> AsyncIterator[tuple[asyncio.subprocess.Process, QMPClient]]:
    """`appliance run` of the test guest with a QMP monitor, connected once the
    guest is ready (``booted``) or, without waiting for the guest, once the
    monitor listens."""
    sock = tmp_path / "run.sock"
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / ".venv/bin/appliance"), "run", "-kernel", str(GUEST), "-serial", "stdio",
        "-chardev", f"socket,id=mon0,path={sock},server=on,wait=off", "-mon", "chardev=mon0,mode=control",
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    client = QMPClient("run")
    try:
        assert proc.stdout is not None
        if booted:
            await asyncio.wait_for(proc.stdout.readuntil(b"TESTGUEST-READY"), 30)
            await client.connect(str(sock))
        else:
            # The socket file appears at bind(), a moment before listen(): try until it takes us.
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                try:
                    await client.connect(str(sock))
                    break
                except ConnectError:
                    assert proc.returncode is None and asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.05)
        yield proc, client
    finally:
        # The server hangs up when the VM ends; qemu.qmp reports that as the EOF it is.
        with contextlib.suppress(EOFError, ConnectionError):
            await client.disconnect()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_powerdown_then_guest_poweroff_ends_run_with_shutdown_event_and_exit_0(tmp_path: Path) -> None:
    async with appliance_run(tmp_path) as (proc, qmp):
        with qmp.listener() as events:
            await ex(qmp, "system_powerdown")
            assert (await asyncio.wait_for(events.get(), 5))["event"] == "POWERDOWN"
            # The test guest polls and has no power-button handler: it powers off when told.
            assert proc.stdin is not None
            proc.stdin.write(b"poweroff\n")
            event = await asyncio.wait_for(events.get(), 10)
        assert (event["event"], event["data"]) == ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_quit_ends_run_with_host_shutdown_event_and_exit_0(tmp_path: Path) -> None:
    async with appliance_run(tmp_path) as (proc, qmp):
        with qmp.listener() as events:
            assert await ex(qmp, "quit") == {}
            event = await asyncio.wait_for(events.get(), 10)
        assert (event["event"], event["data"]) == ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert not (tmp_path / "run.sock").exists()


@needs_qemu
@pytest.mark.parametrize(("command", "argv", "reason"), [("quit", (), "host-qmp-quit"),
                                                        ("system_reset", ("-no-reboot",), "host-qmp-system-reset")])
async def test_the_shutdown_event_comes_before_the_reply_and_the_hang_up_as_in_qemu(
    tmp_path: Path, command: str, argv: tuple[str, ...], reason: str,
) -> None:
    async with appliance_run(tmp_path, *argv) as (proc, _):
        ours = await raw_exchange(tmp_path / "run.sock", [{"execute": command}], until_eof=True)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    async with qemu_process(tmp_path, *argv) as sock:
        theirs = await raw_exchange(sock, [{"execute": command}], until_eof=True)
    assert ours == theirs == [[f'event SHUTDOWN {{"guest": false, "reason": "{reason}"}}', "return {}", "EOF"]]


async def test_dash_S_holds_the_vcpus_in_prelaunch_until_cont_and_pidfile_lives_as_long_as_the_run(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "run.pid"
    argv = ("-nodefaults", "-no-user-config", "-vga", "none", "-monitor", "none", "-S", "-pidfile", str(pidfile))
    async with appliance_run(tmp_path, *argv, booted=False) as (proc, client):
        assert pidfile.read_text() == f"{proc.pid}\n"
        assert await ex(client, "query-status") == {"status": "prelaunch", "running": False, "singlestep": False}
        # Nothing runs: the guest prints nothing at all before "cont".
        assert proc.stdout is not None
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(proc.stdout.read(1), 0.5)
        with client.listener() as events:
            await ex(client, "cont")
            assert (await asyncio.wait_for(events.get(), 5))["event"] == "RESUME"
        await asyncio.wait_for(proc.stdout.readuntil(b"TESTGUEST-READY"), 30)
        assert (await ex(client, "query-status"))["status"] == "running"
        assert proc.stdin is not None
        proc.stdin.write(b"poweroff\n")
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert not pidfile.exists()


async def _qemu_hmp(
    netdev: str, command: str | list[str], tmp_path: Path, *, nic: bool = True, argv: list[str] | None = None
) -> Any:
    """What QEMU's own monitor answers ``command`` with (a list: each, in turn), for a VM
    (never started) with ``netdev``, and a NIC on it unless ``nic`` is False (``argv``: these
    options instead)."""
    sock = tmp_path / "qemu-qmp.sock"
    if argv is None:
        argv = ["-netdev", netdev, *(["-device", "virtio-net-pci,netdev=n0"] if nic else [])]
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-nodefaults", "-display", "none", "-S", *argv,
        "-qmp", f"unix:{sock},server=on,wait=off",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        client = QMPClient("qemu")
        await client.connect(str(sock))
        try:
            answers = [str(await client.execute("human-monitor-command", {"command-line": c}))
                       for c in ([command] if isinstance(command, str) else command)]
            return answers[0] if isinstance(command, str) else answers
        finally:
            await client.disconnect()
    finally:
        proc.kill()
        await proc.wait()


@needs_qemu
async def test_info_usernet_prints_qemus_table(tmp_path: Path) -> None:
    ours_port, theirs_port = (free_port() for _ in range(2))
    fwd = "hostfwd=tcp:127.0.0.1:{}-:22,hostfwd=udp:127.0.0.1:{}-:53"
    async with machine(tmp_path, "-netdev", "user,id=n0," + fwd.format(ours_port, ours_port),
                       "-device", "virtio-net-pci,netdev=n0") as m:
        ours = await ex(m.qmp, "human-monitor-command", {"command-line": "info usernet"})
    theirs = await _qemu_hmp("user,id=n0," + fwd.format(theirs_port, theirs_port), "info usernet", tmp_path)

    def shape(text: str, port: int) -> list[str]:
        # Descriptor numbers and ports differ from process to process; the layout must not.
        return [re.sub(r"^(  \S+) +\d+ ", r"\1 FD ", line).replace(str(port), "PORT")
                for line in text.split("\r\n")]

    assert shape(ours, ours_port) == shape(theirs, theirs_port)
    assert ours.startswith("Hub -1 (n0):\r\n  Protocol[State]    FD  Source Address")


@needs_qemu
async def test_a_netdev_without_a_nic_is_opened_as_qemu_opens_it(tmp_path: Path) -> None:
    """QEMU opens a -netdev that no NIC uses and only warns: its hostfwd port takes
    connections, info usernet and info network list it, hostfwd_add and set_link reach it."""
    ours_port, theirs_port, added = (free_port() for _ in range(3))
    commands = ["info usernet", "info network", f"hostfwd_add n0 tcp:127.0.0.1:{added}-:80", "set_link n0 off"]
    async with machine(tmp_path, "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{ours_port}-:22") as m:
        ours = [await ex(m.qmp, "human-monitor-command", {"command-line": c}) for c in commands]
        with socket.create_connection(("127.0.0.1", ours_port), timeout=5):
            pass  # the port is bound and listening
        with socket.create_connection(("127.0.0.1", added), timeout=5):
            pass
    theirs = await _qemu_hmp(f"user,id=n0,hostfwd=tcp:127.0.0.1:{theirs_port}-:22",
                             [c.replace(str(added), "0") for c in commands], tmp_path, nic=False)

    def shape(text: str, port: int) -> list[str]:
        return [re.sub(r"^(  \S+) +\d+ ", r"\1 FD ", line).replace(str(port), "PORT")
                for line in text.split("\r\n")]

    assert shape(ours[0], ours_port) == shape(theirs[0], theirs_port)
    assert ours[0].startswith("Hub -1 (n0):\r\n")
    assert ours[1:] == theirs[1:] == ["n0: index=0,type=user,net=10.0.2.0,restrict=off\r\n", "", ""]


@needs_qemu
async def test_a_net_back_end_without_a_nic_is_opened_on_hub_0_as_qemu_opens_it(tmp_path: Path) -> None:
    """``-net user`` with no ``-net nic``: QEMU warns "hub 0 with no nics" and opens the
    back end on the hub all the same."""
    ours_port, theirs_port = free_port(), free_port()
    commands = ["info network", "info usernet"]
    async with machine(tmp_path, "-net", f"user,hostfwd=tcp:127.0.0.1:{ours_port}-:22") as m:
        ours = [await ex(m.qmp, "human-monitor-command", {"command-line": c}) for c in commands]
        with socket.create_connection(("127.0.0.1", ours_port), timeout=5):
            pass
    theirs = await _qemu_hmp("", commands, tmp_path, argv=["-net", f"user,hostfwd=tcp:127.0.0.1:{theirs_port}-:22"])

    def shape(text: str, port: int) -> list[str]:
        text = re.sub(r"#net\d+", "#netN", text).replace(str(port), "PORT")  # QEMU's random names
        return [re.sub(r"^(  \S+) +\d+ ", r"\1 FD ", line) for line in text.split("\r\n")]

    assert shape(ours[0], ours_port) == shape(theirs[0], theirs_port)
    assert shape(ours[1], ours_port) == shape(theirs[1], theirs_port)
    assert ours[0].startswith("hub 0\r\n \\ hub0port0: #net")


@needs_qemu
async def test_user_networks_are_listed_in_their_netdevs_order_as_qemu_lists_them(tmp_path: Path) -> None:
    """QEMU lists user networks (info usernet) in the order their -netdev options came, and
    hostfwd_add without a netdev id goes to the first of them, whatever order the NICs
    take; a -net hub comes first in info network, a NIC-less netdev next, then the NICs."""
    def argv(ports: list[int]) -> list[str]:
        return ["-netdev", f"user,id=a,hostfwd=tcp:127.0.0.1:{ports[0]}-:22",
                "-netdev", f"user,id=b,hostfwd=tcp:127.0.0.1:{ports[1]}-:22",
                "-netdev", f"user,id=c,hostfwd=tcp:127.0.0.1:{ports[2]}-:22",
                "-device", "virtio-net-pci,netdev=b,mac=52:54:00:12:34:57",
                "-device", "virtio-net-pci,netdev=a,mac=52:54:00:12:34:58",
                "-net", "nic,model=virtio-net-pci,macaddr=52:54:00:12:34:59", "-net", "user"]

    ours_ports, theirs_ports = [free_port() for _ in range(4)], [free_port() for _ in range(4)]
    commands = ["info usernet", "info network", "hostfwd_add tcp:127.0.0.1:{}-:80", "info usernet"]
    async with machine(tmp_path, *argv(ours_ports)) as m:
        ours = [await ex(m.qmp, "human-monitor-command", {"command-line": c.format(ours_ports[3])})
                for c in commands]
    theirs = await _qemu_hmp("", [c.format(theirs_ports[3]) for c in commands], tmp_path, argv=argv(theirs_ports))

    def named(text: str) -> str:
        return re.sub(r"#net\d+", "#netN", text)  # QEMU numbers the names it makes at random

    def heads(text: str) -> list[str]:
        return [line for line in named(text).split("\r\n") if line.startswith("Hub ")]

    assert heads(ours[0]) == heads(theirs[0]) == ["Hub -1 (a):", "Hub -1 (b):", "Hub -1 (c):", "Hub 0 (#netN):"]
    assert named(ours[1]) == named(theirs[1])
    assert ours[2] == theirs[2] == ""

    def forwards(text: str, port: int) -> list[str]:
        # The added rule lands in the first network's table (a), as in QEMU.
        table, rows = "", []
        for line in text.split("\r\n"):
            if line.startswith("Hub "):
                table = line
            elif f" {port} " in f" {line} ".replace(f":{port}", f" {port} "):
                rows.append(table)
        return rows

    assert forwards(ours[3], ours_ports[3]) == forwards(theirs[3], theirs_ports[3]) == ["Hub -1 (a):"]


async def test_usernet_counters_and_flows_are_queryable_as_json(tmp_path: Path) -> None:
    port = free_port()
    async with machine(tmp_path, "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
                       "-device", "virtio-net-pci,netdev=n0") as m:
        await m.guest("net dhcp", "NET dhcp")
        [stats] = await ex(m.qmp, "x-appliance-query-usernet")
        assert stats["netdev"] == "n0"
        counters = stats["counters"]
        assert counters["rx_frames"] >= 2 and counters["errors"] == 0  # DISCOVER and REQUEST at least
        assert {"tx_queue_drops", "restricted", "tcp_rst_sent"} <= set(counters)
        [listener] = [f for f in stats["flows"] if f["state"] == "LISTEN"]
        assert (listener["host_port"], listener["guest_port"]) == (port, 22)
        text = (await ex(m.qmp, "x-query-usernet"))["human-readable-text"]
        assert text == await ex(m.qmp, "human-monitor-command", {"command-line": "info usernet"})
