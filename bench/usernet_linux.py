#!/usr/bin/env python3
"""User-mode networking with a real Linux guest, side by side in one run (issue 6, part 2).

The Linux kit in QEMU TCG reaches the host through three user-mode stacks on
the same guest: ours (``appliance net-daemon --netdev user`` over vhost-user,
a process of its own as in use), QEMU's built-in ``-netdev user`` (libslirp),
and passt (``-netdev stream`` to its socket) when Debian's package is
installed. Only loopback services this script starts are contacted.

Rows: guest→host TCP throughput (the guest uploads to a loopback sink via
10.0.2.2), host→guest TCP throughput (a host client pushes through
``hostfwd``), guest→host TCP connection setup rate (busybox ``nc`` to the sink,
one process a connection), and host→guest connection rate through ``hostfwd``
(a host client connects, sends one byte and its FIN, and reads the byte back to
EOF, one connection at a time; in the guest one persistent ``nc -ll`` runs a
forked ``cat`` for each). The client speaks first because passt (Debian 12's)
leaves an inbound connection half-open until the host side sends data.

The guest's emulated CPU does most of the work, so on a shared machine the
numbers follow the load. To keep the comparison paired, each round boots one
guest per stack and measures every stack back to back; the table gives
per-stack medians over rounds and the median of the per-round ratios; with more than two rounds,
each rate's per-round ratios follow as median, mean ± standard error and the rounds at or above 1. Within a
round the connection rows run in ``--chunks`` parts per stack, the stacks
taking turns, so that a slow second of the machine falls on all of them (a
connection rate measured in one piece per stack moved by 10-30% from one
stack's turn to the next on this machine). The
boot and measuring order rotates each round, and guests are not reused
across rounds: the first QEMU of a set runs the same kit 3-5% slower.

NIC settings: each stack gets QEMU's ``virtio-net-pci`` with its defaults,
except that on QEMU 7.x ours has ``vectors=0`` (INTx): QEMU 7.2 under TCG
crashes in its MSI-X notifier path when a vhost-user NIC starts. ``--intx-all``
gives the other stacks INTx too (a like-for-like NIC). ``--qemu-root DIR`` runs
every guest on another QEMU, such as bookworm-backports' (unpacked by
``bench/tools/qemu_backport.py``), where ours has MSI-X like the others.

CPU rows (connection runs): ``stack_cpu_ms_per_conn`` is the stack's own process
or thread (our net-daemon; QEMU's main thread for libslirp; passt), and
``qemu_main_cpu_ms_per_conn`` QEMU's main thread, which for ours and passt turns
their interrupt eventfds into guest interrupts (each a wake-up of that thread).
On a shared 2-core machine the guest's vCPU thread competes with both, so
connection rate follows the sum of the two rows as much as latency.
``guest_vcpu_cpu_ms_per_conn`` is the guest's TCG vCPU thread (the guest's own work, its
exits and interrupts), ``guest_vcpu_wait_ms_per_conn`` the time that thread was runnable but
had no host CPU (a busy machine: wall time per connection minus the two is the guest's idle
time, waiting for the stack), and ``guest_irqs_per_conn`` counts the guest's virtio interrupts
(/proc/interrupts). The ``hostfwd_*`` rows are the same over the hostfwd connections (their
interrupts include a few from the two shell commands that read the counts).
``--profile FILE`` samples our daemon with py-spy during the connection runs,
``--cprofile FILE`` runs it under cProfile, and ``--daemon-tree DIR`` runs it
from another source tree (A/B runs of two versions, each against libslirp).

Where the connection rows stand (2026-11-27, QEMU 7.2, ``--pcap`` on both stacks, 200
busybox ``nc`` connections in a slow phase of the machine). Measured by each stack's own
capture, the guest's SYN to our SYN-ACK took a median 339 us in ours and 661 us in libslirp,
and the guest's FIN to our FIN took 373 us against 295 us. The guest still waited longer per
connection with ours: 1.79 ms against 1.64 ms. What is left after the stacks' own time is
~1.07 ms against ~0.68 ms. That difference is the way back to the guest: our call eventfd
wakes QEMU's main thread, which then interrupts the vCPU. In ``perf sched`` it ran 50-85 us
per notification, on the CPU that our daemon and the host client also use (the TCG vCPU holds
the other). These paired ``--compare-tree`` runs changed nothing beyond the rounds' noise
(ratio of ours over the variant; median, then mean ± standard error):
- the daemon on uvloop: 1.035 and 1.016 ± 0.022 (connections), 1.012 and 0.987 ± 0.028
  (hostfwd), over 6 rounds;
- its heap on transparent huge pages (``PYTHONMALLOC=malloc``, ``glibc.malloc.hugetlb=1``):
  1.002 and 1.017 ± 0.024, 1.006 and 1.001 ± 0.025, over 6 rounds;
- a 100 us EEVDF slice (``sched_setattr``): 0.979 and 0.994 ± 0.015, 1.012 and 1.001 ± 0.021,
  over 20 rounds;
- the ACK of a guest's FIN in FIN-WAIT-2 held for 20 ms, so that pass interrupts nobody:
  hostfwd 1.041 and 1.038 ± 0.021 over 8 rounds, so the variant was slower.

The cyclic GC ran 7 gen-0 collections, 1.2 ms in all, over a run of ~400 connections.

Later measurements (2026-11-27, second session):
- Of the two passes the guest waits on, ~320 us (SYN) and ~300 us (FIN) of CPU when cold
  (``bench/tools/conn_passes.py``), the kernel takes a large share: a cold ``connect()`` to the
  loopback sink with its ``getpeername()`` took 132 us (76 us warm), and the FIN pass's
  ``shutdown()`` 98 us (46 us warm). The loopback handshake and the sink's wake-up run inside
  those calls, in our thread, as they do in QEMU's main thread for libslirp.
- The sink's close came inside the FIN pass (read after the yield) for 289 of 300 connections
  in a TCG run, so a second pass for the host's FIN is rare.
- In a fast phase (400 connections, ``--pcap``), the medians, ours against libslirp, were:
  SYN to SYN-ACK 256 against 516 us; SYN-ACK to the guest's ACK 622 against 410 us (the way
  back to the guest and out again); the guest's FIN to our FIN 263 against 221 us.
- Single rounds of the connection row alone (``--rounds 1 --only connections_per_s``) read
  1.01-1.02 three times, while the 6-round table reads ~0.96. The first round boots and
  measures the stacks in the same order every time, so a single round is not a fair
  comparison; the table's rotation is.
- Not kicking for the guest's handshake ACK (transmit kicks 831 -> 609 over 300 connections)
  measured 0.960 ± 0.033 (10 rounds, new over old) and 0.981 ± 0.030 (6 rounds, old over new)
  in two paired runs: no gain either way. It was reverted, because it also delays a guest that
  sends its first request with the handshake ACK (TCP_QUICKACK cleared before connect()).
- ``perf record -a`` with the sched tracepoints silently missed most switches of one QEMU's
  vCPU thread in one run (its summed run time came to 0.9 s of a ~2.3 s span). Check a thread's
  summed run time against the bench's own CPU rows before trusting such a trace.

Wake-ups on this host (2026-11-27, third session; small C probes, two processes on
eventfds): this machine is itself a guest (cpuidle ``haltpoll`` with ``guest_halt_poll_ns=0``),
so an idle CPU halts at once and waking a thread there goes through the hypervisor. A
``write()`` that wakes a reader on the idle CPU took a median 8.8 us of the writer's time, and
a round trip between the two CPUs 70-77 us, against 8 us with both on one CPU. Our way back to
the guest has one such wake-up more than libslirp's (our call eventfd wakes QEMU's main thread,
which then wakes the vCPU), twice per connection; with the main thread's own 50-85 us that is
~0.2 ms a connection, what our faster passes win back. Two tables from the same code that day
read 1.03 and 1.02 (``--rounds 6``, connections and hostfwd; mean ± standard error 1.005 ±
0.058 and 1.036 ± 0.022) and 1.00 and 1.00 (``--rounds 12 --no-passt``; 1.021 ± 0.029 and 1.021
± 0.035).

Compiled stack (2026-11-27, fourth session): ``appliance/nat/tcp.py``, ``tcp_nat.py`` and
``ipv4.py`` built with mypyc (``frames.py`` does not build: mypyc's dataclass support has no
``memoryview`` annotation) took ``bench/tools/conn_passes.py``'s four passes from 851-907 to
819-837 us of CPU cold, and changed nothing warm (438 against 449 us): the passes' time is in the
kernel calls, the device path and the caches, not in the TCP code. Not pursued. The day's table
(``--rounds 6 --conns 200``) read 1.02 (0.979 ± 0.043) and 0.95 (0.959 ± 0.028); a second,
in a fast phase of the machine (~168 connections/s), 1.00 (1.016 ± 0.026) and 0.98
(0.973 ± 0.016).

An interrupt fewer that made hostfwd slower (2026-11-27, fifth session; 4d4fce8, reverted in
8445e3f). Our ACK of the FIN a hostfwd guest sends from LAST-ACK was put in the receive ring
without an interrupt, for the next connection's SYN to take along. Interrupts per hostfwd
connection fell from 2.99 to 2.05, but the guest's idle time per connection rose from 0.37 to
0.56 ms. Paired against the old tree (``--compare-tree``, 8 rounds), hostfwd read 0.961 (0.959 ±
0.033, new over old) and guest→host 1.015 (0.997 ± 0.036). That ACK lets the guest tear the old
connection down while the host client opens the next; deferred, the teardown waits behind the
SYN. This agrees with the held FIN-WAIT-2 ACK above.
The day's table (``bench/usernet.py --rounds 6 --linux-conns 200``, a slow phase of the machine,
140-170 connections/s) read 0.96 (0.971 ± 0.024) on connections and 1.06 (1.048 ± 0.032)
through hostfwd; throughput 1.63x guest→host and 2.00x host→guest.

Frames per connection (2026-11-27, sixth session; ``--pcap``, 100 connections of each kind).
Guest→host, ours: guest SYN, our SYN-ACK, guest ACK, guest FIN, our FIN, guest ACK (2 frames
to the guest); libslirp sends its ACK of the guest's FIN apart from its FIN (3). Hostfwd, ours:
our SYN, guest SYN-ACK, our data with FIN and the ACK, the guest's echo, its FIN, our ACK (2 to
the guest); libslirp 11 frames, 5 to the guest. Nothing is left to merge. The day's table, in a
slow phase (host-driven connections at 2556/s against 4469/s the day before), read 1.04 (1.020
± 0.040) on connections and 0.98 (0.986 ± 0.033) through hostfwd; throughput 1.59x and 1.93x.

Run-queue waits (2026-11-28; ``stack_wait_ms_per_conn`` and ``qemu_main_wait_ms_per_conn``,
schedstat's second field). In the day's table (6 rounds, a slow phase, ~55 connections/s) our
daemon waited 0.81 ms a connection for a CPU against 0.39 ms for libslirp's thread (QEMU's main
thread), and 1.13 against 0.34 ms through hostfwd, where the host client is the bench's own Python
process on the same CPU. QEMU's main thread waited no longer with ours (0.33 against 0.39 ms).
The guest's idle time per connection was 1.33 against 0.74 ms. Part of a pass's latency is this
queueing behind the other host processes on the CPU the TCG vCPU leaves free; the 100 us EEVDF slice
above, which lets a woken daemon preempt sooner, changed nothing beyond noise over 20 rounds.

The kit's faster boot (2026-11-28, second session: PVH entry, no crypto self-tests, no mitigation
patching; appliance/kit/tcg.py) left the stacks' rows where they were: two tables that day read
1.02 and 0.98 on connections (means 1.004 ± 0.021 and 1.000 ± 0.030) and 0.99 and 1.05 through
hostfwd. passt's host→guest row rose from 0.234 to 0.28-0.31 Gbit/s (not looked into).

Where the daemon's CPU goes per loop callback (2026-11-28, third session; 300 busybox ``nc``
connections, a slow phase of the machine at ~56 connections/s, each callback of the event loop
timed with ``time.thread_time`` by a ``sitecustomize`` wrapper instead of cProfile, which
inflates the small calls). A connection cost 1.83 ms of loop CPU:
- 2.6 kick passes of ~370 us each; the SYN's ``TcpNat.no_conn`` took 345 us, of which
  ``_start_connect`` (the loopback ``connect()``) took 236 us;
- 5.9 ``epoll`` waits of ~42 us each (the selector's Python included);
- the deferred passes that the guest does not wait on: ``_after_syn_ack`` 188 us, the
  ``_tx_quiet_due`` look at the transmit ring 196 us, and the host socket's ``close()`` 39 us.

``perf record`` (cpu-clock) put 74% of the daemon's CPU in libpython and 20% in the kernel. The
same day ``bench/tools/conn_passes.py`` read 1537 us cold and 751-868 us warm for its four passes,
against 851-907 and 438-449 us the day before. An older tree (79c8ac7) read the same as this
one side by side, so the machine, not the code, had slowed.

Scheduler settings for our daemon alone were also tried, on one guest, in alternating
60-connection chunks, 6 of each. Against the default:
- SCHED_FIFO read 0.92;
- pinned to CPU 0, 1.02;
- nice -10, 0.96.

Nothing beat the default beyond the chunks' ±15%. FIFO was slower because the daemon then holds
the CPU that QEMU's main thread and the host's server also need, and both of them are on the
guest's critical path.

ftrace on this host does not record a CPU's switch from idle to the task it has just woken: the
sched_switch events from swapper are missing on one CPU, and perf's sched tracepoints lose the
same ones. So a wake-up's latency cannot be read from a trace here. The day's table (6 rounds)
read 1.00 (1.005 ± 0.015) on connections and 1.01 (1.023 ± 0.032) through hostfwd, and 1.37x
and 1.44x on throughput. The guest idled 1.19 ms a connection against 0.68 ms. Its vCPU used
15.06 ms against 15.56 ms: fewer interrupts make up for the longer idle, as in the earlier
tables. A second table that day, after the vhost-user change for switched-off rings (which this
benchmark's QEMU never makes), read 1.00 (1.004 ± 0.024) and 0.95 (0.973 ± 0.036); throughput
1.50x and 1.77x.

2026-11-28, fourth session (libslirp's MACs for the emulated addresses, transmit passes capped
at PASS_BUDGET chains; neither touches a connection's frames), in a slow phase of the machine
(host-driven connections at 1274/s against 2397/s the session before): 0.97 (0.973 ± 0.022)
on connections and 1.05 (1.044 ± 0.031) through hostfwd; throughput 1.33x and 1.47x. The guest
idled 1.72 ms a connection against 1.00 ms, and our daemon waited 0.94 ms for a CPU against
0.44 ms for QEMU's main thread.

2026-11-28, fifth session (hubs, tap scripts and option parity; nothing on a single export's
path), in a slow phase of the machine (guest vCPU 16.7 ms a connection against 15.1 ms the
session before): 0.94 (0.944 ± 0.020) on connections and 0.99 (0.991 ± 0.026) through hostfwd;
throughput 1.25x and 1.67x. The guest idled 1.53 ms a connection against 0.78 ms, and our
daemon waited 0.91 ms for a CPU against 0.39 ms for QEMU's main thread.

Usage: ``.venv/bin/python bench/usernet_linux.py [--mb 32] [--conns 50] [--rounds 3] [--chunks 4]``;
``--compare-tree DIR`` adds a second net-daemon (stack ``ours-b``) from another tree, paired round by round.
The issue's table comes from ``--rounds 6 --conns 200``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.kit.tcg import TcgGuest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The hostfwd port is bound by the stack's own process, so it is picked ahead, from below the
# kernel's ephemeral range (a bind(0) port could go to any connection's source port meanwhile).
from tests.ports import free_port  # noqa: E402

MAC = "52:54:00:12:34:56"
METRICS = ("guest_to_host_gbps", "host_to_guest_gbps", "connections_per_s", "hostfwd_connections_per_s")
# The process whose CPU time is the stack's, per stack: ours is the net-daemon; libslirp runs
# in QEMU's main thread (with the rest of QEMU's device emulation), passt is its own process.
STACK_TASK: dict[str, str] = {}
# QEMU's main thread, per stack: for ours and passt it turns their interrupt eventfds into guest
# interrupts (and takes passt's frames); its CPU is part of what a connection costs the host.
QEMU_MAIN: dict[str, str] = {}
# The guest's vCPU thread (TCG), per stack: the one resource every connection waits on.
VCPU: dict[str, str] = {}
# --profile: py-spy samples our net-daemon during the connection rows (collapsed stacks).
PROFILE: list[Path] = []
# --cprofile: our net-daemon runs under cProfile for the whole run (stats written when it exits).
CPROFILE: list[Path] = []
# --daemon-tree: our net-daemon is imported from this source tree (A/B of two versions of the stack).
DAEMON_TREE: list[Path] = []
# --compare-tree: a second net-daemon from this tree, measured beside ours as stack "ours-b"
# (paired A/B rounds on the same noisy machine, each also against libslirp).
COMPARE_TREE: list[Path] = []
# --qemu-root: the QEMU every guest runs on (binary, firmware directories; set by main), its
# (major, minor) version, and whether our vhost-user NIC can have MSI-X on it (QEMU 8.0 or later;
# see ours_gets_msix).
QEMU_BINARY: list[str] = []
QEMU_FIRMWARE: list[Path] = []
QEMU_VERSION: list[tuple[int, int]] = []
OURS_MSIX: list[bool] = [False]


def qemu_version(binary: str) -> tuple[int, int]:
    """``(major, minor)`` from ``BINARY --version`` ("QEMU emulator version 10.0.2 (…)")."""
    out = subprocess.run([binary, "--version"], check=True, capture_output=True, text=True).stdout
    words = out.split()
    number = words[words.index("version") + 1] if "version" in words else "0.0"
    major, _, rest = number.partition(".")
    return int(major), int(rest.partition(".")[0] or 0)


def ours_gets_msix(version: tuple[int, int]) -> bool:
    """QEMU 7.2 installs MSI-X vector notifiers for any virtio-pci device that has a guest
    notifier mask, and under TCG (no irqfd) its unmask then reads a NULL irqfd table: a
    segfault as soon as a vhost-user NIC starts. QEMU 8.0 skips them when the mask is off
    ("virtio-pci: add support for configure interrupt"), which vhost_net_start does for
    vhost-user; 10.0.2 (bookworm-backports) runs our NIC with MSI-X."""
    return version >= (8, 0)


def cpu_seconds(task: str) -> float:
    """CPU time a /proc task (``PID`` or ``PID/task/TID``) has run, in seconds (schedstat: ns, not ticks)."""
    with open(f"/proc/{task}/schedstat", encoding="ascii") as f:
        return int(f.read().split()[0]) / 1e9


def runq_wait_seconds(task: str) -> float:
    """Time a /proc task spent runnable but waiting for a CPU, in seconds (schedstat's second field)."""
    with open(f"/proc/{task}/schedstat", encoding="ascii") as f:
        return int(f.read().split()[1]) / 1e9


class Sink:
    """Loopback TCP sink: times each upload from first byte to EOF, counts connections."""

    def __init__(self) -> None:
        self.port = 0  # the kernel's pick, known once start() has bound it
        self.uploads: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
        self.accepts: list[float] = []
        self.server: asyncio.AbstractServer | None = None
        # Sampled at the first accept and at accept number probe_at: CPU counters over exactly
        # the span the connection rate is measured over (first to last accept).
        self.probe: Callable[[], tuple[float, ...]] | None = None
        self.probe_at = 0
        self.samples: list[tuple[float, ...]] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepts.append(time.perf_counter())
        if self.probe is not None and len(self.accepts) in (1, self.probe_at):
            self.samples.append(self.probe())
        n, first = 0, 0.0
        while chunk := await r.read(1 << 20):
            if not n:
                first = time.perf_counter()
            n += len(chunk)
        w.close()
        if n:
            self.uploads.put_nowait((n, time.perf_counter() - first))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _wait_for_path(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(200):
        if path.exists():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{what} did not create {path}")


@contextlib.asynccontextmanager
async def stack(
    kind: str, fwd_port: int, tmp: Path, intx_all: bool, pcap: Path | None = None
) -> AsyncIterator[list[str]]:
    """QEMU arguments for a NIC on the ``kind`` user-mode stack, with hostfwd to guest port 7000."""
    fwd = f"hostfwd=tcp:127.0.0.1:{fwd_port}-:7000"
    vec = ",vectors=0" if intx_all else ""
    if kind in ("appliance", "ours-b"):
        sock = tmp / "user.sock"
        dump = ["--object", f"filter-dump,id=f0,netdev=u0,file={pcap / (kind + '.pcap')}"] if pcap else []
        prof = ["-m", "cProfile", "-o", str(CPROFILE[0])] if CPROFILE else []
        tree = COMPARE_TREE[0] if kind == "ours-b" else DAEMON_TREE[0] if DAEMON_TREE else ROOT
        proc = subprocess.Popen(
            [sys.executable, *prof, "-m", "appliance.cli.main", "net-daemon", "--netdev", f"user,id=u0,{fwd}",
             "--export", f"type=vhost-user-net,id=e0,netdev=u0,addr.type=unix,addr.path={sock}", *dump],
            cwd=tree, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(tree)},
        )  # fmt: skip
        STACK_TASK[kind] = str(proc.pid)
        try:
            await _wait_for_path(sock, proc, "appliance net-daemon")
            # vectors=0 unless the QEMU is fixed (ours_gets_msix): QEMU 7.2 under TCG crashes
            # in its MSI-X notifier path for vhost-user NICs.
            ours_vec = vec if OURS_MSIX[0] else ",vectors=0"
            yield ["-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c0",
                   "-device", f"virtio-net-pci,netdev=n0,mac={MAC}{ours_vec}"]  # fmt: skip
        finally:
            proc.terminate()
            proc.wait()
    elif kind == "libslirp":
        dump = ["-object", f"filter-dump,id=f0,netdev=n0,file={pcap / 'libslirp.pcap'}"] if pcap else []
        yield ["-netdev", f"user,id=n0,{fwd}", "-device", f"virtio-net-pci,netdev=n0,mac={MAC}{vec}", *dump]
    else:
        sock = tmp / "passt.sock"
        proc = subprocess.Popen(
            ["passt", "-f", "-q", "-1", "-s", str(sock), "-t", f"{fwd_port}:7000", "-a", "10.0.2.15",
             "-n", "24", "-g", "10.0.2.2", "--no-dhcpv6", "--no-ndp", "--no-ra"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        STACK_TASK[kind] = str(proc.pid)
        try:
            await _wait_for_path(sock, proc, "passt")
            yield ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}",
                   "-device", f"virtio-net-pci,netdev=n0,mac={MAC}{vec}"]  # fmt: skip
        finally:
            proc.terminate()
            proc.wait()


async def guest_irqs(g: TcgGuest) -> int:
    """Interrupts the guest has taken from its virtio devices (all CPUs, all vectors)."""
    text = await g.run("grep -i virtio /proc/interrupts")
    total = 0
    for line in text.splitlines():
        for field in line.split()[1:]:
            if not field.isdigit():
                break
            total += int(field)
    return total


class Rig:
    """One booted guest on one stack, with its sink and forward port."""

    def __init__(self, kind: str, guest: TcgGuest, sink: Sink, fwd_port: int) -> None:
        self.kind, self.g, self.sink, self.fwd_port = kind, guest, sink, fwd_port
        self.conn_totals: dict[str, float] = {}  # summed over the connection chunks (conn_chunk)
        self.fwd_totals: dict[str, float] = {}  # summed over the hostfwd chunks (fwd_chunk)

    def probe(self) -> tuple[float, ...]:
        """CPU seconds of the stack, QEMU's main thread and the vCPU thread, then the run-queue
        wait of the vCPU thread, the stack and QEMU's main thread."""
        task, qemu, vcpu = STACK_TASK.get(self.kind), QEMU_MAIN.get(self.kind), VCPU.get(self.kind)
        return (cpu_seconds(task) if task else 0.0, cpu_seconds(qemu) if qemu else 0.0,
                cpu_seconds(vcpu) if vcpu else 0.0, runq_wait_seconds(vcpu) if vcpu else 0.0,
                runq_wait_seconds(task) if task else 0.0, runq_wait_seconds(qemu) if qemu else 0.0)  # fmt: skip

    async def measure(self, mb: int, only: frozenset[str]) -> dict[str, float]:
        """The throughput rows."""
        g, sink = self.g, self.sink
        gw = "10.0.2.2"
        out: dict[str, float] = {}
        if "guest_to_host_gbps" in only:
            await g.run(f"dd if=/dev/zero bs=1M count={mb} 2>/dev/null | nc {gw} {sink.port}", timeout=900)
            n, secs = await asyncio.wait_for(sink.uploads.get(), 60)
            out["guest_to_host_gbps"] = n * 8 / secs / 1e9
        if "host_to_guest_gbps" in only:
            # host -> guest through hostfwd
            await g.write("nc -l -p 7000 > /dev/null; echo FWD-DONE\n")
            await asyncio.sleep(1)
            chunk = b"\0" * (1 << 20)
            _r, w = await asyncio.open_connection("127.0.0.1", self.fwd_port)
            t0 = time.perf_counter()
            for _ in range(mb):
                w.write(chunk)
                await w.drain()
            w.close()
            await g.expect("FWD-DONE", 600)
            out["host_to_guest_gbps"] = (mb << 20) * 8 / (time.perf_counter() - t0) / 1e9
        return out

    async def conn_chunk(self, conns: int) -> None:
        """``conns`` guest -> host connections (busybox ``nc`` to the sink, one process each),
        added to this rig's totals: the rate counts first to last accept of each chunk."""
        g, sink, acc = self.g, self.sink, self.conn_totals
        task = STACK_TASK.get(self.kind)
        spy = None
        if PROFILE and self.kind == "appliance" and task and not acc:  # the first chunk of a round
            spy_cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking", "-r", "1000",
                       "-f", "raw", "-o", str(PROFILE[0]), "-p", task]  # fmt: skip
            spy = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(0.5)
        irq0 = await guest_irqs(g)
        sink.accepts.clear()
        sink.samples.clear()
        sink.probe, sink.probe_at = self.probe, conns
        try:
            await g.run(
                f"i=0; while [ $i -lt {conns} ]; do nc 10.0.2.2 {sink.port} </dev/null; i=$((i+1)); done", timeout=600
            )
        finally:
            sink.probe = None
        irq1 = await guest_irqs(g)
        if spy is not None:
            spy.send_signal(2)
            spy.wait()
        t = sink.accepts
        if len(t) != conns or len(sink.samples) != 2:
            raise RuntimeError(f"{len(t)} of {conns} guest connections reached the sink")
        first, last = sink.samples
        _accumulate(acc, len(t) - 1, t[-1] - t[0], irq1 - irq0, len(t), first, last)

    def conn_results(self) -> dict[str, float]:
        """The connection rows from the chunks run so far (CPU rows per connection, in ms)."""
        return self._per_conn(self.conn_totals, "connections_per_s", "")

    def fwd_results(self) -> dict[str, float]:
        """The hostfwd rows from the chunks run so far (CPU rows per connection, in ms)."""
        return self._per_conn(self.fwd_totals, "hostfwd_connections_per_s", "hostfwd_")

    def _per_conn(self, acc: dict[str, float], rate: str, prefix: str) -> dict[str, float]:
        out = dict[str, float]()
        if not acc:
            return out
        n = acc["intervals"]  # the CPU rows span the timed interval: one interval a connection
        out[rate] = n / acc["secs"]
        out[prefix + "guest_irqs_per_conn"] = acc["irqs"] / acc["conns"]
        if STACK_TASK.get(self.kind):
            out[prefix + "stack_cpu_ms_per_conn"] = acc["stack_cpu"] * 1e3 / n
            out[prefix + "stack_wait_ms_per_conn"] = acc["stack_wait"] * 1e3 / n
        if QEMU_MAIN.get(self.kind):
            out[prefix + "qemu_main_cpu_ms_per_conn"] = acc["qemu_cpu"] * 1e3 / n
            out[prefix + "qemu_main_wait_ms_per_conn"] = acc["qemu_wait"] * 1e3 / n
        if VCPU.get(self.kind):
            vcpu_cpu, vcpu_wait = acc["vcpu_cpu"] * 1e3 / n, acc["vcpu_wait"] * 1e3 / n
            out[prefix + "guest_vcpu_cpu_ms_per_conn"] = vcpu_cpu
            out[prefix + "guest_vcpu_wait_ms_per_conn"] = vcpu_wait
            # What is left of a connection's wall time: the guest halted, waiting on the stack.
            out[prefix + "guest_idle_ms_per_conn"] = max(0.0, 1e3 / out[rate] - vcpu_cpu - vcpu_wait)
        return out

    async def _fwd_one(self) -> bool:
        r, w = await asyncio.open_connection("127.0.0.1", self.fwd_port)
        try:
            w.write(b"x")
            w.write_eof()
            return await asyncio.wait_for(r.read(), 30) == b"x"
        except OSError as err:
            # Nothing listens in the guest (yet): its RST, passed on, can beat our write_eof()
            # (shutdown() then fails with ENOTCONN) or our write.
            if err.errno in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE):
                return False
            raise
        finally:
            w.close()

    async def start_fwd_listener(self) -> None:
        """A persistent guest listener on port 7000 (-ll): each connection gets a forked cat,
        which echoes and exits."""
        # stdin from /dev/null: a background job would share the console with the shell.
        await self.g.run("nc -ll -p 7000 -e cat </dev/null >/dev/null 2>&1 &")
        for _ in range(200):
            if await self._fwd_one():  # the stack accepts before the guest listens: EOF, no byte
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the guest's nc -ll never answered through hostfwd")

    async def fwd_chunk(self, conns: int) -> None:
        """``conns`` host -> guest connections through the stack's forward to guest port 7000,
        one at a time, added to this rig's totals."""
        irq0 = await guest_irqs(self.g)
        first = self.probe()
        t0 = time.perf_counter()
        answered = 0
        for _ in range(conns):
            answered += await self._fwd_one()
        secs = time.perf_counter() - t0
        last = self.probe()
        irq1 = await guest_irqs(self.g)
        if answered != conns:
            raise RuntimeError(f"{conns - answered} of {conns} hostfwd connections got no answer")
        # The interrupts count a few for the two shell commands around the run.
        _accumulate(self.fwd_totals, conns, secs, irq1 - irq0, conns, first, last)

    async def stop_fwd_listener(self) -> None:
        await self.g.run("killall nc")


def _paired_ratios(results: dict[str, dict[int, dict[str, float]]], kind: str, metric: str) -> list[float]:
    """Ours over ``kind`` for ``metric``, round by round (the rounds both finished)."""
    ours = results["appliance"]
    return [ours[r][metric] / b[metric] for r, b in results[kind].items() if r in ours and b.get(metric)]


def _accumulate(
    acc: dict[str, float], intervals: int, secs: float, irqs: int, conns: int,
    first: tuple[float, ...], last: tuple[float, ...],
) -> None:  # fmt: skip
    """Add one chunk of connections to ``acc``: the rate's intervals and seconds, the guest's
    interrupts, and the CPU (Rig.probe) spent between ``first`` and ``last``."""
    add = {
        "intervals": intervals, "secs": secs, "irqs": irqs, "conns": conns,
        "stack_cpu": last[0] - first[0], "qemu_cpu": last[1] - first[1],
        "vcpu_cpu": last[2] - first[2], "vcpu_wait": last[3] - first[3],
        "stack_wait": last[4] - first[4], "qemu_wait": last[5] - first[5],
    }  # fmt: skip
    for k, v in add.items():
        acc[k] = acc.get(k, 0.0) + v


async def interleaved(rigs: list[Rig], chunks: int, run: Callable[[Rig], Awaitable[None]], failed: set[str]) -> None:
    """Run ``run`` on every rig, ``chunks`` times over, the rigs taking turns (in an order that
    rotates): a connection rate follows the machine's load from second to second, and taking
    turns gives every stack the same share of its slow and quick moments."""
    for c in range(chunks):
        for rig in rigs[c % len(rigs) :] + rigs[: c % len(rigs)]:
            if rig.kind in failed:
                continue
            try:
                await run(rig)
            except Exception as err:  # noqa: BLE001 - one stack failing must not hide the others
                print(f"{rig.kind}: {err!r}", file=sys.stderr)
                failed.add(rig.kind)


async def main_async(
    mb: int, conns: int, rounds: int, intx_all: bool, only: frozenset[str], pcap: Path | None, no_passt: bool,
    chunks: int = 4,
) -> None:  # fmt: skip
    from appliance.kit.tcg import TcgGuest  # noqa: F811 - the runtime import (typing only above)

    metrics = [m for m in METRICS if m in only]
    kinds = ["appliance", "libslirp"] + (["passt"] if shutil.which("passt") and not no_passt else [])
    if COMPARE_TREE:
        kinds.insert(1, "ours-b")
    results: dict[str, dict[int, dict[str, float]]] = {k: {} for k in kinds}
    with tempfile.TemporaryDirectory() as d:
        Path(d).chmod(0o1777)  # passt drops root to nobody before making its socket

        async def boot(k: str, rnd: int, ex: contextlib.AsyncExitStack) -> Rig:
            sink = Sink()
            await sink.start()
            ex.callback(sink.close)
            fwd_port = free_port()
            tmp = Path(d) / f"{k}-{rnd}"
            tmp.mkdir()
            tmp.chmod(0o1777)
            args = await ex.enter_async_context(stack(k, fwd_port, tmp, intx_all, pcap))
            g = await ex.enter_async_context(TcgGuest(
                args, machine="q35", qemu=QEMU_BINARY[0], firmware_dirs=tuple(QEMU_FIRMWARE)))
            if g.proc is not None:
                QEMU_MAIN[k] = f"{g.proc.pid}/task/{g.proc.pid}"
                if k == "libslirp":
                    STACK_TASK[k] = QEMU_MAIN[k]
            await g.run("udhcpc -i eth0 -n -q -t 5", timeout=60)
            if g.proc is not None:
                # The single TCG vCPU thread has run the boot: it is the busiest thread but main.
                tasks = [f"{g.proc.pid}/task/{t}" for t in os.listdir(f"/proc/{g.proc.pid}/task")]
                VCPU[k] = max((t for t in tasks if t != QEMU_MAIN[k]), key=cpu_seconds)
            return Rig(k, g, sink, fwd_port)

        for rnd in range(rounds):
            # Every round boots its own guests, first the stack measured first, in an order that
            # rotates: the same guest kit runs 3-5% slower in the first QEMU booted of a set
            # (an A/A run of one tree against itself showed it), which with fixed guests was
            # always ours.
            order = kinds[rnd % len(kinds) :] + kinds[: rnd % len(kinds)]
            async with contextlib.AsyncExitStack() as ex:
                rigs = [await boot(k, rnd, ex) for k in order]
                failed: set[str] = set()
                for rig in rigs:
                    try:
                        results[rig.kind][rnd] = await rig.measure(mb, only)
                    except Exception as err:  # noqa: BLE001 - one stack failing must not hide the others
                        print(f"{rig.kind}: round {rnd + 1} failed: {err!r}", file=sys.stderr)
                        failed.add(rig.kind)
                per_chunk = max(2, conns // chunks)
                if "connections_per_s" in only:
                    await interleaved(rigs, chunks, functools.partial(Rig.conn_chunk, conns=per_chunk), failed)
                if "hostfwd_connections_per_s" in only:
                    await interleaved(rigs, 1, Rig.start_fwd_listener, failed)
                    await interleaved(rigs, chunks, functools.partial(Rig.fwd_chunk, conns=per_chunk), failed)
                    await interleaved(rigs, 1, Rig.stop_fwd_listener, failed)
                for rig in rigs:
                    if rig.kind in failed:
                        results[rig.kind].pop(rnd, None)
                        continue
                    got = results[rig.kind][rnd]
                    got.update(rig.conn_results())
                    got.update(rig.fwd_results())
                for rig in rigs:
                    if rig.g.returncode is not None:
                        # Seen in about one round in ten (any stack) after its last command
                        # (killall nc) returned: a blank line (ash's at end of input), then the
                        # kernel's "Power down" with no poweroff sent, i.e. the kit's console shell
                        # read EOF and init powered off. Cause not found (nc -ll reading /dev/null
                        # did not change it). Reported; its numbers (all taken) stand.
                        print(f"{rig.kind}: guest exited by itself ({rig.g.returncode}){rig.g.tail()[-400:]}",
                              file=sys.stderr)  # fmt: skip
                        continue
                    await rig.g.poweroff()
            print(f"round {rnd + 1}: " + "  ".join(
                f"{k}=" + "/".join(f"{results[k][rnd][m]:.3f}" for m in metrics) for k in kinds if rnd in results[k]
            ), file=sys.stderr, flush=True)  # fmt: skip
    if intx_all:
        nic = "INTx on every NIC"
    elif OURS_MSIX[0]:
        nic = "MSI-X on every NIC (QEMU's default)"
    else:
        nic = "ours INTx (vectors=0), others QEMU's default MSI-X"
    major, minor = QEMU_VERSION[0]
    print(f"\nLinux kit in QEMU {major}.{minor} TCG, {mb} MiB transfers, {conns} connections, {rounds} rounds; {nic}")
    per_conn = ["stack_cpu_ms_per_conn", "stack_wait_ms_per_conn", "qemu_main_cpu_ms_per_conn",
                "qemu_main_wait_ms_per_conn", "guest_vcpu_cpu_ms_per_conn", "guest_vcpu_wait_ms_per_conn",
                "guest_idle_ms_per_conn", "guest_irqs_per_conn"]
    rows = metrics + (per_conn if "connections_per_s" in metrics else [])
    rows += ["hostfwd_" + m for m in per_conn] if "hostfwd_connections_per_s" in metrics else []
    width = max(26, *(len(m) + 1 for m in rows))
    names = "".join(f"{k:>12}" for k in kinds) + "".join(f"{'ours/' + k:>16}" for k in kinds[1:])
    print(f"{'metric':<{width}}" + names)
    for metric in rows:
        vals = {
            k: statistics.median(r[metric] for r in results[k].values() if metric in r)
            if any(metric in r for r in results[k].values())
            else float("nan")
            for k in kinds
        }
        row = f"{metric:<{width}}" + "".join(f"{vals[k]:>12.3f}" for k in kinds)
        for k in kinds[1:]:
            # Paired: the ratio within each round, then the median over rounds.
            pairs = _paired_ratios(results, k, metric)
            row += f"{statistics.median(pairs) if pairs else float('nan'):>16.2f}"
        print(row)
    if rounds > 2:
        # How far the rates' ratios can be trusted: they move several percent from round to round.
        print("\nper-round ratios of the rates: median, mean ± standard error, rounds at or above 1")
        for metric in metrics:
            for k in kinds[1:]:
                pairs = _paired_ratios(results, k, metric)
                if len(pairs) > 2:
                    se = statistics.stdev(pairs) / len(pairs) ** 0.5
                    mid, mean, above = statistics.median(pairs), statistics.mean(pairs), sum(p >= 1 for p in pairs)
                    print(f"  {metric} ours/{k}: {mid:.3f}, {mean:.3f} ± {se:.3f}, {above} of {len(pairs)}")
    if "connections_per_s" in metrics:
        print("stack_cpu_ms_per_conn: CPU of our net-daemon, of QEMU's main thread (libslirp), of passt")
        print("stack_wait_ms_per_conn: time the stack's process or thread was runnable but waited for a host CPU")
        print("qemu_main_cpu_ms_per_conn: CPU of QEMU's main thread (for libslirp the same as its stack row)")
        print("qemu_main_wait_ms_per_conn: time QEMU's main thread was runnable but waited for a host CPU")
        print("guest_vcpu_cpu_ms_per_conn: CPU of the guest's TCG vCPU thread (the guest's own work and its exits)")
        print("guest_vcpu_wait_ms_per_conn: time the vCPU thread was runnable but waited for a host CPU")
        print("guest_idle_ms_per_conn: the rest of a connection's wall time: the guest halted, waiting on the stack")
        print("guest_irqs_per_conn: interrupts the guest took from virtio devices (/proc/interrupts) per connection")
    if "hostfwd_connections_per_s" in metrics:
        print("hostfwd_*: the same rows over the hostfwd connections (a few interrupts: the shell commands that count)")
    if "passt" not in kinds and not no_passt:
        print("passt: not installed (apt-get install passt) — not compared")


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--mb", type=int, default=32)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunks", type=int, default=4,
                   help="split each round's connections into this many runs per stack, the stacks taking turns")
    p.add_argument("--intx-all", action="store_true",
                   help="give every NIC INTx (vectors=0), as ours must have on QEMU 7.x")
    p.add_argument("--only", default=",".join(METRICS), help="comma-separated metrics to measure")
    p.add_argument("--no-passt", action="store_true", help="compare with libslirp only")
    p.add_argument("--pcap", type=Path, help="capture each stack's frames to DIR/<stack>.pcap (filter-dump)")
    p.add_argument("--profile", type=Path, help="py-spy our net-daemon in the connection rows (collapsed stacks)")
    p.add_argument("--cprofile", type=Path, help="run our net-daemon under cProfile, stats to this file")
    p.add_argument("--daemon-tree", type=Path, help="run our net-daemon from this source tree (A/B runs)")
    p.add_argument("--compare-tree", type=Path, help="also run a net-daemon from this tree, as stack ours-b")
    p.add_argument("--qemu-root", type=Path,
                   help="run every guest on the QEMU unpacked in DIR (bench/tools/qemu_backport.py makes one)")
    a = p.parse_args()
    only = frozenset(a.only.split(","))
    if not only <= set(METRICS):
        p.error(f"--only: metrics are {', '.join(METRICS)}")
    if a.pcap:
        a.pcap.mkdir(parents=True, exist_ok=True)
        a.pcap = a.pcap.resolve()
    if a.profile:
        PROFILE.append(a.profile.resolve())
    if a.cprofile:
        CPROFILE.append(a.cprofile.resolve())
    if a.daemon_tree:
        DAEMON_TREE.append(a.daemon_tree.resolve())
    if a.compare_tree:
        COMPARE_TREE.append(a.compare_tree.resolve())
    from appliance.kit.tcg import QEMU  # the system's QEMU, the one TcgGuest runs by default

    QEMU_BINARY.append(QEMU)
    if a.qemu_root:
        binary = a.qemu_root.resolve() / "usr/bin/qemu-system-x86_64"
        if not binary.is_file():
            p.error(f"--qemu-root: no {binary}")
        share = a.qemu_root.resolve() / "usr/share"
        QEMU_BINARY[0] = str(binary)
        QEMU_FIRMWARE.extend((share / "seabios", share / "qemu"))
    try:
        QEMU_VERSION.append(qemu_version(QEMU_BINARY[0]))
    except (OSError, subprocess.CalledProcessError) as err:
        p.error(f"cannot run {QEMU_BINARY[0]} --version: {err}")
    OURS_MSIX[0] = ours_gets_msix(QEMU_VERSION[0])
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    asyncio.run(main_async(a.mb, a.conns, a.rounds, a.intx_all, only, a.pcap, a.no_passt, a.chunks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
