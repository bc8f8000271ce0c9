"""vhost-user message layouts and their parsing: pure functions on bytes.

A message is a 12-byte header ``{request u32, flags u32, size u32}`` followed
by ``size`` bytes of payload, with file descriptors riding along as SCM_RIGHTS
ancillary data (QEMU docs/interop/vhost-user.rst, "Message Specification").
Every payload the front end sends is decoded here into a frozen dataclass, or
refused with :class:`~appliance.virtio.vhost_user.errors.ProtocolError`; the
back end never unpacks bytes itself. Nothing here does I/O, so the whole module
is fuzzed directly.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from appliance.virtio.vhost_user.errors import ProtocolError

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size

# Header flags ("Header" section): bits 0-1 carry the protocol version.
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

# The largest payload we read. The biggest real one is a memory table or a
# config message (~270 bytes); anything past this means framing is lost.
MAX_PAYLOAD = 4096
# SET_MEM_TABLE carries at most this many regions (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_MEM_REGIONS = 8
# The most fds one message may carry (the same baseline).
MAX_FDS = 8
# VhostUserConfig's payload is at most 256 bytes (VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256

# The virtio feature bit reused to announce protocol features ("Communication").
VHOST_USER_F_PROTOCOL_FEATURES = 30
# A vhost feature bit (not virtio): the back end can log dirty pages.
VHOST_F_LOG_ALL = 26

# SET_VRING_KICK/CALL/ERR payload: low byte is the ring index; bit 8 says no fd.
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100


class Request(enum.IntEnum):
    """Front-end requests ("Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bits ("Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# Requests whose definition includes a reply. For these NEED_REPLY adds nothing:
# the reply itself is the acknowledgement ("REPLY_ACK").
REPLYING = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_INFLIGHT_FD,
        Request.GET_STATUS,
    }
)
# SET_LOG_BASE replies only once LOG_SHMFD is negotiated, which this back end never offers
# (no LOG_ALL: no migration's dirty log); without it a reply would be one the front end
# never reads, and every later answer would be taken for the one before it.


@dataclass(frozen=True, slots=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


@dataclass(frozen=True, slots=True)
class VringState:
    """``{index u32, num u32}``: SET_VRING_NUM/BASE/ENABLE and GET_VRING_BASE."""

    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``{index, flags, desc, used, avail, log}``; ring addresses are front-end user addresses."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True, slots=True)
class VringFd:
    """SET_VRING_KICK/CALL/ERR: which ring, and whether an fd came with it."""

    index: int
    nofd: bool


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One region of the front end's memory, mappable from its fd at ``mmap_offset``."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class ConfigAccess:
    """GET_CONFIG/SET_CONFIG: ``{offset u32, size u32, flags u32, payload}``."""

    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Inflight:
    """GET/SET_INFLIGHT_FD: ``{mmap_size u64, mmap_offset u64, num_queues u16, queue_size u16}``."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


Payload = (
    int | VringState | VringAddr | VringFd | tuple[MemRegion, ...] | MemRegion | ConfigAccess
    | Inflight | None
)

_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_MEM_HDR = struct.Struct("<II")
_CONFIG_HDR = struct.Struct("<III")
# QEMU's VhostUserInflight is 20 bytes of fields padded to 24.
_INFLIGHT = struct.Struct("<QQHH4x")


def parse_header(data: bytes) -> Header:
    """Decode a message header.

    :raises ProtocolError: (fatal) when the version is wrong or the payload is too big.
    """
    if len(data) != HEADER_SIZE:
        raise ProtocolError("truncated message header", fatal=True)
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(f"unsupported protocol version {flags & VERSION_MASK}", fatal=True)
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {size} bytes is too large", fatal=True)
    return Header(request, flags, size)


def _exact(payload: bytes, fmt: struct.Struct, name: str) -> tuple[int, ...]:
    if len(payload) != fmt.size:
        raise ProtocolError(f"{name} payload is {len(payload)} bytes, expected {fmt.size}")
    return fmt.unpack(payload)


def _region(values: tuple[int, ...]) -> MemRegion:
    guest, size, user, offset = values
    # Reject regions that wrap: every later address computation assumes they don't.
    if size == 0 or guest + size > 1 << 64 or user + size > 1 << 64:
        raise ProtocolError("memory region is empty or wraps")
    return MemRegion(guest, size, user, offset)


def decode(request: int, payload: bytes) -> Payload:
    """Decode the payload of ``request`` into its typed form.

    Requests without a payload decode to ``None``; ones that carry a single
    u64 decode to ``int``.

    :raises ProtocolError: when the request is unknown or the payload has the wrong shape.
    """
    try:
        req = Request(request)
    except ValueError:
        raise ProtocolError(f"unknown request {request}") from None
    match req:
        case (
            Request.GET_FEATURES
            | Request.GET_PROTOCOL_FEATURES
            | Request.GET_QUEUE_NUM
            | Request.GET_MAX_MEM_SLOTS
            | Request.SET_OWNER
            | Request.RESET_OWNER
            | Request.RESET_DEVICE
            | Request.GET_STATUS
        ):
            # QEMU sends some of these with an 8-byte dummy; ignore what is there.
            return None
        case (
            Request.SET_FEATURES
            | Request.SET_PROTOCOL_FEATURES
            | Request.SET_LOG_BASE
            | Request.SET_STATUS
            | Request.NET_SET_MTU
        ):
            if len(payload) < 8:
                raise ProtocolError(f"{req.name} payload is {len(payload)} bytes, expected 8")
            return int(_U64.unpack_from(payload)[0])
        case (
            Request.SET_VRING_NUM
            | Request.SET_VRING_BASE
            | Request.GET_VRING_BASE
            | Request.SET_VRING_ENABLE
        ):
            index, num = _exact(payload, _STATE, req.name)
            return VringState(index, num)
        case Request.SET_VRING_ADDR:
            return VringAddr(*_exact(payload, _ADDR, req.name))
        case Request.SET_VRING_KICK | Request.SET_VRING_CALL | Request.SET_VRING_ERR:
            (value,) = _exact(payload, _U64, req.name)
            if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
                raise ProtocolError(f"{req.name} has unknown bits set in {value:#x}")
            return VringFd(value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK))
        case Request.SET_MEM_TABLE:
            if len(payload) < _MEM_HDR.size:
                raise ProtocolError("SET_MEM_TABLE payload is too short")
            count, _padding = _MEM_HDR.unpack_from(payload)
            if count > MAX_MEM_REGIONS:
                raise ProtocolError(f"SET_MEM_TABLE has {count} regions, at most 8 allowed")
            if len(payload) < _MEM_HDR.size + count * _REGION.size:
                raise ProtocolError("SET_MEM_TABLE payload is shorter than its regions")
            regions = tuple(
                _region(_REGION.unpack_from(payload, _MEM_HDR.size + i * _REGION.size))
                for i in range(count)
            )
            return regions
        case Request.ADD_MEM_REG | Request.REM_MEM_REG:
            if len(payload) != 8 + _REGION.size:
                raise ProtocolError(f"{req.name} payload is {len(payload)} bytes, expected 40")
            return _region(_REGION.unpack_from(payload, 8))
        case Request.GET_CONFIG | Request.SET_CONFIG:
            if len(payload) < _CONFIG_HDR.size:
                raise ProtocolError(f"{req.name} payload is too short")
            offset, size, flags = _CONFIG_HDR.unpack_from(payload)
            if size > MAX_CONFIG_SIZE or len(payload) != _CONFIG_HDR.size + size:
                raise ProtocolError(f"{req.name} size {size} does not match its payload")
            if offset > MAX_CONFIG_SIZE or offset + size > MAX_CONFIG_SIZE:
                raise ProtocolError(f"{req.name} range {offset}+{size} is out of bounds")
            return ConfigAccess(offset, size, flags, bytes(payload[_CONFIG_HDR.size :]))
        case Request.GET_INFLIGHT_FD | Request.SET_INFLIGHT_FD:
            if len(payload) not in (_INFLIGHT.size - 4, _INFLIGHT.size):
                raise ProtocolError(f"{req.name} payload is {len(payload)} bytes, expected 24")
            size, offset, nq, qs = _INFLIGHT.unpack(payload.ljust(_INFLIGHT.size, b"\0"))
            return Inflight(size, offset, nq, qs)
        case _:
            # Known to the protocol, but nothing we implement or offer.
            raise ProtocolError(f"request {req.name} is not supported")


def encode(request: int, payload: bytes = b"", *, reply: bool = True, flags: int = 0) -> bytes:
    """Frame a message: a reply by default, a front-end request with ``reply=False``."""
    f = VERSION | flags | (FLAG_REPLY if reply else 0)
    return HEADER.pack(request, f, len(payload)) + payload


def u64(value: int) -> bytes:
    return _U64.pack(value & 0xFFFFFFFFFFFFFFFF)


def vring_state(index: int, num: int) -> bytes:
    return _STATE.pack(index, num)


def vring_addr(index: int, flags: int, desc: int, used: int, avail: int, log: int = 0) -> bytes:
    return _ADDR.pack(index, flags, desc, used, avail, log)


def mem_table(regions: list[MemRegion] | tuple[MemRegion, ...]) -> bytes:
    out = _MEM_HDR.pack(len(regions), 0)
    for r in regions:
        out += _REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset)
    return out


def mem_region(region: MemRegion) -> bytes:
    return _U64.pack(0) + _REGION.pack(
        region.guest_addr, region.size, region.user_addr, region.mmap_offset
    )


def config(offset: int, size: int, flags: int = 0, data: bytes | None = None) -> bytes:
    body = bytes(size) if data is None else data
    return _CONFIG_HDR.pack(offset, size, flags) + body


def inflight(mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int) -> bytes:
    return _INFLIGHT.pack(mmap_size, mmap_offset, num_queues, queue_size)
