"""``-device DRIVER,help``: the properties a device takes here, listed as QEMU 7.2 lists them.

Each row is (name, QOM type, description, default as JSON). Names, types and
defaults are QEMU's for the same driver (``qemu-system-x86_64 -device
DRIVER,help``), so a script that reads QEMU's list reads ours; only the
properties our parsers accept are listed, and tests/cli/test_device_help.py
holds both facts against the installed QEMU. A default of 65535 or 4294967295
is QEMU's "chosen at start" (one queue per vCPU, a vector per queue), as here.
"""

from __future__ import annotations

Row = tuple[str, str, str | None, str | None]

PROPERTIES: dict[str, tuple[Row, ...]] = {
    "virtio-blk-pci": (
        ('addr', 'int32', 'PCI slot, with an optional function: 06 or 06.0', '-1'),
        ('bootindex', 'int32', None, None),
        ('config-wce', 'bool', 'on/off', 'true'),
        ('disable-legacy', 'OnOffAuto', 'on/off/auto', '"auto"'),
        ('disable-modern', 'bool', None, 'false'),
        ('discard', 'bool', 'on/off', 'true'),
        ('drive', 'str', 'the -drive id or -blockdev node-name it serves', None),
        ('event_idx', 'bool', 'on/off', 'true'),
        ('indirect_desc', 'bool', 'on/off', 'true'),
        ('iothread', 'link<iothread>', None, None),
        ('logical_block_size', 'size', 'a power of two from 512 B to 2 MiB', '0'),
        ('num-queues', 'uint16', None, '65535'),
        ('physical_block_size', 'size', 'a power of two from 512 B to 2 MiB', '0'),
        ('queue-size', 'uint16', None, '256'),
        ('request-merging', 'bool', 'on/off', 'true'),
        ('romfile', 'str', None, None),
        ('scsi', 'bool', 'on/off', 'false'),
        ('seg-max-adjust', 'bool', None, 'true'),
        ('serial', 'str', None, None),
        ('write-zeroes', 'bool', 'on/off', 'true'),
    ),
    "virtio-net-pci": (
        ('addr', 'int32', 'PCI slot, with an optional function: 06 or 06.0', '-1'),
        ('bootindex', 'int32', None, None),
        ('csum', 'bool', 'on/off', 'true'),
        ('ctrl_guest_offloads', 'bool', 'on/off', 'true'),
        ('ctrl_mac_addr', 'bool', 'on/off', 'true'),
        ('ctrl_rx', 'bool', 'on/off', 'true'),
        ('ctrl_rx_extra', 'bool', 'on/off', 'true'),
        ('ctrl_vlan', 'bool', 'on/off', 'true'),
        ('ctrl_vq', 'bool', 'on/off', 'true'),
        ('disable-legacy', 'OnOffAuto', 'on/off/auto', '"auto"'),
        ('disable-modern', 'bool', None, 'false'),
        ('duplex', 'str', 'half or full (VIRTIO_NET_F_SPEED_DUPLEX)', None),
        ('event_idx', 'bool', 'on/off', 'true'),
        ('gso', 'bool', 'on/off', 'true'),
        ('guest_announce', 'bool', 'on/off', 'true'),
        ('guest_csum', 'bool', 'on/off', 'true'),
        ('guest_ecn', 'bool', 'on/off', 'true'),
        ('guest_rsc_ext', 'bool', 'on/off', 'false'),
        ('guest_tso4', 'bool', 'on/off', 'true'),
        ('guest_tso6', 'bool', 'on/off', 'true'),
        ('guest_ufo', 'bool', 'on/off', 'true'),
        ('hash', 'bool', 'on/off', 'false'),
        ('host_ecn', 'bool', 'on/off', 'true'),
        ('host_mtu', 'uint16', None, '0'),
        ('host_tso4', 'bool', 'on/off', 'true'),
        ('host_tso6', 'bool', 'on/off', 'true'),
        ('host_ufo', 'bool', 'on/off', 'true'),
        ('indirect_desc', 'bool', 'on/off', 'true'),
        ('mac', 'str', 'its MAC address, such as 52:54:00:12:34:56', None),
        ('mq', 'bool', 'on/off', 'false'),
        ('mrg_rxbuf', 'bool', 'on/off', 'true'),
        ('netdev', 'str', 'the id of the -netdev it is wired to (none: a NIC with no peer)', None),
        ('romfile', 'str', None, None),
        ('rss', 'bool', 'on/off', 'false'),
        ('rx_queue_size', 'uint16', None, '256'),
        ('speed', 'int32', 'link speed in Mbit/s, -1 for unknown', '-1'),
        ('status', 'bool', 'on/off', 'true'),
        ('tx_queue_size', 'uint16', None, '256'),
        ('vectors', 'uint32', None, '4294967295'),
    ),
    "virtio-rng-pci": (
        ('addr', 'int32', 'PCI slot, with an optional function: 06 or 06.0', '-1'),
        ('disable-legacy', 'OnOffAuto', 'on/off/auto', '"auto"'),
        ('disable-modern', 'bool', None, 'false'),
        ('max-bytes', 'uint64', None, '9223372036854775807'),
        ('period', 'uint32', None, '65536'),
        ('rng', 'link<rng-backend>', None, None),
    ),
}

# The rest of each driver's properties in QEMU 7.2 (compat knobs, PCIe capabilities, features
# we do not have): named, and refused as not supported here, where a name QEMU does not know is
# refused in QEMU's words ("Property 'virtio-net-pci.x' not found").
_PCI_COMMON = ("acpi-index aer any_layout ats failover_pair_id ioeventfd iommu_platform migrate-extra "
               "modern-pio-notify multifunction notify_on_empty packed page-per-vq queue_reset rombar "
               "romsize use-disabled-flag use-started virtio-backend virtio-pci-bus-master-bug-migration "
               "x-ats-page-aligned x-disable-legacy-check x-disable-pcie x-ignore-backend-features "
               "x-pcie-deverr-init x-pcie-extcap-init x-pcie-flr-init x-pcie-lnkctl-init "
               "x-pcie-lnksta-dllla x-pcie-pm-init")
QEMU_ONLY: dict[str, frozenset[str]] = {
    "virtio-blk-pci": frozenset((_PCI_COMMON + " account-failed account-invalid backend_defaults class cyls "
                                 "discard_granularity heads lcyls lheads lsecs max-discard-sectors "
                                 "max-write-zeroes-sectors min_io_size opt_io_size "
                                 "report-discard-granularity rerror secs share-rw vectors werror "
                                 "write-cache x-enable-wce-if-config-wce").split()),
    "virtio-net-pci": frozenset((_PCI_COMMON + " failover rsc_interval tx x-mtu-bypass-backend x-txburst "
                                 "x-txtimer").split()),
    "virtio-rng-pci": frozenset((_PCI_COMMON + " event_idx indirect_desc romfile vectors").split()),
}


def unknown_property(driver: str, keys: list[str]) -> str | None:
    """QEMU's refusal of the first of ``keys`` that ``driver`` (one of ours, by any of its
    names) does not have at all, or None. ``id`` and ``bus`` are qdev's own, not properties."""
    typename = ALIASES.get(driver, driver)
    base = typename.removesuffix("-non-transitional")
    known = {row[0] for row in PROPERTIES.get(base, ())} | QEMU_ONLY.get(base, frozenset())
    for key in keys:
        if key not in known and key not in ("driver", "id", "bus"):
            return f"Property '{typename}.{key}' not found"
    return None


# QEMU's other names for the same devices.
ALIASES = {"virtio-blk": "virtio-blk-pci", "virtio-net": "virtio-net-pci", "virtio-rng": "virtio-rng-pci"}


def property_line(name: str, qom_type: str, description: str | None, default: str | None) -> str:
    """One row, in QEMU's layout: the type after ``=``, then the description from column 24."""
    line = f"  {name}=<{qom_type}>"
    if description is None and default is None:
        return line
    line = line.ljust(24) + " - " + (description or "")
    return line + (f" (default: {default})" if default is not None else "")


# What QEMU's strict JSON visitor wants for each QOM type (qobject-input-visitor.c); any type
# not named here is read from a string. Unsigned and size properties go through its uint64
# reader, whose refusal is worded apart.
_JSON_KIND = {"bool": "boolean", "int32": "integer", "int64": "integer", "uint16": "uint64",
              "uint32": "uint64", "uint64": "uint64", "size": "uint64"}


def check_json_types(obj: dict[str, object]) -> None:
    """``-device {…}``: each known property's JSON value must have its QOM type's JSON type, as
    QEMU checks it (a ``"speed": "1000"`` that key=value text would take is refused).

    :raises ConfigError: naming the property and the type it wants, in QEMU's words.
    """
    from appliance.errors import ConfigError

    driver = obj.get("driver")
    if not isinstance(driver, str):
        return
    driver = driver.removesuffix("-non-transitional")
    rows = {row[0]: row[1] for row in PROPERTIES.get(ALIASES.get(driver, driver), ())}
    for key, value in obj.items():
        qom_type = rows.get(key)
        if qom_type is None or value is None or key == "addr":
            continue  # (addr's setter takes a string, as libvirt writes it, or a number)
        kind = _JSON_KIND.get(qom_type, "string")
        if kind == "boolean":
            ok = isinstance(value, bool)
        elif kind == "string":
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if ok:
            continue
        if kind == "uint64":
            raise ConfigError(f"-device: Parameter '{key}' expects uint64")
        raise ConfigError(f"-device: Invalid parameter type for '{key}', expected: {kind}")


def device_help(driver: str) -> str | None:
    """The text of ``-device DRIVER,help``, or None for a driver that is not here."""
    name = ALIASES.get(driver.removesuffix("-non-transitional"), driver.removesuffix("-non-transitional"))
    rows = PROPERTIES.get(name)
    if rows is None:
        return None
    lines = sorted(property_line(*row) for row in rows)
    return f"{name} options:\n" + "\n".join(lines) + "\n"
