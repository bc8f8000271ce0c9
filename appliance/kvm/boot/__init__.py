"""Kernel loading: PVH ELF, Linux bzImage and vmlinux, boot_params, e820, page tables.

Public API::

    load_kernel(mem, kernel, *, initrd, cmdline, num_cpus, rsdp_addr) -> BootPlan
    e820_map(mem_size) -> [(addr, size, type)]
    linux_e820_lines(mem_size) -> ["BIOS-e820: [mem 0x...-0x...] usable", ...]
    kernel_is_pvm_capable(path) -> bool
    BootError (a ConfigError), BootPlan, Segment
"""

from appliance.kvm.boot.e820 import E820_RAM, E820_RESERVED, e820_map, linux_e820_lines
from appliance.kvm.boot.errors import BootError
from appliance.kvm.boot.loader import load_kernel
from appliance.kvm.boot.plan import BootPlan, Segment
from appliance.kvm.boot.pvm import kernel_is_pvm_capable

__all__ = [
    "E820_RAM",
    "E820_RESERVED",
    "BootError",
    "BootPlan",
    "Segment",
    "e820_map",
    "kernel_is_pvm_capable",
    "linux_e820_lines",
    "load_kernel",
]
