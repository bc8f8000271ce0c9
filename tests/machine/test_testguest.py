"""The kit's test guest on our VMM: CPUs and memory reported, APs alive, commands, power and reset.

The guest is built by `appliance kit build` (``make test`` does it first); these
tests skip only when it has not been built.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.kit import paths
from appliance.kvm import layout
from appliance.machine import MachineConfig
from appliance.machine.machine import Machine
from tests.conftest import needs_kvm
from tests.machine.procio import Lines

GUEST = paths().guest_elf
APPLIANCE = [sys.executable, "-m", "appliance.cli.main"]
READY = r"TESTGUEST-READY cpus=(\d+) mem=(\d+)\r?\n"

pytestmark = [needs_kvm, pytest.mark.skipif(not GUEST.exists(), reason="test guest not built (appliance kit build)")]


@pytest.mark.parametrize(("cpus", "mem_mib"), [(1, 128), (4, 256)])
async def test_ready_line_reports_cpus_memory_and_every_ap(cpus: int, mem_mib: int) -> None:
    cfg = MachineConfig(kernel=GUEST, num_cpus=cpus, mem_size=mem_mib * layout.MiB)
    async with Machine(cfg) as vm:
        m = await vm.console.expect(READY, timeout=30)
        assert (int(m.group(1)), int(m.group(2))) == (cpus, mem_mib)
        aps = sorted(
            line.split()[1:4:2]
            for line in vm.console.output.splitlines()
            if line.startswith("TESTGUEST-AP ")
        )
        assert aps == sorted([str(i), f"apic={i}"] for i in range(1, cpus))
        vm.console.send("info\n")
        info = await vm.console.expect(r"INFO ([^\r\n]*)\r?\n", timeout=10)
        facts = dict(kv.split("=", 1) for kv in info.group(1).split() if "=" in kv)
        assert facts["cpus"] == facts["madt_cpus"] == str(cpus)
        assert facts["apic_ids"] == ",".join(str(i) for i in range(cpus))
        vm.console.send("poweroff\n")
        assert await asyncio.wait_for(vm.wait(), 20) == 0


async def test_reset_reboots_until_poweroff() -> None:
    async with Machine(MachineConfig(kernel=GUEST, num_cpus=2)) as vm:
        await vm.console.expect(READY, timeout=30)
        vm.console.send("reset\n")
        m = await vm.console.expect(READY, timeout=30)
        assert m.group(1) == "2"
        assert vm.boots == 2
        vm.console.send("echo still-here\n")
        await vm.console.expect(r"still-here\r?\n", timeout=10)
        vm.console.send("poweroff\n")
        assert await asyncio.wait_for(vm.wait(), 20) == 0


def test_cli_stdin_commands_reset_with_no_reboot_exits_0() -> None:
    proc = subprocess.Popen([*APPLIANCE, "run", "-kernel", str(GUEST), "-smp", "2", "-no-reboot", "-nographic"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        out = Lines(proc.stdout)
        assert out.until(b"TESTGUEST-READY").split()[1] == b"cpus=2"
        proc.stdin.write(b"echo hello-from-stdin\n")
        proc.stdin.flush()
        out.until(b"hello-from-stdin")
        proc.stdin.write(b"reset\n")
        proc.stdin.flush()
        assert proc.wait(20) == 0
        assert b"TESTGUEST-READY" not in out.rest()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_reset_reboots_and_the_ready_line_comes_again() -> None:
    proc = subprocess.Popen([*APPLIANCE, "run", "-kernel", str(GUEST), "-smp", "2", "-serial", "stdio"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        out = Lines(proc.stdout)
        out.until(b"TESTGUEST-READY cpus=2")
        proc.stdin.write(b"reset\n")
        proc.stdin.flush()
        out.until(b"TESTGUEST-READY cpus=2")
        proc.stdin.write(b"poweroff\n")
        proc.stdin.flush()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_unix_socket_console_and_poweroff_exit_0(tmp_path: Path) -> None:
    path = tmp_path / "serial.sock"
    proc = subprocess.Popen(
        [*APPLIANCE, "run", "-kernel", str(GUEST), "-smp", "4", "-m", "256M", "-display", "none",
         "-chardev", f"socket,id=con,path={path},server=on,wait=on", "-serial", "chardev:con"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
                break
            except OSError:  # not there yet, or bound and not yet listening
                s.close()
                assert time.monotonic() < deadline and proc.poll() is None, "socket never listened"
                time.sleep(0.05)
        f = s.makefile("rwb", buffering=0)
        s.settimeout(20)
        lines = []
        while not (line := f.readline()).startswith(b"TESTGUEST-READY"):
            lines.append(line)
        assert line.split()[1:] == [b"cpus=4", b"mem=256"]
        assert sum(ln.startswith(b"TESTGUEST-AP ") for ln in lines) == 3
        f.write(b"echo over-the-socket\n")
        while b"over-the-socket" not in f.readline():
            pass
        f.write(b"poweroff\n")
        assert proc.wait(20) == 0
        s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(path)


def test_wait_for_guest_returns_once_the_booted_guest_waits_on_its_console() -> None:
    # `appliance run` gives an early-booted guest the interpreter to itself
    # until it first polls for input: by then the readiness line is out.
    machine = Machine(MachineConfig(kernel=GUEST, num_cpus=2))
    machine.boot_early()
    try:
        t0 = time.monotonic()
        assert machine.wait_for_guest(30)
        assert time.monotonic() - t0 < 30
        out = machine.console.output
        assert "TESTGUEST-READY cpus=2 mem=128" in out, out
    finally:
        machine.abandon()


class _SlowSpec:
    """A device whose open() waits for the test: the window in which a monitor is up and the VM is not."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def open(self) -> None:
        self.entered.set()
        await self.release.wait()

    def attach(self, builder: object, inst: object) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_cont_while_devices_still_open_starts_the_vcpus_with_the_vm() -> None:
    spec = _SlowSpec()
    vm = Machine(MachineConfig(kernel=GUEST, start_paused=True, devices=[spec]))
    starting = asyncio.ensure_future(vm.start())
    try:
        await asyncio.wait_for(spec.entered.wait(), 10)
        assert vm.prelaunch and vm.instance is None
        await vm.resume()  # libvirt's "cont" right after connecting: not lost
        spec.release.set()
        await asyncio.wait_for(starting, 10)
        assert not vm.prelaunch
        await vm.console.expect(READY, timeout=30)
    finally:
        spec.release.set()
        await asyncio.gather(starting, return_exceptions=True)
        await vm.stop()


async def test_reset_in_prelaunch_stays_in_prelaunch() -> None:
    vm = Machine(MachineConfig(kernel=GUEST, start_paused=True))
    await vm.start()
    try:
        vm.reset()
        for _ in range(100):
            if vm.boots == 2:
                break
            await asyncio.sleep(0.02)
        assert vm.boots == 2 and vm.prelaunch  # rebuilt, still waiting for "cont" (as QEMU)
        await asyncio.sleep(0.2)
        assert "TESTGUEST-READY" not in vm.console.output
        await vm.resume()
        await vm.console.expect(READY, timeout=30)
    finally:
        await vm.stop()
