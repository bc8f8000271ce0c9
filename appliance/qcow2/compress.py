"""Compressed cluster codecs (qcow2.txt, "compression_type").

zlib clusters are raw deflate streams (no zlib header) with a 4 KiB window, as
QEMU writes them; zstd clusters are one zstd frame. Decompression always stops
at one cluster of output, so a hostile stream cannot make us allocate more.
"""

from __future__ import annotations

import zlib

from appliance.qcow2.errors import CorruptImage
from appliance.qcow2.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD


def decompress(data: bytes, cluster_size: int, kind: int, offset: int) -> bytes:
    """Inflate one cluster; raise CorruptImage unless exactly a cluster comes out."""
    out: bytes
    try:
        if kind == COMPRESSION_ZLIB:
            d = zlib.decompressobj(-12)
            out = d.decompress(data, cluster_size)
        elif kind == COMPRESSION_ZSTD:
            import io

            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
            parts = []
            want = cluster_size
            while want:
                chunk = reader.read(want)
                if not chunk:
                    break
                parts.append(chunk)
                want -= len(chunk)
            out = b"".join(parts)
        else:
            raise CorruptImage(f"unknown compression type {kind}", offset=offset)
    except (zlib.error, ValueError, RuntimeError) as err:
        raise CorruptImage("compressed cluster does not inflate", offset=offset) from err
    except Exception as err:  # zstandard.ZstdError derives from Exception only
        if type(err).__name__ == "ZstdError":
            raise CorruptImage("compressed cluster does not inflate", offset=offset) from err
        raise
    if len(out) != cluster_size:
        raise CorruptImage("compressed cluster inflates to the wrong size", offset=offset)
    return out


def compress(data: bytes, kind: int) -> bytes:
    if kind == COMPRESSION_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()
    import zstandard

    return zstandard.ZstdCompressor().compress(data)
