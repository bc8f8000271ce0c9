"""The FrameBackend protocol: the host side of one virtio-net queue pair.

Implemented by taps and UDP/stream links (:mod:`appliance.net`) and by the
user-mode stack (:mod:`appliance.nat`). It is a *pull* interface so the device
only takes a frame when the guest has posted a buffer for it: with no rx
buffers the device stops pulling, the backend's own bounded queue (or the
kernel's tap queue) fills and drops, and memory stays bounded.

When ``vnet_hdr_len`` is non-zero every frame in either direction starts with a
``struct virtio_net_hdr_v1`` of that length (virtio 1.2 §5.1.6), so offloads
pass through untouched; otherwise frames are plain Ethernet and the device
must not negotiate offloads.

A backend whose queues are steered by the host (a multi-queue tap) may also
have ``set_queue_enabled(enabled: bool)``: the device calls it when the guest
changes how many queue pairs it runs, so the host stops handing frames to a
queue nobody reads. Single-queue backends need not have it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class FrameBackend(Protocol):
    @property
    def vnet_hdr_len(self) -> int:
        """12 when frames carry a ``virtio_net_hdr_v1``, else 0."""
        ...

    def set_ready_callback(self, ready: Callable[[], None] | None) -> None:
        """Call ``ready()`` on the loop whenever ``recv_into`` may return a frame.

        ``None`` stops the calls: a device with no rx buffers posted pauses its
        backend this way instead of being woken for frames it cannot take.
        """
        ...

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        """Scatter the next frame into ``bufs`` without blocking.

        :returns: the frame's length (which may exceed the buffers' total; the
            excess is dropped and counted by the caller), or -1 when none is ready.
        """
        ...

    def send(self, bufs: Sequence[memoryview]) -> bool:
        """Gather one frame from ``bufs`` and send it without blocking.

        :returns: False when the frame was dropped (backpressure or error).
        """
        ...

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> None:
        """Tell the backend which offloads the guest accepts on receive."""
        ...

    def close(self) -> None:
        ...


class ForwardingBackend:
    """A FrameBackend that hands everything to ``inner``: the base of wrappers
    that change one part (a capture records frames, a pulled cable drops them)."""

    # Only for an inner backend that has it (the user-mode stack): how many frames it holds
    # for the guest, which spares virtio-net a read that would find none.
    queued: Callable[[], int]

    def __init__(self, inner: FrameBackend) -> None:
        self.inner = inner
        # The inner method itself, not a wrapper: the device looks it up once a pass and calls
        # it after each frame. A backend without it leaves the attribute unset, so the device
        # reads until a read comes back empty, as it does for the backend alone.
        queued = getattr(inner, "queued", None)
        if queued is not None:
            self.queued = queued

    @property
    def vnet_hdr_len(self) -> int:
        return self.inner.vnet_hdr_len

    @property
    def max_frame(self) -> int | None:
        """The inner backend's largest frame toward the guest, if it says (the user-mode stack)."""
        return getattr(self.inner, "max_frame", None)

    def set_ready_callback(self, ready: Callable[[], None] | None) -> None:
        self.inner.set_ready_callback(ready)

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        return self.inner.recv_into(bufs)

    def send(self, bufs: Sequence[memoryview]) -> bool:
        return self.inner.send(bufs)

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> None:
        self.inner.set_offloads(csum, tso4, tso6, ecn, ufo)

    def set_queue_enabled(self, enabled: bool) -> None:
        set_enabled = getattr(self.inner, "set_queue_enabled", None)
        if set_enabled is not None:
            set_enabled(enabled)

    def set_mtu(self, mtu: int) -> None:
        """The guest link's MTU, for an inner backend that builds frames itself (the user-mode stack)."""
        set_mtu = getattr(self.inner, "set_mtu", None)
        if set_mtu is not None:
            set_mtu(mtu)

    def take_quiet_tx(self) -> int:
        """The inner backend's count of guest frames nothing waits on (a user-mode stack's), else 0."""
        take = getattr(self.inner, "take_quiet_tx", None)
        return int(take()) if take is not None else 0

    def close(self) -> None:
        self.inner.close()


class UnpluggedBackend:
    """The FrameBackend of a NIC with no netdev: nothing arrives, and what the guest sends is
    gone (QEMU drops a peerless NIC's frames the same way, after its "has no peer" warning)."""

    vnet_hdr_len = 0

    def __init__(self) -> None:
        self.tx_dropped = 0

    def set_ready_callback(self, ready: Callable[[], None] | None) -> None:
        return

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        return -1

    def send(self, bufs: Sequence[memoryview]) -> bool:
        self.tx_dropped += 1
        return True

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> None:
        return

    def close(self) -> None:
        return


class LinkDownBackend(ForwardingBackend):
    """A FrameBackend standing in for a NIC's own while its link is down.

    QEMU's net layer drops what a link-down client sends or is sent
    (net/net.c), so ``set_link … off`` is a pulled cable even for a vhost-user
    front end that never reads our config space. Frames waiting on the host
    side are read and dropped, so a level-triggered fd (a tap) does not keep
    waking the device.
    """

    # A flood must not hold the loop: at most this many dropped per call.
    DRAIN = 256

    def __init__(self, inner: FrameBackend) -> None:
        super().__init__(inner)
        self.rx_dropped = 0
        self.tx_dropped = 0

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        for _ in range(self.DRAIN):
            if self.inner.recv_into(bufs) < 0:
                break
            self.rx_dropped += 1
        return -1

    def send(self, bufs: Sequence[memoryview]) -> bool:
        # Gone without a trace, as QEMU reports a link-down send as done.
        self.tx_dropped += 1
        return True
