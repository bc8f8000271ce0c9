"""NIC options in QEMU's syntax: ``-device virtio-net-pci``, ``-nic``, ``-net none``
and ``-object filter-dump``.

MACs default to QEMU's sequence, 52:54:00:12:34:56 for the first NIC and the
last byte counting up for each further one, so a lab's addresses are stable
from run to run and match what the same command line gives under QEMU.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from appliance.cli.options import OptionDict, is_identifier, parse_option
from appliance.errors import ConfigError, HelpRequested
from appliance.net.netdev import NetdevConfig, parse_netdev, user_flags
from appliance.nic import constants as C
from appliance.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC

# Every NIC takes one PCI slot; bus 0 has 32, of which the host bridge and the
# other devices of a lab VM take a few. 24 NICs per VM leaves room for disks.
MAX_NICS = 24
MAX_QUEUE_PAIRS = 16
DEFAULT_MAC_BASE = bytes.fromhex("525400123456")
# QEMU's qdev MAC property takes ":" or "-" between the six bytes.
_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")
# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.' and '_'.


# QEMU's virtio-net-pci properties that switch a feature bit (virtio 1.2 §5.1.3).
FEATURE_PROPERTIES: dict[str, int] = {
    "csum": C.F_CSUM, "guest_csum": C.F_GUEST_CSUM,
    "guest_tso4": C.F_GUEST_TSO4, "guest_tso6": C.F_GUEST_TSO6, "guest_ecn": C.F_GUEST_ECN,
    "guest_ufo": C.F_GUEST_UFO, "host_tso4": C.F_HOST_TSO4, "host_tso6": C.F_HOST_TSO6,
    "host_ecn": C.F_HOST_ECN, "host_ufo": C.F_HOST_UFO, "mrg_rxbuf": C.F_MRG_RXBUF,
    "status": C.F_STATUS, "ctrl_vq": C.F_CTRL_VQ, "ctrl_rx": C.F_CTRL_RX, "ctrl_vlan": C.F_CTRL_VLAN,
    "guest_announce": C.F_GUEST_ANNOUNCE, "ctrl_mac_addr": C.F_CTRL_MAC_ADDR,
    "ctrl_guest_offloads": C.F_CTRL_GUEST_OFFLOADS,
    "event_idx": VIRTIO_F_EVENT_IDX, "indirect_desc": VIRTIO_F_INDIRECT_DESC,
}
# Properties QEMU has for features this device never offers: "off" is what it does anyway.
ABSENT_FEATURES = ("gso", "ctrl_rx_extra", "rss", "hash", "guest_rsc_ext", "guest_uso4", "guest_uso6", "host_uso")

# QEMU reads any bare key as ``key=on``; speed and duplex then refuse "on" in their own words.
_DEVICE_FLAGS = ("mq", "disable-legacy", "disable-modern", "speed", "duplex", *FEATURE_PROPERTIES,
                 *ABSENT_FEATURES)
DUPLEXES = ("half", "full")
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1

# §5.1.3.1: a feature offered without the one it needs is not offered at all.
_NEEDS: tuple[tuple[int, int], ...] = (
    (C.F_GUEST_TSO4, 1 << C.F_GUEST_CSUM), (C.F_GUEST_TSO6, 1 << C.F_GUEST_CSUM),
    (C.F_GUEST_UFO, 1 << C.F_GUEST_CSUM),
    (C.F_GUEST_ECN, 1 << C.F_GUEST_TSO4 | 1 << C.F_GUEST_TSO6),
    (C.F_HOST_TSO4, 1 << C.F_CSUM), (C.F_HOST_TSO6, 1 << C.F_CSUM), (C.F_HOST_UFO, 1 << C.F_CSUM),
    (C.F_HOST_ECN, 1 << C.F_HOST_TSO4 | 1 << C.F_HOST_TSO6),
    (C.F_CTRL_RX, 1 << C.F_CTRL_VQ), (C.F_CTRL_VLAN, 1 << C.F_CTRL_VQ),
    (C.F_GUEST_ANNOUNCE, 1 << C.F_CTRL_VQ), (C.F_MQ, 1 << C.F_CTRL_VQ),
    (C.F_CTRL_MAC_ADDR, 1 << C.F_CTRL_VQ), (C.F_CTRL_GUEST_OFFLOADS, 1 << C.F_CTRL_VQ),
)


def close_features_off(off: int) -> int:
    """``off`` and every feature that needs one of them (with ECN: both it can stand on)."""
    changed = True
    while changed:
        changed = False
        for bit, need in _NEEDS:
            if not off >> bit & 1 and (off & need) == need:
                off |= 1 << bit
                changed = True
    return off


def _features_off(opts: OptionDict) -> int:
    off = 0
    for name, bit in FEATURE_PROPERTIES.items():
        if not opts.take_bool(name, True):
            off |= 1 << bit
    for name in ABSENT_FEATURES:
        opts.take_bool(name, False)
    return close_features_off(off)


def _queue_size(opts: OptionDict, key: str, what: str) -> int | None:
    size = opts.take_int(key, None)
    # QEMU's bounds: a power of two from 256 to 1024.
    if size is not None and (size < 256 or size > 1024 or size & (size - 1)):
        raise ConfigError(f"{what}: {key}={size} must be a power of two from 256 to 1024")
    return size


def _take_int32(opts: OptionDict, key: str) -> int | None:
    """A qdev int32 property as QEMU 7.2's keyval visitor reads it (``qemu_strtoi64``, base 0:
    ``0x`` hex, a leading ``0`` octal, a sign), with its words for what it refuses."""
    from appliance.qemu_numbers import NumberError, strtoi64

    text = opts.take(key)
    if text is None:
        return None
    try:
        value = strtoi64(text)
    except NumberError:
        raise ConfigError(f"{opts.option}: Parameter '{key}' expects integer") from None
    if not INT32_MIN <= value <= INT32_MAX:
        raise ConfigError(f"{opts.option}: Parameter '{key}' expects int32_t")
    return value


def _speed_duplex(opts: OptionDict, what: str) -> tuple[int | None, str | None]:
    """``speed=`` (Mbit/s) and ``duplex=half|full``, checked as virtio_net_device_realize does:
    duplex first, then a speed below -1 (QEMU's "unknown", the default). Returns None for unknown."""
    speed = _take_int32(opts, "speed")
    duplex = opts.take("duplex")
    if duplex is not None and duplex not in DUPLEXES:
        raise ConfigError(f"{what}: 'duplex' must be 'half' or 'full'")
    if speed is not None and speed < -1:
        raise ConfigError(f"{what}: 'speed' must be between 0 and INT_MAX")
    return (None if speed is None or speed < 0 else speed), duplex


# QEMU's names for bus 0: pcie.0 on q35 and microvm, pci.0 on pc. Every
# machine here has the one bus 0, so either names it.
ROOT_BUSES = ("pcie.0", "pci.0")


def take_root_bus(opts: OptionDict, what: str) -> None:
    """``bus=``: only the root bus exists (devices go on bus 0, no bridges).

    Also the legacy/modern switches every virtio PCI device takes: ours are
    modern only (virtio 1.2 §4.1.2.1, device IDs 0x1040 + type), what QEMU
    calls non-transitional, so only settings that agree are taken.
    """
    bus = opts.take("bus")
    if bus is not None and bus not in ROOT_BUSES:
        raise ConfigError(f"{what}: Bus '{bus}' not found (only pcie.0 / pci.0)")
    if opts.take("disable-legacy", "on") not in ("on", "auto", "true", "yes"):
        raise ConfigError(f"{what}: disable-legacy=off: only the modern (virtio 1.x) interface "
                          "exists here")
    if opts.take_bool("disable-modern", False):
        raise ConfigError(f"{what}: disable-modern=on: only the modern (virtio 1.x) interface "
                          "exists here")


def parse_mac(text: str, what: str, form: str = "-device") -> bytes:
    """A NIC's MAC, refused in the words QEMU 7.2 uses for ``form``'s:

    - ``-device`` (qdev's MAC property): "Property 'virtio-net-device.mac' doesn't take value
      …"; a multicast address is taken, as QEMU takes it (Linux's driver then makes up one);
    - ``-nic`` and ``-net`` (net_parse_macaddr): "invalid syntax for ethernet address", and a
      multicast address is refused. Their reason names no value: ``what`` should be the
      option as typed, which does.
    """
    if not _MAC.match(text):
        if form == "-device":
            raise ConfigError(f"{what}: Property 'virtio-net-device.mac' doesn't take value '{text}'")
        raise ConfigError(f"{what}: invalid syntax for ethernet address")
    mac = bytes.fromhex(text.replace(":", "").replace("-", ""))
    if mac[0] & 1 and form != "-device":
        # -net nic's check in net_init_nic words it with the reason; -nic's (net_param_nic) without.
        tail = " (odd 1st byte)" if form == "-net" else ""
        raise ConfigError(f"{what}: NIC cannot have multicast MAC address{tail}")
    return mac


def default_mac(index: int) -> bytes:
    """QEMU's default MAC for the ``index``-th NIC (0-based)."""
    return DEFAULT_MAC_BASE[:5] + bytes([(DEFAULT_MAC_BASE[5] + index) & 0xFF])


@dataclass(frozen=True, slots=True)
class NicConfig:
    SYNTAX: ClassVar[str] = (
        "virtio-net-pci[,netdev=id][,id=str][,mac=52:54:00:xx:xx:xx][,mq=on|off][,vectors=n]"
        "[,host_mtu=n][,addr=slot[.fn]][,rx_queue_size=n][,tx_queue_size=n][,speed=mbps][,duplex=half|full]"
        "[,csum|guest_csum|host_tso4|guest_tso4|…|mrg_rxbuf|ctrl_vq|event_idx|indirect_desc=on|off]"
    )
    netdev: str
    id: str | None = None
    mac: bytes | None = None
    mq: bool = False
    vectors: int | None = None
    host_mtu: int | None = None
    addr: str | None = None
    features_off: int = 0
    rx_queue_size: int | None = None
    tx_queue_size: int | None = None
    # VIRTIO_NET_F_SPEED_DUPLEX (virtio 1.2 §5.1.4): offered when either is known, as in QEMU.
    speed: int | None = None  # Mbit/s; None: unknown (QEMU's speed=-1)
    duplex: str | None = None  # "half" | "full"; None: unknown
    hub: bool = False  # a -net nic on hub 0: ``netdev`` is the hub's back end, filled in when known

    @classmethod
    def parse_device(cls, opts_text: str) -> NicConfig:
        """Parse the text after ``-device`` (the driver must be virtio-net-pci)."""
        # Bare boolean properties (``mq`` for ``mq=on``) are taken, with QEMU 7.2's deprecation warning.
        opts = parse_option("-device", opts_text, implied="driver", flags=_DEVICE_FLAGS, warn_flags=True)
        driver = opts.take("driver")
        if driver not in ("virtio-net-pci", "virtio-net"):
            raise ConfigError(f"-device: '{driver}' is not a NIC")
        what = f"-device {driver}"
        opts.option = what
        # QEMU makes a NIC without netdev= too, warning that it "has no peer": its cable goes nowhere.
        netdev = opts.take("netdev")
        if netdev == "":
            raise ConfigError(f"{what}: Property 'virtio-net-device.netdev' can't find value ''")
        netdev = netdev or ""
        mac_text = opts.take("mac")
        mtu = opts.take_int("host_mtu", None, minimum=68)
        if mtu is not None and mtu > 65535:
            raise ConfigError(f"{what}: host_mtu={mtu} is larger than 65535")
        vectors = opts.take_int("vectors", None, minimum=0)
        speed, duplex = _speed_duplex(opts, what)
        take_root_bus(opts, what)
        cfg = cls(
            netdev=netdev,
            id=opts.take("id"),
            mac=parse_mac(mac_text, what) if mac_text is not None else None,
            mq=opts.take_bool("mq", False),
            vectors=vectors,
            host_mtu=mtu,
            addr=opts.take("addr"),
            features_off=_features_off(opts),
            rx_queue_size=_queue_size(opts, "rx_queue_size", what),
            tx_queue_size=_queue_size(opts, "tx_queue_size", what),
            speed=speed,
            duplex=duplex,
        )
        if cfg.mq and cfg.features_off >> C.F_CTRL_VQ & 1:
            raise ConfigError(f"{what}: mq=on needs ctrl_vq (multiqueue is set up on the control queue)")
        for flag in ("romfile", "bootindex"):
            opts.take(flag)  # firmware-only; nothing boots from a NIC here
        if not opts.take_bool("disable-legacy", True) or opts.take_bool("disable-modern", False):
            raise ConfigError(f"{what}: only the modern (virtio 1.x) interface exists here")
        opts.finish()
        return cfg


# What `model=help` lists: the names QEMU lists that are ours (QEMU's list has every NIC it emulates).
HELP_MODELS = ("virtio-net-pci", "virtio-net-pci-non-transitional")


def check_model(model: str | None, what: str) -> None:
    """A NIC ``model=`` of ``-nic`` or ``-net nic``: QEMU's virtio-net names only.

    :raises ConfigError: naming any other model (e1000, rtl8139, …).
    """
    if model in ("help", "?"):
        raise HelpRequested("Supported NIC models:\n" + "".join(f"{m}\n" for m in HELP_MODELS))
    if model not in ("virtio-net-pci", "virtio", "virtio-net", "virtio-net-pci-non-transitional",
                     "virtio-non-transitional"):
        raise ConfigError(f"{what}: model '{model}' is not supported (virtio-net-pci only)")


def parse_legacy_nic(text: str) -> NicConfig:
    """``-net nic[,model=virtio][,macaddr=…][,addr=…][,vectors=n][,netdev=ID][,id=…]`` (QEMU's
    legacy NIC). Without ``netdev=`` it joins hub 0 (``hub``; its netdev is filled in when resolved).
    QEMU's default model on a PC is e1000; virtio-net-pci is the one NIC here, so it is ours.
    """
    opts = parse_option("-net", text, implied="type")
    kind = opts.take("type")
    assert kind == "nic"
    check_model(opts.take("model", "virtio-net-pci"), "-net nic")
    mac_text = opts.take("macaddr")
    mac = parse_mac(mac_text, f"-net {text}", "-net") if mac_text is not None else None
    addr = opts.take("addr")
    vectors = opts.take_int("vectors", None, minimum=0)
    netdev = opts.take("netdev")
    ident = opts.take("id")
    opts.finish()
    return NicConfig(netdev=netdev or "", id=ident, mac=mac, addr=addr, vectors=vectors, hub=netdev is None)


def parse_nic(text: str, index: int) -> tuple[NetdevConfig | None, NicConfig | None]:
    """``-nic TYPE[,netdev options][,model=virtio-net-pci][,mac=…]`` (``-nic none`` → no NIC).

    The netdev is named by ``id=`` as in QEMU (so ``hostfwd_add ID …`` finds it), else it gets
    ``#net{index}``, a name of QEMU's kind (its own are ``#net`` and a number) that no option
    can write, so no ``-device`` can name it.
    """
    # As under -netdev, except that -nic has no JSON form: "{…" is read as key=value text.
    opts = parse_option("-nic", text, implied="type", flags=user_flags(text), warn_flags=True, json=False)
    kind = opts.get("type")
    if kind is not None and kind.lstrip().startswith("{"):
        raise ConfigError(f"-nic: Parameter 'type' does not accept value '{kind}'")
    if kind == "none":
        opts.take("type")
        opts.finish()
        return None, None
    check_model(opts.take("model", "virtio-net-pci"), "-nic")
    mac_text = opts.take("mac")
    mac = parse_mac(mac_text, f"-nic {text}", "-nic") if mac_text is not None else None
    addr = opts.take("addr")
    given = opts.get("id")
    parts = [str(kind)] + [
        f"{k}={v.replace(',', ',,')}"
        for k, vs in opts.repeated.items()
        if k not in ("type", "model", "mac", "addr")
        for v in vs
    ]
    netdev = parse_netdev(",".join(parts), "-nic", implicit_id=None if given is not None else f"#net{index}")
    return netdev, NicConfig(netdev=netdev.id, mac=mac, addr=addr, mq=getattr(netdev, "queues", 1) > 1)


# QEMU 7.2's netfilter properties (net/filter.c, qapi/net.json NetFilterDirection): which of the
# netdev's queues the filter hangs on, where in the netdev's filter list it goes, and whether it runs.
FILTER_QUEUES = ("all", "rx", "tx")
FILTER_INSERTS = ("behind", "before")
MAXLEN_DEFAULT = 65536  # net/filter-dump.c filter_dump_instance_init
U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class FilterDumpConfig:
    """``-object filter-dump`` (QEMU 7.2 net/filter-dump.c on net/dump.c's pcap writer).

    ``queue``: ``all`` records both directions; ``rx`` only what is sent to the netdev (the
    guest's transmissions), ``tx`` only what the netdev sends (what the guest receives), as
    qemu-options.hx words them. ``status=off`` opens the file (pcap header only) and records
    nothing. ``position``/``insert`` order the netdev's filter list (``info network``); dumps
    change no frame, so the order changes no file.
    """

    SYNTAX: ClassVar[str] = (
        "filter-dump,id=str,netdev=id,file=path[,maxlen=bytes][,queue=all|rx|tx][,status=on|off]"
        "[,position=head|tail|id=<id>][,insert=behind|before]"
    )
    id: str
    netdev: str
    file: Path
    maxlen: int = MAXLEN_DEFAULT
    queue: str = "all"
    status: bool = True
    position: str = "tail"
    insert: str = "behind"

    @classmethod
    def parse(cls, text: str) -> FilterDumpConfig:
        """Parse the text after ``-object`` (the type must be filter-dump)."""
        opts = parse_option("-object", text, implied="qom-type")
        kind = opts.take("qom-type")
        if kind != "filter-dump":
            raise ConfigError(f"-object: '{kind}' is not filter-dump")
        what = "-object filter-dump"
        opts.option = what
        ident = opts.require("id")
        netdev = opts.require("netdev")
        file = opts.require("file")
        maxlen_text = opts.take("maxlen")
        maxlen = MAXLEN_DEFAULT
        if maxlen_text is not None:
            maxlen = parse_u32(maxlen_text, what, "maxlen")
        cfg = cls.make(what, ident, netdev, file, maxlen=maxlen, queue=opts.take("queue", "all"),
                       status=opts.take("status", "on"), position=opts.take("position", "tail"),
                       insert=opts.take("insert", "behind"))
        opts.finish()
        return cfg

    @classmethod
    def make(cls, what: str, ident: str, netdev: str, file: str, *, maxlen: int = MAXLEN_DEFAULT,
             queue: str | None = "all", status: str | None = "on", position: str | None = "tail",
             insert: str | None = "behind") -> FilterDumpConfig:
        """Check the properties as QEMU 7.2 checks them, with its words; ``what`` locates the
        errors QEMU locates (the option; QMP locates none: ``""``), the others it prints alone.

        :raises ConfigError: naming the bad property.
        """
        def at(message: str) -> str:
            return f"{what}: {message}" if what else message

        queue, status = queue or "", status or ""
        position, insert = position or "", insert or ""
        if not is_identifier(ident):
            raise ConfigError(at("Parameter 'id' expects an identifier"))
        if maxlen == 0:
            # filter_dump_set_maxlen: any uint32 but 0.
            raise ConfigError("Property 'filter-dump.maxlen' doesn't take value '0'")
        if queue not in FILTER_QUEUES:
            raise ConfigError(at(f"Parameter 'queue' does not accept value '{queue}'"))
        if insert not in FILTER_INSERTS:
            raise ConfigError(at(f"Parameter 'insert' does not accept value '{insert}'"))
        if status not in ("on", "off"):
            raise ConfigError("Invalid value for netfilter status, should be 'on' or 'off'")
        if position not in ("head", "tail") and not position.startswith("id="):
            raise ConfigError("Parameter 'position' expects 'head', 'tail' or 'id=<id>'")
        if not file:
            # Path("") would be "."; QEMU open()s the empty name and reports ENOENT.
            raise ConfigError("net dump: can't open : No such file or directory")
        return cls(ident, netdev, Path(file), maxlen, queue, status == "on", position, insert)

    def place(self, captures: Sequence[FilterDumpConfig], objects: Collection[str] = ()) -> int:
        """Where this filter goes in its netdev's list ``captures`` (netfilter_complete).

        :param objects: the ids of every object made before this one (any netdev, any type).
        :raises ConfigError: when ``position=id=X`` names no filter there, as QEMU words it.
        """
        if self.position == "head":
            return 0
        if self.position == "tail":
            return len(captures)
        ref = self.position[3:]
        for i, c in enumerate(captures):
            if c.id == ref:
                return i if self.insert == "before" else i + 1
        if ref in objects:
            raise ConfigError(f"filter '{ref}' belongs to a different netdev")
        raise ConfigError(f"filter '{ref}' not found")


def parse_u32(text: str, what: str, key: str) -> int:
    """A uint32 property of ``-object`` as QEMU 7.2's option visitor reads it: C's strtoull with
    base 0 (``0x`` hex, a leading ``0`` octal), no sign, no size suffix.

    :raises ConfigError: in QEMU's words.
    """
    from appliance.qemu_numbers import NumberError, strtou64

    try:
        if "-" in text or not text.strip():
            raise NumberError(text)
        value = strtou64(text)
    except NumberError:
        raise ConfigError(f"{what}: Parameter '{key}' expects a uint64 value") from None
    if value > U32_MAX:
        raise ConfigError(f"{what}: Parameter '{key}' expects uint32_t")
    return value
