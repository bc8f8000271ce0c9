"""`appliance run` and `appliance info` as a user drives them: options, consoles, exit status."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.cli import run
from appliance.errors import ConfigError
from appliance.kvm import layout
from tests.conftest import needs_kvm, needs_qemu
from tests.machine import tinyguest
from tests.machine.procio import Lines

APPLIANCE = [sys.executable, "-m", "appliance.cli.main"]


def appliance(*args: str, stdin: bytes | None = None, timeout: float = 30, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*APPLIANCE, *args], input=stdin, capture_output=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def tiny_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not tinyguest.have_toolchain():
        pytest.skip("binutils missing")
    return tinyguest.build(tmp_path_factory.mktemp("tiny"))


# --- parsing (no VM) -----------------------------------------------------------------


def test_options_become_a_machine_config() -> None:
    cfg = run.to_config(run.parse_args([
        "-kernel", "k", "-initrd", "i", "-append", "console=ttyS0", "-m", "1G", "-smp", "cpus=4,cores=4",
        "-name", "guest=vm1,debug-threads=on", "-no-reboot", "-enable-kvm", "-machine", "q35,accel=kvm",
        "-cpu", "host", "-display", "none", "-nographic",
    ]))
    assert (cfg.kernel, cfg.initrd, cfg.cmdline) == ("k", "i", "console=ttyS0")
    assert (cfg.mem_size, cfg.num_cpus, cfg.name, cfg.no_reboot) == (1 << 30, 4, "vm1", True)
    assert cfg.serial is not None and cfg.serial.backend == "stdio" and cfg.serial.mux


def test_qemu_housekeeping_options_are_taken() -> None:
    # What scripts written for QEMU put on every command line.
    cfg = run.to_config(run.parse_args([
        "-kernel", "k", "-nodefaults", "-no-user-config", "-vga", "none", "-monitor", "none", "-S",
    ]))
    assert cfg.serial is None  # -nodefaults: no serial port unless -serial asks for one
    assert cfg.start_paused
    cfg = run.to_config(run.parse_args(["-kernel", "k", "-nodefaults", "-serial", "stdio"]))
    assert cfg.serial is not None and cfg.serial.backend == "stdio" and not cfg.start_paused


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ("stdio", ("stdio", None, None, None, False, True)),
        ("file:/tmp/x", ("file", "/tmp/x", None, None, False, True)),
        ("unix:/tmp/s,server=on,wait=off", ("socket", "/tmp/s", None, None, True, False)),
        ("unix:/tmp/s,server,nowait", ("socket", "/tmp/s", None, None, True, False)),
        ("tcp:127.0.0.1:4444,server=on,wait=off", ("socket", None, "127.0.0.1", 4444, True, False)),
        ("tcp:127.0.0.1:4444", ("socket", None, "127.0.0.1", 4444, False, True)),
    ],
)
def test_serial_forms(spec: str, expect: tuple[object, ...]) -> None:
    c = run.parse_serial(spec, {}, nographic=False)
    assert c is not None
    assert (c.backend, c.path, c.host, c.port, c.server, c.wait) == expect


def test_serial_chardev_reference() -> None:
    args = run.parse_args(["-kernel", "k", "-chardev", "socket,id=c0,path=/tmp/s,server=on,wait=off",
                           "-serial", "chardev:c0"])
    cfg = run.to_config(args)
    assert cfg.serial is not None and cfg.serial.id == "c0" and cfg.serial.server


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-kernel", "k", "-smp", "abc"], "-smp"),
        (["-kernel", "k", "-smp", "0"], "-smp: .cpus. must be at least 1, got .0."),
        (["-kernel", "k", "-smp", "2,sockets=2,cores=2"], "topology"),
        (["-kernel", "k", "-m", "64,slots=2"], "'slots'"),
        (["-kernel", "k", "-m", "lots"], "-m"),
        (["-kernel", "k", "-frobnicate"], "'-frobnicate'"),
        (["-kernel", "k", "-serial", "vc"], "'vc'"),
        (["-kernel", "k", "-serial", "chardev:nope"], "'nope'"),
        (["-kernel", "k", "-chardev", "socket,id=a,path=/x,websocket=on"], "'websocket'"),
        (["-kernel", "k", "-machine", "virt"], "'virt'"),
        (["-kernel", "k", "-machine", "q35,usb=on"], "usb=on is not supported"),
        (["-kernel", "k", "-machine", "q35,nvdimm=on"], "'nvdimm'"),
        (["-kernel", "k", "-accel", "tcg"], "'tcg'"),
        (["-kernel", "k", "-cpu", "qemu64"], "'qemu64'"),
        (["-kernel", "k", "-display", "gtk"], "'gtk'"),
        (["-kernel", "k", "-vga", "std"], "-vga: 'std'"),
        (["-kernel", "k", "-monitor", "vc"], "-monitor: 'vc' is not supported"),
        (["-kernel", "k", "-pidfile", ""], "-pidfile"),
        (["-kernel", "k", "-serial", "stdio", "-serial", "null"], "one serial"),
        (["-kernel", "k", "disk.img"], "'disk.img'"),
        (["-kernel"], "requires an argument"),
        ([], "-kernel is required"),
    ],
)
def test_bad_options_are_refused_by_name(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        run.to_config(run.parse_args(argv))


def test_help_lists_every_option() -> None:
    text = run.usage()
    for name in run.OPTIONS:
        assert name in text


@pytest.mark.parametrize(
    ("argv", "helps"),
    [
        (["-h"], True),
        (["-m", "1G", "--help"], True),
        (["-nographic", "-help"], True),
        # As in QEMU, an option's value is its value even when it reads like -h.
        (["-kernel", "k", "-append", "--help"], False),
        (["-name", "-h"], False),
    ],
)
def test_help_only_where_an_option_stands(argv: list[str], helps: bool) -> None:
    assert run.wants_help(argv) is helps


@pytest.mark.parametrize(
    ("smp", "cpus"),
    [
        ("2", 2),
        ("4,sockets=2", 4),  # cores follow: 2
        ("sockets=2,cores=2", 4),
        ("cpus=2,sockets=1,cores=2,threads=1,clusters=1", 2),
        ("2,sockets=2,cores=2", "product of the hierarchy must match maxcpus: sockets (2) * dies (1) * cores (2) "
                                "* threads (0) != maxcpus (2)"),
        ("3,sockets=2", "sockets (2) * dies (1) * cores (1) * threads (1) != maxcpus (3)"),
        ("2,maxcpus=1", "maxcpus must be equal to or greater than smp"),
        ("1_0", "'cpus' expects a number, got '1_0'"),
    ],
)
def test_smp_topology_as_qemu_7_2_works_it_out(smp: str, cpus: int | str) -> None:
    """Left-out values follow from the rest and the product must be the vCPU count, with QEMU's
    messages (checked against qemu-system-x86_64 -machine q35 -smp ...)."""
    if isinstance(cpus, int):
        assert run.to_config(run.parse_args(["-kernel", "k", "-smp", smp])).num_cpus == cpus
    else:
        with pytest.raises(ConfigError, match=cpus.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
            run.to_config(run.parse_args(["-kernel", "k", "-smp", smp]))


def _qemu_memory(size: str) -> int | None:
    """What qemu-system-x86_64 makes of ``-m size``: the guest's RAM in bytes, or None if refused."""
    out = subprocess.run(
        ["qemu-system-x86_64", "-machine", "none", "-display", "none", "-S", "-m", size, "-qmp", "stdio"],
        input=b'{"execute":"qmp_capabilities"}{"execute":"query-memory-size-summary"}{"execute":"quit"}',
        capture_output=True, timeout=30)
    for line in out.stdout.splitlines():
        if b"base-memory" in line:
            return int(json.loads(line)["return"]["base-memory"])
    return None


@needs_qemu
@pytest.mark.parametrize("size", ["1_024", "+512", ".5G", "512 M", "0x10M", "0x20", "0.5G", "1.5", "1e3", "64MB",
                                  "-0", "0x", "64 ", " 64", "1.5g", "65536k", "33554432b"])
def test_memory_sizes_as_qemu_reads_them(size: str) -> None:
    """``-m`` is a byte size first and a bare number of MiB after (qemu-system-x86_64 7.2 is the
    oracle): ``+512`` and ``0x20`` are taken, ``1.5`` and ``.5G`` are not."""
    expected = _qemu_memory(size)
    if expected is None:
        with pytest.raises(ConfigError, match="invalid size"):
            run.to_config(run.parse_args(["-kernel", "k", "-m", size]))
    else:
        assert run.to_config(run.parse_args(["-kernel", "k", "-m", size])).mem_size == expected


# --- the command --------------------------------------------------------------------


def _one_line_exit_2(proc: subprocess.CompletedProcess[bytes], needle: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert needle in err


def test_missing_kernel_exits_2(tmp_path: Path) -> None:
    _one_line_exit_2(appliance("run", "-kernel", str(tmp_path / "nope")), "no such file")


@needs_kvm
def test_file_that_is_no_kernel_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\0" * 4096)
    _one_line_exit_2(appliance("run", "-kernel", str(bad)), "neither a bzImage nor")


@needs_kvm
@pytest.mark.parametrize(("mem", "needle"), [("0", "-m 0"), ("10T", "-m 10T")])
def test_impossible_memory_sizes_exit_2(tiny_elf: Path, mem: str, needle: str) -> None:
    _one_line_exit_2(appliance("run", "-kernel", str(tiny_elf), "-m", mem), needle)


@needs_kvm
def test_initrd_larger_than_ram_exits_2(tiny_elf: Path, tmp_path: Path) -> None:
    big = tmp_path / "initrd"
    with open(big, "wb") as f:
        f.truncate(40 * layout.MiB)
    _one_line_exit_2(appliance("run", "-kernel", str(tiny_elf), "-m", "32", "-initrd", str(big)), "does not fit")


@pytest.mark.parametrize("args", [["-smp", "0"], ["-smp", "abc"], ["-bogus"], ["-machine", "q35,bogus=1"]])
def test_bad_values_exit_2_with_one_line(tmp_path: Path, args: list[str]) -> None:
    k = tmp_path / "k"
    k.write_bytes(b"x")
    proc = appliance("run", "-kernel", str(k), *args)
    assert proc.returncode == 2
    assert proc.stderr.decode().count("\n") == 1 and b"Traceback" not in proc.stderr


def test_missing_kvm_device_gets_a_clear_message(tiny_elf: Path) -> None:
    proc = appliance("run", "-kernel", str(tiny_elf), env={"APPLIANCE_KVM_DEVICE": "/nonexistent/kvm"})
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr.decode() and b"Traceback" not in proc.stderr


def test_unpermitted_kvm_device_gets_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.kvm import KvmUnavailable, system

    def deny(*_a: object, **_k: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(system.os, "open", deny)
    with pytest.raises(KvmUnavailable, match="permission denied"):
        system.open_kvm("/dev/kvm")


def test_info_says_which_kind_of_kvm() -> None:
    proc = appliance("info")
    first = proc.stdout.decode().splitlines()[0]
    assert first in ("kvm: pvm", "kvm: hardware", "kvm: unknown")


@needs_kvm
def test_stdin_console_answers_and_poweroff_exits_0(tiny_elf: Path) -> None:
    proc = subprocess.Popen([*APPLIANCE, "run", "-kernel", str(tiny_elf), "-nographic", "-smp", "2"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        out = Lines(proc.stdout)
        out.until(b"TINY-READY")
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        out.until(b"hello")
        proc.stdin.write(b"q")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_kvm
def test_reset_with_no_reboot_exits_0(tiny_elf: Path) -> None:
    proc = appliance("run", "-kernel", str(tiny_elf), "-no-reboot", "-serial", "stdio", stdin=b"r", timeout=20)
    assert proc.returncode == 0
    assert proc.stdout.count(b"TINY-READY") == 1


def _connect(make: object, addr: object, deadline: float) -> socket.socket:
    while True:
        s = make()  # type: ignore[operator]
        try:
            s.connect(addr)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@needs_kvm
@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_socket_serial_console_takes_commands(tiny_elf: Path, tmp_path: Path, kind: str) -> None:
    if kind == "unix":
        path = tmp_path / "console.sock"
        spec = f"unix:{path},server=on,wait=on"
        make = lambda: socket.socket(socket.AF_UNIX)  # noqa: E731
        addr: object = str(path)
    else:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        spec = f"tcp:127.0.0.1:{port},server=on,wait=on"
        make = lambda: socket.socket()  # noqa: E731
        addr = ("127.0.0.1", port)
    proc = subprocess.Popen([*APPLIANCE, "run", "-kernel", str(tiny_elf), "-serial", spec],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        s = _connect(make, addr, time.monotonic() + 10)
        s.settimeout(10)
        buf = b""
        while b"TINY-READY" not in buf:
            buf += s.recv(100)
        s.sendall(b"abc")
        buf = b""
        while b"abc" not in buf:
            buf += s.recv(100)
        s.sendall(b"q")
        assert proc.wait(10) == 0
        s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_kvm
def test_sigterm_stops_the_vm_with_status_0(tiny_elf: Path, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    proc = subprocess.Popen([*APPLIANCE, "run", "-kernel", str(tiny_elf), "-serial", f"file:{log}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while b"TINY-READY" not in (log.read_bytes() if log.exists() else b""):
            assert time.monotonic() < deadline, "no banner in the serial log file"
            time.sleep(0.05)
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pvm_warning_only_for_linux_kernels_without_pvm(tiny_elf: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.kvm import system
    from appliance.machine import MachineConfig

    monkeypatch.setattr(system, "host_kind", lambda: "pvm")
    assert run.pvm_warning(MachineConfig(kernel=tiny_elf)) is None
    fake_linux = tmp_path / "vmlinux"
    fake_linux.write_bytes(b"\x7fELF" + bytes(60) + b"Linux version 6.1.0 (fake)")
    warning = run.pvm_warning(MachineConfig(kernel=fake_linux))
    assert warning is not None and "PVM" in warning
    monkeypatch.setattr(system, "host_kind", lambda: "hardware")
    assert run.pvm_warning(MachineConfig(kernel=fake_linux)) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    "-m", "-smp", "-kernel", "-serial", "-chardev", "-machine", "-name", "-append", "-nographic", "-accel",
    "-cpu", "-display", "-no-reboot", "--help-not", "x", "", "0", "1G", "abc", "stdio", "unix:/x,server",
    "tcp::1,server=on,wait=off", "socket,id=a,path=/p", "chardev:a", "q35,accel=kvm", "4,cores=2", ",,", "=",
]), max_size=8))
def test_any_command_line_parses_or_raises_config_error(argv: list[str]) -> None:
    try:
        run.to_config(run.parse_args(argv))
    except ConfigError:
        pass


def test_info_json_has_kind_and_limits() -> None:
    import json

    proc = appliance("info", "--json")
    info = json.loads(proc.stdout)
    assert info["kvm"] in ("pvm", "hardware", "unknown")
    if proc.returncode == 0:
        assert info["max_vcpus"] >= 1
    _ = appliance("info", "--bogus")
    assert _.returncode == 2


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ("logical_block_size=1000", "logical_block_size=1000 must be a power of two"),
        ("logical_block_size=4096,physical_block_size=512", "physical_block_size=512 is smaller"),
        ("scsi=on", "scsi=on"),
        ("disable-modern=on", "only the modern"),
        ("event_idx=perhaps", "event_idx"),
    ],
)
def test_bad_virtio_blk_properties_are_refused_by_name(tmp_path: Path, props: str, message: str) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(1 << 20))
    argv = ["-kernel", "k", "-drive", f"file={img},format=raw,if=none,id=d0",
            "-device", f"virtio-blk-pci,drive=d0,{props}"]
    with pytest.raises(ConfigError, match=message):
        run.to_config(run.parse_args(argv))


def test_virtio_rng_takes_qemus_rate_limit() -> None:
    cfg = run.to_config(run.parse_args([
        "-kernel", "k", "-object", "rng-random,id=r0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=r0,max-bytes=1024,period=1000",
    ]))
    spec = next(d for d in cfg.devices if type(d).__name__ == "RngSpec")
    assert (spec.max_bytes, spec.period_ms) == (1024, 1000)
    with pytest.raises(ConfigError, match="max-bytes"):
        run.to_config(run.parse_args(["-kernel", "k", "-device", "virtio-rng-pci,max-bytes=0"]))


def test_libvirt_style_machine_and_rtc_options_are_taken() -> None:
    cfg = run.to_config(run.parse_args([
        "-kernel", "k", "-machine", "pc-q35-7.2,accel=kvm,usb=off,vmport=off,smm=off,dump-guest-core=off",
        "-rtc", "base=localtime,driftfix=slew",
    ]))
    assert cfg.machine_type == "q35" and cfg.rtc_localtime
    for argv, message in ((["-machine", "q35,usb=on"], "usb=on is not supported"),
                          (["-rtc", "base=2006-06-17T16:01:21"], "base '2006-06-17T16:01:21'"),
                          (["-rtc", "clock=vm"], "clock 'vm'")):
        with pytest.raises(ConfigError, match=message):
            run.to_config(run.parse_args(["-kernel", "k", *argv]))


def test_devices_take_bus_0_by_either_of_qemus_names(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(1 << 20))
    cfg = run.to_config(run.parse_args([
        "-kernel", "k", "-drive", f"file={img},format=raw,if=none,id=d0", "-netdev", "user,id=n0",
        "-device", "virtio-blk-pci,drive=d0,bus=pcie.0,addr=0x5", "-device", "virtio-net-pci,netdev=n0,bus=pci.0",
        "-device", "virtio-rng-pci,bus=pcie.0",
    ]))
    assert len(cfg.devices) == 3
    with pytest.raises(ConfigError, match="Bus 'pcie.1' not found"):
        run.to_config(run.parse_args(["-kernel", "k", "-device", "virtio-rng-pci,bus=pcie.1"]))


def test_uuid_boot_no_hpet_and_vnc_none_are_taken_as_qemu_takes_them() -> None:
    cfg = run.to_config(run.parse_args([
        "-kernel", "k", "-uuid", "6F3A2F5E-1234-4E8B-9C3D-123456789ABC", "-boot", "order=cd,menu=on,strict=on",
        "-boot", "c", "-no-hpet", "-vnc", "none",
    ]))
    assert cfg.uuid == "6f3a2f5e-1234-4e8b-9c3d-123456789abc"
    assert run.to_config(run.parse_args(["-kernel", "k"])).uuid == "00000000-0000-0000-0000-000000000000"
    for argv, message in ((["-uuid", "6f3a2f5e"], "-uuid: '6f3a2f5e' is not a UUID"),
                          (["-boot", "order=z"], "invalid order 'z'"),
                          (["-boot", "menu=maybe"], "menu"),
                          (["-vnc", ":1"], "-vnc: ':1' is not supported")):
        with pytest.raises(ConfigError, match=message):
            run.to_config(run.parse_args(["-kernel", "k", *argv]))


def test_non_transitional_names_are_the_modern_only_devices_we_have(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(1 << 20))
    cfg = run.to_config(run.parse_args([
        "-kernel", "k", "-drive", f"file={img},format=raw,if=none,id=d0", "-netdev", "user,id=n0",
        "-device", "driver=virtio-blk-pci-non-transitional,drive=d0,disable-legacy=on",
        "-device", "virtio-net-pci-non-transitional,netdev=n0,disable-modern=off",
        "-device", "virtio-rng-pci-non-transitional", "-nic", "user,model=virtio-net-pci-non-transitional",
    ]))
    assert len(cfg.devices) == 4
    for argv, message in ((["-device", "virtio-rng-pci,disable-legacy=off"], "disable-legacy=off"),
                          (["-device", "virtio-rng-pci,disable-modern=on"], "disable-modern=on"),
                          (["-device", "virtio-rng-pci-transitional"], "'virtio-rng-pci-transitional'")):
        with pytest.raises(ConfigError, match=message):
            run.to_config(run.parse_args(["-kernel", "k", *argv]))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["-machine", "help"], "Supported machines are:\nmicrovm"),
        (["-M", "?"], "q35 "),
        (["-cpu", "help"], "Available CPUs:\nx86 host"),
        (["-accel", "help"], "kvm\n"),
        (["-device", "help"], 'Network devices:\nname "virtio-net-pci", bus PCI, alias "virtio-net"\n'),
        (["-version"], "appliance run version "),
        (["--version"], "appliance run version "),
    ],
)
def test_help_values_and_version_print_and_exit_0(argv: list[str], needle: str) -> None:
    """As QEMU: ``-machine help`` and the like list what there is, and ``-version`` prints it."""
    proc = subprocess.run([*APPLIANCE, "run", *argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert needle in proc.stdout
