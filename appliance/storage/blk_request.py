"""virtio-blk requests: a descriptor chain becomes a typed request (virtio 1.2 §5.2.6).

Parsing is pure: it reads the chain's views, copies the guest-written header
and segments out once, checks them against what the device promised
(:class:`BlkLimits`) and returns a frozen :class:`BlkRequest`, or raises a
:class:`BlkError` whose ``status`` is what the driver is told. Only the
executor in :mod:`appliance.storage.blk` touches the backend.

Message framing (§2.6.4): the device may not assume where descriptor
boundaries fall, so the 16-byte header may span descriptors and the status
byte is the last device-writable byte, wherever its descriptor starts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from appliance.storage.errors import BlkError, BlkNoStatus, BlkUnsupported
from appliance.virtio.queue import DescriptorChain

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

SECTOR_SIZE = 512
SECTOR_SHIFT = 9
ID_BYTES = 20

HEADER = struct.Struct("<IIQ")  # type, reserved, sector
SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags


@dataclass(frozen=True, slots=True)
class BlkLimits:
    """What the device offered the driver, which requests are checked against."""

    capacity_sectors: int
    read_only: bool = False
    discard: bool = False
    write_zeroes: bool = False
    max_discard_sectors: int = 0x3FFFFF
    max_discard_seg: int = 1
    max_write_zeroes_sectors: int = 0x3FFFFF
    max_write_zeroes_seg: int = 1


class BlkRequest:
    """One parsed request.

    :param type: ``VIRTIO_BLK_T_*``.
    :param sector: first 512-byte sector (IN/OUT).
    :param data: payload views: guest buffers to fill (IN, GET_ID) or to
        write out (OUT); zero-copy slices of guest RAM.
    :param data_len: bytes in ``data``.
    :param status_buf: the one-byte status buffer.
    :param segments: ``(sector, num_sectors, flags)`` of DISCARD/WRITE_ZEROES.

    A plain slotted class, treated as immutable: one is built per request,
    and a frozen dataclass's ``__init__`` (``object.__setattr__`` per field)
    cost several times as much.
    """

    __slots__ = ("type", "sector", "data", "data_len", "status_buf", "segments")

    def __init__(
        self,
        type: int,
        sector: int,
        data: tuple[memoryview, ...],
        data_len: int,
        status_buf: memoryview,
        segments: tuple[tuple[int, int, int], ...] = (),
    ) -> None:
        self.type = type
        self.sector = sector
        self.data = data
        self.data_len = data_len
        self.status_buf = status_buf
        self.segments = segments

    def __repr__(self) -> str:
        return (
            f"BlkRequest(type={self.type}, sector={self.sector}, data_len={self.data_len}, "
            f"segments={self.segments!r})"
        )

    @classmethod
    def parse(cls, chain: DescriptorChain, limits: BlkLimits) -> BlkRequest:
        """Turn ``chain`` into a request.

        :raises BlkNoStatus: When there is no device-writable byte for the status.
        :raises BlkError: (``status`` IOERR or UNSUPP) for any other bad request;
            ``status_buf`` is set so the caller can answer.
        """
        writable = chain.writable
        if not writable:
            raise BlkNoStatus("request has no device-writable status byte")
        last = writable[-1]
        status_buf = last[-1:]
        if len(last) == 1:
            in_views = writable[:-1]
        else:
            in_views = [*writable[:-1], last[:-1]]
        in_len = chain.writable_len - 1

        readable = chain.readable
        if chain.readable_len < HEADER.size:
            raise BlkError("request header is shorter than 16 bytes", status_buf)
        first = readable[0]
        if len(first) >= HEADER.size:
            # Guest-controlled: copied out by unpack before any use.
            rtype, _, sector = HEADER.unpack_from(first, 0)
            out_views = readable[1:] if len(first) == HEADER.size else [first[16:], *readable[1:]]
        else:
            hdr, out_views = _take(readable, HEADER.size)
            rtype, _, sector = HEADER.unpack(hdr)
        out_len = chain.readable_len - HEADER.size

        if rtype == VIRTIO_BLK_T_IN:
            _check_range(sector, in_len, limits, status_buf)
            return cls(rtype, sector, tuple(in_views), in_len, status_buf)
        if rtype == VIRTIO_BLK_T_OUT:
            if limits.read_only:
                raise BlkError("write to a read-only disk", status_buf)
            _check_range(sector, out_len, limits, status_buf)
            return cls(rtype, sector, tuple(out_views), out_len, status_buf)
        if rtype == VIRTIO_BLK_T_FLUSH:
            return cls(rtype, 0, (), 0, status_buf)
        if rtype == VIRTIO_BLK_T_GET_ID:
            return cls(rtype, 0, tuple(in_views), in_len, status_buf)
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            segs = _parse_segments(rtype, out_views, out_len, limits, status_buf)
            return cls(rtype, 0, (), 0, status_buf, segs)
        raise BlkUnsupported(f"request type {rtype} is not supported", status_buf)


def _take(views: list[memoryview], n: int) -> tuple[bytes, list[memoryview]]:
    """Copy the first ``n`` bytes of ``views``; return them and the views after."""
    parts = []
    rest = list(views)
    while n and rest:
        v = rest.pop(0)
        if len(v) > n:
            parts.append(bytes(v[:n]))
            rest.insert(0, v[n:])
            n = 0
        else:
            parts.append(bytes(v))
            n -= len(v)
    return b"".join(parts), rest


def _check_range(sector: int, nbytes: int, limits: BlkLimits, status_buf: memoryview) -> None:
    if nbytes % SECTOR_SIZE:
        raise BlkError(f"data length {nbytes} is not a multiple of 512", status_buf)
    if sector + (nbytes >> SECTOR_SHIFT) > limits.capacity_sectors:
        raise BlkError(
            f"sectors {sector}+{nbytes >> SECTOR_SHIFT} run past the end "
            f"({limits.capacity_sectors})",
            status_buf,
        )


def _parse_segments(
    rtype: int, views: list[memoryview], nbytes: int, limits: BlkLimits, status_buf: memoryview
) -> tuple[tuple[int, int, int], ...]:
    # §5.2.6.2: each segment is sector, num_sectors, flags; unknown flags and
    # UNMAP on a discard are UNSUPP, ranges beyond limits are IOERR.
    discard = rtype == VIRTIO_BLK_T_DISCARD
    if not (limits.discard if discard else limits.write_zeroes):
        raise BlkUnsupported("discard/write-zeroes was not offered", status_buf)
    if limits.read_only:
        raise BlkError("discard/write-zeroes on a read-only disk", status_buf)
    max_seg = limits.max_discard_seg if discard else limits.max_write_zeroes_seg
    max_sectors = limits.max_discard_sectors if discard else limits.max_write_zeroes_sectors
    if nbytes == 0 or nbytes % SEGMENT.size or nbytes // SEGMENT.size > max_seg:
        raise BlkError(f"{nbytes} bytes of segments (at most {max_seg} allowed)", status_buf)
    raw, _ = _take(views, nbytes)
    segs = []
    for off in range(0, nbytes, SEGMENT.size):
        sector, num, flags = SEGMENT.unpack_from(raw, off)
        allowed = 0 if discard else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        if flags & ~allowed:
            raise BlkUnsupported(f"segment flags {flags:#x} are not supported", status_buf)
        if num > max_sectors:
            raise BlkError(f"segment of {num} sectors exceeds {max_sectors}", status_buf)
        if sector + num > limits.capacity_sectors:
            raise BlkError(f"segment {sector}+{num} runs past the end", status_buf)
        segs.append((sector, num, flags))
    return tuple(segs)
