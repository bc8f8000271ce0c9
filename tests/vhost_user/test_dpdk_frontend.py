"""DPDK's virtio-user PMD (``dpdk-testpmd``) as the vhost-user front end of `appliance net-daemon`.

The other vhost-user-net tests use QEMU (or our own test front end); DPDK's virtio-user is an
independent implementation of the front-end side of vhost-user.rst with its own message order:
SET_VRING_CALL for every ring before SET_FEATURES and SET_MEM_TABLE, one memfd region covering
all of its memory, every ring described (num, base, addr, kick) before any is enabled,
SET_VRING_ENABLE(0) on every ring before GET_VRING_BASE, never GET_QUEUE_NUM, and a control queue
it emulates itself, so a second queue pair is enabled only once the port starts. A port
reconfigured with new offloads resets the device on the same connection and negotiates again.

testpmd runs in io forwarding mode: every frame the daemon delivers on a receive queue comes
straight back on the transmit queue of the same pair, so a frame the test injects into the
daemon's netdev and gets back has crossed the protocol both ways. testpmd is driven through its
interactive prompt (one command at a time, each finished when the next prompt appears).

No hugepages are needed: with ``--no-huge`` DPDK 22.11's EAL backs its memory with a memfd
mapped shared, and virtio-user hands that fd over in SET_MEM_TABLE. Nothing on the host is
changed except DPDK's empty runtime directory, which the test removes. Traffic stays on
loopback (a ``dgram`` netdev) or inside a network namespace the test makes (a multiqueue tap).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, needs_root
from tests.net.netns import inside, namespace, ns_exec
from tests.ports import free_port

TESTPMD = shutil.which("dpdk-testpmd")

pytestmark = [
    pytest.mark.skipif(TESTPMD is None, reason="dpdk-testpmd is not installed (Debian package dpdk-dev)"),
    pytest.mark.timeout(120),
]

PROMPT = b"testpmd> "
# The source MAC of every frame the test injects (locally administered).
TEST_SRC = bytes.fromhex("020000000001")


class Pmd:
    """One ``dpdk-testpmd -i`` process whose only port is a virtio-user device on ``sock``
    with ``queues`` queue pairs, of which it uses the first ``used``.

    Its two lcores share one CPU: the forwarding lcore polls, the main one mostly waits on
    stdin, and the daemon keeps the rest of the machine.
    """

    def __init__(self, sock: Path, *, queues: int = 1, used: int | None = None) -> None:
        assert TESTPMD is not None
        used = queues if used is None else used
        cpu = sorted(os.sched_getaffinity(0))[-1]
        self.prefix = f"apl-{uuid.uuid4().hex[:8]}"
        # The EAL makes a runtime directory per --file-prefix (empty after exit with --no-shconf)
        # under <run dir>/dpdk: both are removed afterwards, the latter only if it made it.
        run = Path("/var/run") if os.geteuid() == 0 else Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp"))
        self._runtime = run / "dpdk"
        self._made_runtime = not self._runtime.exists()
        # testpmd prints results with stdio, its prompt with write(2): line-buffer stdio so that a
        # command's output is in the pipe before the prompt that follows it.
        argv = [
            "stdbuf", "-oL", TESTPMD, f"--lcores=0@{cpu},1@{cpu}", "--no-huge", "-m", "128", "--no-pci", "--no-shconf",
            f"--file-prefix={self.prefix}", f"--vdev=net_virtio_user0,path={sock},queues={queues}",
            "--", "-i", "--forward-mode=io", f"--rxq={used}", f"--txq={used}",
            "--total-num-mbufs=4096", "--no-lsc-interrupt", "--disable-link-check",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, bufsize=0)
        self._out = bytearray()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait_prompts(1, 0, timeout=60)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            chunk = self.proc.stdout.read(4096)
            with self._cond:
                if not chunk:
                    self._cond.notify_all()
                    return
                self._out += chunk
                self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return self._out.decode(errors="replace")

    def _wait_prompts(self, count: int, start: int, *, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._out.count(PROMPT, start) < count:
                left = deadline - time.monotonic()
                said = self._out.decode(errors="replace")
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"testpmd exited {self.proc.returncode}:\n{said}")
                if left <= 0:
                    raise AssertionError(f"no testpmd prompt in {timeout} s:\n{said}")
                self._cond.wait(min(left, 0.5))
            return self._out[start:].decode(errors="replace")

    def cmd(self, line: str, *, timeout: float = 30) -> str:
        """Run one command; returns what it printed."""
        assert self.proc.stdin is not None
        with self._cond:
            start = len(self._out)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._wait_prompts(1, start, timeout=timeout)

    def quit(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"quit\n")
        self.proc.stdin.flush()
        return self.proc.wait(30)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._reader.join(5)
        shutil.rmtree(self._runtime / self.prefix, ignore_errors=True)
        if self._made_runtime:
            with contextlib.suppress(OSError):
                self._runtime.rmdir()  # not if another DPDK process has its directory there


@contextlib.contextmanager
def run_testpmd(sock: Path, *, queues: int = 1, used: int | None = None) -> Iterator[Pmd]:
    pmd = Pmd(sock, queues=queues, used=used)
    try:
        yield pmd
    finally:
        pmd.close()


def link_is_up(pmd: Pmd) -> bool:
    return "Link status: up" in pmd.cmd("show port info 0")


def forwarded(stop_output: str) -> dict[int, int]:
    """Frames sent back per queue pair, from what ``stop`` prints (only a total with one stream)."""
    per_queue = re.findall(r"Forward Stats for RX Port= 0/Queue= *(\d+) .*?\n\s*RX-packets: (\d+)\s+TX-packets: (\d+)",
                           stop_output)
    if per_queue:
        return {int(q): int(tx) for q, _rx, tx in per_queue}
    m = re.search(r"Forward statistics for port 0\s*-+\s*RX-packets: (\d+).*?\n\s*TX-packets: (\d+)", stop_output)
    assert m is not None, stop_output
    return {0: int(m.group(2))}


# -- the daemon -----------------------------------------------------------------------------


class Daemon:
    """`appliance net-daemon` as users start it, with a QMP monitor; stderr goes to a file."""

    def __init__(self, tmp: Path, netdev: str, *, queues: int = 1, netns: str | None = None) -> None:
        self.sock = tmp / "vu.sock"
        self.mon = tmp / "qmp.sock"
        self.log = tmp / "daemon.log"
        argv = [
            sys.executable, "-m", "appliance.cli.main", "net-daemon", "--netdev", netdev,
            "--export", f"type=vhost-user-net,id=e0,netdev=n0,addr.type=unix,addr.path={self.sock},queues={queues}",
            "--chardev", f"socket,id=m0,path={self.mon},server=on,wait=off", "--monitor", "chardev=m0",
        ]  # fmt: skip
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 30
        while not (self.sock.exists() and self.mon.exists()):
            assert self.proc.poll() is None, f"net-daemon exited {self.proc.returncode}: {self.stderr}"
            assert time.monotonic() < deadline, "net-daemon made no sockets in 30 s"
            time.sleep(0.05)

    @property
    def stderr(self) -> str:
        return self.log.read_text()

    def nic(self) -> dict[str, Any]:
        """The export as ``x-appliance-query-nics`` reports it."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.mon))
            f = s.makefile("rw")
            json.loads(f.readline())  # greeting
            for cmd in ("qmp_capabilities", "x-appliance-query-nics"):
                f.write(json.dumps({"execute": cmd}) + "\n")
                f.flush()
                while "return" not in (reply := json.loads(f.readline())):
                    assert "error" not in reply, reply
            (nic,) = reply["return"]
            return dict(nic)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@contextlib.contextmanager
def daemon(tmp: Path, netdev: str, *, queues: int = 1, netns: str | None = None) -> Iterator[Daemon]:
    d = Daemon(tmp, netdev, queues=queues, netns=netns)
    try:
        yield d
    finally:
        d.close()


def assert_clean_exit(d: Daemon) -> None:
    """The daemon outlived every front end, then exits 0 on SIGTERM having logged no failure."""
    assert d.proc.poll() is None, f"net-daemon died: {d.stderr}"
    rc = d.stop()
    log = d.stderr
    assert rc == 0, log
    assert "Traceback" not in log and "session failed" not in log, log
    assert not d.sock.exists(), "the daemon removes its socket on exit"


# -- traffic ---------------------------------------------------------------------------------


def collect(sock: socket.socket, tags: set[bytes], *, timeout: float = 5.0) -> set[bytes]:
    """Receive until every tagged frame came back (or the timeout); returns the tags seen."""
    seen: set[bytes] = set()
    deadline = time.monotonic() + timeout
    while seen != tags and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        seen.update(t for t in tags if t in data)
    return seen


def udp_burst(sock: socket.socket, daemon_port: int, name: str, count: int = 64) -> set[bytes]:
    """Broadcast frames (EtherType 0x88B5, IEEE 802's local experimental one) sent to a dgram
    netdev as datagrams; returns the tags of those that came back."""
    tags = {f"dpdk-{name}-{i:04d}".encode() for i in range(count)}
    for tag in sorted(tags):
        frame = b"\xff" * 6 + TEST_SRC + b"\x88\xb5" + tag + bytes(40)
        sock.sendto(frame, ("127.0.0.1", daemon_port))
    return collect(sock, tags)


def ipv4_udp(tag: bytes, sport: int) -> bytes:
    """A frame for the tap: distinct UDP source ports give distinct flow hashes, which the
    kernel's tun driver spreads over its queues (and so over the daemon's queue pairs)."""
    udp = struct.pack("!HHHH", sport, 9, 8 + len(tag), 0) + tag
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     bytes([198, 51, 100, 1]), bytes([198, 51, 100, 2]))
    return bytes.fromhex("020000000002") + TEST_SRC + b"\x08\x00" + ip + udp


def tap_burst(sock: socket.socket, name: str, count: int = 64) -> set[bytes]:
    tags = {f"dpdk-{name}-{i:04d}".encode() for i in range(count)}
    for i, tag in enumerate(sorted(tags)):
        sock.send(ipv4_udp(tag, 20000 + i))
    return collect(sock, tags)


# -- tests -----------------------------------------------------------------------------------


def test_testpmd_forwards_frames_through_port_restart_and_process_kill(tmp_path: Path) -> None:
    """testpmd connects to a daemon whose netdev is a UDP link on loopback: the handshake
    completes and the port comes up, frames injected into the link come back through testpmd
    (a 9000-byte one byte for byte), again after ``port stop``/``port start`` (which sends no
    message: the rings stay as they were), and again after testpmd is killed with SIGKILL
    mid-session and a new one connects. A third asks for two queue pairs where the export has
    one. The daemon counts the three connections and exits cleanly at the end."""
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        link.bind(("127.0.0.1", 0))
        peer_port = link.getsockname()[1]
        port = free_port()
        d = stack.enter_context(daemon(
            tmp_path, f"dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={port},"
            f"remote.type=inet,remote.host=127.0.0.1,remote.port={peer_port}"))

        with run_testpmd(d.sock) as pmd:
            assert link_is_up(pmd)
            pmd.cmd("start")
            assert len(udp_burst(link, port, "first")) == 64
            # A jumbo frame: received into five of testpmd's 2 KiB mbufs (mergeable rx buffers,
            # num_buffers in the header) and sent back as a five-segment descriptor chain.
            jumbo = b"\xff" * 6 + TEST_SRC + b"\x88\xb5" + bytes(i * 7 & 0xFF for i in range(9000))
            link.sendto(jumbo, ("127.0.0.1", port))
            link.settimeout(5)
            assert link.recv(65536) == jumbo
            assert forwarded(pmd.cmd("stop")) == {0: 65}

            pmd.cmd("port stop 0")
            pmd.cmd("port start 0")
            assert link_is_up(pmd)
            pmd.cmd("start")
            assert len(udp_burst(link, port, "restarted")) == 64
            assert forwarded(pmd.cmd("stop")) == {0: 64}

            pmd.cmd("start")
            pmd.kill()  # no GET_VRING_BASE, no goodbye: the socket just closes

        with run_testpmd(d.sock) as pmd:
            assert link_is_up(pmd)
            pmd.cmd("start")
            assert len(udp_burst(link, port, "second")) == 64
            assert forwarded(pmd.cmd("stop")) == {0: 64}
            assert pmd.quit() == 0, pmd.output

        # queues=2 on this one-pair export: virtio-user never asks GET_QUEUE_NUM (vhost-user.rst
        # "Multiple queue support" has the front end check it) and sets up rings 2 and 3 too.
        # Those messages are refused one by one; pair 0 carries traffic all the same.
        with run_testpmd(d.sock, queues=2, used=1) as pmd:
            assert link_is_up(pmd)
            pmd.cmd("start")
            assert len(udp_burst(link, port, "oversized")) == 64
            assert forwarded(pmd.cmd("stop")) == {0: 64}
            assert pmd.quit() == 0, pmd.output
        assert "ring 2 does not exist" in d.stderr

        assert d.nic()["connections"] == 3
        assert_clean_exit(d)


@needs_root
@pytest.mark.netns
def test_testpmd_uses_both_queue_pairs_of_a_multiqueue_tap(tmp_path: Path) -> None:
    """A two-pair export on a multiqueue tap inside a namespace the test makes: testpmd with
    ``queues=2`` sets up all four rings, enables the second pair when its port starts, and
    frames of many flows written to the tap come back through both pairs. The port is then
    reconfigured with checksum offloads, which makes virtio-user reset the device and negotiate
    new features, memory and rings on the same connection; traffic flows through both pairs
    again."""
    with namespace() as ns, contextlib.ExitStack() as stack:
        ns_exec(ns, "ip", "link", "set", "lo", "up")
        d = stack.enter_context(daemon(tmp_path, "tap,id=n0,ifname=dtap0,queues=2", queues=2, netns=ns))
        with inside(ns):
            tap = stack.enter_context(socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)))
            tap.bind(("dtap0", 0))

        with run_testpmd(d.sock, queues=2) as pmd:
            assert link_is_up(pmd)
            pmd.cmd("start")
            assert len(tap_burst(tap, "mq")) == 64
            per_queue = forwarded(pmd.cmd("stop"))
            assert set(per_queue) == {0, 1} and all(n > 0 for n in per_queue.values()), per_queue
            assert sum(per_queue.values()) >= 64  # plus whatever the namespace's IPv6 sent

            pmd.cmd("port stop 0")
            pmd.cmd("port config 0 rx_offload tcp_cksum on")
            pmd.cmd("port config 0 tx_offload tcp_cksum on")
            pmd.cmd("port start 0")
            assert link_is_up(pmd)
            pmd.cmd("start")
            assert len(tap_burst(tap, "renegotiated")) == 64
            per_queue = forwarded(pmd.cmd("stop"))
            assert set(per_queue) == {0, 1} and all(n > 0 for n in per_queue.values()), per_queue
            assert pmd.quit() == 0, pmd.output

        queues = d.nic()["queues"]
        assert len(queues) == 2 and all(q["rx_frames"] > 0 and q["tx_frames"] > 0 for q in queues), queues
        assert_clean_exit(d)
