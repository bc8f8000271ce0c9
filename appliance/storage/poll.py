"""Adaptive polling of completion rings before the event loop blocks.

A blocking wake-up costs ~30 us on the VMs this runs on (the vCPU halts and
the host has to schedule it back): at queue depth 1 that is a third of a
64 KiB request. Kernel AIO writes its completions into a ring mapped into the
process (``struct aio_ring``), readable without a system call, so when the
loop is about to block while requests are in flight it can watch that ring
for a while instead, and skip the wake-up when a completion lands in time.
QEMU's AioContext does this in its iothreads (``poll-max-ns``, default
32768 ns, a window that grows while waits end inside it and drops when they
do not), as does Linux's hybrid io_poll; this module does it for asyncio.

The window adapts per loop, after each wait that began with requests in
flight (``waited`` is the whole wait, spinning and blocking):

- a completion showed up in the ring while spinning: the window stays;
- nothing did and ``waited`` passed ``max_ns``: the device is slower than
  polling helps with, the window drops to 0 and no CPU is spent on it until
  a wait ends within ``max_ns`` again;
- nothing did but ``waited`` stayed within ``max_ns``: a window as long as
  ``waited`` (at least double the old one) would have caught it.

Spinning pays only while a CPU would otherwise sit idle. On a shared CPU
the scheduler charges the spin to the loop thread and makes it wait its
turn later, so the poller stops as soon as it sees contention: the loop
thread waited on a run queue since the last wait (``run_delay`` in
``/proc/thread-self/schedstat``, one pread per wait while the device
works), or a turn of the spin took long enough that the thread must have
been off the CPU. It then blocks for a quiet spell (20 ms, doubling while
contention returns right after each spell, up to 250 ms: a probe that costs
a scheduler slice now and then against a neighbour that stays busy).

An idle loop never spins (nothing in flight). Other fds are checked once
before each spin, so they wait at most one window. Each turn of the spin
calls ``sched_yield``, which releases the GIL (other Python threads, such as
vCPU threads leaving KVM_RUN, take it at once) and lets anything runnable on
this CPU go first: on ext4 the completion of a write into unwritten extents
is finished by a kworker that usually runs on the CPU the loop spins on.

Measured here (64 KiB O_DIRECT reads at queue depth 1, ``img bench``,
completion-to-completion, two alternating runs): median 109-111 us blocking,
92-98 us spinning on every wait, for 95-101 us of CPU a request instead of
56-63 us; qemu-img bench took 94-106 us a request in the same runs.

The knob is ``poll-max-ns`` as QEMU's iothread spells it: the environment
variable ``APPLIANCE_POLL_MAX_NS`` for every user of the engine (``appliance
img``, ``storage-daemon``, ``run``), ``--poll-max-ns`` on ``appliance img
bench``, :func:`set_max_ns` from Python; 0 turns polling off.
"""

from __future__ import annotations

import asyncio
import math
import os
import select
import selectors
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from appliance.errors import ConfigError

# A 64 KiB O_DIRECT request on the virtual disks here completes 45-90 us after
# its io_submit returns: QEMU's 32768 ns would never reach it. A completion
# later than this is not worth a core's time.
DEFAULT_MAX_NS = 100_000
GROW_START_NS = 8_000
# A longer window would hold the loop for time a user would notice.
LIMIT_MAX_NS = 10_000_000
# One turn of the spin is ~1 us; a turn this long means the thread was off the CPU.
PREEMPTED_NS = 30_000
# Runnable-but-waiting time since the last wait that says the CPU is shared
# (kworkers finishing our own writes account for ~10-20 us).
CONTENDED_NS = 100_000
# No spinning for this long after the CPU was found shared, doubling up to the max.
QUIET_NS = 20_000_000
QUIET_MAX_NS = 250_000_000
ENV = "APPLIANCE_POLL_MAX_NS"

_now_ns = time.perf_counter_ns
_EVENT_READ = selectors.EVENT_READ
_EPOLLIN = getattr(select, "EPOLLIN", 1)
_sched_yield = os.sched_yield

Events = list[tuple[selectors.SelectorKey, int]]


class PollSource(Protocol):
    """A completion ring the loop can poll (:class:`~appliance.storage.aio.LinuxAio` is one)."""

    @property
    def fd(self) -> int:
        """The fd whose loop reader reaps the ring."""
        ...

    def in_flight(self) -> bool:
        """Requests were submitted and have not all been reaped."""
        ...

    def ring_ready(self) -> bool:
        """A completion waits in the ring (read without a system call)."""
        ...


_max_ns: int | None = None  # None: not read from the environment yet
_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopPoller] = weakref.WeakKeyDictionary()


def parse_max_ns(text: str, what: str = "poll-max-ns") -> int:
    """``poll-max-ns`` as QEMU's iothread takes it: nanoseconds, 0 for no polling.

    :raises ConfigError: When it is not a whole number from 0 to 10000000.
    """
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise ConfigError(f"{what}: '{text}' is not a number of nanoseconds") from None
    if not 0 <= value <= LIMIT_MAX_NS:
        raise ConfigError(f"{what}: {value} is out of range (0 to {LIMIT_MAX_NS})")
    return value


def max_ns() -> int:
    """The ceiling of the polling window: :func:`set_max_ns`'s, else ``$APPLIANCE_POLL_MAX_NS``, else the default.

    :raises ConfigError: When the environment variable is not a valid value.
    """
    global _max_ns
    if _max_ns is None:
        text = os.environ.get(ENV)
        _max_ns = DEFAULT_MAX_NS if text is None else parse_max_ns(text, ENV)
    return _max_ns


def set_max_ns(value: int) -> None:
    """Set the ceiling for loops polling now and later (0 stops polling).

    :raises ConfigError: When ``value`` is outside 0..10000000.
    """
    global _max_ns
    if not 0 <= value <= LIMIT_MAX_NS:
        raise ConfigError(f"poll-max-ns: {value} is out of range (0 to {LIMIT_MAX_NS})")
    _max_ns = value
    for p in list(_pollers.values()):
        p.max_ns = value
        p.ns = min(p.ns, value)


def register(source: PollSource, loop: asyncio.AbstractEventLoop) -> LoopPoller | None:
    """Poll ``source`` on ``loop`` before the loop blocks.

    :returns: the loop's poller, or None when the loop has no selector to wrap
        (the source then works through its fd alone).
    :raises ConfigError: When ``$APPLIANCE_POLL_MAX_NS`` is not a valid value.
    """
    poller = _pollers.get(loop)
    if poller is None:
        selector = getattr(loop, "_selector", None)
        if not isinstance(selector, selectors.BaseSelector):
            return None
        poller = LoopPoller(selector, max_ns())
        _pollers[loop] = poller
        # A source never unregistered (its owner not closed) must not keep the fd open.
        weakref.finalize(loop, poller.detach)
    poller.sources.append(source)
    return poller


def unregister(source: PollSource, loop: asyncio.AbstractEventLoop) -> None:
    """Stop polling ``source``; the loop's selector is its own again once no source is left."""
    poller = _pollers.get(loop)
    if poller is not None and source in poller.sources:
        poller.sources.remove(source)
        if not poller.sources:
            del _pollers[loop]
            poller.detach()


def poller_of(loop: asyncio.AbstractEventLoop) -> LoopPoller | None:
    """The loop's poller, if a source registered on it (its counters are for tests and benchmarks)."""
    return _pollers.get(loop)


class LoopPoller:
    """Stands in for one selector's ``select``: spins on the sources' rings before blocking."""

    def __init__(self, selector: selectors.BaseSelector, max_ns: int) -> None:
        self.selector = selector
        self._select: Callable[[float | None], Events] = selector.select
        keys = getattr(selector, "_fd_to_key", None)
        self._fd_to_key: dict[int, selectors.SelectorKey] | None = (
            keys if isinstance(keys, dict) else None)
        # The epoll object under an EpollSelector (the loop's default here): see select().
        ep = getattr(selector, "_selector", None)
        self._epoll: select.epoll | None = None
        if (hasattr(select, "epoll") and type(selector) is selectors.EpollSelector
                and isinstance(ep, select.epoll) and self._fd_to_key is not None):
            self._epoll = ep
        self.sources: list[PollSource] = []
        self.max_ns = max_ns
        self.ns = 0  # the current window
        self.hits = 0  # spins that saw a completion
        self.misses = 0  # spins that ran out and blocked
        self.contended = 0  # waits not spun because another task wanted this CPU
        self.spun_ns = 0
        self._quiet_until = 0  # no spinning before this (perf_counter_ns)
        self._quiet_ns = QUIET_NS
        self._stale = False
        # The loop thread's time spent runnable but not running (schedstat's
        # run_delay): when it grows, this CPU is shared, and a spin only
        # burns the slice the scheduler will then give to the other task.
        # /proc/thread-self is the thread that opens it: register() runs on
        # the loop's thread (LinuxAio is made there).
        try:
            self._schedstat: int | None = os.open("/proc/thread-self/schedstat",
                                                  os.O_RDONLY | os.O_CLOEXEC)
            self._run_delay = self._read_run_delay()
        except (OSError, ValueError, IndexError):
            self._schedstat = None
            self._run_delay = 0
        # asyncio calls selector.select(timeout) once per loop turn and has no
        # public hook there; the instance attribute shadows the class's method
        # until detach() removes it.
        selector.select = self.select  # type: ignore[method-assign]

    def detach(self) -> None:
        """Give the selector its own ``select`` back and close the schedstat fd."""
        if self.selector.__dict__.get("select") == self.select:
            del self.selector.__dict__["select"]
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None

    def select(self, timeout: float | None = None) -> Events:
        if (timeout is not None and timeout <= 0) or not self.max_ns:
            return self._select(timeout)
        busy = []
        for s in self.sources:
            if s.in_flight():
                if s.ring_ready():
                    # Completed already (inside io_submit, or while callbacks
                    # ran): no need to ask the kernel or look at the CPU.
                    return self._dispatch(self._ready(s))
                busy.append(s)
        if not busy:
            return self._select(timeout)
        t0 = _now_ns()
        ns = self.ns
        if ns and (t0 < self._quiet_until or self._shared_cpu()):
            ns = self.ns = 0
        if ns:
            events = self._select(0)
            if events:
                return events
            end = t0 + ns
            if timeout is not None:
                end = min(end, t0 + int(timeout * 1e9))
            now = t0
            while True:
                for s in busy:
                    if s.ring_ready():
                        self.hits += 1
                        self.spun_ns += _now_ns() - t0
                        return self._dispatch(self._ready(s))
                last = now
                now = _now_ns()
                if now >= end:
                    break
                if now - last > PREEMPTED_NS:
                    # Off the CPU for a while: someone else needs it; stop and block.
                    self._back_off(now)
                    break
                _sched_yield()
            self.misses += 1
            self.spun_ns += now - t0
            if timeout is not None:
                timeout = max(0.0, timeout - (now - t0) / 1e9)
        ep = self._epoll
        if ep is None:
            events = self._select(timeout)
            now = _now_ns()
            if len(events) == 1:
                # The commonest wake-up: the one completion waited for.
                fd = events[0][0].fd
                for s in busy:
                    if s.fd == fd:
                        events = self._dispatch(events)
                        break
        else:
            # The epoll selector's wait without its Python around the
            # system call (~0.7 us, half of it between the wake-up and the
            # completion's callback): the timeout rounded up to whole
            # milliseconds as it does, the commonest wake-up (the one
            # completion waited for, alone) dispatched from the raw result,
            # anything else read again through the selector, which finds it
            # still there (asyncio's registrations are level-triggered).
            if timeout is None:
                secs = -1.0
            else:
                secs = math.ceil(timeout * 1e3) * 1e-3
            keys = self._fd_to_key
            assert keys is not None  # (set whenever _epoll is)
            try:
                got = ep.poll(secs, max(len(keys), 1))
            except InterruptedError:
                got = []
            now = _now_ns()
            events = []
            if got:
                events = self._raw_ready(got, busy)
        waited = now - t0
        if waited > self.max_ns or now < self._quiet_until:
            self.ns = 0
        elif ns < self.max_ns:
            # The wait, wake-up included, is the window that would have caught it.
            self.ns = min(self.max_ns, max(GROW_START_NS, 2 * ns, waited))
        return events

    def _read_run_delay(self) -> int:
        assert self._schedstat is not None
        return int(os.pread(self._schedstat, 96, 0).split()[1])

    def _shared_cpu(self) -> bool:
        """Did the loop thread wait for a CPU since the last look? (~1.4 us, while the device works)"""
        if self._schedstat is None:
            return False
        try:
            delay = self._read_run_delay()
        except (OSError, ValueError, IndexError):
            return False
        grew = delay - self._run_delay
        self._run_delay = delay
        if self._stale:
            self._stale = False  # what piled up while not polling says nothing now
            return False
        if grew > CONTENDED_NS:
            self._back_off(_now_ns())
            return True
        return False

    def _back_off(self, now: int) -> None:
        """Another task wants this CPU: block instead of spinning for a while.

        The quiet spell doubles while contention comes back as soon as it
        ends, and starts again from QUIET_NS otherwise: a CPU-bound
        neighbour keeps polling off, a passing one costs little.
        """
        self.contended += 1
        self.ns = 0
        if now < self._quiet_until + self._quiet_ns:
            self._quiet_ns = min(2 * self._quiet_ns, QUIET_MAX_NS)
        else:
            self._quiet_ns = QUIET_NS
        self._quiet_until = now + self._quiet_ns
        self._stale = True

    def _raw_ready(self, got: list[tuple[int, int]], busy: list[PollSource]) -> Events:
        """What epoll returned (``got``, not empty) as the selector's events; a lone
        completion of a polled source dispatched (:meth:`_dispatch`)."""
        if len(got) == 1:
            fd, mask = got[0]
            if mask == _EPOLLIN:
                for s in busy:
                    if s.fd == fd:
                        keys = self._fd_to_key
                        key = keys.get(fd) if keys is not None else None
                        if key is not None and key.events & _EVENT_READ:
                            return self._dispatch([(key, _EVENT_READ)])
                        break
        return self._select(0)

    def _dispatch(self, events: Events) -> Events:
        """Run the loop's reader of a source whose ring holds a completion
        (``events``: its fd, readable, alone), here.

        Returned as a readable fd instead, asyncio would queue the reader's
        handle and run it from its ready queue (~1 us of loop work between a
        completion and the request its callback starts, at queue depth 1 on
        every request). Run here it does what the loop would do with it
        (``Handle._run``: its context, exceptions to the loop's handler),
        and nothing else was ready: this select was about to wait. Anything
        other than an asyncio reader handle goes back the selector's way.
        """
        if len(events) == 1 and events[0][1] == _EVENT_READ:
            data = events[0][0].data
            if type(data) is tuple and len(data) == 2:
                reader = data[0]
                if isinstance(reader, asyncio.Handle) and not reader._cancelled:
                    reader._run()
                    return []
        return events

    def _ready(self, source: PollSource) -> Events:
        """What the selector would have returned: the source's fd readable."""
        # The selector's own fd-to-key map (what its select reads too): one
        # dict lookup where get_key goes through half a dozen Python calls
        # (~0.6 us), on the way from every polled completion to its callback.
        keys = self._fd_to_key
        key = keys.get(source.fd) if keys is not None else None
        if key is None:
            try:
                key = self.selector.get_key(source.fd)
            except (KeyError, ValueError):
                return self._select(0)
        return [(key, _EVENT_READ)]


# QEMU's iothread knobs with nothing to tune here: the engine's loop decides.
_IOTHREAD_TAKEN = ("poll-grow", "poll-shrink", "aio-max-batch", "thread-pool-min", "thread-pool-max")


def parse_iothread(o: Any) -> tuple[str, int | None]:
    """An ``iothread`` object's options (cli.options.OptionDict, the type
    already taken): its id and poll-max-ns (None: the default).

    Devices naming an iothread share our one loop (every device has its own
    thread already, DESIGN.md §1); what carries over is poll-max-ns.

    :raises ConfigError: On a missing id, a bad value or an unknown key.
    """
    ident: str = o.require("id")
    text = o.take("poll-max-ns")
    value = None if text is None else parse_max_ns(text, f"{o.option},poll-max-ns")
    for key in _IOTHREAD_TAKEN:
        o.take_int(key, None, minimum=0)
    o.finish()
    return ident, value


def bound_by_iothreads(values: list[int | None]) -> None:
    """Set the ceiling from the iothreads the devices name: one loop serves
    them all, so the widest window any of them allows (none set: unchanged)."""
    given = [v for v in values if v is not None]
    if given:
        set_max_ns(max(given))
