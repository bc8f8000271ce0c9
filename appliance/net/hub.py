"""QEMU's hubs: ``-net`` (hub 0) and ``-netdev hubport,hubid=N``.

A hub is a repeater. Every frame one port hands it goes out of every other
port unchanged, as QEMU's net/hub.c forwards it, so any number of NICs and
host back ends can share one segment: two ``-net nic`` and a ``-net user``
give both NICs the user network and each other.

Each port has at most one peer:

* a NIC, which pulls its frames from the port through the FrameBackend
  interface (:meth:`HubPort.connect_nic`); a bounded queue holds what the NIC
  has not taken yet, and what does not fit is dropped and counted;
* a host back end (a user network, tap, socket…), which the hub reads from
  when it is ready and hands frames to with ``send`` (:meth:`HubPort.connect_backend`);
* nothing: what the hub sends there is lost, as in QEMU.

Like QEMU's hub ports, a port carries no virtio-net header: its back end is
opened without one (a tap fd handed over with one has it stripped and
added back, :class:`HeaderlessBackend`) and its NIC negotiates no offloads,
so every frame is a plain Ethernet frame whatever its destination.

Frames a port hands the hub while the hub is still handing out another (a
user network that answers inside ``send``) wait until that one has gone out
of every port, as QEMU's net queue holds a packet sent while delivering:
each port sees frames in the order the hub took them, and no back end's
``send`` is entered again from inside itself.

Flow control follows QEMU's ``net_hub_port_can_receive``: a back end is read
only while some other port can take a frame (a port with nothing on it takes
every frame and loses it); when every NIC queue is full and no other back end
is on the hub, the back end is paused (its own bounded queue or the kernel's
then drops) and resumed as soon as a NIC takes a frame.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from appliance.errors import ConfigError
from appliance.iovec import scatter
from appliance.log import get_logger
from appliance.net.backend import ForwardingBackend, FrameBackend
from appliance.net.errors import NetError
from appliance.net.netdev import HubportNetdev

log = get_logger(__name__)

# Frames a NIC's port holds for it: one receive ring's worth (QEMU's default queue size), and
# at most this many bytes, so that a guest sending 64 KiB frames to a NIC that reads nothing
# pins 2 MiB per port, not 16.
NIC_QUEUE = 256
NIC_QUEUE_BYTES = 2 << 20
# Source MACs remembered per NIC: a guest has one or a few; a spoofing one is bounded.
GUEST_MACS = 16
# Frames read from one back end per wake-up before the loop's other work runs.
PULL_BUDGET = 64
# Largest frame taken from a back end: a 64 KiB jumbo frame (there is no segmentation offload).
MAX_FRAME = 65535


class HubError(NetError):
    """A port was connected twice."""


class Hub:
    """One hub: its ports in the order they were made (QEMU numbers them that way)."""

    def __init__(self, hubid: int) -> None:
        self.id = hubid
        self.ports: list[HubPort] = []
        self._forwarding = False
        self._held: deque[tuple[HubPort, bytes]] = deque()  # handed in while forwarding

    def add_port(self, name: str | None = None) -> HubPort:
        """A new port; unnamed ports are ``hub<N>port<K>``, K counting this hub's ports so far."""
        port = HubPort(self, name or f"hub{self.id}port{len(self.ports)}")
        self.ports.append(port)
        return port

    def forward(self, source: HubPort, frame: bytes) -> None:
        if self._forwarding:
            self._held.append((source, frame))  # bounded: each back end reads PULL_BUDGET a pass
            return
        self._forwarding = True
        try:
            while True:
                for port in self.ports:
                    if port is not source:
                        port.deliver(frame)
                if not self._held:
                    break
                source, frame = self._held.popleft()
        finally:
            self._forwarding = False
            self._held.clear()

    def has_room(self, source: HubPort) -> bool:
        """Whether any port but ``source`` can take a frame now."""
        return any(port.has_room() for port in self.ports if port is not source)

    def room_made(self) -> None:
        """A NIC took a frame: back ends paused for want of room may be read again."""
        for port in self.ports:
            port.resume()


def join_hubports(
    netdevs: Iterable[tuple[str, object]], where: Callable[[str], str],
) -> tuple[list[Hub], dict[str, HubPort], dict[str, HubPort]]:
    """Make the hubs and ports of the ``hubport`` netdevs among ``netdevs`` (id and config, in
    the order QEMU makes them) and find the back end each port's ``netdev=`` names.

    :param where: a hub port's id -> the option to name in its errors.
    :returns: the hubs in the order they were made, each hub port id's port, and each back
        end id's port.
    :raises ConfigError: for a ``netdev=`` not made before its port (QEMU looks it up as it
        makes the port), one that is a hub port itself, or one another port has already.
    """
    hubs: dict[int, Hub] = {}
    ports: dict[str, HubPort] = {}
    peers: dict[str, HubPort] = {}
    made: dict[str, object] = {}
    for ident, cfg in netdevs:
        if isinstance(cfg, HubportNetdev):
            if cfg.hubid not in hubs:
                hubs[cfg.hubid] = Hub(cfg.hubid)
            ports[ident] = hubs[cfg.hubid].add_port(ident)
            if cfg.netdev is not None:
                peer = made.get(cfg.netdev)
                if peer is None:
                    raise ConfigError(f"{where(ident)}: netdev '{cfg.netdev}' not found")
                if isinstance(peer, HubportNetdev):
                    raise ConfigError(f"{where(ident)}: netdev '{cfg.netdev}' is a hub port; joining two "
                                      "hubs port to port is not supported")
                if cfg.netdev in peers:
                    # QEMU 7.2 aborts on this (an assertion in qemu_net_client_setup).
                    raise ConfigError(f"{where(ident)}: netdev '{cfg.netdev}' is already the peer of hub "
                                      f"port {peers[cfg.netdev].name}")
                peers[cfg.netdev] = ports[ident]
        made[ident] = cfg
    return list(hubs.values()), ports, peers


class HubPort:
    """One port of a :class:`Hub` and its peer, once connected."""

    def __init__(self, hub: Hub, name: str) -> None:
        self.hub = hub
        self.name = name
        self.nic: NicSide | None = None
        self.backend: BackendSide | None = None
        self.dropped = 0  # frames for a peerless port, or for a NIC with a full queue
        # set_link off: nothing passes either way, as a link-down client of QEMU's neither sends
        # nor is sent (net/net.c). The port and its back end each have a link of their own
        # (set_link on the port's name, on the back end's); the back end's is kept here too, so
        # it holds from before the back end is open.
        self.link_up = True
        self.backend_link_up = True

    def connect_nic(self) -> NicSide:
        """The FrameBackend a NIC on this port reads and writes."""
        self._check_free()
        self.nic = NicSide(self)
        self.hub.room_made()  # a back end paused while no port could take its frames reads again
        return self.nic

    def connect_backend(self, backend: FrameBackend) -> BackendSide:
        """Put ``backend`` behind this port and start reading it (one with virtio-net headers,
        as a tap fd someone else opened may have, loses them on the way in)."""
        if backend.vnet_hdr_len:
            backend = HeaderlessBackend(backend)
        self._check_free()
        self.backend = BackendSide(self, backend)
        return self.backend

    def _check_free(self) -> None:
        if self.nic is not None or self.backend is not None:
            raise HubError(f"hub port {self.name} is already in use")

    def disconnect(self) -> None:
        if self.backend is not None:
            self.backend.stop()
        self.nic = None
        self.backend = None

    def deliver(self, frame: bytes) -> None:
        """A frame from another port, for this port's peer."""
        if not self.link_up:
            return
        if self.nic is not None:
            self.nic.put(frame)
        elif self.backend is not None:
            self.backend.put(frame)
        else:
            self.dropped += 1

    def has_room(self) -> bool:
        if self.nic is not None:
            return self.nic.has_room()
        # A back end takes every frame (it drops what its host side cannot), and so does a
        # port with no peer, losing it: QEMU's qemu_can_send_packet is true without a peer.
        return True

    def resume(self) -> None:
        if self.backend is not None:
            self.backend.resume()


class NicSide:
    """A NIC's view of its hub port: a FrameBackend without virtio-net headers."""

    vnet_hdr_len = 0

    def __init__(self, port: HubPort) -> None:
        self.port = port
        self._queue: deque[bytes] = deque()
        self._bytes = 0
        # The source MACs this NIC's guest has sent from (the last few): who it was, for a
        # shared user network to forget when the guest goes (UserNetwork.guest_left).
        self.guest_macs: dict[bytes, None] = {}
        self._ready: Callable[[], None] | None = None
        self._wake_scheduled = False

    # -- the hub's side --------------------------------------------------------------------

    def has_room(self) -> bool:
        return len(self._queue) < NIC_QUEUE and self._bytes < NIC_QUEUE_BYTES

    def put(self, frame: bytes) -> None:
        if not self.has_room():
            self.port.dropped += 1
            return
        self._queue.append(frame)
        self._bytes += len(frame)
        self._wake()

    def _wake(self) -> None:
        # From the loop, never from inside the sender's pass: a NIC's transmit must not run
        # another NIC's receive (or its own) in the middle of it.
        if self._ready is None or self._wake_scheduled:
            return
        self._wake_scheduled = True
        asyncio.get_running_loop().call_soon(self._call_ready)

    def _call_ready(self) -> None:
        self._wake_scheduled = False
        if self._ready is not None and self._queue:
            self._ready()

    # -- FrameBackend ----------------------------------------------------------------------

    def set_ready_callback(self, ready: Callable[[], None] | None) -> None:
        self._ready = ready
        if ready is not None and self._queue:
            self._wake()

    def queued(self) -> int:
        return len(self._queue)

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        if not self._queue:
            return -1
        was_full = not self.has_room()
        frame = self._queue.popleft()
        self._bytes -= len(frame)
        scatter(bufs, frame)
        if was_full:
            self.port.hub.room_made()
        return len(frame)

    def send(self, bufs: Sequence[memoryview]) -> bool:
        frame = b"".join(bufs)
        mac = frame[6:12]
        if mac not in self.guest_macs:
            self.guest_macs[mac] = None
            if len(self.guest_macs) > GUEST_MACS:
                del self.guest_macs[next(iter(self.guest_macs))]  # the oldest
        if self.port.link_up:
            self.port.hub.forward(self.port, frame)
        return True

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> None:
        return  # no headers, so no offloads to tell anyone of

    def close(self) -> None:
        self._ready = None
        self._queue.clear()
        self._bytes = 0
        if self.port.nic is self:
            self.port.nic = None


class HeaderlessBackend(ForwardingBackend):
    """A back end with virtio-net headers, seen without them: its header is dropped from what
    it hands in and a zero one (a whole frame, checksum done) put before what it is sent.
    With no offloads set, a tap hands over no segmentation or checksum work in its headers."""

    vnet_hdr_len = 0

    def __init__(self, inner: FrameBackend) -> None:
        super().__init__(inner)
        self._hdr = memoryview(bytearray(inner.vnet_hdr_len))
        self._zero = memoryview(bytes(inner.vnet_hdr_len))

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        n = self.inner.recv_into([self._hdr, *bufs])
        return n if n < 0 else max(0, n - len(self._hdr))

    def send(self, bufs: Sequence[memoryview]) -> bool:
        return self.inner.send([self._zero, *bufs])


class BackendSide:
    """A host back end behind a hub port: read when it is ready, written with each frame for it."""

    def __init__(self, port: HubPort, backend: FrameBackend) -> None:
        self.port = port
        self.backend = backend
        self._view = memoryview(bytearray(MAX_FRAME))
        self._paused = False
        self._stopped = False
        self._pull_scheduled = False
        self.oversized = 0  # frames longer than MAX_FRAME, dropped
        backend.set_ready_callback(self._pull)

    def put(self, frame: bytes) -> None:
        if not self._stopped and self.port.backend_link_up:
            self.backend.send([memoryview(frame)])

    def _pull(self) -> None:
        self._pull_scheduled = False
        if self._stopped or self._paused:
            return
        hub = self.port.hub
        for _ in range(PULL_BUDGET):
            if not hub.has_room(self.port):
                self._paused = True
                self.backend.set_ready_callback(None)
                return
            n = self.backend.recv_into([self._view])
            if n < 0:
                return
            if n > MAX_FRAME:
                self.oversized += 1
                continue
            if not (self.port.backend_link_up and self.port.link_up):
                continue
            hub.forward(self.port, bytes(self._view[:n]))
        # More may wait; read on after the loop's other work.
        if not self._pull_scheduled:
            self._pull_scheduled = True
            asyncio.get_running_loop().call_soon(self._pull)

    def resume(self) -> None:
        if self._paused and not self._stopped:
            self._paused = False
            self.backend.set_ready_callback(self._pull)

    def stop(self) -> None:
        self._stopped = True
        self.backend.set_ready_callback(None)


__all__ = [
    "MAX_FRAME", "NIC_QUEUE", "NIC_QUEUE_BYTES", "PULL_BUDGET",
    "BackendSide", "HeaderlessBackend", "Hub", "HubError", "HubPort", "NicSide", "join_hubports",
]
