"""The Linux kit boots in QEMU TCG and the TcgGuest harness drives it."""

from __future__ import annotations

import base64
import gzip
from pathlib import Path

import pytest

from appliance.kit import build
from appliance.kit.errors import TcgCommandError
from appliance.kit.tcg import TcgGuest
from tests.conftest import needs_qemu
from tests.kit.test_cpio import parse_newc

pytestmark = [needs_qemu, pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module")
def kit():
    return build(guest=False)


def test_initramfs_loads_dependencies_first_and_has_the_dhcp_script(kit) -> None:
    entries = parse_newc(gzip.decompress(kit.initramfs.read_bytes()))
    order = entries["etc/kit/modules"][1].decode().split()
    for before, after in [("virtio_ring", "virtio"), ("virtio", "virtio_pci"),
                          ("net_failover", "virtio_net"), ("scsi_mod", "virtio_scsi"),
                          ("virtio_pci_modern_dev", "virtio_pci")]:
        assert order.index(before) < order.index(after)
    for name in order:
        assert entries[f"lib/modules/{name}.ko"][1][:4] == b"\x7fELF"
    assert "usr/share/udhcpc/default.script" in entries
    assert "bin/kitio" in entries and "init" in entries
    assert kit.vmlinux.read_bytes()[:4] == b"\x7fELF"


async def test_kit_boots_runs_commands_and_powers_off(kit, tmp_path: Path) -> None:
    """The kit boots with a disk, a NIC on QEMU's isolated user network and an rng;
    commands run, the drivers bind, DHCP applies a lease, kitio reads the disk,
    and power-off ends QEMU with status 0."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x5a" * (8 << 20))
    args = [
        "-drive", f"file={disk},if=none,id=d0,format=raw,cache=unsafe",
        "-device", "virtio-blk-pci,drive=d0",
        "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
        "-device", "virtio-rng-pci",
    ]
    async with TcgGuest(args, memory_mb=256, kit=kit) as g:
        assert await g.run("echo hi") == "hi"
        assert await g.run("printf 'a\\nb'; echo \"'q'\"") == "a\nb'q'"
        modules = (await g.run("ls /sys/module")).split()
        for m in ("virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "virtio_console",
                  "virtio_rng", "virtio_balloon"):
            assert m in modules
        with pytest.raises(TcgCommandError) as err:
            await g.run("echo out; exit_code() { return 3; }; exit_code")
        assert err.value.status == 3 and err.value.output == "out"
        assert await g.run("cat /sys/block/vda/size") == str((8 << 20) // 512)
        assert await g.run("dd if=/dev/vda bs=4096 count=1 2>/dev/null | od -An -tx1 -N4") == " 5a 5a 5a 5a"
        line = await g.run("kitio bench --dev /dev/vda --mode randread --bs 4096 --qd 4 --seconds 0.5")
        fields = dict(kv.split("=") for kv in line.split()[1:])
        assert line.startswith("KITIO ") and float(fields["iops"]) > 0 and fields["qd"] == "4"
        lease = await g.run("udhcpc -i eth0 -q -n -t 10 -T 2 && ip -4 addr show eth0", timeout=60)
        assert "inet 10.0.2.15/24" in lease
        # QEMU's restricted user network offers no router; apply a lease by hand.
        await g.run("interface=eth0 ip=10.9.0.5 mask=24 router=10.9.0.1 dns=10.9.0.3 "
                    "/usr/share/udhcpc/default.script bound")
        assert "default via 10.9.0.1 dev eth0" in await g.run("ip route")
        assert await g.run("cat /etc/resolv.conf") == "nameserver 10.9.0.3"
        assert await g.run("cat /sys/class/misc/hw_random/rng_current") == "virtio_rng.0"
        assert await g.poweroff() == 0


async def test_script_action_runs_the_script_and_powers_off(kit) -> None:
    script = base64.b64encode(b"echo from-script $((6*7))\nexit 5\n").decode()
    async with TcgGuest(memory_mb=256, append=f"appliance.script={script}", kit=kit,
                        shared_memory=False) as g:
        await g.expect("from-script 42\n")
        await g.expect("APPLIANCE-KIT-SCRIPT-EXIT 5\n")
        assert await g.wait() == 0


async def test_poweroff_action_exits_right_after_readiness(kit) -> None:
    async with TcgGuest(memory_mb=256, append="appliance.action=poweroff", kit=kit) as g:
        assert await g.wait() == 0


async def test_filesystem_made_in_one_boot_is_read_in_the_next(kit, tmp_path: Path) -> None:
    """busybox mke2fs makes ext2, which Debian's built-in ext4 driver mounts."""
    disk = tmp_path / "fs.img"
    disk.write_bytes(bytes(32 << 20))
    args = ["-drive", f"file={disk},if=none,id=d0,format=raw,cache=unsafe",
            "-device", "virtio-blk-pci,drive=d0"]
    async with TcgGuest(args, memory_mb=256, kit=kit) as g:
        await g.run("mke2fs -q /dev/vda >/dev/null && mount /dev/vda /mnt && echo kept > /mnt/f "
                    "&& umount /mnt", timeout=60)
        assert await g.poweroff() == 0
    async with TcgGuest(args, memory_mb=256, kit=kit) as g:
        assert await g.run("mount /dev/vda /mnt && cat /mnt/f") == "kept"
        assert await g.poweroff() == 0


async def test_long_multiline_commands_survive_the_console(kit) -> None:
    """A command far beyond the tty's 4095-character line limit, with quotes and newlines."""
    body = "".join(f"echo 'line {i} \"quoted\" $HOME'\n" for i in range(400))
    async with TcgGuest(memory_mb=256, kit=kit, shared_memory=False) as g:
        out = await g.run(body + "x=$((6*7)); echo \"done $x\"")
        lines = out.splitlines()
        assert len(lines) == 401 and lines[0] == "line 0 \"quoted\" $HOME" and lines[-1] == "done 42"
        assert await g.poweroff() == 0
