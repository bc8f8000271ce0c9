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


class Capture(PcapWriter):
    """One filter-dump's pcap, with which directions it records (QEMU's ``queue=``) and whether
    it records at all (``status=``).

    :param to_netdev: frames the device hands the netdev (the guest's transmissions), QEMU's
        ``queue=rx``: "packets sent to the netdev" (qemu-options.hx, -object filter-*).
    :param from_netdev: frames the netdev hands the device (what the guest receives), ``queue=tx``.
    """

    def __init__(self, stream: BinaryIO, *, snaplen: int, to_netdev: bool = True, from_netdev: bool = True,
                 on: bool = True) -> None:
        super().__init__(stream, snaplen=snaplen)
        self.to_netdev = to_netdev
        self.from_netdev = from_netdev
        self.on = on


def open_capture(path: Path, *, maxlen: int = 65536, queue: str = "all", status: bool = True) -> Capture:
    """Open ``path`` for capture: a unix socket is connected to, anything else written.

    A file is made as QEMU's net/dump.c makes it (O_CREAT|O_TRUNC, mode 0644) and its errors
    are worded as QEMU words them ("net dump: can't open PATH: REASON").
    """
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
            fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
            stream = os.fdopen(fd, "wb")
    except OSError as err:
        raise NetError(f"net dump: can't open {path}: {err.strerror or err}") from err
    return Capture(stream, snaplen=maxlen, to_netdev=queue in ("all", "rx"),
                   from_netdev=queue in ("all", "tx"), on=status)


class CapturingBackend(ForwardingBackend):
    """A FrameBackend that forwards to ``inner`` and records frames to ``writers``."""

    def __init__(self, inner: FrameBackend) -> None:
        super().__init__(inner)
        self.writers: list[Capture] = []

    def _record(self, bufs: Sequence[memoryview], length: int, *, to_netdev: bool) -> None:
        data: bytes | None = None
        for w in self.writers:
            if not w.on or not (w.to_netdev if to_netdev else w.from_netdev):
                continue
            if data is None:
                data = b"".join(bufs)[self.inner.vnet_hdr_len : length]
            w.write(data)
        self.writers = [w for w in self.writers if not w.closed]

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        n = self.inner.recv_into(bufs)
        if n > 0 and self.writers:
            self._record(bufs, min(n, sum(len(b) for b in bufs)), to_netdev=False)
        return n

    def send(self, bufs: Sequence[memoryview]) -> bool:
        if self.writers:
            self._record(bufs, sum(len(b) for b in bufs), to_netdev=True)
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
