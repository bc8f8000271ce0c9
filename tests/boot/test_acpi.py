"""ACPI tables: checksums, layouts as ACPI 6.5 §5.2 defines them, and `iasl -d` as the oracle."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from appliance.kvm import layout
from appliance.kvm.acpi import AcpiError, aml, build_acpi
from appliance.kvm.memory import GuestMemory, MemoryRegion

MiB = 1 << 20
needs_iasl = pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")


def _memory() -> GuestMemory:
    return GuestMemory([MemoryRegion(0, bytearray(2 * MiB))])


def _table(mem: GuestMemory, addr: int) -> bytes:
    return mem.read(addr, mem.read_u32(addr + 4))


def _tables(num_cpus: int) -> tuple[int, bytes, dict[str, bytes]]:
    """Build the tables and collect them the way an OS would: RSDP → XSDT → FADT → DSDT/FACS."""
    mem = _memory()
    rsdp_addr = build_acpi(mem, num_cpus=num_cpus, mem_size=256 * MiB)
    rsdp = mem.read(rsdp_addr, 36)
    xsdt = _table(mem, struct.unpack_from("<Q", rsdp, 24)[0])
    found = {"XSDT": xsdt, "RSDT": _table(mem, struct.unpack_from("<I", rsdp, 16)[0])}
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        table = _table(mem, addr)
        found[table[:4].decode()] = table
    fadt = found["FACP"]
    found["DSDT"] = _table(mem, struct.unpack_from("<Q", fadt, 140)[0])
    assert struct.unpack_from("<Q", fadt, 132)[0] == 0    # X_FIRMWARE_CTRL unused below 4 GiB
    found["FACS"] = mem.read(struct.unpack_from("<I", fadt, 36)[0], 64)
    assert found["FACS"][:4] == b"FACS"
    return rsdp_addr, rsdp, found


def test_rsdp_is_where_the_legacy_scan_looks() -> None:
    rsdp_addr, rsdp, _ = _tables(1)
    assert rsdp_addr == layout.ACPI_TABLES_ADDR
    assert 0xE0000 <= rsdp_addr < 0x100000 and rsdp_addr % 16 == 0
    assert rsdp[:8] == b"RSD PTR "
    assert rsdp[15] == 2                                   # revision: ACPI 2.0+
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36     # length


@pytest.mark.parametrize("num_cpus", [1, 4, 254])
def test_all_checksums_hold(num_cpus: int) -> None:
    _, rsdp, tables = _tables(num_cpus)
    assert sum(rsdp[:20]) % 256 == 0
    assert sum(rsdp) % 256 == 0
    for name, table in tables.items():
        if name != "FACS":                                 # the FACS has no checksum
            assert sum(table) % 256 == 0, name
            assert struct.unpack_from("<I", table, 4)[0] == len(table)


def test_rsdt_and_xsdt_list_the_same_tables() -> None:
    _, _, tables = _tables(2)
    xsdt = [a for (a,) in struct.iter_unpack("<Q", tables["XSDT"][36:])]
    rsdt = [a for (a,) in struct.iter_unpack("<I", tables["RSDT"][36:])]
    assert xsdt == rsdt and len(xsdt) == 2


def test_tables_fit_in_the_bios_area() -> None:
    mem = _memory()
    build_acpi(mem, num_cpus=254, mem_size=256 * MiB)
    _, _, tables = _tables(254)
    assert sum(len(t) for t in tables.values()) < layout.ACPI_TABLES_END - layout.ACPI_TABLES_ADDR


@pytest.mark.parametrize("num_cpus", [1, 3, 16, 254])
def test_madt_has_one_enabled_local_apic_per_vcpu(num_cpus: int) -> None:
    madt = _tables(num_cpus)[2]["APIC"]
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_ADDR, 1)   # PCAT_COMPAT
    lapics, ioapics, overrides = [], [], []
    off = 44
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        assert length >= 2
        if kind == 0:
            lapics.append(struct.unpack_from("<BBI", madt, off + 2))
        elif kind == 1:
            ioapics.append(struct.unpack_from("<BxII", madt, off + 2))
        elif kind == 2:
            overrides.append(struct.unpack_from("<BBIH", madt, off + 2))
        off += length
    assert off == len(madt)
    assert lapics == [(i, i, 1) for i in range(num_cpus)]  # uid, APIC id = index, enabled
    assert ioapics == [(num_cpus, layout.IOAPIC_ADDR, 0)]
    assert (0, 0, 2, 0) in overrides                       # IRQ0 -> GSI2
    assert (0, 9, 9, 0x000D) in overrides                  # SCI: level, active high


def test_fadt_fields_at_their_offsets() -> None:
    fadt = _tables(1)[2]["FACP"]
    assert len(fadt) == 276 and fadt[8] == 6               # revision 6
    assert struct.unpack_from("<H", fadt, 46)[0] == layout.SCI_IRQ
    assert struct.unpack_from("<I", fadt, 48)[0] == 0      # SMI_CMD: always in ACPI mode
    assert struct.unpack_from("<I", fadt, 56)[0] == layout.PM1A_EVT_BLK
    assert struct.unpack_from("<I", fadt, 64)[0] == layout.PM1A_CNT_BLK
    assert struct.unpack_from("<I", fadt, 76)[0] == layout.PM_TMR_BLK
    assert fadt[88:92] == bytes([4, 2, 0, 4])
    assert struct.unpack_from("<H", fadt, 109)[0] & 0x2    # IAPC_BOOT_ARCH: 8042
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 10)                               # RESET_REG_SUP
    assert not flags & (1 << 20)                           # not HW_REDUCED_ACPI
    assert fadt[116:128] == struct.pack("<BBBBQ", 1, 8, 0, 1, layout.RESET_PORT)
    assert fadt[128] == layout.RESET_VALUE
    assert struct.unpack_from("<Q", fadt, 172 + 4)[0] == layout.PM1A_CNT_BLK   # X_PM1a_CNT_BLK
    assert fadt[172] == 1                                  # ... in system I/O space


def test_dsdt_s5_package_carries_our_slp_typ() -> None:
    dsdt = _tables(1)[2]["DSDT"]
    s5 = aml.name("\\_S5_", aml.package(*(aml.integer(v) for v in (layout.S5_SLP_TYP,) * 2),
                                        aml.integer(0), aml.integer(0)))
    assert s5 in dsdt


def test_too_many_or_no_vcpus_are_refused() -> None:
    for n in (0, 255):
        with pytest.raises(AcpiError):
            build_acpi(_memory(), num_cpus=n, mem_size=256 * MiB)


def _iasl(tmp_path: Path, name: str, table: bytes) -> str:
    dat = tmp_path / f"{name.lower()}.dat"
    dat.write_bytes(table)
    proc = subprocess.run(["iasl", "-d", dat.name], cwd=tmp_path, capture_output=True, text=True,
                          timeout=30)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    for word in ("Error", "Warning", "Incorrect", "Invalid"):
        assert word not in log, log
    dsl = (tmp_path / f"{name.lower()}.dsl").read_text()
    for word in ("Incorrect", "Invalid", "Error"):
        assert word not in dsl, dsl
    return dsl


@needs_iasl
@pytest.mark.parametrize("num_cpus", [1, 4])
def test_every_table_disassembles_cleanly(tmp_path: Path, num_cpus: int) -> None:
    _, _, tables = _tables(num_cpus)
    dsl = {name: _iasl(tmp_path, name, table) for name, table in tables.items()}
    assert dsl["APIC"].count("[Processor Local APIC]") == num_cpus
    assert "[I/O APIC]" in dsl["APIC"]
    assert dsl["APIC"].count("[Interrupt Source Override]") == 2
    assert "Reset Register Supported (V2) : 1" in dsl["FACP"]
    assert "8042 Present on ports 60/64 (V2) : 1" in dsl["FACP"]
    assert "Hardware Reduced (V5) : 0" in dsl["FACP"]


@needs_iasl
def test_dsdt_disassembles_to_the_expected_objects(tmp_path: Path) -> None:
    dsl = _iasl(tmp_path, "DSDT", _tables(1)[2]["DSDT"])
    for expected in (
        "Name (\\_S5, Package (0x04)",
        "Scope (\\_SB)",
        "Device (PCI0)",
        'EisaId ("PNP0A08")',
        'EisaId ("PNP0A03")',
        "Name (_SEG, Zero)",
        "Name (_BBN, Zero)",
        "WordBusNumber (ResourceProducer",
        "0x00FF,             // Range Maximum",
        "0x0CF8,             // Range Minimum",
        "0x0CF7,             // Range Maximum",
        "0x0D00,             // Range Minimum",
        f"0x{layout.PCI_MMIO_START:08X},         // Range Minimum",
        f"0x{layout.PCI_MMIO_END - 1:08X},         // Range Maximum",
        "Device (COM1)",
        'EisaId ("PNP0501")',
        "IRQNoFlags ()",
    ):
        assert expected in dsl, expected
