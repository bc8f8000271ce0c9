"""Tap backend: one FrameBackend per queue pair over /dev/net/tun fds.

Frames move with ``os.readv``/``os.writev`` straight between the tap fd and the
memoryviews the device hands us (slices of guest RAM), so nothing is copied in
Python. With ``vnet_hdr=on`` every frame carries the 12-byte virtio-net header
and the kernel does checksum/TSO on our behalf (TUNSETOFFLOAD).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from appliance.net import tun
from appliance.net.errors import TapError

log = logging.getLogger(__name__)

_readv, _writev, _write = os.readv, os.writev, os.write


@dataclass(slots=True)
class TapQueue:
    """One queue of a tap; implements :class:`appliance.net.backend.FrameBackend`."""

    fd: int
    vnet_hdr_len: int
    rx_frames: int = 0
    tx_frames: int = 0
    tx_dropped: int = 0
    multi_queue: bool = False
    _reading: bool = False
    _attached: bool = True

    def set_ready_callback(self, ready: Callable[[], None] | None) -> None:
        loop = asyncio.get_running_loop()
        if self._reading:
            loop.remove_reader(self.fd)
            self._reading = False
        if ready is not None and self.fd >= 0:
            loop.add_reader(self.fd, ready)
            self._reading = True

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        try:
            n = _readv(self.fd, bufs)
        except BlockingIOError:
            return -1
        except OSError as err:
            log.debug("tap read failed: %s", err)
            return -1
        self.rx_frames += 1
        return n

    def send(self, bufs: Sequence[memoryview]) -> bool:
        try:
            # One buffer (nearly every frame a driver sends) skips writev's
            # iovec building; either way the kernel reads guest RAM directly.
            if len(bufs) == 1:
                _write(self.fd, bufs[0])
            else:
                _writev(self.fd, bufs)
        except OSError:
            # A full tap queue or a frame the kernel rejects (bad vnet header):
            # drop it, like a NIC on a congested wire.
            self.tx_dropped += 1
            return False
        self.tx_frames += 1
        return True

    def set_queue_enabled(self, enabled: bool) -> None:
        """Follow the guest's queue-pair count (``ethtool -L``): detach this queue while its pair is off."""
        if self.multi_queue and self.fd >= 0 and enabled != self._attached:
            tun.set_queue_attached(self.fd, enabled)
            self._attached = enabled

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> None:
        if self.vnet_hdr_len:
            tun.set_offload(self.fd, csum=csum, tso4=tso4, tso6=tso6, ecn=ecn, ufo=ufo)

    def close(self) -> None:
        if self.fd >= 0:
            if self._reading:
                try:
                    asyncio.get_running_loop().remove_reader(self.fd)
                except RuntimeError:
                    pass
                self._reading = False
            os.close(self.fd)
            self.fd = -1


def link_exists(ifname: str) -> bool:
    """Whether ``ifname`` exists in the calling thread's network namespace.

    /sys/class/net shows the namespace sysfs was mounted in; /proc/thread-self/net
    follows the thread, which matters when a tap is made inside a namespace.
    """
    with open("/proc/thread-self/net/dev") as f:
        return any(line.split(":", 1)[0].strip() == ifname for line in f.readlines()[2:])


async def run_script(script: str, ifname: str) -> None:
    """``script IFNAME``, waited for, as QEMU's launch_script runs a tap's scripts.

    :raises TapError: "network script … failed with status N", N being the wait status as
        QEMU prints it (an exit code times 256; 256 when it cannot be run at all).
    """
    try:
        proc = await asyncio.create_subprocess_exec(script, ifname, stdin=asyncio.subprocess.DEVNULL)
        code = await proc.wait()
    except OSError:
        code = 1  # QEMU's child exits 1 when execv fails
    if code:
        status = code << 8 if code > 0 else -code  # a signal: its number, as waitpid has it
        raise TapError(f"network script {script} failed with status {status}")


class Tap:
    """A tap device with ``queues`` fds; owned taps are deleted on close.

    :param ifname: the tap to create or adopt; ``None`` picks ``tapN``.
    :param bridge: enslave the tap to this bridge and bring both up.
    :param fds: queues someone else opened and handed us (``fd=``/``fds=``,
        as libvirt does): used as they are, the link left to its owner.
    :param script: run as ``script IFNAME`` once the tap is up (QEMU's ``script=``); a
        failure fails the open, in QEMU's words.
    :param downscript: run as ``downscript IFNAME`` on close, while the tap still exists.
    """

    def __init__(
        self, ifname: str | None, *, queues: int = 1, vnet_hdr: bool = True, bridge: str | None = None,
        fds: tuple[int, ...] = (), sndbuf: int | None = None, script: str | None = None,
        downscript: str | None = None,
    ) -> None:
        self.script = script
        self.downscript = downscript
        self._down_due = False  # the up script ran, so the down script runs at close
        self.requested = ifname or "tap%d"
        self.queues_wanted = len(fds) or queues
        self.vnet_hdr = vnet_hdr
        self.bridge = bridge
        self.fds = fds
        self.sndbuf = sndbuf
        self.owned = not fds and (ifname is None or not link_exists(ifname))
        self.name = ""
        self.queues: list[TapQueue] = []

    async def open(self) -> list[TapQueue]:
        """Attach the queues, enslave to the bridge and bring the link up.

        The tap is made in the network namespace of the calling thread.
        """
        if self.fds:
            try:
                queues = self._adopt_fds()
                self._set_sndbuf()
            except BaseException:
                await self.close()
                raise
            return queues
        multi = self.queues_wanted > 1
        try:
            for _ in range(self.queues_wanted):
                fd, name = tun.open_tap(self.name or self.requested, vnet_hdr=self.vnet_hdr, multi_queue=multi)
                self.name = name
                self.queues.append(TapQueue(fd, tun.VNET_HDR_LEN if self.vnet_hdr else 0, multi_queue=multi))
            self._set_sndbuf()
            await self._link_up()
            if self.script is not None:
                await run_script(self.script, self.name)
            self._down_due = self.downscript is not None
        except BaseException:
            await self.close()
            raise
        return self.queues

    def _set_sndbuf(self) -> None:
        if self.sndbuf is not None:
            for q in self.queues:
                tun.set_sndbuf(q.fd, self.sndbuf)

    def _adopt_fds(self) -> list[TapQueue]:
        for fd in self.fds:
            self.name, flags = tun.inspect_tap_fd(fd)
            # The fd's opener chose whether frames carry virtio-net headers.
            hdr = self.vnet_hdr = bool(flags & tun.IFF_VNET_HDR)
            tun.adopt_tap_fd(fd, vnet_hdr=hdr)
            self.queues.append(TapQueue(fd, tun.VNET_HDR_LEN if hdr else 0,
                                        multi_queue=bool(flags & tun.IFF_MULTI_QUEUE)))
        return self.queues

    async def _link_up(self) -> None:
        from pyroute2 import AsyncIPRoute

        try:
            async with AsyncIPRoute() as ipr:
                idx = (await ipr.link_lookup(ifname=self.name))[0]
                if self.bridge:
                    br = await ipr.link_lookup(ifname=self.bridge)
                    if not br:
                        raise TapError(f"bridge '{self.bridge}' does not exist")
                    await ipr.link("set", index=idx, master=br[0])
                    await ipr.link("set", index=br[0], state="up")
                await ipr.link("set", index=idx, state="up")
        except TapError:
            raise
        except Exception as err:
            raise TapError(f"cannot bring up tap '{self.name}'") from err

    async def close(self) -> None:
        if self._down_due and self.downscript is not None:
            self._down_due = False
            try:
                await run_script(self.downscript, self.name)
            except TapError as err:
                log.warning("%s", err)  # QEMU reports it and goes on closing
        for q in self.queues:
            q.close()
        self.queues.clear()
        if self.owned and self.name and link_exists(self.name):
            # Closing the last fd of a non-persistent tap already removes it;
            # this covers taps made persistent by someone else's TUNSETPERSIST.
            try:
                from pyroute2 import AsyncIPRoute

                async with AsyncIPRoute() as ipr:
                    for idx in await ipr.link_lookup(ifname=self.name):
                        await ipr.link("del", index=idx)
            except Exception as err:  # noqa: BLE001 - cleanup must not mask the exit path
                log.warning("could not remove tap %s: %s", self.name, err)
