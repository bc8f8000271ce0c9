"""UDP links: one Ethernet frame per datagram, as QEMU's ``-netdev dgram`` and
``-netdev socket,udp=`` send them, so appliances and QEMU VMs can be wired
together (GNS3-style labs, labs spanning hosts).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence

from appliance.net.errors import NetError

# Largest frame we accept off the wire: a jumbo-frame MTU plus Ethernet header.
MAX_FRAME = 65535


def _resolve(host: str, port: int) -> tuple[str, int]:
    try:
        infos = socket.getaddrinfo(host or "0.0.0.0", port, socket.AF_INET, socket.SOCK_DGRAM)
    except socket.gaierror as err:
        raise NetError(f"cannot resolve '{host}'") from err
    addr = infos[0][4]
    return str(addr[0]), int(addr[1])


class DgramLink:
    """A FrameBackend on a UDP socket; frames from peers other than ``remote`` are dropped."""

    vnet_hdr_len = 0

    def __init__(self, local: tuple[str, int], remote: tuple[str, int] | None) -> None:
        self.local = _resolve(*local)
        self.remote = _resolve(*remote) if remote else None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(self.local)
        except OSError as err:
            self.sock.close()
            raise NetError(f"cannot bind UDP {self.local[0]}:{self.local[1]}") from err
        self.sock.setblocking(False)
        self._reading = False
        self.rx_frames = 0
        self.rx_foreign = 0
        self.tx_frames = 0
        self.tx_dropped = 0

    def set_ready_callback(self, ready: Callable[[], None] | None) -> None:
        loop = asyncio.get_running_loop()
        if self._reading:
            loop.remove_reader(self.sock.fileno())
            self._reading = False
        if ready is not None:
            loop.add_reader(self.sock.fileno(), ready)
            self._reading = True

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        while True:
            try:
                n, _anc, flags, addr = self.sock.recvmsg_into(bufs)
            except (BlockingIOError, InterruptedError):
                return -1
            except OSError:
                # ICMP port unreachable from a peer that is not up yet.
                return -1
            if self.remote is not None and addr != self.remote:
                self.rx_foreign += 1
                continue
            self.rx_frames += 1
            if flags & socket.MSG_TRUNC:
                return max(n, sum(len(b) for b in bufs) + 1)
            return n

    def send(self, bufs: Sequence[memoryview]) -> bool:
        if self.remote is None:
            self.tx_dropped += 1
            return False
        try:
            self.sock.sendmsg(bufs, (), 0, self.remote)
        except OSError:
            self.tx_dropped += 1
            return False
        self.tx_frames += 1
        return True

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> None:
        """Frames on the wire are plain Ethernet: nothing to offload."""

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            if self._reading:
                try:
                    asyncio.get_running_loop().remove_reader(self.sock.fileno())
                except RuntimeError:
                    pass
            self.sock.close()
