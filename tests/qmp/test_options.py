"""`appliance run`'s -qmp, -qmp-pretty and -mon: what they build, and one-line refusals."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli.run import parse_args, to_config, usage
from appliance.errors import ConfigError
from appliance.qmp.server import QmpSpec
from tests.conftest import needs_kvm
from tests.ports import free_port
from tests.qmp.fakes import FakeMachine


def monitors(*argv: str) -> list[QmpSpec]:
    devices = to_config(parse_args(["-kernel", "/dev/null", *argv])).devices
    return [d for d in devices if isinstance(d, QmpSpec)]


def test_qmp_unix_and_tcp_forms() -> None:
    [u] = monitors("-qmp", "unix:/tmp/x.sock,server=on,wait=off")
    assert (u.chardev.path, u.chardev.server, u.chardev.wait, u.pretty) == (Path("/tmp/x.sock"), True, False, False)
    [t] = monitors("-qmp-pretty", "tcp:127.0.0.1:4444,server,nowait")
    assert (t.chardev.host, t.chardev.port, t.chardev.server, t.chardev.wait, t.pretty) == (
        "127.0.0.1", 4444, True, False, True)
    [c] = monitors("-qmp", "unix:/tmp/y.sock")  # QEMU's default: connect out as a client
    assert not c.chardev.server


def test_mon_refers_to_a_chardev_given_later_on_the_line() -> None:
    [m] = monitors("-mon", "chardev=m0,mode=control,pretty=on",
                   "-chardev", "socket,id=m0,path=/tmp/m.sock,server=on,wait=off")
    assert (m.chardev.path, m.pretty) == ("/tmp/m.sock", True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-qmp", "file:/tmp/q"], "-qmp: 'file:/tmp/q' is not supported"),
        (["-qmp", "tcp:localhost:http,server=on"], "port 'http' is not a number"),
        (["-qmp", "unix:/tmp/q,server=maybe"], "server"),
        (["-mon", "chardev=m0"], "-mon: chardev 'm0' not found"),
        (["-mon", "m0,mode=bogus"], "Parameter 'mode' does not accept value 'bogus'"),
        (["-mon", "chardev=m0,mode=control"], "-mon: chardev 'm0' not found"),
        (["-chardev", "null,id=m0", "-mon", "m0,mode=control"], "a monitor needs a socket"),
        (["-monitor", "pty"], "-monitor: 'pty' is not supported"),
    ],
)
def test_bad_monitor_options_are_refused_by_name(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        monitors(*argv)
    assert message in str(err.value)


def test_help_lists_qmp_and_mon() -> None:
    text = usage()
    assert "  -qmp unix:PATH" in text and "-qmp-pretty" in text
    assert "  -mon [chardev=]ID[,mode=readline|control]" in text and "  -monitor stdio | tcp:" in text


def test_cli_refusal_exits_2_with_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "appliance.cli.main", "run", "-kernel", "/dev/null",
                           "-mon", "chardev=x,mode=bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "value 'bogus'" in proc.stderr


async def test_tcp_monitor_with_wait_on_holds_open_until_a_client_connects() -> None:
    spec = to_config(parse_args(["-kernel", "/dev/null", "-qmp-pretty", "tcp:127.0.0.1:0,server=on"])).devices[0]
    assert isinstance(spec, QmpSpec)
    # Port 0 asks for any free port; read the real one off the server once it listens.
    spec.bind_machine(FakeMachine())
    opening = asyncio.ensure_future(spec.open())
    for _ in range(100):
        if spec.server is not None and spec.server.tcp_ports:
            break
        await asyncio.sleep(0.01)
    assert spec.server is not None
    [port] = spec.server.tcp_ports
    await asyncio.sleep(0.1)
    assert not opening.done()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(opening, 5)
    greeting = json.loads(await reader.readuntil(b"}\r\n"))  # pretty: several lines
    assert greeting["QMP"]["capabilities"] == []
    writer.close()
    await spec.close()


@pytest.mark.parametrize("option", ["-qmp", "-serial", "-monitor"])
def test_tcp_without_a_host_listens_on_every_address(option: str) -> None:
    """QEMU's tcp::PORT (and a socket chardev with port= alone) leaves the host out: a server
    listens on every address. It used to be refused."""
    config = to_config(parse_args(["-kernel", "/dev/null", option, "tcp::4444,server=on,wait=off"]))
    text = repr(config)
    assert "port=4444" in text and "host=''" in text


async def test_tcp_monitor_without_a_host_greets_a_loopback_client() -> None:
    port = free_port()
    spec = to_config(parse_args(["-kernel", "/dev/null", "-qmp", f"tcp::{port},server=on,wait=off"])).devices[0]
    assert isinstance(spec, QmpSpec)
    spec.bind_machine(FakeMachine())
    await spec.open()
    assert spec.server is not None
    assert set(spec.server.tcp_ports) == {port}  # every address: IPv4 and IPv6 alike
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    greeting = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert "QMP" in greeting
    writer.close()
    await spec.close()


async def test_client_mode_monitor_connects_out_and_greets(tmp_path: Path) -> None:
    path = tmp_path / "listener.sock"
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    listener = await asyncio.start_unix_server(lambda r, w: accepted.put_nowait((r, w)), str(path))
    [spec] = monitors("-qmp", f"unix:{path}")
    spec.bind_machine(FakeMachine())
    await spec.open()
    try:
        reader, writer = await asyncio.wait_for(accepted.get(), 5)
        assert "QMP" in json.loads(await reader.readline())
        writer.write(b'{"execute": "qmp_capabilities", "id": "a"}{"execute": "query-name", "id": "b"}')
        assert json.loads(await reader.readline()) == {"return": {}, "id": "a"}
        assert json.loads(await reader.readline()) == {"return": {"name": "fake"}, "id": "b"}
        writer.close()
    finally:
        await spec.close()
        listener.close()


async def test_client_mode_monitor_with_nobody_listening_is_a_config_error(tmp_path: Path) -> None:
    [spec] = monitors("-qmp", f"unix:{tmp_path / 'absent.sock'}")
    spec.bind_machine(FakeMachine())
    with pytest.raises(ConfigError, match="absent.sock"):
        await spec.open()


def test_qmp_on_stdio_takes_the_console_s_place() -> None:
    """``-qmp stdio`` leaves the serial console without a terminal (QEMU's default vc has no
    display either); stdio for both is refused with QEMU's words."""
    [q] = monitors("-display", "none", "-qmp", "stdio")
    assert q.chardev.backend == "stdio"
    [m] = monitors("-chardev", "stdio,id=m0", "-mon", "m0,mode=control")
    assert m.chardev.backend == "stdio"
    assert to_config(parse_args(["-kernel", "/dev/null", "-qmp", "stdio"])).serial is None
    for clash in (["-nographic"], ["-serial", "stdio"]):
        with pytest.raises(ConfigError, match="cannot use stdio by multiple character devices"):
            to_config(parse_args(["-kernel", "/dev/null", "-qmp", "stdio", *clash]))


@needs_kvm
def test_qmp_on_stdio_drives_a_vm_as_qemu_scripts_do() -> None:
    from appliance.kit import paths

    guest = paths().guest_elf
    if not guest.exists():
        pytest.skip("test guest not built (appliance kit build)")
    script = "\n".join(['{"execute":"qmp_capabilities"}', "{'execute':'query-status'}", '{"execute":"quit"}'])
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli.main", "run", "-kernel", str(guest), "-m", "64",
                             "-display", "none", "-qmp", "stdio"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(script + "\n", timeout=60)
    assert proc.returncode == 0, err
    replies = [json.loads(line) for line in out.splitlines()]
    assert "QMP" in replies[0] and replies[1] == {"return": {}}
    assert replies[2]["return"]["status"] == "running"
    assert replies[3]["event"] == "SHUTDOWN" and replies[4] == {"return": {}}
