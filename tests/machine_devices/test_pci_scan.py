"""A tiny guest walks PCI bus 0 through 0xCF8/0xCFC on `appliance run`'s machine.

The guest (32-bit code, assembled at test time) reads each slot's vendor/device
dword; for a present device it also reads BAR 4 (the virtio structures) and,
through that BAR, ``num_queues`` of the virtio common config. It reports every
value on a recorder port and powers off. This shows that the options place the
right virtio device in the right slot with working BARs, without the kit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.cli.run import parse_args, to_config
from appliance.machine.machine import Machine
from tests.conftest import needs_kvm
from tests.machine.tinyguest import assemble, have_toolchain

pytestmark = [needs_kvm, pytest.mark.skipif(not have_toolchain(), reason="needs binutils (as, objcopy)")]

RECORD_PORT = 0xF4
VENDOR_VIRTIO = 0x1AF4
NO_DEVICE = 0xFFFF_FFFF

SCAN = r"""
    .code32
    .globl _start
_start:
    xor %ebx, %ebx
1:  mov %ebx, %eax
    shl $11, %eax
    or $0x80000000, %eax
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    mov $0xf4, %dx
    out %eax, %dx
    cmp $0xffffffff, %eax
    je 2f
    mov %ebx, %eax
    shl $11, %eax
    or $0x80000020, %eax
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    mov $0xf4, %dx
    out %eax, %dx
    and $0xfffffff0, %eax
    jz 2f
    movzwl 0x12(%eax), %eax
    out %eax, %dx
2:  inc %ebx
    cmp $32, %ebx
    jne 1b
    mov $0x604, %dx
    mov $0x3400, %ax
    out %ax, %dx
3:  jmp 3b
"""


class Recorder:
    """Port RECORD_PORT: keeps every dword the guest writes."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.values.append(int.from_bytes(data, "little"))


class RecorderSpec:
    def __init__(self) -> None:
        self.recorder = Recorder()

    def attach(self, builder: object, inst: object) -> None:
        inst.vm.pio_bus.register(RECORD_PORT, 4, self.recorder)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def scan_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return assemble(tmp_path_factory.mktemp("scan"), "scan", SCAN)


def parse_scan(values: list[int]) -> dict[int, tuple[int, int, int | None]]:
    """slot -> (vendor/device dword, BAR4 low dword, num_queues or None)."""
    out: dict[int, tuple[int, int, int | None]] = {}
    it = iter(values)
    for slot in range(32):
        ident = next(it)
        if ident == NO_DEVICE:
            continue
        bar = next(it)
        nq = next(it) if bar & ~0xF else None
        out[slot] = (ident, bar, nq)
    assert next(it, None) is None
    return out


async def run_scan(elf: Path, argv: list[str]) -> dict[int, tuple[int, int, int | None]]:
    config = to_config(parse_args(["-kernel", str(elf), *argv]))
    config.serial = None
    spec = RecorderSpec()
    config.devices.append(spec)
    async with Machine(config) as vm:
        assert await asyncio.wait_for(vm.wait(), 30) == 0
    return parse_scan(spec.recorder.values)


def virtio(device_id: int) -> int:
    return device_id << 16 | VENDOR_VIRTIO


async def test_blk_rng_net_appear_in_command_line_order_with_addr_honoured(
    scan_elf: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "x.img"
    disk.write_bytes(bytes(1 << 20))
    found = await run_scan(scan_elf, [
        "-smp", "2",
        "-netdev", "user,id=n0",
        "-device", "virtio-net-pci,netdev=n0,addr=0x5",
        "-drive", f"file={disk},format=raw,if=virtio",
        "-device", "virtio-rng-pci",
    ])
    assert sorted(found) == [0, 1, 2, 5]
    assert found[0][0] == 0x29C0_8086  # the host bridge
    assert found[1][0] == virtio(0x1042)
    assert found[2][0] == virtio(0x1044)
    assert found[5][0] == virtio(0x1041)
    # One queue per vCPU for the disk, one for rng, rx/tx plus control for the NIC.
    assert [found[s][2] for s in (1, 2, 5)] == [2, 1, 3]
    bars = [found[s][1] & ~0xF for s in (1, 2, 5)]
    assert all(0xC000_0000 <= b < 0xFC00_0000 for b in bars)
    assert len(set(bars)) == 3


async def test_num_queues_and_second_disk_through_blockdev(scan_elf: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(1 << 20))
    b.write_bytes(bytes(1 << 20))
    found = await run_scan(scan_elf, [
        "-device", "virtio-blk-pci,drive=d1,num-queues=3,addr=4",
        "-blockdev", f"driver=file,node-name=f1,filename={b}",
        "-blockdev", "driver=raw,node-name=d1,file=f1",
        "-drive", f"file={a},format=raw,if=none,id=d0",
        "-device", "virtio-blk-pci,drive=d0",
    ])
    assert sorted(found) == [0, 1, 4]
    assert found[4][0] == found[1][0] == virtio(0x1042)
    assert found[4][2] == 3
    assert found[1][2] == 1  # -smp 1: one queue


async def test_no_devices_leaves_only_the_host_bridge(scan_elf: Path) -> None:
    found = await run_scan(scan_elf, ["-net", "none"])
    assert list(found) == [0]


def test_scan_parser_rejects_trailing_values() -> None:
    with pytest.raises(AssertionError):
        parse_scan([NO_DEVICE] * 32 + [1])
    assert parse_scan([0x1234, 0, *([NO_DEVICE] * 31)]) == {0: (0x1234, 0, None)}


async def test_max_nics_fill_the_bus_in_order(scan_elf: Path) -> None:
    from appliance.nic.config import MAX_NICS

    argv: list[str] = []
    for _ in range(MAX_NICS):
        argv += ["-nic", "user"]
    found = await run_scan(scan_elf, argv)
    assert sorted(found) == list(range(MAX_NICS + 1))
    assert all(found[s][0] == virtio(0x1041) for s in range(1, MAX_NICS + 1))
