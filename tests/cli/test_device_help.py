"""``-device DRIVER,help`` lists what our parsers take, in QEMU 7.2's names, types and defaults.

qemu-system-x86_64 is the oracle: every property it lists for a driver is
either taken by ``appliance run -device`` (and then listed by ours, with
QEMU's type and default) or refused by name (and then not listed).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import run
from appliance.cli.device_help import PROPERTIES, device_help
from appliance.errors import ConfigError, HelpRequested
from tests.conftest import needs_qemu

# What each driver needs besides the property tried.
REQUIRED = {"virtio-net-pci": "netdev=n", "virtio-blk-pci": "drive=d", "virtio-rng-pci": ""}
_ROW = re.compile(r"  ([^=]+)=<(.*)>(?:\s+- (.*?))?(?: \(default: (.*)\))?$")


def qemu_properties(driver: str) -> dict[str, tuple[str, str | None]]:
    """name -> (type, default) from qemu-system-x86_64 -device DRIVER,help."""
    out = subprocess.run(["qemu-system-x86_64", "-device", f"{driver},help"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    rows = {}
    for line in out.splitlines()[1:]:
        m = _ROW.match(line)
        assert m is not None, line
        rows[m.group(1)] = (m.group(2), m.group(4))
    return rows


def taken(driver: str, name: str, default: str | None, image: Path) -> bool:
    """Whether ``appliance run -device DRIVER,NAME=...`` gets past NAME (its value may still be
    refused: QEMU's default of an address or a MAC is no value one writes)."""
    value = json.loads(default) if default is not None else "x"
    if isinstance(value, bool):
        value = "on" if value else "off"
    device = ",".join(x for x in (driver, REQUIRED[driver], f"{name}={value}") if x)
    argv = ["-kernel", "k", "-netdev", "user,id=n", "-drive", f"if=none,id=d,file={image},format=raw",
            "-device", device]
    try:
        run.to_config(run.parse_args(argv))
    except ConfigError as err:
        return f"Invalid parameter '{name}'" not in str(err)
    return True


@needs_qemu
@pytest.mark.parametrize("driver", sorted(PROPERTIES))
def test_listed_exactly_what_we_take_with_qemus_types_and_defaults(driver: str, tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(65536))
    qemu = qemu_properties(driver)
    ours = {row[0]: (row[1], row[3]) for row in PROPERTIES[driver]}
    for name, (qom_type, default) in ours.items():
        assert qemu.get(name) == (qom_type, default), name
    takes = {name for name, (_t, default) in qemu.items() if taken(driver, name, default, image)}
    assert takes == set(ours)


@needs_qemu
@pytest.mark.parametrize("driver", sorted(PROPERTIES))
def test_every_property_qemu_has_is_known_and_no_other(driver: str) -> None:
    from appliance.cli.device_help import QEMU_ONLY

    ours = {row[0] for row in PROPERTIES[driver]}
    assert not ours & QEMU_ONLY[driver]
    assert ours | QEMU_ONLY[driver] == set(qemu_properties(driver))


@pytest.mark.parametrize(("device", "message"), [
    ("virtio-net-pci,netdev=n,bogus=1", "Property 'virtio-net-pci.bogus' not found"),
    ("virtio-net,netdev=n,bogus=1", "Property 'virtio-net-pci.bogus' not found"),
    ("virtio-blk-pci-non-transitional,drive=d,x=1", "Property 'virtio-blk-pci-non-transitional.x' not found"),
    ('{"driver":"virtio-rng-pci","bogus":1}', "Property 'virtio-rng-pci.bogus' not found"),
    # one QEMU has and we do not: refused in our words, naming it
    ("virtio-net-pci,netdev=n,x-txburst=1", "Invalid parameter 'x-txburst'"),
])
def test_a_property_the_driver_does_not_have_is_refused_as_qemu_refuses_it(
    device: str, message: str, tmp_path: Path
) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(65536))
    argv = ["-kernel", "k", "-netdev", "user,id=n", "-drive", f"if=none,id=d,file={image},format=raw",
            "-device", device]
    with pytest.raises(ConfigError) as err:
        run.to_config(run.parse_args(argv))
    assert message in str(err.value)


def test_help_among_the_options_prints_the_list_under_the_drivers_own_name() -> None:
    for text in ("virtio-net,help", "virtio-net-pci,netdev=n,?", "driver=virtio-net-pci,help"):
        with pytest.raises(HelpRequested) as shown:
            run.parse_args(["-device", text])
        assert str(shown.value) == device_help("virtio-net-pci")
    listed = str(device_help("virtio-blk-pci")).splitlines()
    assert listed[0] == "virtio-blk-pci options:"
    assert listed[1:] == sorted(listed[1:])
    assert "  serial=<str>" in listed
    assert "  queue-size=<uint16>    -  (default: 256)" in listed


def test_help_for_a_driver_that_is_not_here_is_a_usage_error() -> None:
    out = subprocess.run([sys.executable, "-m", "appliance.cli.main", "run", "-device", "e1000,help"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip() == "appliance run: -device: driver 'e1000' is not supported"
    shown = subprocess.run([sys.executable, "-m", "appliance.cli.main", "run", "-device", "virtio-rng,help"],
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0
    assert shown.stdout.startswith("virtio-rng-pci options:\n  addr=<int32>")


JSON_DEVICES = [
    '{"driver":"virtio-net-pci","netdev":"n","speed":"1000"}',
    '{"driver":"virtio-net-pci","netdev":"n","speed":1000.5}',
    '{"driver":"virtio-net-pci","netdev":"n","mq":"on"}',
    '{"driver":"virtio-net-pci","netdev":"n","mq":1}',
    '{"driver":"virtio-net-pci","netdev":"n","mac":5}',
    '{"driver":"virtio-net-pci","netdev":"n","disable-legacy":true}',
    '{"driver":"virtio-net","netdev":"n","rx_queue_size":"256"}',
    '{"driver":"virtio-blk-pci","drive":"d","num-queues":"2"}',
    '{"driver":"virtio-blk-pci","drive":"d","logical_block_size":"4k"}',
    '{"driver":"virtio-rng-pci","max-bytes":"1024","period":1000}',
]


@needs_qemu
@pytest.mark.parametrize("device", JSON_DEVICES)
def test_json_values_of_the_wrong_type_are_refused_in_qemus_words(device: str, tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(65536))
    drive = f"if=none,id=d,file={image},format=raw"
    theirs = subprocess.run(
        ["qemu-system-x86_64", "-M", "q35", "-nodefaults", "-display", "none", "-S", "-netdev", "user,id=n",
         "-drive", drive, "-device", device, "-qmp", "stdio"],
        input='{"execute":"qmp_capabilities"}{"execute":"quit"}', capture_output=True, text=True, timeout=30)
    assert theirs.returncode == 1
    expected = theirs.stderr.strip().splitlines()[-1].split("}: ", 1)[1]
    with pytest.raises(ConfigError) as refused:
        run.to_config(run.parse_args(["-kernel", "k", "-netdev", "user,id=n", "-drive", drive, "-device", device]))
    assert str(refused.value) == f"-device: {expected}"


def test_libvirts_json_device_types_are_taken() -> None:
    # What libvirt writes: addr as a string, numbers as numbers, booleans as booleans.
    cfg = run.to_config(run.parse_args([
        "-kernel", "k", "-netdev", "user,id=n",
        "-device", '{"driver":"virtio-net-pci","netdev":"n","id":"net0","mac":"52:54:00:12:34:56",'
                   '"addr":"0x3","mq":false,"rx_queue_size":512,"host_mtu":1400,"speed":1000,"duplex":"full"}',
        "-device", '{"driver":"virtio-rng-pci","addr":4,"max-bytes":1024,"period":1000}']))
    nic, rng = cfg.devices
    assert (nic.addr.slot, nic.mtu, nic.duplex) == (3, 1400, "full")  # type: ignore[attr-defined]
    assert (rng.addr.slot, rng.max_bytes, rng.period_ms) == (4, 1024, 1000)  # type: ignore[attr-defined]
