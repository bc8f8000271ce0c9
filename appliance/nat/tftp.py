"""Read-only TFTP server at the gateway address (``-netdev user,tftp=DIR``).

What network boot needs from the user-mode network, as libslirp offers it:
a guest's PXE firmware or boot loader fetches files below ``tftp=`` from
the gateway (over IPv6 from the router address ``ipv6-host``, which the
DHCPv6 Boot File URL names), UDP port 69 (RFC 1350). Only reads in octet
mode; the blksize, tsize and timeout options (RFC 2347, 2348, 2349) are
negotiated, since boot loaders ask for them. Replies leave from port 69 as libslirp's do: clients
lock onto whatever port answers their request first.

The guest is hostile: file names are confined to the root (no ``..``
component, no symlink leading out), sessions are few and expire, and a
malformed packet gets an ERROR or nothing, never an exception.
"""

from __future__ import annotations

import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TFTP_PORT = 69
RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
# RFC 1350 error codes.
E_UNDEF, E_NOT_FOUND, E_ACCESS, E_ILLEGAL_OP, E_UNKNOWN_TID, E_OPTION = 0, 1, 2, 4, 5, 8
DEFAULT_BLKSIZE = 512
# The largest block that fits one 1500-byte frame (IPv4 20 + UDP 8 + TFTP 4):
# bigger requests get this, which RFC 2348 lets a server answer with.
MAX_BLKSIZE = 1468
MAX_SESSIONS = 20
SESSION_TIMEOUT = 5.0  # seconds without a packet from the client (libslirp uses 5)
DEFAULT_TIMEOUT = 1  # seconds before an unacknowledged packet is sent again (RFC 2349 may change it)
MAX_RETRIES = 5
_OP = struct.Struct("!H")
_OP_BLOCK = struct.Struct("!HH")

# send(guest ip, guest port, payload): one UDP datagram to the guest from the server.
Send = Callable[[bytes, int, bytes], object]


@dataclass
class _Session:
    fd: int
    size: int
    blksize: int
    timeout: int
    oack: bytes  # what block 0 is: the options answer, or nothing
    block: int = 0  # the last block sent (0: the OACK, before any data)
    done: bool = False  # the last (short) block has been sent
    last: float = field(default_factory=time.monotonic)  # the client's last packet
    sent: bytes = b""  # the last packet sent, for retransmission
    sent_at: float = 0.0
    retries: int = 0


@dataclass
class TftpStats:
    sessions: int = 0
    files_sent: int = 0
    errors_sent: int = 0
    ignored: int = 0


def resolve(root: Path, name: str) -> Path | None:
    """Where ``name`` points below ``root``, or None if it would leave it.

    A leading ``/`` means the root (PXE configurations often write one); any
    ``.`` or ``..`` component, an empty one, or a symlink leading out of the
    root is refused. Whether the file exists is the caller's question.
    """
    parts = name.strip("/").split("/")
    if name.endswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in name:
        return None
    try:
        real_root = root.resolve()
        path = real_root.joinpath(*parts).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if real_root not in path.parents:
        return None
    return path


def _strings(data: bytes) -> list[str] | None:
    """The NUL-terminated strings after the opcode, or None when one is unterminated."""
    if not data.endswith(b"\0"):
        return None
    try:
        return data[:-1].decode("ascii").split("\0")
    except UnicodeDecodeError:
        return None


class TftpServer:
    """TFTP sessions keyed by the client's (address, port)."""

    def __init__(self, root: str | Path, send: Send) -> None:
        self.root = Path(root)
        self._send = send
        self._sessions: dict[tuple[bytes, int], _Session] = {}
        self.stats = TftpStats()

    # -- input -------------------------------------------------------------
    def input(self, src: bytes, sport: int, payload: bytes | memoryview) -> None:
        """One datagram from the guest to port 69."""
        data = bytes(payload)
        if len(data) < 2:
            self.stats.ignored += 1
            return
        op = _OP.unpack_from(data)[0]
        key = (src, sport)
        if op == RRQ:
            self._request(key, data[2:])
        elif op == WRQ:
            self._error(key, E_ACCESS, "Access violation")
        elif op == ACK and len(data) >= 4:
            self._ack(key, _OP_BLOCK.unpack_from(data)[1])
        elif op == ERROR:
            self._end(key)  # the client gave up (or refused our options)
        elif key in self._sessions:
            self._error(key, E_ILLEGAL_OP, "Illegal TFTP operation")
            self._end(key)
        else:
            self.stats.ignored += 1

    def _request(self, key: tuple[bytes, int], body: bytes) -> None:
        self._end(key)  # a new request restarts the client's session
        words = _strings(body)
        if words is None or len(words) < 2 or len(words) % 2:
            self._error(key, E_ILLEGAL_OP, "Illegal TFTP operation")
            return
        name, mode, opts = words[0], words[1], words[2:]
        if mode.lower() != "octet":
            self._error(key, E_ILLEGAL_OP, "Unsupported transfer mode")
            return
        if len(self._sessions) >= MAX_SESSIONS:
            self._error(key, E_UNDEF, "Too many sessions")
            return
        path = resolve(self.root, name)
        if path is None:
            self._error(key, E_ACCESS, "Access violation")
            return
        try:
            # Only a regular file is opened: opening a FIFO or a device below the
            # root is already an action on it. What was opened is checked again.
            regular = stat.S_ISREG(os.stat(path).st_mode)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK) if regular else -1
        except OSError:
            fd = -1
        if fd < 0:
            self._error(key, E_NOT_FOUND, "File not found")
            return
        try:
            st = os.fstat(fd)
            # What was opened, not what was checked: a symlink swapped in
            # between must not lead out of the root.
            inside = self._inside(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            st, inside = None, False
        if st is None or not inside or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self._error(key, E_NOT_FOUND if inside else E_ACCESS, "File not found" if inside else "Access violation")
            return
        answer, blksize, timeout = self._negotiate(opts, st.st_size)
        s = _Session(fd, st.st_size, blksize, timeout, answer)
        self._sessions[key] = s
        self.stats.sessions += 1
        if answer:
            self._transmit(key, s, _OP.pack(OACK) + answer)
        else:
            self._data(key, s, 1)

    def _inside(self, real: str) -> bool:
        root = os.path.realpath(self.root)
        return real.startswith(root.rstrip("/") + "/")

    @staticmethod
    def _negotiate(opts: list[str], size: int) -> tuple[bytes, int, int]:
        """The OACK body for the options we take (RFC 2347), the block size and the timeout."""
        out = bytearray()
        blksize, timeout = DEFAULT_BLKSIZE, DEFAULT_TIMEOUT
        seen: set[str] = set()
        for k, v in zip(opts[::2], opts[1::2], strict=True):
            key = k.lower()
            if key in seen:
                continue  # RFC 2347: an option is named once; the first one counts
            seen.add(key)
            # Ten digits are more than any option takes; longer ones are not parsed.
            if not v.isdigit() or len(v) > 10:
                continue
            n = int(v)
            if key == "blksize" and n >= 8:
                blksize = min(n, MAX_BLKSIZE)
                out += b"blksize\0%d\0" % blksize
            elif key == "tsize":
                out += b"tsize\0%d\0" % size
            elif key == "timeout" and 1 <= n <= 255:
                timeout = n
                out += b"timeout\0%d\0" % n
        return bytes(out), blksize, timeout

    def _ack(self, key: tuple[bytes, int], block: int) -> None:
        s = self._sessions.get(key)
        if s is None:
            self._error(key, E_UNKNOWN_TID, "Unknown transfer ID")
            return
        s.last = time.monotonic()
        if block != s.block & 0xFFFF:
            # A repeated ACK of the block before is not answered (RFC 1123
            # §4.2.3.1: doing so doubles every later block, the Sorcerer's
            # Apprentice); a lost block goes again on our own timeout.
            return
        if s.done:
            self.stats.files_sent += 1
            self._end(key)
        else:
            self._data(key, s, s.block + 1)

    def _data(self, key: tuple[bytes, int], s: _Session, block: int) -> None:
        try:
            chunk = os.pread(s.fd, s.blksize, (block - 1) * s.blksize)
        except OSError:
            self._error(key, E_UNDEF, "Read error")
            self._end(key)
            return
        s.block = block
        s.done = len(chunk) < s.blksize
        s.retries = 0
        # Block numbers past 65535 wrap to 0, as the common clients expect.
        self._transmit(key, s, _OP_BLOCK.pack(DATA, block & 0xFFFF) + chunk)

    def _transmit(self, key: tuple[bytes, int], s: _Session, packet: bytes) -> None:
        s.sent, s.sent_at = packet, time.monotonic()
        self._send(key[0], key[1], packet)

    def _error(self, key: tuple[bytes, int], code: int, msg: str) -> None:
        self.stats.errors_sent += 1
        self._send(key[0], key[1], _OP_BLOCK.pack(ERROR, code) + msg.encode() + b"\0")

    def _end(self, key: tuple[bytes, int]) -> None:
        s = self._sessions.pop(key, None)
        if s is not None:
            os.close(s.fd)

    # -- housekeeping ---------------------------------------------------------
    def expire(self, now: float) -> None:
        """Resend what went unacknowledged for the session's timeout; drop silent clients."""
        for key, s in list(self._sessions.items()):
            if now - s.last > SESSION_TIMEOUT or s.retries >= MAX_RETRIES:
                self._end(key)
            elif now - s.sent_at >= s.timeout:
                s.retries += 1
                self._transmit(key, s, s.sent)

    def close(self) -> None:
        for key in list(self._sessions):
            self._end(key)

    def __len__(self) -> int:
        return len(self._sessions)
