"""Any text given to the device options ends as a parse or a one-line ConfigError, never another exception."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.cli.run import parse_args, to_config
from appliance.errors import ConfigError

OPTIONS = ["-drive", "-blockdev", "-device", "-object", "-netdev", "-nic", "-net", "-hda"]
KEYS = [
    "file", "format", "if", "id", "cache", "aio", "readonly", "discard", "serial", "snapshot", "addr",
    "driver", "node-name", "filename", "cache.direct", "read-only", "drive", "num-queues", "queue-size",
    "rng", "netdev", "mac", "mq", "vectors", "host_mtu", "qom-type", "maxlen", "file.driver",
    "file.filename", "model", "queues", "ifname", "br", "local.port", "udp",
]
VALUES = [
    "", "on", "off", "raw", "qcow2", "virtio", "none", "d0", "n0", "0x5", "1f.7", "33", "-1", "0",
    "4", "1024", "65536", "user", "tap", "file", "virtio-blk-pci", "virtio-net-pci", "virtio-rng-pci",
    "rng-random", "filter-dump", "52:54:00:12:34:56", "ff:ff:ff:ff:ff:ff", "{DISK}", "/nonexistent",
    "native", "threads", "unmap", "writeback", ",", "=", "é",
]

pair = st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)).map(lambda kv: f"{kv[0]}={kv[1]}")
head = st.sampled_from(["", "virtio-blk-pci", "virtio-net-pci", "user", "tap", "rng-random", "none"])
arg = st.tuples(head, st.lists(pair, max_size=5)).map(lambda t: ",".join(([t[0]] if t[0] else []) + t[1]))
argv = st.lists(st.tuples(st.sampled_from(OPTIONS), arg), max_size=5)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv)
def test_device_options_never_raise_anything_but_config_error(tmp_path: Path, opts: list[tuple[str, str]]) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    words = ["-kernel", "/dev/null"]
    for name, text in opts:
        words += [name, text.replace("{DISK}", str(disk))]
    try:
        to_config(parse_args(words))
    except ConfigError as err:
        assert "\n" not in str(err)
