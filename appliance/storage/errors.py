"""Typed errors of the storage package."""

from __future__ import annotations

from typing import ClassVar

from appliance.errors import ApplianceError


class StorageError(ApplianceError):
    """A block backend could not do what was asked."""


class BackendOpenError(StorageError):
    """An image could not be opened (missing, locked, wrong format)."""


class ReadOnlyError(StorageError):
    """A write reached a read-only backend."""


class ImageLockedError(BackendOpenError):
    """Another process holds a conflicting lock on the image (QEMU's image locking)."""


# virtio-blk status codes (virtio 1.2 §5.2.6).
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2


class BlkError(StorageError):
    """A virtio-blk request the device refuses; ``status`` is what the driver is told.

    :param status_buf: the request's one-byte status buffer, when the parser
        found one (without it the request can only be dropped).
    """

    status: ClassVar[int] = VIRTIO_BLK_S_IOERR

    def __init__(self, message: str, status_buf: memoryview | None = None) -> None:
        super().__init__(message)
        self.status_buf = status_buf


class BlkUnsupported(BlkError):
    """An unknown request type or flag (VIRTIO_BLK_S_UNSUPP)."""

    status = VIRTIO_BLK_S_UNSUPP


class BlkNoStatus(BlkError):
    """The chain has no device-writable byte for the status: the request is dropped."""
