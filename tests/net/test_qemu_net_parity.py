"""-netdev and -object filter-dump against QEMU 7.2 itself: what it refuses (and in which
words), what it accepts, the pcap it writes, and what its monitor says about them.

Each comparison runs qemu-system-x86_64 ``-M none`` (no guest), which either refuses the
line at start-up or comes up and is told to quit over ``-qmp stdio``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.cli import run
from appliance.errors import ConfigError
from appliance.net.capture import CapturingBackend, open_capture
from appliance.net.dgram import DgramLink
from appliance.net.errors import NetError
from appliance.net.netdev import parse_netdev
from appliance.qmp import hmp, netops
from appliance.qmp.errors import GenericError
from tests.conftest import needs_qemu, needs_root

QEMU = "qemu-system-x86_64"
# A netdev QEMU and we both open without a peer: UDP from an ephemeral port to the discard port.
UDP = ("dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port=0,"
       "remote.type=inet,remote.host=127.0.0.1,remote.port=9")
UDP1 = UDP.replace("id=n0", "id=n1")


def qemu_refusal(*argv: str) -> str | None:
    """QEMU's error for ``argv`` on a machine with nothing else (None: it came up), without
    its program name and without the option it names, if it names one."""
    proc = subprocess.run(
        [QEMU, "-M", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio", *argv],
        input=b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n', capture_output=True, timeout=20)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.decode().splitlines() if "warning:" not in ln]
    return unlocated(lines[0].removeprefix(f"{QEMU}: "))


def unlocated(message: str) -> str:
    """``message`` without a leading ``-option text: `` (QEMU's and our way of naming the option)."""
    if message.startswith("-"):
        return message.split(": ", 1)[1]
    return message


def our_refusal(*argv: str) -> str | None:
    try:
        run.to_config(run.parse_args(["-kernel", "/dev/null", *argv]))
    except ConfigError as err:
        return unlocated(str(err))
    return None


# --- -netdev ---------------------------------------------------------------------------------

NETDEV_LINES = [
    # net/dgram.c: every link but a multicast group needs local= and remote=.
    "dgram,id=d,local.type=inet,local.host=127.0.0.1,local.port=0",
    "dgram,id=d,local.type=unix,local.path=/nonexistent/a",
    "dgram,id=d,remote.type=inet,remote.host=127.0.0.1,remote.port=9",
    # InetSocketAddress: host and port are mandatory (qapi/sockets.json).
    "dgram,id=d,local.type=inet,local.port=0,remote.type=inet,remote.host=127.0.0.1,remote.port=9",
    "dgram,id=d,local.type=inet,local.host=127.0.0.1,local.port=0,remote.type=inet,remote.port=9",
    "stream,id=s,server=on,addr.type=inet,addr.port=0",
    "stream,id=s,server=off,addr.type=inet,addr.port=9",
    # A type QEMU has never heard of is QAPI's to refuse.
    "bogus,id=x",
    # Accepted by both: an empty host is any address (parse_host_port, InetSocketAddress).
    "socket,id=s,udp=:9,localaddr=127.0.0.1:0",
    "dgram,id=d,local.type=inet,local.host=,local.port=0,remote.type=inet,remote.host=127.0.0.1,remote.port=9",
]


@needs_qemu
@pytest.mark.parametrize("line", NETDEV_LINES)
def test_netdev_lines_are_refused_or_taken_as_qemu_does(line: str) -> None:
    assert our_refusal("-netdev", line) == qemu_refusal("-netdev", line)


# --- -object filter-dump ---------------------------------------------------------------------

DUMP_LINES = [
    # maxlen: any uint32 but 0 (filter_dump_set_maxlen), read as a C integer, no size suffix.
    "maxlen=1", "maxlen=13", "maxlen=0x10", "maxlen=4294967295",
    "maxlen=0", "maxlen=4294967296", "maxlen=1k", "maxlen=-1", "maxlen=",
    # The netfilter properties (net/filter.c).
    "queue=rx", "queue=tx", "queue=bogus", "status=off", "status=bogus",
    "insert=before", "insert=bogus", "position=head", "position=bogus", "position=id=zz",
]


@needs_qemu
@pytest.mark.parametrize("extra", DUMP_LINES)
def test_filter_dump_properties_are_refused_or_taken_as_qemu_does(extra: str, tmp_path: Path) -> None:
    argv = ("-netdev", UDP, "-object", f"filter-dump,id=f,netdev=n0,file={tmp_path / 'f.pcap'},{extra}")
    assert our_refusal(*argv) == qemu_refusal(*argv)


@needs_qemu
@pytest.mark.parametrize("objects", [
    ("filter-dump,id=f,netdev=nope,file={d}/a",),
    ("filter-dump,id=f,netdev=n0,file={d}/a", "filter-dump,id=g,netdev=n1,file={d}/b,position=id=f"),
    ("filter-dump,id=g,netdev=n1,file={d}/b,position=id=f", "filter-dump,id=f,netdev=n1,file={d}/a"),
    ("filter-dump,id=f,netdev=n1,file={d}/a", "filter-dump,id=g,netdev=n1,file={d}/b,position=id=f,insert=before"),
])
def test_filter_dump_references_are_checked_as_qemu_checks_them(objects: tuple[str, ...], tmp_path: Path) -> None:
    argv = ["-netdev", UDP, "-netdev", UDP1]
    for o in objects:
        argv += ["-object", o.format(d=tmp_path)]
    assert our_refusal(*argv) == qemu_refusal(*argv)


@needs_qemu
@pytest.mark.parametrize("file", ["", "/nonexistent/x.pcap"])
def test_a_capture_file_that_cannot_be_opened_is_named_in_qemus_words(file: str) -> None:
    theirs = qemu_refusal("-netdev", UDP, "-object", f"filter-dump,id=f,netdev=n0,file={file}")
    try:
        run.to_config(run.parse_args(["-kernel", "/dev/null", "-netdev", UDP,
                                      "-object", f"filter-dump,id=f,netdev=n0,file={file}"]))
        open_capture(Path(file)).close()
    except (ConfigError, NetError) as err:
        ours = str(err)
    assert ours == theirs


# --- the pcap itself -------------------------------------------------------------------------

FRAMES = [bytes(range(60)), bytes(i & 0xFF for i in range(1514)), b"\xff" * 12 + b"\x08\x06" + b"A" * 50,
          b"x" * 9000]
# One filter per property that shapes the file: default, a snaplen below the Ethernet header, the
# largest uint32 (QEMU's int caplen goes negative: nothing is cut), each direction, and off.
DUMPS = {"all": "", "cut": ",maxlen=13", "max": ",maxlen=4294967295", "rx": ",queue=rx", "tx": ",queue=tx",
         "off": ",status=off"}


def _untimed(pcap: bytes) -> bytes:
    """``pcap`` with every record's timestamp zeroed (QEMU stamps its virtual clock, we the wall clock)."""
    out, off = bytearray(pcap[:24]), 24
    while off < len(pcap):
        _sec, _usec, cap, _orig = struct.unpack_from("<IIII", pcap, off)
        out += bytes(8) + pcap[off + 8 : off + 16 + cap]
        off += 16 + cap
    return bytes(out)


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _qemu_dumping(where: Path, remote: int) -> Iterator[int]:
    """QEMU running with a UDP netdev and DUMPS on it; yields the netdev's port. The netdev hangs
    off a hub with a second, peerless port, so QEMU reads and forwards what arrives."""
    port = _udp_port()
    argv = [QEMU, "-M", "none", "-nodefaults", "-display", "none", "-monitor", "none",
            "-netdev", f"dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={port},"
                       f"remote.type=inet,remote.host=127.0.0.1,remote.port={remote}",
            "-netdev", "hubport,id=h0,hubid=0,netdev=n0", "-netdev", "hubport,id=h1,hubid=0"]
    for name, props in DUMPS.items():
        argv += ["-object", f"filter-dump,id={name},netdev=n0,file={where / name}.pcap{props}"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not all((where / f"{n}.pcap").exists() for n in DUMPS):
            assert proc.poll() is None and time.monotonic() < deadline, "QEMU did not come up"
            time.sleep(0.02)
        time.sleep(0.2)  # the files exist before QEMU's main loop reads its socket
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@needs_qemu
async def test_pcaps_are_byte_for_byte_qemus_but_for_the_clock(tmp_path: Path) -> None:
    """net/dump.c's global header (magic, 2.4, snaplen = maxlen, LINKTYPE_ETHERNET) and records
    (caplen cut to maxlen, len whole), for frames the netdev hands on (QEMU's queue=tx)."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    try:
        (tmp_path / "qemu").mkdir()
        with _qemu_dumping(tmp_path / "qemu", sender.getsockname()[1]) as port:
            for f in FRAMES:
                sender.sendto(f, ("127.0.0.1", port))
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
        theirs = {n: (tmp_path / "qemu" / f"{n}.pcap").read_bytes() for n in DUMPS}
        assert len(_untimed(theirs["all"])) > 24  # QEMU saw them

        (tmp_path / "ours").mkdir()
        link = DgramLink(("127.0.0.1", 0), sender.getsockname())
        cap = CapturingBackend(link)
        for name, props in DUMPS.items():
            cfg = run.to_config(run.parse_args([
                "-kernel", "/dev/null", "-netdev", UDP,
                "-object", f"filter-dump,id={name},netdev=n0,file={tmp_path / 'ours' / name}.pcap{props}",
            ])).devices[0].captures[0]  # type: ignore[attr-defined]
            cap.writers.append(open_capture(cfg.file, maxlen=cfg.maxlen, queue=cfg.queue, status=cfg.status))
        try:
            buf = bytearray(16384)
            for f in FRAMES:
                sender.sendto(f, link.sock.getsockname())
                for _ in range(100):
                    if cap.recv_into([memoryview(buf)]) > 0:
                        break
                    await asyncio.sleep(0.01)
        finally:
            cap.close()
        ours = {n: (tmp_path / "ours" / f"{n}.pcap").read_bytes() for n in DUMPS}
    finally:
        sender.close()
    for name in DUMPS:
        assert _untimed(ours[name]) == _untimed(theirs[name]), name
    assert os.stat(tmp_path / "ours" / "all.pcap").st_mode & 0o777 == os.stat(
        tmp_path / "qemu" / "all.pcap").st_mode & 0o777


def test_queue_rx_records_only_what_the_guest_sends(tmp_path: Path) -> None:
    """queue=rx is the netdev's receive queue: "packets sent to the netdev" (qemu-options.hx)."""
    a, b = _udp_port(), _udp_port()
    link = CapturingBackend(DgramLink(("127.0.0.1", a), ("127.0.0.1", b)))
    link.writers = [open_capture(tmp_path / f"{q}.pcap", queue=q) for q in ("rx", "tx")]
    try:
        assert link.send([memoryview(bytes(60))])
    finally:
        link.close()
    assert len((tmp_path / "rx.pcap").read_bytes()) == 24 + 16 + 60
    assert len((tmp_path / "tx.pcap").read_bytes()) == 24


# --- the monitor -----------------------------------------------------------------------------


async def _qemu_monitor(argv: list[str], commands: list[dict[str, Any]], where: Path) -> list[Any]:
    """QEMU's QMP answers (its "return" or its error's "desc") to ``commands``, in order.

    Over a unix socket, not ``-qmp stdio``: QEMU 7.2 closes fd 0 when an object-add of a
    filter-dump fails after its netdev= is set (net/dump.c closes a DumpState fd it never
    opened, 0), which would hang up a monitor on stdin.
    """
    sock = where / "qemu-qmp.sock"
    proc = await asyncio.create_subprocess_exec(
        QEMU, "-M", "none", "-nodefaults", "-display", "none", "-S", *argv,
        "-qmp", f"unix:{sock},server=on,wait=off",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(1000):  # the file is there a moment before QEMU listens on it
            try:
                reader, writer = await asyncio.open_unix_connection(str(sock))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.01)
        script = [{"execute": "qmp_capabilities"}, *({**c, "id": i} for i, c in enumerate(commands)),
                  {"execute": "quit"}]
        writer.write("".join(json.dumps(c) + "\n" for c in script).encode())
        answers: dict[int, Any] = {}
        # Until quit hangs up (with a reset if QEMU leaves a byte unread: the script's last newline).
        with contextlib.suppress(ConnectionResetError):
            while line := await asyncio.wait_for(reader.readline(), 20):
                msg = json.loads(line)
                if isinstance(msg.get("id"), int):
                    answers[msg["id"]] = msg["return"] if "return" in msg else msg["error"]["desc"]
        writer.close()
        await asyncio.wait_for(proc.wait(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return [answers[i] for i in range(len(commands))]


def _fake_machine(*netdev_lines: str) -> SimpleNamespace:
    """What netops needs of a machine: NIC specs whose netdevs are open (here: not at all, but
    a capture needs none of it but the list)."""
    nics = []
    for line in netdev_lines:
        nd = parse_netdev(line)
        link = DgramLink(nd.local, nd.remote)  # type: ignore[union-attr]
        nics.append(SimpleNamespace(netdev=nd, name=f"netdev {nd.id}", owner=link, backends=[link], device=None,
                                    captures=[], writers=[]))
    return SimpleNamespace(nics=nics)


def _close(machine: SimpleNamespace) -> None:
    for spec in machine.nics:
        for w in spec.writers:
            w.close()
        spec.owner.close()


@needs_qemu
async def test_object_add_filter_dump_answers_as_qemus_qmp_and_hmp(tmp_path: Path) -> None:
    """Each object-add (typed JSON) and HMP object_add (text) in turn, then info network with the
    filters that were made, in the order their position= and insert= give them."""
    pcap = str(tmp_path / "c.pcap")
    adds: list[dict[str, Any]] = [
        {"id": "a1", "netdev": 5, "file": pcap},
        {"id": "a2", "netdev": "n0", "file": 7},
        {"id": "a3", "netdev": "n0", "file": pcap, "status": True},
        {"id": "a4", "netdev": "n0", "file": pcap, "maxlen": -1},
        {"id": "a5", "netdev": "n0", "file": pcap, "maxlen": "100"},
        {"id": "a6", "netdev": "n0", "file": pcap, "maxlen": 0},
        {"id": "a7", "netdev": "n0", "file": pcap, "bogus": 1},
        {"id": "a8", "netdev": "nope", "file": pcap},
        {"id": "1bad", "netdev": "n0", "file": pcap},
        {"id": "a9", "netdev": "n0", "file": ""},
        {"id": "a10", "netdev": "n0", "file": "/nonexistent/x"},
        {"id": "t1", "netdev": "n0", "file": pcap, "queue": "tx", "status": "off", "position": "head"},
        {"id": "t2", "netdev": "n0", "file": pcap, "position": "id=t1", "insert": "before", "maxlen": 5},
        {"id": "t3", "netdev": "n1", "file": pcap, "position": "id=t1"},
        {"id": "t4", "netdev": "n0", "file": pcap, "position": "id=zz"},
        {"id": "t5", "netdev": "n0", "file": pcap, "queue": "rx"},
    ]
    hmp_lines = [
        "object_add filter-dump,id=h1,netdev=n0,file={p},maxlen=1k",
        "object_add filter-dump,id=1h,netdev=n0,file={p}",
        "object_add filter-dump,id=h2,netdev=n0,file={p},bogus=1",
        "object_add filter-dump,id=h3,netdev=nope,file={p}",
        "object_add filter-dump,id=h4,netdev=n0,file={p},maxlen=0x20,insert=before,position=id=t5",
    ]
    commands = [{"execute": "object-add", "arguments": {"qom-type": "filter-dump", **a}} for a in adds]
    commands += [{"execute": "human-monitor-command", "arguments": {"command-line": line.format(p=pcap)}}
                 for line in hmp_lines]
    *theirs, info = await _qemu_monitor(["-netdev", UDP, "-netdev", UDP1], commands + [
        {"execute": "human-monitor-command", "arguments": {"command-line": "info network"}}], tmp_path)

    machine = _fake_machine(UDP, UDP1)
    ctx = SimpleNamespace(machine=machine)
    ours: list[Any] = []
    try:
        for a in adds:
            props = dict(a)
            try:
                await netops.add_capture(machine, props.pop("id"), props)
                ours.append({})
            except GenericError as err:
                ours.append(str(err))
        for line in hmp_lines:
            try:
                ours.append(await hmp._object_add(ctx, line.format(p=pcap).split(" ", 1)[1]))
            except GenericError as err:
                ours.append(f"Error: {err}\r\n")
        filters = {spec.netdev.id: hmp._filters(spec) for spec in machine.nics}
    finally:
        _close(machine)
    assert ours == theirs
    # Ours names the netdev by its bound port, which differs: compare each netdev's filter block.
    lines = info.split("\r\n")
    blocks = {ln.split(":")[0]: "\r\n".join(lines[i + 1:]).split("\r\nn1:")[0] for i, ln in enumerate(lines)
              if ln.startswith(("n0:", "n1:"))}
    for n in ("n0", "n1"):
        block = blocks[n].rstrip("\r\n")
        assert ("\r\n" + block if block else "") == filters[n]
    assert "position=id=t1,status=on,insert=before" in filters["n0"]


@needs_qemu
@needs_root
async def test_info_network_describes_each_netdev_as_qemu_does(tmp_path: Path) -> None:
    """Each type's info_str (net/dgram.c, net/socket.c, net/stream.c) before any peer connects;
    QEMU runs in a namespace of its own so the multicast groups have a route."""
    lines = [
        "dgram,id=a,local.type=inet,local.host=127.0.0.1,local.port=40001,remote.type=inet,remote.host=127.0.0.1,"
        "remote.port=40002",
        f"dgram,id=b,local.type=unix,local.path={tmp_path}/a.sock,remote.type=unix,remote.path={tmp_path}/b.sock",
        "dgram,id=c,remote.type=inet,remote.host=239.1.2.3,remote.port=40009",
        "socket,id=d,udp=127.0.0.1:40003,localaddr=127.0.0.1:40004",
        "socket,id=e,mcast=239.1.2.3:40010",
        "socket,id=f,listen=127.0.0.1:40005",
        "stream,id=g,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port=40007",
        f"stream,id=h,server=on,addr.type=unix,addr.path={tmp_path}/s.sock",
    ]
    argv = [a for ln in lines for a in ("-netdev", ln)]
    script = ('{"execute": "qmp_capabilities"}\n{"execute": "human-monitor-command", "arguments": '
              '{"command-line": "info network"}, "id": 1}\n{"execute": "quit"}\n')
    proc = await asyncio.create_subprocess_exec(
        "unshare", "-n", "sh", "-c", 'ip link set lo up && ip route add 224.0.0.0/4 dev lo && exec "$@"', "sh",
        QEMU, "-M", "none", "-nodefaults", "-display", "none", "-S", *argv, "-qmp", "stdio",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(script.encode()), 30)
    [theirs] = [m["return"] for m in map(json.loads, out.decode().splitlines()) if m.get("id") == 1]
    ours = [f"{ln.split(',id=')[1].split(',')[0]}: index=0,type={hmp._netdev_info(parse_netdev(ln))}"
            for ln in lines]
    # QEMU makes dgram and stream netdevs (its "modern" ones) before the rest: an order of its own.
    assert sorted(ours) == sorted(theirs.rstrip("\r\n").split("\r\n"))


def test_a_connected_stream_is_described_by_its_peer_as_qemu_does() -> None:
    """What QEMU 7.2 shows once a peer is there (seen from qemu-system-x86_64 7.2 itself: a live
    check needs a peer and QEMU's monitor at once)."""
    listen = parse_netdev("socket,id=a,listen=127.0.0.1:40112")
    connect = parse_netdev("socket,id=a,connect=127.0.0.1:54069")
    stream = parse_netdev("stream,id=a,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port=40111")
    unix = parse_netdev("stream,id=a,server=off,addr.type=unix,addr.path=/tmp/us3")
    peer = SimpleNamespace
    assert hmp._netdev_info(listen, peer(peer=("127.0.0.1", 39460))) == "socket,socket: connection from 127.0.0.1:39460"
    assert hmp._netdev_info(connect, peer(peer=("127.0.0.1", 54069))) == "socket,socket: connect to 127.0.0.1:54069"
    assert hmp._netdev_info(stream, peer(peer=("127.0.0.1", 44650))) == "stream,tcp:127.0.0.1:44650"
    assert hmp._netdev_info(unix, peer(peer="/tmp/us3")) == "stream,unix:/tmp/us3"
    assert hmp._netdev_info(stream, peer(peer=None)) == "stream,"


def test_net_daemon_orders_and_checks_filters_as_run_does(tmp_path: Path) -> None:
    from appliance.cli.net_daemon import parse_all

    export = f"type=vhost-user-net,id=e0,netdev=n0,addr.type=unix,addr.path={tmp_path / 'v'}"
    _, _, dumps = parse_all(["--netdev", UDP, "--export", export,
                             "--object", f"filter-dump,id=a,netdev=n0,file={tmp_path / 'a'}",
                             "--object", f"filter-dump,id=b,netdev=n0,file={tmp_path / 'b'},position=head",
                             "--object", f"filter-dump,id=c,netdev=n0,file={tmp_path / 'c'},position=id=a,"
                                         "insert=before"])
    assert [d.id for d in dumps] == ["b", "c", "a"]
    with pytest.raises(ConfigError, match="Parameter 'netdev' expects a network backend id"):
        parse_all(["--netdev", UDP, "--export", export, "--object", f"filter-dump,id=a,netdev=x,file={tmp_path}/a"])
    with pytest.raises(ConfigError, match="filter 'zz' not found"):
        parse_all(["--netdev", UDP, "--export", export,
                   "--object", f"filter-dump,id=a,netdev=n0,file={tmp_path}/a,position=id=zz"])
