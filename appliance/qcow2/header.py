"""The qcow2 header: parse, validate, serialize (QEMU docs/interop/qcow2.txt, "Header").

The header cluster holds the fixed fields, the header extensions and the
backing file name. We keep extensions we do not understand as raw bytes and
write them back unchanged, as the spec requires of compatible readers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from appliance.qcow2.errors import CorruptImage, Qcow2Error, UnsupportedImage

MAGIC = b"QFI\xfb"
V2_HEADER_LEN = 72
V3_HEADER_LEN = 104  # through header_length; compression_type makes 112 with padding

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features (bit 0 bitmaps, bit 1 raw external data): we maintain neither,
# so a writer must clear them before its first write.
AUTOCLEAR_BITMAPS = 1 << 0

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

_KNOWN_EXT = frozenset({EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_CRYPTO,
                        EXT_DATA_FILE})

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU's limit: 2 MiB clusters
MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's implementation limit
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_BACKING_NAME = 1023

_FIXED = struct.Struct(">4sIQIIQIIQQIIQ")  # v2 fields, 72 bytes
_V3 = struct.Struct(">QQQII")  # incompat, compat, autoclear, refcount_order, header_length
_EXT = struct.Struct(">II")

# The feature name table we write, so older tools can name our bits.
FEATURE_NAMES: list[tuple[int, int, str]] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]


@dataclass
class Header:
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 112
    compression_type: int = 0
    # Bytes of additional fields past 105 we do not know, kept verbatim.
    extra_fields: bytes = b""
    # (type, data) in file order; known ones are interpreted, all are written back.
    extensions: list[tuple[int, bytes]] = field(default_factory=list)
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    def ext(self, kind: int) -> bytes | None:
        for t, data in self.extensions:
            if t == kind:
                return data
        return None

    def set_ext(self, kind: int, data: bytes | None) -> None:
        rest = [(t, d) for t, d in self.extensions if t != kind]
        if data is not None:
            rest.insert(0, (kind, data))
        self.extensions = rest

    @property
    def backing_format(self) -> str | None:
        data = self.ext(EXT_BACKING_FORMAT)
        return None if data is None else data.decode("utf-8", "replace")

    @property
    def encrypted(self) -> bool:
        return self.crypt_method != 0 or self.ext(EXT_CRYPTO) is not None

    def compat_name(self) -> str:
        return "0.10" if self.version == 2 else "1.1"

    def serialize(self) -> bytes:
        """The header cluster's contents (header, extensions, backing name)."""
        out = bytearray(
            _FIXED.pack(
                MAGIC, self.version, 0, 0, self.cluster_bits, self.size, self.crypt_method,
                self.l1_size, self.l1_table_offset, self.refcount_table_offset,
                self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset,
            )
        )
        if self.version >= 3:
            tail = bytes([self.compression_type]) + self.extra_fields
            length = V3_HEADER_LEN + len(tail)
            length = (length + 7) & ~7
            self.header_length = length
            out += _V3.pack(
                self.incompatible_features, self.compatible_features, self.autoclear_features,
                self.refcount_order, length,
            )
            out += tail
            out += bytes(length - len(out))
        for kind, data in self.extensions:
            if kind == EXT_END:
                continue
            out += _EXT.pack(kind, len(data)) + data + bytes(-len(data) % 8)
        out += _EXT.pack(EXT_END, 0)
        if self.backing_file is not None:
            name = self.backing_file.encode()
            self.backing_file_offset = len(out)
            self.backing_file_size = len(name)
            out += name
        else:
            self.backing_file_offset = self.backing_file_size = 0
        struct.pack_into(">QI", out, 8, self.backing_file_offset, self.backing_file_size)
        if len(out) > self.cluster_size and self.ext(EXT_FEATURE_TABLE) is not None:
            # The feature name table is optional: small clusters may have no room for it.
            self.set_ext(EXT_FEATURE_TABLE, None)
            return self.serialize()
        if len(out) > self.cluster_size:
            raise Qcow2Error("header, extensions and backing file name do not fit in one cluster")
        return bytes(out)


def parse_header(data: bytes, file_size: int | None = None, *, check_mode: bool = False) -> Header:
    """Parse and validate the first cluster of an image.

    :param data: at least the first cluster (or the whole file if smaller)
    :param file_size: the image file's size, to bound table offsets
    :param check_mode: leave the snapshot table's place unchecked (``check`` reads and
        judges it itself, as QEMU does under BDRV_O_CHECK)
    :raises Qcow2Error: When the bytes are not a qcow2 header we can open.
    """
    if len(data) < V2_HEADER_LEN or data[:4] != MAGIC:
        raise Qcow2Error("not a qcow2 image (bad magic or truncated header)")
    (_, version, bf_off, bf_size, cluster_bits, size, crypt, l1_size, l1_off, rt_off,
     rt_clusters, nb_snap, snap_off) = _FIXED.unpack_from(data)
    # Refusals below are worded as QEMU 7.2's qcow2_do_open words them, so
    # scripts reading either tool's errors see the same text.
    if version not in (2, 3):
        raise UnsupportedImage(f"Unsupported qcow2 version {version}")
    h = Header(
        version=version, backing_file_offset=bf_off, backing_file_size=bf_size,
        cluster_bits=cluster_bits, size=size, crypt_method=crypt, l1_size=l1_size,
        l1_table_offset=l1_off, refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap, snapshots_offset=snap_off,
    )
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2Error(f"Unsupported cluster size: 2^{cluster_bits}")
    cs = 1 << cluster_bits
    if version == 2:
        h.header_length = V2_HEADER_LEN
        h.refcount_order = 4
    else:
        if len(data) < V3_HEADER_LEN:
            raise Qcow2Error("truncated version 3 header")
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = _V3.unpack_from(data, V2_HEADER_LEN)
        if h.header_length < V3_HEADER_LEN:
            raise Qcow2Error("qcow2 header too short")
        if h.header_length > min(len(data), cs):
            raise Qcow2Error("qcow2 header exceeds cluster size")
        # qcow2.txt ("Header", header_length) demands a multiple of 8; QEMU does
        # not check, and reads the extensions from where the header ends, as we do.
        if h.header_length > V3_HEADER_LEN:
            h.compression_type = data[V3_HEADER_LEN]
            h.extra_fields = bytes(data[V3_HEADER_LEN + 1 : h.header_length]).rstrip(b"\0")
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if h.incompatible_features & INCOMPAT_DATA_FILE:
        raise UnsupportedImage("external data files (incompatible feature bit 2) are not supported")
    if unknown:
        raise UnsupportedImage(f"Unsupported qcow2 feature(s): {_feature_names(data, h, unknown)}")
    if bf_off > cs:
        raise Qcow2Error("Invalid backing file offset")
    if h.refcount_order > 6:
        raise Qcow2Error("Reference count entry width too large; may not exceed 64 bits")
    if crypt > 2:
        raise UnsupportedImage(f"Unsupported encryption method {crypt}")
    # Methods 1 (AES) and 2 (LUKS) parse: the image opens for ``info`` only (the
    # engine refuses any other open, as QEMU does without a key secret).
    if h.incompatible_features & INCOMPAT_COMPRESSION:
        if h.compression_type not in COMPRESSION_NAMES or h.compression_type == 0:
            raise UnsupportedImage(f"unknown compression type {h.compression_type}")
    elif h.compression_type != 0:
        raise Qcow2Error("compression type set without the compression type feature bit")
    if h.extended_l2 and cluster_bits < 14:
        raise Qcow2Error("extended L2 entries need clusters of at least 16 KiB")
    if h.refcount_table_clusters == 0:
        raise CorruptImage("Image does not contain a reference count table")
    _check_table(h.refcount_table_offset, h.refcount_table_clusters * cs, cs, file_size,
                 "Reference count table", MAX_REFTABLE_BYTES)
    if not check_mode:
        # QEMU judges the snapshot table's place even when it holds no entries.
        _check_table(h.snapshots_offset, 40 * h.nb_snapshots, cs, file_size, "Snapshot table",
                     40 * 65536, allow_empty=True)
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise Qcow2Error("Active L1 table too large")
    per_l2 = cs // h.l2_entry_size
    needed = -(-size // (cs * per_l2))
    if size >= 1 << 63 or needed > 0x7FFFFFFF:
        raise Qcow2Error("Image is too big")
    if needed > h.l1_size:
        raise CorruptImage("L1 table is too small")
    # QEMU opens an image whose L1 table lies in the header cluster or past the end
    # of the file: the table then reads as the header's bytes or as zeroes, check
    # reports it, and the overlap checks stop writes that would hit other tables.
    _check_table(h.l1_table_offset, h.l1_size * 8, cs, None, "Active L1 table",
                 MAX_L1_BYTES, allow_empty=True, in_header_ok=True)
    # Header extensions follow the header, up to the end of the first cluster.
    pos = h.header_length
    end = min(len(data), cs)
    seen: set[int] = set()
    while True:
        if pos + 8 > end:
            raise Qcow2Error("header extension area runs past the first cluster")
        kind, length = _EXT.unpack_from(data, pos)
        pos += 8
        if pos + length > end:
            # Checked before the type, as QEMU does: an end marker with a length
            # past the cluster (an unaligned header_length reads one from the
            # padding and the next extension) is refused too.
            raise Qcow2Error("Header extension too large")
        if kind == EXT_END:
            break
        if kind in seen and kind in _KNOWN_EXT:
            # QEMU keeps every copy of an extension it does not know (and writes
            # them all back); of a known one it would take the last, which we
            # do not guess at.
            raise Qcow2Error(f"header extension 0x{kind:08x} appears twice")
        seen.add(kind)
        h.extensions.append((kind, bytes(data[pos : pos + length])))
        pos += (length + 7) & ~7
    if bf_off:
        if bf_size > MAX_BACKING_NAME or bf_off + bf_size > end:
            raise Qcow2Error("Backing file name too long")
        h.backing_file = bytes(data[bf_off : bf_off + bf_size]).decode("utf-8", "surrogateescape")
    return h


def _check_table(off: int, length: int, cs: int, file_size: int | None, what: str,
                 limit: int, allow_empty: bool = False, in_header_ok: bool = False) -> None:
    """A table's place, checked as QEMU's qcow2_validate_table checks it (too large,
    unaligned, or ending past the largest offset: "<what> offset invalid"), and
    more strictly: a table in the header cluster (unless ``in_header_ok``) or past
    the end of the file (when ``file_size`` is given) is refused here, where QEMU
    opens the image and fails (or reads zeroes) later."""
    if length > limit:
        raise Qcow2Error(f"{what} too large")
    if off % cs or off > (1 << 63) - 1 - length:
        raise CorruptImage(f"{what} offset invalid", offset=off)
    if length == 0 and allow_empty:
        return
    if off == 0 and not in_header_ok:
        raise CorruptImage(f"{what} lies in the header cluster", offset=off)
    if file_size is not None and off + length > file_size:
        raise CorruptImage(f"{what} at {off:#x} lies past the end of the file", offset=off)


def _feature_names(data: bytes, h: Header, bits: int) -> str:
    table: dict[int, str] = {}
    for kind, blob in h.extensions if h.extensions else _scan_ext(data, h):
        if kind == EXT_FEATURE_TABLE:
            for i in range(0, len(blob) - 47, 48):
                if blob[i] == 0:
                    table[blob[i + 1]] = blob[i + 2 : i + 48].rstrip(b"\0").decode("utf-8", "replace")
    # As QEMU reports them: the names the image's feature table gives, then
    # whatever is left as one hexadecimal mask.
    out = []
    for bit in sorted(table):
        if bit < 64 and bits >> bit & 1:
            out.append(table[bit])
            bits &= ~(1 << bit)
    if bits:
        out.append(f"Unknown incompatible feature: {bits:x}")
    return ", ".join(out)


def _scan_ext(data: bytes, h: Header) -> list[tuple[int, bytes]]:
    out = []
    pos = h.header_length
    end = min(len(data), h.cluster_size)
    while pos + 8 <= end:
        kind, length = _EXT.unpack_from(data, pos)
        if kind == 0 or pos + 8 + length > end:
            break
        out.append((kind, bytes(data[pos + 8 : pos + 8 + length])))
        pos += 8 + ((length + 7) & ~7)
    return out


def feature_table() -> bytes:
    return b"".join(bytes([t, b]) + n.encode().ljust(46, b"\0") for t, b, n in FEATURE_NAMES)
