"""The glue that turns a :class:`VirtioDevice` into a vhost-user back end.

The front end (QEMU) owns the virtio transport: it negotiates features with
the guest and hands us the result, shares guest RAM as fds (SET_MEM_TABLE), and
describes each ring by its user-space addresses plus a kick eventfd (the guest's
notifications) and a call eventfd (our interrupts). This class keeps that state
per ring, maps the memory into a :class:`GuestMemory`, and whenever the set of
started rings changes it (re)activates the device with fresh
:class:`Virtqueue` objects — the device never learns it is not on PCI.

Ring life cycle (vhost-user.rst "Ring states"): a ring starts when its kick fd
arrives and stops on GET_VRING_BASE, which answers with the next avail index to
process. The device is handed the leading run of rings that are started *and*
enabled (SET_VRING_ENABLE, or all of them when protocol features were not
negotiated). A started but disabled ring is to be processed "without side
effects". A ring its front end switches off while it runs, of a kind the device
names (virtio-net's transmit rings, see :meth:`VirtioDevice.discards_when_disabled`),
has every buffer taken and given back unread: frames a guest queued on a queue
pair that was turned off (``ethtool -L`` to fewer pairs) are dropped, not sent
when the pair comes back. Any other disabled ring, and a ring not yet enabled
since it started, waits for its SET_VRING_ENABLE.

With INFLIGHT_SHMFD (block devices) each ring is a
:class:`~appliance.virtio.vhost_user.inflight.TrackedQueue`, which records
fetched requests in an area the front end keeps, so a daemon that is killed
and restarted resubmits what was in flight.

Everything here runs on the event loop. Messages are handled one at a time, so
no locking is needed; fds we receive are ours to close.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.kvm.memory import GuestMemory, GuestMemoryError, MemoryRegion
from appliance.virtio import eventfd
from appliance.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VirtioDevice,
)
from appliance.virtio.errors import QueueError
from appliance.virtio.queue import PASS_BUDGET, Virtqueue
from appliance.virtio.vhost_user import protocol as p
from appliance.virtio.vhost_user.errors import MemoryMapError, ProtocolError
from appliance.virtio.vhost_user.inflight import InflightArea, TrackedQueue

log = logging.getLogger(__name__)

# What we offer. QEMU 7.2's vhost-user-blk needs CONFIG (it refuses to start
# without it) and MQ for num-queues > 1; CONFIGURE_MEM_SLOTS lets it add and
# remove regions one at a time (more than 8, memory hotplug). INFLIGHT_SHMFD is
# added per back end (``inflight=True``). LOG_SHMFD and BACKEND_REQ stay off: no
# migration, no back-end-initiated messages.
PROTOCOL_FEATURES = (
    (1 << p.ProtocolFeature.MQ)
    | (1 << p.ProtocolFeature.REPLY_ACK)
    | (1 << p.ProtocolFeature.CONFIG)
    | (1 << p.ProtocolFeature.CONFIGURE_MEM_SLOTS)
)

# GET_MAX_MEM_SLOTS: how many regions ADD_MEM_REG may build up.
MAX_MEM_SLOTS = 64

MAX_QUEUE_SIZE = 32768  # virtio 1.2 §2.7: split ring sizes are powers of two up to 32768.
# Buffers a disabled ring gives back per pop (_discard), as the device takes them per pass.
_DISCARD_BATCH = 64


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class RingState:
    """What the front end told us about one ring, plus counters."""

    index: int
    num: int = 0
    addr: p.VringAddr | None = None
    base: int = 0
    kick: int = -1
    call: int = -1
    err: int = -1
    enabled: bool = False
    started: bool = False
    kicks: int = 0
    interrupts: int = 0
    discarded: int = 0  # buffers given back unread while the ring was disabled
    # Disabled by SET_VRING_ENABLE while it ran enabled (see _set_vring_enable).
    switched_off: bool = False

    def close_fds(self, *, keep_err: bool = False) -> None:
        for name in ("kick", "call") if keep_err else ("kick", "call", "err"):
            _close(getattr(self, name))
            setattr(self, name, -1)


class CallInterrupt:
    """Signals one ring through whatever call eventfd the front end set last.

    QEMU swaps a ring's call fd at run time (MSI-X vector masking), so the fd
    is looked up on every notification instead of being captured once.
    """

    def __init__(self, ring: RingState) -> None:
        self._ring = ring

    def notify(self) -> None:
        fd = self._ring.call
        if fd < 0:
            return
        self._ring.interrupts += 1
        # os.eventfd_write drops the GIL (unlike appliance.virtio.eventfd): the
        # write wakes the front end's vCPU thread, which often preempts us
        # here for a while, and the I/O pool threads should run meanwhile.
        try:
            os.eventfd_write(fd, 1)
        except OSError as err:
            # A full or closed eventfd is the front end's problem; never raise into the device.
            log.debug("call eventfd write failed on ring %d: %s", self._ring.index, err)


def seal_against_shrinking(fd: int) -> bool:
    """Forbid the front end to shrink the memfd behind guest memory (F_SEAL_SHRINK), where the
    file allows it: a page cut off under our mapping is a SIGBUS at the next touch, which no
    Python code survives. QEMU's memory-backend-memfd seals its own (seal=on, its default); a
    memfd made without MFD_ALLOW_SEALING, or a file on tmpfs or hugetlbfs, cannot be sealed,
    the same exposure libvhost-user and DPDK have. True if the seal holds."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if not seals & fcntl.F_SEAL_SHRINK:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        return False
    return True


def map_regions(regions: Sequence[p.MemRegion], fds: Sequence[int]) -> GuestMemory:
    """Map each region from its fd into a new :class:`GuestMemory`.

    The fds are not closed here (mmap keeps its own reference).

    :raises MemoryMapError: when an fd cannot be mapped, an offset is unaligned,
        or regions overlap.
    """
    mem = GuestMemory()
    try:
        for region, fd in zip(regions, fds, strict=True):
            if region.mmap_offset % mmap.ALLOCATIONGRANULARITY:
                raise MemoryMapError(f"mmap offset {region.mmap_offset:#x} is not page aligned")
            if not seal_against_shrinking(fd):
                log.debug("region at %#x: its file cannot be sealed against shrinking", region.guest_addr)
            try:
                buf = mmap.mmap(
                    fd,
                    region.size,
                    flags=mmap.MAP_SHARED,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=region.mmap_offset,
                )
            except (OSError, ValueError, OverflowError) as err:
                raise MemoryMapError(
                    f"cannot map region at {region.guest_addr:#x} ({region.size:#x} bytes)"
                ) from err
            try:
                mem.add_region(MemoryRegion(region.guest_addr, buf, user_addr=region.user_addr))
            except ValueError as err:
                buf.close()
                raise MemoryMapError("memory regions overlap") from err
    except BaseException:
        unmap(mem)
        raise
    return mem


def unmap(mem: GuestMemory) -> None:
    """Release a mapped memory table.

    A region still exported to an in-flight I/O cannot be closed now; dropping
    our references lets the mmap go when that I/O's memoryview does.
    """
    for r in mem.regions:
        try:
            r.view.release()
            if isinstance(r.buf, mmap.mmap):
                r.buf.close()
        except BufferError:
            log.debug("region at %#x still in use; unmapping when released", r.start)
    try:
        mem.close()
    except BufferError:
        pass


@dataclass
class Reply:
    """What a handler answers: a payload for the request's own reply, or an ack.

    ``fds`` ride along with the reply and are closed once sent.
    """

    payload: bytes | None = None
    fds: list[int] = field(default_factory=list)


# A framed message to send and the fds to pass with it (closed after sending).
Outgoing = tuple[bytes, list[int]]


@dataclass
class _Connection:
    features: int = 0
    protocol_features: int = 0
    features_set: bool = False
    # ADD_MEM_REG count per region (guest addr, size, user addr): QEMU's
    # multiqueue vhost-user-net drives one connection from several vhost
    # devices, each adding (and later removing) the same regions.
    region_refs: dict[tuple[int, int, int], int] = field(default_factory=dict)
    owner: bool = False
    mem: GuestMemory | None = None
    rings: list[RingState] = field(default_factory=list)


class VhostUserBackend:
    """Serves one :class:`VirtioDevice` to one front end at a time.

    :param device: the device model; it is activated with queues built from
        the front end's rings and reset when the front end goes away.
    :param num_queues: how many rings the front end may set up; defaults to the
        device's queue count.
    :param queue_num: what GET_QUEUE_NUM answers (default ``num_queues``). The
        spec says "queues"; QEMU's vhost-user netdev and DPDK's virtio-user
        compare the answer with their queue *pairs* (the net daemon's choice:
        ``appliance.cli.net_daemon.announced_queue_num``).
    :param inflight: offer INFLIGHT_SHMFD, so requests in flight when this
        process dies are resubmitted by the next one (block devices; not for
        virtio-net, whose requests must not be replayed).
    :param single_threaded: no other thread of this process wants the GIL (the
        net daemon), so kicks are read with the call that lets it go, which
        costs less with cold caches (see :mod:`appliance.virtio.eventfd`).
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        num_queues: int | None = None,
        queue_num: int | None = None,
        inflight: bool = False,
        single_threaded: bool = False,
    ) -> None:
        self.device = device
        self._clear_kick = eventfd.clear_releasing_gil if single_threaded else eventfd.clear
        self.protocol_features = PROTOCOL_FEATURES | (
            1 << p.ProtocolFeature.INFLIGHT_SHMFD if inflight else 0
        )
        # A device with a link MTU (virtio-net) takes the front end's (NET_SET_MTU: QEMU sends
        # its host_mtu= there, and without NET_MTU offered keeps it to itself, so a user-mode
        # stack behind us would build frames the guest's MTU does not allow). The device's own
        # is put back when the front end goes.
        self._set_device_mtu = getattr(device, "set_mtu", None)
        self._device_mtu = getattr(device, "mtu", None)
        self._mtu_changed = False
        if self._set_device_mtu is not None:
            self.protocol_features |= 1 << p.ProtocolFeature.NET_MTU
        self._inflight: InflightArea | None = None
        self.num_queues = device.num_queues if num_queues is None else num_queues
        self.queue_num = self.num_queues if queue_num is None else queue_num
        self._c = _Connection(rings=[RingState(i) for i in range(self.num_queues)])
        self._active: tuple[int, ...] = ()
        self._queues: list[Virtqueue] = []
        # Started but disabled rings that are emptied without being acted on, by ring index.
        self._discarding: dict[int, Virtqueue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.errors = 0
        device.on_needs_reset = self._signal_error

    # -- introspection -------------------------------------------------------

    @property
    def rings(self) -> tuple[RingState, ...]:
        return tuple(self._c.rings)

    @property
    def memory(self) -> GuestMemory | None:
        return self._c.mem

    @property
    def active_queues(self) -> tuple[int, ...]:
        """Indices of the rings the device is currently serving."""
        return self._active

    # -- message dispatch ----------------------------------------------------

    async def handle(self, header: p.Header, payload: bytes, fds: list[int]) -> Outgoing | None:
        """Handle one message; returns the framed reply (and fds) to send, if any.

        Takes ownership of ``fds``. Never raises for a bad message: the error
        becomes a failed ack (if one was asked for) and a log line.

        :raises ProtocolError: only with ``fatal`` set, when the connection must drop.
        """
        self._loop = asyncio.get_running_loop()
        fds = list(fds)
        try:
            value = p.decode(header.request, payload)
            handler = _HANDLERS[p.Request(header.request)]
            reply: Reply | None = await handler(self, value, fds)
            status = 0
        except ProtocolError as err:
            if err.fatal:
                raise
            self.errors += 1
            log.warning("vhost-user request %s refused: %s", _name(header.request), err)
            reply, status = None, 1
        except (MemoryMapError, GuestMemoryError) as err:
            self.errors += 1
            log.warning("vhost-user request %s failed: %s", _name(header.request), err)
            reply, status = None, 1
        except asyncio.CancelledError:
            raise
        except Exception:
            # A device bug (config access, activate) must not take the server down.
            self.errors += 1
            log.exception("vhost-user request %s failed in the device", _name(header.request))
            reply, status = None, 1
        finally:
            for fd in fds:
                _close(fd)
        return self._answer(header, reply, status)

    def refuse(self, header: p.Header, reason: str) -> Outgoing | None:
        """The reply for a message refused before decoding (e.g. too many fds)."""
        self.errors += 1
        log.warning("vhost-user request %s refused: %s", _name(header.request), reason)
        return self._answer(header, None, 1)

    def _answer(self, header: p.Header, reply: Reply | None, status: int) -> Outgoing | None:
        if reply is not None and reply.payload is not None:
            return p.encode(header.request, reply.payload), reply.fds
        if header.request in p.REPLYING:
            # A request that must be answered but failed: the front end treats
            # a reply of the wrong size as an error, which is what this is.
            if status:
                return p.encode(header.request, b""), []
        if header.need_reply:
            # Even without REPLY_ACK negotiated: a front end that asked is waiting.
            return p.encode(header.request, p.u64(status)), []
        return None

    # -- features ------------------------------------------------------------

    def offered_features(self) -> int:
        return self.device.device_features() | 1 << p.VHOST_USER_F_PROTOCOL_FEATURES

    async def _get_features(self, _v: object, _fds: list[int]) -> Reply:
        return Reply(p.u64(self.offered_features()))

    async def _set_features(self, value: object, _fds: list[int]) -> None:
        assert isinstance(value, int)
        offered = self.offered_features()
        if value & ~offered:
            raise ProtocolError(f"features {value & ~offered:#x} were not offered")
        if self._active and value != self._c.features:
            # Live rings were built for the old features (EVENT_IDX, INDIRECT_DESC).
            await self._deactivate()
        self._c.features = value
        self._c.features_set = True
        self.device.ack_features(value & ~(1 << p.VHOST_USER_F_PROTOCOL_FEATURES))
        if not value >> p.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            # "Ring states": without protocol features every ring is enabled at once.
            for ring in self._c.rings:
                ring.enabled = True
        await self._reconcile()

    async def _get_protocol_features(self, _v: object, _fds: list[int]) -> Reply:
        return Reply(p.u64(self.protocol_features))

    async def _set_protocol_features(self, value: object, _fds: list[int]) -> None:
        assert isinstance(value, int)
        if value & ~self.protocol_features:
            raise ProtocolError(f"protocol features {value & ~self.protocol_features:#x} were not offered")
        self._c.protocol_features = value

    # -- inflight tracking ---------------------------------------------------

    def _inflight_negotiated(self) -> bool:
        return bool(self._c.protocol_features >> p.ProtocolFeature.INFLIGHT_SHMFD & 1)

    async def _get_inflight_fd(self, value: object, _fds: list[int]) -> Reply:
        assert isinstance(value, p.Inflight)
        if not self._inflight_negotiated():
            raise ProtocolError("INFLIGHT_SHMFD was not negotiated")
        area, fd = InflightArea.create(value.num_queues, value.queue_size)
        if self._inflight is not None:
            self._inflight.close()
        self._inflight = area
        size = len(area.buf)
        return Reply(p.inflight(size, 0, value.num_queues, value.queue_size), [fd])

    async def _set_inflight_fd(self, value: object, fds: list[int]) -> None:
        assert isinstance(value, p.Inflight)
        if not self._inflight_negotiated():
            raise ProtocolError("INFLIGHT_SHMFD was not negotiated")
        if len(fds) != 1:
            raise ProtocolError(f"SET_INFLIGHT_FD needs one fd, got {len(fds)}")
        area = InflightArea.attach(fds[0], value.mmap_size, value.mmap_offset, value.num_queues, value.queue_size)
        await self._deactivate()
        if self._inflight is not None:
            self._inflight.close()
        self._inflight = area
        await self._reconcile()

    async def _net_set_mtu(self, value: object, _fds: list[int]) -> None:
        assert isinstance(value, int)
        if self._set_device_mtu is None or not self._c.protocol_features >> p.ProtocolFeature.NET_MTU & 1:
            raise ProtocolError("NET_MTU was not negotiated")
        try:
            self._set_device_mtu(value)
        except ValueError as err:
            # QEMU reports "<n>Bytes MTU not supported by the backend" and does not start.
            raise ProtocolError(str(err)) from err
        self._mtu_changed = True

    async def _get_queue_num(self, _v: object, _fds: list[int]) -> Reply:
        return Reply(p.u64(self.queue_num))

    async def _set_owner(self, _v: object, _fds: list[int]) -> None:
        self._c.owner = True

    async def _reset_owner(self, _v: object, _fds: list[int]) -> None:
        # Deprecated; the spec recommends reading it as "disable all rings"
        # (dropping connection state on it led to bugs in other back ends).
        for ring in self._c.rings:
            ring.enabled = False
        await self._reconcile()

    async def _reset_device(self, _v: object, _fds: list[int]) -> None:
        await self.reset()

    # -- memory --------------------------------------------------------------

    async def _set_mem_table(self, value: object, fds: list[int]) -> None:
        assert isinstance(value, tuple)
        regions: tuple[p.MemRegion, ...] = value
        if len(fds) != len(regions):
            raise ProtocolError(f"SET_MEM_TABLE has {len(regions)} regions but {len(fds)} fds")
        new = map_regions(regions, fds)
        self._c.region_refs = {(r.guest_addr, r.size, r.user_addr): 1 for r in regions}
        # Rings are rebuilt on the new table: their addresses are user
        # addresses, which stay valid when the table changes (hotplug).
        await self._deactivate()
        old, self._c.mem = self._c.mem, new
        if old is not None:
            unmap(old)
        await self._reconcile()

    async def _replace_memory(self, new: GuestMemory, dropped: Sequence[MemoryRegion]) -> None:
        """Swap in ``new`` (sharing surviving regions) and unmap ``dropped``."""
        await self._deactivate()
        self._c.mem = new
        if dropped:
            unmap(GuestMemory(dropped))
        await self._reconcile()

    async def _get_max_mem_slots(self, _v: object, _fds: list[int]) -> Reply:
        return Reply(p.u64(MAX_MEM_SLOTS))

    async def _add_mem_reg(self, value: object, fds: list[int]) -> None:
        assert isinstance(value, p.MemRegion)
        if len(fds) != 1:
            raise ProtocolError(f"ADD_MEM_REG needs one fd, got {len(fds)}")
        key = (value.guest_addr, value.size, value.user_addr)
        refs = self._c.region_refs
        if key in refs and self._c.mem is not None:
            refs[key] += 1  # the same region again, from another vhost device
            return
        old = self._c.mem.regions if self._c.mem is not None else ()
        if len(old) >= MAX_MEM_SLOTS:
            raise ProtocolError(f"more than {MAX_MEM_SLOTS} memory regions")
        added = map_regions([value], fds)
        new = GuestMemory(old)
        try:
            new.add_region(added.regions[0])
        except ValueError as err:
            unmap(added)
            raise MemoryMapError("memory regions overlap") from err
        refs[key] = 1
        await self._replace_memory(new, ())

    async def _rem_mem_reg(self, value: object, _fds: list[int]) -> None:
        assert isinstance(value, p.MemRegion)
        # Matched by guest address, size and user address; the fd (if any) is ignored.
        key = (value.guest_addr, value.size, value.user_addr)
        refs = self._c.region_refs
        old = self._c.mem.regions if self._c.mem is not None else ()
        gone = [r for r in old if (r.start, r.size, r.user_addr) == key]
        if not gone:
            raise ProtocolError(f"no memory region at {value.guest_addr:#x} to remove")
        refs[key] = refs.get(key, 1) - 1
        if refs[key] > 0:
            return
        del refs[key]
        await self._replace_memory(GuestMemory(r for r in old if r not in gone), gone)

    # -- rings ---------------------------------------------------------------

    def _ring(self, index: int) -> RingState:
        if index >= len(self._c.rings):
            # QEMU's -netdev vhost-user,queues=N checks N queue pairs against GET_QUEUE_NUM,
            # which counts rings (vhost-user.rst), so it sets up pairs we do not serve; a guest
            # loses what it sends on them. Say what to change.
            raise ProtocolError(
                f"ring {index} does not exist: this export serves {len(self._c.rings)} rings"
                " (start the front end with no more queues than that)"
            )
        return self._c.rings[index]

    async def _set_vring_num(self, value: object, _fds: list[int]) -> None:
        assert isinstance(value, p.VringState)
        ring = self._ring(value.index)
        n = value.num
        if n == 0 or n > MAX_QUEUE_SIZE or n & (n - 1):
            raise ProtocolError(f"ring size {n} is not a power of two up to 32768")
        ring.num = n

    async def _set_vring_addr(self, value: object, _fds: list[int]) -> None:
        assert isinstance(value, p.VringAddr)
        ring = self._ring(value.index)
        ring.addr = value
        if ring.started:
            # Moving a live ring (QEMU does this only around logging): rebuild it.
            await self._deactivate()
            await self._reconcile()

    async def _set_vring_base(self, value: object, _fds: list[int]) -> None:
        assert isinstance(value, p.VringState)
        ring = self._ring(value.index)
        if value.num > 0xFFFF:
            raise ProtocolError(f"ring base {value.num} does not fit a split ring index")
        ring.base = value.num

    async def _get_vring_base(self, value: object, _fds: list[int]) -> Reply:
        assert isinstance(value, p.VringState)
        ring = self._ring(value.index)
        if value.index in self._active:
            await self._deactivate()
        self._stop_ring(ring)
        await self._reconcile()
        return Reply(p.vring_state(ring.index, ring.base))

    async def _set_vring_kick(self, value: object, fds: list[int]) -> None:
        assert isinstance(value, p.VringFd)
        ring = self._ring(value.index)
        fd = self._take_fd(value, fds)
        if ring.kick >= 0:
            self._unwatch(ring)
            _close(ring.kick)
            ring.kick = -1
        if fd < 0:
            # The front end would poll (no kick fd, "polling should be used instead"): the
            # ring is stopped, not left started with nothing to wake it.
            ring.started = False
            await self._reconcile()
            raise ProtocolError("polling rings (no kick fd) are not supported")
        os.set_blocking(fd, False)
        try:
            asyncio.get_running_loop().add_reader(fd, self._on_kick, ring)
        except (OSError, ValueError) as err:
            _close(fd)
            raise ProtocolError(f"kick fd for ring {ring.index} cannot be watched") from err
        ring.kick = fd
        ring.started = True
        await self._reconcile()

    async def _set_vring_call(self, value: object, fds: list[int]) -> None:
        assert isinstance(value, p.VringFd)
        ring = self._ring(value.index)
        fd = self._take_fd(value, fds)
        _close(ring.call)
        ring.call = fd

    async def _set_vring_err(self, value: object, fds: list[int]) -> None:
        assert isinstance(value, p.VringFd)
        ring = self._ring(value.index)
        fd = self._take_fd(value, fds)
        _close(ring.err)
        ring.err = fd

    async def _set_vring_enable(self, value: object, _fds: list[int]) -> None:
        assert isinstance(value, p.VringState)
        ring = self._ring(value.index)
        if value.num > 1:
            raise ProtocolError(f"SET_VRING_ENABLE value {value.num} is not 0 or 1")
        # Only a ring switched off while it ran is emptied (_discards). A ring also starts
        # disabled, until its front end enables it after SET_VRING_KICK (Cloud Hypervisor, our
        # tests; QEMU restores the enable state first): what the guest queued in that moment, a
        # first DHCP DISCOVER, is sent once the ring is enabled, not dropped.
        ring.switched_off = ring.enabled and not value.num and ring.started
        ring.enabled = bool(value.num)
        await self._reconcile()

    @staticmethod
    def _take_fd(value: p.VringFd, fds: list[int]) -> int:
        if value.nofd:
            return -1
        if len(fds) != 1:
            raise ProtocolError(f"expected one fd, got {len(fds)}")
        fd = fds.pop()
        try:
            os.fstat(fd)
        except OSError as err:
            raise ProtocolError("received fd is not open") from err
        return fd

    # -- config --------------------------------------------------------------

    async def _get_config(self, value: object, _fds: list[int]) -> Reply:
        assert isinstance(value, p.ConfigAccess)
        data = self.device.read_config(value.offset, value.size)
        return Reply(p.config(value.offset, value.size, value.flags, bytes(data[: value.size])))

    async def _set_config(self, value: object, _fds: list[int]) -> None:
        assert isinstance(value, p.ConfigAccess)
        # vhost-user.rst: the flags say who writes, the front end (0) or a migration (1);
        # anything else is refused rather than acknowledged and dropped.
        if value.flags not in (0, 1):
            raise ProtocolError(f"SET_CONFIG flags {value.flags:#x} are not defined")
        self.device.write_config(value.offset, value.data)

    # -- refused -------------------------------------------------------------

    async def _refuse(self, _v: object, _fds: list[int]) -> None:
        raise ProtocolError("not supported by this back end")

    # -- kicks, activation ---------------------------------------------------

    def _on_kick(self, ring: RingState) -> None:
        err = self._clear_kick(ring.kick)
        if err == errno.EAGAIN:
            return
        if err:
            # The fd went bad under us; stop watching rather than spin.
            self._unwatch(ring)
            return
        ring.kicks += 1
        if ring.index in self._active:
            try:
                self.device.queue_notify(ring.index)
            except Exception:  # the device must not take the loop down
                log.exception("device failed handling a notify on queue %d", ring.index)
                self.device.fail("notify handler raised")
        elif ring.index in self._discarding:
            self._discard(ring)

    def _discard(self, ring: RingState) -> None:
        """Give back every buffer of a disabled ring unread, and interrupt if the driver asks."""
        q = self._discarding[ring.index]
        budget = PASS_BUDGET
        try:
            while True:
                batch = q.pop_buffers(_DISCARD_BATCH, False)
                if batch:
                    q.push_used_heads([head for head, _views, _n in batch])
                    ring.discarded += len(batch)
                    budget -= len(batch)
                    if budget <= 0:
                        asyncio.get_running_loop().call_soon(self._discard_again, ring)  # the rest later
                        break
                    if len(batch) == _DISCARD_BATCH:
                        continue
                if not q.enable_notification():
                    break
        except QueueError as err:
            # Guest-controlled: a broken ring is left alone, as the device leaves its own.
            log.warning("disabled ring %d broken, no longer emptied: %s", ring.index, err)
            self._stop_discarding(ring.index)
            return
        if q.needs_notification():
            CallInterrupt(ring).notify()

    def _discard_again(self, ring: RingState) -> None:
        if self._discarding.get(ring.index) is not None:
            self._discard(ring)

    def _discards(self, ring: RingState) -> bool:
        return (
            self._c.mem is not None
            and self._c.features_set
            and ring.started
            and ring.switched_off
            and ring.addr is not None
            and ring.num > 0
            and self._inflight is None
            and self.device.discards_when_disabled(ring.index)
        )

    def _sync_discarding(self) -> None:
        """Empty the disabled rings that :meth:`_discards` names, and only those."""
        for i in [i for i in self._discarding if not self._discards(self._c.rings[i])]:
            self._stop_discarding(i)
        mem = self._c.mem
        for ring in self._c.rings:
            if ring.index in self._discarding or not self._discards(ring):
                continue
            assert mem is not None
            try:
                self._discarding[ring.index] = self._build_queue(mem, ring)
            except (GuestMemoryError, QueueError) as err:
                log.warning("disabled ring %d is not in guest memory: %s", ring.index, err)
                continue
            self._discard(ring)  # what the driver queued before it was disabled

    def _stop_discarding(self, index: int) -> None:
        q = self._discarding.pop(index, None)
        if q is not None:
            # Where the device (or GET_VRING_BASE) takes over from.
            self._c.rings[index].base = int(q.last_avail_idx) & 0xFFFF
            q.close()

    def _unwatch(self, ring: RingState) -> None:
        if ring.kick >= 0 and self._loop is not None:
            try:
                self._loop.remove_reader(ring.kick)
            except (OSError, ValueError):
                pass

    def _stop_ring(self, ring: RingState, *, keep_err: bool = True) -> None:
        # The error fd outlives a stop: QEMU sends SET_VRING_ERR once, when it sets the
        # ring up (vhost_virtqueue_init), and then stops and restarts it at every reboot.
        self._unwatch(ring)
        self._stop_discarding(ring.index)
        ring.close_fds(keep_err=keep_err)
        ring.started = ring.switched_off = False

    def _wanted(self) -> tuple[int, ...]:
        """The contiguous run of started, enabled, fully described rings from ring 0."""
        out: list[int] = []
        if self._c.mem is None:
            return ()
        for ring in self._c.rings:
            if not (ring.started and ring.enabled and ring.addr is not None and ring.num):
                break
            out.append(ring.index)
        return tuple(out)

    async def _deactivate(self) -> None:
        """Quiesce the device and save each live ring's next avail index."""
        for i in list(self._discarding):
            self._stop_discarding(i)  # their views go before the memory they point into
        if not self._active:
            return
        # Kicks that arrive while we wait are not passed on, so the avail
        # indices stop moving; the next activation looks at every ring again.
        active, queues = self._active, self._queues
        self._active, self._queues = (), []
        await self.device.quiesce()
        for i, q in zip(active, queues, strict=True):
            self._c.rings[i].base = int(q.last_avail_idx) & 0xFFFF
            q.close()
        self.device.reset()
        if self._c.features_set:
            self.device.ack_features(self._c.features & ~(1 << p.VHOST_USER_F_PROTOCOL_FEATURES))

    async def _reconcile(self) -> None:
        wanted = self._wanted()
        if wanted != self._active:
            await self._activate(wanted)
        self._sync_discarding()

    async def _activate(self, wanted: tuple[int, ...]) -> None:
        # _deactivate also stops emptying the disabled rings, saving where each got to: a ring
        # enabled since continues from there (its base).
        await self._deactivate()
        if not wanted:
            return
        mem = self._c.mem
        assert mem is not None
        try:
            queues = [self._build_queue(mem, self._c.rings[i]) for i in wanted]
        except (GuestMemoryError, QueueError) as err:
            # Rings that do not lie in the shared memory: leave the device idle.
            raise ProtocolError("a ring lies outside the memory table") from err
        interrupts = [CallInterrupt(self._c.rings[i]) for i in wanted]
        self.device.activate(mem, queues, interrupts)
        self._queues = queues
        self._active = wanted
        # Pick up anything the driver queued while the ring was not served.
        for i in wanted:
            try:
                self.device.queue_notify(i)
            except Exception:
                log.exception("device failed its first notify on queue %d", i)
                self.device.fail("notify handler raised")

    def _build_queue(self, mem: GuestMemory, ring: RingState) -> Virtqueue:
        addr = ring.addr
        assert addr is not None
        n = ring.num
        desc = mem.translate_user(addr.desc, 16 * n)
        avail = mem.translate_user(addr.avail, 6 + 2 * n)
        used = mem.translate_user(addr.used, 6 + 8 * n)
        event_idx = self.device.has_feature(VIRTIO_F_EVENT_IDX)
        indirect = self.device.has_feature(VIRTIO_F_INDIRECT_DESC)
        region = None
        if self._inflight is not None:
            if self._inflight.queue_size == n:
                region = self._inflight.region(ring.index)
            else:
                # The area's slots are laid out for queue_size descriptors (GET_INFLIGHT_FD).
                log.warning("ring %d has %d descriptors, the inflight area %d: not tracked",
                            ring.index, n, self._inflight.queue_size)
        q: Virtqueue
        if region is not None:
            q = TrackedQueue(mem, n, desc, avail, used, region=region, event_idx=event_idx, indirect=indirect)
        else:
            q = Virtqueue(mem, n, desc, avail, used, event_idx=event_idx, indirect=indirect)
        # The used index continues from what the ring holds; the avail index
        # from what the front end says (SET_VRING_BASE).
        q.last_avail_idx = ring.base
        return q

    def _signal_error(self) -> None:
        for ring in self._c.rings:
            if ring.err >= 0:
                try:
                    os.eventfd_write(ring.err, 1)
                except OSError:
                    pass

    # -- teardown ------------------------------------------------------------

    async def reset(self) -> None:
        """Stop every ring and forget the negotiation (RESET_DEVICE, disconnect).

        The connection state is replaced even when the device fails to quiesce, so the next
        front end never meets this one's rings, fds or memory.
        """
        try:
            await self._deactivate()
        finally:
            for ring in self._c.rings:
                self._stop_ring(ring, keep_err=False)
            try:
                self.device.reset()
                if self._mtu_changed and self._set_device_mtu is not None:
                    self._mtu_changed = False
                    self._set_device_mtu(self._device_mtu)
            finally:
                self._active, self._queues = (), []
                if self._c.mem is not None:
                    unmap(self._c.mem)
                if self._inflight is not None:
                    self._inflight.close()
                    self._inflight = None
                self._c = _Connection(rings=[RingState(i) for i in range(self.num_queues)])

    async def disconnect(self) -> None:
        """The front end went away: stop rings, unmap memory, be ready for the next one."""
        try:
            await self.reset()
        except Exception:
            log.exception("error while cleaning up after a front end")


def _name(request: int) -> str:
    try:
        return p.Request(request).name
    except ValueError:
        return str(request)


_Handler = Any
_HANDLERS: dict[p.Request, _Handler] = {
    p.Request.GET_FEATURES: VhostUserBackend._get_features,
    p.Request.SET_FEATURES: VhostUserBackend._set_features,
    p.Request.GET_PROTOCOL_FEATURES: VhostUserBackend._get_protocol_features,
    p.Request.SET_PROTOCOL_FEATURES: VhostUserBackend._set_protocol_features,
    p.Request.GET_QUEUE_NUM: VhostUserBackend._get_queue_num,
    p.Request.SET_OWNER: VhostUserBackend._set_owner,
    p.Request.RESET_OWNER: VhostUserBackend._reset_owner,
    p.Request.SET_MEM_TABLE: VhostUserBackend._set_mem_table,
    p.Request.SET_VRING_NUM: VhostUserBackend._set_vring_num,
    p.Request.SET_VRING_ADDR: VhostUserBackend._set_vring_addr,
    p.Request.SET_VRING_BASE: VhostUserBackend._set_vring_base,
    p.Request.GET_VRING_BASE: VhostUserBackend._get_vring_base,
    p.Request.SET_VRING_KICK: VhostUserBackend._set_vring_kick,
    p.Request.SET_VRING_CALL: VhostUserBackend._set_vring_call,
    p.Request.SET_VRING_ERR: VhostUserBackend._set_vring_err,
    p.Request.SET_VRING_ENABLE: VhostUserBackend._set_vring_enable,
    p.Request.GET_CONFIG: VhostUserBackend._get_config,
    p.Request.SET_CONFIG: VhostUserBackend._set_config,
    # We never offer VHOST_F_LOG_ALL or LOG_SHMFD, so logging is refused.
    p.Request.SET_LOG_BASE: VhostUserBackend._refuse,
    p.Request.SET_LOG_FD: VhostUserBackend._refuse,
    p.Request.RESET_DEVICE: VhostUserBackend._reset_device,
    p.Request.GET_MAX_MEM_SLOTS: VhostUserBackend._get_max_mem_slots,
    p.Request.ADD_MEM_REG: VhostUserBackend._add_mem_reg,
    p.Request.REM_MEM_REG: VhostUserBackend._rem_mem_reg,
    p.Request.NET_SET_MTU: VhostUserBackend._net_set_mtu,
    p.Request.GET_INFLIGHT_FD: VhostUserBackend._get_inflight_fd,
    p.Request.SET_INFLIGHT_FD: VhostUserBackend._set_inflight_fd,
    p.Request.SET_STATUS: VhostUserBackend._refuse,
    p.Request.GET_STATUS: VhostUserBackend._refuse,
}
