"""The AML encoder's building blocks (ACPI 6.5 §20.2)."""

from __future__ import annotations

import pytest

from appliance.kvm.acpi import aml


@pytest.mark.parametrize(
    ("body", "encoded"),
    [
        (0, b"\x01"),
        (0x3E, b"\x3f"),                        # largest one-byte PkgLength
        (0x3F, b"\x41\x04"),                    # 0x41 total: low nibble 1, next byte 0x04
        (0xFFD, b"\x4f\xff"),                   # largest two-byte form: 0xFFF total
        (0xFFE, b"\x81\x00\x01"),               # needs three bytes: 0x1001 total
    ],
)
def test_pkg_length_counts_itself(body: int, encoded: bytes) -> None:
    assert aml.pkg_length(body) == encoded


def test_integers_use_the_shortest_form() -> None:
    assert aml.integer(0) == b"\x00"
    assert aml.integer(1) == b"\x01"
    assert aml.integer(5) == b"\x0a\x05"
    assert aml.integer(0x1234) == b"\x0b\x34\x12"
    assert aml.integer(0xC0000000) == b"\x0c\x00\x00\x00\xc0"
    assert aml.integer(1 << 40) == b"\x0e" + (1 << 40).to_bytes(8, "little")


def test_eisa_id_compresses_as_iasl_does() -> None:
    assert aml.eisa_id("PNP0A03") == b"\x0c\x41\xd0\x0a\x03"   # DWord 0x030AD041
    assert aml.eisa_id("PNP0501") == b"\x0c\x41\xd0\x05\x01"


def test_name_strings() -> None:
    assert aml.name_string("_HID") == b"_HID"
    assert aml.name_string("\\_SB_") == b"\\_SB_"
    assert aml.name_string("\\_SB.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.name_string("A.B.C") == b"\x2f\x03A___B___C___"
    with pytest.raises(ValueError):
        aml.name_seg("toolong")
