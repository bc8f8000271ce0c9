"""The internal snapshot table (qcow2.txt, "Snapshots").

Each entry names an L1 table. Creating a snapshot copies the active L1 and
adds one reference to every L2 table and data cluster it reaches; deleting one
drops them again; applying one swaps the active L1. The operations live on
:class:`appliance.qcow2.image.Qcow2Image`; this module is the table codec.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from appliance.qcow2.errors import CorruptImage

ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes
MAX_SNAPSHOTS = 65536
MAX_L1_ENTRIES = (32 << 20) // 8  # QCOW_MAX_L1_SIZE / entry size


@dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int | None = None
    icount: int | None = None
    extra_unknown: bytes = b""

    def l1_problem(self, cluster_size: int) -> tuple[str, int] | None:
        """Why this snapshot's L1 table cannot be loaded, in QEMU's words
        (qcow2_validate_table, as snapshot apply/delete/convert -l call it), with
        the errno it fails with; None when it can be."""
        if self.l1_size > MAX_L1_ENTRIES:
            return "Snapshot L1 table too large", errno.EFBIG
        if self.l1_table_offset % cluster_size or \
                self.l1_table_offset > (1 << 63) - 1 - self.l1_size * 8:
            return "Snapshot L1 table offset invalid", errno.EINVAL
        return None

    def serialize(self, version: int) -> bytes:
        extra = bytearray(struct.pack(">QQ", self.vm_state_size, self.disk_size or 0))
        if self.icount is not None or version >= 3:
            extra += struct.pack(">Q", (1 << 64) - 1 if self.icount is None else self.icount)
        extra += self.extra_unknown
        idb, nameb = self.id.encode(), self.name.encode()
        if len(idb) > 0xFFFF or len(nameb) > 0xFFFF:
            # Both lengths are 16-bit fields (qcow2.txt, "Snapshots"); a name read
            # from a damaged table may have grown when its bad bytes were replaced.
            raise CorruptImage(f"snapshot {self.id[:20]!r} has an ID or name too long to store")
        out = ENTRY.pack(
            self.l1_table_offset, self.l1_size, len(idb), len(nameb), self.date_sec,
            self.date_nsec, self.vm_clock_nsec, min(self.vm_state_size, 0xFFFFFFFF), len(extra),
        ) + bytes(extra) + idb + nameb
        return out + bytes(-len(out) % 8)


def parse_snapshots(data: bytes, count: int, cluster_size: int) -> list[Snapshot]:
    """Parse ``count`` entries from ``data``; raise CorruptImage on any overrun."""
    return parse_snapshot_table(data, count, cluster_size)[0]


def parse_snapshot_table(data: bytes, count: int, cluster_size: int
                         ) -> tuple[list[Snapshot], int]:
    """Like :func:`parse_snapshots`, also returning the table's length in bytes."""
    if count > MAX_SNAPSHOTS:
        raise CorruptImage(f"too many snapshots ({count})")
    out: list[Snapshot] = []
    pos = 0
    for _ in range(count):
        if pos + ENTRY.size > len(data):
            raise CorruptImage("snapshot table is truncated")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmsize,
         extra_len) = ENTRY.unpack_from(data, pos)
        pos += ENTRY.size
        if extra_len > 1024:
            # QEMU's words (qcow2_do_read_snapshots); check -r all drops the excess.
            raise CorruptImage(f"Too much extra metadata in snapshot table entry {len(out)}\n"
                               "You can force-remove this extra metadata with qemu-img check -r all")
        if pos + extra_len + id_len + name_len > len(data):
            raise CorruptImage("snapshot table entry runs past the table")
        extra = data[pos : pos + extra_len]
        pos += extra_len
        snap = Snapshot(l1_off, l1_size, "", "", dsec, dnsec, vmclock, vmsize)
        if len(extra) >= 8:
            snap.vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            snap.disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if len(extra) >= 24:
            snap.icount = struct.unpack_from(">Q", extra, 16)[0]
            if snap.icount == (1 << 64) - 1:
                snap.icount = None
        snap.extra_unknown = bytes(extra[24:])
        snap.id = bytes(data[pos : pos + id_len]).decode("utf-8", "replace")
        pos += id_len
        snap.name = bytes(data[pos : pos + name_len]).decode("utf-8", "replace")
        pos += name_len
        pos += -pos % 8
        # An unaligned or oversized L1 table does not stop the open (QEMU opens
        # the image; check reports the entry): see Snapshot.l1_problem.
        out.append(snap)
    return out, pos
