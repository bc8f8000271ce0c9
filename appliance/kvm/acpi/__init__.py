"""ACPI tables for our machine: RSDP, RSDT/XSDT, FADT (+FACS), DSDT and MADT.

Distribution kernels find CPUs, the IOAPIC, the PM registers, the PCI root
bridge and the power-off/reset paths here (they have no MP-table support), and
the test guest reads the MADT and FADT the same way. The tables live in the
BIOS area at :data:`layout.ACPI_TABLES_ADDR`, with the RSDP first so the legacy
scan of 0xE0000-0xFFFFF finds it too (ACPI 6.5 §5.2.5.1); e820 marks the area
reserved.

Public API::

    build_acpi(mem, *, num_cpus, mem_size) -> rsdp_addr
"""

from __future__ import annotations

from appliance.errors import ConfigError
from appliance.kvm import layout
from appliance.kvm.acpi import tables
from appliance.kvm.acpi.dsdt import dsdt
from appliance.kvm.memory import GuestMemory


class AcpiError(ConfigError):
    """The machine cannot be described by our ACPI tables (e.g. too many vCPUs)."""


class _Allocator:
    def __init__(self, start: int, end: int) -> None:
        self.next = start
        self.end = end

    def take(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise AcpiError("ACPI tables do not fit in the BIOS area")
        self.next = addr + size
        return addr


def build_acpi(mem: GuestMemory, *, num_cpus: int, mem_size: int) -> int:
    """Write all ACPI tables into guest RAM; returns the RSDP address.

    :param mem_size: guest RAM size (unused by the tables today; kept so
        memory-dependent tables such as SRAT can be added without a new API).
    :raises AcpiError: When ``num_cpus`` is outside 1-254.
    """
    if not 1 <= num_cpus <= tables.MAX_XAPIC_ID:
        raise AcpiError(f"-smp {num_cpus}: ACPI describes 1 to {tables.MAX_XAPIC_ID} vCPUs")
    alloc = _Allocator(layout.ACPI_TABLES_ADDR, layout.ACPI_TABLES_END)
    rsdp_addr = alloc.take(36)
    dsdt_table = dsdt()
    madt_table = tables.madt(num_cpus)
    facs_addr = alloc.take(tables.FACS_SIZE, align=64)   # §5.2.10: 64-byte aligned
    dsdt_addr = alloc.take(len(dsdt_table))
    fadt_addr = alloc.take(tables.FADT_SIZE)
    madt_addr = alloc.take(len(madt_table))
    entries = [fadt_addr, madt_addr]
    xsdt_table = tables.xsdt(entries)
    rsdt_table = tables.rsdt(entries)
    xsdt_addr = alloc.take(len(xsdt_table))
    rsdt_addr = alloc.take(len(rsdt_table))

    mem.fill(layout.ACPI_TABLES_ADDR, alloc.next - layout.ACPI_TABLES_ADDR)
    mem.write(facs_addr, tables.facs())
    mem.write(dsdt_addr, dsdt_table)
    mem.write(fadt_addr, tables.fadt(dsdt_addr=dsdt_addr, facs_addr=facs_addr))
    mem.write(madt_addr, madt_table)
    mem.write(xsdt_addr, xsdt_table)
    mem.write(rsdt_addr, rsdt_table)
    mem.write(rsdp_addr, tables.rsdp(rsdt_addr=rsdt_addr, xsdt_addr=xsdt_addr))
    return rsdp_addr


__all__ = ["AcpiError", "build_acpi"]
