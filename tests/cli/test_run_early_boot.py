"""`appliance run` boots before its event loop exists: console output stays complete and in order.

The VM is built and running before asyncio is imported; until the loop takes
over, the vCPU thread writes console output itself. These tests drive the
real command and check every byte across that hand-over, on the terminal
(stdio) and in a file, and that the kit's test guest answers commands on
stdio and on a unix socket (which boots on the loop, as before).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.kit import paths
from tests.conftest import needs_kvm
from tests.machine import chattyguest, tinyguest
from tests.machine.procio import Lines

APPLIANCE = [sys.executable, "-m", "appliance.cli.main"]
GUEST = paths().guest_elf
needs_guest = pytest.mark.skipif(not GUEST.exists(), reason="test guest not built (appliance kit build)")

pytestmark = needs_kvm


@pytest.fixture(scope="module")
def chatty_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not tinyguest.have_toolchain():
        pytest.skip("binutils missing")
    return chattyguest.build(tmp_path_factory.mktemp("chatty"))


def test_stdio_output_from_the_first_instruction_on_is_complete_and_ordered(chatty_elf: Path) -> None:
    # 'q' waits in the UART until the guest, done printing, reads it and powers off.
    proc = subprocess.run([*APPLIANCE, "run", "-kernel", str(chatty_elf), "-nographic"],
                          input=b"q", capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == chattyguest.expected()


def test_file_output_from_the_first_instruction_on_is_complete_and_ordered(chatty_elf: Path, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    proc = subprocess.Popen([*APPLIANCE, "run", "-kernel", str(chatty_elf), "-serial", f"file:{log}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and log.read_bytes().endswith(b"DONE\n")):
            assert time.monotonic() < deadline, "the guest did not finish printing"
            time.sleep(0.02)
        proc.terminate()
        assert proc.wait(20) == 0
        assert log.read_bytes() == chattyguest.expected()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_guest
def test_test_guest_on_stdio_is_ready_and_answers_info() -> None:
    proc = subprocess.Popen([*APPLIANCE, "run", "-m", "256M", "-kernel", str(GUEST), "-nographic"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        out = Lines(proc.stdout)
        assert out.until(b"TESTGUEST-READY").strip() == b"TESTGUEST-READY cpus=1 mem=256"
        proc.stdin.write(b"info\n")
        proc.stdin.flush()
        assert b"cpus=1" in out.until(b"INFO ")
        proc.stdin.write(b"poweroff\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_guest
def test_test_guest_on_a_unix_socket_answers_info(tmp_path: Path) -> None:
    path = tmp_path / "console.sock"
    proc = subprocess.Popen(
        [*APPLIANCE, "run", "-kernel", str(GUEST), "-serial", f"unix:{path},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
                break
            except OSError:
                s.close()
                assert proc.poll() is None and time.monotonic() < deadline, "no console socket"
                time.sleep(0.02)
        s.settimeout(30)
        # Output before we connected is dropped (as in QEMU); ask until the guest answers.
        buf = b""
        while b"INFO " not in buf or not buf[buf.index(b"INFO "):].count(b"\n"):
            s.sendall(b"info\n")
            try:
                buf += s.recv(4096)
            except TimeoutError:
                raise AssertionError(f"no INFO reply; got {buf[-200:]!r}") from None
            assert time.monotonic() < deadline + 30
        assert b"cpus=1" in buf[buf.index(b"INFO "):]
        s.sendall(b"poweroff\n")
        assert proc.wait(30) == 0
        s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
