"""Signatures of image formats we refuse rather than serve as raw."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.storage.formats import PROBE_HEAD, foreign_format


@pytest.mark.parametrize(("head", "name"), [
    (b"KDMV\x01\x00\x00\x00", "vmdk"),
    (b"# Disk DescriptorFile\nversion=1\n", "vmdk"),
    (b"conectix\x00\x00\x00\x02", "vpc"),
    (b"vhdxfile", "vhdx"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(0x40, b"\0") + b"\x7f\x10\xda\xbe", "vdi"),
    (b"QED\x00", "qed"),
    (b"LUKS\xba\xbe\x00\x01", "luks"),
    (b"WithoutFreeSpace", "parallels"),
    (b"QFI\xfb\x00\x00\x00\x01", "qcow"),
])
def test_each_signature_names_its_format(head: bytes, name: str) -> None:
    assert foreign_format(head.ljust(PROBE_HEAD, b"\0")) == name


@pytest.mark.parametrize("head", [b"QFI\xfb\x00\x00\x00\x03", b"QFI\xfb\x00\x00\x00\x02", b"", b"\0" * 512,
                                  b"\xebc\x90" + bytes(509), b"KDM", b"conecti"])
def test_qcow2_raw_and_short_heads_are_not_foreign(head: bytes) -> None:
    assert foreign_format(head) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=128))
def test_any_bytes_give_a_name_or_none(head: bytes) -> None:
    assert foreign_format(head) in {None, "vmdk", "vpc", "vhdx", "vdi", "qed", "luks", "parallels",
                                    "bochs", "cloop", "qcow"}
