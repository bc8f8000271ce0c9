"""NIC options in QEMU's syntax: ``-device virtio-net-pci``, ``-nic``, ``-net none``
and ``-object filter-dump``.

MACs default to QEMU's sequence, 52:54:00:12:34:56 for the first NIC and the
last byte counting up for each further one, so a lab's addresses are stable
from run to run and match what the same command line gives under QEMU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from appliance.cli.options import parse_option, parse_size
from appliance.errors import ConfigError
from appliance.net.netdev import NetdevConfig, parse_netdev

# Every NIC takes one PCI slot; bus 0 has 32, of which the host bridge and the
# other devices of a lab VM take a few. 24 NICs per VM leaves room for disks.
MAX_NICS = 24
MAX_QUEUE_PAIRS = 16
DEFAULT_MAC_BASE = bytes.fromhex("525400123456")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")


def parse_mac(text: str, what: str) -> bytes:
    if not _MAC.match(text):
        raise ConfigError(f"{what}: invalid MAC address '{text}'")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise ConfigError(f"{what}: MAC address '{text}' is multicast")
    return mac


def default_mac(index: int) -> bytes:
    """QEMU's default MAC for the ``index``-th NIC (0-based)."""
    return DEFAULT_MAC_BASE[:5] + bytes([(DEFAULT_MAC_BASE[5] + index) & 0xFF])


@dataclass(frozen=True, slots=True)
class NicConfig:
    SYNTAX: ClassVar[str] = (
        "virtio-net-pci,netdev=id[,id=str][,mac=52:54:00:xx:xx:xx][,mq=on|off][,vectors=n]"
        "[,host_mtu=n][,addr=slot[.fn]]"
    )
    netdev: str
    id: str | None = None
    mac: bytes | None = None
    mq: bool = False
    vectors: int | None = None
    host_mtu: int | None = None
    addr: str | None = None

    @classmethod
    def parse_device(cls, opts_text: str) -> NicConfig:
        """Parse the text after ``-device`` (the driver must be virtio-net-pci)."""
        opts = parse_option("-device", opts_text, implied="driver")
        driver = opts.take("driver")
        if driver not in ("virtio-net-pci", "virtio-net"):
            raise ConfigError(f"-device: '{driver}' is not a NIC")
        what = f"-device {driver}"
        opts.option = what
        netdev = opts.require("netdev")
        mac_text = opts.take("mac")
        mtu = opts.take_int("host_mtu", None, minimum=68)
        if mtu is not None and mtu > 65535:
            raise ConfigError(f"{what}: host_mtu={mtu} is larger than 65535")
        vectors = opts.take_int("vectors", None, minimum=0)
        cfg = cls(
            netdev=netdev,
            id=opts.take("id"),
            mac=parse_mac(mac_text, what) if mac_text else None,
            mq=opts.take_bool("mq", False),
            vectors=vectors,
            host_mtu=mtu,
            addr=opts.take("addr"),
        )
        for flag in ("romfile", "bootindex"):
            opts.take(flag)  # firmware-only; nothing boots from a NIC here
        opts.finish()
        return cfg


def parse_nic(text: str, index: int) -> tuple[NetdevConfig | None, NicConfig | None]:
    """``-nic TYPE[,netdev options][,model=virtio-net-pci][,mac=…]`` (``-nic none`` → no NIC).

    The netdev gets the id ``__nic{index}``, which no ``-device`` can name.
    """
    opts = parse_option("-nic", text, implied="type")
    kind = opts.get("type")
    if kind == "none":
        opts.take("type")
        opts.finish()
        return None, None
    model = opts.take("model", "virtio-net-pci")
    if model not in ("virtio-net-pci", "virtio", "virtio-net"):
        raise ConfigError(f"-nic: model '{model}' is not supported (virtio-net-pci only)")
    mac_text = opts.take("mac")
    mac = parse_mac(mac_text, "-nic") if mac_text else None
    addr = opts.take("addr")
    ident = f"__nic{index}"
    parts = [str(kind)] + [
        f"{k}={v.replace(',', ',,')}"
        for k, vs in opts.repeated.items()
        if k not in ("type", "model", "mac", "addr")
        for v in vs
    ]
    netdev = parse_netdev(",".join(parts), "-nic", implicit_id=ident)
    return netdev, NicConfig(netdev=ident, mac=mac, addr=addr, mq=getattr(netdev, "queues", 1) > 1)


@dataclass(frozen=True, slots=True)
class FilterDumpConfig:
    SYNTAX: ClassVar[str] = "filter-dump,id=str,netdev=id,file=path[,maxlen=bytes]"
    id: str
    netdev: str
    file: Path
    maxlen: int = 65535

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
        file = Path(opts.require("file"))
        maxlen_text = opts.take("maxlen")
        maxlen = parse_size(maxlen_text, f"{what} maxlen") if maxlen_text else 65535
        if not 14 <= maxlen <= 0x7FFFFFFF:
            raise ConfigError(f"{what}: maxlen '{maxlen_text}' is out of range")
        queue = opts.take("queue")
        if queue not in (None, "all"):
            raise ConfigError(f"{what}: queue '{queue}' is not supported (both directions are captured)")
        if opts.take("position") not in (None, "tail", "head"):
            raise ConfigError(f"{what}: invalid position")
        opts.take("status")
        opts.finish()
        return cls(ident, netdev, file, maxlen)
