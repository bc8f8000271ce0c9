"""pcap capture files (the libpcap format tcpdump, tshark, Wireshark and scapy read).

Classic pcap, microsecond timestamps, LINKTYPE_ETHERNET (1). The writer flushes
after every record so a reader following a FIFO or a growing file sees frames
as they pass.
"""

from __future__ import annotations

import struct
import time
from typing import BinaryIO

PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")


class PcapWriter:
    """Append Ethernet frames to a pcap stream, truncating each to ``snaplen``."""

    def __init__(self, stream: BinaryIO, *, snaplen: int = 65535) -> None:
        self.stream = stream
        self.snaplen = snaplen
        self.frames = 0
        self.closed = False
        stream.write(_GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))
        stream.flush()

    def write(self, frame: bytes | memoryview, ts: float | None = None) -> None:
        if self.closed:
            return
        t = time.time() if ts is None else ts
        sec = int(t)
        usec = int((t - sec) * 1_000_000)
        orig = len(frame)
        cap = min(orig, self.snaplen)
        try:
            self.stream.write(_RECORD.pack(sec, usec, cap, orig))
            self.stream.write(frame[:cap])
            self.stream.flush()
        except (BrokenPipeError, ConnectionError, ValueError):
            # A live reader (FIFO, socket) went away: stop capturing, keep the VM running.
            self.closed = True
            return
        self.frames += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.stream.close()
            except OSError:
                pass
