"""The test guest's virtio-blk driver against QEMU's own virtio-blk-pci (q35 +
KVM, SeaBIOS assigns the BARs): the reference our device must match."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import pytest

from appliance.kit import build
from appliance.kit.console import GuestConsole
from tests.conftest import needs_kvm, needs_qemu

pytestmark = [needs_kvm, needs_qemu, pytest.mark.kvm, pytest.mark.qemu, pytest.mark.slow]

SECTOR = 512


@pytest.fixture(scope="module")
def guest_elf():
    return build(linux=False).guest_elf


def qemu(elf: Path, *drives: str, extra: tuple[str, ...] = (), machine: str = "q35") -> list[str]:
    argv = ["qemu-system-x86_64", "-enable-kvm", "-M", machine, "-nographic", "-nodefaults",
            "-serial", "stdio", "-kernel", str(elf), "-smp", "1", "-m", "128", "-no-reboot"]
    for d in drives:
        argv += ["-drive", d]
    return argv + list(extra)


async def test_guest_reads_host_data_writes_flushes_and_benchmarks(guest_elf, tmp_path) -> None:
    img = tmp_path / "disk.img"
    pattern = bytes((i * 7 + i // 512) & 0xFF for i in range(1 << 20))
    img.write_bytes(pattern + bytes(7 << 20))
    drive = f"file={img},if=none,id=d0,format=raw,cache=none,aio=threads"
    device = ("-device", "virtio-blk-pci,drive=d0,num-queues=2")
    async with GuestConsole(qemu(guest_elf, drive, extra=device)) as g:
        await g.ready(timeout=40)
        info = await g.command("blk info", re.compile(r"BLK info (.*)\n"))
        fields = dict(kv.split("=") for kv in info.group(1).split())
        assert fields["capacity"] == str((8 << 20) // SECTOR) and fields["ro"] == "0"
        assert fields["queues"] == "2"
        # 300 sectors cross the driver's 64 KiB request size and page boundaries.
        m = await g.command("blk read 3 300", re.compile(r"BLK read sector=3 count=300 crc32=(0x[0-9a-f]+)\n"))
        assert int(m.group(1), 16) == zlib.crc32(pattern[3 * SECTOR : 303 * SECTOR])
        m = await g.command("blk write 4097 129 0xa5", re.compile(r"BLK write .* crc32=(0x[0-9a-f]+)\n"))
        await g.command("blk flush", "BLK flush ok\n")
        await g.command("blk read 16383 2", "ERR blk range past the end")
        stats = await g.blk_bench("randread", 4096, 4, 1)
        assert int(stats["ios"]) > 0 and float(stats["iops"]) > 0 and stats["qd"] == "4"
        # Requests are spread over both queues.
        assert all(int(n) > 0 for n in stats["per_queue"].split(",")) and stats["queues"] == "2"
        await g.write("poweroff\n")
        assert await g.wait(10) == 0
    data = img.read_bytes()
    assert data[4097 * SECTOR : 4226 * SECTOR] == b"\xa5" * (129 * SECTOR)
    assert data[4096 * SECTOR : 4097 * SECTOR] == bytes(SECTOR)
    assert data[4226 * SECTOR : 4227 * SECTOR] == bytes(SECTOR)
    assert int(m.group(1), 16) == zlib.crc32(b"\xa5" * 129 * SECTOR)
    assert data[: 1 << 20] == pattern


async def test_readonly_disk_refuses_guest_writes(guest_elf, tmp_path) -> None:
    img = tmp_path / "ro.img"
    img.write_bytes(b"\x11" * (1 << 20))
    second = tmp_path / "second.img"
    second.write_bytes(b"\x22" * (2 << 20))
    async with GuestConsole(qemu(guest_elf, f"file={img},if=none,id=d0,format=raw,readonly=on",
                                 f"file={second},if=none,id=d1,format=raw", machine="microvm,pcie=on",
                                 extra=("-device", "virtio-blk-pci,drive=d0",
                                        "-device", "virtio-blk-pci,drive=d1"))) as g:
        await g.ready(timeout=40)
        info = await g.command("blk info", re.compile(r"BLK info (.*)\n"))
        assert "ro=1" in info.group(1)
        await g.command("blk write 0 1 0", "ERR blk write failed at sector 0")
        await g.command("blk use 1", "BLK use 1 ok\n")
        m = await g.command("blk read 0 8", re.compile(r"crc32=(0x[0-9a-f]+)\n"))
        assert int(m.group(1), 16) == zlib.crc32(b"\x22" * 8 * SECTOR)
        await g.command("blk nonsense", "ERR unknown blk command\n")
        await g.write("poweroff\n")
        assert await g.wait(10) == 0
    assert img.read_bytes() == b"\x11" * (1 << 20)


async def test_microvm_pcie_without_firmware_gets_bars_assigned_by_the_guest(guest_elf, tmp_path) -> None:
    """microvm,pcie=on has no firmware and no 0xCF8: the guest finds ECAM through
    the host bridge's _CBA, places the BARs itself and drives the disk."""
    img = tmp_path / "m.img"
    img.write_bytes(b"\x5a" * (1 << 20))
    argv = ["qemu-system-x86_64", "-enable-kvm", "-M", "microvm,pcie=on", "-nographic",
            "-nodefaults", "-serial", "stdio", "-kernel", str(guest_elf), "-m", "128",
            "-no-reboot", "-drive", f"file={img},if=none,id=d0,format=raw",
            "-device", "virtio-blk-pci,drive=d0"]
    async with GuestConsole(argv) as g:
        await g.ready(timeout=20)
        info = await g.info()
        assert info["ecam"] == "0xe0000000"
        assert await g.blk_read(0, 4) == zlib.crc32(b"\x5a" * 4 * SECTOR)
        stats = await g.blk_bench("randread", 4096, 2, 1)
        assert "tsc" not in stats and int(stats["ios"]) > 0
        await g.write("poweroff\n")
        assert await g.wait(10) == 0
