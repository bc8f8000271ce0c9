"""qcow2: the async image engine behind virtio-blk, and ``appliance img``.

The VMM calls :func:`open_image` and gets a BlockBackend
(:class:`~appliance.qcow2.image.Qcow2Image` for qcow2, a raw file otherwise).
Spec: QEMU docs/interop/qcow2.txt.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from appliance.qcow2.errors import CorruptImage, ErrorKind, Qcow2Error, UnsupportedImage
from appliance.qcow2.image import Qcow2Image

Qcow2Backend = Qcow2Image

__all__ = [
    "CorruptImage", "ErrorKind", "Qcow2Backend", "Qcow2Error", "Qcow2Image",
    "UnsupportedImage", "create_temporary_overlay", "open_image",
]


async def open_image(path: Path, *, read_only: bool, fmt: str | None = None,
                     cache: str = "writeback", backing_override: Any = None,
                     l2_cache_size: int | None = None, aio: str | None = None) -> Any:
    """Open a disk image as a BlockBackend.

    :param fmt: "qcow2" or "raw"; ``None`` probes the file and warns, like QEMU.
    :param cache: writeback (default), writethrough, none/directsync (O_DIRECT), unsafe.
    :param backing_override: ``None`` follows the header, ``False`` opens no backing file,
        a BlockBackend is used as the backing file.
    :param l2_cache_size: bytes of L2 table cache (QEMU's l2-cache-size); by default
        enough for the whole disk, at most 32 MiB.
    :raises Qcow2Error: When the image cannot be opened safely.
    """
    from appliance.qcow2.backing import open_any

    kw: dict[str, Any] = {} if l2_cache_size is None else {"l2_cache_size": l2_cache_size}
    if aio is not None:
        kw["aio"] = aio  # threads or native, for O_DIRECT data I/O (the engine's default: native)
    return await open_any(path, fmt, read_only=read_only, cache=cache,
                          backing_override=backing_override, **kw)


def create_temporary_overlay(base: Path, base_fmt: str) -> Path:
    """Create a qcow2 overlay over ``base`` in the temp directory (for ``-snapshot``).

    The caller opens it writable and deletes it at exit; the base is never written.
    """
    from appliance.qcow2.create import CreateOptions, build_image

    base = Path(base)
    if base_fmt == "qcow2":
        from appliance.qcow2.header import parse_header

        with open(base, "rb") as f:
            size = parse_header(f.read(1 << 21)).size
    elif base_fmt == "raw":
        size = os.stat(base).st_size
    else:
        raise Qcow2Error(f"unknown image format '{base_fmt}'")
    data = build_image(CreateOptions(size=size, backing_file=str(base.resolve()),
                                     backing_fmt=base_fmt))
    import tempfile

    fd, name = tempfile.mkstemp(prefix="appliance-snapshot-", suffix=".qcow2")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def run(coro: Any) -> Any:
    return asyncio.run(coro)
