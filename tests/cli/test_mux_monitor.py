"""The human monitor on the terminal with the console, as QEMU's mux chardev gives it.

``-nographic`` (with no other monitor) and ``-serial mon:stdio`` share stdio between the
guest's serial port and the monitor: Ctrl-A c switches the keyboard to a ``(qemu)`` prompt
(the banner first, the first time) and back, Ctrl-A h lists the keys, Ctrl-A x ends the VM
with QEMU's "QEMU: Terminated". These run `appliance run` with the kit's test guest and a
user network whose forward the monitor lists and changes; the forward listens on loopback
and nothing connects to it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from appliance.kit import paths
from tests.conftest import needs_kvm
from tests.machine.procio import Lines
from tests.ports import free_port

APPLIANCE = [sys.executable, "-m", "appliance.cli.main"]
GUEST = paths().guest_elf

pytestmark = [needs_kvm, pytest.mark.skipif(not GUEST.exists(), reason="test guest not built (appliance kit build)")]


def _run(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*APPLIANCE, "run", "-kernel", str(GUEST), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _type(p: subprocess.Popen[bytes], keys: bytes) -> None:
    assert p.stdin is not None
    p.stdin.write(keys)
    p.stdin.flush()


def _end(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.kill()
    p.communicate(timeout=10)


@pytest.mark.parametrize("how", [
    ["-nographic"],
    ["-display", "none", "-serial", "mon:stdio"],
    ["-display", "none", "-chardev", "stdio,mux=on,id=c0", "-serial", "chardev:c0", "-mon", "chardev=c0"],
], ids=["nographic", "mon-stdio", "chardev-mux"])
def test_ctrl_a_c_opens_the_monitor_and_the_guest_keeps_the_keyboard_after(how: list[str]) -> None:
    port = free_port()
    p = _run(*how, "-netdev", f"user,id=u0,hostfwd=tcp:127.0.0.1:{port}-:22",
             "-device", "virtio-net-pci,netdev=u0")
    try:
        assert p.stdout is not None
        out = Lines(p.stdout, timeout=60)
        out.until(b"TESTGUEST-READY")  # the whole line: the rest would land amid the prompt
        _type(p, b"\x01c")
        assert out.through(b"(qemu) ").endswith(b"monitor - type 'help' for more information\r\n(qemu) ")
        _type(p, b"info usernet\r")
        table = out.through(b"(qemu) ")
        assert b"Hub -1 (u0):" in table
        assert b"TCP[HOST_FORWARD]" in table and f"127.0.0.1 {port}".encode() in table
        _type(p, f"hostfwd_remove u0 tcp:127.0.0.1:{port}\r".encode())
        assert b"host forwarding rule for" in out.through(b"(qemu) ")
        _type(p, b"info usernet\r")
        assert b"HOST_FORWARD" not in out.through(b"(qemu) ")
        _type(p, b"\x01c")  # back to the guest: its commands answer again
        assert out.through(b"\r\n") == b"\r\n"
        _type(p, b"echo mux\r")
        out.until(b"mux")
        _type(p, b"\x01c")  # and a second visit: no banner, the prompt
        assert out.through(b"(qemu) ") == b"(qemu) "
        _type(p, b"info status\r")
        assert b"VM status: running" in out.through(b"(qemu) ")
        _type(p, b"\x01x")
        out.through(b"QEMU: Terminated\n\r")
        assert p.wait(timeout=20) == 0
    finally:
        _end(p)


def test_ctrl_a_c_goes_nowhere_when_another_monitor_is_given() -> None:
    """QEMU muxes a monitor in with -nographic only when none is given (-monitor none too)."""
    p = _run("-nographic", "-monitor", "none")
    try:
        assert p.stdout is not None
        out = Lines(p.stdout, timeout=60)
        out.until(b"TESTGUEST-READY")  # the whole line: the rest would land amid the prompt
        _type(p, b"\x01h")
        assert b"switch between console and monitor" not in out.through(b"C-a C-a  sends C-a\n\r")
        _type(p, b"\x01cecho still-guest\r")
        out.until(b"still-guest")
        _type(p, b"\x01x")
        assert p.wait(timeout=20) == 0
        assert b"(qemu)" not in out.rest()
    finally:
        _end(p)


def test_monitor_stdio_is_a_prompt_of_its_own() -> None:
    """``-monitor stdio`` with the console elsewhere: QEMU's banner and prompt at once, the typed
    line echoed as its readline does, the answer, and ``quit`` ends the VM."""
    p = _run("-display", "none", "-nodefaults", "-nic", "user", "-monitor", "stdio")
    try:
        assert p.stdout is not None
        out = Lines(p.stdout, timeout=60)
        assert out.through(b"(qemu) ").endswith(b"monitor - type 'help' for more information\r\n(qemu) ")
        _type(p, b"info network\r")
        got = out.through(b"(qemu) ")
        assert b"info network\x1b[K\r\n" in got and b"type=user,net=10.0.2.0,restrict=off" in got
        _type(p, b"quit\r")
        assert p.wait(timeout=20) == 0
    finally:
        _end(p)


def test_monitor_stdio_and_the_console_cannot_both_have_stdio() -> None:
    r = subprocess.run([*APPLIANCE, "run", "-kernel", str(GUEST), "-nographic", "-monitor", "stdio"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.strip().endswith("cannot use stdio by multiple character devices")
