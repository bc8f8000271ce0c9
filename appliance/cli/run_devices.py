"""`appliance run` options for virtio devices, in QEMU's syntax.

``-drive``, ``-hda``…``-hdd``, ``-blockdev``, ``-snapshot``, ``-device``
(virtio-blk-pci, virtio-rng-pci, virtio-net-pci), ``-object`` (rng-random,
rng-builtin, filter-dump), ``-netdev``, ``-nic`` and ``-net none``.

Each option is parsed when it is met (so a bad value is reported against the
option that carries it) into a :class:`DevicePlan` kept in ``RunArgs.devices``.
References between options (``drive=``, ``netdev=``, ``rng=``, a filter's
``netdev=``) may point forward on the command line, as in QEMU, so they are
resolved only once the whole line has been read (:func:`finalize`), which
replaces the plan with the machine's DeviceSpecs, in command-line order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.cli.options import OptionDict, parse_option
from appliance.cli.run import FINALIZERS, PROG, RunArgs, option
from appliance.errors import ConfigError, HelpRequested
from appliance.machine.devices import (
    BlkSpec,
    BlockNames,
    HubNetdevSpec,
    HubSpec,
    NicSpec,
    PeerlessNetdevSpec,
    RngSpec,
)
from appliance.nic.config import MAX_NICS, take_root_bus
from appliance.pci.allocator import PciAddress, parse_pci_address, plan_slots
from appliance.pci.errors import PciError
from appliance.storage.blockdev import BlockdevConfig, DriveConfig, ImageSource, resolve_blockdev
from appliance.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC

if TYPE_CHECKING:
    from appliance.net.netdev import NetdevConfig

MAX_BLK_QUEUES = 64
MAX_BLOCK_SIZE = 2 << 20
MAX_QUEUE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class BlkDeviceConfig:
    """``-device virtio-blk-pci``."""

    SYNTAX = (
        "virtio-blk-pci,drive=<id|node>[,num-queues=n][,queue-size=n][,serial=str][,addr=slot][,id=str]"
        "[,logical_block_size=n][,physical_block_size=n][,discard=on|off][,write-zeroes=on|off]"
        "[,event_idx=on|off][,indirect_desc=on|off][,iothread=id]"
    )
    drive: str
    num_queues: int | None = None
    queue_size: int = 256
    serial: str | None = None
    addr: str | None = None
    id: str | None = None
    logical_block_size: int | None = None
    physical_block_size: int | None = None
    discard: bool = True
    write_zeroes: bool = True
    features_off: int = 0
    iothread: str | None = None

    @classmethod
    def parse(cls, o: OptionDict) -> BlkDeviceConfig:
        what = o.option
        drive = o.require("drive")
        num_queues = o.take_int("num-queues", None, minimum=1)
        if num_queues is not None and num_queues > MAX_BLK_QUEUES:
            raise ConfigError(f"{what}: num-queues={num_queues} is more than {MAX_BLK_QUEUES}")
        queue_size = o.take_int("queue-size", 256, minimum=2) or 256
        if queue_size & (queue_size - 1) or queue_size > MAX_QUEUE_SIZE:
            raise ConfigError(
                f"{what}: queue-size={queue_size} must be a power of 2 between 2 and {MAX_QUEUE_SIZE}"
            )
        logical = _block_size(o, "logical_block_size", what)
        physical = _block_size(o, "physical_block_size", what)
        if logical and physical and physical < logical:
            raise ConfigError(f"{what}: physical_block_size={physical} is smaller than "
                              f"logical_block_size={logical}")
        features_off = 0
        for name, bit in (("event_idx", VIRTIO_F_EVENT_IDX), ("indirect_desc", VIRTIO_F_INDIRECT_DESC)):
            if not o.take_bool(name, True):
                features_off |= 1 << bit
        cfg = cls(drive, num_queues, queue_size, o.take("serial"), _checked_addr(o, what), o.take("id"),
                  logical, physical, o.take_bool("discard", True), o.take_bool("write-zeroes", True),
                  features_off, o.take("iothread"))
        # Firmware-only, or QEMU tuning with nothing to tune here: accepted as QEMU does.
        for key in ("bootindex", "romfile"):
            o.take(key)
        for key in ("seg-max-adjust", "request-merging", "config-wce"):
            o.take_bool(key, True)
        if o.take_bool("scsi", False):
            raise ConfigError(f"{what}: scsi=on (SCSI passthrough) is not supported")
        o.finish()
        return cfg


def _block_size(o: OptionDict, key: str, what: str) -> int | None:
    size = o.take_int(key, None)
    # QEMU's range for block sizes: a power of two from 512 bytes to 2 MiB.
    if size is not None and (size < 512 or size > MAX_BLOCK_SIZE or size & (size - 1)):
        raise ConfigError(f"{what}: {key}={size} must be a power of two from 512 to {MAX_BLOCK_SIZE}")
    return size


@dataclass(frozen=True, slots=True)
class RngDeviceConfig:
    """``-device virtio-rng-pci``."""

    SYNTAX = "virtio-rng-pci[,rng=<object id>][,addr=slot][,id=str][,max-bytes=n][,period=ms]"
    rng: str | None = None
    addr: str | None = None
    id: str | None = None
    max_bytes: int | None = None
    period: int = 1 << 16

    @classmethod
    def parse(cls, o: OptionDict) -> RngDeviceConfig:
        what = o.option
        max_bytes = o.take_int("max-bytes", None, minimum=0)
        period = o.take_int("period", 1 << 16, minimum=1) or 1 << 16
        if max_bytes is not None and max_bytes < 1:
            raise ConfigError(f"{what}: max-bytes must be positive")
        cfg = cls(o.take("rng"), _checked_addr(o, what), o.take("id"), max_bytes, period)
        o.finish()
        return cfg


def _checked_addr(o: OptionDict, what: str) -> str | None:
    take_root_bus(o, what)
    text = o.take("addr")
    _address(text, what)
    return text


# One entry per PCI device, in command-line order.
# A NIC entry is (the option that made it, its NicConfig).
PlanEntry = DriveConfig | BlkDeviceConfig | RngDeviceConfig | tuple[str, object]


def _check_identifier(option: str, ident: str) -> None:
    from appliance.cli.options import is_identifier

    if not is_identifier(ident):
        raise ConfigError(f"{option}: Parameter 'id' expects an identifier")


@dataclass
class DevicePlan:
    """Everything the device options said, before references are resolved."""

    entries: list[PlanEntry] = field(default_factory=list)
    drives: dict[str, DriveConfig] = field(default_factory=dict)
    blockdevs: dict[str, BlockdevConfig] = field(default_factory=dict)
    netdevs: dict[str, object] = field(default_factory=dict)
    # Each netdev's option as typed ("-nic user,hostfwd=…"): what its start-up errors name, as QEMU's do.
    netdev_origin: dict[str, str] = field(default_factory=dict)
    rng_objects: dict[str, str] = field(default_factory=dict)
    # -object iothread: id -> its poll-max-ns (None: QEMU's default)
    iothreads: dict[str, int | None] = field(default_factory=dict)
    dumps: list[object] = field(default_factory=list)
    snapshot: bool = False
    net_none: bool = False
    net_names: int = 0  # names made for -nic and -net back ends without id= (#net0, #net1, …)
    # Every -net option on hub 0 in command-line order, the order QEMU gives them ports: a -net
    # nic as its index in ``entries``, a -net back end as its netdev id.
    hub_items: list[int | str] = field(default_factory=list)
    net_ids: set[str] = field(default_factory=set)  # id= of -net options
    # Clashes QEMU finds only as it makes the netdevs (ids shared across option kinds): raised
    # when the plan is resolved, after every option has been read, as QEMU's come after its
    # option parsing.
    late_errors: list[str] = field(default_factory=list)
    drive_count: dict[str, int] = field(default_factory=dict)  # -drive options per interface
    device_ids: set[str] = field(default_factory=set)  # id= of -device options
    object_ids: set[str] = field(default_factory=set)  # id= of -object options: one QOM namespace

    @property
    def hub_backends(self) -> list[str]:
        """The netdev ids of the -net back ends (on hub 0)."""
        return [i for i in self.hub_items if isinstance(i, str)]

    def add_device_id(self, ident: str | None) -> None:
        """QEMU's qdev ids: well-formed (id_wellformed) and one device each."""
        if ident is None:
            return
        _check_identifier("-device", ident)
        if ident in self.device_ids:
            raise ConfigError(f"-device: Duplicate ID '{ident}' for device")
        self.device_ids.add(ident)

    def add_object_id(self, ident: str) -> None:
        """Every -object kind shares one set of ids, as QOM's /objects container does."""
        _check_identifier("-object", ident)
        if ident in self.object_ids:
            raise ConfigError(f"-object: Duplicate ID '{ident}' for object")
        self.object_ids.add(ident)

    def add_drive(self, drive: DriveConfig) -> None:
        # QEMU names a drive without an id by its interface and its unit there: virtio0, none0, ...
        unit = self.drive_count.get(drive.interface, 0)
        self.drive_count[drive.interface] = unit + 1
        ident = drive.id or f"{drive.interface}{unit}"
        if ident in self.drives or ident in self.blockdevs:
            raise ConfigError(f"-drive: duplicate ID '{ident}' for drive")
        drive = replace(drive, id=ident)
        self.drives[ident] = drive
        if drive.interface == "virtio":
            self.entries.append(drive)


def plan_of(args: RunArgs) -> DevicePlan:
    for d in args.devices:
        if isinstance(d, DevicePlan):
            return d
    plan = DevicePlan()
    args.devices.append(plan)
    return plan


# --- options ------------------------------------------------------------------------------


@option(
    "-drive",
    "file=path[,format=raw|qcow2][,if=virtio|none][,id=][,cache=][,aio=][,readonly=][,discard=]"
    "[,serial=][,snapshot=][,addr=][,l2-cache-size=]",
    "a disk image; if=virtio (the default here: there is no IDE) makes a virtio-blk-pci disk, "
    "if=none leaves it for -device virtio-blk-pci,drive=ID; cache=none|writeback|writethrough|unsafe|"
    "directsync, aio=threads|native; without format= the image is probed (with QEMU's warning, and "
    "a probed raw image's block 0 cannot be given a qcow2 header); l2-cache-size= sizes a qcow2 "
    "image's L2 table cache as QEMU's does",
)
def _drive(a: RunArgs, v: str) -> None:
    plan_of(a).add_drive(DriveConfig.parse(v))


def _hd(letter: str) -> None:
    def apply(a: RunArgs, v: str) -> None:
        src = ImageSource(Path(v), what=f"-hd{letter} {v}")
        src.validate()
        plan_of(a).add_drive(DriveConfig(src, "virtio"))

    option(
        f"-hd{letter}", "file",
        "same as -drive file=FILE,if=virtio (a virtio disk here, not IDE)" if letter == "a"
        else "same as -hda",
    )(apply)


for _letter in "abcd":
    _hd(_letter)


@option(
    "-blockdev",
    "driver=file,node-name=N,filename=PATH[,...] | driver=raw|qcow2,node-name=N,file=FILE-NODE[,l2-cache-size=BYTES]",
    "a block node for -device virtio-blk-pci,drive=NODE (qcow2/raw over a file node, or a file node alone)",
)
def _blockdev(a: RunArgs, v: str) -> None:
    node = BlockdevConfig.parse(v)
    plan = plan_of(a)
    if node.node_name in plan.blockdevs or node.node_name in plan.drives:
        raise ConfigError(f"-blockdev: duplicate node name '{node.node_name}'")
    plan.blockdevs[node.node_name] = node


@option("-snapshot", None, "write every -drive into a temporary qcow2 overlay, discarded at exit")
def _snapshot(a: RunArgs, v: str) -> None:
    plan_of(a).snapshot = True


_NIC_DRIVERS = ("virtio-net-pci", "virtio-net")
_BLK_DRIVERS = ("virtio-blk-pci", "virtio-blk")
_RNG_DRIVERS = ("virtio-rng-pci", "virtio-rng")
# QEMU's -device help, for the devices there are here.
_DEVICE_HELP = (
    'Storage devices:\nname "virtio-blk-pci", bus PCI, alias "virtio-blk"\n\n'
    'Network devices:\nname "virtio-net-pci", bus PCI, alias "virtio-net"\n\n'
    'Misc devices:\nname "virtio-rng-pci", bus PCI, alias "virtio-rng"\n'
)


@option(
    "-device",
    "virtio-blk-pci,drive=ID[,num-queues=N][,queue-size=N][,serial=S][,addr=SLOT][,logical_block_size=N]"
    "[,physical_block_size=N][,discard=on|off][,write-zeroes=on|off][,event_idx=on|off] | "
    "virtio-rng-pci[,rng=ID][,addr=SLOT][,max-bytes=N,period=MS] | "
    "virtio-net-pci,netdev=ID[,mac=][,mq=on][,vectors=N]"
    "[,host_mtu=N][,addr=SLOT][,rx_queue_size=N][,tx_queue_size=N][,speed=MBPS][,duplex=half|full]"
    "[,csum|guest_csum|gso|host_tso4|host_tso6|"
    "guest_tso4|guest_tso6|mrg_rxbuf|ctrl_vq|…|event_idx|indirect_desc=on|off]",
    "a virtio device on PCI, slots in command-line order (num-queues defaults to one per vCPU; "
    f"at most {MAX_NICS} NICs; multiqueue NICs need mq=on and a tap with queues=N; "
    "DRIVER,help lists a driver's properties)",
)
def _device(a: RunArgs, v: str) -> None:
    from appliance.cli.options import json_pairs, keyval_text
    from appliance.nic.config import NicConfig

    if v.lstrip().startswith("{"):
        import json

        from appliance.cli.device_help import check_json_types

        try:
            obj = json.loads(v)
        except (ValueError, RecursionError):
            obj = None  # json_pairs words the refusal
        if isinstance(obj, dict):
            check_json_types(obj)
        v = keyval_text(json_pairs("-device", v))  # the rest reads key=value text
    if v in ("help", "?"):
        raise HelpRequested(_DEVICE_HELP)
    _device_property_help(v)
    o = parse_option("-device", v, implied="driver")
    driver = o.get("driver")
    if driver is None:
        raise ConfigError("-device: parameter 'driver' is missing")
    if driver.removesuffix("-non-transitional") in _NIC_DRIVERS + _BLK_DRIVERS + _RNG_DRIVERS:
        from appliance.cli.device_help import unknown_property

        missing = unknown_property(driver, list(o))
        if missing is not None:
            raise ConfigError(f"-device: {missing}")
    if driver.endswith("-non-transitional"):
        # Modern-only devices, which ours are: the same device under QEMU's other name.
        base = driver.removesuffix("-non-transitional")
        v = base + v[len(driver):] if v.startswith(driver) else v.replace(
            f"driver={driver}", f"driver={base}", 1)
        o = parse_option("-device", v, implied="driver")
        driver = base
    plan = plan_of(a)
    plan.add_device_id(o.get("id"))
    if driver in _NIC_DRIVERS:
        plan.entries.append((f"-device {driver}", NicConfig.parse_device(v)))
        return
    o.take("driver")
    o.option = f"-device {driver}"
    if driver in _BLK_DRIVERS:
        plan.entries.append(BlkDeviceConfig.parse(o))
    elif driver in _RNG_DRIVERS:
        plan.entries.append(RngDeviceConfig.parse(o))
    else:
        raise ConfigError(f"-device: driver '{driver}' is not supported")


def _device_property_help(v: str) -> None:
    """``-device DRIVER,help`` (or ``?`` among its options): the driver's properties, as QEMU lists them."""
    from appliance.cli.device_help import device_help
    from appliance.cli.options import split_option

    parts = split_option(v)
    if not any(p in ("help", "?") for p in parts[1:]):
        return
    driver = parts[0]
    for p in parts:
        if p.startswith("driver="):
            driver = p.removeprefix("driver=")
    text = device_help(driver)
    if text is None:
        raise ConfigError(f"-device: driver '{driver}' is not supported")
    raise HelpRequested(text)


@option(
    "-object",
    "rng-random,id=ID,filename=PATH | rng-builtin,id=ID | filter-dump,id=ID,netdev=ID,file=PATH[,maxlen=N]"
    " | iothread,id=ID[,poll-max-ns=NS]",
    "an entropy source for virtio-rng-pci, a pcap capture of a netdev, or an I/O thread for "
    "virtio-blk-pci,iothread=ID (its poll-max-ns bounds how long disk completions are polled for)",
)
def _object(a: RunArgs, v: str) -> None:
    from appliance.cli.json_types import OBJECT, check_text
    from appliance.nic.config import FilterDumpConfig

    plan = plan_of(a)
    check_text("-object", v, OBJECT, closed=True)
    o = parse_option("-object", v, implied="qom-type")
    kind = o.get("qom-type")
    if kind == "filter-dump":
        dump = FilterDumpConfig.parse(v)
        plan.add_object_id(dump.id)
        plan.dumps.append(dump)
        return
    if kind == "iothread":
        _iothread(plan, o)
        return
    if kind not in ("rng-random", "rng-builtin"):
        raise ConfigError(f"-object: type '{kind}' is not supported "
                          "(rng-random, rng-builtin, filter-dump, iothread)")
    o.take("qom-type")
    o.option = f"-object {kind}"
    ident = o.require("id")
    filename = o.take("filename", "/dev/urandom") if kind == "rng-random" else "/dev/urandom"
    o.finish()
    plan.add_object_id(ident)
    if not filename:
        raise ConfigError(f"-object {kind}: filename is empty")
    plan.rng_objects[ident] = filename


def _iothread(plan: DevicePlan, o: OptionDict) -> None:
    """``-object iothread`` (storage.poll.parse_iothread)."""
    from appliance.storage import poll

    o.take("qom-type")
    o.option = "-object iothread"
    ident, value = poll.parse_iothread(o)
    plan.add_object_id(ident)
    plan.iothreads[ident] = value


@option(
    "-netdev", "tap|bridge|dgram|socket|stream|user,id=ID[,...] | hubport,id=ID,hubid=N[,netdev=ID]",
    "a host network back end for -device virtio-net-pci, or a port of hub N (frames repeated to every port)",
)
def _netdev(a: RunArgs, v: str) -> None:
    from appliance.net.netdev import parse_netdev

    _add_netdev(plan_of(a), parse_netdev(v), "-netdev", v)


def _netdev_order(plan: DevicePlan) -> dict[str, int]:
    """Each netdev's place in the order QEMU makes them (net_init_clients): the "modern"
    -netdevs first (the JSON form, and stream and dgram in any form: netdev_is_modern), then
    the other -netdevs, every -nic, and every -net, each kind in command-line order. ``info
    usernet`` lists user networks so, ``hostfwd_add`` without an id takes the first, and a
    hub port finds only the netdevs made before it."""
    def rank(ident: str) -> int:
        option, _, text = plan.netdev_origin.get(ident, "").partition(" ")
        return _creation_rank(option, text, plan.netdevs[ident])

    ids = sorted(plan.netdevs, key=rank)
    return {n: i for i, n in enumerate(ids)}


def _creation_rank(option: str, text: str, cfg: object) -> int:
    """When QEMU makes a netdev of ``option``: 0 a modern -netdev, 1 another -netdev, 2 -nic, 3 -net."""
    from appliance.net.netdev import DgramNetdev, StreamNetdev

    if option == "-netdev":
        modern = text.lstrip().startswith("{") or (
            isinstance(cfg, StreamNetdev | DgramNetdev) and cfg.form != "socket")
        return 0 if modern else 1
    return {"-nic": 2, "-net": 3}.get(option, 1)


def _add_netdev(plan: DevicePlan, cfg: NetdevConfig, option: str, text: str) -> None:
    """One table of netdev ids for -netdev and -nic (whose id= names its netdev, as in QEMU)."""
    if cfg.id in plan.netdevs:
        # QEMU's words: two of one QemuOpts group clash as it reads them ("for netdev", "for
        # nic"). Across groups, or with a modern -netdev (JSON, stream, dgram), the net layer
        # finds the clash as it makes the second of them, blamed in its words.
        first = plan.netdev_origin.get(cfg.id, "")
        first_option, _, first_text = first.partition(" ")
        then = _creation_rank(first_option, first_text, plan.netdevs[cfg.id])
        now = _creation_rank(option, text, cfg)
        if now == then and now in (1, 2):
            raise ConfigError(f"{option} {text}: Duplicate ID '{cfg.id}' for {option[1:]}")
        blamed = f"{option} {text}" if now >= then else first
        plan.late_errors.append(f"{blamed}: Duplicate ID '{cfg.id}'")
        return
    plan.netdevs[cfg.id] = cfg
    plan.netdev_origin[cfg.id] = f"{option} {text}"


@option("-nic", "TYPE[,netdev options][,model=virtio-net-pci][,mac=][,addr=] | none", "a NIC and its netdev in one")
def _nic(a: RunArgs, v: str) -> None:
    from appliance.nic.config import parse_nic

    plan = plan_of(a)
    netdev, nic = parse_nic(v, plan.net_names)
    plan.net_names += 1
    if netdev is None or nic is None:
        plan.net_none = True
        return
    _add_netdev(plan, netdev, "-nic", v)
    plan.entries.append(("-nic", nic))


@option(
    "-net", "nic[,model=virtio-net-pci][,macaddr=][,addr=][,netdev=ID] | TYPE[,netdev options] | none",
    "QEMU's legacy NICs and back ends, all joined on hub 0; or none: no NICs (the default)",
)
def _net(a: RunArgs, v: str) -> None:
    from appliance.net.netdev import parse_netdev, user_flags
    from appliance.nic.config import parse_legacy_nic

    plan = plan_of(a)
    o = parse_option("-net", v, implied="type", flags=user_flags(v))
    kind = o.get("type")
    if kind == "none":
        o.take("type")
        o.finish()
        plan.net_none = True
    elif kind == "nic":
        nic = parse_legacy_nic(v)
        _claim_net_id(plan, nic.id)
        if nic.hub:
            plan.hub_items.append(len(plan.entries))
        plan.entries.append(("-net nic", nic))
    else:
        # A back end on hub 0: named by id=, else given a name no option can write (QEMU's are
        # "#net" and a number too).
        given = o.get("id")
        _claim_net_id(plan, given)
        netdev = parse_netdev(v, "-net", implicit_id=None if given is not None else f"#net{plan.net_names}")
        plan.net_names += given is None
        _add_netdev(plan, netdev, "-net", v)
        plan.hub_items.append(netdev.id)


def _claim_net_id(plan: DevicePlan, ident: str | None) -> None:
    """-net options share one id namespace (QEMU's "net" option group), NICs and back ends alike."""
    if ident is None:
        return
    if ident in plan.net_ids:
        raise ConfigError(f"-net: Duplicate ID '{ident}' for net")
    plan.net_ids.add(ident)


@dataclass
class HubLayout:
    """The hubs of a command line and who is on which port (QEMU's net/hub.c)."""

    hubs: list[Any] = field(default_factory=list)  # in the order QEMU makes them
    nic_ports: dict[int, Any] = field(default_factory=dict)  # a -net nic's entry index -> its port
    netdev_ports: dict[str, Any] = field(default_factory=dict)  # a back end's id -> the port it is peer of
    hubport_ports: dict[str, Any] = field(default_factory=dict)  # a -netdev hubport's id -> its port
    pair_port: int = 0  # a -net nic and -net back end alone on hub 0: the NIC's port (0 or 1)


def _plan_hubs(plan: DevicePlan, order: dict[str, int]) -> HubLayout:
    """Make the hubs, their ports numbered in QEMU's order (every ``-netdev hubport``, then each
    ``-nic hubport``, then the ``-net`` options), and find each port's peer.

    One ``-net nic`` and one ``-net`` back end alone on hub 0, the common legacy line, stay a
    straight link: the NIC gets the back end itself, with its offloads, which is what a hub of
    two ports forwards anyway. Anything else goes through :class:`appliance.net.hub.Hub`.
    """
    from appliance.net.hub import Hub, join_hubports
    from appliance.nic.config import NicConfig

    layout = HubLayout()
    made = sorted(plan.netdevs, key=order.__getitem__)
    layout.hubs, layout.hubport_ports, layout.netdev_ports = join_hubports(
        ((n, plan.netdevs[n]) for n in made), lambda n: plan.netdev_origin.get(n, f"-netdev {n}"))
    nics = [i for i in plan.hub_items if isinstance(i, int)]
    pair = len(plan.hub_items) == 2 and len(nics) == 1 and not any(h.id == 0 for h in layout.hubs)
    if pair:
        index = nics[0]
        entry = plan.entries[index]
        assert isinstance(entry, tuple) and isinstance(entry[1], NicConfig)
        backend = next(i for i in plan.hub_items if isinstance(i, str))
        plan.entries[index] = (entry[0], replace(entry[1], netdev=backend))
        layout.pair_port = plan.hub_items.index(index)
        return layout
    hub0 = next((h for h in layout.hubs if h.id == 0), None)
    if hub0 is None and plan.hub_items:
        hub0 = Hub(0)
        layout.hubs.append(hub0)
    for item in plan.hub_items:
        assert hub0 is not None
        port = hub0.add_port()
        if isinstance(item, int):
            layout.nic_ports[item] = port
        else:
            layout.netdev_ports[item] = port
    return layout


def _hub_warnings(layout: HubLayout, nic_ports: set[Any], plan: DevicePlan) -> None:
    """QEMU's net_hub_check_clients: hubs newest first, each one's ports newest first."""
    from appliance.net.netdev import BridgeNetdev, DgramNetdev, StreamNetdev, TapNetdev, UserNetdev

    host = TapNetdev | BridgeNetdev | DgramNetdev | StreamNetdev | UserNetdev
    peers = {port: ident for ident, port in layout.netdev_ports.items()}
    for hub in reversed(layout.hubs):
        has_nic = has_host = False
        for port in reversed(hub.ports):
            if port in nic_ports:
                has_nic = True
            elif port in peers:
                has_host = has_host or isinstance(plan.netdevs[peers[port]], host)
            else:
                print(f"{PROG}: warning: hub port {port.name} has no peer", file=sys.stderr)
        if has_host and not has_nic:
            print(f"{PROG}: warning: hub {hub.id} with no nics", file=sys.stderr)
        if has_nic and not has_host:
            print(f"{PROG}: warning: hub {hub.id} is not connected to host network", file=sys.stderr)


# --- resolving ----------------------------------------------------------------------------


def _address(text: str | None, what: str) -> PciAddress | None:
    if text is None:
        return None
    try:
        return parse_pci_address(text)
    except PciError as err:
        raise ConfigError(f"{what}: {err}") from None


def _board_rank(entry: PlanEntry) -> int:
    """When QEMU makes a NIC: those of -nic first (its nic pass fills nd_table), then those of
    -net nic (the net pass), then every -device and -drive in command-line order."""
    if isinstance(entry, tuple) and entry[0] in ("-nic", "-net nic"):
        return 0 if entry[0] == "-nic" else 1
    return 2


def _qom_paths(entries: list[PlanEntry]) -> list[str]:
    """Each entry's QOM path as QEMU 7.2 gives it ("" for the board's NICs, which are no peripherals).

    A ``-device`` with an id is ``/machine/peripheral/ID``; the others are
    ``/machine/peripheral-anon/device[N]``, numbered over the ``-device``
    options in order and then over the ``-drive if=virtio`` disks, whose
    devices QEMU makes after every ``-device``.
    """
    paths = [""] * len(entries)
    anonymous: list[int] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, DriveConfig):
            continue
        if isinstance(entry, tuple):
            if not entry[0].startswith("-device"):
                continue  # -nic, -net nic
            ident = getattr(entry[1], "id", None)
        else:
            ident = entry.id
        if ident:
            paths[i] = f"/machine/peripheral/{ident}"
        else:
            anonymous.append(i)
    anonymous += [i for i, entry in enumerate(entries) if isinstance(entry, DriveConfig)]
    for n, i in enumerate(anonymous):
        paths[i] = f"/machine/peripheral-anon/device[{n}]"
    return paths


def resolve(plan: DevicePlan) -> list[object]:
    """The DeviceSpecs of ``plan`` in command-line order.

    virtio-blk ``num-queues`` left unset becomes one per vCPU when the disk
    is attached (the machine config knows the vCPU count).

    :raises ConfigError: On a dangling or doubly used reference, a slot
        clash, too many NICs, or one file written by two devices.
    """
    from appliance.net.netdev import HubportNetdev, Unplugged
    from appliance.nic.config import NicConfig, default_mac

    if plan.late_errors:
        raise ConfigError(plan.late_errors[0])
    order = _netdev_order(plan)
    layout = _plan_hubs(plan, order)
    dumps = order_dumps(plan)
    for ident, captures in dumps.items():
        cfg = plan.netdevs[ident]
        if isinstance(cfg, HubportNetdev) and cfg.netdev is not None:
            raise ConfigError(f"-object filter-dump,id={captures[0].id},netdev={ident}: hub port '{ident}' "
                              f"has netdev '{cfg.netdev}' for its peer; capture on '{cfg.netdev}'")
    specs: list[object] = []
    addrs: list[PciAddress | None] = []
    used_drives: dict[str, str] = {}
    used_netdevs: set[str] = set()
    nic_ports: set[Any] = set()  # hub ports with a NIC on them
    unplugged: list[str] = []  # NICs without a netdev, by name
    writers: dict[str, str] = {}
    macs = 0
    nics = 0
    poll_ceilings: list[int | None] = []
    qom_paths = _qom_paths(plan.entries)
    drive_order = {ident: i for i, ident in enumerate(plan.drives)}

    def claim(name: str, by: str) -> None:
        if name in used_drives:
            raise ConfigError(f"{by}: drive '{name}' is already in use by {used_drives[name]}")
        used_drives[name] = by

    def check_writer(src: ImageSource, by: str) -> None:
        if not src.writes_file:
            return
        key = str(src.path.resolve())
        if key in writers:
            raise ConfigError(
                f"{by}: '{src.path}' is already opened for writing by {writers[key]} "
                "(Failed to get \"write\" lock)"
            )
        writers[key] = by

    # QEMU's board makes the NICs of -nic and -net nic while it builds the machine, before any
    # -device or -drive if=virtio: they take the first free slots and default MACs, wherever
    # they stand on the command line (so eth0 is the same NIC as under QEMU).
    for index, entry in sorted(enumerate(plan.entries),
                               key=lambda ie: _board_rank(ie[1])):
        if isinstance(entry, DriveConfig):
            assert entry.id is not None
            what = f"-drive {entry.id}"
            claim(entry.id, what)
            src = _with_global_snapshot(entry.source, plan.snapshot)
            check_writer(src, what)
            addr = _address(entry.addr, what)
            specs.append(BlkSpec(src, num_queues=None, serial=entry.serial, addr=addr,
                                 name=f"virtio-blk {entry.id}",
                                 names=BlockNames(drive=entry.id, qom_path=qom_paths[index],
                                                  order=drive_order[entry.id])))
            addrs.append(addr)
        elif isinstance(entry, BlkDeviceConfig):
            what = "-device virtio-blk-pci"
            if entry.iothread is not None:
                if entry.iothread not in plan.iothreads:
                    raise ConfigError(f"{what}: Property 'virtio-blk-device.iothread' can't find "
                                      f"value '{entry.iothread}'")
                poll_ceilings.append(plan.iothreads[entry.iothread])
            drive = plan.drives.get(entry.drive)
            if drive is not None:
                if drive.interface != "none":
                    raise ConfigError(
                        f"{what}: drive '{entry.drive}' is already in use because it has been "
                        "automatically connected to another device (use if=none)"
                    )
                src = _with_global_snapshot(drive.source, plan.snapshot)
                serial = drive.serial
                names = BlockNames(drive=entry.drive, qom_path=qom_paths[index], order=drive_order[entry.drive])
            else:
                src = resolve_blockdev(plan.blockdevs, entry.drive, what=f"{what},drive={entry.drive}")
                serial = ""
                # QEMU makes this disk's backend when it makes the device, after every -drive's.
                names = BlockNames(node_name=entry.drive, driver=plan.blockdevs[entry.drive].driver,
                                   qom_path=qom_paths[index], order=len(plan.drives) + index)
            claim(entry.drive, what)
            check_writer(src, f"{what},drive={entry.drive}")
            addr = _address(entry.addr, what)
            specs.append(BlkSpec(
                src, num_queues=entry.num_queues, queue_size=entry.queue_size,
                serial=entry.serial if entry.serial is not None else serial, addr=addr,
                name=f"virtio-blk {entry.id or entry.drive}",
                logical_block_size=entry.logical_block_size, physical_block_size=entry.physical_block_size,
                discard=entry.discard, write_zeroes=entry.write_zeroes, features_off=entry.features_off,
                names=names,
            ))
            addrs.append(addr)
        elif isinstance(entry, RngDeviceConfig):
            what = "-device virtio-rng-pci"
            filename = "/dev/urandom"
            if entry.rng is not None:
                if entry.rng not in plan.rng_objects:
                    raise ConfigError(f"{what}: rng object '{entry.rng}' not found")
                filename = plan.rng_objects[entry.rng]
            addr = _address(entry.addr, what)
            specs.append(RngSpec(filename, addr=addr, name=f"virtio-rng {entry.id or ''}".rstrip(),
                                 max_bytes=entry.max_bytes, period_ms=entry.period))
            addrs.append(addr)
        else:
            nic = entry[1]
            assert isinstance(nic, NicConfig)
            what = entry[0]  # the option that made the NIC, for its errors
            nics += 1
            if nics > MAX_NICS:
                raise ConfigError(f"{what}: more than {MAX_NICS} NICs (the limit of one VM)")
            # Without an id, QEMU's name for it (model.N, N counting the NICs made before
            # it): what info network shows and set_link takes. A -net nic's id= names its
            # option, not its NIC, in QEMU.
            name = (entry[0] != "-net nic" and nic.id) or f"virtio-net-pci.{nics - 1}"
            if entry[0] == "-net nic" and nic.id in plan.netdevs:
                raise ConfigError(f"{what}: Duplicate ID '{nic.id}'")  # the net layer's clash
            port = layout.nic_ports.get(index)
            netdev: Any
            if port is not None:
                netdev = HubportNetdev(port.name, port.hub.id)  # a -net nic: a port of hub 0
            elif not nic.netdev and not nic.hub:
                netdev = Unplugged()  # -device virtio-net-pci with no netdev=
                unplugged.append(name)
            else:
                netdev = plan.netdevs.get(nic.netdev)
                if netdev is None:
                    if what.startswith("-device"):  # qdev's words for its netdev property
                        raise ConfigError(f"{what}: Property 'virtio-net-device.netdev' can't find value "
                                          f"'{nic.netdev}'")
                    raise ConfigError(f"{what}: netdev '{nic.netdev}' not found")
                if ((nic.netdev in plan.hub_backends or nic.netdev in layout.netdev_ports) and not nic.hub
                        or isinstance(netdev, HubportNetdev) and netdev.netdev is not None
                        or nic.netdev in used_netdevs):
                    # The netdev is a hub port's peer already, or the hub port has a back end
                    # for its peer, or another NIC has it (QEMU's words for each).
                    raise ConfigError(f"{what}: Property 'virtio-net-device.netdev' can't take value "
                                      f"'{nic.netdev}', it's in use")
                used_netdevs.add(nic.netdev)
                if isinstance(netdev, HubportNetdev):
                    port = layout.hubport_ports[nic.netdev]
            if port is not None:
                nic_ports.add(port)
            queues = int(getattr(netdev, "queues", 1) or 1)
            if port is not None and nic.mq:
                raise ConfigError(f"{what}: mq=on needs a multiqueue tap; a hub port has one queue")
            if queues > 1 and not nic.mq:
                raise ConfigError(
                    f"{what}: netdev '{nic.netdev}' has queues={queues}; add mq=on to use them"
                )
            if nic.vectors is not None and nic.vectors < 2 * queues + 2:
                raise ConfigError(
                    f"{what}: vectors={nic.vectors} is fewer than the {2 * queues + 2} this NIC needs "
                    "(MSI-X only; INTx is not supported)"
                )
            mac = nic.mac
            if mac is None:
                mac = default_mac(macs)
                macs += 1
            captures = dumps.get(netdev.id, [])
            addr = _address(nic.addr, what)
            specs.append(NicSpec(
                netdev, mac, queues=queues, mtu=nic.host_mtu, addr=addr, captures=captures,  # type: ignore[arg-type]
                features_off=nic.features_off, rx_queue_size=nic.rx_queue_size, tx_queue_size=nic.tx_queue_size,
                speed=nic.speed, duplex=nic.duplex,
                name=f"virtio-net {name}",
                hub=port.hub.id if port is not None else 0 if nic.hub else -1, hub_port=layout.pair_port,
                origin=plan.netdev_origin.get(nic.netdev, ""), netdev_order=order.get(netdev.id, len(order)),
                port=port,
            ))
            addrs.append(addr)
    # QEMU warns of these and runs, with the netdev open all the same: its hubs' loose ends
    # first, then each netdev and NIC without a peer, in the order they were made.
    _hub_warnings(layout, nic_ports, plan)
    for n in sorted(plan.netdevs, key=order.__getitem__):
        cfg = plan.netdevs[n]
        if n in used_netdevs or (isinstance(cfg, HubportNetdev) and cfg.netdev is not None):
            continue
        if n not in layout.netdev_ports:
            print(f"{PROG}: warning: netdev {n} has no peer", file=sys.stderr)
        if isinstance(cfg, HubportNetdev):
            continue  # a port with nothing on it: its hub lists it
        spec_type = HubNetdevSpec if n in layout.netdev_ports else PeerlessNetdevSpec
        hub_port = layout.netdev_ports.get(n)
        specs.append(spec_type(
            cfg, origin=plan.netdev_origin.get(n, ""), name=f"netdev {n}",  # type: ignore[arg-type]
            captures=dumps.get(n, []), netdev_order=order[n],
            hub=hub_port.hub.id if hub_port is not None else -1, port=hub_port,
        ))
    for name in unplugged:
        print(f"{PROG}: warning: nic {name} has no peer", file=sys.stderr)
    specs.extend(HubSpec(hub, name=f"hub {hub.id}") for hub in layout.hubs)
    try:
        plan_slots(addrs)
    except PciError as err:
        raise ConfigError(f"-device: {err}") from None
    from appliance.storage import poll

    poll.bound_by_iothreads(poll_ceilings)
    return specs


def order_dumps(plan: DevicePlan) -> dict[str, list[Any]]:
    """Each netdev's filter-dumps in the order of its filter list, as QEMU 7.2 makes them: in
    command-line order, after every netdev and before any device (qemu_create_late_backends),
    each put where its ``position``/``insert`` say.

    :raises ConfigError: for a netdev or a ``position=id=`` that names nothing, in QEMU's words.
    """
    from appliance.nic.config import FilterDumpConfig

    others = plan.object_ids - {d.id for d in plan.dumps if isinstance(d, FilterDumpConfig)}
    made: set[str] = set()
    lists: dict[str, list[Any]] = {}
    for d in plan.dumps:
        assert isinstance(d, FilterDumpConfig)
        if d.netdev not in plan.netdevs:
            # netfilter_complete's words; QEMU names no option with them, we name the value
            # (the project's rule for bad input).
            raise ConfigError(f"-object filter-dump,id={d.id},netdev={d.netdev}: "
                              "Parameter 'netdev' expects a network backend id")
        captures = lists.setdefault(d.netdev, [])
        captures.insert(d.place(captures, others | made), d)
        made.add(d.id)
    return lists


def _with_global_snapshot(src: ImageSource, snapshot: bool) -> ImageSource:
    return replace(src, snapshot=True) if snapshot and not src.snapshot else src


def finalize(args: RunArgs) -> None:
    """Replace the plan in ``args.devices`` with its DeviceSpecs."""
    for i, d in enumerate(args.devices):
        if isinstance(d, DevicePlan):
            args.devices[i : i + 1] = resolve(d)
            return


if finalize not in FINALIZERS:
    FINALIZERS.append(finalize)
