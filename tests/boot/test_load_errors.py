"""Bad kernel files give a one-line BootError, which the CLI turns into exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.kvm.boot import BootError, load_kernel
from appliance.kvm.memory import GuestMemory
from tests.boot import images


def _load(mem: GuestMemory, kernel: Path, initrd: Path | None = None, num_cpus: int = 1) -> None:
    load_kernel(mem, kernel, initrd=initrd, cmdline="", num_cpus=num_cpus, rsdp_addr=0)


def test_boot_error_is_a_config_error() -> None:
    assert issubclass(BootError, ConfigError)


def _one_line(err: pytest.ExceptionInfo[BootError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_kernel(tmp_path: Path, mem: GuestMemory) -> None:
    with pytest.raises(BootError) as err:
        _load(mem, tmp_path / "nope")
    assert _one_line(err) == f"kernel {tmp_path / 'nope'} does not exist"


def test_kernel_that_is_a_directory(tmp_path: Path, mem: GuestMemory) -> None:
    with pytest.raises(BootError, match="cannot read kernel"):
        _load(mem, tmp_path)


def test_file_that_is_neither_bzimage_nor_elf(tmp_path: Path, mem: GuestMemory) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"#!/bin/sh\necho not a kernel\n" * 100)
    with pytest.raises(BootError) as err:
        _load(mem, junk)
    assert "neither a bzImage nor an ELF kernel" in _one_line(err)


def test_empty_file(tmp_path: Path, mem: GuestMemory) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(BootError, match="neither"):
        _load(mem, empty)


def test_missing_initrd(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(images.bzimage())
    with pytest.raises(BootError, match="initrd .* does not exist"):
        _load(mem, kernel, tmp_path / "missing-initrd")


def test_elf_for_another_machine(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = tmp_path / "arm.elf"
    kernel.write_bytes(images.elf([images.Load(0x100000, b"\0" * 16)], 0x100000, machine=183))
    with pytest.raises(BootError, match="machine 183, not x86"):
        _load(mem, kernel)


def test_zero_vcpus(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(images.bzimage())
    with pytest.raises(BootError, match="0 vCPUs"):
        _load(mem, kernel, num_cpus=0)


def test_command_line_with_nul_is_refused(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(images.bzimage())
    with pytest.raises(BootError, match="NUL"):
        load_kernel(mem, kernel, initrd=None, cmdline="a\0b", num_cpus=1, rsdp_addr=0)


def test_ram_too_small_for_the_boot_area_is_refused(tmp_path: Path) -> None:
    from appliance.kvm.memory import MemoryRegion

    tiny = GuestMemory([MemoryRegion(0, bytearray(0x4000))])
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(images.bzimage())
    with pytest.raises(BootError):
        _load(tiny, kernel)
    guest = tmp_path / "guest.elf"
    guest.write_bytes(images.pvh_elf())
    with pytest.raises(BootError, match="does not fit"):
        _load(tiny, guest)
