"""The test guest under QEMU + KVM: the same ELF our VMM boots, so QEMU is the
reference for what the guest reports (CPUs, memory, ACPI) and how it answers."""

from __future__ import annotations

import re

import pytest

from appliance.kit import build
from appliance.kit.console import GuestConsole
from tests.conftest import needs_kvm, needs_qemu

pytestmark = [needs_kvm, needs_qemu, pytest.mark.kvm, pytest.mark.qemu]


@pytest.fixture(scope="module")
def guest_elf():
    return build(linux=False).guest_elf


def qemu(elf, machine: str, smp: int, mem: int = 256, reboot: bool = False) -> list[str]:
    argv = ["qemu-system-x86_64", "-enable-kvm", "-M", machine, "-nographic", "-nodefaults",
            "-serial", "stdio", "-kernel", str(elf), "-smp", str(smp), "-m", str(mem)]
    return argv if reboot else argv + ["-no-reboot"]


@pytest.mark.parametrize("smp", [1, 4])
async def test_microvm_reports_cpus_and_memory_answers_and_powers_off(guest_elf, smp: int) -> None:
    async with GuestConsole(qemu(guest_elf, "microvm", smp)) as g:
        assert await g.ready(timeout=20) == (smp, 256)
        for n in range(1, smp):
            assert f"TESTGUEST-AP {n} alive" in g.output
        await g.command("echo hello  guest world", "hello  guest world\n")
        info = await g.info()
        assert info["cpus"] == info["madt_cpus"] == str(smp)
        assert info["mem"] == "256" and info["acpi"] == "ok"
        assert info["apic_ids"] == ",".join(str(i) for i in range(smp))
        # microvm has hardware-reduced ACPI: power off through the sleep control register.
        assert info["hw_reduced"] == "1" and info["s5"] == "5"
        await g.command("no-such-thing 1 2", "ERR unknown command\n")
        await g.write("poweroff\n")
        assert await g.wait(10) == 0
        assert "ERR" not in g.output.split("ERR unknown command\n", 1)[1]


async def test_reset_with_no_reboot_ends_qemu(guest_elf) -> None:
    async with GuestConsole(qemu(guest_elf, "microvm", 2)) as g:
        await g.ready(timeout=20)
        await g.write("reset\n")
        assert await g.wait(10) == 0


async def test_memory_size_follows_dash_m(guest_elf) -> None:
    async with GuestConsole(qemu(guest_elf, "microvm", 1, mem=96)) as g:
        assert await g.ready(timeout=20) == (1, 96)
        await g.write("poweroff\n")
        assert await g.wait(10) == 0


@pytest.mark.slow
async def test_q35_powers_off_through_the_pm1a_block(guest_elf) -> None:
    """q35 has full ACPI: the FADT's PM1a control block and the DSDT's \\_S5."""
    async with GuestConsole(qemu(guest_elf, "q35", 2)) as g:
        assert await g.ready(timeout=40) == (2, 256)
        info = await g.info()
        assert info["hw_reduced"] == "0" and int(info["pm1a_cnt"], 16) != 0
        assert re.fullmatch(r"\d", info["s5"])
        await g.write("poweroff\n")
        assert await g.wait(10) == 0
