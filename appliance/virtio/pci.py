"""The modern virtio-pci transport (virtio 1.2 §4.1): a virtio device as a PCI function.

Layout. One 64-bit memory BAR (BAR 4) holds the four virtio structures the
capabilities point at: common config at 0x0000, ISR at 0x1000, device config at
0x2000 and the notify area at 0x3000, where queue ``i`` has its own doorbell at
``4 * i`` (notify_off_multiplier 4) so every queue gets its own ioeventfd. The
MSI-X table and PBA live in BAR 2. A VIRTIO_PCI_CAP_PCI_CFG window (§4.1.4.9)
gives the alternative access the spec requires.

Threads. Config and BAR accesses arrive on vCPU threads and are serialised by
``self._lock``. Anything that touches the device model (activation, reset,
queue notifications) runs on the asyncio loop: activation and reset are handed
over with ``call_soon_threadsafe``, and doorbells arrive as ioeventfds read by
``loop.add_reader``. A status write of 0 keeps reading back the old status until
the loop has reset the device, which is what the driver waits for (§4.1.4.3.2).

The guest is hostile: bad queue sizes or ring addresses put the device into
DEVICE_NEEDS_RESET at DRIVER_OK, out-of-range selectors read as 0 and are
otherwise ignored, and nothing raises out of a vCPU exit or the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance.kvm.memory import GuestMemory
from appliance.pci.config import CAP_ID_VENDOR, COMMAND, COMMAND_BUS_MASTER, BarKind
from appliance.pci.device import PciDevice
from appliance.pci.irq import MsiPlatform
from appliance.pci.msix import Msix
from appliance.virtio import eventfd
from appliance.virtio.device import (
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)

if TYPE_CHECKING:
    from appliance.virtio.queue import Virtqueue

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040  # §4.1.2.1: 0x1040 + virtio device id
VIRTIO_PCI_SUBSYSTEM_ID = 0x1100        # QEMU's, so guests see a familiar environment
VIRTIO_PCI_REVISION = 1                 # §4.1.2.1: modern-only devices have revision >= 1
NO_VECTOR = 0xFFFF

# §4.1.4: virtio_pci_cap cfg_type values.
CAP_COMMON_CFG = 1
CAP_NOTIFY_CFG = 2
CAP_ISR_CFG = 3
CAP_DEVICE_CFG = 4
CAP_PCI_CFG = 5

VIRTIO_BAR = 4
MSIX_BAR = 2
COMMON_OFFSET = 0x0000
COMMON_SIZE = 0x38
ISR_OFFSET = 0x1000
DEVICE_CFG_OFFSET = 0x2000
DEVICE_CFG_SIZE = 0x1000
NOTIFY_OFFSET = 0x3000
NOTIFY_MULTIPLIER = 4
NOTIFY_SPAN = 0x1000
VIRTIO_BAR_SIZE = 0x4000
MAX_QUEUES = NOTIFY_SPAN // NOTIFY_MULTIPLIER

# ISR status bits (§4.1.4.5).
ISR_QUEUE = 1
ISR_CONFIG = 2

# What this transport can carry: the device-type ranges (bits 0-23 and 50-63;
# §6) plus the ring features our split virtqueue implements and VERSION_1.
TRANSPORT_FEATURES = (
    ((1 << 24) - 1)
    | (1 << VIRTIO_F_INDIRECT_DESC)
    | (1 << VIRTIO_F_EVENT_IDX)
    | (1 << VIRTIO_F_VERSION_1)
    | (((1 << 64) - 1) & ~((1 << 50) - 1))
)

# PCI class codes per virtio device id (base class, subclass, prog-if), as
# guests expect them from QEMU's virtio devices.
_CLASS_BY_DEVICE = {
    1: 0x020000,   # network: Ethernet controller
    2: 0x010000,   # block: mass storage, SCSI
    3: 0x078000,   # console: simple communication, other
    8: 0x010000,   # scsi
    16: 0x038000,  # gpu: display, other
    18: 0x098000,  # input: input device, other
}
_CLASS_OTHER = 0xFF0000

# §4.1.4.3 struct virtio_pci_common_cfg.
_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQ")
assert _COMMON.size == COMMON_SIZE
_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("device_feature_select", 0x00, 4),
    ("device_feature", 0x04, 4),
    ("driver_feature_select", 0x08, 4),
    ("driver_feature", 0x0C, 4),
    ("config_msix_vector", 0x10, 2),
    ("num_queues", 0x12, 2),
    ("device_status", 0x14, 1),
    ("config_generation", 0x15, 1),
    ("queue_select", 0x16, 2),
    ("queue_size", 0x18, 2),
    ("queue_msix_vector", 0x1A, 2),
    ("queue_enable", 0x1C, 2),
    ("queue_notify_off", 0x1E, 2),
    ("queue_desc", 0x20, 8),
    ("queue_driver", 0x28, 8),
    ("queue_device", 0x30, 8),
)


class _QueueState:
    """What the driver has told us about one queue; copied out, checked at DRIVER_OK."""

    __slots__ = ("max_size", "size", "msix_vector", "enabled", "desc", "driver", "device", "efd")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.efd = -1
        self.clear()

    def clear(self) -> None:
        self.size = self.max_size
        self.msix_vector = NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0


class _QueueInterrupt:
    """The :class:`Interrupt` a device gets for one queue: its MSI-X vector."""

    __slots__ = ("_transport", "_queue")

    def __init__(self, transport: VirtioPciTransport, queue: _QueueState) -> None:
        self._transport = transport
        self._queue = queue

    def notify(self) -> None:
        msix = self._transport.msix
        if msix is not None and msix.enabled:
            vector = self._queue.msix_vector
            if vector != NO_VECTOR:
                msix.notify(vector)
        else:
            # Without MSI-X the spec wants INTx and the ISR bit; we have no INTx
            # line, so a polling driver sees the ISR bit only.
            self._transport.raise_isr(ISR_QUEUE)


def pci_class_for(device_id: int) -> int:
    return _CLASS_BY_DEVICE.get(device_id, _CLASS_OTHER)


class VirtioPciTransport(PciDevice):
    """A :class:`VirtioDevice` behind the modern virtio-pci interface.

    :param device: the device model.
    :param mem: guest RAM, for the rings built at DRIVER_OK.
    :param platform: GSI routing, irqfds and ioeventfds (the KVM ``Vm``).
    :param loop: the loop the device model runs on.
    :param name: for log lines.
    :param queue_factory: builds a device-side queue (tests may substitute).
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        mem: GuestMemory,
        platform: MsiPlatform | None,
        loop: asyncio.AbstractEventLoop,
        name: str | None = None,
        queue_factory: Callable[..., Virtqueue] | None = None,
    ) -> None:
        super().__init__(
            name or f"virtio-{device.device_id}",
            vendor_id=VIRTIO_PCI_VENDOR,
            device_id=VIRTIO_PCI_MODERN_DEVICE_BASE + device.device_id,
            class_code=pci_class_for(device.device_id),
            revision=VIRTIO_PCI_REVISION,
            subsystem_vendor_id=VIRTIO_PCI_VENDOR,
            subsystem_id=VIRTIO_PCI_SUBSYSTEM_ID,
        )
        if not 1 <= device.num_queues <= MAX_QUEUES:
            raise ValueError(f"virtio-pci carries 1..{MAX_QUEUES} queues")
        self.device = device
        self.mem = mem
        self.platform = platform
        self.loop = loop
        self._queue_factory = queue_factory
        self._lock = threading.RLock()
        self._queues = [_QueueState(device.max_queue_size(i)) for i in range(device.num_queues)]
        self._notify_base: int | None = None
        self._isr: int = 0
        self._reset_transport_state()
        self.config_generation = 0
        self._epoch = 0
        self._active = False
        self._readers: list[int] = []
        self._closed = False
        self.kicks = 0
        # Doorbells that arrived as MMIO exits rather than through an ioeventfd.
        self.mmio_doorbells = 0

        self.add_bar(VIRTIO_BAR, VIRTIO_BAR_SIZE, kind=BarKind.MEM64)
        vectors = device.num_queues + 1
        table = vectors * 16
        pba = (vectors + 63) // 64 * 8
        msix_bar_size = 0x1000
        while msix_bar_size < table + pba:
            msix_bar_size <<= 1
        self.add_bar(MSIX_BAR, msix_bar_size, kind=BarKind.MEM64)
        self.add_msix(
            Msix(vectors, bar=MSIX_BAR, table_offset=0, pba_offset=table, platform=platform)
        )
        self._add_virtio_cap(CAP_COMMON_CFG, COMMON_OFFSET, COMMON_SIZE)
        self._add_virtio_cap(
            CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * device.num_queues,
            extra=struct.pack("<I", NOTIFY_MULTIPLIER),
        )
        self._add_virtio_cap(CAP_ISR_CFG, ISR_OFFSET, 1)
        self._add_virtio_cap(CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE)
        self._pci_cfg = self._add_virtio_cap(
            CAP_PCI_CFG, 0, 0, extra=bytes(4), bar=0, writable=True
        )
        self.watch_config(self._pci_cfg + 16, 4, self._pci_cfg_data_written)
        self._bus_master = False
        self.watch_config(COMMAND, 2, self._command_written)

        device.on_config_change = self._config_changed
        device.on_needs_reset = self._needs_reset_raised

    def _command_written(self) -> None:
        """Bus mastering turned off stops a running device: we reset it.

        Linux turns it off for every device at kexec (pci_device_shutdown), and kernels
        before 6.14 do not reset virtio devices on the way down: the memory the rings and
        buffers lie in belongs to the next kernel. QEMU stops the device then too, by
        clearing DRIVER_OK (its status then still reads the other bits, where ours reads
        0); the next driver resets the device before use either way.
        """
        master = bool(self.config.get(COMMAND, 2) & COMMAND_BUS_MASTER)
        was, self._bus_master = self._bus_master, master
        if was and not master:
            # On the loop: this runs under the config lock, which the status path may take
            # inside the transport's own lock.
            self._to_loop(self._stop_for_bus_master)

    def _stop_for_bus_master(self) -> None:
        with self._lock:
            if self._bus_master or not self._status & STATUS_DRIVER_OK:
                return
            log.info("%s: bus mastering turned off; device stopped", self.name)
            self._start_reset()

    # -- capabilities ---------------------------------------------------------------

    def _add_virtio_cap(
        self, cfg_type: int, offset: int, length: int, *, extra: bytes = b"",
        bar: int = VIRTIO_BAR, writable: bool = False,
    ) -> int:
        # struct virtio_pci_cap after cap_vndr/cap_next: cap_len, cfg_type, bar,
        # id, padding[2], offset, length (§4.1.4).
        body = struct.pack("<BBBB2xII", 16 + len(extra), cfg_type, bar, 0, offset, length) + extra
        wmask = None
        if writable:
            # VIRTIO_PCI_CAP_PCI_CFG: the driver chooses bar, offset, length, data.
            wmask = struct.pack("<BBBB2xII", 0, 0, 0xFF, 0, 0xFFFF_FFFF, 0xFFFF_FFFF) + b"\xff" * 4
        return self.config.add_capability(CAP_ID_VENDOR, body, wmask)

    def _pci_cfg_window(self) -> tuple[int, int, int] | None:
        at = self._pci_cfg
        bar = self.config.get(at + 4, 1)
        offset = self.config.get(at + 8, 4)
        length = self.config.get(at + 12, 4)
        if length not in (1, 2, 4) or offset % length or bar > 5:
            return None
        return bar, offset, length

    def _pci_cfg_data_written(self) -> None:
        window = self._pci_cfg_window()
        if window is not None:
            bar, offset, length = window
            data = self.config.get(self._pci_cfg + 16, length).to_bytes(length, "little")
            self.bar_write(bar, offset, data)

    def config_read(self, offset: int, size: int) -> int:
        data_at = self._pci_cfg + 16
        if offset < data_at + 4 and data_at < offset + size:
            with self._config_lock:
                window = self._pci_cfg_window()
                if window is not None:
                    bar, bar_offset, length = window
                    data = self.bar_read(bar, bar_offset, length).ljust(4, b"\0")
                    self.config.set_bytes(data_at, data)
        return super().config_read(offset, size)

    # -- BAR 4 accesses (vCPU threads) ------------------------------------------------

    def read_bar(self, index: int, offset: int, size: int) -> bytes:
        if index != VIRTIO_BAR or size not in (1, 2, 4, 8):
            return b"\xff" * size
        if COMMON_OFFSET <= offset and offset + size <= COMMON_OFFSET + COMMON_SIZE:
            with self._lock:
                image = self._common_image()
            at = offset - COMMON_OFFSET
            return image[at : at + size]
        if offset == ISR_OFFSET and size == 1:
            with self._lock:
                isr, self._isr = self._isr, 0
            return bytes([isr])
        if DEVICE_CFG_OFFSET <= offset and offset + size <= DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE:
            data = self.device.read_config(offset - DEVICE_CFG_OFFSET, size)
            return bytes(data[:size]).ljust(size, b"\0")
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_SPAN:
            return bytes(size)
        return b"\xff" * size

    def write_bar(self, index: int, offset: int, data: bytes) -> None:
        size = len(data)
        if index != VIRTIO_BAR or size not in (1, 2, 4, 8):
            return
        if COMMON_OFFSET <= offset and offset + size <= COMMON_OFFSET + COMMON_SIZE:
            with self._lock:
                self._common_write(offset - COMMON_OFFSET, data)
        elif DEVICE_CFG_OFFSET <= offset and offset + size <= DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE:
            self.device.write_config(offset - DEVICE_CFG_OFFSET, bytes(data))
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * len(self._queues):
            # A doorbell that reached us as an MMIO exit (no ioeventfd yet, or a
            # write wider than it covers): ring the queue's eventfd instead.
            index = (offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER
            with self._lock:
                self.mmio_doorbells += 1
                efd = self._queues[index].efd
                if efd >= 0:
                    os.eventfd_write(efd, 1)

    # -- common config ------------------------------------------------------------------

    def _reset_transport_state(self) -> None:
        self._device_feature_select = 0
        self._driver_feature_select = 0
        self._driver_features = 0
        self._config_vector = NO_VECTOR
        self._status = 0
        self._queue_select = 0
        self._isr = 0
        self._needs_reset = False
        self._reset_pending = False
        self._reset_task: asyncio.Task[None] | None = None  # a reset waiting for the device to go quiet
        for q in self._queues:
            q.clear()

    def offered_features(self) -> int:
        offered = (self.device.device_features() | 1 << VIRTIO_F_VERSION_1) & TRANSPORT_FEATURES
        return offered & ~self.device.features_off | 1 << VIRTIO_F_VERSION_1

    def status(self) -> int:
        with self._lock:
            return self._status_value()

    def _status_value(self) -> int:
        return self._status | (STATUS_DEVICE_NEEDS_RESET if self._needs_reset else 0)

    def _selected(self) -> _QueueState | None:
        if self._queue_select < len(self._queues):
            return self._queues[self._queue_select]
        return None

    def _common_image(self) -> bytes:
        q = self._selected()
        select = self._device_feature_select
        device_word = self.offered_features() >> (32 * select) & 0xFFFF_FFFF if select < 2 else 0
        dselect = self._driver_feature_select
        driver_word = self._driver_features >> (32 * dselect) & 0xFFFF_FFFF if dselect < 2 else 0
        return _COMMON.pack(
            self._device_feature_select,
            device_word,
            self._driver_feature_select,
            driver_word,
            self._config_vector,
            len(self._queues),
            self._status_value(),
            self.config_generation & 0xFF,
            self._queue_select,
            q.size if q else 0,
            q.msix_vector if q else NO_VECTOR,
            int(q.enabled) if q else 0,
            self._queue_select if q else 0,
            q.desc if q else 0,
            q.driver if q else 0,
            q.device if q else 0,
        )

    def _common_write(self, at: int, data: bytes) -> None:
        if self._reset_pending:
            return  # the driver must wait for the reset to finish (§4.1.4.3.2)
        image = bytearray(self._common_image())
        image[at : at + len(data)] = data
        for name, start, width in _FIELDS:
            if at < start + width and start < at + len(data):
                value = int.from_bytes(image[start : start + width], "little")
                handler = getattr(self, f"_set_{name}", None)
                if handler is not None:
                    handler(value)

    def _vector_or_none(self, value: int) -> int:
        msix = self.msix
        # §4.1.5.1.2: a vector the device cannot map reads back as NO_VECTOR.
        return value if msix is not None and value < msix.vectors else NO_VECTOR

    def _set_device_feature_select(self, value: int) -> None:
        self._device_feature_select = value

    def _set_driver_feature_select(self, value: int) -> None:
        self._driver_feature_select = value

    def _set_driver_feature(self, value: int) -> None:
        select = self._driver_feature_select
        if select >= 2 or self._status & STATUS_FEATURES_OK:
            return
        shift = 32 * select
        self._driver_features = (self._driver_features & ~(0xFFFF_FFFF << shift)) | value << shift

    def _set_config_msix_vector(self, value: int) -> None:
        self._config_vector = self._vector_or_none(value)

    def _set_queue_select(self, value: int) -> None:
        self._queue_select = value

    def _writable_queue(self) -> _QueueState | None:
        q = self._selected()
        if q is None or q.enabled or self._status & STATUS_DRIVER_OK:
            return None
        return q

    def _set_queue_size(self, value: int) -> None:
        # Guest-controlled: stored as written, validated when the queue is built.
        q = self._writable_queue()
        if q is not None:
            q.size = value

    def _set_queue_msix_vector(self, value: int) -> None:
        q = self._selected()
        if q is not None:
            q.msix_vector = self._vector_or_none(value)

    def _set_queue_desc(self, value: int) -> None:
        q = self._writable_queue()
        if q is not None:
            q.desc = value

    def _set_queue_driver(self, value: int) -> None:
        q = self._writable_queue()
        if q is not None:
            q.driver = value

    def _set_queue_device(self, value: int) -> None:
        q = self._writable_queue()
        if q is not None:
            q.device = value

    def _set_queue_enable(self, value: int) -> None:
        q = self._writable_queue()
        if q is None or value != 1:
            return  # §4.1.4.3.2: the driver must not write 0; we ignore it
        q.enabled = True
        self._open_doorbell(self._queue_select, q)

    def _set_device_status(self, value: int) -> None:
        if value == 0:
            self._start_reset()
            return
        old = self._status
        new = old | value  # the driver may not clear bits except by reset (§2.1.2)
        new &= ~STATUS_DEVICE_NEEDS_RESET
        if new & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            if not self._features_acceptable():
                new &= ~STATUS_FEATURES_OK
            else:
                self._call_device(self.device.ack_features, self._driver_features)
        if new & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            if not new & STATUS_FEATURES_OK:
                new &= ~STATUS_DRIVER_OK
            else:
                self._status = new
                self._to_loop(self._activate, self._epoch)
        self._status = new

    def _features_acceptable(self) -> bool:
        wanted = self._driver_features
        if wanted & ~self.offered_features():
            log.info("%s: driver asked for unoffered features %#x", self.name,
                     wanted & ~self.offered_features())
            return False
        # Legacy drivers are not served: a modern device may refuse them (§6.1).
        return bool(wanted >> VIRTIO_F_VERSION_1 & 1)

    def _call_device(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s: device call failed", self.name)

    # -- doorbells ---------------------------------------------------------------------

    def _notify_address(self, index: int) -> int | None:
        if self._notify_base is None:
            return None
        return self._notify_base + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * index

    def _open_doorbell(self, index: int, q: _QueueState) -> None:
        if q.efd < 0:
            q.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._attach_ioeventfd(index, q)

    def _attach_ioeventfd(self, index: int, q: _QueueState) -> None:
        addr = self._notify_address(index)
        if addr is None or self.platform is None or q.efd < 0:
            return
        try:
            # Length 0 matches a doorbell write of any width (KVM_CAP_IOEVENTFD_ANY_LENGTH).
            self.platform.add_ioeventfd(addr, 0, q.efd)
        except Exception:
            log.warning("%s: ioeventfd for queue %d failed; doorbells will exit", self.name, index)

    def _detach_ioeventfd(self, index: int, q: _QueueState, base: int | None) -> None:
        if base is None or self.platform is None or q.efd < 0:
            return
        try:
            self.platform.remove_ioeventfd(base + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * index, 0, q.efd)
        except Exception:
            log.debug("%s: ioeventfd removal for queue %d failed", self.name, index)

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        if index != VIRTIO_BAR:
            return
        with self._lock:
            for i, q in enumerate(self._queues):
                self._detach_ioeventfd(i, q, old)
            self._notify_base = new
            for i, q in enumerate(self._queues):
                self._attach_ioeventfd(i, q)

    @property
    def active(self) -> bool:
        """The device model has been activated (DRIVER_OK processed on the loop)."""
        return self._active

    def doorbell_fd(self, index: int) -> int:
        """The eventfd behind queue ``index`` 's doorbell (-1 until enabled)."""
        return self._queues[index].efd

    # -- interrupts ----------------------------------------------------------------------

    def raise_isr(self, bits: int) -> None:
        with self._lock:
            self._isr |= bits

    def _config_changed(self) -> None:
        with self._lock:
            self.config_generation += 1
            self._isr |= ISR_CONFIG
            vector = self._config_vector
        msix = self.msix
        if msix is not None and msix.enabled and vector != NO_VECTOR:
            msix.notify(vector)

    def _needs_reset_raised(self) -> None:
        with self._lock:
            self._needs_reset = True
        # §2.1.2: the device should send a configuration change notification.
        self._config_changed()

    def _fail(self, reason: str) -> None:
        self.device.fail(reason)

    # -- the loop side: activation, kicks, reset -------------------------------------------

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def _to_loop(self, fn: Callable[..., None], *args: object) -> None:
        if self._on_loop():
            fn(*args)
        else:
            try:
                self.loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:
                log.warning("%s: loop is closed; dropped %s", self.name, fn.__name__)

    def _activate(self, epoch: int) -> None:
        with self._lock:
            if epoch != self._epoch or self._active or self._reset_pending:
                return
            self._active = True
            plan: list[tuple[int, _QueueState]] = []
            for i, q in enumerate(self._queues):
                if not q.enabled:
                    break
                plan.append((i, q))
            enabled_later = [i for i, q in enumerate(self._queues[len(plan):]) if q.enabled]
            event_idx = bool(self._driver_features >> VIRTIO_F_EVENT_IDX & 1)
            indirect = bool(self._driver_features >> VIRTIO_F_INDIRECT_DESC & 1)
            configs = [(i, q.size, q.desc, q.driver, q.device) for i, q in plan]
        if enabled_later:
            log.info("%s: queues after the first disabled one are not served", self.name)
        factory = self._queue_factory
        if factory is None:
            from appliance.virtio.queue import Virtqueue

            factory = Virtqueue
        queues: list[Virtqueue] = []
        for i, size, desc, driver, device in configs:
            if size > self._queues[i].max_size:
                self._fail(f"queue {i} size {size} exceeds the maximum")
                return
            # Guest-controlled: size, alignment and ring placement are checked
            # by the queue; any refusal makes this device (only) need a reset.
            try:
                queues.append(
                    factory(self.mem, size, desc, driver, device,
                            event_idx=event_idx, indirect=indirect)
                )
            except Exception as err:
                self._fail(f"queue {i} cannot be set up: {err}")
                return
        interrupts = [_QueueInterrupt(self, q) for _, q in plan]
        for i, q in plan:
            if q.efd >= 0:
                self.loop.add_reader(q.efd, self._on_kick, i, q.efd, epoch)
                self._readers.append(q.efd)
        try:
            self.device.activate(self.mem, queues, interrupts)
        except Exception as err:
            log.exception("%s: activation failed", self.name)
            self._fail(f"activation failed: {type(err).__name__}")
            return
        # Doorbells rung before DRIVER_OK are waiting in the eventfds; the
        # readers just added see them on the next loop iteration.

    def _on_kick(self, index: int, efd: int, epoch: int) -> None:
        if eventfd.clear(efd):
            return  # nothing pending (or the fd went away in a reset)
        if epoch != self._epoch or self.device.needs_reset:
            return
        self.kicks += 1
        try:
            self.device.queue_notify(index)
        except Exception as err:
            log.exception("%s: queue %d processing failed", self.name, index)
            self._fail(f"queue {index} processing raised {type(err).__name__}")

    def _start_reset(self) -> None:
        if self._reset_pending:
            return
        self._epoch += 1
        if not self._active and not self._status & STATUS_DRIVER_OK:
            # Nothing runs on the loop for this device yet: reset right here, so
            # the driver's next read already sees 0.
            self._finish_reset()
            return
        self._reset_pending = True
        self._to_loop(self._begin_reset, self._epoch)

    def _begin_reset(self, epoch: int) -> None:
        """On the loop: doorbells off, then the reset once nothing is in flight.

        Linux's vp_reset writes 0 and polls the status until it reads 0, and takes that to
        mean the device has stopped writing to guest memory: it then frees the rings and the
        buffers. A virtio-blk read still in flight must land before the status reads 0, not
        in pages the guest has since reused (QEMU drains the disk in its reset the same way).
        """
        if epoch != self._epoch or self._closed:
            return  # closed (or reset by close) since it was asked for
        if not self.device.busy():
            self._finish_reset()  # which takes the doorbells off itself
            return
        self._stop_doorbells()
        self._reset_task = self.loop.create_task(self._reset_when_quiet(epoch))

    async def _reset_when_quiet(self, epoch: int) -> None:
        try:
            await self.device.quiesce()
        except Exception:
            log.exception("%s: quiesce before reset failed", self.name)
        if epoch == self._epoch and not self._closed:
            self._finish_reset()

    def _stop_doorbells(self) -> None:
        for efd in self._readers:
            try:
                self.loop.remove_reader(efd)
            except Exception:
                log.debug("%s: remove_reader failed", self.name)
        self._readers.clear()
        with self._lock:
            base = self._notify_base
            for i, q in enumerate(self._queues):
                self._detach_ioeventfd(i, q, base)
                if q.efd >= 0:
                    os.close(q.efd)
                    q.efd = -1

    def _finish_reset(self) -> None:
        self._stop_doorbells()
        self._call_device(self.device.reset)
        with self._lock:
            self._active = False
            self._reset_transport_state()

    def close(self) -> None:
        """Tear down doorbells and MSI-X routes (call on the loop at machine stop).

        The device model is reset but not closed: its owner closes its backend.
        """
        if self._closed:
            return
        self._closed = True
        self._epoch += 1
        if self._reset_task is not None:
            self._reset_task.cancel()
        self._finish_reset()
        if self.msix is not None:
            self.msix.close()
        self.detach()
