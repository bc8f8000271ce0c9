"""virtio devices on PCI for our own vCPUs: disks, entropy, NICs, as machine DeviceSpecs.

Each spec follows the machine's device lifecycle
(:class:`~appliance.machine.config.DeviceSpec`): ``open()`` once when the
machine starts (image files, taps, sockets, the user-mode stack, capture
files), ``attach()`` on every boot (a fresh :class:`VirtioPciTransport` over
the same device model, plugged into this boot's PCI bus), ``close()`` once at
the end (in-flight I/O drained, backends closed, owned taps removed).

Slots are stable: a spec with ``addr`` gets that slot; the others take the
lowest free slot not reserved by any spec of the config, in config order, so
a boot always lays the bus out the same way (:func:`appliance.pci.plan_slots`
semantics). The device model lives across reboots; a reboot resets it
through its transport like a cold boot's driver would.

From Python (the CLI builds the same objects from ``-drive``/``-device``)::

    from appliance.storage.blockdev import ImageSource
    from appliance.net.netdev import parse_netdev
    from appliance.nic.config import default_mac

    cfg = MachineConfig(kernel=Path("guest.elf"), num_cpus=2, devices=[
        BlkSpec(ImageSource(Path("disk.qcow2"), fmt="qcow2")),           # 2 queues: one per vCPU
        NicSpec(parse_netdev("user,id=n0"), default_mac(0), addr=PciAddress(5)),
        RngSpec(),
    ])
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import ApplianceError, ConfigError
from appliance.pci.allocator import MAX_SLOT, PciAddress
from appliance.storage.blockdev import ImageSource, OpenImage, open_image_source

if TYPE_CHECKING:
    from appliance.machine.builder import Instance, MachineBuilder
    from appliance.net.netdev import NetdevConfig
    from appliance.nic.config import FilterDumpConfig
    from appliance.virtio.device import VirtioDevice
    from appliance.virtio.queue import Virtqueue

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 256


def fresh_queue(mem: Any, size: int, desc: int, driver: int, device: int, **kw: Any) -> Virtqueue:
    """A virtqueue whose indices start at 0, as after a device reset.

    The queue normally resumes from the used index found in guest memory
    (vhost-user reconnects need that); a PCI device starts from 0 every
    time the driver sets it up (virtio 1.2 §2.7.1).
    """
    from appliance.virtio.queue import Virtqueue

    q = Virtqueue(mem, size, desc, driver, device, **kw)
    q.used_idx = 0
    q.last_avail_idx = 0
    return q


def _slot_for(builder: MachineBuilder, inst: Instance, want: PciAddress | None) -> PciAddress:
    if want is not None:
        return want
    reserved = {a.slot for a in inst.pci.devices}
    for spec in builder.config.devices:
        addr = getattr(spec, "addr", None)
        if isinstance(addr, PciAddress):
            reserved.add(addr.slot)
    for slot in range(MAX_SLOT + 1):
        if slot not in reserved:
            return PciAddress(slot, 0)
    raise ConfigError("no free PCI slot is left on bus 0")


def plug_virtio(
    builder: MachineBuilder, inst: Instance, device: VirtioDevice, *, addr: PciAddress | None, name: str
) -> Any:
    """Put ``device`` on this boot's PCI bus behind a virtio-pci transport; returns the transport.

    Call on the machine's loop (the builder runs there).

    :raises ConfigError: When the machine has no PCI bus or the slot is taken.
    """
    from appliance.pci.errors import PciError
    from appliance.virtio.pci import VirtioPciTransport

    if inst.pci is None:
        raise ConfigError(f"{name}: this machine has no PCI bus")
    transport = VirtioPciTransport(
        device, mem=inst.memory, platform=inst.vm, loop=asyncio.get_running_loop(),
        name=name, queue_factory=fresh_queue,
    )
    try:
        inst.pci.add(transport, _slot_for(builder, inst, addr))
    except PciError as err:
        transport.close()
        raise ConfigError(f"{name}: {err}") from None
    return transport


# --- virtio-blk ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockNames:
    """What QEMU 7.2's ``query-block`` calls a disk, as the command line gave it.

    :param drive: the ``-drive`` id (QEMU's BlockBackend name); "" for a
        ``-blockdev`` node's disk, whose backend QEMU leaves unnamed.
    :param node_name: the ``-blockdev`` node's name; "" for a ``-drive``,
        whose nodes QEMU names itself (``#block123``).
    :param driver: that node's driver (``file`` for a bare file node, which
        QEMU reports as such); "" for the image's format.
    :param qom_path: the device's QOM path (``/machine/peripheral/ID``, or
        ``/machine/peripheral-anon/device[N]`` without an id); "" if unknown.
    :param order: where QEMU lists it: its ``-drive`` backends first, in
        option order, then those the devices make, in device order.
    """

    drive: str = ""
    node_name: str = ""
    driver: str = ""
    qom_path: str = ""
    order: int = 0


@dataclass(eq=False)
class BlkSpec:
    """A virtio-blk-pci disk.

    :param source: the image and how to open it.
    :param num_queues: request queues; ``None`` means one per vCPU (QEMU's default).
    :param read_only: present the disk read-only (also when the image is writable).
    :param logical_block_size: the block size the guest sees, if larger than
        the image needs; :param physical_block_size: the one it is told to align to.
    :param discard: offer DISCARD (when the image can); :param write_zeroes: offer WRITE_ZEROES.
    :param features_off: transport feature bits turned off (event_idx=off, indirect_desc=off).
    :param names: how the monitor's ``query-block`` names it.
    """

    source: ImageSource
    num_queues: int | None = None
    queue_size: int = DEFAULT_QUEUE_SIZE
    serial: str = ""
    addr: PciAddress | None = None
    name: str = "virtio-blk"
    read_only: bool = False
    logical_block_size: int | None = None
    physical_block_size: int | None = None
    discard: bool = True
    write_zeroes: bool = True
    features_off: int = 0
    names: BlockNames = field(default_factory=BlockNames)
    image: OpenImage | None = field(default=None, repr=False)
    device: Any = field(default=None, repr=False)
    transport: Any = field(default=None, repr=False)

    async def open(self) -> None:
        self.image = await open_image_source(self.source)

    def attach(self, builder: MachineBuilder, inst: Instance) -> None:
        attach_blk(builder, inst, self)

    async def close(self) -> None:
        if self.device is not None:
            await self.device.quiesce()
        if self.image is not None:
            image, self.image = self.image, None
            await image.close()


def attach_blk(builder: MachineBuilder, inst: Instance, spec: BlkSpec) -> None:
    """Plug ``spec`` 's disk in (the device model is made on the first boot)."""
    from appliance.storage.blk import VirtioBlk

    if spec.image is None:
        raise ConfigError(f"{spec.name}: the disk was not opened")
    if spec.device is None:
        dev = VirtioBlk(
            spec.image.backend,
            num_queues=spec.num_queues or builder.config.num_cpus,
            queue_size=spec.queue_size,
            serial=spec.serial,
            read_only=spec.read_only or spec.source.read_only,
            physical_block_size=spec.physical_block_size,
            # Raised, never lowered: a backend that needs larger blocks (O_DIRECT on 4K) keeps them.
            logical_block_size=spec.logical_block_size,
        )
        dev.discard = dev.discard and spec.discard
        dev.write_zeroes = dev.write_zeroes and spec.write_zeroes
        dev.features_off = spec.features_off
        spec.device = dev
    spec.transport = plug_virtio(builder, inst, spec.device, addr=spec.addr, name=spec.name)


# --- virtio-rng ---------------------------------------------------------------------------


@dataclass(eq=False)
class RngSpec:
    """A virtio-rng-pci entropy device reading ``filename`` (at most ``max_bytes`` per ``period_ms``)."""

    filename: str = "/dev/urandom"
    addr: PciAddress | None = None
    name: str = "virtio-rng"
    max_bytes: int | None = None
    period_ms: int = 1 << 16
    device: Any = field(default=None, repr=False)
    transport: Any = field(default=None, repr=False)

    def open(self) -> None:
        from appliance.virtio.rng import VirtioRng

        self.device = VirtioRng(self.filename, max_bytes=self.max_bytes, period_ms=self.period_ms)

    def attach(self, builder: MachineBuilder, inst: Instance) -> None:
        attach_rng(builder, inst, self)

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None


def attach_rng(builder: MachineBuilder, inst: Instance, spec: RngSpec) -> None:
    if spec.device is None:
        spec.open()
    spec.transport = plug_virtio(builder, inst, spec.device, addr=spec.addr, name=spec.name)


# --- virtio-net ---------------------------------------------------------------------------


@dataclass(eq=False)
class NicSpec:
    """A virtio-net-pci NIC on a netdev, with the netdev's packet captures.

    :param queues: queue pairs; the netdev is opened with this many (a
        multiqueue tap has one fd per pair).
    :param captures: ``-object filter-dump`` s on this NIC's netdev; one pcap
        writer each, shared by every queue pair.
    :param features_off: feature bits the command line turned off (``csum=off``, …).
    :param rx_queue_size: of each receive queue (None: the device's default).
    :param tx_queue_size: of each transmit queue (None: the device's default).
    :param speed: link speed in Mbit/s the guest is told (None: unknown).
    :param duplex: ``"half"`` or ``"full"`` (None: unknown).
    :param hub: the QEMU hub of a ``-net`` back end (0), shown by ``info usernet``; -1 for none.
    :param origin: the netdev's option as typed (``-nic user,hostfwd=…``), for its errors.
    """

    netdev: NetdevConfig
    mac: bytes
    queues: int = 1
    mtu: int | None = None
    addr: PciAddress | None = None
    name: str = "virtio-net"
    captures: list[FilterDumpConfig] = field(default_factory=list)
    features_off: int = 0
    rx_queue_size: int | None = None
    tx_queue_size: int | None = None
    speed: int | None = None
    duplex: str | None = None
    hub: int = -1  # QEMU's hub the netdev hangs off (0 for -net; -1: none)
    hub_port: int = 0  # on a hub, the NIC's port (its back end has the other of 0 and 1)
    origin: str = ""  # the netdev's option as typed, which its start-up errors name (QEMU's way)
    # Where the netdev came on the command line: QEMU lists user networks (info usernet) and
    # picks hostfwd_add's default in that order, not in the NICs' order.
    netdev_order: int = 0
    # A NIC on a hub (appliance.net.hub): the HubPort it reads and writes, in place of a netdev.
    port: Any = field(default=None, repr=False)
    owner: Any = field(default=None, repr=False)
    backends: list[Any] = field(default_factory=list, repr=False)
    writers: list[Any] = field(default_factory=list, repr=False)
    device: Any = field(default=None, repr=False)
    transport: Any = field(default=None, repr=False)

    async def open(self) -> None:
        from appliance.net.capture import open_capture, with_captures

        what = self.origin or f"-netdev {self.netdev.id}"
        try:
            backends, self.owner = await self._open_backends()
        except ConfigError:
            await self.close()
            raise
        except (ApplianceError, OSError) as err:
            await self.close()
            raise ConfigError(f"{what}: {err}") from err
        for c in self.captures:
            try:
                self.writers.append(await asyncio.to_thread(
                    open_capture, Path(c.file), maxlen=c.maxlen, queue=c.queue, status=c.status))
            except (ApplianceError, OSError) as err:
                await self.close()
                # A filter's own error, not its netdev's: QEMU prints net/dump.c's words alone.
                raise ConfigError(str(err)) from err
        self.backends = with_captures(backends, self.writers)

    async def _open_backends(self) -> tuple[list[Any], Any]:
        from appliance.net.backend import UnpluggedBackend
        from appliance.net.netdev import Unplugged, open_netdev

        if self.port is not None:
            side = self.port.connect_nic()
            return [side], side
        if isinstance(self.netdev, Unplugged):
            cable = UnpluggedBackend()
            return [cable], cable
        return await open_netdev(self.netdev, queues=self.queues)

    def attach(self, builder: MachineBuilder, inst: Instance) -> None:
        attach_nic(builder, inst, self)

    async def close(self) -> None:
        if self.device is not None:
            self.device.reset()
            self.device = None
        for w in self.writers:
            try:
                w.close()
            except Exception:
                log.exception("%s: closing a capture failed", self.name)
        self.writers.clear()
        owner, self.owner = self.owner, None
        self.backends = []
        if owner is not None:
            result = owner.close()
            if inspect.isawaitable(result):
                await result


@dataclass(eq=False)
class PeerlessNetdevSpec(NicSpec):
    """A ``-netdev`` that no NIC uses: opened all the same, with no device in front of it.

    QEMU opens every netdev at start-up and only warns of one without a peer, so a user
    network binds its hostfwd ports, ``info usernet`` lists it and ``hostfwd_add`` reaches
    it. What it would send to a guest is dropped (the stack's queue is bounded), and a
    connection forwarded in gets no answer from a guest, as in QEMU.
    """

    mac: bytes = b""

    def attach(self, builder: MachineBuilder, inst: Instance) -> None:
        return  # nothing on the PCI bus

    def set_link(self, up: bool) -> None:
        """QEMU takes set_link for a netdev alone too; with no NIC there is no carrier to change."""


@dataclass(eq=False)
class HubNetdevSpec(PeerlessNetdevSpec):
    """A host back end behind a hub port (``-net user`` beside other ``-net`` options, or the
    ``netdev=`` of a ``-netdev hubport``): opened without virtio-net headers, its frames go to
    every other port of the hub."""

    async def _open_backends(self) -> tuple[list[Any], Any]:
        from appliance.net.netdev import open_netdev

        return await open_netdev(self.netdev, vnet_hdr=False)

    async def open(self) -> None:
        await super().open()
        # Captures wrap the back end, so they see what it sends and is sent, as on a NIC's.
        self.port.connect_backend(self.backends[0])

    def set_link(self, up: bool) -> None:
        """QEMU's link-down netdev neither sends nor is sent anything (net/net.c); its hub
        port keeps a link state of its own. Taken before the back end is open too."""
        self.port.backend_link_up = up

    async def close(self) -> None:
        self.port.disconnect()
        await super().close()


@dataclass(eq=False)
class HubSpec:
    """One QEMU hub, for the monitor (``info network`` lists it); its ports' peers are the
    NicSpecs and HubNetdevSpecs that name them, each of which connects itself."""

    hub: Any
    name: str = "hub"

    def attach(self, builder: MachineBuilder, inst: Instance) -> None:
        return  # a hub is host-side only


def attach_nic(builder: MachineBuilder, inst: Instance, spec: NicSpec) -> None:
    from appliance.nic.virtio_net import VirtioNet

    if not spec.backends:
        raise ConfigError(f"{spec.name}: the netdev was not opened")
    if spec.device is None:
        spec.device = VirtioNet(spec.backends, spec.mac, mtu=spec.mtu, rx_queue_size=spec.rx_queue_size,
                                tx_queue_size=spec.tx_queue_size, speed=spec.speed, duplex=spec.duplex)
        spec.device.features_off = spec.features_off
    spec.transport = plug_virtio(builder, inst, spec.device, addr=spec.addr, name=spec.name)


__all__ = [
    "BlkSpec", "HubNetdevSpec", "HubSpec", "NicSpec", "PeerlessNetdevSpec", "RngSpec",
    "attach_blk", "attach_nic", "attach_rng", "fresh_queue", "plug_virtio",
]
