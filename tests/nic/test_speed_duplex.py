"""``-device virtio-net-pci,speed=N,duplex=half|full``: VIRTIO_NET_F_SPEED_DUPLEX (virtio 1.2
§5.1.3, feature bit 63) and the ``speed``/``duplex`` fields after ``mtu`` (§5.1.4), as QEMU 7.2
offers them. Router VMs read the speed (``ethtool eth0``, /sys/class/net/eth0/speed) for
OSPF and IS-IS link costs.

qemu-system-x86_64 is the oracle for which lines are taken or refused, in which words, and
when the feature bit is offered (``x-query-virtio-status``).
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys

import pytest

from appliance.cli import run
from appliance.errors import ConfigError
from appliance.kit import paths
from appliance.kit.console import GuestConsole
from appliance.machine.devices import NicSpec
from appliance.net.memory import MemoryLink
from appliance.nic import constants as C
from appliance.nic.config import NicConfig
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.device import VIRTIO_F_VERSION_1
from tests.conftest import needs_kvm, needs_qemu
from tests.net.test_qemu_net_parity import unlocated
from tests.pci.test_virtio_pci import Rig

MAC = bytes.fromhex("525400123456")
QEMU = "qemu-system-x86_64"


def nic(options: str) -> NicConfig:
    return NicConfig.parse_device(f"virtio-net-pci,netdev=n{',' if options else ''}{options}")


def device(cfg: NicConfig) -> VirtioNet:
    return VirtioNet([MemoryLink()], MAC, speed=cfg.speed, duplex=cfg.duplex)


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "speed", "duplex"), [
    ("", None, None),
    ("speed=-1", None, None),  # QEMU's default: unknown
    ("speed=0", 0, None),
    ("speed=1000,duplex=full", 1000, "full"),
    ("duplex=half", None, "half"),
    ("speed=2147483647", 2147483647, None),
    # qemu_strtoi64 with base 0: hex, octal, a sign, leading blanks.
    ("speed=0x2710", 10000, None), ("speed=010", 8, None), ("speed=+100", 100, None), ("speed=-0", 0, None),
])
def test_speed_and_duplex_are_read_as_qemu_reads_them(options: str, speed: int | None, duplex: str | None) -> None:
    cfg = nic(options)
    assert (cfg.speed, cfg.duplex) == (speed, duplex)


@pytest.mark.parametrize(("options", "message"), [
    ("speed=-2", "'speed' must be between 0 and INT_MAX"),
    ("speed=-2147483648", "'speed' must be between 0 and INT_MAX"),
    ("speed=2147483648", "Parameter 'speed' expects int32_t"),
    ("speed=99999999999999999999", "Parameter 'speed' expects integer"),
    ("speed=1k", "Parameter 'speed' expects integer"),
    ("speed=", "Parameter 'speed' expects integer"),
    ("speed", "Parameter 'speed' expects integer"),  # bare: speed=on
    ("duplex=HALF", "'duplex' must be 'half' or 'full'"),
    ("duplex=", "'duplex' must be 'half' or 'full'"),
    ("duplex", "'duplex' must be 'half' or 'full'"),  # bare: duplex=on
    # virtio_net_device_realize checks duplex before speed.
    ("speed=-5,duplex=x", "'duplex' must be 'half' or 'full'"),
])
def test_bad_speed_or_duplex_is_refused_in_qemus_words(options: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        nic(options)
    assert str(err.value) == f"-device virtio-net-pci: {message}"


def qemu_outcome(options: str) -> tuple[str | None, bool]:
    """QEMU's refusal of ``-device virtio-net-pci,…,OPTIONS`` without its location (None: it
    came up), and whether it then offers VIRTIO_NET_F_SPEED_DUPLEX."""
    qmp = [{"execute": "qmp_capabilities"},
           {"execute": "x-query-virtio-status", "arguments": {"path": "/machine/peripheral/nic0/virtio-backend"}},
           {"execute": "quit"}]
    proc = subprocess.run(
        [QEMU, "-M", "q35", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio", "-netdev", "user,id=n",
         "-device", f"virtio-net-pci,id=nic0,netdev=n,{options}"],
        input="".join(json.dumps(c) + "\n" for c in qmp).encode(), capture_output=True, timeout=20)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.decode().splitlines() if "warning:" not in ln and ln.startswith(QEMU)]
        return unlocated(lines[0].removeprefix(f"{QEMU}: ")), False
    replies = [json.loads(ln) for ln in proc.stdout.decode().splitlines()]
    status = next(r["return"] for r in replies if isinstance(r.get("return"), dict) and "host-features" in r["return"])
    offered = status["host-features"]["dev-features"]
    return None, any(f.startswith("VIRTIO_NET_F_SPEED_DUPLEX:") for f in offered)


def our_outcome(options: str) -> tuple[str | None, bool]:
    try:
        cfg = NicConfig.parse_device(f"virtio-net-pci,id=nic0,netdev=n,{options}")
    except ConfigError as err:
        return unlocated(str(err)), False
    return None, bool(device(cfg).device_features() >> C.F_SPEED_DUPLEX & 1)


@needs_qemu
@pytest.mark.parametrize("options", [
    "speed=1000", "speed=-1", "speed=0", "duplex=half", "duplex=full", "speed=10,duplex=half",
    "speed=0x10", "speed=2147483647", "speed= +5",
    "speed=-2", "speed=-2147483648", "speed=2147483648", "speed=-2147483649", "speed=abc", "speed=5 ",
    "speed=08", "duplex=HALF", "duplex=unknown", "speed=-5,duplex=x", "speed=abc,duplex=x",
])
def test_options_are_taken_refused_and_offered_as_qemu_does(options: str) -> None:
    assert our_outcome(options) == qemu_outcome(options)


def test_a_run_line_hands_speed_and_duplex_to_the_nic() -> None:
    cfg = run.to_config(run.parse_args([
        "-kernel", "k", "-netdev", "user,id=n", "-device", "virtio-net-pci,netdev=n,speed=10000,duplex=full",
        "-netdev", "user,id=m", "-device", "virtio-net-pci,netdev=m"]))
    nics = [d for d in cfg.devices if isinstance(d, NicSpec)]
    assert [(n.speed, n.duplex) for n in nics] == [(10000, "full"), (None, None)]


# --- the device ------------------------------------------------------------------------------


def test_without_speed_or_duplex_the_feature_is_not_offered_and_config_ends_at_mtu() -> None:
    dev = device(nic(""))
    assert not dev.device_features() >> C.F_SPEED_DUPLEX & 1
    assert len(dev.config_bytes()) == 12


@pytest.mark.parametrize(("options", "tail"), [
    # le32 speed (Mbit/s, 0xffffffff unknown), u8 duplex (0 half, 1 full, 0xff unknown).
    ("speed=1000,duplex=full", bytes([0xE8, 0x03, 0x00, 0x00, 0x01])),
    ("speed=100,duplex=half", bytes([0x64, 0x00, 0x00, 0x00, 0x00])),
    ("speed=0", bytes([0x00, 0x00, 0x00, 0x00, 0xFF])),
    ("duplex=full", bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x01])),
    ("speed=2147483647", bytes([0xFF, 0xFF, 0xFF, 0x7F, 0xFF])),
])
def test_speed_and_duplex_follow_mtu_in_config_space(options: str, tail: bytes) -> None:
    dev = device(nic(options))
    assert dev.device_features() >> C.F_SPEED_DUPLEX & 1
    cfg = dev.config_bytes()
    assert cfg[:12] == MAC + struct.pack("<HHH", C.S_LINK_UP, 1, 1500)
    assert cfg[12:] == tail
    assert dev.read_config(12, 4) == tail[:4] and dev.read_config(16, 1) == tail[4:]


def test_the_device_refuses_values_qemu_would_not_pass() -> None:
    with pytest.raises(ValueError):
        VirtioNet([MemoryLink()], MAC, speed=-1)
    with pytest.raises(ValueError):
        VirtioNet([MemoryLink()], MAC, duplex="auto")


async def test_a_pci_driver_sees_bit_63_and_reads_speed_and_duplex() -> None:
    """A driver on the virtio-pci transport, as Linux's virtio_net (virtnet_update_settings):
    feature word 1 carries bit 63; once it is negotiated, le32 speed at 12 and u8 duplex at 16."""
    dev = device(nic("speed=25000,duplex=full"))
    rig = Rig(asyncio.get_running_loop(), dev=dev)  # type: ignore[arg-type]
    assert rig.drv.device_features() >> C.F_SPEED_DUPLEX & 1
    assert rig.drv.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << C.F_SPEED_DUPLEX)
    assert dev.has_feature(C.F_SPEED_DUPLEX)
    cfg = rig.drv.caps.device
    assert rig.guest.mmio_read(cfg + 12, 4) == 25000
    assert rig.guest.mmio_read(cfg + 16, 1) == C.DUPLEX_FULL


# --- a guest ---------------------------------------------------------------------------------

GUEST = paths().guest_elf


async def guest_sees(argv: list[str]) -> tuple[str, str]:
    """What the test guest's driver reads from its NIC (``net info``): speed and duplex."""
    async with GuestConsole(argv) as g:
        await g.ready(30)
        info = await g.fields("net info", "NET info")
        await g.write("poweroff\n")
        assert await g.wait(20) == 0
    return info["speed"], info["duplex"]


@needs_kvm
@needs_qemu
@pytest.mark.skipif(not GUEST.exists(), reason="test guest not built (appliance kit build)")
@pytest.mark.parametrize(("options", "seen"), [
    ("speed=10000,duplex=full", ("10000", "full")),
    ("duplex=half", ("unknown", "half")),
    ("", ("unknown", "unknown")),
])
async def test_the_test_guest_reads_the_same_speed_and_duplex_here_as_under_qemu(
        options: str, seen: tuple[str, str]) -> None:
    line = ",".join(x for x in ("virtio-net-pci,netdev=n0", options) if x)
    device = ["-netdev", "user,id=n0,restrict=on", "-device", line]
    ours = [sys.executable, "-m", "appliance.cli.main", "run", "-m", "128", "-nographic", "-kernel", str(GUEST),
            *device]
    # microvm,pcie=on: no firmware, up in a fraction of a second (tests/guest/test_net_qemu.py).
    qemu = [QEMU, "-enable-kvm", "-M", "microvm,pcie=on", "-nographic", "-nodefaults", "-serial", "stdio",
            "-kernel", str(GUEST), "-smp", "1", "-m", "128", "-no-reboot", *device]
    assert await guest_sees(ours) == seen
    assert await guest_sees(qemu) == seen
