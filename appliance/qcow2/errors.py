"""Typed errors of the qcow2 engine.

Callers branch on :attr:`Qcow2Error.kind`, never on the message::

    StorageError
     └── Qcow2Error (kind: ErrorKind)
          ├── CorruptImage      metadata is inconsistent; the image is marked corrupt
          └── UnsupportedImage  a feature we refuse (unknown incompatible bit, encryption…)
"""

from __future__ import annotations

import enum

from appliance.storage.errors import StorageError


class ErrorKind(enum.Enum):
    INVALID = "invalid"  # the file is not a usable image (bad header, bad option)
    CORRUPT = "corrupt"  # metadata is inconsistent
    UNSUPPORTED = "unsupported"  # valid qcow2, but a feature we do not implement
    IO = "io"  # the host file system failed
    READ_ONLY = "read-only"  # a write reached a read-only or failed image
    RANGE = "range"  # a request past the end of the disk or a refcount overflow


class Qcow2Error(StorageError):
    """An image operation failed.

    :param message: one short sentence
    :param kind: what callers branch on
    :param offset: the file offset involved, if any
    """

    def __init__(
        self, message: str, *, kind: ErrorKind = ErrorKind.INVALID, offset: int | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.offset = offset


class CorruptImage(Qcow2Error):
    def __init__(self, message: str, *, offset: int | None = None) -> None:
        super().__init__(message, kind=ErrorKind.CORRUPT, offset=offset)


class UnsupportedImage(Qcow2Error):
    def __init__(self, message: str) -> None:
        super().__init__(message, kind=ErrorKind.UNSUPPORTED)
