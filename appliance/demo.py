"""`make demo`: boot the kit's test guest with `appliance run` and drive its console.

Makes a qcow2 disk with ``appliance img create``, then runs ``appliance run``
with two vCPUs, that disk on virtio-blk, a virtio-net NIC on the user-mode
network (``-netdev user``) and a ``filter-dump`` capture of it, as a child
process the way a user would. It shows everything the guest prints and types
on the serial console: ``info``, a disk write and read-back, a DHCP lease and
a ping of the gateway, then ``poweroff``. Afterwards ``appliance img check``
checks the disk and tshark lists the captured frames. Nothing leaves the
machine: DHCP and the gateway are answered by the user-mode stack itself.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READY = b"TESTGUEST-READY"
STEP_TIMEOUT = 60.0


def _guest() -> Path:
    from appliance.kit import paths

    elf = paths().guest_elf
    if not elf.exists():
        print("demo: building the kit (appliance kit build)", flush=True)
        subprocess.run([sys.executable, "-m", "appliance.cli.main", "kit", "build"], check=True)
    return elf


class Child:
    """The VMM process, with its console echoed to our stdout as it arrives."""

    def __init__(self, argv: list[str]) -> None:
        self.start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.seen = b""

    def pump(self, timeout: float) -> bool:
        """Echo output for up to ``timeout`` s; False once the child closed stdout."""
        assert self.proc.stdout is not None
        for _ in self.sel.select(timeout):
            data = self.proc.stdout.read(65536)
            if not data:
                return False
            self.seen += data
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        return True

    def wait_for(self, needle: bytes, timeout: float = STEP_TIMEOUT) -> float:
        deadline = time.monotonic() + timeout
        mark = len(self.seen)
        while needle not in self.seen[max(0, mark - len(needle)) :]:
            if time.monotonic() > deadline or not self.pump(0.2) and self.proc.poll() is not None:
                raise SystemExit(f"\ndemo: no {needle.decode()!r} from the guest")
        return time.monotonic() - self.start

    def quiet(self, seconds: float) -> None:
        """Echo output until the guest has been silent for ``seconds``."""
        last = len(self.seen)
        while self.pump(seconds):
            if len(self.seen) == last:
                return
            last = len(self.seen)

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


def _appliance(*args: str) -> None:
    argv = [sys.executable, "-m", "appliance.cli.main", *args]
    print("demo: $ appliance " + " ".join(args), flush=True)
    subprocess.run(argv, check=True)


def main() -> int:
    elf = _guest()
    with tempfile.TemporaryDirectory(prefix="appliance-demo-") as tmp:
        disk, pcap = Path(tmp) / "disk.qcow2", Path(tmp) / "nic.pcap"
        _appliance("img", "create", "-f", "qcow2", str(disk), "64M")
        code = _run(elf, disk, pcap)
        if code == 0:
            print(flush=True)
            _appliance("img", "check", str(disk))
            tshark = shutil.which("tshark")
            if tshark:
                print(f"demo: $ tshark -r {pcap}", flush=True)
                subprocess.run([tshark, "-r", str(pcap)], check=False, stderr=subprocess.DEVNULL)
    return code


def _run(elf: Path, disk: Path, pcap: Path) -> int:
    argv = [sys.executable, "-m", "appliance.cli.main", "run", "-kernel", str(elf),
            "-smp", "2", "-m", "256M", "-nographic", "-name", "demo",
            "-drive", f"file={disk},format=qcow2,if=virtio",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
            "-object", f"filter-dump,id=cap0,netdev=n0,file={pcap}"]
    print("demo: $ appliance " + " ".join(argv[3:]), flush=True)
    child = Child(argv)
    ready = child.wait_for(READY)
    child.quiet(0.3)
    print(f"\ndemo: guest ready after {ready * 1000:.0f} ms", flush=True)
    steps = [
        ("info", b"INFO "),
        ("blk info", b"BLK info"),
        ("blk write 0 8 171", b"BLK write"),
        ("blk read 0 8", b"BLK read"),
        ("net dhcp", b"NET dhcp"),
        ("net ping 10.0.2.2 2", b"NET ping done"),
    ]
    for line, answer in steps:
        print(f"\ndemo: typing '{line}'", flush=True)
        child.type(line)
        child.wait_for(answer)
        child.quiet(0.2)
    print("\ndemo: typing 'poweroff'", flush=True)
    child.type("poweroff")
    while child.pump(0.2) or child.proc.poll() is None:
        if time.monotonic() - child.start > ready + STEP_TIMEOUT:
            child.proc.kill()
            raise SystemExit("\ndemo: the VM did not power off")
    code = child.proc.wait()
    total = time.monotonic() - child.start
    print(f"\ndemo: appliance run exited with status {code} after {total * 1000:.0f} ms", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
