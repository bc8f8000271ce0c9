"""Hubs side by side with qemu-system-x86_64 7.2: the same command lines give the same
warnings, the same ``info network`` and ``info usernet``, and the same refusals.

QEMU's default NIC for ``-net nic`` on a PC is e1000; these lines ask for virtio-net so that
both name their NICs alike.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from appliance.cli.run import parse_args, to_config
from appliance.errors import ApplianceError
from tests.conftest import needs_kvm, needs_qemu
from tests.qmp.test_machine_qmp import GUEST, _qemu_hmp, ex, machine

QEMU = "qemu-system-x86_64"
_QUIT = b"".join(json.dumps(c).encode() + b"\n" for c in ({"execute": "qmp_capabilities"}, {"execute": "quit"}))

LINES = [
    "-net nic,model=virtio -net nic,model=virtio -net user",
    "-net user -net nic,model=virtio -net user,id=u2 -net nic,model=virtio",
    "-netdev hubport,id=h0,hubid=1 -device virtio-net-pci,netdev=h0 -netdev user,id=u "
    "-netdev hubport,id=h1,hubid=1,netdev=u -netdev hubport,id=h2,hubid=1",
    "-device virtio-net-pci",
    "-device virtio-net-pci,id=lonely",
    "-netdev hubport,id=h0,hubid=2 -netdev hubport,id=h1,hubid=1 -net nic,model=virtio -net user",
    "-netdev hubport,id=h0,hubid=0 -net nic,model=virtio -net user,id=x",
    "-net user -net user",
    "-net nic,model=virtio",
    "-netdev hubport,id=h0,hubid=-1",
    """-netdev '{"type":"hubport","id":"h0","hubid":3}'""",
    # QEMU makes JSON -netdevs first: a hub port finds one written after it, and warns in that order.
    """-netdev hubport,id=h,hubid=1,netdev=u -netdev '{"type":"user","id":"u"}'""",
    """-netdev hubport,id=a,hubid=1 -netdev '{"type":"hubport","id":"b","hubid":1}'""",
    # -nic NICs are made before -net nic ones: their names and MACs come first.
    "-net nic,model=virtio -net user -nic user,model=virtio",
    "-netdev user,id=u -netdev hubport,id=h0,hubid=0x10,netdev=u",
    "-nic user,model=virtio -net nic,model=virtio",
    "-nic hubport,hubid=0,model=virtio -net user",
    # A -net nic's id names its option, not its NIC.
    "-net nic,model=virtio,id=n1 -net user",
    # qdev's MAC property takes a multicast address.
    "-device virtio-net-pci,mac=01:00:00:00:00:01",
]


def _argv(line: str) -> list[str]:
    return shlex.split(line)  # a JSON option is one quoted word


def _qemu(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([QEMU, "-nodefaults", "-display", "none", "-S", *argv, "-qmp", "stdio"],
                          input=_QUIT, capture_output=True, timeout=30)


def _norm(text: str) -> str:
    return re.sub(r"#net\d+", "#netN", text)  # the names QEMU makes up for -net back ends


@needs_qemu
@pytest.mark.parametrize("line", LINES)
def test_hub_warnings_are_qemus(line: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _argv(line)
    theirs = [ln.split(": ", 1)[1] for ln in _qemu(argv).stderr.decode().splitlines() if ": warning: " in ln]
    to_config(parse_args(["-kernel", "/dev/null", *argv]))
    ours = [ln.split(": ", 1)[1] for ln in capsys.readouterr().err.splitlines()]
    assert ours == theirs


@needs_kvm
@needs_qemu
@pytest.mark.skipif(not GUEST.exists(), reason="test guest not built (appliance kit build)")
@pytest.mark.parametrize("line", LINES)
async def test_info_network_and_usernet_are_qemus(line: str, tmp_path: Path) -> None:
    argv = _argv(line)
    commands = ["info network", "info usernet"]
    async with machine(tmp_path, *argv) as m:
        ours = [await ex(m.qmp, "human-monitor-command", {"command-line": c}) for c in commands]
    theirs = await _qemu_hmp("", commands, tmp_path, argv=argv)
    assert [_norm(t) for t in ours] == [_norm(t) for t in theirs]


REFUSED = [
    "-netdev hubport,id=h0",
    "-netdev hubport,hubid=1",
    "-netdev hubport,id=h0,hubid=abc",
    "-netdev hubport,id=h0,hubid=",
    "-netdev hubport,id=h0,hubid=4294967296",
    "-netdev hubport,id=h0,hubid=-2147483649",
    "-netdev hubport,id=h0,hubid=0,netdev=nope",
    "-netdev hubport,id=h0,hubid=0,netdev=",
    "-netdev hubport,id=h0,hubid=0,netdev=u -netdev user,id=u",
    "-netdev user,id=u -netdev hubport,id=h0,hubid=0,netdev=u,foo=1",
    "-net hubport,hubid=0",
    "-device virtio-net-pci,netdev=",
    "-netdev user,id=u -netdev hubport,id=h0,hubid=0,netdev=u -device virtio-net-pci,netdev=u",
    "-netdev hubport,id=h0,hubid=0 -device virtio-net-pci,netdev=h0 -device virtio-net-pci,netdev=h0",
    "-netdev hubport,id=n0,hubid=0,netdev=n0",
    "-device virtio-net-pci,netdev=h0",
    "-nic user,model=virtio,id=h0 -nic user,model=virtio,id=h0",
    "-netdev user,id=h1 -net nic,model=virtio,id=h1",
    "-net nic,model=virtio,id=h1 -netdev user,id=h1",
    "-device virtio-net-pci,mac=zz:00:00:00:00:00",
    "-nic user,model=virtio,mac=zz:00:00:00:00:00",
    "-nic user,model=virtio,mac=01:00:00:00:00:01",
    "-net nic,model=virtio,macaddr=52:54:00:12:34",
    "-net nic,model=virtio,macaddr=01:00:00:00:00:01",
]


@needs_qemu
@pytest.mark.parametrize("line", REFUSED)
def test_hub_refusals_give_qemus_reason(line: str) -> None:
    argv = _argv(line)
    qemu = _qemu(argv)
    assert qemu.returncode == 1, qemu
    reason = qemu.stderr.decode().splitlines()[-1].split(": ", 2)[-1]
    with pytest.raises(ApplianceError) as err:
        to_config(parse_args(["-kernel", "/dev/null", *argv]))
    assert str(err.value).endswith(": " + reason), (line, reason, str(err.value))


HUB_1 = ["-netdev", "hubport,id=p0,hubid=1", "-device", "virtio-net-pci,netdev=p0",
         "-netdev", "user,id=u", "-netdev", "hubport,id=p1,hubid=1,netdev=u",
         "-netdev", "hubport,id=p2,hubid=1"]


@needs_kvm
@needs_qemu
@pytest.mark.skipif(not GUEST.exists(), reason="test guest not built (appliance kit build)")
async def test_set_link_takes_hub_ports_and_cuts_a_back_end_off_its_hub(tmp_path: Path) -> None:
    """QEMU's set_link takes every port's name, the peerless one's too. A back end set down
    neither sends to the hub nor is sent anything: the guest's ping of the gateway goes
    unanswered until it is up again."""
    from qemu.qmp import ExecuteError

    from tests.qmp.test_machine_qmp import qemu_process

    names = ["p0", "p1", "p2", "u", "virtio-net-pci.0", "nope"]

    async def answers(client: object) -> list[str]:
        out = []
        for name in names:
            try:
                await client.execute("set_link", {"name": name, "up": True})  # type: ignore[attr-defined]
                out.append("ok")
            except ExecuteError as err:
                out.append(str(err.error.error.desc))
        return out

    from qemu.qmp import QMPClient

    async with qemu_process(tmp_path, *HUB_1, paused=True) as sock:
        client = QMPClient("qemu")
        await client.connect(str(sock))
        theirs = await answers(client)
        await client.disconnect()
    async with machine(tmp_path, *HUB_1) as m:
        assert await answers(m.qmp) == theirs == ["ok"] * 5 + ["Device 'nope' not found"]
        assert (await m.guest("net dhcp", "NET dhcp"))["ip"] == "10.0.2.15"
        await ex(m.qmp, "set_link", {"name": "u", "up": False})
        m.vm.console.send("net ping 10.0.2.2 1\n")
        await m.vm.console.expect(r"ERR net ping: no ARP reply from 10\.0\.2\.2", timeout=20)
        await ex(m.qmp, "set_link", {"name": "p1", "up": True})  # the port's own link: u stays down
        m.vm.console.send("net ping 10.0.2.2 1\n")
        await m.vm.console.expect(r"ERR net ping: no ARP reply from 10\.0\.2\.2", timeout=20)
        await ex(m.qmp, "set_link", {"name": "u", "up": True})
        assert (await m.guest("net ping 10.0.2.2 1", "NET ping done"))["received"] == "1"


@needs_kvm
@needs_qemu
@pytest.mark.skipif(not GUEST.exists(), reason="test guest not built (appliance kit build)")
async def test_set_link_on_a_net_pair_follows_which_side_is_named(tmp_path: Path) -> None:
    """``-net nic -net user`` (a straight link here, hub 0 in QEMU): both hub port names are
    taken. The NIC's port, or the NIC, takes its carrier down; the back end's port, or the back
    end, only stops the frames (QEMU changes a NIC's link only when the named client's peer is
    that NIC, and the back end's peer is a hub port)."""
    from qemu.qmp import QMPClient

    from tests.qmp.test_machine_qmp import qemu_process

    pair = ["-net", "nic,model=virtio", "-net", "user,id=u"]
    names = ["hub0port0", "hub0port1", "u", "virtio-net-pci.0"]
    async with qemu_process(tmp_path, *pair, paused=True) as sock:
        client = QMPClient("qemu")
        await client.connect(str(sock))
        for name in names:
            await client.execute("set_link", {"name": name, "up": True})  # each taken, or this raises
        await client.disconnect()

    async def cut() -> None:
        m.vm.console.send("net ping 10.0.2.2 1\n")
        await m.vm.console.expect(r"ERR net ping: no ARP reply from 10\.0\.2\.2", timeout=20)

    async with machine(tmp_path, *pair) as m:
        assert (await m.guest("net dhcp", "NET dhcp"))["ip"] == "10.0.2.15"
        for far in ("hub0port1", "u"):
            await ex(m.qmp, "set_link", {"name": far, "up": False})
            assert (await m.guest("net info", "NET info"))["link"] == "up"
            await cut()
            await ex(m.qmp, "set_link", {"name": far, "up": True})
            assert (await m.guest("net ping 10.0.2.2 1", "NET ping done"))["received"] == "1"
        for near in ("hub0port0", "virtio-net-pci.0"):
            await ex(m.qmp, "set_link", {"name": near, "up": False})
            assert (await m.guest("net info", "NET info"))["link"] == "down"
            await ex(m.qmp, "set_link", {"name": near, "up": True})
            assert (await m.guest("net info", "NET info"))["link"] == "up"


CROSS_GROUP_DUPLICATES = [
    "-net user,id=h1 -netdev user,id=h1",
    "-nic user,model=virtio,id=h0 -netdev user,id=h0",
    "-netdev user,id=h0 -nic user,model=virtio,id=h0",
    """-netdev user,id=h0 -netdev '{"type":"user","id":"h0"}'""",
    """-netdev '{"type":"user","id":"h0"}' -netdev '{"type":"user","id":"h0"}'""",
    "-netdev user,id=h0 -netdev dgram,id=h0,local.type=inet,local.host=127.0.0.1,local.port=0,"
    "remote.type=inet,remote.host=127.0.0.1,remote.port=9",
]


@needs_qemu
@pytest.mark.parametrize("line", CROSS_GROUP_DUPLICATES)
def test_an_id_shared_across_option_kinds_is_blamed_on_the_option_qemu_blames(line: str) -> None:
    """Two options of one kind clash as QEMU reads them ("for netdev"); across kinds, or with
    a JSON, stream or dgram -netdev, QEMU finds the clash as it makes the second netdev, in its
    own order, and names that option."""
    argv = _argv(line)
    qemu = _qemu(argv)
    assert qemu.returncode == 1, qemu
    theirs = qemu.stderr.decode().splitlines()[-1].split(": ", 1)[1]
    with pytest.raises(ApplianceError) as err:
        to_config(parse_args(["-kernel", "/dev/null", *argv]))
    assert str(err.value) == theirs
