"""Real Linux drivers against our storage daemon over vhost-user.

QEMU in TCG boots the Linux kit with a ``vhost-user-blk-pci`` disk whose
back end is our :class:`StorageDaemon`, running in this test's event loop so
the device's per-queue counters can be read directly. The guest's own
virtio_blk driver, block layer and ext2 code then exercise the transport, the
device and the backend: patterns both ways (offsets and lengths crossing page
and descriptor boundaries, O_DIRECT and page-cache paths), a filesystem that
survives a second boot (a new front end on the same daemon), two queues on two
vCPUs, and a read-only export.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.cli.storage_daemon import StorageDaemon, parse_args
from appliance.kit.tcg import TcgGuest
from tests.conftest import needs_qemu

pytestmark = [needs_qemu, pytest.mark.qemu, pytest.mark.slow]

MiB = 1 << 20


def _daemon_args(image: Path, sock: Path, *, fmt: str = "raw", writable: bool = True, queues: int = 1) -> list[str]:
    return [
        "--blockdev", f"driver=file,node-name=file0,filename={image}",
        "--blockdev", f"driver={fmt},node-name=disk0,file=file0",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},"
        f"writable={'on' if writable else 'off'},num-queues={queues}",
    ]


def _guest(sock: Path, *, queues: int = 1, smp: int = 1) -> TcgGuest:
    return TcgGuest(
        ["-chardev", f"socket,id=vu,path={sock}",
         "-device", f"vhost-user-blk-pci,chardev=vu,num-queues={queues}"],
        smp=smp,
    )


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    return path


@pytest.fixture
async def daemon2q(tmp_path: Path, image: Path) -> AsyncIterator[tuple[StorageDaemon, Path]]:
    sock = tmp_path / "vu.sock"
    async with StorageDaemon(parse_args(_daemon_args(image, sock, queues=2))) as d:
        yield d, sock


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_patterns_both_ways_on_two_queues(daemon2q: tuple[StorageDaemon, Path], image: Path) -> None:
    """The host writes a pattern the guest reads; the guest writes ones the host reads.

    Offsets are sector- but not page-aligned and the request sizes are odd
    multiples of 512, so buffers cross page (and thus descriptor) boundaries.
    Each vCPU runs I/O pinned to itself: blk-mq maps one queue per CPU, so
    both queues must carry requests.
    """
    d, sock = daemon2q
    rng = random.Random(1)
    host_pattern = rng.randbytes(3 * MiB)
    host_off = 3584 * 1463  # sector-aligned, 512 bytes past a page boundary
    with open(image, "r+b") as f:
        f.seek(host_off)
        f.write(host_pattern)

    async with _guest(sock, queues=2, smp=2) as g:
        # O_DIRECT reads of 7 sectors at a time starting 5 sectors before a page boundary.
        out = await g.run(
            f"taskset 1 dd if=/dev/vda bs=3584 skip={host_off // 3584} count={len(host_pattern) // 3584} "
            f"iflag=direct 2>/dev/null | sha256sum"
        )
        assert host_off % 3584 == 0
        assert out.split()[0] == _sha(host_pattern[: (len(host_pattern) // 3584) * 3584])
        # Page-cache path from the other CPU: whole pattern, read-ahead sized requests.
        out = await g.run(
            f"echo 3 > /proc/sys/vm/drop_caches; taskset 2 dd if=/dev/vda bs=512 skip={host_off // 512} "
            f"count={len(host_pattern) // 512} 2>/dev/null | sha256sum"
        )
        assert out.split()[0] == _sha(host_pattern)

        # Guest-written patterns: O_DIRECT with 1.5 KiB requests from CPU 0,
        # buffered + fsync from CPU 1 (the flush must reach the backend too).
        await g.run("dd if=/dev/urandom of=/tmp/a bs=1536 count=333 2>/dev/null")
        await g.run("dd if=/dev/urandom of=/tmp/b bs=4096 count=300 2>/dev/null")
        await g.run("taskset 1 dd if=/tmp/a of=/dev/vda bs=1536 seek=13001 oflag=direct 2>/dev/null")
        await g.run("taskset 2 dd if=/tmp/b of=/dev/vda bs=512 seek=50001 conv=fsync 2>/dev/null")
        sha_a = (await g.run("sha256sum /tmp/a")).split()[0]
        sha_b = (await g.run("sha256sum /tmp/b")).split()[0]
        assert await g.poweroff() == 0

    data = image.read_bytes()
    assert _sha(data[13001 * 1536 : 13001 * 1536 + 1536 * 333]) == sha_a
    assert _sha(data[50001 * 512 : 50001 * 512 + 4096 * 300]) == sha_b
    stats = d.exports["exp0"].device.stats
    assert all(s["requests"] > 0 for s in stats), stats
    assert all(s["read_bytes"] > 0 and s["write_bytes"] > 0 for s in stats), stats
    assert sum(s["errors"] for s in stats) == 0


async def test_filesystem_survives_a_second_boot(tmp_path: Path, image: Path) -> None:
    """mke2fs, files, power off; a new QEMU on the same daemon mounts and reads them.

    The second front end is a reconnect: the daemon must have cleaned up the
    first one's rings and memory and accept the next.
    """
    sock = tmp_path / "vu.sock"
    async with StorageDaemon(parse_args(_daemon_args(image, sock))) as d:
        async with _guest(sock) as g:
            await g.run("mke2fs -q /dev/vda >/dev/null 2>&1 || mke2fs /dev/vda")
            await g.run("mkdir -p /mnt && mount -t ext2 /dev/vda /mnt")
            await g.run("dd if=/dev/urandom of=/mnt/blob bs=1k count=777 2>/dev/null; echo kept > /mnt/note")
            sha = (await g.run("sha256sum /mnt/blob")).split()[0]
            await g.run("umount /mnt")
            assert await g.poweroff() == 0
        server = d.exports["exp0"].server
        assert server.backend.memory is None
        async with _guest(sock) as g:
            await g.run("mkdir -p /mnt && mount -t ext2 /dev/vda /mnt")
            assert (await g.run("cat /mnt/note")) == "kept"
            assert (await g.run("sha256sum /mnt/blob")).split()[0] == sha
            await g.run("umount /mnt")
            assert await g.poweroff() == 0
        assert server.connections == 2


async def test_readonly_export_refuses_guest_writes(tmp_path: Path, image: Path) -> None:
    sock = tmp_path / "vu.sock"
    with open(image, "r+b") as f:
        f.write(b"original contents")
    before = _sha(image.read_bytes())
    async with StorageDaemon(parse_args(_daemon_args(image, sock, writable=False))):
        async with _guest(sock) as g:
            assert (await g.run("cat /sys/block/vda/ro")) == "1"
            assert (await g.run("head -c 17 /dev/vda")) == "original contents"
            out = await g.run("echo x | dd of=/dev/vda bs=512 conv=sync,fsync oflag=direct 2>&1", check=False)
            assert "Operation not permitted" in out or "Read-only" in out or "error" in out.lower(), out
            assert await g.poweroff() == 0
    assert _sha(image.read_bytes()) == before


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
async def test_qcow2_overlay_reads_base_and_keeps_it_unchanged(tmp_path: Path) -> None:
    """A qcow2 overlay on a raw base: reads fall through, writes land in the overlay."""
    base = tmp_path / "base.raw"
    pattern = random.Random(2).randbytes(2 * MiB)
    with open(base, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(3 * MiB)
        f.write(pattern)
    base_sha = _sha(base.read_bytes())
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)], check=True
    )
    sock = tmp_path / "vu.sock"
    async with StorageDaemon(parse_args(_daemon_args(overlay, sock, fmt="qcow2"))):
        async with _guest(sock) as g:
            out = await g.run(
                f"dd if=/dev/vda bs=64k skip={3 * MiB // 65536} count=32 iflag=direct 2>/dev/null | sha256sum"
            )
            assert out.split()[0] == _sha(pattern)
            await g.run("dd if=/dev/urandom of=/tmp/w bs=3584 count=100 2>/dev/null")
            await g.run(f"dd if=/tmp/w of=/dev/vda bs=3584 seek={(3 * MiB) // 3584 + 1} oflag=direct 2>/dev/null")
            sha_w = (await g.run("sha256sum /tmp/w")).split()[0]
            out = await g.run(
                f"dd if=/dev/vda bs=3584 skip={(3 * MiB) // 3584 + 1} count=100 iflag=direct 2>/dev/null"
                " | sha256sum"
            )
            assert out.split()[0] == sha_w
            assert await g.poweroff() == 0
    assert _sha(base.read_bytes()) == base_sha
    check = subprocess.run(["qemu-img", "check", str(overlay)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    got = subprocess.run(
        ["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"if={overlay}", f"of={tmp_path / 'flat'}"],
        capture_output=True,
    )
    if got.returncode == 0:
        flat = (tmp_path / "flat").read_bytes()
        off = ((3 * MiB) // 3584 + 1) * 3584
        assert _sha(flat[off : off + 358400]) == sha_w
    os.sync()


async def test_qemu_killed_mid_io_then_a_new_qemu_is_served(tmp_path: Path, image: Path) -> None:
    """SIGKILL QEMU while its guest streams writes: the daemon drops the rings and
    the mapping, and the next QEMU on the same socket gets a working disk."""
    import asyncio

    sock = tmp_path / "vu.sock"
    async with StorageDaemon(parse_args(_daemon_args(image, sock, queues=2))) as d:
        server = d.exports["exp0"].server
        device = d.exports["exp0"].device
        async with _guest(sock, queues=2, smp=2) as g:
            await g.write("while true; do dd if=/dev/urandom of=/dev/vda bs=64k count=64 oflag=direct "
                          "2>/dev/null; done &\n")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while sum(s["write_bytes"] for s in device.stats) < (1 << 20):
                assert loop.time() < deadline, device.stats
                await asyncio.sleep(0.05)
            assert g.proc is not None
            g.proc.kill()
            await g.proc.wait()
        deadline = asyncio.get_running_loop().time() + 10
        while server.connected or server.backend.memory is not None:
            assert asyncio.get_running_loop().time() < deadline, "daemon did not clean up"
            await asyncio.sleep(0.05)
        assert server.backend.active_queues == ()
        assert device.in_flight == 0
        with open(image, "r+b") as f:
            f.seek(60 * MiB)
            f.write(b"after the crash")
        async with _guest(sock, queues=2, smp=2) as g:
            out = await g.run(f"dd if=/dev/vda bs=512 skip={60 * MiB // 512} count=1 2>/dev/null | head -c 15")
            assert out == "after the crash"
            assert await g.poweroff() == 0
        assert server.connections == 2


async def test_daemon_restart_is_survived_by_a_reconnecting_qemu(tmp_path: Path, image: Path) -> None:
    """The other direction: the daemon goes away and comes back; QEMU's
    ``reconnect=1`` chardev sets the rings up again and the guest's disk works on."""
    import asyncio

    sock = tmp_path / "vu.sock"
    args = parse_args(_daemon_args(image, sock))
    d = StorageDaemon(args)
    await d.start()
    try:
        guest = TcgGuest(
            ["-chardev", f"socket,id=vu,path={sock},reconnect=1",
             "-device", "vhost-user-blk-pci,chardev=vu,num-queues=1"],
        )
        async with guest as g:
            await g.run("echo before | dd of=/dev/vda bs=512 conv=sync oflag=direct 2>/dev/null")
            await d.close()
            d = StorageDaemon(parse_args(_daemon_args(image, sock)))
            await d.start()
            server = d.exports["exp0"].server
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while server.backend.active_queues == ():
                assert loop.time() < deadline, "QEMU did not reconnect"
                await asyncio.sleep(0.1)
            await g.run("echo after | dd of=/dev/vda bs=512 seek=1 conv=sync oflag=direct 2>/dev/null")
            out = await g.run("dd if=/dev/vda bs=512 count=2 iflag=direct 2>/dev/null | strings")
            assert out.split() == ["before", "after"]
            assert await g.poweroff() == 0
    finally:
        await d.close()
    data = image.read_bytes()
    assert data[:7] == b"before\n" and data[512:518] == b"after\n"


async def test_daemon_killed_mid_io_is_replaced_without_guest_errors(tmp_path: Path, image: Path) -> None:
    """SIGKILL the daemon process while the guest streams O_DIRECT writes, start a
    new one: QEMU reconnects, hands back the inflight area, the new daemon
    resubmits what the old one had in flight, and the guest sees no error."""
    import asyncio
    import signal
    import sys

    sock = tmp_path / "vu.sock"
    argv = [sys.executable, "-m", "appliance.cli.main", "storage-daemon",
            *_daemon_args(image, sock, queues=2)]

    async def start_daemon() -> asyncio.subprocess.Process:
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        with open(tmp_path / "daemon.log", "a") as log:  # kept for diagnosis
            proc = await asyncio.create_subprocess_exec(*argv, stderr=log)
        for _ in range(400):
            if sock.exists():
                return proc
            await asyncio.sleep(0.05)
        raise AssertionError("daemon did not start")

    daemon = await start_daemon()
    try:
        guest = TcgGuest(
            ["-chardev", f"socket,id=vu,path={sock},reconnect=1",
             "-device", "vhost-user-blk-pci,chardev=vu,num-queues=2"],
            smp=2,
        )
        async with guest as g:
            await g.run("dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null")
            pat = (await g.run("sha256sum /tmp/pat")).split()[0]
            await g.write(
                "w() { dd if=/tmp/pat of=/dev/vda bs=1M count=4 seek=$1 oflag=direct 2>/dev/null "
                "|| echo DD-FAILED; }; "
                "i=0; while [ $i -lt 12 ]; do w 0 & w 4 & wait; i=$((i+1)); echo ITER-$i; done; echo LOOP-DONE\n"
            )
            # Kill it while the loop is surely running: two writers, each 1 MiB
            # split into several requests, keep requests in flight nearly always.
            await g.expect("ITER-2\n", timeout=60)
            await asyncio.sleep(0.05)
            daemon.send_signal(signal.SIGKILL)
            await daemon.wait()
            await asyncio.sleep(0.3)
            daemon = await start_daemon()
            await g.expect("LOOP-DONE", timeout=120)
            assert "DD-FAILED" not in g.output and "I/O error" not in g.output
            for seek in (0, 4):
                out = await g.run(f"dd if=/dev/vda bs=1M skip={seek} count=4 iflag=direct 2>/dev/null | sha256sum")
                assert out.split()[0] == pat
            assert await g.poweroff() == 0
    finally:
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
            await daemon.wait()
    data = image.read_bytes()
    assert _sha(data[: 4 * MiB]) == pat and _sha(data[4 * MiB : 8 * MiB]) == pat
