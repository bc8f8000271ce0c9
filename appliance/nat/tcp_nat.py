"""TCP NAT: the table of guest-facing :class:`~appliance.nat.tcp.TcpConn` and their host sockets.

Outbound: a guest SYN starts a host connect; only when it succeeds does the
guest get its SYN-ACK, so "connection refused" reaches the guest as a RST,
as it would on a real network. The gateway address means host loopback, the
DNS address on port 53 means the first upstream resolver, and ``guestfwd``
addresses mean their configured targets.

Inbound: each ``hostfwd=tcp:`` listener turns an accepted host connection
into a connection the stack opens towards the guest; the host socket is not
read until the guest completes the handshake.

Host sockets are asyncio transports driven by a small :class:`asyncio.Protocol`
(the layer under asyncio streams), so bytes move between the socket and the
TCP endpoint without extra tasks or copies, and flow control is the
transport's own pause/resume.

Connection setup is on the guest's critical path (a guest opening many short
connections waits for each SYN-ACK), so an outbound connect to an address is a
non-blocking ``connect()`` made while the SYN is handled. To loopback it has
finished by the time ``connect()`` returns, so the SYN-ACK is queued before
the guest's frame is done with. The host socket's own last handshake ACK is
held until the guest has been signalled its SYN-ACK, so the host server learns
of the connection after that, not inside our ``connect()`` while we still owe
the guest its SYN-ACK, and its ``accept()`` runs while the guest takes its
SYN-ACK (not when the guest's ACK and FIN come in). The socket is then served by
:class:`HostSocket` on the NAT's own epoll (:class:`HostPoller`, one reader on
the loop for all of them) rather than by an asyncio transport: wrapping it with
``connect_accepted_socket`` took a task, a future, three more loop turns and
~40 µs of CPU a connection (``loop.create_connection`` took nine turns to the
SYN-ACK), and a reader of its own on the loop cost more than the shared epoll
(net-daemon CPU with a Linux guest ~0.53 -> ~0.50 ms a connection). The
``hostfwd`` listeners are on that epoll too, and hand accepted sockets to
:class:`HostSocket` directly. Only a connect by name (a ``guestfwd`` target)
still uses an asyncio transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import select
import shlex
import signal
import socket
import struct
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol, cast

from appliance.nat.config import HostForward
from appliance.nat.errors import NatError
from appliance.nat.frames import IPPROTO_TCP, Ipv4, ip_str, pseudo_sum, verify
from appliance.nat.icmp import routing_error
from appliance.nat.stats import FlowInfo, sock_address
from appliance.nat.tcp import (
    ACK,
    CLOSED,
    CONNECTING,
    FIN,
    RCVBUF,
    RST,
    SYN,
    SYN_RCVD,
    SYN_SENT,
    TIME_WAIT_STATE,
    HostTransport,
    TcpConn,
)

if TYPE_CHECKING:
    from appliance.nat.stack import UserNetwork

MAX_CONNS = 1024
MAX_CONNECTING = 64  # host connects in progress at once
MAX_HALF_OPEN = 128  # guest handshakes not yet complete; beyond, the oldest is dropped (a SYN cache)
CONNECT_TIMEOUT = 20.0
MAX_COMMANDS = 16  # guestfwd=…-cmd: runs at once
_TCP = struct.Struct("!HHIIHHHH")


# Bytes read from a host socket at a time (as asyncio's socket transport).
RECV_SIZE = 256 * 1024
WRITE_HIGH = RCVBUF // 2  # host write buffer above this: the guest's window closes ...
WRITE_LOW = RCVBUF // 8  # ... and reopens (host_drained) once it is down to this


EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT


class Watcher(Protocol):
    """What :class:`HostPoller` calls when a watched descriptor is ready."""

    def _read_ready(self) -> None: ...
    def _write_ready(self) -> None: ...


class HostPoller:
    """One epoll for the NAT's connected host sockets, itself a single reader on the loop.

    Each host socket was a reader (and at times a writer) of its own on the
    asyncio loop: every ``add_reader``/``remove_reader`` made a Handle, a
    selector key and a dict update, and every event went through a Handle on
    the ready queue. Here watching a socket is one ``epoll_ctl`` and a dict
    entry, and one loop callback serves every socket that is ready. Level
    triggered, as asyncio's selector: a socket that is not read stays ready.
    Watchers are objects with ``_read_ready``/``_write_ready`` methods.
    """

    __slots__ = ("_loop", "_ep", "_fds", "_net")

    def __init__(self, net: UserNetwork) -> None:
        self._net = net
        self._loop = net.loop
        self._ep: select.epoll | None = select.epoll()
        self._fds: dict[int, tuple[Watcher, int]] = {}
        self._loop.add_reader(self._ep.fileno(), self._poll)

    def watch(self, fd: int, who: Watcher, mask: int) -> None:
        """Wait for ``mask`` (EPOLLIN, EPOLLOUT) on ``fd`` for ``who``; 0 stops watching it."""
        ep = self._ep
        if ep is None:
            return
        old = self._fds.get(fd)
        if old is None:
            if mask:
                ep.register(fd, mask)
                self._fds[fd] = (who, mask)
        elif not mask:
            del self._fds[fd]
            ep.unregister(fd)
        elif old[1] != mask:
            ep.modify(fd, mask)
            self._fds[fd] = (who, mask)

    def __len__(self) -> int:
        return len(self._fds)

    def _poll(self) -> None:
        ep = self._ep
        if ep is None:
            return
        try:
            events = ep.poll(0, 64)
        except InterruptedError:
            return
        fds = self._fds
        for fd, ev in events:
            entry = fds.get(fd)
            if entry is None:
                continue  # stopped watching while an earlier event of this batch was handled
            who, mask = entry
            try:
                # As asyncio's selector: hang-up and error wake both a reader and a writer.
                if ev & ~EPOLLOUT and mask & EPOLLIN:
                    who._read_ready()
                    entry = fds.get(fd)
                    if entry is None or entry[0] is not who:
                        continue
                    mask = entry[1]
                if ev & ~EPOLLIN and mask & EPOLLOUT:
                    who._write_ready()
            except Exception:  # noqa: BLE001 - one socket's failure must not starve the others
                self._net._internal_error()

    def close(self) -> None:
        ep, self._ep = self._ep, None
        if ep is not None:
            self._loop.remove_reader(ep.fileno())
            ep.close()
        self._fds.clear()


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL a guestfwd command and what it started, unless it was reaped already (its
    pid, and so its group id, could belong to someone else by then)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


class HostSocket:
    """A connected host socket served by loop readers/writers for one :class:`TcpConn`.

    It is the subset of an asyncio transport the connection uses
    (:class:`~appliance.nat.tcp.HostTransport`) with the same semantics:
    writes go out at once and what the socket does not take waits in a buffer
    (``get_write_buffer_size``), ``write_eof`` shuts the socket down once that
    buffer is empty, ``close`` flushes it first and ``abort`` does not. Events
    come back as the connection's ``host_data``/``host_eof``/``host_lost``/
    ``host_drained``; a ``host_lost`` caused by a write is delivered on a later
    loop turn, as asyncio does, so it never re-enters the caller.
    """

    __slots__ = ("_loop", "_poller", "_sock", "_fd", "_conn", "_nat", "_wbuf", "_reading", "_paused", "_closing",
                 "_eof_pending", "_eof_sent", "_writing", "_write_paused", "_closed", "_read_on_resume")  # fmt: skip

    def __init__(self, nat: TcpNat, conn: TcpConn, sock: socket.socket, *, paused: bool = False) -> None:
        """``sock`` comes with its options set: TCP_NODELAY (as asyncio: we already batch) from
        _new_host_socket, or inherited from a hostfwd listener that has it, as Linux's accepted
        sockets inherit it; a guestfwd command's socketpair has no TCP options."""
        self._loop = nat.net.loop
        self._poller = nat.poller()
        self._sock = sock
        self._fd = sock.fileno()
        self._conn: TcpConn | None = conn
        self._nat = nat
        self._wbuf = bytearray()
        self._paused = paused
        # Created paused: a hostfwd connection waiting for the guest's SYN-ACK (see resume_reading).
        self._read_on_resume = paused
        self._closing = False
        self._closed = False
        self._eof_pending = False
        self._eof_sent = False
        self._writing = False
        self._write_paused = False
        self._reading = True
        if not paused:
            self._poller.watch(self._fd, self, EPOLLIN)

    # -- HostTransport ---------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._eof_pending or self._eof_sent or not data:
            return
        if not self._wbuf:
            try:
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as err:
                self._fail_later(err)
                return
            if n == len(data):
                return
            data = memoryview(data)[n:]
            self._writing = True
            self._watch()
        self._wbuf += data
        if len(self._wbuf) > WRITE_HIGH:
            self._write_paused = True

    def write_eof(self) -> None:
        if self._closing or self._eof_pending or self._eof_sent:
            return
        if self._wbuf:
            self._eof_pending = True
            return
        self._shutdown()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return len(self._wbuf)

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            if self._reading:
                self._watch()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self._reading and not self._closing:
                if self._read_on_resume:
                    self._read_on_resume = False
                    if self._nat.net.in_send:
                        # Read before watching: a client that has sent and closed needs no
                        # epoll_ctl at all (watched, then unwatched at its EOF, in one pass).
                        self._read_inline()
                if self._reading and not self._paused and not self._closing:
                    self._watch()

    def _read_inline(self) -> None:
        """Read inside a guest's pass, where the peer has likely sent already.

        Two such passes: the one that completes a hostfwd handshake (the host client connected
        before our SYN went out and has often written, and closed, since) and the one that
        shut the socket down after the guest's FIN (the peer ran while we yielded, and closed).
        What is read reaches the guest in that pass's batch, one interrupt, instead of after a
        poll and a loop turn (~70 us later, a second interrupt; busybox nc -ll in a TCG guest
        behind net-daemon). Two reads, the data and then often its FIN, both read before the
        connection hears of them: data and FIN then go in one segment.
        """
        conn = self._conn
        if conn is None or conn.state == CLOSED or not self._reading or self._paused or self._closing:
            return
        chunks: list[bytes] = []
        eof = False
        err: OSError | None = None
        for _ in range(2):
            try:
                data = self._sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                err = e
                break
            if not data:
                eof = True
                break
            chunks.append(data)
            if len(data) == RECV_SIZE:
                break  # more is queued: a stream, which the poller reads (host_data pauses it)
        if chunks:
            self._nat._guard(conn.host_data, chunks[0] if len(chunks) == 1 else b"".join(chunks), eof)
        elif eof:
            self._nat._guard(conn.host_eof)
        if eof:
            self._stop_reading()
        if chunks or eof:
            self._nat.net.urgent()
        if err is not None:
            self._fail_later(err)  # never host_lost inside the connection's own input

    def close(self) -> None:
        """Stop reading, send what is buffered, then close (the connection hears ``host_lost(None)``)."""
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._wbuf:
            self._finalize(None)

    def abort(self) -> None:
        """Close now, dropping what is buffered; nothing is reported back."""
        self._conn = None
        self._closing = True
        self._finalize(None)

    def is_closing(self) -> bool:
        return self._closing

    # -- loop callbacks --------------------------------------------------
    def _read_ready(self) -> None:
        conn = self._conn
        try:
            data = self._sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._fail(err)
            return
        if conn is None or conn.state == CLOSED:
            return
        net = self._nat.net
        net.hold()
        if data:
            self._nat._guard(conn.host_data, data)
            net.release()
        else:
            # The guest waits for this FIN: it goes to the device before we stop reading
            # (keeping our half open: TCP half-close).
            self._nat._guard(conn.host_eof)
            net.release()
            self._stop_reading()

    def _write_ready(self) -> None:
        try:
            n = self._sock.send(self._wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._wbuf.clear()
            self._fail(err)
            return
        del self._wbuf[:n]
        if self._wbuf:
            if self._write_paused and len(self._wbuf) <= WRITE_LOW:
                self._drained()
            return
        self._writing = False
        self._watch()
        if self._closing:
            self._finalize(None)
            return
        if self._eof_pending:
            self._eof_pending = False
            self._shutdown()
        if self._write_paused:
            self._drained()

    # -- internals -------------------------------------------------------
    def _watch(self) -> None:
        """Tell the poller what we wait for now (nothing once closed: the fd may be reused)."""
        if self._closed:
            return
        mask = EPOLLIN if self._reading and not self._paused else 0
        if self._writing:
            mask |= EPOLLOUT
        self._poller.watch(self._fd, self, mask)

    def _drained(self) -> None:
        self._write_paused = False
        conn = self._conn
        if conn is not None and conn.state != CLOSED:
            self._nat._guard(conn.host_drained)

    def _shutdown(self) -> None:
        self._eof_sent = True
        if self._after_pass():
            self._loop.call_soon(self._shutdown_now)
            return
        self._shutdown_now()

    def _after_pass(self) -> bool:
        """Whether our FIN (or close) to the peer should wait for the end of the guest's pass.

        When the peer has finished sending, its answer to our FIN is only its close(), which
        the guest does not wait for; but waking it now, inside the guest's pass, puts it on
        this CPU ahead of the rest of the pass (the calls that interrupt the guest wake QEMU's
        main thread, which preempts us, and the peer runs before we get the CPU back). A
        hostfwd client that reads to EOF and then connects again found our accept() ~0.4 ms
        behind its connect() (ftrace, busybox nc -ll -e cat in a TCG guest); a loop turn
        later, we are asleep when it connects and take the connection at once.
        """
        return not self._reading and self._nat.net.in_send

    def _shutdown_now(self) -> None:
        if self._closed:
            return  # closed since: its close() sent the FIN
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as err:
            self._fail_later(err)
            return
        net = self._nat.net
        if net.yield_after_host_wakeup:
            # The peer now reads our EOF and usually answers by closing, which the guest waits
            # for: if the scheduler queued the peer on this CPU, let it run before the rest of
            # this pass (see VirtioNet._notify).
            os.sched_yield()
            if self._reading and net.in_send:
                # It has often closed by now: its FIN then goes to the guest with this pass's
                # frames, not after the rest of the pass and a poll of the host sockets.
                self._read_inline()

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            if not self._paused:
                self._watch()

    def _fail_later(self, err: OSError) -> None:
        # Raised inside a call from the connection: report on the next turn, never re-entering it.
        self._wbuf.clear()
        if not self._closed:
            self._closing = True
            self._stop_reading()
            self._loop.call_soon(self._fail, err)

    def _fail(self, err: OSError) -> None:
        self._closing = True
        self._finalize(err)

    def _finalize(self, err: OSError | None) -> None:
        if self._closed:
            return
        after_pass = self._after_pass()
        self._reading = self._writing = False
        self._poller.watch(self._fd, self, 0)  # before close(): the number may be reused at once
        self._closed = True
        self._wbuf.clear()
        if after_pass:
            self._loop.call_soon(self._sock.close)
        else:
            self._sock.close()
        conn, self._conn = self._conn, None
        if conn is not None and conn.state != CLOSED:
            if err is None:
                self._loop.call_soon(self._lost, conn)
            else:
                self._nat._guard(conn.host_lost, err)

    def _lost(self, conn: TcpConn) -> None:
        if conn.state != CLOSED:
            self._nat._guard(conn.host_lost, None)


ACCEPT_BURST = 32  # connections taken per readiness event of a listener
ACCEPT_BACKOFF = 1.0  # out of descriptors: stop accepting this long (as asyncio's servers do)
# struct tcp_info (linux/tcp.h): on a listening socket, tcpi_unacked is its accept queue's length.
_TCPI_UNACKED = 24
_U32 = struct.Struct("=I")


class _Listener:
    """The listening sockets of one ``hostfwd=tcp:`` rule, served by the NAT's epoll.

    Bound as ``loop.create_server`` binds (every address ``getaddrinfo`` gives
    for the host address, IPv6 sockets V6ONLY, SO_REUSEADDR), so it keeps the
    ``sockets`` of an :class:`asyncio.Server`. An accepted socket goes straight
    to a :class:`HostSocket`, not read until the guest completes the handshake:
    no transport, protocol, or loop reader of its own.
    """

    def __init__(self, nat: TcpNat, fwd: HostForward, socks: list[socket.socket]) -> None:
        self.fwd = fwd
        self.sockets = socks
        self._watchers = [_ListenSocket(nat, fwd, sock) for sock in socks]

    def close(self) -> None:
        for w in self._watchers:
            w.close()
        self.sockets = []

    async def wait_closed(self) -> None:
        pass


class _ListenSocket:
    """One listening socket of a ``hostfwd`` rule.

    The accept of a forwarded connection is on its critical path (the host client waits for the
    guest's answer), and with a TCG guest it runs with cold caches: the guest's emulation ran in
    between. ``socket.accept()`` converts the listener's family and type to enums for the new
    socket object, and a burst that ends when accept() raises EAGAIN raises and catches an
    exception: accepting one connection that way took a median ~60-70 us after a 48 MiB copy,
    against ~35 us for asking the accept queue's length (TCP_INFO) and taking that many with the
    socket module's own ``_accept()`` (what ``accept()`` wraps) and the family looked up once.
    """

    __slots__ = ("_nat", "_fwd", "_sock", "_fd", "_backoff", "_family")

    def __init__(self, nat: TcpNat, fwd: HostForward, sock: socket.socket) -> None:
        self._nat, self._fwd, self._sock, self._fd = nat, fwd, sock, sock.fileno()
        self._family = sock.family
        self._backoff: asyncio.TimerHandle | None = None
        nat.poller().watch(self._fd, self, EPOLLIN)

    def _read_ready(self) -> None:
        # The SYNs of this burst go to the device when it ends, in this callback, not from a
        # call_soon a loop turn later: the guest is waiting in accept() for them.
        net = self._nat.net
        net.hold()
        try:
            self._accept_burst()
        finally:
            net.release()

    def _accept_burst(self) -> None:
        listener = self._sock
        for _ in range(self._queued()):
            try:
                fd, peer = listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Level-triggered: an accept that keeps failing would spin the loop.
                    self._nat.poller().watch(self._fd, self, 0)
                    self._backoff = self._nat.net.loop.call_later(ACCEPT_BACKOFF, self._resume)
                return
            self._nat._accept(socket.socket(self._family, socket.SOCK_STREAM, 0, fd), peer, self._fwd)

    def _queued(self) -> int:
        """How many accept()s this readiness event gets: the accept queue's length, at least one
        (a connection reset meanwhile leaves it short) and at most ACCEPT_BURST; ACCEPT_BURST
        where TCP_INFO does not say (the loop then ends at EAGAIN)."""
        try:
            info = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_UNACKED + 4)
        except OSError:
            return ACCEPT_BURST
        if len(info) < _TCPI_UNACKED + 4:
            return ACCEPT_BURST
        return min(max(_U32.unpack_from(info, _TCPI_UNACKED)[0], 1), ACCEPT_BURST)

    def _write_ready(self) -> None:
        pass

    def _resume(self) -> None:
        self._backoff = None
        self._nat.poller().watch(self._fd, self, EPOLLIN)

    def close(self) -> None:
        if self._backoff is not None:
            self._backoff.cancel()
        self._nat.poller().watch(self._fd, self, 0)
        self._sock.close()


def _bind_listeners(host: str | None, port: int) -> list[socket.socket]:
    """Listening sockets for ``host:port`` as ``loop.create_server(host, port, reuse_address=True)`` makes them."""
    infos = socket.getaddrinfo(host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)  # fmt: skip
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _name, addr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
            sock.bind(addr)
            sock.listen(100)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class _HostSide(asyncio.Protocol):
    """The asyncio protocol of a connection to a ``guestfwd`` target given by name."""

    __slots__ = ("conn", "nat", "transport")

    def __init__(self, nat: TcpNat, conn: TcpConn | None = None) -> None:
        self.nat = nat
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(high=RCVBUF // 2, low=RCVBUF // 8)
        if self.conn is not None:
            conn = self.conn
            if conn.state == CLOSED:
                self.conn = None
                t.abort()  # the guest gave up (RST) while we were connecting
                return
            if conn.state == CONNECTING:
                self.nat._guard(conn.host_connected)  # a connect by name: answered only now
            self.nat._guard(conn.attach, cast(HostTransport, t))

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None and conn.state != CLOSED:
            self.nat._guard(conn.host_data, data)

    def eof_received(self) -> bool:
        conn = self.conn
        if conn is not None and conn.state != CLOSED:
            self.nat._guard(conn.host_eof)
        return True  # keep our half open: TCP half-close

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None and conn.state != CLOSED:
            self.nat._guard(conn.host_lost, exc)

    def resume_writing(self) -> None:
        conn = self.conn
        if conn is not None and conn.state != CLOSED:
            self.nat._guard(conn.host_drained)


class TcpNat:
    def __init__(self, net: UserNetwork) -> None:
        self.net = net
        self.conns: dict[tuple[bytes, int, bytes, int], TcpConn] = {}
        self._connecting = 0
        self._half_open: dict[TcpConn, None] = {}  # oldest first
        # Connections in TIME-WAIT, oldest first: the ones a full table gives up (_make_room).
        self._time_wait: dict[TcpConn, None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Connects still in progress: their socket and timeout.
        self._pending: dict[TcpConn, tuple[socket.socket, asyncio.TimerHandle]] = {}
        # Connected host sockets whose connection is still in its handshake (watched from _attach).
        self._attaching: dict[TcpConn, socket.socket] = {}
        self._servers: list[tuple[_Listener, HostForward]] = []
        # A socket per address family made ahead for the next outbound connection (_refill_spare).
        self._spare: dict[socket.AddressFamily, socket.socket] = {}
        self._closed = False
        self._poller: HostPoller | None = None
        self._ack_set: dict[TcpConn, None] = {}
        self._ack_scheduled = False
        self._next_port = 49152
        self._commands: dict[TcpConn, asyncio.subprocess.Process] = {}  # guestfwd cmd: runs
        self._command_slots = 0  # of MAX_COMMANDS, taken from the SYN until the run is reaped
        self._guestfwd: dict[tuple[bytes, int], tuple[str, int] | str] = {
            (g.server.packed, g.port): g.command if g.command is not None else (g.target_host, g.target_port)
            for g in net.config.guestfwd
        }

    def poller(self) -> HostPoller:
        """The epoll that serves the host sockets (made on first use, on the running loop)."""
        p = self._poller
        if p is None:
            p = self._poller = HostPoller(self.net)
        return p

    # -- Owner protocol --------------------------------------------------
    def forget(self, conn: TcpConn) -> None:
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        proc = self._commands.get(conn)
        if proc is not None:
            _kill_group(proc)  # a guestfwd command outlives nothing of its connection
        self._ack_set.pop(conn, None)
        self._half_open.pop(conn, None)
        self._time_wait.pop(conn, None)
        sock = self._attaching.pop(conn, None)
        if sock is not None:
            sock.close()  # the handshake never completed
        pending = self._pending.pop(conn, None)
        if pending is not None:
            # The guest gave up (its RST, or the SYN cache let it go) while the host connect was
            # still under way: its socket and connect slot go now, not at CONNECT_TIMEOUT (64
            # abandoned connects to a silent address would otherwise refuse every SYN for 20 s).
            sock, timer = pending
            timer.cancel()
            self.net.loop.remove_writer(sock)
            sock.close()
            self._connecting -= 1

    def time_wait(self, conn: TcpConn) -> None:
        self._time_wait[conn] = None

    def _make_room(self) -> bool:
        """Whether the table has room for one more connection, after giving up the oldest in
        TIME-WAIT if it is full. Such a connection holds no host socket, and it only waits out
        a FIN the guest might send again; a full table would instead drop new SYNs until it
        expired. Linux gives up TIME-WAIT sockets past tcp_max_tw_buckets the same way."""
        if len(self.conns) < MAX_CONNS:
            return True
        if not self._time_wait:
            return False
        next(iter(self._time_wait))._finish()
        return len(self.conns) < MAX_CONNS

    def established(self, conn: TcpConn) -> None:
        self._half_open.pop(conn, None)
        sock = self._attaching.pop(conn, None)
        if sock is not None:  # the guest answered before _after_syn_ack ran
            self._attach(conn, sock)

    def ack_later(self, conn: TcpConn) -> None:
        self._ack_set[conn] = None
        if not self._ack_scheduled:
            self._ack_scheduled = True
            self.net.loop.call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        conns, self._ack_set = self._ack_set, {}
        for conn in conns:
            if conn.state != CLOSED:
                self._guard(conn.end_of_batch)

    def _guard(self, fn: object, *args: object) -> None:
        try:
            fn(*args)  # type: ignore[operator]
        except Exception:  # noqa: BLE001 - host events must not break the loop
            self.net._internal_error()

    # -- guest segments --------------------------------------------------
    def input(self, ip: Ipv4, src_mac: bytes) -> None:
        seg = ip.payload
        st = self.net.stats
        if len(seg) < 20:
            st.truncated += 1
            return
        sport, dport, seq, ack, offflags, win, _csum, _urg = _TCP.unpack_from(seg)
        doff = (offflags >> 12) * 4
        if doff < 20 or doff > len(seg):
            st.truncated += 1
            return
        if not self.net.l4_csum_trusted and not verify(seg, pseudo_sum(ip.src, ip.dst, IPPROTO_TCP, len(seg))):
            st.bad_checksum += 1
            return
        flags = offflags & 0x3F
        key = (ip.src, sport, ip.dst, dport)
        conn = self.conns.get(key)
        if conn is not None and conn.state == TIME_WAIT_STATE and flags & (SYN | ACK) == SYN:
            # A new incarnation of a connection in TIME-WAIT (RFC 9293 §3.10.7.4, RFC 6191 idea).
            conn._finish()
            conn = None
        if conn is None:
            self.no_conn(ip.src, ip.dst, sport, dport, seq, ack, flags, win, seg[20:doff], len(seg) - doff, src_mac)
            return
        if flags & SYN:
            opts: bytes | memoryview = bytes(seg[20:doff])
        else:
            opts = seg[20:doff] if doff > 20 and conn.sack_ok else b""  # SACK blocks
        conn.input(seq, ack, flags, win, seg[doff:], opts)

    def no_conn(
        self, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, win: int,
        opts: memoryview, datalen: int, src_mac: bytes,
    ) -> None:  # fmt: skip
        """A checked segment from the guest that no connection has: a SYN opens one, else RST."""
        st = self.net.stats
        if flags & RST:
            return
        if flags & SYN and not flags & ACK:
            target = self._target(dst, dport)
            if target is None:
                st.restricted += 1
                self._reset_reply(src, dst, sport, dport, seq, ack, flags, datalen, src_mac)
                return
            if len(self._half_open) >= MAX_HALF_OPEN:
                # A SYN flood: forget the oldest half-open connection, as a SYN cache would.
                st.tcp_syn_dropped += 1
                next(iter(self._half_open)).abort(send_rst=False)
            if self._connecting >= MAX_CONNECTING or not self._make_room():
                st.tcp_syn_dropped += 1
                return
            if sport == 0 or dport == 0:
                st.tcp_bad += 1
                return
            conn = TcpConn(self.net, self, src, sport, dst, dport, inbound=False)
            conn.mac = src_mac
            conn.accept_syn(seq, win, bytes(opts))
            self.conns[conn.key] = conn
            self._half_open[conn] = None
            st.tcp_conns += 1
            self._connecting += 1
            self._start_connect(conn, target)
            return
        self._reset_reply(src, dst, sport, dport, seq, ack, flags, datalen, src_mac)

    def _reset_reply(
        self, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, datalen: int,
        src_mac: bytes,
    ) -> None:  # fmt: skip
        """RST for a segment without a connection (RFC 9293 §3.10.7.1)."""
        tmp = TcpConn(self.net, _NullOwner(), src, sport, dst, dport, inbound=False)
        tmp.mac = src_mac
        if flags & ACK:
            tmp.iss = ack
            tmp._emit(RST, 0)
        else:
            tmp.irs = seq
            tmp.rcv_nxt = datalen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            tmp.iss = 0
            tmp._emit(RST | ACK, 0)
        self.net.stats.tcp_rst_sent += 1

    def _target(self, dst: bytes, dport: int) -> tuple[str, int] | str | None:
        """Where a guest connection to ``dst:dport`` goes on the host (a str: a guestfwd
        command to run for it), or None when refused."""
        fwd = self._guestfwd.get((dst, dport))
        if fwd is not None:
            return fwd
        net = self.net
        if net.config.restrict:
            return None
        if dst == net.dns_ip or (net.ipv6 is not None and dst == net.ipv6.dns):
            return net.dns.first_server() if dport == 53 else None
        if not net.routable(dst):
            return None
        return ip_str(net.host_side(dst)), dport

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = self.net.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refuse(self, conn: TcpConn, err: int | None = None) -> None:
        """The host connect failed with ``err``: the guest's SYN is answered with RST, as a real
        host would, or, when the host has no route there, with ICMP unreachable from the gateway
        (the guest's connect() then fails with the host's reason, as with libslirp)."""
        if conn.state != CONNECTING:
            return
        self.net.stats.tcp_refused += 1
        if routing_error(err):
            # The quoted TCP header's first 8 bytes: the ports and the SYN's sequence number,
            # which the guest checks against its connecting socket's (Linux: tcp_v4_err).
            head = struct.pack("!HHI", conn.gport, conn.rport, conn.irs)
            self.net.icmp.unreachable(err, conn.gip, conn.rip, IPPROTO_TCP, head, 20)
        else:
            conn.rcv_nxt = 1
            conn._emit(RST | ACK, 0)
            self.net.stats.tcp_rst_sent += 1
        conn._finish()

    def _start_connect(self, conn: TcpConn, target: tuple[str, int] | str) -> None:
        if isinstance(target, str):
            if self._command_slots >= MAX_COMMANDS:
                self._connecting -= 1
                self._refuse(conn)
                return
            self._command_slots += 1  # taken now: the SYNs of one batch all arrive before any starts
            self._spawn(self._connect_command(conn, target))
            return
        host, port = target
        family = _family_of(host)
        if family is None:
            self._spawn(self._connect_by_name(conn, target))  # a guestfwd target given by name
            return
        sock = self._spare.pop(family, None)
        if sock is None:
            try:
                sock = _new_host_socket(family)
            except OSError as exc:
                # Out of descriptors (EMFILE), say: refused like any failed connect, and the
                # connect slot given back, or enough of these would stop every later connection.
                self._connecting -= 1
                self._refuse(conn, exc.errno)
                return
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:
            try:
                # A peer address means the handshake is done (to loopback it finishes inside
                # connect()): one syscall, where poll() needed a poll object and getsockopt another.
                sock.getpeername()
            except OSError:
                loop = self.net.loop
                timer = loop.call_later(CONNECT_TIMEOUT, self._connect_done, conn, sock, True)
                self._pending[conn] = (sock, timer)
                loop.add_writer(sock, self._connect_done, conn, sock, False)
                return
            err = 0
        if err:
            sock.close()
            self._connecting -= 1
            self._refuse(conn, err)
            return
        self._connect_done(conn, sock, False, connected=True)

    def _connect_done(self, conn: TcpConn, sock: socket.socket, timed_out: bool, connected: bool = False) -> None:
        pending = self._pending.pop(conn, None)
        if pending is not None:
            self.net.loop.remove_writer(sock)
            pending[1].cancel()
        self._connecting -= 1
        if timed_out:
            err = errno.ETIMEDOUT
        else:
            err = 0 if connected else sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err or conn.state != CONNECTING:
            sock.close()
            if err:
                self._guard(self._refuse, conn, err)
            return
        # The guest gets its SYN-ACK now (it waits in connect() for it). The rest of the set-up
        # waits for the next loop turn (_after_syn_ack), when the SYN-ACK is with the device.
        self._attaching[conn] = sock
        self._guard(conn.host_connected)
        self.net.urgent()
        self.net.loop.call_soon(self._after_syn_ack, conn, sock)

    def _after_syn_ack(self, conn: TcpConn, sock: socket.socket) -> None:
        """What a connection's host side needs once the guest has its SYN-ACK, done while the guest
        takes it: the guest's answer (its ACK, and often its data or FIN with it) then finds the
        socket watched, and its pass is that much shorter."""
        if sock.family != socket.AF_UNIX:  # a guestfwd command's socketpair has no TCP options
            # The host handshake's last ACK (held since _new_host_socket) goes out now. The peer's
            # accept() then runs (on this core: the other is the guest's) while the guest takes
            # its SYN-ACK. Released at the guest's ACK instead, it ran between the guest's ACK
            # and its FIN, and every busybox nc connection through net-daemon waited ~0.2 ms
            # more for our FIN (the guest halted 0.36 ms a connection, against 0.13 ms this way).
            _complete_handshake(sock)
            self._refill_spare(sock.family)
        if self._attaching.get(conn) is sock and conn.state == SYN_RCVD:
            # Watched from now: what the host sends before the guest's ACK waits in the
            # connection's send buffer (TcpConn.output sends nothing before ESTABLISHED).
            del self._attaching[conn]
            self._attach(conn, sock)

    def _refill_spare(self, family: socket.AddressFamily) -> None:
        """Keep a socket of ``family`` made ahead for the next guest connection: socket() and its
        two options cost that connection's SYN ~40 us otherwise, while the guest waits."""
        if family not in self._spare and not self._closed:
            with contextlib.suppress(OSError):  # out of descriptors: the next SYN makes its own
                self._spare[family] = _new_host_socket(family)

    def _attach(self, conn: TcpConn, sock: socket.socket) -> None:
        try:
            host = HostSocket(self, conn, sock)
        except OSError:
            sock.close()
            self.net.loop.call_soon(self._abort, conn)  # not from inside the connection's input
            return
        self._guard(conn.attach, host)

    def _abort(self, conn: TcpConn) -> None:
        if conn.state != CLOSED:
            try:
                conn.abort(send_rst=True)
            except Exception:  # noqa: BLE001 - a loop callback must not raise
                self.net._internal_error()

    async def _connect_command(self, conn: TcpConn, command: str) -> None:
        """guestfwd=…-cmd: the connection's host side is a new run of ``command``.

        As libslirp runs it: split into words like a shell would (no shell
        runs it), standard input, output and error on one end of a socket
        pair. Its process group is killed when the connection ends, and at
        most :data:`MAX_COMMANDS` run at once, so a guest opening connection
        after connection cannot pile up processes.
        """
        try:
            await self._run_command(conn, command)
        finally:
            self._command_slots -= 1

    async def _run_command(self, conn: TcpConn, command: str) -> None:
        try:
            argv = shlex.split(command)
        except ValueError:
            argv = []
        if not argv:
            self._connecting -= 1
            self._refuse(conn)
            return
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:  # out of descriptors: refused, and the connect slot given back
            self._connecting -= 1
            self._refuse(conn)
            return
        proc = None
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=theirs.fileno(),
                start_new_session=True)
        except OSError:
            self._connecting -= 1
            self._refuse(conn)
            return
        finally:
            theirs.close()
            if proc is None:
                ours.close()
        self._commands[conn] = proc
        try:
            ours.setblocking(False)
            self._connect_done(conn, ours, False, connected=True)
            if conn.state == CLOSED:
                _kill_group(proc)  # the guest gave up while the command started
            await proc.wait()
        except asyncio.CancelledError:
            _kill_group(proc)
            raise
        finally:
            self._commands.pop(conn, None)

    async def _connect_by_name(self, conn: TcpConn, target: tuple[str, int]) -> None:
        loop = self.net.loop
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: _HostSide(self, conn), target[0], target[1]), CONNECT_TIMEOUT
            )
        except (TimeoutError, OSError):
            self._refuse(conn)
        finally:
            self._connecting -= 1

    # -- hostfwd=tcp -------------------------------------------------------
    async def listen(self, fwd: HostForward, *, first: bool = False) -> None:
        """Bind ``fwd``'s host port; ``first`` puts it at the head of the table (see UserNetwork)."""
        try:
            socks = _bind_listeners(fwd.host_addr or None, fwd.host_port)
            server = _Listener(self, fwd, socks)
        except OSError as err:
            raise NatError(f"Could not set up host forwarding rule 'tcp:{fwd.host_addr}:{fwd.host_port}'") from err
        self._servers.insert(0 if first else len(self._servers), (server, fwd))

    def listener_ports(self) -> list[int]:
        return [s.sockets[0].getsockname()[1] for s, _ in self._servers if s.sockets]

    def unlisten(self, host_addr: str, host_port: int) -> bool:
        """Close the listener bound to ``host_addr:host_port``; connections already made stay."""
        for i, (server, fwd) in enumerate(self._servers):
            bound = server.sockets[0].getsockname() if server.sockets else ("", 0)
            if (fwd.host_addr or "0.0.0.0") == (host_addr or "0.0.0.0") and host_port in (fwd.host_port, bound[1]):
                server.close()
                del self._servers[i]
                return True
        return False

    def _accept(self, sock: socket.socket, peer: tuple[str, int], fwd: HostForward) -> None:
        """A host connection to a ``hostfwd`` listener: open its connection toward the guest."""
        if not self._make_room():
            self.net.stats.tcp_syn_dropped += 1
            sock.close()
            return
        gip = fwd.guest_addr.packed
        port = int(peer[1]) or self._alloc_port(gip, fwd.guest_port)
        if (gip, fwd.guest_port, self.net.gateway_ip, port) in self.conns:
            port = self._alloc_port(gip, fwd.guest_port)
        conn = TcpConn(self.net, self, gip, fwd.guest_port, self.net.gateway_ip, port, inbound=True)
        try:
            sock.setblocking(False)
            # Not read until the guest answers our SYN (TcpConn resumes it when established).
            conn.transport = HostSocket(self, conn, sock, paused=True)
        except OSError:
            sock.close()
            return
        self.conns[conn.key] = conn
        self.net.stats.tcp_conns += 1
        self._guard(conn._send_syn)

    def _alloc_port(self, gip: bytes, gport: int) -> int:
        for _ in range(16384):
            self._next_port = 49152 + (self._next_port - 49151) % 16384
            if (gip, gport, self.net.gateway_ip, self._next_port) not in self.conns:
                return self._next_port
        return self._next_port

    def address_resolved(self, gip: bytes) -> None:
        """ARP found ``gip``: send the SYNs that were waiting for its MAC now, not at the next RTO."""
        for conn in list(self.conns.values()):
            if conn.gip == gip and conn.mac is None and conn.state == SYN_SENT:
                self._guard(conn._send_syn)

    # -- housekeeping ----------------------------------------------------
    def expire(self, now: float) -> None:
        """Nothing periodic: every connection runs its own timer."""

    def flows(self) -> list[FlowInfo]:
        """Connections newest first, then the listeners newest first. libslirp lists all its sockets
        newest first, so a listener added at run time (hostfwd_add) heads its table; here it heads
        the listeners only."""
        out = []
        for c in reversed(self.conns.values()):
            label = f"TCP[{c.state_name}]"
            sock = _sock_of(c.transport)
            fd = _fd_of(c.transport, sock)
            host, port = sock_address(sock)
            if c.inbound:
                client, cport = sock_address(sock, peer=True)  # the outside end (JSON only)
                out.append(FlowInfo("TCP[HOST_FORWARD]", c.state_name, host, port,
                                    ip_str(c.gip), c.gport, c.recv_queue(), c.send_queue(), fd, label,
                                    peer_addr=client, peer_port=cport))  # fmt: skip
            else:
                out.append(FlowInfo("TCP", c.state_name, host, port, ip_str(c.gip), c.gport,
                                    c.recv_queue(), c.send_queue(), fd, label,
                                    guest_started=True, peer_addr=ip_str(c.rip), peer_port=c.rport))  # fmt: skip
        for server, fwd in self._servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                out.append(FlowInfo("TCP[HOST_FORWARD]", "LISTEN", str(host), int(port), str(fwd.guest_addr),
                                    fwd.guest_port, 0, 0, fd=sock.fileno(), label="TCP[HOST_FORWARD]"))
        return out

    def close(self) -> None:
        self._closed = True
        for sock in self._spare.values():
            sock.close()
        self._spare.clear()
        for sock, timer in self._pending.values():
            timer.cancel()
            self.net.loop.remove_writer(sock)
            sock.close()
        self._connecting -= len(self._pending)
        self._pending.clear()
        for sock in self._attaching.values():
            sock.close()
        self._attaching.clear()
        for conn in list(self.conns.values()):
            conn.abort(send_rst=False)
        if self._poller is not None:
            self._poller.close()
        for task in list(self._tasks):
            task.cancel()
        for server, _ in self._servers:
            server.close()

    async def wait_closed(self) -> None:
        tasks = list(self._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server, _ in self._servers:
            await server.wait_closed()
        self._servers.clear()


def _new_host_socket(family: socket.AddressFamily) -> socket.socket:
    """A non-blocking TCP socket for a guest connection's host side, its options set before connect()."""
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)  # no FIONBIO ioctl after
    with contextlib.suppress(OSError):
        # The host handshake's last ACK waits for the SYN-ACK (see _after_syn_ack): Linux holds the
        # ACK of a SYN-ACK on a socket in delayed-ACK ("pingpong") mode. To loopback that
        # ACK is what wakes the listening process, which then ran on this core inside
        # connect(), ahead of the guest's SYN-ACK: with the other core busy (a TCG vCPU)
        # connect() took ~150 us instead of ~45.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio: we already batch
    return sock


def _complete_handshake(sock: socket.socket) -> None:
    """Send the host handshake's held last ACK (a delayed ACK otherwise: ~0.1 s later here)."""
    with contextlib.suppress(OSError):  # closed meanwhile (the guest reset the connection)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _sock_of(transport: object) -> Any:
    """The host socket behind a connection's transport (a HostSocket's, or an asyncio transport's
    socket or its TransportSocket); None when there is none."""
    sock = getattr(transport, "_sock", None)
    if sock is None:
        get = getattr(transport, "get_extra_info", None)
        sock = get("socket") if get is not None else None
    return sock


def _fd_of(transport: object, sock: Any) -> int:
    """The host socket's descriptor behind a connection's transport (``sock``: its socket, from
    :func:`_sock_of`); -1 when closed or none."""
    fd = getattr(transport, "_fd", None)
    if isinstance(fd, int):
        return fd
    try:
        return int(sock.fileno()) if sock is not None else -1
    except (OSError, ValueError):
        return -1


@functools.lru_cache(maxsize=256)
def _family_of(host: str) -> socket.AddressFamily | None:
    """The family of a numeric address, None for a name (inet_pton: ipaddress is ~10x slower here)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


class _NullOwner:
    def forget(self, conn: TcpConn) -> None:
        pass

    def time_wait(self, conn: TcpConn) -> None:
        pass

    def established(self, conn: TcpConn) -> None:
        pass

    def ack_later(self, conn: TcpConn) -> None:
        pass
