"""The guest physical address map every part of the machine agrees on.

Low RAM runs from 0 up to the 32-bit MMIO hole; what does not fit below the
hole continues at 4 GiB. The hole holds the PCI memory window that the DSDT
announces (BARs are assigned there by us, there is no firmware), then the
IOAPIC and local APIC at their architectural addresses.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# Boot-time structures in the first MiB (below the EBDA at 0x9FC00).
GDT_ADDR = 0x500
PVH_START_INFO_ADDR = 0x6000      # struct hvm_start_info + its memmap table
BOOT_PARAMS_ADDR = 0x7000         # Linux zero page
PML4_ADDR = 0x9000                # identity page tables built for 64-bit entry
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00
ACPI_TABLES_ADDR = 0xE0000        # RSDP here is also found by the legacy BIOS-area scan
ACPI_TABLES_END = 0x100000
HIMEM_START = 0x100000            # kernels load at 1 MiB

# 32-bit MMIO hole.
MMIO_HOLE_START = 0xC000_0000
PCI_MMIO_START = 0xC000_0000      # 32-bit PCI window (64-bit BARs may live here too)
PCI_MMIO_END = 0xFC00_0000        # exclusive
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
HIGH_RAM_START = 0x1_0000_0000

# Legacy I/O ports.
UART_COM1 = 0x3F8
UART_COM1_IRQ = 4
I8042_DATA = 0x60
I8042_CMD = 0x64
RTC_PORT = 0x70
PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
RESET_PORT = 0xCF9                # FADT RESET_REG: write RESET_VALUE to reset
RESET_VALUE = 0x06
PM_BASE = 0x600                   # ACPI PM1a event block (4 bytes)
PM1A_EVT_BLK = PM_BASE
PM1A_CNT_BLK = PM_BASE + 4        # 2 bytes; SLP_TYP in bits 10-12, SLP_EN bit 13
PM_TMR_BLK = PM_BASE + 8          # 4 bytes, 3.579545 MHz
SCI_IRQ = 9
S5_SLP_TYP = 5                    # the \_S5 package value our DSDT declares

# GSIs 0-23 belong to the IOAPIC; MSI routes are allocated above them.
IOAPIC_PINS = 24
FIRST_MSI_GSI = 24


def ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """Guest RAM as ``(start, size)`` ranges for ``mem_size`` bytes of memory."""
    low = min(mem_size, MMIO_HOLE_START)
    ranges = [(0, low)]
    if mem_size > low:
        ranges.append((HIGH_RAM_START, mem_size - low))
    return ranges


# Boot-time structures added for the loaders (appliance.kvm.boot).
BOOT_STACK_ADDR = 0x8FF0          # initial rsp/esp: top of the page below PML4_ADDR
PDPT_ADDR = PML4_ADDR + 0x1000    # one page directory pointer table
PD_ADDR = PML4_ADDR + 0x2000      # four page directories: identity map of 0-4 GiB, 2 MiB pages
PAGE_TABLES_END = PD_ADDR + 4 * 0x1000
