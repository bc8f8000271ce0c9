"""kernel_is_pvm_capable: PVM guest kernels are told apart by what CONFIG_PVM_GUEST compiles in."""

from __future__ import annotations

import gzip
from pathlib import Path

from appliance.kvm.boot import kernel_is_pvm_capable
from tests.boot import images

# "invlpg 0xffffffffff4d5650; cpuid": PVM_SYNTHETIC_CPUID (virt-pvm/linux uapi/asm/pvm_para.h).
SYNTHETIC_CPUID = bytes([0x0F, 0x01, 0x3C, 0x25, 0x50, 0x56, 0x4D, 0xFF, 0x0F, 0xA2])


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_plain_vmlinux_is_not_pvm(tmp_path: Path) -> None:
    assert not kernel_is_pvm_capable(_write(tmp_path, "vmlinux", images.vmlinux_elf()))


def test_vmlinux_with_synthetic_cpuid_is_pvm(tmp_path: Path) -> None:
    image = images.vmlinux_elf(extra=b"\x90" * 7 + SYNTHETIC_CPUID + b"\xc3")
    assert kernel_is_pvm_capable(_write(tmp_path, "vmlinux", image))


def test_vmlinux_with_pvm_guest_log_prefix_is_pvm(tmp_path: Path) -> None:
    image = images.vmlinux_elf(extra=b"\x003pvm-guest: PVM detected\n\0")
    assert kernel_is_pvm_capable(_write(tmp_path, "vmlinux", image))


def test_embedded_config_with_pvm_guest_is_pvm(tmp_path: Path) -> None:
    config = b"CONFIG_X86_64=y\nCONFIG_PVM_GUEST=y\n"
    image = images.vmlinux_elf(extra=b"IKCFG_ST" + gzip.compress(config) + b"IKCFG_ED")
    assert kernel_is_pvm_capable(_write(tmp_path, "vmlinux", image))
    off = images.vmlinux_elf(extra=b"IKCFG_ST" + gzip.compress(b"# CONFIG_PVM_GUEST is not set\n")
                             + b"IKCFG_ED")
    assert not kernel_is_pvm_capable(_write(tmp_path, "vmlinux-off", off))


def test_bzimage_payload_is_searched_after_decompression(tmp_path: Path) -> None:
    pvm = gzip.compress(images.vmlinux_elf(extra=SYNTHETIC_CPUID))
    plain = gzip.compress(images.vmlinux_elf())
    assert SYNTHETIC_CPUID not in pvm
    assert kernel_is_pvm_capable(_write(tmp_path, "bz-pvm", images.bzimage(payload=pvm)))
    assert not kernel_is_pvm_capable(_write(tmp_path, "bz-plain", images.bzimage(payload=plain)))


def test_unreadable_or_odd_files_are_not_pvm(tmp_path: Path) -> None:
    assert not kernel_is_pvm_capable(tmp_path / "missing")
    assert not kernel_is_pvm_capable(tmp_path)
    assert not kernel_is_pvm_capable(_write(tmp_path, "bz-junk", images.bzimage(payload=b"junk")))
