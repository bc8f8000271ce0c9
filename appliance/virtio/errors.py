"""Typed errors of the virtio package.

::

    ApplianceError
     └── VirtioError
          ├── QueueError      the ring itself is unusable: device → DEVICE_NEEDS_RESET
          └── ChainError      one descriptor chain is malformed: that request is dropped

A :class:`QueueError` is a ring-level impossibility (an avail index more than
the queue size ahead, a head index out of range, ring memory outside guest
RAM); the device owning the queue calls :meth:`VirtioDevice.fail`. A
:class:`ChainError` concerns one request only; the queue returns its head to
the driver with a written length of 0 and carries on.
"""

from __future__ import annotations

from appliance.errors import ApplianceError


class VirtioError(ApplianceError):
    """Something about a virtio device or its rings is wrong."""


class QueueError(VirtioError):
    """The virtqueue's rings are broken; the device needs a reset."""


class ChainError(VirtioError):
    """A descriptor chain breaks the rules of virtio 1.2 §2.7.5.

    :param head: the chain's head descriptor index (returned to the driver).
    """

    def __init__(self, message: str, *, head: int) -> None:
        super().__init__(message)
        self.head = head
