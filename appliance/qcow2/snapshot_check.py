"""``check``'s own reading of the snapshot table, and its repair.

A normal open refuses an image whose snapshot table is out of bounds or
malformed. ``check`` opens such images anyway (``check_mode``: the table is
left unread) and reads the table here the way qemu-img's check does, so the
same damage gives the same report and, with ``-r all``, the same repair:

- too many entries (more than 65536): reported; ``-r all`` drops the excess
  from the header's count (the clusters they held become leaks the refcount
  pass then frees);
- a table whose offset is not cluster aligned: reported, the check fails;
- an entry with more than 1 KiB of extra data (qcow2.txt, "Snapshots": the
  limit QEMU enforces): reported, the check fails; ``-r all`` keeps 1 KiB;
- a table longer than 64 MiB in total: ``-r all`` drops the entries past it;
- a version 3 entry with less than the 16 bytes of extra data the spec makes
  mandatory: a corruption, which ``-r all`` repairs by rewriting the table.

Entries are read where the file ends as zeroes, as QEMU's reads past the end
of a file return. Snapshot L1 tables that are misaligned or too large are
judged later, by the refcount pass (:mod:`appliance.qcow2.check_flow`).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING

from appliance.qcow2.errors import Qcow2Error
from appliance.qcow2.snapshot import ENTRY, MAX_SNAPSHOTS, Snapshot

if TYPE_CHECKING:
    from appliance.qcow2.check import CheckResult
    from appliance.qcow2.image import Qcow2Image

MAX_EXTRA = 1024  # bytes of extra data per entry QEMU accepts
MAX_TABLE = 64 << 20  # bytes of table QEMU accepts
_INT_MAX = (1 << 31) - 1
_INT64_MAX = (1 << 63) - 1
_CHUNK = 1 << 20


class _File:
    """Reads of the image file in 1 MiB chunks, zeroes past its end."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self._cache: dict[int, bytes] = {}

    def read(self, off: int, n: int) -> bytes:
        out = bytearray()
        while n > 0:
            base = off - off % _CHUNK
            chunk = self._cache.get(base)
            if chunk is None:
                if len(self._cache) > 80:
                    self._cache.clear()
                chunk = os.pread(self._fd, _CHUNK, base) if base < self._size else b""
                chunk = chunk.ljust(_CHUNK, b"\0")
                self._cache[base] = chunk
            take = min(n, base + _CHUNK - off)
            out += chunk[off - base : off - base + take]
            off += take
            n -= take
        return bytes(out)


class _ReadError(Exception):
    def __init__(self, err: int, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.err, self.message, self.hint = err, message, hint


def _read_entries(img: Qcow2Image, f: _File, offset: int, count: int, repair: bool, res: CheckResult,
                  reduced: list[int], dropped: list[int]) -> tuple[list[Snapshot], list[int], int]:
    """The entries, the extra-data length each keeps, and the bytes the table spans."""
    snaps: list[Snapshot] = []
    extras: list[int] = []
    table_len = 0
    start = offset
    for i in range(count):
        pre = offset
        table_len = -(-table_len // 8) * 8
        offset = -(-offset // 8) * 8
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmsize,
         extra_len) = ENTRY.unpack(f.read(offset, ENTRY.size))
        offset += ENTRY.size
        truncate = False
        if extra_len > MAX_EXTRA:
            if not repair:
                raise _ReadError(errno.EFBIG, f"Too much extra metadata in snapshot table entry {i}",
                                 "You can force-remove this extra metadata with qemu-img check -r all")
            res.messages.append(f"Discarding too much extra metadata in snapshot table entry {i} "
                                f"({extra_len} > {MAX_EXTRA})")
            dropped[0] += 1
            truncate = True
        known = min(24, extra_len)
        extra = f.read(offset, known)
        sn = Snapshot(l1_off, l1_size, "", "", dsec, dnsec, vmclock, vmsize)
        sn.disk_size = img.size
        if known >= 8:
            sn.vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if known >= 16:
            sn.disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if known >= 24:
            icount = struct.unpack_from(">Q", extra, 16)[0]
            sn.icount = None if icount == (1 << 64) - 1 else icount
        offset += known
        kept = MAX_EXTRA if truncate else extra_len
        if extra_len > 24:
            sn.extra_unknown = f.read(offset, kept - 24)
            offset += extra_len - 24
        sn.id = f.read(offset, id_len).decode("utf-8", "replace")
        offset += id_len
        sn.name = f.read(offset, name_len).decode("utf-8", "replace")
        offset += name_len
        table_len += ENTRY.size + kept + id_len + name_len
        if table_len > MAX_TABLE or offset - start > _INT_MAX:
            left = count - i
            if not repair:
                raise _ReadError(errno.EFBIG, "Snapshot table is too big",
                                 f"You can force-remove all {left} overhanging snapshots with "
                                 "qemu-img check -r all")
            res.messages.append(f"Discarding {left} overhanging snapshots (snapshot table is too big)")
            reduced[0] += left
            offset = pre
            break
        snaps.append(sn)
        extras.append(kept)
    return snaps, extras, offset - start


async def read_for_check(img: Qcow2Image, res: CheckResult, repair: bool) -> int:
    """Read the snapshot table into ``img`` as check does; 0, or the errno that fails the check.

    Counts go to ``res`` (corruptions the table rewrite of :func:`fix_for_check` repairs);
    messages go to ``res.messages`` in qemu-img's words and order.
    """
    h = img.header
    raw = os.pread(img._fd, 12, 60)  # the header's count and offset, as on disk now
    nb, off = struct.unpack(">IQ", raw.ljust(12, b"\0"))
    reduced = [0]
    dropped = [0]
    if nb > MAX_SNAPSHOTS and repair:
        res.messages.append(f"Discarding {nb - MAX_SNAPSHOTS} overhanging snapshots")
        reduced[0] += nb - MAX_SNAPSHOTS
        nb = MAX_SNAPSHOTS
    problem = ""
    err = 0
    if nb > MAX_SNAPSHOTS:
        problem, err = "snapshot table too large", errno.EFBIG
    elif _INT64_MAX - nb * ENTRY.size < off or off % img._cs:
        # Even with no entries: QEMU validates the offset whatever the count.
        problem, err = "snapshot table offset invalid", errno.EINVAL
    if err:
        res.check_errors += 1
        res.messages.append(f"appliance img: ERROR {problem}")
        if nb > MAX_SNAPSHOTS:
            res.messages.append(f"You can force-remove all {nb - MAX_SNAPSHOTS} overhanging snapshots "
                                "with qemu-img check -r all")
        h.nb_snapshots, h.snapshots_offset = 0, 0
        img.snapshots = []
        return err
    try:
        snaps, extras, table_len = _read_entries(img, _File(img._fd), off, nb, repair, res, reduced,
                                                 dropped)
    except _ReadError as e:
        res.check_errors += 1
        res.messages.append(f"appliance img: ERROR failed to read the snapshot table: {e.message}")
        if e.hint:
            res.messages.append(e.hint)
        h.nb_snapshots, h.snapshots_offset = 0, 0
        img.snapshots = []
        return e.err
    except OSError as e:
        res.check_errors += 1
        res.messages.append(f"appliance img: ERROR failed to read the snapshot table: "
                            f"Failed to read snapshot table: {e.strerror}")
        return e.errno or errno.EIO
    img.snapshots = snaps
    img._table_bytes = table_len
    h.nb_snapshots, h.snapshots_offset = len(snaps), off
    res.corruptions += reduced[0] + dropped[0]
    if reduced[0]:
        # The header's count first: the refcount pass counts what the header names, and the
        # clusters of the dropped entries become leaks it frees.
        try:
            await img._pwrite(60, struct.pack(">I", len(snaps)))
            await img._sync()
        except OSError as e:
            res.check_errors += 1
            res.messages.append("ERROR failed to update the snapshot count in the image header: "
                                f"{e.strerror}")
            return e.errno or errno.EIO
        res.corruptions_fixed += reduced[0]
        res.corruptions -= reduced[0]
    if h.version >= 3:
        for i, kept in enumerate(extras):
            if kept < 16:  # vm_state_size_large and disk_size are mandatory in version 3
                res.corruptions += 1
                res.messages.append(f"{'Repairing' if repair else 'ERROR'} snapshot table entry {i} "
                                    "is incomplete")
    return 0


async def fix_for_check(img: Qcow2Image, res: CheckResult, repair: bool) -> int:
    """After the refcount pass: rewrite the table when reading it found something to repair."""
    if not (res.corruptions and repair):
        return 0
    from appliance.qcow2.snapops import _write_table

    try:
        if not await _write_table(img, list(img.snapshots), lenient=True):
            # qemu-img's words when freeing the old table fails; the repair stands.
            res.messages.append("qcow2_free_clusters failed: Resource temporarily unavailable")
    except OSError as e:
        res.check_errors += 1
        res.messages.append(f"ERROR failed to update snapshot table: {e.strerror}")
        return e.errno or errno.EIO
    except Qcow2Error as e:
        # The table could not be rewritten (an entry that cannot be stored, or the
        # new table's place overlapping metadata): the check fails, as qemu-img's does.
        res.check_errors += 1
        res.messages.append(f"ERROR failed to update snapshot table: {e}")
        return errno.EIO
    res.corruptions_fixed += res.corruptions
    res.corruptions = 0
    return 0

