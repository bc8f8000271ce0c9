"""The QEMU command line TcgGuest builds, for the system's QEMU or one unpacked elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.kit.build import KitPaths
from appliance.kit.errors import TcgError
from appliance.kit.tcg import TcgGuest


def _kit(tmp_path: Path) -> KitPaths:
    names = ("kit", "guest", "bzImage", "vmlinux", "initramfs", "kitio", "kitnet")
    return KitPaths(*(tmp_path / name for name in names))


def test_default_guest_runs_the_qemu_on_path_with_its_own_firmware(tmp_path: Path) -> None:
    argv = TcgGuest(["-device", "virtio-rng-pci"]).qemu_argv(_kit(tmp_path))
    assert argv[0] == "qemu-system-x86_64"
    assert "-L" not in argv
    assert argv[-2:] == ["-device", "virtio-rng-pci"]


def test_another_qemu_gets_its_firmware_directories_in_order(tmp_path: Path) -> None:
    root = tmp_path / "qemu-backport"
    dirs = (root / "usr/share/seabios", root / "usr/share/qemu")
    argv = TcgGuest(qemu=str(root / "usr/bin/qemu-system-x86_64"), firmware_dirs=dirs).qemu_argv(_kit(tmp_path))
    assert argv[:5] == [str(root / "usr/bin/qemu-system-x86_64"), "-L", str(dirs[0]), "-L", str(dirs[1])]
    assert argv[5:7] == ["-accel", "tcg"]


async def test_a_missing_qemu_binary_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-qemu")
    with pytest.raises(TcgError, match="no-such-qemu is not installed"):
        await TcgGuest(qemu=missing, kit=_kit(tmp_path)).start()


def test_the_uncompressed_kernel_boots_when_the_kit_has_it_with_the_fast_boot_words(tmp_path: Path) -> None:
    from appliance.kit.tcg import FAST_BOOT

    kit = _kit(tmp_path)
    argv = TcgGuest().qemu_argv(kit)
    assert argv[argv.index("-kernel") + 1] == str(kit.bzimage)  # no vmlinux here
    kit.vmlinux.write_bytes(b"\x7fELF")
    argv = TcgGuest(append="appliance.action=poweroff").qemu_argv(kit)
    assert argv[argv.index("-kernel") + 1] == str(kit.vmlinux)
    words = argv[argv.index("-append") + 1].split()
    assert set(FAST_BOOT) <= set(words) and words[-1] == "appliance.action=poweroff"
