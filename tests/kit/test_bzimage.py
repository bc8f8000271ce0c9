"""Unpacking vmlinux from a bzImage: setup header, LZ4 legacy frames, errors."""

from __future__ import annotations

import gzip
import struct

import lz4.block
import pytest

from appliance.kit.bzimage import (
    LZ4_LEGACY_BLOCK,
    LZ4_LEGACY_MAGIC,
    BzImageError,
    decompress_lz4_legacy,
    extract_vmlinux,
    parse_setup_header,
)

ELF = b"\x7fELF" + bytes(range(256)) * 300


def lz4_legacy(data: bytes, block: int = LZ4_LEGACY_BLOCK, size_word: bool = True) -> bytes:
    out = struct.pack("<I", LZ4_LEGACY_MAGIC)
    for i in range(0, len(data), block):
        c = lz4.block.compress(data[i : i + block], store_size=False)
        out += struct.pack("<I", len(c)) + c
    if size_word:
        out += struct.pack("<I", len(data))
    return out


def bzimage(payload: bytes, setup_sects: int = 3, version: int = 0x20F, slack: int = 100) -> bytes:
    img = bytearray((setup_sects + 1) * 512 + 64)
    img[0x1F1] = setup_sects
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, version)
    struct.pack_into("<II", img, 0x248, 64, len(payload))
    return bytes(img) + payload + bytes(slack)


def test_lz4_legacy_payload_unpacks_to_the_elf() -> None:
    assert extract_vmlinux(bzimage(lz4_legacy(ELF))) == ELF


def test_lz4_legacy_frame_with_many_blocks_is_joined_in_order() -> None:
    data = bytes(range(251)) * 1000
    assert decompress_lz4_legacy(lz4_legacy(data, block=4096)) == data


def test_lz4_frame_without_size_word_also_unpacks() -> None:
    assert decompress_lz4_legacy(lz4_legacy(ELF, size_word=False)) == ELF


def test_gzip_payload_unpacks() -> None:
    assert extract_vmlinux(bzimage(gzip.compress(ELF))) == ELF


def test_setup_header_fields_are_read() -> None:
    hdr = parse_setup_header(bzimage(b"x" * 10, setup_sects=5))
    assert (hdr.setup_sects, hdr.pm_start, hdr.payload_offset, hdr.payload_length) == (5, 3072, 64, 10)


@pytest.mark.parametrize(
    "image, message",
    [
        (b"short", "too short"),
        (bytes(4096), "HdrS"),
        (bzimage(lz4_legacy(ELF), version=0x207), "no payload fields"),
        (bzimage(b"\x00" * 64), "unknown payload compression"),
        (bzimage(lz4_legacy(b"not an elf" * 10)), "not an ELF"),
    ],
)
def test_bad_images_are_refused_with_a_reason(image: bytes, message: str) -> None:
    with pytest.raises(BzImageError, match=message):
        extract_vmlinux(image)


def test_payload_running_past_the_file_is_refused() -> None:
    img = bytearray(bzimage(lz4_legacy(ELF), slack=0))
    struct.pack_into("<I", img, 0x24C, len(img))
    with pytest.raises(BzImageError, match="outside the file"):
        extract_vmlinux(bytes(img))


def test_truncated_lz4_block_is_refused() -> None:
    frame = lz4_legacy(ELF, size_word=False)
    with pytest.raises(BzImageError, match="runs past"):
        decompress_lz4_legacy(frame[:-10])


def test_corrupt_lz4_block_is_refused() -> None:
    frame = bytearray(lz4_legacy(ELF, size_word=False))
    frame[8:40] = b"\xff" * 32
    with pytest.raises(BzImageError):
        decompress_lz4_legacy(bytes(frame))
