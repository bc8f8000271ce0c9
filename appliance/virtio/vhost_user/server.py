"""vhost-user server: a unix socket that serves one front end at a time.

asyncio's streams cannot carry SCM_RIGHTS, so the connection is a raw
non-blocking socket read with ``recvmsg`` when the loop says it is readable.
Like qemu-storage-daemon, the listener stops accepting while a front end is
connected; when it goes away (cleanly or mid-message) the back end stops its
rings and unmaps guest memory, and the next connection is accepted. A message
that loses framing (bad version, oversized payload) drops the connection; any
other bad message gets an error reply and the session goes on.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from appliance.virtio.vhost_user import protocol as p
from appliance.virtio.vhost_user.backend import VhostUserBackend
from appliance.virtio.vhost_user.errors import ProtocolError, VhostUserError

log = logging.getLogger(__name__)

_FD_SIZE = array.array("i").itemsize
_ANC_SIZE = socket.CMSG_SPACE(p.MAX_FDS * _FD_SIZE)


class _Closed(Exception):
    """The front end closed the connection."""


class VhostUserServer:
    """Listens on ``path`` and hands each front end's messages to ``backend``.

    :param path: the unix socket path (an existing file there is replaced, as
        QEMU does).
    :param backend: the device glue; reused across front ends.
    :param on_disconnect: called once each front end has gone and the back end is cleaned up
        (the net daemon ends what its user-mode stack held for that front end's guest); when
        :meth:`close` interrupts that clean-up, at once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        backend: VhostUserBackend,
        *,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.backend = backend
        self.on_disconnect = on_disconnect
        self.connections = 0
        self._listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._conn: socket.socket | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def start(self) -> None:
        """Bind and listen; returns once the socket accepts connections.

        :raises VhostUserError: when the socket cannot be created.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                if self.path.is_socket():
                    self.path.unlink()
            sock.bind(str(self.path))
            sock.listen(1)
        except OSError as err:
            sock.close()
            raise VhostUserError(f"cannot listen on {self.path}") from err
        sock.setblocking(False)
        self._listener = sock
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def close(self) -> None:
        """Stop serving: drop the front end, clean up the back end, remove the socket."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def __aenter__(self) -> VhostUserServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as err:
                # Out of fds or similar: wait for it to pass rather than stop serving.
                log.warning("vhost-user accept failed: %s", err)
                await asyncio.sleep(0.5)
                continue
            conn.setblocking(False)
            self.connections += 1
            self._conn = conn
            try:
                await self._session(conn)
            except Exception:
                log.exception("vhost-user session failed; waiting for the next front end")
            finally:
                self._conn = None
                conn.close()
                try:
                    await asyncio.shield(self.backend.disconnect())
                finally:
                    # Also when close() cancels us during the clean-up: the front end is gone all
                    # the same, and its owner hears of it only here.
                    self._front_end_gone()

    def _front_end_gone(self) -> None:
        if self.on_disconnect is not None:
            try:
                self.on_disconnect()
            except Exception:
                log.exception("cleaning up after a front end failed")

    async def _session(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            fds: list[int] = []
            try:
                try:
                    raw, truncated = await _recv(conn, p.HEADER_SIZE, fds)
                except _Closed:
                    log.info("vhost-user front end disconnected")
                    return
                header = p.parse_header(raw)
                payload, trunc2 = await _recv(conn, header.size, fds)
                if truncated or trunc2:
                    for fd in fds:
                        os.close(fd)
                    fds = []
                    # Refused but answered, so a front end waiting for an ack is not stuck.
                    reply = self.backend.refuse(header, "too many fds")
                else:
                    reply = await self.backend.handle(header, payload, fds)
                fds = []
                if reply is not None:
                    data, out_fds = reply
                    try:
                        if out_fds:
                            await _send_with_fds(conn, data, out_fds)
                        else:
                            await loop.sock_sendall(conn, data)
                    finally:
                        for fd in out_fds:
                            with contextlib.suppress(OSError):
                                os.close(fd)
            except _Closed:
                log.warning("vhost-user front end disconnected mid-message")
                return
            except ProtocolError as err:
                log.warning("dropping vhost-user front end: %s", err)
                return
            except OSError as err:
                log.warning("vhost-user connection failed: %s", err)
                return
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)


async def _send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send a (small) reply with fds attached to its first byte."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    loop = asyncio.get_running_loop()
    while True:
        try:
            n = sock.sendmsg([data], anc)
            break
        except (BlockingIOError, InterruptedError):
            await _writable(sock)
    if n < len(data):
        await loop.sock_sendall(sock, data[n:])


async def _writable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_writer(sock.fileno())


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def _recv(sock: socket.socket, n: int, fds: list[int]) -> tuple[bytes, bool]:
    """Read exactly ``n`` bytes, collecting any fds into ``fds``.

    :returns: the bytes and whether ancillary data was truncated (too many fds).
    :raises _Closed: on EOF.
    """
    buf = bytearray()
    truncated = False
    while len(buf) < n:
        try:
            data, anc, flags, _ = sock.recvmsg(n - len(buf), _ANC_SIZE)
        except (BlockingIOError, InterruptedError):
            await _readable(sock)
            continue
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
                fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            truncated = True
        if len(fds) > p.MAX_FDS:
            truncated = True
        if not data:
            raise _Closed()
        buf += data
    return bytes(buf), truncated
