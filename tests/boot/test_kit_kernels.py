"""The loaders against the real Debian kernel the kit builds (skipped until `appliance kit build`).

The header logic itself is covered with synthesized images in test_bzimage.py;
these tests check that Debian's actual bzImage and vmlinux meet the same checks.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from appliance.kvm import layout
from appliance.kvm.boot import kernel_is_pvm_capable, load_kernel
from appliance.kvm.boot.bzimage import parse_setup_header
from appliance.kvm.boot.elf import parse_elf
from appliance.kvm.memory import GuestMemory

MiB = 1 << 20


def _kit_file(name: str) -> Path:
    try:
        from appliance.kit import paths
    except ImportError:
        pytest.skip("appliance.kit is not available")
    path = Path(getattr(paths(), name))
    if not path.is_file():
        pytest.skip(f"kit {name} not built ({path} missing; run `appliance kit build`)")
    return path


def test_debian_bzimage_header_passes_the_64bit_protocol_checks() -> None:
    data = _kit_file("bzimage").read_bytes()
    hdr = parse_setup_header(data)
    assert hdr.version >= 0x020C
    assert hdr.xloadflags & 1                             # XLF_KERNEL_64
    assert hdr.relocatable and hdr.kernel_alignment & (hdr.kernel_alignment - 1) == 0
    assert hdr.pref_address >= layout.HIMEM_START
    assert hdr.init_size >= len(data) - hdr.setup_size


def test_debian_bzimage_loads_at_pref_address(make_memory) -> None:  # type: ignore[no-untyped-def]
    path = _kit_file("bzimage")
    data = path.read_bytes()
    hdr = parse_setup_header(data)
    mem: GuestMemory = make_memory(512 * MiB)
    plan = load_kernel(mem, path, initrd=None, cmdline="console=ttyS0", num_cpus=2, rsdp_addr=0xE0000)
    assert plan.rip == hdr.pref_address + 0x200
    assert mem.read(hdr.pref_address, 4096) == data[hdr.setup_size : hdr.setup_size + 4096]
    bp = layout.BOOT_PARAMS_ADDR
    assert mem.read(bp + 0x202, 4) == b"HdrS"
    assert mem.read_u32(bp + 0x260) == hdr.init_size     # copied from the image
    assert struct.unpack_from("<H", data, 0x206)[0] == mem.read_u16(bp + 0x206)


def test_debian_vmlinux_enters_at_its_physical_entry(make_memory) -> None:  # type: ignore[no-untyped-def]
    path = _kit_file("vmlinux")
    image = parse_elf(path.read_bytes())
    assert image.is64
    mem: GuestMemory = make_memory(512 * MiB)
    plan = load_kernel(mem, path, initrd=None, cmdline="console=ttyS0", num_cpus=1,
                       rsdp_addr=0xE0000, protocol="linux")
    assert plan.kind == "linux64" and plan.rip == image.entry
    auto = load_kernel(mem, path, initrd=None, cmdline="console=ttyS0", num_cpus=1, rsdp_addr=0xE0000)
    assert auto.kind == ("pvh" if image.pvh_entry is not None else "linux64")


def test_debian_kernel_is_not_a_pvm_guest() -> None:
    assert not kernel_is_pvm_capable(_kit_file("vmlinux"))
    assert not kernel_is_pvm_capable(_kit_file("bzimage"))
