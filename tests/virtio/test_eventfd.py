"""The loop's eventfd helpers: counts, empty reads and fds that are not eventfds, for the
GIL-keeping reads and for the one that lets the GIL go (a single-threaded daemon's)."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable

import pytest

from appliance.virtio import eventfd

CLEARS = pytest.mark.parametrize("clear", [eventfd.clear, eventfd.clear_releasing_gil], ids=["ctypes", "os-read"])


@CLEARS
def test_signal_then_clear_reads_the_count_once(clear: Callable[[int], int]) -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert clear(fd) == errno.EAGAIN
        assert eventfd.signal(fd) == 0 and eventfd.signal(fd) == 0
        assert clear(fd) == 0
        assert clear(fd) == errno.EAGAIN
    finally:
        os.close(fd)


@CLEARS
def test_a_closed_fd_is_an_errno_not_an_exception(clear: Callable[[int], int]) -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    os.close(fd)
    assert clear(fd) == errno.EBADF
    assert eventfd.signal(fd) == errno.EBADF


@CLEARS
def test_a_file_at_its_end_is_an_error_not_a_kick(clear: Callable[[int], int]) -> None:
    """A vhost-user front end may send any fd as a kick; a short read must not count as one,
    nor as an idle eventfd (EAGAIN), which the loop would find readable again at once."""
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        with tempfile.TemporaryFile() as f:
            assert clear(r) == errno.EAGAIN  # errno is now EAGAIN, and glibc's short read keeps it
            assert clear(f.fileno()) not in (0, errno.EAGAIN)
        os.write(w, b"abc")
        assert clear(r) not in (0, errno.EAGAIN)  # 3 bytes are not a counter
    finally:
        os.close(r)
        os.close(w)
