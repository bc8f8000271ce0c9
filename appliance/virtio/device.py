"""The device half of virtio: what every transport hands a device.

A device knows its feature bits, its config space and what to do with its
queues; it knows nothing of PCI or vhost-user (virtio 1.2 §2 and §4). The
transport owns feature negotiation, queue setup and the status register; on
DRIVER_OK it calls :meth:`VirtioDevice.activate` with guest memory, the
configured queues and one :class:`Interrupt` per queue.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from appliance.kvm.memory import GuestMemory
    from appliance.virtio.queue import Virtqueue

_log = logging.getLogger(__name__)

# virtio 1.2 §6: reserved feature bits common to all devices.
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35

# virtio 1.2 §2.1: device status bits.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128


class Interrupt(Protocol):
    """Signals the driver that a queue's used ring (or the config) changed."""

    def notify(self) -> None: ...


class VirtioDevice(abc.ABC):
    """Base of every virtio device model.

    Subclasses set ``device_id`` (virtio 1.2 §5) and ``queue_sizes`` (maximum
    size of each queue), implement :meth:`activate`, and usually override
    :meth:`device_features` and :meth:`read_config`.
    """

    device_id: ClassVar[int]
    # Maximum size of each queue; a device whose queue count is a constructor
    # argument (virtio-blk num-queues) sets it per instance.
    queue_sizes: tuple[int, ...] = (256,)

    def __init__(self) -> None:
        self.driver_features = 0
        self.needs_reset = False
        # The transport installs this to signal DEVICE_NEEDS_RESET / config changes.
        self.on_config_change: Callable[[], None] = lambda: None
        self.on_needs_reset: Callable[[], None] = lambda: None

    @property
    def num_queues(self) -> int:
        return len(self.queue_sizes)

    def max_queue_size(self, index: int) -> int:
        return self.queue_sizes[index]

    # Bits the user turned off (QEMU's device properties: csum=off, event_idx=off, ...);
    # the transport leaves them out of what it offers.
    features_off: int = 0

    def device_features(self) -> int:
        """Feature bits offered; the base offers VERSION_1, INDIRECT_DESC and EVENT_IDX."""
        return (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)

    def ack_features(self, features: int) -> None:
        """Record what the driver accepted (already masked to what we offered)."""
        self.driver_features = features

    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    def config_bytes(self) -> bytes:
        """The whole device-specific config space (virtio 1.2 §4.1.4.6)."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        data = self.config_bytes()
        chunk = data[offset : offset + size]
        return chunk + bytes(size - len(chunk))

    def write_config(self, offset: int, data: bytes) -> None:  # noqa: B027
        """Most config fields are read-only; writes to them are ignored."""

    @abc.abstractmethod
    def activate(
        self, mem: GuestMemory, queues: Sequence[Virtqueue], interrupts: Sequence[Interrupt]
    ) -> None:
        """Start serving: ``queues[i]`` is set up, ``interrupts[i]`` signals it."""

    def queue_notify(self, index: int) -> None:  # noqa: B027
        """The driver kicked queue ``index`` (called on the loop)."""

    async def quiesce(self) -> None:  # noqa: B027
        """Wait until no request is in flight (before guest memory is unmapped)."""

    def busy(self) -> bool:
        """Whether requests are in flight, which :meth:`quiesce` would wait for."""
        return False

    def notify_later(self, index: int) -> bool:
        """Go on with queue ``index`` from a loop callback, as a kick would (a pass has spent its
        PASS_BUDGET); False outside an event loop, where the pass just goes on."""
        import asyncio

        try:
            asyncio.get_running_loop().call_soon(self.queue_notify, index)
        except RuntimeError:
            return False
        return True

    def discards_when_disabled(self, index: int) -> bool:
        """Whether queue ``index``, while its front end has it disabled, is emptied into the used
        ring without being acted on (vhost-user.rst "Ring states": a started but disabled ring is
        processed without side effects, which a network device does by discarding what the
        guest transmits). Other queues are left alone until enabled."""
        return False

    def reset(self) -> None:
        """Drop all queue state; the transport calls this on a status write of 0.

        Requests still in flight finish into guest memory but are not
        returned to the (new) rings; await :meth:`quiesce` to wait for them.
        """
        self.driver_features = 0
        self.needs_reset = False

    def fail(self, reason: str) -> None:
        """Mark the device broken (a ring-level impossibility): DEVICE_NEEDS_RESET."""
        if not self.needs_reset:
            _log.warning("%s needs reset: %s", type(self).__name__, reason)
            self.needs_reset = True
            self.on_needs_reset()
