"""The kit's test guest drives our virtio-blk over virtio-pci on `appliance run`'s machine.

The host writes a pattern, the guest reads it (``blk read`` prints zlib's
crc32), the guest writes a byte pattern (``blk write``) and the host checks
the file afterwards: on raw, on qcow2 over a backing file, under
``-snapshot`` (the file stays as it was), with ``-smp 4`` and four queues,
and with a second disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import subprocess
import threading
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from appliance.cli.run import parse_args, to_config
from appliance.kit import paths
from appliance.machine.devices import BlkSpec
from appliance.machine.machine import Machine
from tests.conftest import needs_kvm
from tests.machine.guest_replies import reply_fields

GUEST = paths().guest_elf
SECTOR = 512
DISK_BYTES = 4 << 20

pytestmark = [needs_kvm, pytest.mark.skipif(not GUEST.exists(), reason="test guest not built (appliance kit build)")]


def pattern(seed: int, n: int = DISK_BYTES) -> bytes:
    return random.Random(seed).randbytes(n)


def raw_disk(path: Path, seed: int) -> bytes:
    data = pattern(seed)
    path.write_bytes(data)
    return data


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Guest:
    def __init__(self, vm: Machine, config_devices: list[object]) -> None:
        self.vm = vm
        self.disks = [d for d in config_devices if isinstance(d, BlkSpec)]

    async def cmd(self, text: str, timeout: float = 30) -> str:
        self.vm.console.send(text + "\n")
        m = await self.vm.console.expect(r"(?m)^((?:BLK|ERR)[^\r\n]*)\r?\n", timeout=timeout)
        return m.group(1)

    async def ok(self, text: str, timeout: float = 30) -> dict[str, str]:
        line = await self.cmd(text, timeout)
        assert line.startswith("BLK "), f"{text!r} -> {line!r}"
        return reply_fields(line)

    async def read_crc(self, sector: int, count: int) -> int:
        return int((await self.ok(f"blk read {sector} {count}"))["crc32"], 16)


@asynccontextmanager
async def guest(*argv: str) -> AsyncIterator[Guest]:
    config = to_config(parse_args(["-kernel", str(GUEST), *argv]))
    config.serial = None
    async with Machine(config) as vm:
        await vm.console.expect(r"TESTGUEST-READY[^\n]*\n", timeout=30)
        g = Guest(vm, config.devices)
        yield g
        vm.console.send("poweroff\n")
        assert await asyncio.wait_for(vm.wait(), 20) == 0


def crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFF_FFFF


@pytest.mark.parametrize("aio", ["threads", "native"])
async def test_raw_disk_reads_host_pattern_and_host_sees_guest_writes(tmp_path: Path, aio: str) -> None:
    img = tmp_path / "d.img"
    data = bytearray(raw_disk(img, 1))
    async with guest("-drive", f"file={img},format=raw,if=virtio,cache=none,aio={aio}", "-m", "64") as g:
        info = await g.ok("blk info")
        assert int(info["capacity"]) == DISK_BYTES // SECTOR
        # 1000 sectors span several 64 KiB guest requests and cross page boundaries.
        assert await g.read_crc(7, 1000) == crc(data[7 * SECTOR : 1007 * SECTOR])
        w = await g.ok("blk write 3001 130 171")
        await g.ok("blk flush")
        assert int(w["crc32"], 16) == crc(b"\xab" * 130 * SECTOR)
    data[3001 * SECTOR : 3131 * SECTOR] = b"\xab" * 130 * SECTOR
    assert img.read_bytes() == bytes(data)


async def test_readonly_drive_refuses_guest_writes(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    raw_disk(img, 2)
    before = digest(img)
    async with guest("-drive", f"file={img},format=raw,readonly=on") as g:
        assert (await g.ok("blk info"))["ro"] == "1"
        assert (await g.cmd("blk write 0 8 1")).startswith("ERR")
    assert digest(img) == before


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
async def test_qcow2_over_backing_file_reads_base_and_keeps_it_unchanged(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    data = bytearray(raw_disk(base, 3))
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top)], check=True)
    base_digest = digest(base)
    async with guest("-drive", f"file={top},format=qcow2,if=virtio") as g:
        assert await g.read_crc(0, 2048) == crc(data[: 2048 * SECTOR])
        await g.ok("blk write 129 3 90")  # a partial cluster: copy-on-write from the base
        await g.ok("blk flush")
        assert await g.read_crc(128, 8) == crc(
            data[128 * SECTOR : 129 * SECTOR] + b"\x5a" * 3 * SECTOR + data[132 * SECTOR : 136 * SECTOR]
        )
    assert digest(base) == base_digest
    subprocess.run(["qemu-img", "check", "-q", str(top)], check=True)
    out = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(top), str(out)], check=True)
    data[129 * SECTOR : 132 * SECTOR] = b"\x5a" * 3 * SECTOR
    assert out.read_bytes() == bytes(data)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_snapshot_sees_its_writes_and_leaves_the_file_unchanged(tmp_path: Path, fmt: str) -> None:
    img = tmp_path / f"d.{fmt}"
    data = raw_disk(tmp_path / "d.raw", 4)
    if fmt == "qcow2":
        from appliance.qcow2.create import CreateOptions, build_image

        img.write_bytes(build_image(CreateOptions(size=DISK_BYTES, backing_file=str(tmp_path / "d.raw"),
                                                  backing_fmt="raw")))
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    leftovers = set(Path("/tmp").glob("appliance-snapshot-*"))
    async with guest("-snapshot", "-drive", f"file={img},format={fmt}") as g:
        assert await g.read_crc(0, 16) == crc(data[: 16 * SECTOR])
        await g.ok("blk write 0 16 7")
        await g.ok("blk flush")
        assert await g.read_crc(0, 16) == crc(b"\x07" * 16 * SECTOR)
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before
    assert set(Path("/tmp").glob("appliance-snapshot-*")) <= leftovers


async def test_four_vcpus_get_four_queues_and_all_carry_io(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    raw_disk(img, 5)
    async with guest("-smp", "4", "-drive", f"file={img},format=raw,if=virtio") as g:
        assert (await g.ok("blk info"))["queues"] == "4"
        # Queue depth 4 spreads one request per queue at a time over the four queues.
        bench = await g.ok("blk bench randread 4096 4 1", timeout=60)
        per_queue = [int(n) for n in bench["per_queue"].split(",")]
        assert len(per_queue) == 4 and all(n > 0 for n in per_queue)
        device = g.disks[0].device
        assert [s["requests"] > 0 for s in device.stats] == [True] * 4


async def test_second_disk_and_explicit_slots(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.qcow2"
    da = raw_disk(a, 6)
    db = pattern(7, 2 << 20)
    braw = tmp_path / "b.raw"
    braw.write_bytes(db)
    from appliance.qcow2.create import CreateOptions, build_image

    b.write_bytes(build_image(CreateOptions(size=len(db), backing_file=str(braw), backing_fmt="raw")))
    async with guest(
        "-drive", f"file={a},format=raw,if=none,id=d0",
        "-blockdev", f"driver=file,node-name=f1,filename={b}",
        "-blockdev", "driver=qcow2,node-name=d1,file=f1",
        "-device", "virtio-blk-pci,drive=d1,addr=9,serial=second",
        "-device", "virtio-blk-pci,drive=d0,addr=3",
    ) as g:
        first = await g.ok("blk info")
        assert first["pci"] == "00:03.0" and int(first["capacity"]) == len(da) // SECTOR
        assert await g.read_crc(1, 1) == crc(da[SECTOR : 2 * SECTOR])
        assert (await g.cmd("blk use 1")).startswith("BLK use 1")
        second = await g.ok("blk info")
        assert second["pci"] == "00:09.0" and int(second["capacity"]) == len(db) // SECTOR
        assert await g.read_crc(40, 8) == crc(db[40 * SECTOR : 48 * SECTOR])
        await g.ok("blk write 40 8 33")
    assert a.read_bytes() == da
    assert braw.read_bytes() == db


def test_cli_run_with_hda_writes_the_file(tmp_path: Path) -> None:
    """`appliance run -hda` end to end: probing warning on stderr, guest write lands in the file."""
    import sys

    img = tmp_path / "d.img"
    data = bytearray(raw_disk(img, 8))
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "run", "-kernel", str(GUEST), "-nographic", "-hda", str(img)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    watchdog = threading.Timer(60, proc.kill)  # a silent guest must not hang the suite
    watchdog.start()
    try:
        while not proc.stdout.readline().startswith(b"TESTGUEST-READY"):
            pass
        proc.stdin.write(b"blk write 8 2 200\n")
        proc.stdin.flush()
        while not proc.stdout.readline().startswith(b"BLK write"):
            pass
        proc.stdin.write(b"poweroff\n")
        proc.stdin.flush()
        assert proc.wait(20) == 0
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert f"WARNING: Image format was not specified for '{img}' and probing guessed raw." in err
    data[8 * SECTOR : 10 * SECTOR] = b"\xc8" * 2 * SECTOR
    assert img.read_bytes() == bytes(data)


async def test_disk_works_again_after_a_guest_reset(tmp_path: Path) -> None:
    """The device model outlives a reboot; the new boot's driver starts its rings from 0."""
    img = tmp_path / "d.img"
    data = raw_disk(img, 9)
    async with guest("-smp", "2", "-drive", f"file={img},format=raw") as g:
        assert await g.read_crc(0, 64) == crc(data[: 64 * SECTOR])
        g.vm.console.send("reset\n")
        await g.vm.console.expect(r"TESTGUEST-READY[^\n]*\n", timeout=30)
        assert g.vm.boots == 2
        assert await g.read_crc(64, 64) == crc(data[64 * SECTOR : 128 * SECTOR])
        await g.ok("blk write 0 1 1")
    assert img.read_bytes()[:SECTOR] == b"\x01" * SECTOR


async def test_device_properties_shape_what_the_guest_is_offered(tmp_path: Path) -> None:
    from appliance.storage.blk import VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES
    from appliance.virtio.device import VIRTIO_F_EVENT_IDX

    img = tmp_path / "d.img"
    data = raw_disk(img, 5)
    drive = f"file={img},format=raw,if=none,id=d0,discard=unmap"
    base = "virtio-blk-pci,drive=d0,num-queues=1"
    async with guest("-drive", drive, "-device", base) as g:
        plain = g.disks[0].transport.offered_features()
    # Left alone, the device offers discard, write-zeroes and EVENT_IDX, and no topology.
    assert plain >> VIRTIO_BLK_F_DISCARD & 1 and plain >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    assert plain >> VIRTIO_F_EVENT_IDX & 1 and not plain >> VIRTIO_BLK_F_TOPOLOGY & 1
    props = ("discard=off,write-zeroes=off,event_idx=off,logical_block_size=4096,physical_block_size=16384,"
             "config-wce=off,seg-max-adjust=on,romfile=")
    async with guest("-drive", drive, "-device", f"{base},{props}") as g:
        f = g.disks[0].transport.offered_features()
        assert not f >> VIRTIO_BLK_F_DISCARD & 1 and not f >> VIRTIO_BLK_F_WRITE_ZEROES & 1
        assert not f >> VIRTIO_F_EVENT_IDX & 1 and f >> VIRTIO_BLK_F_TOPOLOGY & 1
        config = g.disks[0].device.config_bytes()
        assert int.from_bytes(config[20:24], "little") == 4096  # blk_size
        assert config[24] == 2  # physical_block_exp: 16 KiB = 4 KiB << 2
        # The guest drives the disk as it was offered.
        negotiated = int((await g.ok("blk info"))["features"], 16)
        assert negotiated & ~f == 0
        assert await g.read_crc(8, 16) == crc(data[8 * SECTOR : 24 * SECTOR])
