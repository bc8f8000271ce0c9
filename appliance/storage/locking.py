"""Image locking that interoperates with QEMU's.

QEMU's file driver publishes what each user of an image does, and what it
lets others do, as shared open-file-description (OFD) locks on single bytes
of the image: byte 100+i is held by users that hold permission *i*, byte
200+i by users that do not share permission *i* with others. Before using an
image it takes its own bytes, then tests (with an exclusive-lock probe) the
bytes of everyone else: a permission it wants must not be unshared by
anyone (byte 200+i free), and a permission it does not share must not be
held by anyone (byte 100+i free). Locks belong to the open file description,
so closing the image's fd drops them and a crashed process leaves none.

Doing the same bytes and rules means QEMU, qemu-img and qemu-storage-daemon
refuse our writers and we refuse theirs ("Failed to get "write" lock").

Permission bits (QEMU's BLK_PERM_*): 0 consistent read, 1 write, 2 write
unchanged, 3 resize.
"""

from __future__ import annotations

import errno
import fcntl
import struct

from appliance.storage.errors import ImageLockedError

PERM_CONSISTENT_READ = 1 << 0
PERM_WRITE = 1 << 1
PERM_WRITE_UNCHANGED = 1 << 2
PERM_RESIZE = 1 << 3
_PERM_COUNT = 4
_PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

# Linux's struct flock on 64-bit: l_type, l_whence, (pad), l_start, l_len, l_pid, (pad).
_FLOCK = struct.Struct("hhxxxxqqixxxx")
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def _set_shared(fd: int, byte: int) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, 0, byte, 1, 0))


def _held_by_others(fd: int, byte: int) -> bool:
    # Probing with a write lock finds any other holder; our own locks live
    # on this open file description and never conflict with the probe.
    out = fcntl.fcntl(fd, _F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, byte, 1, 0))
    return _FLOCK.unpack(out)[0] != fcntl.F_UNLCK


def permissions(*, write: bool) -> tuple[int, int]:
    """``(perm, shared)`` for a user that reads, and writes if ``write``.

    A writer shares neither writing nor resizing (QEMU's default without
    ``share-rw``); a reader lets others do anything but write.
    """
    if write:
        return PERM_CONSISTENT_READ | PERM_WRITE, PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
    return PERM_CONSISTENT_READ, PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED | PERM_RESIZE


def lock_image(fd: int, path: str, *, write: bool) -> None:
    """Take QEMU-compatible permission locks on the open image ``fd``.

    On failure the caller closes ``fd``, which drops whatever was taken.

    :raises ImageLockedError: When another process uses the image in a way
        that conflicts.
    """
    perm, shared = permissions(write=write)
    hint = f"is another process using the image '{path}'?"
    try:
        for i in range(_PERM_COUNT):
            if perm >> i & 1:
                _set_shared(fd, LOCK_PERM_BASE + i)
            if not shared >> i & 1:
                _set_shared(fd, LOCK_SHARED_BASE + i)
        for i in range(_PERM_COUNT):
            if perm >> i & 1 and _held_by_others(fd, LOCK_SHARED_BASE + i):
                raise ImageLockedError(f'Failed to get "{_PERM_NAMES[i]}" lock: {hint}')
        for i in range(_PERM_COUNT):
            if not shared >> i & 1 and _held_by_others(fd, LOCK_PERM_BASE + i):
                raise ImageLockedError(f'Failed to get shared "{_PERM_NAMES[i]}" lock: {hint}')
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockedError(f"Failed to lock the image: {hint}") from None
        raise ImageLockedError(f"Failed to lock '{path}'") from err
