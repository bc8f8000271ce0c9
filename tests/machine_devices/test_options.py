"""Device options of `appliance run` in QEMU's syntax: what they build, and one-line refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli.run import parse_args, to_config
from appliance.errors import ConfigError
from appliance.machine.devices import BlkSpec, HubNetdevSpec, HubSpec, NicSpec, PeerlessNetdevSpec, RngSpec
from appliance.net.netdev import UserNetdev
from appliance.nic.config import MAX_NICS
from appliance.pci.allocator import PciAddress


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(1 << 20))
    return p


@pytest.fixture
def qcow(tmp_path: Path) -> Path:
    from appliance.qcow2.create import CreateOptions, build_image

    p = tmp_path / "disk.qcow2"
    p.write_bytes(build_image(CreateOptions(size=1 << 20)))
    return p


def devices(*argv: str) -> list[object]:
    return to_config(parse_args(["-kernel", "/dev/null", *argv])).devices


def test_drive_if_virtio_is_a_blk_with_its_file_options(disk: Path) -> None:
    [d] = devices("-drive", f"file={disk},format=raw,if=virtio,cache=none,aio=native,readonly=on,"
                  "discard=unmap,serial=S1,id=root")
    assert isinstance(d, BlkSpec)
    s = d.source
    assert (s.path, s.fmt, s.cache, s.aio, s.read_only, s.discard) == (disk, "raw", "none", "native", True, "unmap")
    assert d.serial == "S1" and d.num_queues is None and d.addr is None


def test_hda_is_a_virtio_disk_and_drive_defaults_to_virtio(disk: Path) -> None:
    a, b = devices("-hda", str(disk), "-drive", f"file={disk},readonly=on")
    assert isinstance(a, BlkSpec) and isinstance(b, BlkSpec)
    assert a.source.fmt is None  # probed at open


def test_device_may_name_a_drive_defined_later_and_takes_its_options(disk: Path) -> None:
    [d] = devices("-device", "virtio-blk-pci,drive=d0,num-queues=4,queue-size=128,addr=0x1f,serial=X",
                  "-drive", f"file={disk},format=raw,if=none,id=d0,serial=Y")
    assert isinstance(d, BlkSpec)
    assert (d.num_queues, d.queue_size, d.addr, d.serial) == (4, 128, PciAddress(0x1F, 0), "X")


def test_blockdev_qcow2_over_file_node(qcow: Path) -> None:
    [d] = devices("-blockdev", f"driver=file,node-name=f0,filename={qcow},cache.direct=on",
                  "-blockdev", "driver=qcow2,node-name=q0,file=f0,read-only=on",
                  "-device", "virtio-blk-pci,drive=q0")
    assert isinstance(d, BlkSpec)
    assert (d.source.fmt, d.source.cache, d.source.read_only) == ("qcow2", "none", True)


def test_blockdev_with_the_file_node_written_inline(qcow: Path) -> None:
    [d] = devices("-blockdev", f"driver=qcow2,node-name=q0,file.driver=file,file.filename={qcow},"
                  "file.cache.direct=on,file.locking=off", "-device", "virtio-blk-pci,drive=q0")
    assert isinstance(d, BlkSpec)
    assert (d.source.path, d.source.fmt, d.source.cache, d.source.locking) == (qcow, "qcow2", "none", False)


def test_snapshot_applies_to_drives(disk: Path) -> None:
    [d] = devices("-snapshot", "-drive", f"file={disk},format=raw")
    assert isinstance(d, BlkSpec) and d.source.snapshot
    [e] = devices("-drive", f"file={disk},format=raw,snapshot=on")
    assert isinstance(e, BlkSpec) and e.source.snapshot


def test_the_same_file_twice_is_fine_when_snapshot_or_read_only(disk: Path) -> None:
    assert len(devices("-drive", f"file={disk},format=raw,readonly=on",
                       "-drive", f"file={disk},format=raw,readonly=on")) == 2
    assert len(devices("-snapshot", "-drive", f"file={disk},format=raw", "-drive", f"file={disk},format=raw")) == 2


def test_rng_with_object_and_default(tmp_path: Path) -> None:
    a, b = devices("-object", "rng-random,id=r0,filename=/dev/random", "-device", "virtio-rng-pci,rng=r0,addr=7",
                   "-device", "virtio-rng-pci")
    assert isinstance(a, RngSpec) and isinstance(b, RngSpec)
    assert (a.filename, a.addr, b.filename) == ("/dev/random", PciAddress(7, 0), "/dev/urandom")


def test_iothread_objects_are_taken_and_their_poll_max_ns_bounds_disk_polling(disk: Path) -> None:
    from appliance.storage import poll

    before = poll.max_ns()
    try:
        (blk,) = devices("-object", "iothread,id=io0,poll-max-ns=32768,poll-grow=2,aio-max-batch=8",
                         "-object", "iothread,id=io1",
                         "-drive", f"file={disk},format=raw,if=none,id=d0",
                         "-device", "virtio-blk-pci,drive=d0,iothread=io0")
        assert isinstance(blk, BlkSpec)
        assert poll.max_ns() == 32768
        # an iothread without poll-max-ns leaves the default alone
        poll.set_max_ns(before)
        devices("-object", "iothread,id=io1", "-drive", f"file={disk},format=raw,if=none,id=d0",
                "-device", "virtio-blk-pci,drive=d0,iothread=io1")
        assert poll.max_ns() == before
    finally:
        poll.set_max_ns(before)


def test_libvirts_json_options_are_taken_as_their_key_value_forms(tmp_path: Path, qcow: Path) -> None:
    # libvirt writes -device, -netdev, -object and -blockdev as JSON.
    pcap = tmp_path / "c.pcap"
    blk, rng, nic = devices(
        "-blockdev", f'{{"driver":"file","filename":"{qcow}","node-name":"s","auto-read-only":true,'
                     '"discard":"unmap"}',
        "-blockdev", '{"node-name":"f","read-only":false,"driver":"qcow2","file":"s","backing":null}',
        "-device", '{"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x4","drive":"f","id":"d0","bootindex":1}',
        "-object", '{"qom-type":"rng-random","id":"r0","filename":"/dev/urandom"}',
        "-device", '{"driver":"virtio-rng-pci","rng":"r0","id":"rng0","addr":"0x5"}',
        "-netdev", '{"type":"user","id":"n0","hostfwd":[{"str":"tcp::2222-:22"},{"str":"udp::53-:53"}]}',
        "-device", '{"driver":"virtio-net-pci-non-transitional","netdev":"n0","id":"net0",'
                   '"mac":"52:54:00:12:34:56","addr":"0x3"}',
        "-object", f'{{"qom-type":"filter-dump","id":"f0","netdev":"n0","file":"{pcap}"}}',
    )
    assert isinstance(blk, BlkSpec) and blk.addr == PciAddress(4, 0)
    assert isinstance(rng, RngSpec) and rng.addr == PciAddress(5, 0)
    assert isinstance(nic, NicSpec) and nic.addr == PciAddress(3, 0) and isinstance(nic.netdev, UserNetdev)
    assert [(f.host_port, f.guest_port) for f in nic.netdev.config.hostfwd] == [(2222, 22), (53, 53)]


def test_nics_get_qemu_default_macs_and_captures(tmp_path: Path) -> None:
    b, a, c = devices(  # the -nic first, as QEMU's board makes it before any -device
        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,host_mtu=9000",
        "-nic", "user,mac=52:54:00:aa:bb:cc",
        "-netdev", "tap,id=t0,queues=4", "-device", "virtio-net-pci,netdev=t0,mq=on,vectors=10",
        "-object", f"filter-dump,id=f0,netdev=t0,file={tmp_path / 'x.pcap'},maxlen=128",
    )
    assert isinstance(a, NicSpec) and isinstance(b, NicSpec) and isinstance(c, NicSpec)
    assert a.mac.hex(":") == "52:54:00:12:34:56" and a.mtu == 9000
    assert b.mac.hex(":") == "52:54:00:aa:bb:cc"
    assert c.mac.hex(":") == "52:54:00:12:34:57"
    assert c.queues == 4 and [f.id for f in c.captures] == ["f0"] and a.captures == []


def test_board_nics_come_before_device_nics_as_in_qemu() -> None:
    """QEMU 7.2, -M pc: ``-netdev user,id=d -device virtio-net-pci,netdev=d -nic user,model=virtio``
    puts the -nic NIC at slot 2 with 52:54:00:12:34:56 and the -device one after it with …:57
    (``info pci``, ``info network``); -drive if=virtio is a -device too."""
    first, second = devices("-netdev", "user,id=d", "-device", "virtio-net-pci,netdev=d",
                            "-net", "nic,model=virtio", "-net", "user")
    assert isinstance(first, NicSpec) and isinstance(second, NicSpec)
    assert (first.netdev.id, first.mac.hex(":")) == ("#net0", "52:54:00:12:34:56")
    assert (second.netdev.id, second.mac.hex(":")) == ("d", "52:54:00:12:34:57")
    nic, other = devices("-netdev", "user,id=d", "-device", "virtio-net-pci,netdev=d", "-nic", "user")
    assert isinstance(nic, NicSpec) and isinstance(other, NicSpec)
    assert nic.mac.hex(":") == "52:54:00:12:34:56" and other.netdev.id == "d"


def test_legacy_net_nic_takes_the_hub_back_end_in_either_order() -> None:
    for argv in (("-net", "nic,model=virtio,macaddr=52:54:00:aa:bb:01", "-net", "user,hostfwd=tcp::2222-:22"),
                 ("-net", "user,hostfwd=tcp::2222-:22,id=wan", "-net", "nic,macaddr=52:54:00:aa:bb:01,addr=5")):
        [nic] = devices(*argv)
        assert isinstance(nic, NicSpec) and isinstance(nic.netdev, UserNetdev)
        assert nic.mac.hex(":") == "52:54:00:aa:bb:01"
        assert [(f.host_port, f.guest_port) for f in nic.netdev.config.hostfwd] == [(2222, 22)]
    [nic] = devices("-net", "user,id=wan", "-net", "nic,addr=5")
    assert isinstance(nic, NicSpec) and nic.netdev.id == "wan" and nic.addr == PciAddress(5, 0)
    assert nic.hub == 0  # info usernet heads its table "Hub 0 (wan):", as QEMU does
    # netdev= skips the hub, as in QEMU.
    [nic] = devices("-netdev", "user,id=u0", "-net", "nic,model=virtio-net-pci,netdev=u0")
    assert isinstance(nic, NicSpec) and nic.netdev.id == "u0" and nic.hub == -1


def test_netdevs_without_a_nic_are_warned_of_as_qemu_does(capsys: pytest.CaptureFixture[str]) -> None:
    """QEMU warns of a netdev without a peer, and of hub 0 without a NIC, and opens the
    netdevs all the same (a user network's hostfwd ports are bound)."""
    alone, on_hub, hub = devices("-net", "user", "-netdev", "user,id=x,hostfwd=tcp::2222-:22",
                                 "-object", "filter-dump,id=f,netdev=x,file=/tmp/x.pcap")
    assert isinstance(on_hub, HubNetdevSpec) and on_hub.hub == 0 and on_hub.port in hub.hub.ports
    assert isinstance(hub, HubSpec) and [p.name for p in hub.hub.ports] == ["hub0port0"]
    assert isinstance(alone, PeerlessNetdevSpec) and alone.netdev.id == "x" and alone.hub == -1
    assert [c.id for c in alone.captures] == ["f"]  # QEMU takes a filter on it too
    err = capsys.readouterr().err.splitlines()
    assert err == ["appliance run: warning: hub 0 with no nics",
                   "appliance run: warning: netdev x has no peer"]


def test_net_none_and_nic_none_make_no_nic() -> None:
    assert devices("-net", "none") == []
    assert devices("-nic", "none") == []


def test_help_lists_the_device_options() -> None:
    from appliance.cli.run import usage

    text = usage()
    for name in ("-drive", "-blockdev", "-device", "-netdev", "-nic", "-object", "-snapshot", "-hda", "-net"):
        assert f"\n  {name} " in text or f"\n  {name}\n" in text
    assert "not IDE" in text


BAD = [
    (["-drive", "file={disk},format=vmdk"], "format 'vmdk'"),
    (["-drive", "file={disk},if=ide"], "if=ide"),
    (["-drive", "file={disk},cache=fast"], "cache option 'fast'"),
    (["-drive", "file={disk},aio=io_uring"], "aio option 'io_uring'"),
    (["-drive", "file={disk},aio=native"], "aio=native"),
    (["-drive", "file={disk},readonly=maybe"], "'maybe'"),
    (["-drive", "file={disk},discard=trim"], "discard option 'trim'"),
    (["-drive", "file={disk},werror=stop"], "werror=stop"),
    (["-drive", "file=/nonexistent.img"], "/nonexistent.img"),
    (["-drive", "format=raw"], "'file'"),
    (["-drive", "file={disk},id=9x"], "invalid id '9x'"),
    (["-drive", "file={disk},id=a", "-drive", "file={disk},id=a,readonly=on"], "duplicate ID 'a'"),
    (["-drive", "file={disk}", "-drive", "file={disk}"], "write"),
    (["-drive", "file={disk},if=none,id=d", "-device", "virtio-blk-pci,drive=d",
      "-device", "virtio-blk-pci,drive=d"], "already in use"),
    (["-drive", "file={disk},id=d", "-device", "virtio-blk-pci,drive=d"], "automatically connected"),
    (["-device", "virtio-blk-pci"], "'drive'"),
    (["-device", "virtio-blk-pci,drive=nothere"], "'nothere'"),
    (["-device", "virtio-blk-pci,drive=d,num-queues=0"], "num-queues"),
    (["-device", "virtio-blk-pci,drive=d,num-queues=x"], "'x'"),
    (["-device", "virtio-blk-pci,drive=d,queue-size=100"], "queue-size=100"),
    (["-device", "virtio-blk-pci,drive=d,queue-size=2048"], "queue-size=2048"),
    (["-device", "virtio-blk-pci,drive=d,addr=0x20"], "0x20"),
    (["-device", "virtio-blk-pci,drive=d,addr=zz"], "'zz'"),
    (["-device", "virtio-blk-pci,drive=d,scsi=on"], "scsi=on"),
    (["-device", "e1000,netdev=n"], "'e1000'"),
    (["-device", "virtio-rng-pci,rng=r9"], "'r9'"),
    (["-device", "virtio-rng-pci,max-bytes=-5"], "max-bytes"),
    (["-object", "memory-backend-ram,id=m,size=1G"], "memory-backend-ram"),
    (["-object", "rng-egd,id=r,chardev=c"], "rng-egd"),
    (["-object", "rng-random,id=r", "-object", "rng-random,id=r"], "Duplicate ID 'r' for object"),
    (["-object", "iothread,id=io", "-object", "iothread,id=io"], "Duplicate ID 'io' for object"),
    # QEMU's words: one namespace for every -object kind, another for -device.
    (["-object", "iothread,id=x", "-object", "rng-builtin,id=x"], "Duplicate ID 'x' for object"),
    (["-netdev", "user,id=n", "-object", "filter-dump,id=f,netdev=n,file=/tmp/a",
      "-object", "filter-dump,id=f,netdev=n,file=/tmp/b"], "Duplicate ID 'f' for object"),
    (["-device", "virtio-rng-pci,id=x", "-device", "virtio-rng-pci,id=x"], "Duplicate ID 'x' for device"),
    (["-device", "virtio-rng-pci,id=9bad"], "Parameter 'id' expects an identifier"),
    (["-object", "iothread,id=io,poll-max-ns=-1"], "-1 is out of range"),
    (["-object", "iothread,id=io,poll-max-ns=99999999999"], "99999999999"),
    (["-drive", "file={disk},if=none,id=d0", "-device", "virtio-blk-pci,drive=d0,iothread=nope"],
     "can't find value 'nope'"),
    (["-blockdev", "driver=nbd,node-name=n"], "'nbd'"),
    (["-blockdev", "driver=file,filename={disk}"], "'node-name'"),
    (["-blockdev", "driver=file,node-name=f,filename={disk},aio=native"], "cache.direct"),
    (["-blockdev", '{"driver":"file"}'], "Parameter 'filename' is missing"),
    (["-blockdev", '{"driver":"file",'], "invalid JSON"),
    (["-device", '["virtio-net-pci"]'], "is not supported"),
    (["-netdev", '{"type":"user","id":"n0","hostfwd":[{"str":"tcp::99999-:22"}]}'], "tcp::99999-:22"),
    (["-device", '{"a":' * 3000 + "1" + "}" * 3000], "invalid JSON"),
    (["-blockdev", "driver=qcow2,node-name=q,file.driver=nbd"], "file.driver=nbd"),
    (["-blockdev", "driver=qcow2,node-name=q,file.driver=file,file.filename={disk},file.bogus=1"], "'file.bogus'"),
    (["-blockdev", "driver=qcow2,node-name=q,file=nofile", "-device", "virtio-blk-pci,drive=q"], "'nofile'"),
    (["-blockdev", "driver=raw,node-name=a,file=b", "-blockdev", "driver=raw,node-name=b,file=a",
      "-device", "virtio-blk-pci,drive=a"], "not a driver=file node"),
    (["-blockdev", "driver=file,node-name=f,filename={disk}", "-blockdev", "driver=file,node-name=f,filename={disk}"],
     "duplicate node name 'f'"),
    (["-netdev", "user,id=n0", "-netdev", "user,id=n0"], "Duplicate ID 'n0'"),
    (["-netdev", "carrier-pigeon,id=n0"], "carrier-pigeon"),
    (["-device", "virtio-net-pci,netdev=nope"], "'nope'"),
    (["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0", "-device", "virtio-net-pci,netdev=n0"],
     "can't take value 'n0', it's in use"),
    (["-netdev", "tap,id=t,queues=2", "-device", "virtio-net-pci,netdev=t"], "mq=on"),
    (["-netdev", "tap,id=t,queues=2", "-device", "virtio-net-pci,netdev=t,mq=on,vectors=3"], "vectors=3"),
    (["-net", "nic,macaddr=01:00:00:00:00:01", "-net", "user"], "NIC cannot have multicast MAC address"),
    (["-object", "filter-dump,id=f,netdev=ghost,file=/tmp/x.pcap"], "netdev=ghost"),
    (["-netdev", "user,id=u", "-netdev", "hubport,id=h0,hubid=0,netdev=u",
      "-netdev", "hubport,id=h1,hubid=0,netdev=u"], "netdev 'u' is already the peer of hub port h0"),
    (["-netdev", "hubport,id=h0,hubid=0", "-netdev", "hubport,id=h1,hubid=1,netdev=h0"], "is a hub port"),
    (["-netdev", "hubport,id=h0,hubid=0", "-device", "virtio-net-pci,netdev=h0,mq=on"], "one queue"),
    (["-netdev", "user,id=u", "-netdev", "hubport,id=h0,hubid=0,netdev=u",
      "-object", "filter-dump,id=f,netdev=h0,file=/tmp/x.pcap"], "capture on 'u'"),
    (["-net", "nic,model=e1000", "-net", "user"], "'e1000'"),
    (["-net", "nic,name=n1", "-net", "user"], "'name'"),
    (["-net", "nic,macaddr=zz", "-net", "user"], "macaddr=zz: invalid syntax for ethernet address"),
    (["-net", "nic,netdev=ghost"], "'ghost'"),
    # A -net back end is on hub 0 already: no NIC can take it directly (QEMU's words).
    (["-net", "user,id=a", "-device", "virtio-net-pci,netdev=a"], "can't take value 'a', it's in use"),
    (["-net", "user,id=a", "-net", "nic,netdev=a"], "it's in use"),
    (["-net", "user", "-device", "virtio-net-pci,netdev=#hub0"], "can't find value '#hub0'"),
    (["-net", "nic,id=a", "-net", "user,id=a"], "Duplicate ID 'a' for net"),
    (["-nic", "user,model=e1000"], "e1000"),
    (["-netdev", "user,id=n0", "-nic", "user,id=n0"], "Duplicate ID 'n0'"),
    (["-nic", "user,id=n0", "-netdev", "user,id=n0"], "Duplicate ID 'n0'"),
    (["-drive", "file={disk},addr=3", "-device", "virtio-rng-pci,addr=3"], "03.0"),
]


@pytest.mark.parametrize(("argv", "needle"), BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_values_are_one_line_config_errors_naming_the_value(
    argv: list[str], needle: str, disk: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        devices(*[a.replace("{disk}", str(disk)) for a in argv])
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_too_many_nics_are_refused() -> None:
    argv: list[str] = []
    for _ in range(MAX_NICS + 1):
        argv += ["-nic", "user"]
    with pytest.raises(ConfigError, match=f"more than {MAX_NICS} NICs"):
        devices(*argv)
    assert len(devices(*argv[: 2 * MAX_NICS])) == MAX_NICS


@pytest.mark.parametrize(
    ("last", "option"),
    [(["-nic", "user,id=wan"], "-nic"), (["-netdev", "user,id=wan", "-device", "virtio-net-pci,netdev=wan"],
                                          "-device virtio-net-pci")],
)
def test_a_nic_error_names_the_option_that_made_the_nic(last: list[str], option: str) -> None:
    # A -nic with id= names its netdev itself (QEMU), so the netdev's name does not tell.
    argv = ["-nic", "user"] * MAX_NICS + last
    with pytest.raises(ConfigError, match=f"^{option}: more than {MAX_NICS} NICs"):
        devices(*argv)


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "run", "-kernel", "/dev/null",
         "-device", "virtio-blk-pci,drive=missing"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "'missing'" in proc.stderr
