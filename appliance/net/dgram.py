"""Datagram links: one Ethernet frame per datagram, as QEMU's ``-netdev dgram``
and ``-netdev socket,udp=|mcast=`` send them, so appliances and QEMU VMs can be
wired together (GNS3-style labs, labs spanning hosts).

Three shapes, as QEMU has them: a UDP point-to-point link; a unix datagram
socket pair (two paths on one host); and a UDP multicast group, a shared
segment where every member receives every frame, its own included (the
socket joins with multicast loopback on so that VMs on one host hear each
other, as QEMU's does).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
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


Address = tuple[str, int] | str  # (host, port) for UDP, a path for a unix socket


def _is_group(addr: Address | None) -> bool:
    from appliance.net.netdev import is_multicast

    return isinstance(addr, tuple) and is_multicast(addr[0])


class DgramLink:
    """A FrameBackend on a datagram socket.

    :param local: where to bind: (host, port), or a unix socket path (an
        old socket there is replaced); for a multicast ``remote``, the
        interface address to use (port ignored), or None for any.
    :param remote: where frames go: (host, port), a path, or a multicast
        (group, port). On a point-to-point link frames from anyone else are
        dropped (and counted); a multicast group takes frames from every member.
    """

    vnet_hdr_len = 0

    def __init__(self, local: Address | None, remote: Address | None) -> None:
        self._unlink: str | None = None
        self._remote_abstract: bytes | None = None
        self.multicast = _is_group(remote)
        if self.multicast:
            assert isinstance(remote, tuple) and not isinstance(local, str)
            self.remote: Address | None = _resolve(*remote)
            self.local: Address | None = None if local is None else _resolve(local[0], 0)
            self.sock = self._join(self.remote, None if self.local is None else self.local[0])
        elif isinstance(local, str):
            if not isinstance(remote, str | None):
                raise NetError("a unix datagram link needs a unix remote")
            # Absolute: recvmsg names the sender by the path it bound, which
            # the filter compares with ours however either was spelled.
            self.local = local
            # An abstract name (leading NUL) is no path; Python reports a sender's as bytes.
            self.remote = None if remote is None else remote if remote.startswith("\0") else os.path.abspath(remote)
            self._remote_abstract = remote.encode() if remote is not None and remote.startswith("\0") else None
            self.sock = self._bind_unix(local)
        else:
            if local is None or isinstance(remote, str):
                raise NetError("a UDP link needs a local (host, port) and a UDP remote")
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

    @staticmethod
    def _join(group: tuple[str, int], iface: str | None) -> socket.socket:
        """A socket in multicast ``group`` (RFC 1112 host membership), on ``iface`` if given."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # Every VM of the segment on this host binds the same group and port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(group)
            ifaddr = socket.inet_aton(iface or "0.0.0.0")
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group[0]) + ifaddr)
            # Loopback on: members on this host hear each other (and themselves).
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            if iface:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, ifaddr)
        except OSError as err:
            sock.close()
            raise NetError(f"cannot join multicast group {group[0]}:{group[1]}: {err.strerror or err}") from err
        return sock

    def _bind_unix(self, path: str) -> socket.socket:
        # A socket left by an earlier run is replaced, as QEMU does; any
        # other file at that path is not ours to remove.
        abstract = path.startswith("\0")  # no file: nothing to replace or remove
        if not abstract:
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISSOCK(os.lstat(path).st_mode):
                    raise NetError(f"cannot bind unix datagram socket {path}: not a socket")
                os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)
        except OSError as err:
            sock.close()
            raise NetError(f"cannot bind unix datagram socket {path}: {err.strerror or err}") from err
        self._unlink = None if abstract else path
        return sock

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
            if (self.remote is not None and addr != self.remote and not self.multicast
                    and not self._is_remote_unix(addr)):
                self.rx_foreign += 1
                continue
            self.rx_frames += 1
            if flags & socket.MSG_TRUNC:
                return max(n, sum(len(b) for b in bufs) + 1)
            return n

    def _is_remote_unix(self, addr: object) -> bool:
        """The unix peer however the kernel names it: an abstract name comes as bytes, a path as
        it was bound (maybe relative)."""
        if isinstance(addr, bytes):
            return addr == self._remote_abstract
        return isinstance(addr, str) and bool(addr) and os.path.abspath(addr) == self.remote

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
        if self._unlink is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unlink)
            self._unlink = None
