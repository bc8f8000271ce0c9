"""Load a kernel into guest RAM and say how to enter it.

Three formats, told apart by their magic:

* an ELF with a Xen ``PHYS32_ENTRY`` note is entered through **PVH** (32-bit
  protected mode, paging off, ``ebx`` = ``hvm_start_info``); our test guest and
  PVH-capable Linux kernels take this path;
* any other x86-64 ELF is a Linux **vmlinux**: its PT_LOAD segments go to their
  physical addresses and it is entered at its 64-bit entry with ``rsi`` =
  ``boot_params``, as Firecracker does;
* a **bzImage** is loaded by the 64-bit boot protocol (``boot.rst``, "64-bit Boot
  Protocol"): the protected-mode kernel at ``pref_address`` (or the first
  ``kernel_alignment`` boundary above 1 MiB if it is relocatable), entered at
  ``load + 0x200``.

Kernels load at or above 1 MiB, so nothing they bring can overwrite the boot
structures and ACPI tables in the first MiB. The initrd goes as high as the
kernel allows below the MMIO hole, page aligned, as boot loaders conventionally
do, leaving the low RAM between it and the kernel to the kernel's own use.
"""

from __future__ import annotations

import os

from appliance.kvm import layout
from appliance.kvm.boot import bzimage, cpu, params, pvh
from appliance.kvm.boot.e820 import e820_map
from appliance.kvm.boot.elf import EM_X86_64, ElfImage, is_elf, parse_elf
from appliance.kvm.boot.errors import BootError
from appliance.kvm.boot.plan import BootPlan
from appliance.kvm.memory import GuestMemory, GuestMemoryError

PAGE = 0x1000

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see appliance.bootpath)
if TYPE_CHECKING:
    from typing import Literal

    from appliance.machine.config import StrPath

    Protocol = Literal["auto", "pvh", "linux"]


def load_kernel(
    mem: GuestMemory,
    kernel: StrPath,
    *,
    initrd: StrPath | None,
    cmdline: str,
    num_cpus: int,
    rsdp_addr: int,
    protocol: Protocol = "auto",
) -> BootPlan:
    """Load ``kernel`` (and ``initrd``) into ``mem`` and return the boot vCPU's entry state.

    Writes the kernel, initrd, command line, the boot GDT and, per protocol,
    ``boot_params`` with identity page tables or ``hvm_start_info``. Call it
    after the ACPI tables are built (``rsdp_addr`` is passed on to the kernel).

    :param protocol: ``"auto"`` takes PVH when the ELF has the note; ``"pvh"``
        or ``"linux"`` force one (``"linux"`` boots a PVH-capable vmlinux
        through its 64-bit entry instead).
    :raises BootError: When a file is missing or unreadable, the kernel is
        neither a bzImage nor an ELF kernel, it or the initrd does not fit in
        RAM, or the command line is too long.
    """
    if num_cpus < 1:
        raise BootError(f"cannot boot with {num_cpus} vCPUs")
    data = _read(kernel, "kernel")
    try:
        return _load(mem, kernel, data, initrd, cmdline, rsdp_addr, protocol)
    except GuestMemoryError as err:
        # Sizes are checked up front; this is the backstop for a RAM too small
        # to hold even the boot structures in the first MiB.
        raise BootError(f"guest RAM ({_mib(mem.size)} MiB) is too small for kernel {kernel}") from err


def _load(
    mem: GuestMemory, kernel: StrPath, data: bytes, initrd: StrPath | None, cmdline: str,
    rsdp_addr: int, protocol: Protocol,
) -> BootPlan:
    if is_elf(data):
        image = parse_elf(data)
        if image.pvh_entry is not None and protocol != "linux":
            return _load_pvh(mem, data, image, initrd, cmdline, rsdp_addr)
        if protocol == "pvh":
            raise BootError(f"kernel {kernel} has no PVH entry note (Xen PHYS32_ENTRY)")
        if not image.is64 or image.machine != EM_X86_64:
            raise BootError(f"kernel {kernel} is a 32-bit ELF without a PVH entry note")
        return _load_vmlinux(mem, data, image, initrd, cmdline, rsdp_addr)
    if bzimage.is_bzimage(data):
        if protocol == "pvh":
            raise BootError(f"kernel {kernel} is a bzImage, which has no PVH entry")
        return _load_bzimage(mem, data, initrd, cmdline, rsdp_addr)
    raise BootError(f"kernel {kernel} is neither a bzImage nor an ELF kernel")


def _load_pvh(
    mem: GuestMemory, data: bytes, image: ElfImage, initrd: StrPath | None, cmdline: str,
    rsdp_addr: int,
) -> BootPlan:
    assert image.pvh_entry is not None
    kernel_end = _load_segments(mem, data, image)
    _write_cmdline(mem, cmdline, layout.CMDLINE_MAX - 1)
    placed = _load_initrd(mem, initrd, kernel_end, addr_max=0xFFFFFFFF)
    e820 = e820_map(mem.size)
    start_info = pvh.write_start_info(
        mem, e820=e820, cmdline_addr=layout.CMDLINE_ADDR, initrd=placed, rsdp_addr=rsdp_addr
    )
    cpu.write_gdt(mem)
    return cpu.pvh_plan(
        image.pvh_entry, start_info, f"PVH ELF, entry {image.pvh_entry:#x}{_initrd_note(placed)}"
    )


def _load_vmlinux(
    mem: GuestMemory, data: bytes, image: ElfImage, initrd: StrPath | None, cmdline: str,
    rsdp_addr: int,
) -> BootPlan:
    entry = image.physical_entry()
    kernel_end = _load_segments(mem, data, image)
    limit = params.COMMAND_LINE_SIZE - 1
    _write_cmdline(mem, cmdline, limit)
    placed = _load_initrd(mem, initrd, kernel_end, addr_max=params.VMLINUX_INITRD_ADDR_MAX)
    params.write_boot_params(
        mem,
        header=params.synthesized_header(limit),
        e820=e820_map(mem.size),
        cmdline_addr=layout.CMDLINE_ADDR,
        initrd=placed,
        rsdp_addr=rsdp_addr,
        code32_start=min(s.paddr for s in image.segments),
    )
    cpu.write_gdt(mem)
    cr3 = cpu.write_identity_page_tables(mem)
    return cpu.linux64_plan(entry, cr3, f"ELF vmlinux, entry {entry:#x}{_initrd_note(placed)}")


def _load_bzimage(
    mem: GuestMemory, data: bytes, initrd: StrPath | None, cmdline: str, rsdp_addr: int
) -> BootPlan:
    hdr = bzimage.parse_setup_header(data)
    kernel = memoryview(data)[hdr.setup_size :]
    need = max(hdr.init_size, len(kernel))
    low_top = _low_ram_top(mem)
    candidates = [hdr.pref_address or layout.HIMEM_START]
    if hdr.relocatable:
        candidates.append(_align_up(layout.HIMEM_START, hdr.kernel_alignment))
    for load in candidates:
        if load >= layout.HIMEM_START and load + need <= low_top:
            break
    else:
        raise BootError(
            f"kernel needs {_mib(need)} MiB from {candidates[0]:#x}, "
            f"more than the {_mib(mem.size)} MiB of guest RAM allow"
        )
    mem.write(load, kernel)
    _write_cmdline(mem, cmdline, min(hdr.cmdline_size, layout.CMDLINE_MAX - 1))
    placed = _load_initrd(mem, initrd, load + need, addr_max=hdr.initrd_addr_max)
    params.write_boot_params(
        mem,
        header=hdr.raw,
        e820=e820_map(mem.size),
        cmdline_addr=layout.CMDLINE_ADDR,
        initrd=placed,
        rsdp_addr=rsdp_addr,
        code32_start=load,
    )
    cpu.write_gdt(mem)
    cr3 = cpu.write_identity_page_tables(mem)
    entry = load + bzimage.ENTRY_64_OFFSET
    version = f"{hdr.version >> 8}.{hdr.version & 0xFF:02d}"
    return cpu.linux64_plan(
        entry, cr3, f"bzImage protocol {version} at {load:#x}, entry {entry:#x}"
        f"{_initrd_note(placed)}"
    )


def _read(path: StrPath, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BootError(f"{what} {path} does not exist") from None
    except OSError as err:
        raise BootError(f"cannot read {what} {path}") from err


def _load_segments(mem: GuestMemory, data: bytes, image: ElfImage) -> int:
    """Copy the PT_LOAD segments to their physical addresses; returns the end of the highest."""
    view = memoryview(data)
    for seg in image.segments:
        if seg.paddr < layout.HIMEM_START or not mem.check(seg.paddr, seg.memsz):
            raise BootError(
                f"kernel segment at {seg.paddr:#x} ({seg.memsz} bytes) does not fit "
                f"in guest RAM above 1 MiB ({_mib(mem.size)} MiB)"
            )
    for seg in image.segments:
        mem.write(seg.paddr, view[seg.offset : seg.offset + seg.filesz])
        if seg.memsz > seg.filesz:
            mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)
    return max(seg.paddr + seg.memsz for seg in image.segments)


def _write_cmdline(mem: GuestMemory, cmdline: str, limit: int) -> None:
    raw = cmdline.encode()
    if b"\0" in raw:
        raise BootError("kernel command line contains a NUL character")
    if len(raw) > limit:
        raise BootError(f"kernel command line is {len(raw)} bytes; this kernel takes at most {limit}")
    mem.write(layout.CMDLINE_ADDR, raw + b"\0")


def _load_initrd(
    mem: GuestMemory, path: StrPath | None, kernel_end: int, *, addr_max: int
) -> tuple[int, int] | None:
    """Put the initrd page-aligned as high as allowed below ``addr_max`` and the MMIO hole.

    ``addr_max`` is the highest address the initrd may occupy (the bzImage's
    ``initrd_addr_max``, boot.rst).
    """
    if path is None:
        return None
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise BootError(f"initrd {path} does not exist") from None
    except OSError as err:
        raise BootError(f"cannot read initrd {path}") from err
    if size > mem.size:
        raise BootError(
            f"initrd {path} ({_mib(size)} MiB) is larger than guest RAM ({_mib(mem.size)} MiB)"
        )
    top = min(addr_max + 1, _low_ram_top(mem))
    addr = (top - size) & ~(PAGE - 1)
    if addr < _align_up(kernel_end, PAGE):
        raise BootError(
            f"no room for initrd {path} ({_mib(size)} MiB) between the kernel and {top:#x}"
        )
    data = _read(path, "initrd")
    if len(data) != size:
        raise BootError(f"initrd {path} changed size while being read")
    mem.write(addr, data)
    return addr, size


def _low_ram_top(mem: GuestMemory) -> int:
    """End of the RAM that starts at address 0 (below the 32-bit MMIO hole)."""
    for region in mem.regions:
        if region.start == 0:
            return min(region.end, layout.MMIO_HOLE_START)
    raise BootError("guest RAM does not start at address 0")


def _initrd_note(placed: tuple[int, int] | None) -> str:
    return f", initrd at {placed[0]:#x} ({placed[1]} bytes)" if placed else ""


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def _mib(n: int) -> int:
    return n >> 20
