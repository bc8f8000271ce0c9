"""Typed errors of the vhost-user transport.

::

    VhostUserError
     ├── ProtocolError   a malformed message: bad size, unknown request, wrong fds
     └── MemoryMapError  a memory table the back end cannot map

A :class:`ProtocolError` ends in an error reply (REPLY_ACK) or in dropping the
connection; it never escapes the server's loop.
"""

from __future__ import annotations

from appliance.virtio.errors import VirtioError


class VhostUserError(VirtioError):
    """Something went wrong on a vhost-user connection."""


class ProtocolError(VhostUserError):
    """The front end sent a message we cannot accept.

    :param fatal: the stream can no longer be trusted (framing lost), so the
        connection must be dropped rather than answered.
    """

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class MemoryMapError(VhostUserError):
    """A memory region from the front end could not be mapped."""
