"""Refcount block codec for every refcount_order (qcow2.txt, "Host cluster management").

A block is decoded into a list of ints, edited in memory and encoded on
write-back. Sub-byte widths pack from the least significant bit, as the spec says.
"""

from __future__ import annotations

import struct

_WIDE = {3: "B", 4: "H", 5: "I", 6: "Q"}


def decode_block(data: bytes, order: int) -> list[int]:
    if order >= 3:
        n = len(data) >> (order - 3)
        return list(struct.unpack(f">{n}{_WIDE[order]}", data))
    bits = 1 << order
    mask = (1 << bits) - 1
    per = 8 // bits
    return [(byte >> (i * bits)) & mask for byte in data for i in range(per)]


def encode_block(values: list[int], order: int) -> bytes:
    if order >= 3:
        return struct.pack(f">{len(values)}{_WIDE[order]}", *values)
    bits = 1 << order
    per = 8 // bits
    out = bytearray(len(values) // per)
    for i, v in enumerate(values):
        if v:
            out[i // per] |= v << ((i % per) * bits)
    return bytes(out)
