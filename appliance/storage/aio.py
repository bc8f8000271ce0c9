"""Linux native AIO (``io_submit``) for O_DIRECT images: ``aio=native``.

With ``aio=threads`` every request costs a hop to a pool thread and back,
and the threads contend for the GIL with the loop. Kernel AIO needs no
threads: the loop fills ``struct iocb`` s for everything a kick produced,
submits them with one ``io_submit``, and the kernel signals completions on an
eventfd the loop watches, where one ``io_getevents`` reaps them all. Like
QEMU's ``aio=native`` this only works (asynchronously) with O_DIRECT, so the
raw backend uses it for ``cache=none``/``directsync`` and aligned requests.

The kernel reads and writes the guest's buffers directly (their pages are
pinned for the duration); the memoryviews stay referenced by the awaiting
coroutine until the request completes, so guest RAM cannot be unmapped under
a request in flight.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

from appliance.storage import io, poll

_SYS_IO_SETUP = 206
_SYS_IO_DESTROY = 207
_SYS_IO_GETEVENTS = 208
_SYS_IO_SUBMIT = 209

IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
IOCB_CMD_PREADV = 7
IOCB_CMD_PWRITEV = 8
IOCB_FLAG_RESFD = 1

# A one-buffer vectored request goes as its plain form (no iovec array to fill).
_SINGLE = {IOCB_CMD_PREADV: IOCB_CMD_PREAD, IOCB_CMD_PWRITEV: IOCB_CMD_PWRITE}

# Iovecs preallocated per slot; longer requests get their own array.
_SLOT_IOVECS = 64


class _Iocb(ctypes.Structure):
    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


# struct iocb as one pack (linux/aio_abi.h; x86-64 little-endian): data, key,
# rw_flags, opcode, reqprio, fildes, buf, nbytes, offset, reserved2, flags,
# resfd. One pack_into costs less than the dozen ctypes field stores it replaces.
_IOCB = struct.Struct("<QIiHhIQQqQII")
assert _IOCB.size == 64

# A completion callback: ``done(token, result, error)`` with the byte count, or
# 0 and the OSError (asyncio.CancelledError when the context closed first).
Done = Callable[[Any, int, "BaseException | None"], None]


class _IoEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_address = io.buffer_address
_addressof = ctypes.addressof
_from_buffer = ctypes.c_char.from_buffer

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_ZERO_TIMEOUT = _Timespec(0, 0)


_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_EXT_MAGIC = 0xEF53  # ext2/3/4 (linux/magic.h)


def extends_synchronously(fd: int) -> bool:
    """Does the file system under ``fd`` run an O_DIRECT write past the end
    of the file synchronously, inside io_submit? ext4 does (the inode lock
    is held exclusively and the size updated before the call returns); for
    those writes :meth:`LinuxAio.start_sync` costs the loop nothing more.
    """
    buf = ctypes.create_string_buffer(128)  # struct statfs, f_type first (x86-64)
    if _libc.fstatfs(fd, buf) != 0:
        return False
    return int(struct.unpack_from("<q", buf.raw)[0]) == _EXT_MAGIC


class AioUnavailable(OSError):
    """The kernel refused to set up an AIO context."""


class LinuxAio:
    """One kernel AIO context serving one backend on the running loop.

    :param depth: requests in flight at most (more wait in a local queue).
    :raises AioUnavailable: When ``io_setup`` fails (no AIO, limit reached).
    """

    def __init__(self, depth: int = 128) -> None:
        self.loop = asyncio.get_running_loop()
        self.depth = depth
        ctx = ctypes.c_ulong(0)
        if _syscall(ctypes.c_long(_SYS_IO_SETUP), ctypes.c_long(depth), ctypes.byref(ctx)) < 0:
            err = ctypes.get_errno()
            raise AioUnavailable(err, os.strerror(err))
        self._ctx = ctx.value
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._iocbs = (_Iocb * depth)()
        self._iocb_bytes = memoryview(self._iocbs).cast("B")
        self._iovecs = [(_Iovec * _SLOT_IOVECS)() for _ in range(depth)]
        self._iovec_q = [memoryview(v).cast("B").cast("Q") for v in self._iovecs]
        self._iovec_addr = [ctypes.addressof(v) for v in self._iovecs]
        self._extra: list[ctypes.Array[_Iovec] | None] = [None] * depth
        # Per slot: who to tell and what to tell them with (see Done).
        self._done: list[Done | None] = [None] * depth
        self._tokens: list[Any] = [None] * depth
        # The buffers of each request in flight: the kernel writes into them
        # until it completes, so they stay referenced (and mapped) until then.
        self._bufs: list[Sequence[memoryview] | None] = [None] * depth
        self._free = list(range(depth - 1, -1, -1))
        self._events = (_IoEvent * depth)()
        # struct io_event as 64-bit words: data, obj, res, res2.
        self._event_q = memoryview(self._events).cast("B").cast("q")
        self._ptrs = (ctypes.c_void_p * depth)()
        self._slot_addr = [ctypes.addressof(self._iocbs[i]) for i in range(depth)]
        # Each slot's iocb pointer as a one-entry array: a lone submission passes it as is.
        self._slot_ptrs = [(ctypes.c_void_p * 1)(a) for a in self._slot_addr]
        self._ready: list[int] = []  # filled slots not yet submitted
        self._ring_u32: memoryview | None = None
        self._ring_q: memoryview | None = None
        self._waiting: list[tuple[int, int, Sequence[memoryview], list[int], int, Done, Any]] = []
        self._flush_scheduled = False
        # start_sync's finished requests, told from the loop (never from inside start_sync).
        self._sync_done: collections.deque[tuple[Done, Any, int, BaseException | None]] = (
            collections.deque())
        self._sync_scheduled = False
        self._sync_reaping = False
        # io_submit's arguments that never change, made once (a ctypes object per call adds up).
        self._c_ctx = ctypes.c_ulong(self._ctx)
        self._c_counts = [ctypes.c_long(i) for i in range(depth + 1)]
        self._ring_u32, self._ring_q, self._ring_nr = _map_ring(self._ctx)
        self.loop.add_reader(self._efd, self._reap)
        self.closed = False
        self.fd = self._efd
        # Without the ring there is nothing to poll: completions come through io_getevents.
        self._poller = poll.register(self, self.loop) if self._ring_u32 is not None else None

    def in_flight(self) -> bool:
        """Requests are in the kernel or in the ring unreaped (for :mod:`appliance.storage.poll`)."""
        return len(self._free) < self.depth and self._ring_u32 is not None

    def ring_ready(self) -> bool:
        """The event ring holds a completion not yet reaped (no system call)."""
        hdr = self._ring_u32
        return hdr is not None and hdr[2] != hdr[3]

    def submit(self, opcode: int, fd: int, bufs: Sequence[memoryview], offset: int, *,
               eager: bool = False) -> asyncio.Future[int]:
        """Queue a read (``IOCB_CMD_PREADV``) or write (``IOCB_CMD_PWRITEV``).

        The future resolves to the byte count or raises :class:`OSError`.
        Buffers must be writable views (their addresses are taken) and meet
        the O_DIRECT alignment; the caller checks that.

        :param eager: submit at once when this is the only request in the
            context (a lone request then skips a loop turn; with others in
            flight it still joins the next batched ``io_submit``).
        """
        fut: asyncio.Future[int] = self.loop.create_future()
        self.start(opcode, fd, bufs, offset, _resolve, fut, eager=eager)
        return fut

    def start(self, opcode: int, fd: int, bufs: Sequence[memoryview], offset: int,
              done: Done, token: Any, eager: bool = False, align: int = 0) -> bool:
        """:meth:`submit` without a future: ``done(token, result, error)`` is called on the loop.

        The device data path uses this: a future, its callback and a
        coroutine resumed per request cost more loop-thread CPU than the
        request's own work. ``done`` is called from inside ``start`` only
        when an eager submit is refused outright (a bad fd); ``eager`` as
        in :meth:`submit`.

        :param align: when set, queue nothing and return False unless the
            offset and every buffer's address and length are multiples of it
            (O_DIRECT's rule); the addresses are needed for the iocb anyway,
            so checking here costs nothing extra.
            ``eager`` and ``align`` may come positionally: a keyword call costs
            more, and this is on every request's path.
        """
        free = self._free
        if len(bufs) == 1 and free and opcode in _SINGLE:
            # The commonest request (one buffer, a free slot) in one flat
            # piece: at queue depth 1 everything from a completion to the
            # next io_submit is on each request's path.
            b = bufs[0]
            try:
                a = _addressof(_from_buffer(b))  # io.buffer_address inlined
            except (TypeError, ValueError):
                if align:
                    return False
                a = 0
            n = b.nbytes
            if align and (a % align or n % align or offset % align):
                return False
            slot = free.pop()
            _IOCB.pack_into(self._iocb_bytes, slot << 6, slot, 0, 0, _SINGLE[opcode], 0, fd,
                            a, n, offset, 0, IOCB_FLAG_RESFD, self._efd)
            self._done[slot] = done
            self._tokens[slot] = token
            self._bufs[slot] = bufs
            ready = self._ready
            if eager and not ready and len(free) == self.depth - 1 and not self.closed:
                # The lone request in the context: _flush for one iocb, inlined.
                if _syscall(_C_IO_SUBMIT, self._c_ctx, _C_ONE, self._slot_ptrs[slot]) == 1:
                    return True
                ready.append(slot)  # refused or interrupted: _flush sorts it out
                self._flush()
                return True
            ready.append(slot)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)
            return True
        if align:
            if offset % align:
                return False
            addrs = []
            for b in bufs:
                addr = _address(b)
                if addr is None or addr % align or b.nbytes % align:
                    return False
                addrs.append(addr)
        else:
            addrs = [_address(b) or 0 for b in bufs]
        if self._free:
            self._fill(self._free.pop(), opcode, fd, bufs, addrs, offset, done, token)
            if eager and len(self._free) == self.depth - 1 and len(self._ready) == 1:
                self._flush()
                return True
        else:
            self._waiting.append((opcode, fd, bufs, addrs, offset, done, token))
        if not self._flush_scheduled:
            # All requests of one kick go into a single io_submit.
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return True

    def start_sync(self, opcode: int, fd: int, bufs: Sequence[memoryview], offset: int,
                   done: Done, token: Any, align: int = 0) -> bool:
        """Run a request at once with ``preadv``/``pwritev`` on the loop thread;
        ``done`` follows on the loop as for :meth:`start` (never from inside this call).

        For a request the kernel would finish inside ``io_submit`` anyway
        (an O_DIRECT write past the end of an ext4 file runs synchronously,
        see qcow2.image ``_extend_alone``): the loop waits out the device
        either way, and the plain system call spares it the iocb, the
        ctypes call, the event ring and the eventfd, ~3 us of a ~90 us
        64 KiB write at queue depth 1 here. The completions queue up and
        are told in order from one loop callback, each of which may start
        the next request without a loop turn between them.

        :param align: as for :meth:`start`: False, with nothing done, unless
            the offset and the buffers' addresses and lengths are multiples of it.
        """
        if self.closed:
            return False
        if align:
            if offset % align:
                return False
            for b in bufs:
                try:
                    a = _addressof(_from_buffer(b))
                except (TypeError, ValueError):
                    return False
                if a % align or b.nbytes % align:
                    return False
        try:
            res = (os.pwritev if opcode == IOCB_CMD_PWRITEV else os.preadv)(fd, bufs, offset)
        except OSError as err:
            self._sync_done.append((done, token, 0, err))
        else:
            self._sync_done.append((done, token, res, None))
        if not self._sync_reaping and not self._sync_scheduled:
            self._sync_scheduled = True
            self.loop.call_soon(self._reap_sync)
        return True

    def later(self, done: Done, token: Any, res: int) -> None:
        """Tell ``done(token, res, None)`` from the loop, in order with :meth:`start_sync`'s
        requests: for a caller that ran its request itself (qcow2.image's
        synchronous allocating write). A callback told may start the next
        request, which joins the same pass.
        """
        self._sync_done.append((done, token, res, None))
        if not self._sync_reaping and not self._sync_scheduled:
            self._sync_scheduled = True
            self.loop.call_soon(self._reap_sync)

    def _reap_sync(self) -> None:
        """Tell start_sync's requests they are done, in order: each callback may
        start the next, which joins this pass (up to ``depth`` of them a pass)."""
        self._sync_scheduled = False
        q = self._sync_done
        self._sync_reaping = True
        try:
            budget = self.depth
            while q and not self.closed and budget > 0:
                budget -= 1
                done, token, res, err = q.popleft()
                done(token, res, err)
        finally:
            self._sync_reaping = False
            # Past the budget (or after a callback raised): the rest next turn.
            if q and not self._sync_scheduled and not self.closed:
                self._sync_scheduled = True
                self.loop.call_soon(self._reap_sync)

    def _fill(
        self, slot: int, opcode: int, fd: int, bufs: Sequence[memoryview], addrs: list[int],
        offset: int, done: Done, token: Any,
    ) -> None:
        if len(bufs) == 1:
            single = IOCB_CMD_PREAD if opcode == IOCB_CMD_PREADV else IOCB_CMD_PWRITE
            _IOCB.pack_into(self._iocb_bytes, slot << 6, slot, 0, 0, single, 0, fd,
                            addrs[0], bufs[0].nbytes, offset, 0, IOCB_FLAG_RESFD, self._efd)
        else:
            n = len(bufs)
            if n <= _SLOT_IOVECS:
                iov = self._iovec_q[slot]
                addr = self._iovec_addr[slot]
            else:
                extra = (_Iovec * n)()
                self._extra[slot] = extra
                iov = memoryview(extra).cast("B").cast("Q")
                addr = ctypes.addressof(extra)
            i = 0
            for b, a in zip(bufs, addrs, strict=True):
                iov[i] = a
                iov[i + 1] = b.nbytes
                i += 2
            _IOCB.pack_into(self._iocb_bytes, slot << 6, slot, 0, 0, opcode, 0, fd,
                            addr, n, offset, 0, IOCB_FLAG_RESFD, self._efd)
        self._done[slot] = done
        self._tokens[slot] = token
        self._bufs[slot] = bufs
        self._ready.append(slot)

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._ready and not self.closed:
            k = len(self._ready)
            ptrs = self._ptrs
            for i, slot in enumerate(self._ready):
                ptrs[i] = self._slot_addr[slot]
            r = _syscall(_C_IO_SUBMIT, self._c_ctx, self._c_counts[k], ptrs)
            if r >= 0:
                del self._ready[:r]
                if r == k:
                    return
                continue
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return  # retried when the next completion frees room
            # The first iocb is bad (EINVAL, EBADF…): fail it, submit the rest.
            slot = self._ready.pop(0)
            self._complete(slot, -err)

    def _complete(self, slot: int, res: int) -> None:
        done = self._done[slot]
        token = self._tokens[slot]
        self._done[slot] = self._tokens[slot] = self._bufs[slot] = None
        self._extra[slot] = None
        if self._waiting:
            self._fill(slot, *self._waiting.pop(0))
        else:
            self._free.append(slot)
        if done is None:
            return
        if res >= 0:
            done(token, res, None)
        else:
            done(token, 0, OSError(-res, os.strerror(-res)))

    def _reap(self) -> None:
        if self._ring_u32 is not None:
            # Completions first, the eventfd after: a callback often submits the
            # next request, and the read is then off that request's path (at
            # queue depth 1 it is ~1 us of the ~9 between a wake-up and the
            # next io_submit). Whatever completes before the read is in the
            # ring for the second pass; whatever completes after it signals
            # the eventfd again.
            self._reap_ring()
            if self.closed:
                return
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                pass
            if self._ring_u32 is not None:
                self._reap_ring()
                return
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        events = self._events
        ev = self._event_q
        while not self.closed:
            n = _syscall(
                ctypes.c_long(_SYS_IO_GETEVENTS), ctypes.c_ulong(self._ctx), ctypes.c_long(0),
                ctypes.c_long(self.depth), events, ctypes.byref(_ZERO_TIMEOUT),
            )
            if n <= 0:
                break
            # Copy the results out before completing any: a callback may
            # submit, and the next io_getevents reuses the array.
            got = [(ev[4 * i], ev[4 * i + 2]) for i in range(n)]
            for slot, res in got:
                if 0 <= slot < self.depth:
                    self._complete(slot, res)
            if n < self.depth:
                break
        if self._ready:
            self._flush()

    def _reap_ring(self) -> None:
        """Take completions straight from the kernel's event ring, as libaio and QEMU do.

        io_setup maps the ring (``struct aio_ring``, fs/aio.c) into the
        process; the kernel writes an event, then advances ``tail``;
        whoever reads moves ``head``. Reading it here saves an io_getevents
        call (and its ctypes marshalling) per wake-up. x86-64 keeps loads in
        order and stores after earlier loads, so no fences are needed.
        """
        hdr = self._ring_u32
        words = self._ring_q
        nr = self._ring_nr
        assert hdr is not None and words is not None
        budget = self.depth
        while not self.closed:
            head = hdr[2]
            tail = hdr[3]
            if head == tail:
                break
            if budget <= 0:
                # Callbacks keep submitting requests that complete inside
                # io_submit (a write that extends a file): let the loop's
                # other work in before taking more. The eventfd may have been
                # read already, so the next pass is scheduled, not awaited.
                self.loop.call_soon(self._reap_again)
                break
            if head >= nr or tail >= nr:
                # Not a ring the kernel would write: stop trusting it.
                self._ring_u32 = self._ring_q = None
                self._reap()
                return
            if tail == head + 1:
                # One completion (queue depth 1: every pass): no list to build.
                base = 4 + 4 * head
                slot = words[base]
                res = words[base + 2]
                hdr[2] = tail
                budget -= 1
                if 0 <= slot < self.depth:
                    done = self._done[slot]
                    if res >= 0 and done is not None and not self._waiting:
                        # _complete inlined for the commonest completion.
                        token = self._tokens[slot]
                        self._done[slot] = self._tokens[slot] = self._bufs[slot] = None
                        self._extra[slot] = None
                        self._free.append(slot)
                        done(token, res, None)
                    else:
                        self._complete(slot, res)
                continue
            got = []
            while head != tail:
                base = 4 + 4 * head  # 32-byte header, 32-byte io_event: data, obj, res, res2
                got.append((words[base], words[base + 2]))
                head = head + 1 if head + 1 < nr else 0
            # Copied out: hand the slots back before a callback submits more.
            hdr[2] = head
            budget -= len(got)
            for slot, res in got:
                if 0 <= slot < self.depth:
                    self._complete(slot, res)
        if self._ready:
            self._flush()

    def _reap_again(self) -> None:
        if not self.closed and self._ring_u32 is not None:
            self._reap_ring()

    def close(self) -> None:
        """Wait out requests in flight (io_destroy does) and release the context."""
        if self.closed:
            return
        self.closed = True
        self._ring_u32 = self._ring_q = None  # io_destroy unmaps it
        if self._poller is not None:
            poll.unregister(self, self.loop)
            self._poller = None
        if not self.loop.is_closed():
            self.loop.remove_reader(self._efd)
        _syscall(ctypes.c_long(_SYS_IO_DESTROY), ctypes.c_ulong(self._ctx))
        os.close(self._efd)
        pending = [(d, t) for d, t in zip(self._done, self._tokens, strict=True) if d is not None]
        pending += [(d, t) for *_, d, t in self._waiting]
        pending += [(d, t) for d, t, _res, _err in self._sync_done]
        self._sync_done.clear()
        self._done = [None] * self.depth
        self._tokens = [None] * self.depth
        self._bufs = [None] * self.depth
        self._waiting.clear()
        for done, token in pending:
            if done is _resolve:
                token.cancel()
            else:
                # As a waiter's future is cancelled: the request is dropped, not failed.
                done(token, 0, asyncio.CancelledError())


_C_IO_SUBMIT = ctypes.c_long(_SYS_IO_SUBMIT)
_C_ONE = ctypes.c_long(1)
_AIO_RING_MAGIC = 0xA10A10A1
_AIO_RING_HEADER = 32


def _map_ring(ctx: int) -> tuple[memoryview | None, memoryview | None, int]:
    """Views of the event ring io_setup mapped at ``ctx``: (header as u32, ring as i64, nr).

    (None, None, 0) unless the header is the one this code knows (magic,
    no incompatible features, 32-byte header); completions then come
    through io_getevents.
    """
    try:
        head = memoryview((ctypes.c_char * _AIO_RING_HEADER).from_address(ctx)).cast("B").cast("I")
        _id, nr, _head, _tail, magic, _compat, incompat, hlen = head
        if magic != _AIO_RING_MAGIC or incompat != 0 or hlen != _AIO_RING_HEADER or not nr:
            return None, None, 0
        size = _AIO_RING_HEADER + 32 * nr
        ring = memoryview((ctypes.c_char * size).from_address(ctx)).cast("B")
        return ring.cast("I"), ring.cast("q"), nr
    except (ValueError, TypeError):
        return None, None, 0


def _resolve(fut: asyncio.Future[int], res: int, err: BaseException | None) -> None:
    if fut.done():
        return  # cancelled by its waiter
    if err is None:
        fut.set_result(res)
    else:
        fut.set_exception(err)
