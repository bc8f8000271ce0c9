"""Disks as QEMU 7.2's block queries describe them (qapi/block-core.json).

``image`` (ImageInfo) is read from the image file, for the storage daemon's
``query-named-block-nodes`` and the VM's ``query-block``; :func:`block_info`
is one ``query-block`` entry (BlockInfo) of a VM disk.

Where ``query-block`` answers differently from QEMU, and why:

- A ``-drive``'s nodes are named ``#blockNNN`` by position; QEMU counts
  every node it ever made.
- Under ``-snapshot`` the temporary overlay is already unlinked, so ``file``
  and ``image.filename`` name the image below it rather than QEMU's
  ``json:{…}`` description of the overlay, and ``image`` has no overlay
  ``actual-size`` or qcow2 header members.
- I/O limits are always zero (none can be set) and nothing is ever locked,
  removable or encrypted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

QCOW2_MAGIC = b"QFI\xfb"


def file_size(path: Path) -> tuple[int, int]:
    """(size, bytes allocated) of a file as QEMU reports them, zeros when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return 0, 0
    # QEMU counts a file's length in whole 512-byte sectors.
    return -(-st.st_size // 512) * 512, st.st_blocks * 512


def qcow2_info(path: Path) -> dict[str, Any]:
    """The ``image`` members QEMU reads from a qcow2 header (docs/interop/qcow2.txt)."""
    try:
        with open(path, "rb") as f:
            head = f.read(112)
    except OSError:
        return {}
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        return {}

    def be(off: int, n: int) -> int:
        return int.from_bytes(head[off:off + n], "big")

    cluster_bits = be(20, 4)
    out: dict[str, Any] = {"virtual-size": be(24, 8),
                           "cluster-size": (1 << cluster_bits) if 9 <= cluster_bits <= 21 else 0}
    data: dict[str, Any]
    if be(4, 4) < 3 or len(head) < 104:
        # Version 2 has no feature bits; refcounts are 16 bits wide.
        data = {"compat": "0.10", "compression-type": "zlib", "refcount-bits": 16}
    else:
        incompatible, compatible = be(72, 8), be(80, 8)
        header_length = be(100, 4)
        zstd = header_length > 104 and len(head) > 104 and head[104] == 1
        data = {
            "compat": "1.1", "compression-type": "zstd" if zstd else "zlib",
            "lazy-refcounts": bool(compatible & 1), "refcount-bits": 1 << min(be(96, 4), 6),
            "corrupt": bool(incompatible & 2), "extended-l2": bool(incompatible & 16),
        }
    out["format-specific"] = {"type": "qcow2", "data": data}
    return out


def image_info(path: Path, fmt: str) -> dict[str, Any]:
    """ImageInfo of the image at ``path`` read as ``fmt`` (``file``, ``raw`` or ``qcow2``)."""
    size, allocated = file_size(path)
    image: dict[str, Any] = {"virtual-size": size, "filename": str(path), "format": fmt,
                             "actual-size": allocated, "dirty-flag": False}
    if fmt == "qcow2":
        image.update(qcow2_info(path))
    return image


def _format(spec: Any) -> str:
    """The format the disk was opened as (probed, without ``format=``, as QEMU probes)."""
    if spec.names.driver:
        return str(spec.names.driver)
    if spec.image is not None:
        return str(spec.image.fmt)
    if spec.source.fmt:
        return str(spec.source.fmt)
    try:
        with open(spec.source.path, "rb") as f:
            return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"
    except OSError:
        return "raw"


def block_info(spec: Any, position: int) -> dict[str, Any]:
    """The ``query-block`` entry of a :class:`~appliance.machine.devices.BlkSpec`, the
    ``position``-th QEMU lists. Reads the image file: call it off the loop."""
    src, names = spec.source, spec.names
    fmt = _format(spec)
    cache = src.cache
    inserted: dict[str, Any] = {
        "file": str(src.path), "node-name": names.node_name or f"#block{position:03d}",
        "ro": bool(spec.read_only or src.read_only), "drv": fmt, "encrypted": False,
        "detect_zeroes": "off", "backing_file_depth": 0,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0, "write_threshold": 0,
        # A -drive's cache= mode; a -blockdev's device always caches writes (write-cache=auto).
        "cache": {"writeback": cache not in ("writethrough", "directsync"),
                  "direct": cache in ("none", "directsync"), "no-flush": cache == "unsafe"},
        "image": image_info(src.path, fmt),
    }
    if src.snapshot and not src.read_only:
        # -snapshot: a qcow2 overlay over the image (see the module's notes).
        base = inserted["image"]
        inserted.update({"drv": "qcow2", "backing_file": str(src.path), "backing_file_depth": 1,
                         "image": {"virtual-size": base["virtual-size"], "filename": str(src.path),
                                   "format": "qcow2", "dirty-flag": False, "backing-image": base}})
    info: dict[str, Any] = {"device": names.drive, "locked": False, "removable": False,
                            "io-status": "ok", "type": "unknown", "inserted": inserted}
    if names.qom_path:
        info["qdev"] = f"{names.qom_path}/virtio-backend"
    return info
