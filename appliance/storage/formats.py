"""Recognise image formats we do not implement, so probing never calls them raw.

Probing only tells qcow2 from raw. A VMDK, VHD or QED file handed over without
``format=`` would otherwise be served as a raw disk: the guest would see the
container's header as its first sector, and a write there could wreck the
image. QEMU probes these formats by the signatures below (each format's own
specification fixes them); we use them only to refuse the file by name.
"""

from __future__ import annotations

import os

# (format name, offset, signature), checked in order.
_SIGNATURES: tuple[tuple[str, int, bytes], ...] = (
    ("vmdk", 0, b"KDMV"),  # VMDK hosted sparse extent
    ("vmdk", 0, b"COWD"),  # VMDK ESX/VMFS sparse extent
    ("vmdk", 0, b"# Disk DescriptorFile"),
    ("vpc", 0, b"conectix"),  # VHD dynamic disk: copy of the footer at 0
    ("vhdx", 0, b"vhdxfile"),
    ("vdi", 0x40, b"\x7f\x10\xda\xbe"),  # 0xbeda107f, little-endian
    ("qed", 0, b"QED\x00"),
    ("luks", 0, b"LUKS\xba\xbe"),
    ("parallels", 0, b"WithoutFreeSpace"),
    ("parallels", 0, b"WithouFreSpacExt"),
    ("bochs", 0, b"Bochs Virtual HD Image"),
    ("cloop", 0, b"#!/bin/sh\n#V2.0 Format\n"),
)
_QCOW_MAGIC = b"QFI\xfb"
# Every signature above lies within the first PROBE_HEAD bytes.
PROBE_HEAD = 0x44


def foreign_format(head: bytes) -> str | None:
    """The name of the unsupported format whose signature starts ``head``, or None.

    qcow2 and raw (anything unrecognised) give None. QEMU's original qcow
    format shares qcow2's magic and differs in the version word (1).
    """
    for name, off, sig in _SIGNATURES:
        if head[off:off + len(sig)] == sig:
            return name
    if head[:4] == _QCOW_MAGIC and head[4:8] == b"\x00\x00\x00\x01":
        return "qcow"
    return None


def foreign_format_of(path: str | os.PathLike[str]) -> str | None:
    """:func:`foreign_format` of the file's first bytes (None if unreadable)."""
    try:
        with open(path, "rb") as f:
            return foreign_format(f.read(PROBE_HEAD))
    except OSError:
        return None


def unsupported_message(path: str | os.PathLike[str], fmt: str) -> str:
    return (f"Could not open '{os.fspath(path)}': image format '{fmt}' is not supported "
            "(qcow2 and raw are); convert it with qemu-img convert -O qcow2")
