"""Blocking file I/O for block backends, run in a bounded thread pool.

Data moves between image files and guest RAM with ``os.preadv``/``os.pwritev``
on memoryviews, so Python never copies the payload; the syscalls release the
GIL, so a pool of threads keeps many requests in flight while the loop goes on
(DESIGN.md §1). The helpers here are synchronous and meant to run inside the
pool (:func:`run_blocking`, :meth:`IoPool.start`). The raw backend and the
qcow2 engine (``aio=threads``, metadata, converts) share one process-wide
:class:`IoPool`.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import itertools
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from appliance.virtio import eventfd

T = TypeVar("T")

# Linux limits one preadv/pwritev to this many iovecs (UIO_MAXIOV).
IOV_MAX = 1024
# Every worker takes the GIL after each system call while the loop holds it
# for most of its work: past a dozen the hand-offs cost more than the extra
# parallelism gives. img bench 4k random reads, queue depth 32, -i threads:
# 12 and 16 workers alike, 4-8 and 24-32 slower; 64 KiB reads the same from 12.
DEFAULT_WORKERS = 12
# Jobs in flight for one loop from which the loop and the workers keep to the
# loop's CPU until they are all delivered (IoPool._pin). 4k reads at depth 4
# and 32 ran ~1.5x faster pinned; at depth 1 the gain was within the noise.
PIN_DEPTH = 4

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ring_keys = itertools.count(1)


class _Ring:
    """One event loop's side of the pool: its finished jobs and the eventfd that wakes it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: IoPool) -> None:
        # Weak: the loop's selector holds this ring (its reader), not the reverse,
        # so a dropped loop takes its ring, and the ring its eventfd, with it.
        self._loop = weakref.ref(loop)
        # (future or (done, token), result, error) of each finished job.
        self.done: collections.deque[tuple[Any, Any, BaseException | None]] = (
            collections.deque())
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Set by the worker that writes the eventfd, cleared by the loop before
        # it drains: jobs finishing meanwhile wake the loop once, not once each.
        self.signalled = False
        # Jobs queued for this ring and not yet drained (counted on the loop).
        self.pending = 0
        # In a burst of PIN_DEPTH jobs or more (IoPool._pin tried, whether or not it pinned).
        self.pinned = False
        self.key = next(_ring_keys)  # names this ring where a reference would keep it
        self._pool = pool
        loop.add_reader(self.efd, self._drain)
        # A job holds its ring until it is delivered, so the eventfd cannot be
        # closed (and its number reused) while a worker may still write it.
        weakref.finalize(self, os.close, self.efd)

    def here(self) -> bool:
        """Is this ring's loop the one running on the calling thread?

        The test a caller that keeps its ring makes before reusing it, with
        no system call (``asyncio.get_running_loop()`` makes a getpid()):
        one loop at a time runs on a thread, and asyncio's loops record
        which (a loop without that record never matches).
        """
        loop = self._loop()
        return loop is not None and getattr(loop, "_thread_id", None) == threading.get_ident()

    def _drain(self) -> None:
        done = self.done
        if self.pending > len(done):
            # Jobs still running: let the GIL go for the read, so that workers
            # back from their system calls deliver (and start their next job)
            # now rather than after this whole batch. With the GIL kept here
            # and in the workers' signal, img bench 4k random reads at depth
            # 32 took ~19 us of CPU a request instead of ~15 (alternated runs).
            try:
                os.eventfd_read(self.efd)
            except OSError:
                pass
        else:
            # Nothing else running (depth 1): the GIL would only go to the
            # worker that just finished, which would then fall asleep on its
            # lock and need waking again: keep it (appliance.virtio.eventfd).
            eventfd.clear(self.efd)
        # Reset before draining: a worker that appends after this point sees
        # False and signals again; one that appended before is drained below.
        self.signalled = False
        n = 0
        while done:
            n += 1
            target, result, exc = done.popleft()
            if type(target) is tuple:  # a start() job: (done, token)
                try:
                    target[0](target[1], result, exc)
                except Exception as err:  # noqa: BLE001 - one bad callback must not strand the rest
                    loop = self._loop()
                    if loop is not None:
                        loop.call_exception_handler(
                            {"message": "I/O pool completion callback failed", "exception": err})
            elif not target.done():  # cancelled meanwhile: nobody waits
                if exc is None:
                    target.set_result(result)
                else:
                    target.set_exception(exc)
        self.pending -= n
        if self.pinned and not self.pending:
            self.pinned = False
            self._pool._unpin(self.key)


class _Worker:
    """A pool thread's wake-up: a lock it holds, and blocks on while idle."""

    __slots__ = ("wake", "stop", "cpus")

    def __init__(self, stop: list[bool]) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.stop = stop  # its generation's flag, set by IoPool.shutdown
        self.cpus = 0  # the IoPool._cpus_gen whose CPU set this thread runs on


class IoPool:
    """A bounded pool of I/O threads whose completions reach each loop in batches.

    ``loop.run_in_executor`` costs a concurrent.futures.Future, its
    condition variable and a ``call_soon_threadsafe`` (a self-pipe write and
    a loop wake-up) per job. Here a job is a tuple on a deque; the worker runs
    the call (the GIL released inside the system call), appends the outcome
    to its loop's ring and writes the ring's eventfd only when the loop has
    not been told yet, so one wake-up delivers every job finished meanwhile.

    Every hand-off between threads costs a wake-up (~30 us on these VMs when
    the other CPU sleeps), so the pool spends as few as it can:

    - each idle worker sleeps on its own lock and a submission wakes exactly
      one, the most recently idle (a ``queue.SimpleQueue`` getter wakes the
      next blocked getter on its way out: two threads per job);
    - while a woken worker has not taken its job yet, further submissions
      wake nobody: that worker wakes the next idle one if jobs are left, so
      a burst from one loop callback costs the loop one wake-up; a worker
      back from a system call takes the next queued job without sleeping
      and wakes nobody;
    - under the GIL a thread that wants it while another holds it sleeps
      too. Workers write the eventfd with the GIL let go, so the woken loop
      need not wait for them, and one with nothing queued goes idle before
      that write: the loop's next job then finds it waiting for the GIL
      (handed over when the loop blocks in its selector), not asleep on
      its lock. The loop lets go of the GIL to read the eventfd only while
      other jobs are running, whose workers then deliver into the batch.

    Threads start on demand, up to ``workers``.

    While one loop has :data:`PIN_DEPTH` jobs or more in flight, that loop's
    thread and the workers keep to the CPU the loop was on (:meth:`_pin`)
    until its last job is delivered. Every GIL hand-off between them is a
    thread wake-up, and on these VMs one that crosses to a CPU gone idle
    costs several times one on the same CPU: spread over both CPUs, 4k
    random reads at depth 32 spent ~20-25 us of CPU a request (three
    context switches, most on the GIL's mutex and condition), on one CPU
    ~7 us, and ran ~1.5x as many a second (a micro bench of this pool and
    img bench alike). Letting only the workers follow the loop does not do:
    a worker's eventfd write wakes the loop onto the idle CPU, and they
    chase it. Threads started from the loop's thread meanwhile inherit the
    pin (Linux copies the CPU set); the workers take back the loop's old
    set when the burst is over, at their next job.
    """

    def __init__(self, workers: int = DEFAULT_WORKERS) -> None:
        self._max = workers
        # (ring, future or (done, token), fn, args) waiting for a worker.
        self._jobs: collections.deque[_Job] = collections.deque()
        self._idle: list[_Worker] = []
        # A worker has been woken (or started) and has not taken a job yet.
        self._waking = False
        self._threads: list[threading.Thread] = []
        self._stop = [False]
        self._rings: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Ring] = (
            weakref.WeakKeyDictionary())
        # The key of the ring whose loop thread is pinned (_pin; 0: none; a
        # key, not the ring, so that a lost loop can be collected and unpin),
        # that thread's id and its CPU set from before; the set workers
        # should run on (None: as they started) and its generation, which
        # workers compare with theirs.
        self._pinned = 0
        self._pinned_tid = 0
        self._free: set[int] = set()
        self._cpus: set[int] | None = None
        self._cpus_gen = 0

    def ring(self) -> _Ring:
        """The running loop's completion side, to pass to :meth:`start`.

        A caller that starts many jobs keeps it: ``asyncio.get_running_loop()``
        makes a getpid() system call each time (CPython checks the loop was
        not inherited by a fork).
        """
        return self._ring(asyncio.get_running_loop())

    def _ring(self, loop: asyncio.AbstractEventLoop) -> _Ring:
        # Kept on the loop, where it can: a ring with completions the loop
        # never took (closed mid-flight) refers to the loop through their
        # futures, and held by the pool (a WeakKeyDictionary's value) it
        # would keep the loop alive for good.
        rings: dict[IoPool, _Ring] | None = getattr(loop, "_appliance_io_rings", None)
        ring = rings.get(self) if rings is not None else self._rings.get(loop)
        if ring is None:
            ring = _Ring(loop, self)
            try:
                if rings is None:
                    rings = {}
                    loop._appliance_io_rings = rings  # type: ignore[attr-defined]
                rings[self] = ring
            except AttributeError:  # a loop with no __dict__
                self._rings[loop] = ring
            # A loop closed with jobs undelivered never unpins its thread in
            # _drain; a worker that finds it closed does (_lost), or else its end.
            weakref.finalize(loop, self._unpin, ring.key)
        return ring

    def submit(self, fn: Callable[..., T], *args: object, pin: bool = True) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on a pool thread; the returned future gets its outcome.

        :param pin: whether this job may start a pinned burst (see :meth:`_pin`). Jobs
            that do real work on the CPU (a convert's copies, compression) must not:
            pinned to one CPU, a 2 GiB qcow2->raw convert took 2.6-5.6 s instead of ~1 s.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        ring = self._ring(loop)
        ring.pending += 1
        if pin and ring.pending >= PIN_DEPTH and not ring.pinned:
            self._pin(ring)
        self._jobs.append((ring, fut, fn, args))
        if not self._waking:
            self._wake()
        return fut

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on a pool thread and await its result."""
        return await self.submit(fn, *args)

    def start(self, fn: Callable[..., Any], args: tuple[Any, ...], done: Done, token: Any,
              ring: _Ring | None = None) -> bool:
        """Run ``fn(*args)`` on a pool thread; ``done(token, result, error)`` follows on the loop.

        :meth:`run` without a future or a coroutine, for the device data
        path (:meth:`appliance.storage.raw.RawBackend.start_rw`,
        :meth:`appliance.qcow2.image.Qcow2Image.start_rw`): a future, its
        callback and the coroutine it resumes cost the loop more than the
        request's own work.

        :param ring: :meth:`ring` of the loop ``done`` runs on (default: the
            running loop's).
        :returns: True (the job is queued).
        """
        if ring is None:
            ring = self._ring(asyncio.get_running_loop())
        ring.pending += 1
        if ring.pending >= PIN_DEPTH and not ring.pinned:
            self._pin(ring)
        self._jobs.append((ring, (done, token), fn, args))
        if not self._waking:
            self._wake()
        return True

    def _pin(self, ring: _Ring) -> None:
        """Keep ``ring``'s loop thread (the caller) and the workers on the loop's CPU.

        Called on the loop as its jobs in flight reach :data:`PIN_DEPTH`;
        :meth:`_unpin` undoes it once they are all delivered. Nothing
        changes when another loop's burst has the workers, or the thread may
        run on one CPU only. Workers move at their next job (one system call
        each): the loop does not wait for them.
        """
        ring.pinned = True  # tried once a burst, pinned or not
        if self._pinned or not ring.here():  # the caller must be the loop's thread
            return
        try:
            free = os.sched_getaffinity(0)
            cpu = _sched_getcpu()
            if len(free) < 2 or cpu not in free:
                return
            here = {cpu}
            os.sched_setaffinity(0, here)
        except OSError:
            return
        self._pinned = ring.key
        self._pinned_tid = threading.get_native_id()
        self._free = free
        self._cpus = here
        self._cpus_gen += 1

    def _unpin(self, key: int) -> None:
        """End the burst of ring ``key``: its loop thread and the workers get the CPU set it had."""
        if self._pinned != key:
            return
        self._pinned = 0
        tid = self._pinned_tid
        try:
            if tid == threading.get_native_id():
                os.sched_setaffinity(0, self._free)
            elif os.path.exists(f"/proc/self/task/{tid}"):
                # A loop's end noticed on another thread (a worker, or the
                # collector): by thread id, when that thread is still ours.
                os.sched_setaffinity(tid, self._free)
        except OSError:
            pass  # the thread is gone
        self._cpus = self._free
        self._cpus_gen += 1

    def _lost(self, ring: _Ring) -> None:
        """Unpin the burst of ``ring`` (pinned, its last job just done) if its loop is closed.

        Such a loop drains no more, so its thread would stay pinned (a
        thread that lives on: pytest's main thread runs loop after loop).
        """
        loop = ring._loop()
        if loop is None or loop.is_closed():
            self._unpin(ring.key)

    def _follow(self, me: _Worker) -> None:
        """Move the calling worker onto the CPU set of the pool's current generation."""
        me.cpus = self._cpus_gen
        cpus = self._cpus
        if cpus is not None:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass  # a CPU went offline: stay where the scheduler put it

    def _wake(self) -> None:
        """Wake an idle worker, or start one, for the job just queued."""
        idle = self._idle
        if idle:
            try:
                w = idle.pop()
            except IndexError:  # another thread took the last one meanwhile
                pass
            else:
                self._waking = True
                w.wake.release()
                return
        if len(self._threads) < self._max:
            me = _Worker(self._stop)
            t = threading.Thread(target=self._work, args=(me,), name="blk-io", daemon=True)
            self._waking = True
            try:
                t.start()
            except RuntimeError:  # no more threads: the running ones take the job
                self._waking = False
                if not self._threads:
                    self._jobs.pop()
                    raise
                return
            self._threads.append(t)

    def _work(self, me: _Worker) -> None:
        jobs = self._jobs
        popleft = jobs.popleft
        idle = self._idle
        wait = me.wake.acquire
        stop = me.stop
        self._waking = False
        woken = True
        while True:
            try:
                ring, target, fn, args = popleft()
            except IndexError:
                if stop[0]:
                    return
                idle.append(me)
                if not self._stay_idle(me, idle):
                    continue
                wait()
                self._waking = False
                woken = True
                continue
            if woken:
                # Only a worker that was asleep passes the wake-up on: one
                # coming back from a system call to a queued job leaves the
                # sleepers alone (they would only queue for the GIL).
                woken = False
                if jobs and not self._waking and idle:
                    self._wake()
            if me.cpus != self._cpus_gen:
                self._follow(me)
            try:
                result, exc = fn(*args), None
            except BaseException as err:  # delivered to the waiter
                result, exc = None, err
            # Drop the arguments before the waiter can resume: they are often
            # views of guest RAM, and an mmap cannot be closed (or unmapped by
            # vhost-user) while any view of it lives.
            del fn, args
            ring.done.append((target, result, exc))
            del target, result, exc
            if not jobs and self._pinned == ring.key:
                self._lost(ring)
            if ring.signalled:
                del ring
                continue
            ring.signalled = True
            # The loop is woken with the GIL let go (os.eventfd_write): woken,
            # it takes the GIL at once instead of sleeping until this thread
            # lets go of it.
            stay = False
            if not jobs and not stop[0]:
                # Nothing queued: idle first. Back from the write this thread
                # then usually waits for the GIL while the loop runs the
                # completion; the loop's next job releases its lock with
                # nobody blocked on it (no system call), and the loop's own
                # sleep in the selector hands this thread the GIL: one
                # wake-up for it per request instead of two.
                idle.append(me)
                stay = self._stay_idle(me, idle)
            try:
                os.eventfd_write(ring.efd, 1)
            except OSError:
                pass
            del ring
            if stay:
                wait()
                self._waking = False
                woken = True

    def _stay_idle(self, me: _Worker, idle: list[_Worker]) -> bool:
        """Whether ``me``, just put on ``idle``, should sleep now.

        A job (or a shutdown) may have come between its last look at the
        queue and the append, its submitter finding no idle worker to wake:
        then ``me`` takes itself off the list and goes on, unless a
        submitter took it off already and so will (or did) release its lock.
        """
        if not self._jobs and not me.stop[0]:
            return True
        try:
            idle.remove(me)
        except ValueError:
            return True
        return False

    def shutdown(self) -> None:
        """Stop the threads once the queued jobs are done (new jobs start new threads)."""
        self._stop[0] = True
        self._stop = [False]
        self._threads = []
        idle, self._idle = self._idle, []
        for w in idle:
            w.wake.release()
        self._waking = False


# A completion callback of IoPool.start: done(token, result, error).
Done = Callable[[Any, Any, "BaseException | None"], None]
_Job = tuple[_Ring, Any, Callable[..., Any], tuple[Any, ...]]

_pool: IoPool | None = None


def io_pool() -> IoPool:
    """The process-wide pool for blocking block I/O (created on first use)."""
    global _pool
    if _pool is None:
        _pool = IoPool()
    return _pool


async def run_blocking(fn: Callable[..., T], *args: object, pool: IoPool | None = None) -> T:
    """Run ``fn(*args)`` in the I/O pool and await its result."""
    return await (pool or io_pool()).run(fn, *args)


def total_len(bufs: Sequence[memoryview]) -> int:
    return sum(b.nbytes for b in bufs)


def advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The part of ``bufs`` after the first ``n`` bytes."""
    i = 0
    while i < len(bufs) and n >= bufs[i].nbytes:
        n -= bufs[i].nbytes
        i += 1
    rest = bufs[i:]
    if n and rest:
        rest[0] = rest[0][n:]
    return rest


def byte_view(b: memoryview) -> memoryview:
    return b if b.format == "B" and b.ndim == 1 else b.cast("B")


def preadv_full(fd: int, bufs: Sequence[memoryview], offset: int) -> int:
    """Fill ``bufs`` from ``offset``, retrying short reads; returns bytes read (less only at EOF)."""
    pending = [byte_view(b) for b in bufs if b.nbytes]
    done = 0
    while pending:
        n = os.preadv(fd, pending[:IOV_MAX], offset + done)
        if n == 0:
            break
        done += n
        pending = advance(pending, n)
    return done


def pwritev_full(fd: int, bufs: Sequence[memoryview], offset: int) -> int:
    """Write all of ``bufs`` at ``offset``, retrying short writes; returns bytes written."""
    pending = [byte_view(b) for b in bufs if b.nbytes]
    done = 0
    while pending:
        n = os.pwritev(fd, pending[:IOV_MAX], offset + done)
        if n == 0:
            raise OSError(28, "short write")
        done += n
        pending = advance(pending, n)
    return done


def zero_from(bufs: Sequence[memoryview], start: int) -> None:
    """Zero every byte of ``bufs`` from byte ``start`` on (the tail after EOF)."""
    pos = 0
    for b in bufs:
        n = b.nbytes
        if pos + n > start:
            skip = max(0, start - pos)
            bv = byte_view(b)
            bv[skip:] = bytes(n - skip)
        pos += n


def buffer_address(b: memoryview) -> int | None:
    """The host address of a writable buffer, or None (read-only or odd buffer)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(b))
    except (TypeError, ValueError):
        return None


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned anonymous buffer (for O_DIRECT bounces)."""
    return mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
# Keeps the GIL: glibc answers from the thread's rseq area, no system call.
_sched_getcpu = ctypes.PyDLL(None).sched_getcpu
_sched_getcpu.argtypes = []
_sched_getcpu.restype = ctypes.c_int
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), which Python only offers without modes (posix_fallocate).

    :raises OSError: With the errno of the call (EOPNOTSUPP where the file
        system lacks the mode).
    """
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != 4:  # EINTR
            raise OSError(err, os.strerror(err))
