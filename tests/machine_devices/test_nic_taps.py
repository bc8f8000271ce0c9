"""NICs of `appliance run` on taps in a test namespace: opened at start, gone at exit.

An owned multiqueue tap (``queues=2`` with ``mq=on``) gives the guest a NIC
with two queue pairs and a control queue, and is removed when the machine
ends; an adopted tap (made beforehand, named with ``ifname=``) is left in
place; a ``filter-dump`` on a netdev leaves a pcap file behind; a
netdev that cannot be opened stops the start with a one-line ConfigError.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import needs_kvm, needs_root
from tests.machine.tinyguest import have_toolchain
from tests.machine_devices.test_pci_scan import run_scan, scan_elf, virtio
from tests.net.netns import inside, namespace, ns_exec

pytestmark = [
    needs_kvm, needs_root,
    pytest.mark.skipif(not have_toolchain(), reason="needs binutils (as, objcopy)"),
]
__all__ = ["scan_elf"]  # the fixture, re-used from the scan tests


def link_exists(ns: str, name: str) -> bool:
    proc = subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "show", name], capture_output=True)
    return proc.returncode == 0


async def test_owned_multiqueue_tap_is_removed_adopted_tap_is_kept(scan_elf: Path, tmp_path: Path) -> None:
    with namespace() as ns:
        ns_exec(ns, "ip", "tuntap", "add", "dev", "adopted0", "mode", "tap")
        with inside(ns):
            found = await run_scan(scan_elf, [
                "-smp", "2",
                "-netdev", "tap,id=t0,ifname=owned0,queues=2,script=no,downscript=no",
                "-device", "virtio-net-pci,netdev=t0,mq=on,vectors=6",
                "-nic", "tap,ifname=adopted0,script=no,downscript=no,mac=52:54:00:00:00:09,addr=0x10",
            ])
        assert found[1][0] == virtio(0x1041) and found[1][2] == 5
        assert found[0x10][0] == virtio(0x1041) and found[0x10][2] == 3
        assert not link_exists(ns, "owned0")
        assert link_exists(ns, "adopted0")


async def test_capture_file_is_a_pcap(scan_elf: Path, tmp_path: Path) -> None:
    pcap = tmp_path / "n.pcap"
    await run_scan(scan_elf, [
        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
        "-object", f"filter-dump,id=f0,netdev=n0,file={pcap},maxlen=100",
    ])
    head = pcap.read_bytes()[:24]
    assert head[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1")
    assert int.from_bytes(head[16:20], "little") == 100  # snaplen = maxlen


async def test_a_netdev_that_cannot_open_is_a_config_error(scan_elf: Path) -> None:
    from appliance.errors import ConfigError

    with namespace() as ns, inside(ns), pytest.raises(ConfigError, match="bridge 'nosuchbr0'"):
        await run_scan(scan_elf, ["-netdev", "bridge,id=b0,br=nosuchbr0", "-device", "virtio-net-pci,netdev=b0"])
