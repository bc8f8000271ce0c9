"""Packet capture around any FrameBackend (``-object filter-dump``).

The wrapper sees every frame the device sends and receives, strips the
virtio-net header if the backend carries one, and appends the Ethernet frame to
a pcap. Capture can be started and stopped while the VM runs (QMP). A capture
target may be a regular file, a FIFO (Wireshark ``-k -i FIFO``) or a unix
stream socket path that a reader is listening on.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from appliance.net.backend import ForwardingBackend, FrameBackend
from appliance.net.errors import NetError
from appliance.net.pcap import PcapWriter


def open_capture(path: Path, *, maxlen: int = 65536) -> PcapWriter:
    """Open ``path`` for capture: a unix socket is connected to, anything else written."""
    try:
        st = os.stat(path)
        is_sock = stat.S_ISSOCK(st.st_mode)
    except FileNotFoundError:
        is_sock = False
    try:
        stream: BinaryIO
        if is_sock:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            stream = s.makefile("wb")
            s.close()
        else:
            # A FIFO opens only when a reader is there, as with QEMU.
            stream = open(path, "wb")  # noqa: SIM115 - owned by the writer
    except OSError as err:
        raise NetError(f"cannot open capture file '{path}'") from err
    return PcapWriter(stream, snaplen=maxlen)


class CapturingBackend(ForwardingBackend):
    """A FrameBackend that forwards to ``inner`` and records frames to ``writers``."""

    def __init__(self, inner: FrameBackend) -> None:
        super().__init__(inner)
        self.writers: list[PcapWriter] = []

    def _record(self, bufs: Sequence[memoryview], length: int) -> None:
        data = b"".join(bufs)[self.inner.vnet_hdr_len : length]
        for w in self.writers:
            w.write(data)
        self.writers = [w for w in self.writers if not w.closed]

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        n = self.inner.recv_into(bufs)
        if n > 0 and self.writers:
            self._record(bufs, min(n, sum(len(b) for b in bufs)))
        return n

    def send(self, bufs: Sequence[memoryview]) -> bool:
        if self.writers:
            self._record(bufs, sum(len(b) for b in bufs))
        return self.inner.send(bufs)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.writers.clear()
        self.inner.close()


def with_captures(backends: Sequence[Any], writers: Sequence[Any]) -> list[Any]:
    """``backends`` with every frame also written to ``writers`` (one pcap per
    filter-dump, shared by all queue pairs of a netdev); unchanged without any."""
    if not writers:
        return list(backends)
    wrapped = []
    for b in backends:
        cap = CapturingBackend(b)
        cap.writers = list(writers)
        wrapped.append(cap)
    return wrapped
