"""The loop's GIL-keeping eventfd helpers: counts, empty reads and fds that are not eventfds."""

from __future__ import annotations

import errno
import os
import tempfile

from appliance.virtio import eventfd


def test_signal_then_clear_reads_the_count_once() -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert eventfd.clear(fd) == errno.EAGAIN
        assert eventfd.signal(fd) == 0 and eventfd.signal(fd) == 0
        assert eventfd.clear(fd) == 0
        assert eventfd.clear(fd) == errno.EAGAIN
    finally:
        os.close(fd)


def test_a_closed_fd_is_an_errno_not_an_exception() -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    os.close(fd)
    assert eventfd.clear(fd) == errno.EBADF
    assert eventfd.signal(fd) == errno.EBADF


def test_a_file_at_its_end_is_an_error_not_a_kick() -> None:
    """A vhost-user front end may send any fd as a kick; a short read must not count as one."""
    with tempfile.TemporaryFile() as f:
        assert eventfd.clear(f.fileno()) != 0
        r, w = os.pipe()
        try:
            os.set_blocking(r, False)
            assert eventfd.clear(r) == errno.EAGAIN
            os.write(w, b"abc")
            assert eventfd.clear(r) != 0  # 3 bytes are not a counter
        finally:
            os.close(r)
            os.close(w)
