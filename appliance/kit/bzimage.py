"""Unpack the uncompressed ``vmlinux`` ELF from a bzImage.

The payload sits after the real-mode setup sectors; the setup header gives its
offset and length (Linux boot protocol 2.08+, ``Documentation/arch/x86/boot.rst``:
``payload_offset`` at 0x248 and ``payload_length`` at 0x24c, both relative to the
start of the protected-mode code). Debian's kernels compress it with LZ4 in the
*legacy* frame format (``lz4 -l``): magic 0x184C2102, then blocks each preceded
by a 32-bit little-endian compressed size, every block at most 8 MiB
uncompressed. The kernel's build appends the uncompressed size as a final
32-bit word, so the payload's last four bytes are not a block. gzip, xz and
zstd payloads are handled too, for kernels built differently.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from dataclasses import dataclass

import lz4.block
import zstandard

from appliance.kit.errors import BzImageError

HDRS_MAGIC = b"HdrS"
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20
ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True, slots=True)
class SetupHeader:
    """The setup-header fields the unpacker needs."""

    setup_sects: int
    version: int
    payload_offset: int
    payload_length: int

    @property
    def pm_start(self) -> int:
        """File offset of the protected-mode kernel (setup sectors plus the boot sector)."""
        return (self.setup_sects + 1) * 512


def parse_setup_header(image: bytes) -> SetupHeader:
    """Read the setup header of a bzImage.

    :raises BzImageError: When the file is too short, lacks ``HdrS`` or predates
        protocol 2.08 (no payload fields).
    """
    if len(image) < 0x250:
        raise BzImageError("file is too short to be a bzImage")
    if image[0x202:0x206] != HDRS_MAGIC:
        raise BzImageError("no 'HdrS' setup header signature")
    setup_sects = image[0x1F1] or 4  # 0 means 4 for ancient kernels (boot.rst)
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        raise BzImageError(f"boot protocol {version >> 8}.{version & 0xFF} has no payload fields")
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    return SetupHeader(setup_sects, version, payload_offset, payload_length)


def payload(image: bytes) -> bytes:
    """The compressed payload of a bzImage, bounds-checked against the file."""
    hdr = parse_setup_header(image)
    start = hdr.pm_start + hdr.payload_offset
    end = start + hdr.payload_length
    if hdr.payload_length == 0 or end > len(image):
        raise BzImageError("payload lies outside the file")
    return image[start:end]


def decompress_lz4_legacy(data: bytes) -> bytes:
    """Decompress an LZ4 legacy frame (as the kernel's ``lz4 -l`` writes it).

    Trailing bytes shorter than a block header (the kernel's appended size word)
    are ignored, and a repeated magic (concatenated frames) is skipped.

    :raises BzImageError: When the frame is truncated or a block is corrupt.
    """
    if len(data) < 4 or struct.unpack_from("<I", data, 0)[0] != LZ4_LEGACY_MAGIC:
        raise BzImageError("payload is not an LZ4 legacy frame")
    out: list[bytes] = []
    off = 4
    while off < len(data):
        if len(data) - off < 4:
            raise BzImageError(f"LZ4 frame truncated at offset {off}")
        (size,) = struct.unpack_from("<I", data, off)
        if size == LZ4_LEGACY_MAGIC:
            off += 4
            continue
        if off + 4 == len(data):
            break  # the uncompressed-size word the kernel build appends
        off += 4
        if size == 0 or off + size > len(data):
            raise BzImageError(f"LZ4 block at offset {off - 4} runs past the payload")
        try:
            out.append(lz4.block.decompress(data[off : off + size], uncompressed_size=LZ4_LEGACY_BLOCK))
        except lz4.block.LZ4BlockError as err:
            raise BzImageError(f"corrupt LZ4 block at offset {off - 4}") from err
        off += size
    return b"".join(out)


def decompress_payload(data: bytes) -> bytes:
    """Decompress a bzImage payload, choosing the codec by its magic."""
    try:
        if data[:4] == struct.pack("<I", LZ4_LEGACY_MAGIC):
            return decompress_lz4_legacy(data)
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data[:-4] if len(data) > 4 else data, format=lzma.FORMAT_XZ)
        if data[:4] == b"\x28\xb5\x2f\xfd":
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as err:
        raise BzImageError("payload does not decompress") from err
    raise BzImageError(f"unknown payload compression (magic {data[:4].hex()})")


def extract_vmlinux(image: bytes) -> bytes:
    """The uncompressed ELF kernel inside ``image``.

    :raises BzImageError: When ``image`` is not a bzImage, the payload is
        corrupt, or what comes out is not an ELF file.
    """
    elf = decompress_payload(payload(image))
    if elf[:4] != ELF_MAGIC:
        raise BzImageError("decompressed payload is not an ELF file")
    return elf
