"""Fuzzed inputs to the kit's binary parsers raise only their typed errors."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.kit.bzimage import BzImageError, decompress_lz4_legacy, extract_vmlinux
from appliance.kit.errors import ModuleError
from appliance.kit.modules import modinfo


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_random_bzimages_raise_only_bzimage_error(body: bytes, off: int, length: int) -> None:
    img = bytearray(body.ljust(0x260, b"\0"))
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<HII", img, 0x206, 0x20F, 0, 0)
    struct.pack_into("<II", img, 0x248, off, length)
    try:
        extract_vmlinux(bytes(img))
    except BzImageError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_lz4_frames_raise_only_bzimage_error(tail: bytes) -> None:
    try:
        decompress_lz4_legacy(struct.pack("<I", 0x184C2102) + tail)
    except BzImageError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=1024))
def test_random_elf_objects_raise_only_module_error(body: bytes) -> None:
    data = b"\x7fELF\x02\x01" + body
    try:
        modinfo(data)
    except ModuleError:
        pass
