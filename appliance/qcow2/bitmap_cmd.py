"""``appliance img bitmap``: qemu-img bitmap's operations on persistent bitmaps.

``--add``, ``--remove``, ``--clear``, ``--enable``, ``--disable`` and
``--merge SOURCE`` (from this image, or with ``-b`` from another one) run in
the order given, on the image's bitmaps held in memory; the result replaces
the image's bitmap structures at the end (:func:`bitmaps.replace_bitmaps`:
new structures first, the header switched in one write, the old clusters
freed last), so a failed operation or a crash changes nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

from appliance.errors import ConfigError
from appliance.qcow2 import bitmaps as B
from appliance.qcow2.errors import Qcow2Error

_OPS = ("add", "remove", "clear", "enable", "disable", "merge")
MAX_NAME = 1023  # bytes of a bitmap's name (qcow2.txt, bitmap directory entry)
MAX_BITS = 0x20000000  # bits of one bitmap (QEMU's BME_MAX_PHYS_SIZE)
MAX_TABLE = 0x8000000  # entries of one bitmap table (QEMU's BME_MAX_TABLE_SIZE)


class _Ordered(argparse.Action):
    """Appends (operation, value) to one list, keeping the command line's order."""

    def __call__(self, parser: Any, ns: Any, values: Any, option: str | None = None) -> None:
        ops = getattr(ns, "ops", None) or []
        ops.append((self.dest, values))
        ns.ops = ops


def default_granularity(cluster_size: int) -> int:
    """QEMU's: the cluster size, kept within 4 KiB..64 KiB."""
    return min(65536, max(4096, cluster_size))


class _Op(Qcow2Error):
    def __init__(self, op: str, name: str, why: str) -> None:
        super().__init__(f"Operation {op} on bitmap {name} failed: {why}")


def _find(maps: list[list[Any]], name: str) -> list[Any] | None:
    return next((m for m in maps if m[0] == name), None)


def _merge_bits(dst: bytearray, dst_gbits: int, src: bytes, src_gbits: int, size: int) -> None:
    """OR ``src``'s dirty granules into ``dst``, whatever the two granularities."""
    if dst_gbits == src_gbits:
        for i, b in enumerate(src[:len(dst)]):
            if b:
                dst[i] |= b
        return
    sg = 1 << src_gbits
    for i, byte in enumerate(src):
        if not byte:
            continue
        for bit in range(8):
            if byte >> bit & 1:
                start = (i * 8 + bit) * sg
                if start >= size:
                    return
                end = min(size, start + sg)
                for g in range(start >> dst_gbits, ((end - 1) >> dst_gbits) + 1):
                    dst[g >> 3] |= 1 << (g & 7)


async def cmd_bitmap(argv: list[str]) -> int:
    from appliance.qcow2.cli import _open, _parser, cvtnum
    from appliance.qcow2.image import Qcow2Image

    p = _parser("bitmap")
    for op in _OPS:
        if op == "merge":
            p.add_argument("--merge", dest="merge", action=_Ordered, metavar="SOURCE")
        else:
            p.add_argument(f"--{op}", dest=op, action=_Ordered, nargs=0)
    p.add_argument("-g", dest="granularity")
    p.add_argument("-b", dest="source_file")
    p.add_argument("-F", dest="source_fmt")
    p.add_argument("-f", dest="fmt")
    p.add_argument("names", nargs="*")
    a = p.parse_args(argv)
    if a.granularity is not None:
        a.granularity = cvtnum("granularity", a.granularity)  # as qemu-img reads -g
    ops: list[tuple[str, Any]] = getattr(a, "ops", None) or []
    if len(a.names) != 2:
        raise ConfigError("Expecting filename and bitmap name")
    if not ops:
        raise ConfigError("Need at least one of --add, --remove, --clear, --enable, --disable, "
                          "or --merge")
    if a.granularity is not None and not any(op == "add" for op, _ in ops):
        raise ConfigError("granularity only supported with --add")
    if a.source_file is not None and not any(op == "merge" for op, _ in ops):
        raise ConfigError("-b requires --merge")
    filename, name = a.names
    img = await _open(filename, a.fmt, read_only=False, backing=False)
    try:
        if not isinstance(img, Qcow2Image) or img.header.version < 3:
            if ops[0][0] != "add":  # no bitmap can be there to change
                raise _Op(ops[0][0], name, f"Dirty bitmap '{name}' not found")
            what = ("Cannot store dirty bitmaps in qcow2 v2 files" if isinstance(img, Qcow2Image)
                    else "Operation not supported")
            raise _Op(ops[0][0], name, f"Can't make bitmap '{name}' persistent: {what}")
        # [name, granularity bits, flags, bits] of every bitmap, in directory order.
        maps = [[b.name, b.granularity_bits, b.flags, bytearray(await B.read_bits(img, b))]
                for b in img.bitmaps]
        for op, value in ops:
            await _apply(img, maps, op, value, name, a)
        await B.replace_bitmaps(img, [(m[0], m[1], m[2], bytes(m[3])) for m in maps])
    finally:
        await img.close()
    return 0


async def _apply(img: Any, maps: list[list[Any]], op: str, value: Any, name: str, a: Any) -> None:
    from appliance.qcow2.cli import _open

    m = _find(maps, name)
    if op == "add":
        if not name:
            raise _Op(op, name, "Bitmap name cannot be empty")
        if len(name.encode()) > MAX_NAME:
            raise _Op(op, name, f"Name length exceeds maximum ({MAX_NAME} characters)")
        if m is not None:
            raise _Op(op, name, f"Bitmap already exists: {name}")
        gran = a.granularity or 0
        gran = gran or default_granularity(img._cs)  # -g 0 means the default, as in QEMU
        if gran < 512 or gran & (gran - 1):
            raise _Op(op, name, "Granularity must be power of 2 and at least 512")
        if gran > 1 << 31:
            raise _Op(op, name, "Granularity must be at most 2147483648")
        gbits = gran.bit_length() - 1
        # qcow2.txt's limits on one bitmap (QEMU's BME_MAX_PHYS_SIZE and
        # BME_MAX_TABLE_SIZE): past them QEMU refuses to open the image.
        if img.size > MAX_BITS << gbits or img.size > (MAX_TABLE * img._cs) << gbits:
            raise _Op(op, name, f"Can't make bitmap '{name}' persistent: Too much space will be "
                                "occupied by the bitmap. Use larger granularity")
        if img.size == 0:
            raise _Op(op, name, f"Can't make bitmap '{name}' persistent: the disk is empty")
        if len(maps) >= 65535:
            raise _Op(op, name, "Too many persistent bitmaps")
        maps.append([name, gbits, B.FLAG_AUTO, bytearray(B.bitmap_bytes(img.size, gbits))])
        return
    if m is None:
        raise _Op(op, name, f"Dirty bitmap '{name}' not found")
    if m[2] & B.FLAG_IN_USE and op != "remove":
        raise _Op(op, name, f"Bitmap '{name}' is inconsistent and cannot be used")
    if op == "remove":
        maps.remove(m)
    elif op == "clear":
        m[3] = bytearray(len(m[3]))
    elif op == "enable":
        m[2] |= B.FLAG_AUTO
    elif op == "disable":
        m[2] &= ~B.FLAG_AUTO
    elif op == "merge":
        if a.source_file is None:
            src = _find(maps, value)
            if src is None:
                raise _Op(op, name, f"Dirty bitmap '{value}' not found")
            if src[2] & B.FLAG_IN_USE:
                raise _Op(op, name, f"Bitmap '{value}' is inconsistent and cannot be used")
            _merge_bits(m[3], m[1], bytes(src[3]), src[1], img.size)
            return
        other = await _open(a.source_file, a.source_fmt, read_only=True, backing=False)
        try:
            sb = next((b for b in getattr(other, "bitmaps", []) if b.name == value), None)
            if sb is None:
                raise _Op(op, name, f"Dirty bitmap '{value}' not found")
            if sb.flags & B.FLAG_IN_USE:
                raise _Op(op, name, f"Bitmap '{value}' is inconsistent and cannot be used")
            _merge_bits(m[3], m[1], bytes(await B.read_bits(other, sb)), sb.granularity_bits,
                        img.size)
        finally:
            await other.close()
