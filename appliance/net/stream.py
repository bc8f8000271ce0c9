"""Stream links: Ethernet frames over TCP or a unix socket, each preceded by its
length as a 32-bit big-endian integer — the framing QEMU's ``-netdev stream``
and ``-netdev socket,listen=|connect=`` use, so we interoperate with QEMU.

One side listens and takes one peer at a time; the other connects, retrying
until the listener is up. While no peer is connected, frames sent are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Sequence

from appliance.net.errors import NetError

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
MAX_FRAME = 65536 + 64
# Bound on bytes buffered from the peer before we stop reading (backpressure).
MAX_BUFFERED = 4 * MAX_FRAME


class StreamLink:
    """A FrameBackend over a stream socket.

    :param address: ``(host, port)`` for TCP or a path string for a unix socket.
    :param listen: listen for the peer instead of connecting to it.
    """

    vnet_hdr_len = 0

    def __init__(self, address: tuple[str, int] | str, *, listen: bool, reconnect: float = 1.0) -> None:
        self.address = address
        self.listen = listen
        self.peer: tuple[str, int] | str | None = None  # the connected peer's address
        self.reconnect = reconnect
        self.sock: socket.socket | None = None
        self._server: socket.socket | None = None
        self._buf = bytearray()
        self._pending = bytearray()
        self._ready: Callable[[], None] | None = None
        self._reading = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.rx_frames = 0
        self.tx_frames = 0
        self.tx_dropped = 0
        self.rx_errors = 0

    def _family(self) -> int:
        if isinstance(self.address, str):
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET

    async def start(self) -> None:
        """Bind the listener (errors surface now) and start accepting or connecting."""
        if self.listen:
            srv = socket.socket(self._family(), socket.SOCK_STREAM)
            try:
                if srv.family != socket.AF_UNIX:
                    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                srv.bind(self.address)
                srv.listen(1)
            except OSError as err:
                srv.close()
                raise NetError(f"cannot listen on {self._describe()}") from err
            srv.setblocking(False)
            self._server = srv
            self._task = asyncio.get_running_loop().create_task(self._accept_loop())
        else:
            self._task = asyncio.get_running_loop().create_task(self._connect_loop())

    def _describe(self) -> str:
        if isinstance(self.address, str):
            return "@" + self.address[1:] if self.address.startswith("\0") else self.address
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._server is not None
        while not self._closed:
            conn, _ = await loop.sock_accept(self._server)
            if self.sock is not None:
                conn.close()  # one peer at a time, like QEMU
                continue
            self._attach(conn)

    async def _connect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if self.sock is None:
                s = socket.socket(self._family(), socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    await loop.sock_connect(s, self.address)
                except OSError:
                    s.close()
                else:
                    self._attach(s)
            await asyncio.sleep(self.reconnect)

    def _attach(self, s: socket.socket) -> None:
        s.setblocking(False)
        if s.family != socket.AF_UNIX:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        try:
            # What info network names (QEMU's info_str): the peer while one is connected.
            self.peer = s.getpeername()
        except OSError:
            self.peer = None
        self._buf.clear()
        self._arm()

    def _detach(self) -> None:
        if self.sock is not None:
            if self._pending:
                asyncio.get_running_loop().remove_writer(self.sock.fileno())
                self._pending.clear()
            if self._reading:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
                self._reading = False
            self.sock.close()
            self.sock = None
        self.peer = None
        self._buf.clear()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        want = self._ready is not None and self.sock is not None
        if want and not self._reading:
            assert self.sock is not None and self._ready is not None
            loop.add_reader(self.sock.fileno(), self._ready)
            self._reading = True
        elif not want and self._reading and self.sock is not None:
            loop.remove_reader(self.sock.fileno())
            self._reading = False

    def set_ready_callback(self, ready: Callable[[], None] | None) -> None:
        self._ready = ready
        self._arm()
        if ready is not None and self._has_frame():
            asyncio.get_running_loop().call_soon(ready)

    def _has_frame(self) -> bool:
        if len(self._buf) < 4:
            return False
        return len(self._buf) >= 4 + _LEN.unpack_from(self._buf)[0]

    def _fill(self) -> None:
        if self.sock is None or len(self._buf) >= MAX_BUFFERED:
            return
        try:
            data = self.sock.recv(MAX_BUFFERED - len(self._buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._detach()
            return
        self._buf += data

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        if not self._has_frame():
            self._fill()
        if len(self._buf) < 4:
            return -1
        (n,) = _LEN.unpack_from(self._buf)
        if n > MAX_FRAME:
            # Not a frame stream we understand: drop the peer rather than guess.
            self.rx_errors += 1
            log.warning("stream peer sent a %d-byte frame; disconnecting", n)
            self._detach()
            return -1
        if len(self._buf) < 4 + n:
            return -1
        frame = memoryview(self._buf)[4 : 4 + n]
        off = 0
        for b in bufs:
            take = min(len(b), n - off)
            b[:take] = frame[off : off + take]
            off += take
            if off == n:
                break
        frame.release()
        del self._buf[: 4 + n]
        self.rx_frames += 1
        if self._ready is not None and self._has_frame():
            asyncio.get_running_loop().call_soon(self._ready)
        return n

    def send(self, bufs: Sequence[memoryview]) -> bool:
        if self.sock is None or self._pending:
            self.tx_dropped += 1
            return False
        n = sum(len(b) for b in bufs)
        try:
            sent = self.sock.sendmsg([_LEN.pack(n), *bufs])
        except (BlockingIOError, InterruptedError):
            self.tx_dropped += 1
            return False
        except OSError:
            self._detach()
            self.tx_dropped += 1
            return False
        if sent != n + 4:
            # Keep the unsent tail so the framing stays intact; further frames
            # are dropped until the socket drains it.
            self._pending[:] = (_LEN.pack(n) + b"".join(bufs))[sent:]
            asyncio.get_running_loop().add_writer(self.sock.fileno(), self._drain)
        self.tx_frames += 1
        return True

    def _drain(self) -> None:
        if self.sock is None:
            return
        try:
            sent = self.sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(self._pending)
        del self._pending[:sent]
        if not self._pending:
            asyncio.get_running_loop().remove_writer(self.sock.fileno())

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> None:
        """Frames on the wire are plain Ethernet: nothing to offload."""

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        try:
            self._detach()
        except RuntimeError:
            pass
        if self._server is not None:
            self._server.close()
            self._server = None
