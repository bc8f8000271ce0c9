"""virtio-blk: a BlockBackend presented to the guest as a disk (virtio 1.2 §5.2).

A kick drains the queue: each chain is parsed (:mod:`blk_request`) and, if
valid, started at once, so many requests are in flight across the backend's
thread pool (or kernel AIO context) together. Reads and writes on a backend
with a callback form (``start_rw``: O_DIRECT raw images) go through it with
no coroutine or future per request; everything else runs as a coroutine
stepped by the device (``_step``). Completions write the status byte and go
onto the used ring; the interrupt for a batch of completions is raised once
(when the driver wants one: EVENT_IDX / NO_INTERRUPT), at once when nothing
else is in flight on that queue. Queues are independent: each
has its own counters (``stats[i]``), which tests use to show that every
queue carries I/O.

Guest mistakes become ``VIRTIO_BLK_S_IOERR``/``UNSUPP`` plus a counter and a
rate-limited log line; a broken ring sets DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import struct
from collections.abc import Coroutine, Sequence
from typing import Any

from appliance.iovec import scatter
from appliance.kvm.memory import GuestMemory
from appliance.storage.backend import BlockBackend
from appliance.storage.blk_request import (
    ID_BYTES,
    SECTOR_SHIFT,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlkLimits,
    BlkRequest,
)
from appliance.storage.errors import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    BlkError,
    BlkNoStatus,
    StorageError,
)
from appliance.virtio.device import Interrupt, VirtioDevice
from appliance.virtio.errors import QueueError
from appliance.virtio.queue import DescriptorChain, RateLimitedLog, Virtqueue

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

VIRTIO_ID_BLOCK = 2

# virtio 1.2 §5.2.3 feature bits.
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# §5.2.4 struct virtio_blk_config up to write_zeroes_may_unmap and padding:
# capacity, size_max, seg_max, geometry (c/h/s), blk_size, topology
# (physical_block_exp, alignment_offset, min_io_size, opt_io_size),
# writeback, unused0, num_queues, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap, unused1[3], then the secure-erase fields (unused).
BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")

STAT_KEYS = ("requests", "read_bytes", "write_bytes", "errors", "dropped", "in_flight")


class VirtioBlk(VirtioDevice):
    """A virtio block device over any :class:`BlockBackend`.

    :param backend: the disk.
    :param num_queues: request queues (``num-queues``; QEMU's default is one
        per vCPU, which the builder passes).
    :param queue_size: maximum size of each queue.
    :param serial: the GET_ID string (at most 20 bytes are returned).
    :param read_only: present the disk read-only even if the backend is writable.
    :param physical_block_size: a physical block larger than the logical one
        to report (VIRTIO_BLK_F_TOPOLOGY), so the guest aligns its I/O to it.
    :param logical_block_size: the block size to report (blk_size) when larger
        than the backend's. It belongs to this device: another device on the
        same backend keeps its own.
    """

    device_id = VIRTIO_ID_BLOCK

    def __init__(
        self,
        backend: BlockBackend,
        *,
        num_queues: int = 1,
        queue_size: int = 256,
        serial: str = "",
        read_only: bool = False,
        physical_block_size: int | None = None,
        logical_block_size: int | None = None,
    ) -> None:
        super().__init__()
        if num_queues < 1 or num_queues > 1024:
            raise ValueError("num_queues must be between 1 and 1024")
        self.backend = backend
        self.queue_sizes = (queue_size,) * num_queues
        self.serial = serial.encode()[:ID_BYTES]
        self.read_only = read_only or backend.read_only
        self.discard = backend.supports_discard and not self.read_only
        self.write_zeroes = not self.read_only
        self.physical_block_size = physical_block_size
        self.logical_block_size = logical_block_size
        self.stats: list[dict[str, int]] = [dict.fromkeys(STAT_KEYS, 0) for _ in range(num_queues)]
        self._queues: list[Virtqueue | None] = []
        self._irqs: Sequence[Interrupt] = ()
        # Requests started and not yet finished (see _step), and who waits for none.
        self._running = 0
        self._idle: asyncio.Future[None] | None = None
        # Requests waiting for the backend, by what they wait for; see _wake.
        self._waiting: dict[asyncio.Future[Any], Coroutine[Any, Any, None]] = {}
        self._batch = False
        self._ctx = contextvars.copy_context()
        self._signal_pending: set[int] = set()
        self._generation = 0
        # The queue queue_notify is draining (-1: none), and the requests that
        # completed while it ran, published on the next loop turn; see _start.
        self._draining = -1
        self._deferred: list[tuple[int, Virtqueue, int, memoryview, int, int]] = []
        self._deferred_pending = False
        # The backend's callback form of readv/writev (RawBackend.start_rw),
        # if it has one: reads and writes then skip coroutines and futures.
        self._start_rw = getattr(backend, "start_rw", None)
        self._signals_scheduled = False
        self._limits: BlkLimits | None = None

    # -- feature and config space ---------------------------------------------

    @property
    def capacity_sectors(self) -> int:
        return self.backend.size >> SECTOR_SHIFT

    def device_features(self) -> int:
        f = super().device_features()
        f |= 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH
        f |= 1 << VIRTIO_BLK_F_MQ
        if self.read_only:
            f |= 1 << VIRTIO_BLK_F_RO
        if self.discard:
            f |= 1 << VIRTIO_BLK_F_DISCARD
        if self.write_zeroes:
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
        if self._physical_exp():
            f |= 1 << VIRTIO_BLK_F_TOPOLOGY
        return f

    def block_size(self) -> int:
        """The logical block the guest is told of (§5.2.4 blk_size)."""
        return max(512, self.backend.logical_block_size, self.logical_block_size or 0)

    def _physical_exp(self) -> int:
        """log2(physical / logical block) for §5.2.4's topology, 0 when they are the same."""
        bs = self.block_size()
        phys = self.physical_block_size or 0
        return (phys // bs).bit_length() - 1 if phys > bs else 0

    def limits(self) -> BlkLimits:
        """What requests are checked against (capacity read fresh).

        Rebuilt only when something it holds changed: it is consulted on
        every kick, and building a frozen dataclass there cost more than
        the comparison.
        """
        lim = self._limits
        cap = self.capacity_sectors
        if (
            lim is None
            or lim.capacity_sectors != cap
            or lim.read_only != self.read_only
            or lim.discard != self.discard
            or lim.write_zeroes != self.write_zeroes
        ):
            lim = self._limits = BlkLimits(
                capacity_sectors=cap,
                read_only=self.read_only,
                discard=self.discard,
                write_zeroes=self.write_zeroes,
            )
        return lim

    def config_bytes(self) -> bytes:
        lim = self.limits()
        bs = self.block_size()
        return BLK_CONFIG.pack(
            lim.capacity_sectors,
            0,  # size_max (feature not offered)
            max(1, self.queue_sizes[0] - 2),  # seg_max: room for header and status
            0, 0, 0,  # geometry
            bs,
            self._physical_exp(), 0, 0, 0,  # topology: physical_block_exp, alignment, min/opt io size
            0,  # writeback
            0,
            self.num_queues,
            lim.max_discard_sectors,
            lim.max_discard_seg,
            bs >> SECTOR_SHIFT,  # discard_sector_alignment
            lim.max_write_zeroes_sectors,
            lim.max_write_zeroes_seg,
            1 if self.discard else 0,  # write_zeroes_may_unmap
            0, 0, 0,
        )

    # -- lifecycle -----------------------------------------------------------

    def activate(
        self,
        mem: GuestMemory,
        queues: Sequence[Virtqueue | None],
        interrupts: Sequence[Interrupt],
    ) -> None:
        """Start serving ``queues`` (entries may be None for queues not enabled)."""
        self._queues = list(queues[: self.num_queues])
        self._irqs = interrupts

    def reset(self) -> None:
        super().reset()
        self._generation += 1
        self._queues = []
        self._irqs = ()
        self._signal_pending.clear()
        # Completions not yet published belong to the old rings (and hold views of guest RAM).
        self._deferred = []

    async def quiesce(self) -> None:
        self._complete_deferred()
        while self._running:
            if self._idle is None or self._idle.done():
                self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def busy(self) -> bool:
        return self._running > 0

    @property
    def in_flight(self) -> int:
        """Requests handed to the backend and not yet completed, all queues."""
        return sum(s["in_flight"] for s in self.stats)

    # -- the data path -------------------------------------------------------

    def queue_notify(self, index: int) -> None:
        """Drain queue ``index``; must run on the event loop (requests become tasks)."""
        if self.needs_reset or index >= len(self._queues):
            return
        q = self._queues[index]
        if q is None:
            return
        limits = self.limits()
        loop = asyncio.get_running_loop()
        self._draining = index
        try:
            while True:
                while (chain := q.pop()) is not None:
                    self._start(index, q, chain, limits, loop)
                if not q.enable_notification():
                    break
        except QueueError as err:
            self.fail(str(err))
            return
        finally:
            self._draining = -1
            if self._deferred and not self._deferred_pending:
                self._deferred_pending = True
                loop.call_soon(self._complete_deferred)
        self._signal(index)

    def _complete_deferred(self) -> None:
        self._deferred_pending = False
        done, self._deferred = self._deferred, []
        signal: set[int] = set()
        for qi, q, head, status_buf, status, written in done:
            if q.broken:
                continue
            status_buf[0] = status
            q.push_used(head, written)
            signal.add(qi)
        for qi in signal:
            self._signal(qi)

    def _start(
        self,
        qi: int,
        q: Virtqueue,
        chain: DescriptorChain,
        limits: BlkLimits,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        st = self.stats[qi]
        st["requests"] += 1
        try:
            req = BlkRequest.parse(chain, limits)
        except BlkNoStatus as err:
            st["dropped"] += 1
            _guest_log.warning("virtio-blk queue %d: dropping request: %s", qi, err)
            q.push_used(chain.head, 0)
            return
        except BlkError as err:
            st["errors"] += 1
            _guest_log.warning("virtio-blk queue %d: %s", qi, err)
            assert err.status_buf is not None
            err.status_buf[0] = err.status
            q.push_used(chain.head, 1)
            return
        if req.type == VIRTIO_BLK_T_GET_ID:
            n = min(ID_BYTES, req.data_len)
            scatter(req.data, self.serial.ljust(ID_BYTES, b"\0")[:n])
            req.status_buf[0] = VIRTIO_BLK_S_OK
            q.push_used(chain.head, n + 1)
            return
        st["in_flight"] += 1
        self._running += 1
        t = req.type
        if (t == VIRTIO_BLK_T_IN or t == VIRTIO_BLK_T_OUT) and self._start_rw is not None:
            token = (qi, q, self._generation, chain.head, req)
            if self._start_rw(t == VIRTIO_BLK_T_OUT, req.sector << SECTOR_SHIFT, req.data,
                              self._rw_done, token):
                return
        self._step(self._execute(qi, q, self._generation, chain.head, req))

    def _rw_done(
        self, token: tuple[int, Virtqueue, int, int, BlkRequest], n: int, err: BaseException | None
    ) -> None:
        """A read or write started with the backend's ``start_rw`` is over (on the loop).

        What ``_execute`` does after its await, for the callback path. The
        used element goes on the ring now; the interrupt for everything
        the backend completed in this batch follows once, on the next loop
        turn (``_flush_signals``), honouring EVENT_IDX/NO_INTERRUPT there.
        """
        qi, q, generation, head, req = token
        st = self.stats[qi]
        st["in_flight"] -= 1
        self._finished()
        if isinstance(err, asyncio.CancelledError):
            # The backend closed under it (shutting down): left unanswered,
            # as a cancelled coroutine's request is, so a front end that
            # reconnects to a new back end gets it resubmitted (inflight area).
            return
        if err is None and n >= req.data_len:
            if req.type == VIRTIO_BLK_T_IN:
                st["read_bytes"] += n
                written = n + 1
            else:
                st["write_bytes"] += n
                written = 1
            status = VIRTIO_BLK_S_OK
        else:
            status, written = VIRTIO_BLK_S_IOERR, 1
            st["errors"] += 1
            what = "read" if req.type == VIRTIO_BLK_T_IN else "write"
            if err is None:
                _guest_log.warning("virtio-blk queue %d: short %s at sector %d", qi, what, req.sector)
            else:
                _guest_log.warning(
                    "virtio-blk queue %d: I/O error: %s at sector %d failed: %s", qi, what, req.sector, err
                )
        if generation != self._generation or q.broken:
            return  # the device was reset meanwhile: these rings are gone
        req.status_buf[0] = status
        q.push_used(head, written)
        if not st["in_flight"]:
            # Nothing else in flight on this queue can join the batch: tell
            # the driver now rather than a loop turn later (at queue depth 1
            # that turn is a good part of the request's latency).
            self._signal(qi)
            return
        if qi not in self._signal_pending:
            self._signal_pending.add(qi)
            if not self._signals_scheduled:
                self._signals_scheduled = True
                try:
                    asyncio.get_running_loop().call_soon(self._scheduled_signals)
                except RuntimeError:
                    self._signals_scheduled = False  # no loop any more (closing): nobody to tell

    def _scheduled_signals(self) -> None:
        self._signals_scheduled = False
        self._flush_signals()

    def _step(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` to its next wait and arrange to resume it when that is over.

        What an asyncio Task does for a coroutine, minus what a request does
        not need (cancellation, a name, a result), which cost a loop turn to
        start, one more to publish and ~10 us of loop-thread CPU a request.
        The first step runs inside queue_notify, as Python 3.12's eager tasks
        do, so pool work is submitted at kick time and a page-cache read
        (RWF_NOWAIT on the loop) finishes without waiting at all.
        ``_execute`` turns every failure into a status, so nothing but a bug
        gets past it.
        """
        try:
            waited = coro.send(None)
        except StopIteration:
            self._finished()
            return
        except asyncio.CancelledError:
            # The backend gave up on the wait (it is closing); nobody is left to tell.
            self._finished()
            return
        except BaseException:
            log.exception("virtio-blk: request failed")
            self._finished()
            return
        if getattr(waited, "_asyncio_future_blocking", False):
            # ``await future`` yields the future and reads its result itself
            # once resumed.
            waited._asyncio_future_blocking = False
            self._waiting[waited] = coro
            waited.add_done_callback(self._wake, context=self._ctx)
        elif waited is None:
            # A bare yield (asyncio.sleep(0)): go round the loop once.
            asyncio.get_running_loop().call_soon(self._resume, coro, context=self._ctx)
        else:
            coro.close()
            log.error("virtio-blk: request awaited %r, which is not a future", waited)
            self._finished()

    def _wake(self, fut: asyncio.Future[Any]) -> None:
        """A backend wait is over: resume every request whose wait is over, then signal once.

        The pool completes everything that finished meanwhile in one go, so
        their callbacks run in the same loop turn; the first one resumes them
        all and the used-ring interrupts go out once for the lot, in this turn
        rather than the next.
        """
        if fut not in self._waiting:
            return  # already resumed by an earlier callback of this turn
        ready = [f for f in self._waiting if f.done()]
        self._batch = True
        try:
            for f in ready:
                self._step(self._waiting.pop(f))
        finally:
            self._batch = False
        self._flush_signals()

    def _resume(self, coro: Coroutine[Any, Any, None]) -> None:
        self._batch = True
        try:
            self._step(coro)
        finally:
            self._batch = False
        self._flush_signals()

    def _finished(self) -> None:
        self._running -= 1
        if not self._running and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def _execute(
        self, qi: int, q: Virtqueue, generation: int, head: int, req: BlkRequest
    ) -> None:
        st = self.stats[qi]
        status = VIRTIO_BLK_S_OK
        written = 1
        backend = self.backend
        try:
            t = req.type
            if t == VIRTIO_BLK_T_IN:
                n = await backend.readv(req.sector << SECTOR_SHIFT, req.data)
                if n < req.data_len:
                    raise StorageError(f"short read at sector {req.sector}")
                st["read_bytes"] += n
                written += n
            elif t == VIRTIO_BLK_T_OUT:
                n = await backend.writev(req.sector << SECTOR_SHIFT, req.data)
                st["write_bytes"] += n
            elif t == VIRTIO_BLK_T_FLUSH:
                await backend.flush()
            elif t == VIRTIO_BLK_T_DISCARD:
                for sector, num, _ in req.segments:
                    await backend.discard(sector << SECTOR_SHIFT, num << SECTOR_SHIFT)
            elif t == VIRTIO_BLK_T_WRITE_ZEROES:
                for sector, num, flags in req.segments:
                    unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) and self.discard
                    await backend.write_zeroes(
                        sector << SECTOR_SHIFT, num << SECTOR_SHIFT, may_unmap=unmap
                    )
        except asyncio.CancelledError:
            raise
        except (StorageError, OSError) as err:
            status, written = VIRTIO_BLK_S_IOERR, 1
            st["errors"] += 1
            _guest_log.warning("virtio-blk queue %d: I/O error: %s", qi, err)
        except Exception:
            # A backend bug must not take the loop down; the guest sees IOERR.
            status, written = VIRTIO_BLK_S_IOERR, 1
            st["errors"] += 1
            log.exception("virtio-blk queue %d: backend failed", qi)
        finally:
            st["in_flight"] -= 1
        if generation != self._generation or q.broken:
            return  # the device was reset meanwhile: these rings are gone
        if qi == self._draining:
            # Finished inside queue_notify: published on the next loop turn,
            # all of this kick's together, as a task's completion would be.
            self._deferred.append((qi, q, head, req.status_buf, status, written))
            return
        req.status_buf[0] = status
        q.push_used(head, written)
        if qi not in self._signal_pending:
            self._signal_pending.add(qi)
            if not self._batch:
                asyncio.get_running_loop().call_soon(self._flush_signals)

    def _flush_signals(self) -> None:
        pending = self._signal_pending
        while pending:
            self._signal(pending.pop())

    def _signal(self, qi: int) -> None:
        self._signal_pending.discard(qi)
        if qi >= len(self._queues) or qi >= len(self._irqs):
            return
        q = self._queues[qi]
        if q is not None and q.needs_notification():
            self._irqs[qi].notify()
