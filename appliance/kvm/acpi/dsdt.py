"""Our DSDT, encoded directly as AML (no iasl at build time).

In ASL it reads::

    DefinitionBlock ("", "DSDT", 2, "APPLNC", "APPLIANC", 1) {
        Name (\\_S5, Package () { S5_SLP_TYP, S5_SLP_TYP, 0, 0 })
        Scope (\\_SB) {
            Device (PCI0) {
                Name (_HID, EisaId ("PNP0A08"))      // PCI Express root bridge
                Name (_CID, EisaId ("PNP0A03"))      // ... compatible with PCI
                Name (_ADR, 0)  Name (_UID, 0)  Name (_SEG, 0)  Name (_BBN, 0)
                Name (_CRS, ResourceTemplate () {
                    WordBusNumber (0x00-0xFF)
                    IO (Decode16, 0xCF8, 0xCF8, 1, 8)  // config mechanism #1 ports
                    WordIO (0x0000-0x0CF7)  WordIO (0x0D00-0xFFFF)
                    DWordMemory (PCI_MMIO_START - PCI_MMIO_END-1)
                })
            }
            Device (COM1) {
                Name (_HID, EisaId ("PNP0501"))  Name (_UID, 1)
                Name (_CRS, ResourceTemplate () { IO (Decode16, 0x3F8, 0x3F8, 1, 8)  IRQNoFlags () {4} })
            }
        }
    }

The \\_S5 package gives the SLP_TYP our PM device treats as soft-off
(ACPI 6.5 §7.4.2); the root bridge's _CRS hands the OS the whole I/O space
except the config ports, and the 32-bit window where BARs live.
"""

from __future__ import annotations

from appliance.kvm import layout
from appliance.kvm.acpi import aml
from appliance.kvm.acpi.tables import sdt

DSDT_REVISION = 2                 # 64-bit AML integers


def dsdt() -> bytes:
    s5 = aml.name(
        "\\_S5_",
        aml.package(
            aml.integer(layout.S5_SLP_TYP), aml.integer(layout.S5_SLP_TYP),
            aml.integer(0), aml.integer(0),
        ),
    )
    pci0 = aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),
        aml.name("_CID", aml.eisa_id("PNP0A03")),
        aml.name("_ADR", aml.integer(0)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_SEG", aml.integer(0)),
        aml.name("_BBN", aml.integer(0)),
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.word_address(aml.SPACE_BUS, 0x00, 0xFF),
                aml.io_port(layout.PCI_CONFIG_ADDRESS, 8),
                aml.word_address(aml.SPACE_IO, 0x0000, 0x0CF7, type_flags=aml.IO_RANGE_ENTIRE),
                aml.word_address(aml.SPACE_IO, 0x0D00, 0xFFFF, type_flags=aml.IO_RANGE_ENTIRE),
                aml.dword_memory(layout.PCI_MMIO_START, layout.PCI_MMIO_END - 1),
            ),
        ),
    )
    com1 = aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(1)),
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.io_port(layout.UART_COM1, 8), aml.irq_noflags(layout.UART_COM1_IRQ)
            ),
        ),
    )
    return sdt(b"DSDT", DSDT_REVISION, s5 + aml.scope("\\_SB_", pci0, com1))
