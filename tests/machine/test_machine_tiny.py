"""The Machine lifecycle with a tiny PVH guest: console both ways, power-off, reset, reboot."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.machine import MachineConfig
from appliance.machine.console import ConsoleTimeout
from appliance.machine.machine import Machine, Runstate
from tests.conftest import needs_kvm
from tests.machine import tinyguest

pytestmark = [needs_kvm, pytest.mark.skipif(not tinyguest.have_toolchain(), reason="binutils missing")]


@pytest.fixture(scope="module")
def tiny_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinyguest.build(tmp_path_factory.mktemp("tiny"))


async def test_guest_prints_echoes_input_and_powers_off_with_status_0(tiny_elf: Path) -> None:
    async with Machine(MachineConfig(kernel=tiny_elf)) as vm:
        await vm.console.expect("TINY-READY", timeout=10)
        vm.console.send("ping")
        await vm.console.expect("ping", timeout=5)
        vm.console.send("q")
        assert await asyncio.wait_for(vm.wait(), 10) == 0
        assert "ACPI S5" in vm.exit_reason
        assert vm.runstate is Runstate.STOPPED


async def test_reset_reboots_and_the_banner_appears_again(tiny_elf: Path) -> None:
    async with Machine(MachineConfig(kernel=tiny_elf, num_cpus=2)) as vm:
        await vm.console.expect("TINY-READY", timeout=10)
        vm.console.send("r")
        await vm.console.expect("TINY-READY", timeout=10)
        assert vm.boots == 2
        vm.console.send("q")
        assert await asyncio.wait_for(vm.wait(), 10) == 0


async def test_reset_with_no_reboot_ends_the_machine(tiny_elf: Path) -> None:
    async with Machine(MachineConfig(kernel=tiny_elf, no_reboot=True)) as vm:
        await vm.console.expect("TINY-READY", timeout=10)
        vm.console.send("r")
        assert await asyncio.wait_for(vm.wait(), 10) == 0
        assert vm.boots == 1
        assert "no-reboot" in vm.exit_reason


async def test_host_reset_and_stop(tiny_elf: Path) -> None:
    vm = Machine(MachineConfig(kernel=tiny_elf))
    await vm.start()
    await vm.console.expect("TINY-READY", timeout=10)
    vm.reset()
    await vm.console.expect("TINY-READY", timeout=10)
    assert await vm.stop() == 0
    assert vm.runstate is Runstate.STOPPED
    assert vm.instance is None


async def test_expect_timeout_says_what_was_printed(tiny_elf: Path) -> None:
    async with Machine(MachineConfig(kernel=tiny_elf)) as vm:
        async with asyncio.timeout(10):  # booted (read without consuming it), whatever the load
            while "TINY-READY" not in vm.console.output:
                await asyncio.sleep(0.01)
        with pytest.raises(ConsoleTimeout) as info:
            await vm.console.expect("NEVER", timeout=0.5)
        assert "TINY-READY" in info.value.output


async def test_unloadable_kernel_fails_start_with_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"not a kernel" * 100)
    vm = Machine(MachineConfig(kernel=bad))
    with pytest.raises(ConfigError):
        await vm.start()
    assert vm.runstate is Runstate.STOPPED


class CountingDevice:
    """A DeviceSpec that records its lifecycle calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def open(self) -> None:
        self.calls.append("open")

    def attach(self, builder: object, inst: object) -> None:
        self.calls.append("attach")

    def close(self) -> None:
        self.calls.append("close")


async def test_device_specs_open_once_attach_every_boot_close_once(tiny_elf: Path) -> None:
    dev = CountingDevice()
    async with Machine(MachineConfig(kernel=tiny_elf, devices=[dev])) as vm:
        await vm.console.expect("TINY-READY", timeout=10)
        vm.reset()
        await vm.console.expect("TINY-READY", timeout=10)
    assert dev.calls == ["open", "attach", "attach", "close"]


async def test_pci_host_bridge_answers_on_cf8_and_cf9_resets(tiny_elf: Path) -> None:
    """Config mechanism #1 reaches the host bridge at 00.0; a byte 6 to 0xCF9 reboots."""
    async with Machine(MachineConfig(kernel=tiny_elf)) as vm:
        await vm.console.expect("TINY-READY", timeout=10)
        inst = vm.instance
        assert inst is not None
        pio = inst.vm.pio_bus
        pio.write(0xCF8, (0x8000_0000).to_bytes(4, "little"))
        vendor = int.from_bytes(pio.read(0xCFC, 2), "little")
        assert vendor == 0x8086
        pio.write(0xCF8, (0x8000_0000 | 5 << 11).to_bytes(4, "little"))
        assert pio.read(0xCFC, 4) == b"\xff\xff\xff\xff"
        pio.write(0xCF9, b"\x06")
        await vm.console.expect("TINY-READY", timeout=10)
        assert vm.boots == 2


async def test_pause_holds_the_guest_and_resume_lets_it_go_on(tiny_elf: Path) -> None:
    async with Machine(MachineConfig(kernel=tiny_elf, num_cpus=2)) as vm:
        await vm.console.expect("TINY-READY", timeout=10)
        await vm.pause()
        assert vm.runstate is Runstate.PAUSED
        vm.console.send("zz")
        with pytest.raises(ConsoleTimeout):
            await vm.console.expect("zz", timeout=0.3)
        await vm.resume()
        assert vm.runstate is Runstate.RUNNING
        await vm.console.expect("zz", timeout=5)
        await vm.pause()
        vm.reset()
        # Rebuilt, but left waiting in prelaunch as QEMU leaves a VM reset while paused.
        for _ in range(250):
            if vm.boots == 2:
                break
            await asyncio.sleep(0.02)
        assert (vm.boots, vm.runstate, vm.prelaunch) == (2, Runstate.PAUSED, True)
        with pytest.raises(ConsoleTimeout):
            await vm.console.expect("TINY-READY", timeout=0.3)
        await vm.resume()
        await vm.console.expect("TINY-READY", timeout=10)
        assert vm.runstate is Runstate.RUNNING and not vm.prelaunch
    assert vm.runstate is Runstate.STOPPED


async def test_reboots_do_not_leak_file_descriptors(tiny_elf: Path) -> None:
    import os

    async with Machine(MachineConfig(kernel=tiny_elf, num_cpus=2)) as vm:
        await vm.console.expect("TINY-READY", timeout=10)
        vm.reset()
        await vm.console.expect("TINY-READY", timeout=10)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(10):
            vm.console.send("r")
            await vm.console.expect("TINY-READY", timeout=10)
        assert len(os.listdir("/proc/self/fd")) == before
        assert vm.boots == 12
