"""ACPI table encoders: RSDP, RSDT/XSDT, FADT, FACS, MADT and the table header.

Layouts are those of ACPI 6.5 chapter 5.2 (table numbers in the docstrings).
Each function returns the finished table bytes with its checksum set, given
the guest addresses of the tables it points to; placement is
:func:`appliance.kvm.acpi.build_acpi`'s job.
"""

from __future__ import annotations

import struct

from appliance.kvm import layout

OEM_ID = b"APPLNC"
OEM_TABLE_ID = b"APPLIANC"
OEM_REVISION = 1
CREATOR_ID = b"APPL"
CREATOR_REVISION = 1
HEADER = struct.Struct("<4sIBB6s8sI4sI")    # 36 bytes (Table 5.4)
CHECKSUM_OFFSET = 9

# Generic Address Structure (Table 5.1).
GAS = struct.Struct("<BBBBQ")
GAS_SYSTEM_IO = 1
ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD = 1, 2, 3

# FADT (Table 5.9).
FADT_REVISION = 6
FADT_MINOR_REVISION = 0
FADT_SIZE = 276
FADT_F_WBINVD = 1 << 0
FADT_F_PROC_C1 = 1 << 2
FADT_F_SLP_BUTTON = 1 << 5        # no fixed-feature sleep button
FADT_F_RESET_REG_SUP = 1 << 10
BOOT_ARCH_LEGACY_DEVICES = 1 << 0
BOOT_ARCH_8042 = 1 << 1
BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
P_LVL2_LAT_NONE = 101             # > 100 µs: C2 not supported
P_LVL3_LAT_NONE = 1001            # > 1000 µs: C3 not supported

# MADT (Table 5.43) and its structures.
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1 << 0         # dual 8259 PICs present (KVM's in-kernel irqchip has them)
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INT_SRC_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
LAPIC_ENABLED = 1 << 0
MPS_POLARITY_HIGH = 1
MPS_TRIGGER_LEVEL = 3 << 2
MAX_XAPIC_ID = 0xFE               # 0xFF is the broadcast id

FACS_SIZE = 64


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` sum to zero modulo 256."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: header plus ``body``, checksummed (§5.2.6)."""
    table = bytearray(
        HEADER.pack(
            signature, HEADER.size + len(body), revision, 0, OEM_ID,
            OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION,
        )
        + body
    )
    table[CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def rsdp(*, rsdt_addr: int, xsdt_addr: int) -> bytes:
    """RSDP revision 2 (Table 5.3): first checksum over 20 bytes, extended over all 36."""
    data = bytearray(
        struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, rsdt_addr, 36, xsdt_addr, 0)
    )
    data[8] = checksum(data[:20])
    data[32] = checksum(data)
    return bytes(data)


def rsdt(entries: list[int]) -> bytes:
    return sdt(b"RSDT", 1, struct.pack(f"<{len(entries)}I", *entries))


def xsdt(entries: list[int]) -> bytes:
    return sdt(b"XSDT", 1, struct.pack(f"<{len(entries)}Q", *entries))


def facs() -> bytes:
    """FACS (Table 5.14): no checksum; firmware waking vectors unused (no S3)."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, 2, 0)


def _gas_io(port: int, width_bits: int, access: int) -> bytes:
    return GAS.pack(GAS_SYSTEM_IO, width_bits, 0, access, port)


def fadt(*, dsdt_addr: int, facs_addr: int) -> bytes:
    """FADT revision 6.0 with a PM1a event/control block and PM timer (not hardware-reduced).

    SMI_CMD is 0, which tells the OS that the platform is always in ACPI mode;
    the PM device reports SCI_EN set accordingly. Reset goes through the I/O
    port of ``layout.RESET_PORT`` (RESET_REG_SUP).
    """
    body = bytearray(FADT_SIZE - HEADER.size)

    def put(fmt: str, offset: int, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - HEADER.size, *values)

    put("<II", 36, facs_addr, dsdt_addr)               # FIRMWARE_CTRL, DSDT
    put("<H", 46, layout.SCI_IRQ)                      # SCI_INT
    put("<I", 48, 0)                                   # SMI_CMD: ACPI always enabled
    put("<I", 56, layout.PM1A_EVT_BLK)
    put("<I", 64, layout.PM1A_CNT_BLK)
    put("<I", 76, layout.PM_TMR_BLK)
    put("<BBBB", 88, 4, 2, 0, 4)                       # PM1_EVT_LEN, PM1_CNT_LEN, PM2, PM_TMR_LEN
    put("<HH", 96, P_LVL2_LAT_NONE, P_LVL3_LAT_NONE)
    put("<H", 109, BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042 | BOOT_ARCH_VGA_NOT_PRESENT)
    put("<I", 112, FADT_F_WBINVD | FADT_F_PROC_C1 | FADT_F_SLP_BUTTON | FADT_F_RESET_REG_SUP)
    body[116 - HEADER.size : 128 - HEADER.size] = _gas_io(layout.RESET_PORT, 8, ACCESS_BYTE)
    put("<B", 128, layout.RESET_VALUE)
    put("<B", 131, FADT_MINOR_REVISION)
    # X_FIRMWARE_CTRL stays 0: it "must be zero" when FIRMWARE_CTRL is set
    # (Table 5.9), and Linux would otherwise map the FACS twice.
    put("<Q", 140, dsdt_addr)                          # X_DSDT
    for offset, port, width, access in (
        (148, layout.PM1A_EVT_BLK, 32, ACCESS_WORD),   # X_PM1a_EVT_BLK: status + enable words
        (172, layout.PM1A_CNT_BLK, 16, ACCESS_WORD),   # X_PM1a_CNT_BLK
        (208, layout.PM_TMR_BLK, 32, ACCESS_DWORD),    # X_PM_TMR_BLK
    ):
        body[offset - HEADER.size : offset - HEADER.size + GAS.size] = _gas_io(port, width, access)
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def madt(num_cpus: int) -> bytes:
    """MADT: one enabled local APIC per vCPU (APIC id = index), the IOAPIC and the ISA overrides.

    The IOAPIC takes id ``num_cpus`` so that it clashes with no local APIC. IRQ 0
    (the PIT) is wired to GSI 2 and the SCI is level-triggered, active-high, as
    on every PC chipset QEMU models.
    """
    if not 1 <= num_cpus <= MAX_XAPIC_ID:
        raise ValueError(f"the MADT describes 1 to {MAX_XAPIC_ID} vCPUs, not {num_cpus}")
    body = struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT)
    for i in range(num_cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, i, i, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, num_cpus, 0, layout.IOAPIC_ADDR, 0)
    body += struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, 0, 2, 0)
    body += struct.pack(
        "<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, layout.SCI_IRQ, layout.SCI_IRQ,
        MPS_POLARITY_HIGH | MPS_TRIGGER_LEVEL,
    )
    # LINT1 of every processor (uid 0xFF) is the NMI input.
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, 1)
    return sdt(b"APIC", MADT_REVISION, body)
