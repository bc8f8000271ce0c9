"""eventfd reads and writes for the event loop that keep the GIL.

``os.eventfd_read``/``os.eventfd_write`` release the GIL around a syscall
that takes well under a microsecond on an eventfd. Releasing it lets a thread
that waits for the GIL (a block I/O pool thread whose ``preadv`` just
returned) take it, and the loop then waits to get it back: a thread switch or
two each way, at every kick and every pool completion of the data path.
``ctypes.PyDLL`` calls keep the GIL, so these cost one syscall and nothing
else; they are only for non-blocking eventfds (a blocking read here would
stop every thread). A write that wakes another process's thread (a vhost-user
call fd) is better left to ``os.eventfd_write``: the woken thread often
preempts the writer, and the GIL should not be held meanwhile.

The ctypes call is the dearer one when the caches are cold, though: its
argument conversion and libffi touch far more memory than the builtin
(after a 48 MiB copy, a median 28-45 us against 9 us for an
``os.read`` of the 8 bytes), and a vhost-user back end serving a TCG guest reads
every kick cold, the guest's emulation having run in between.
:func:`clear_releasing_gil` is for a process with no other thread that
wants the GIL (the net daemon), where letting it go costs nothing.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.PyDLL(None, use_errno=True)
_write = _libc.eventfd_write
_write.argtypes = [ctypes.c_int, ctypes.c_uint64]
_write.restype = ctypes.c_int
_read = _libc.eventfd_read
_read.argtypes = [ctypes.c_int, ctypes.c_void_p]
_read.restype = ctypes.c_int
_sink = ctypes.c_uint64()
_sink_ref = ctypes.byref(_sink)
_get_errno = ctypes.get_errno
_set_errno = ctypes.set_errno


def signal(fd: int) -> int:
    """Add 1 to the counter of eventfd ``fd``.

    :returns: 0, or the errno (EAGAIN: the counter is full; EBADF…).
    """
    _set_errno(0)
    if _write(fd, 1) == 0:
        return 0
    # glibc reports a short write (not an eventfd) as -1 without an errno.
    return _get_errno() or errno.EIO


def clear(fd: int) -> int:
    """Read (and so reset) the counter of non-blocking eventfd ``fd``.

    :returns: 0 when it was signalled, EAGAIN when it was not, or another errno.
    """
    _set_errno(0)
    if _read(fd, _sink_ref) == 0:
        return 0
    # A short read (not an eventfd: a front end may pass anything) sets no errno.
    return _get_errno() or errno.EIO


def clear_releasing_gil(fd: int) -> int:
    """:func:`clear` through ``os.read``, which lets the GIL go around the syscall.

    Not ``os.eventfd_read``: glibc reports a short read as -1 without setting errno, and the
    stale errno it raises with could be any earlier one, EAGAIN among them, which would pass a
    file at its end (always readable) for an idle eventfd and spin the loop on it.

    :returns: 0 when it was signalled, EAGAIN when it was not, or another errno.
    """
    try:
        n = len(os.read(fd, 8))
    except BlockingIOError:
        return errno.EAGAIN
    except OSError as err:
        return err.errno or errno.EIO
    return 0 if n == 8 else errno.EIO
