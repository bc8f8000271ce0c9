"""A front end cannot shrink the memory it shared once we map it.

Found by fuzzing: a front end that cut its memfd short after SET_MEM_TABLE killed the back end
with SIGBUS at the next ring access. Where the file allows it (a memfd made with
MFD_ALLOW_SEALING, as QEMU's memory-backend-memfd makes them), the back end seals it against
shrinking when it maps it; the inflight area it hands out is sealed from the start.
"""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from appliance.virtio.vhost_user import protocol as p
from appliance.virtio.vhost_user.backend import map_regions, seal_against_shrinking, unmap
from appliance.virtio.vhost_user.inflight import InflightArea

SIZE = 1 << 20


def test_a_sealable_memfd_cannot_be_shrunk_once_mapped() -> None:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, SIZE)
        mem = map_regions([p.MemRegion(guest_addr=0, size=SIZE, user_addr=0x7F00_0000_0000, mmap_offset=0)], [fd])
        try:
            with pytest.raises(OSError) as err:
                os.ftruncate(fd, 0)
            assert err.value.errno == errno.EPERM
            os.ftruncate(fd, 2 * SIZE)  # growing stays the front end's
            mem.write(SIZE - 8, b"stillok!")
            assert mem.read(SIZE - 8, 8) == b"stillok!"
        finally:
            unmap(mem)
    finally:
        os.close(fd)


def test_an_unsealable_file_is_mapped_all_the_same() -> None:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)  # no MFD_ALLOW_SEALING: F_SEAL_SEAL is set
    try:
        os.ftruncate(fd, SIZE)
        assert seal_against_shrinking(fd) is False
        mem = map_regions([p.MemRegion(guest_addr=0, size=SIZE, user_addr=0, mmap_offset=0)], [fd])
        unmap(mem)
    finally:
        os.close(fd)


def test_the_inflight_area_is_sealed_both_ways() -> None:
    area, fd = InflightArea.create(2, 64)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
        area.close()
