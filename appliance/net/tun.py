"""/dev/net/tun: open tap queues and configure vnet headers and offloads.

The ioctl numbers and flags come from linux/if_tun.h. Each open of /dev/net/tun
followed by TUNSETIFF attaches one queue; with IFF_MULTI_QUEUE several fds
attach to the same tap, one per virtio-net queue pair.
"""

from __future__ import annotations

import fcntl
import os
import struct

from appliance.net.errors import TapError

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNGETFEATURES = 0x800454CF
TUNSETQUEUE = 0x400454D9
TUNSETSNDBUF = 0x400454D4

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

IFNAMSIZ = 16
# struct virtio_net_hdr_v1 (virtio 1.2 §5.1.6): 12 bytes, including num_buffers.
VNET_HDR_LEN = 12


def open_tap(ifname: str, *, vnet_hdr: bool, multi_queue: bool) -> tuple[int, str]:
    """Attach one queue of tap ``ifname`` (creating it if absent).

    :returns: the non-blocking fd and the interface's actual name.
    :raises TapError: when the kernel refuses (no permission, flags mismatch).
    """
    if len(ifname.encode()) >= IFNAMSIZ:
        raise TapError(f"tap name '{ifname}' is longer than {IFNAMSIZ - 1} bytes")
    flags = IFF_TAP | IFF_NO_PI
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    if multi_queue:
        flags |= IFF_MULTI_QUEUE
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise TapError("cannot open /dev/net/tun") from err
    try:
        ifr = struct.pack("16sH22x", ifname.encode(), flags)
        res = fcntl.ioctl(fd, TUNSETIFF, ifr)
        name = res[:IFNAMSIZ].split(b"\0", 1)[0].decode()
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
    except OSError as err:
        os.close(fd)
        raise TapError(f"cannot attach to tap '{ifname}' ({os.strerror(err.errno or 0)})") from err
    return fd, name


def inspect_tap_fd(fd: int) -> tuple[str, int]:
    """(interface name, IFF_* flags) of an inherited fd (``-netdev tap,fd=N``).

    :raises TapError: when ``fd`` is not open or not attached to a tap.
    """
    try:
        res = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    except OSError as err:
        raise TapError(f"fd {fd} is not a tap device ({os.strerror(err.errno or 0)})") from err
    flags = int(struct.unpack_from("H", res, IFNAMSIZ)[0])
    if not flags & IFF_TAP:
        raise TapError(f"fd {fd} is a tun device, not a tap")
    return res[:IFNAMSIZ].split(b"\0", 1)[0].decode(), flags


def adopt_tap_fd(fd: int, *, vnet_hdr: bool) -> None:
    """Make an inherited tap fd ready for our reader: non-blocking, and with
    the 12-byte virtio-net header our queues expect when it carries headers."""
    os.set_blocking(fd, False)
    if vnet_hdr:
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        except OSError as err:
            raise TapError(f"fd {fd}: cannot set the vnet header size") from err


def set_offload(fd: int, *, csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> None:
    """Tell the tap which offloads the reader accepts (frames it may hand us unsegmented)."""
    flags = 0
    if csum:
        flags |= TUN_F_CSUM
        if tso4:
            flags |= TUN_F_TSO4
        if tso6:
            flags |= TUN_F_TSO6
        if ecn and (tso4 or tso6):
            flags |= TUN_F_TSO_ECN
        if ufo:
            flags |= TUN_F_UFO
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError as err:
        raise TapError("tap refused the offload flags") from err


def set_sndbuf(fd: int, size: int) -> None:
    """Bound the bytes of our frames the tap may hold unsent (``sndbuf=``; 0: no bound)."""
    try:
        fcntl.ioctl(fd, TUNSETSNDBUF, struct.pack("i", size or 0x7FFFFFFF))
    except OSError as err:
        raise TapError(f"tap refused sndbuf={size}") from err


def set_queue_attached(fd: int, attached: bool) -> None:
    """Attach or detach one queue of a multi-queue tap (TUNSETQUEUE).

    A detached queue keeps its fd but the kernel stops steering received frames
    to it, so a guest that runs fewer queue pairs loses none of them.
    """
    ifr = struct.pack("16sH22x", b"", IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE)
    try:
        fcntl.ioctl(fd, TUNSETQUEUE, ifr)
    except OSError as err:
        raise TapError(f"tap refused to {'attach' if attached else 'detach'} a queue "
                       f"({os.strerror(err.errno or 0)})") from err


def tap_flags(fd: int) -> int:
    res = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    return int(struct.unpack_from("H", res, IFNAMSIZ)[0])
