"""QEMU's virtio-net-pci properties against `appliance net-daemon --netdev user`.

Each property below changes what the Linux guest's virtio_net driver
negotiates (checksum and segmentation offloads, mergeable or "big" or small
receive buffers, ring layout, ring sizes, queue pairs, MTU), so each takes a
different path through our vhost-user device and the user-mode stack. One
guest boots per case (the Linux kit in QEMU TCG, ``vectors=0``: see
tests/linux/test_vhost_user_net.py) and in that one boot: takes its DHCP lease,
pings the gateway, fetches a file from an HTTP server the test runs on host
loopback (reached as 10.0.2.2), receives a stream from a host client through
``hostfwd`` and uploads one to a host sink, each with a SHA-256 check. The
daemon captures every frame (``filter-dump``): frames toward the guest must
carry valid IPv4 header checksums, and valid TCP/UDP/ICMP checksums whenever
the guest did not negotiate VIRTIO_NET_F_GUEST_CSUM (Linux drops a bad one
silently: the symptom is a stalled transfer), and none may be larger than the
guest's MTU unless it accepted TSO.

Only loopback services this test starts are contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.cli.net_daemon import DaemonNic, NetDaemon, parse_command_line
from appliance.kit.errors import TcgTimeout
from appliance.kit.tcg import TcgGuest
from appliance.nic import constants as C
from appliance.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from tests.conftest import needs_qemu
from tests.linux.test_user_net import free_port, wait_listening

pytestmark = needs_qemu

GUEST_MAC = bytes.fromhex("525400123456")
# Transfer sizes: enough for many full rings and GSO frames, small enough that the
# whole sweep stays near a minute under TCG on two cores.
WGET_MB = 3
FWD_MB = 2
UP_MB = 1


@dataclass(frozen=True)
class Case:
    props: str  # appended to -device virtio-net-pci,netdev=n0,mac=...,vectors=0
    off: tuple[int, ...] = ()  # feature bits the property must have turned off
    netdev: str = ""  # appended to -netdev vhost-user,id=n0,chardev=c0


TSO_OFF = "guest_tso4=off,guest_tso6=off,guest_ecn=off"
CASES = {
    # QEMU leaves the TSO bits on (and Linux takes them) without the checksum bits they need
    # (virtio 1.2 §5.1.3.1): TSO must then count as off on our side. csum=off alone and guest
    # TSO off alone (with mergeable buffers) are in the combinations below and the host_mtu test.
    "guest_csum=off": Case("guest_csum=off", (C.F_GUEST_CSUM,)),
    "host_tso=off": Case("host_tso4=off,host_tso6=off", (C.F_HOST_TSO4, C.F_HOST_TSO6)),
    # Linux: with guest TSO, "big packets" (chains of pages); without, small buffers.
    "mrg_rxbuf=off": Case("mrg_rxbuf=off", (C.F_MRG_RXBUF,)),
    "mrg_rxbuf=off+guest_tso=off": Case(f"mrg_rxbuf=off,{TSO_OFF}", (C.F_MRG_RXBUF, C.F_GUEST_TSO4)),
    # Ring layout: notifications without used_event/avail_event, chains without indirect tables.
    "event_idx=off+indirect_desc=off": Case(
        "event_idx=off,indirect_desc=off", (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC)
    ),
    "queue_size=1024": Case("rx_queue_size=1024,tx_queue_size=1024"),
    # The daemon's user netdev has one queue pair and offers no MQ, so QEMU gives the
    # guest one pair even when asked for two.
    "mq=on,queues=2": Case("mq=on", netdev=",queues=2"),
    "offloads=off+gso=off": Case(
        f"csum=off,guest_csum=off,gso=off,host_tso4=off,host_tso6=off,{TSO_OFF}",
        (C.F_CSUM, C.F_GUEST_CSUM, C.F_HOST_TSO4, C.F_GUEST_TSO4),
    ),
    # A legacy (virtio 0.9.5) driver without mergeable buffers: a 10-byte header, which our
    # device took for the 12-byte one (no lease); tests/nic/test_legacy_header.py.
    "disable-modern=on,mrg_rxbuf=off": Case("disable-modern=on,mrg_rxbuf=off", (VIRTIO_F_VERSION_1, C.F_MRG_RXBUF)),
}


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """HTTP servers on host loopback with one random file: (port, its SHA-256), the same port
    on 127.0.0.1 and on ::1 (reached as 10.0.2.2 and fec0::2)."""
    root = tmp_path_factory.mktemp("www")
    blob = os.urandom(WGET_MB << 20)
    (root / "blob").write_bytes(blob)
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", addr, "--directory", str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for addr in ("127.0.0.1", "::1")
    ]
    try:
        for proc, addr in zip(procs, ("127.0.0.1", "::1"), strict=True):
            wait_listening(proc, addr, port)
        yield port, hashlib.sha256(blob).hexdigest()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


@contextlib.asynccontextmanager
async def daemon(tmp: Path, fwd_port: int) -> AsyncIterator[DaemonNic]:
    """`appliance net-daemon` (its own command line, in this process) with a pcap of every frame."""
    args = parse_command_line([
        "--netdev", f"user,id=u0,hostfwd=tcp:127.0.0.1:{fwd_port}-:7000",
        "--export", f"type=vhost-user-net,id=e0,netdev=u0,addr.type=unix,addr.path={tmp / 'net.sock'}",
        "--object", f"filter-dump,id=f0,netdev=u0,file={tmp / 'dump.pcap'}",
    ])  # fmt: skip
    d = NetDaemon(args.netdevs, args.exports, args.dumps)
    await d.start()
    try:
        yield d.nics[0]
    finally:
        await d.close()


def qemu_args(tmp: Path, case: Case) -> list[str]:
    return [
        "-chardev", f"socket,id=c0,path={tmp / 'net.sock'}",
        "-netdev", f"vhost-user,id=n0,chardev=c0{case.netdev}",
        "-device", f"virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,vectors=0,{case.props}",
    ]  # fmt: skip


def _csum(data: bytes) -> int:
    """The Internet checksum of ``data`` (0 when a packet's own checksum is right)."""
    if len(data) & 1:
        data += b"\0"
    s = sum(memoryview(data).cast("H"))  # native-order words: swapped back below
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    s = ((s & 0xFF) << 8) | (s >> 8)
    return ~s & 0xFFFF


def frames_to_guest(pcap: Path) -> Iterator[bytes]:
    data = pcap.read_bytes()
    assert struct.unpack_from("<I", data)[0] == 0xA1B2C3D4, "a microsecond pcap"
    off = 24
    while off + 16 <= len(data):
        incl = struct.unpack_from("<I", data, off + 8)[0]
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if frame[:6] in (GUEST_MAC, b"\xff" * 6) or frame[:3] == b"\x33\x33":
            yield frame


def check_frames(pcap: Path, *, l4_checksums: bool, max_frame: int | None) -> Counter[str]:
    """Count the IPv4 frames toward the guest by outcome; assert on the bad ones."""
    seen: Counter[str] = Counter()
    for f in frames_to_guest(pcap):
        if max_frame is not None:
            assert len(f) <= max_frame, f"a {len(f)}-byte frame to a guest whose largest is {max_frame}"
        if f[12:14] == b"\x86\xdd":
            nh, l4 = f[20], f[54 : 54 + struct.unpack_from("!H", f, 18)[0]]
            if l4_checksums and nh in (6, 17, 58):
                assert _csum(f[22:54] + struct.pack("!IxxxB", len(l4), nh) + l4) == 0, f"IPv6 next header {nh} checksum"
                seen[f"ipv6-{nh}"] += 1
            continue
        if f[12:14] != b"\x08\x00":
            continue
        ihl = (f[14] & 15) * 4
        assert _csum(f[14 : 14 + ihl]) == 0, "IPv4 header checksum"
        seen["ipv4"] += 1
        total, frag, proto = struct.unpack_from("!H", f, 16)[0], struct.unpack_from("!H", f, 20)[0], f[23]
        if not l4_checksums or frag & 0x3FFF or proto not in (1, 6, 17):
            continue
        l4 = f[14 + ihl : 14 + total]
        if proto == 17 and l4[6:8] == b"\0\0":
            continue  # UDP without a checksum
        pseudo = b"" if proto == 1 else f[26:34] + struct.pack("!BBH", 0, proto, len(l4))
        name = {1: "icmp", 6: "tcp", 17: "udp"}[proto]
        assert _csum(pseudo + l4) == 0, f"{name} checksum in a {len(f)}-byte frame (no GUEST_CSUM negotiated)"
        seen[name] += 1
    return seen


def state(nic: DaemonNic) -> str:
    """The daemon's side of a failure: the stack's counters and flows, the device's queue stats."""
    return f"\n{nic.owner.counters()}\n{nic.owner.info()}\n{nic.device.stats if nic.device else None}"


def rings(nic: DaemonNic) -> str:
    """Our side of the vhost-user link: the connection, each ring as the front end set it up, and
    each queue as the device sees it in guest memory (indices and notification events)."""
    server = nic.server
    out = [f"\nvhost-user connections={server.connections} connected={server._conn is not None}"]
    for r in server.backend.rings:
        out.append(f"ring {r.index}: started={r.started} enabled={r.enabled} kicks={r.kicks}"
                   f" interrupts={r.interrupts} discarded={r.discarded}")
    dev = nic.device
    for i, q in enumerate(dev._queues if dev is not None else []):
        out.append(f"queue {i}: avail={q.avail_idx()} next_avail={q.last_avail_idx} used={q.used_idx} "
                   f"used_event={int(q._avail16[q._used_event_i])} avail_event={int(q._used16[q._avail_event_i])}")
    return "\n".join(out)


async def poweroff(g: TcgGuest, nic: DaemonNic) -> None:
    """``g.poweroff`` whose timeout also says what our side of the NIC looked like then.

    A guest here hung at poweroff in about one full run of the suite in ten: the kernel's IPv6
    DAD or MLD work sent a frame after the shutdown had broken the virtqueues, and virtio_net's
    reclaim loop spun forever. The kit now takes its links down before powering off
    (tests/linux/test_kit_poweroff.py); should a guest hang here again, this shows our side.
    """
    try:
        await g.poweroff()
    except TcgTimeout as err:
        raise AssertionError(f"the guest hung at poweroff{state(nic)}{rings(nic)}") from err


async def guest(g: TcgGuest, nic: DaemonNic, cmd: str, timeout: float = 60) -> str:
    """``g.run`` whose timeout says what the daemon saw."""
    try:
        return await g.run(cmd, timeout=timeout)
    except TcgTimeout as err:
        raise AssertionError(f"guest command {cmd!r} hung{state(nic)}") from err


async def exercise(g: TcgGuest, nic: DaemonNic, web: tuple[int, str], fwd_port: int) -> None:
    """Lease, ping, download, hostfwd stream in, upload: each checked."""
    out = await guest(g, nic, "udhcpc -i eth0 -n -q -t 5")
    assert "lease of 10.0.2.15 obtained" in out, out
    assert " 0% packet loss" in await guest(g, nic, "ping -c 2 -i 0.2 -W 5 10.0.2.2")
    http_port, want = web
    got = await guest(g, nic, f"wget -q -O - http://10.0.2.2:{http_port}/blob | sha256sum")
    assert got.split()[0] == want, "HTTP download through the NAT"
    # host -> guest through hostfwd, once the guest listens
    await g.run("nc -l -p 7000 </dev/null | sha256sum > /tmp/in &")
    for _ in range(100):
        if listening := ":7000 " in await g.run("netstat -ltn"):
            break
        await asyncio.sleep(0.05)
    assert listening, "busybox nc -l never listened"
    stream = os.urandom(FWD_MB << 20)
    _r, w = await asyncio.open_connection("127.0.0.1", fwd_port)
    w.write(stream)
    try:
        await asyncio.wait_for(w.drain(), 60)
    except TimeoutError as err:
        raise AssertionError(f"the hostfwd stream stalled{state(nic)}") from err
    w.close()
    await guest(g, nic, "wait")
    assert (await g.run("cat /tmp/in")).split()[0] == hashlib.sha256(stream).hexdigest(), "hostfwd stream"
    # guest -> host upload
    h = hashlib.sha256()
    done = asyncio.Event()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while chunk := await r.read(1 << 20):
            h.update(chunk)
        w.close()
        done.set()

    srv = await asyncio.start_server(sink, "127.0.0.1", 0)
    try:
        port = srv.sockets[0].getsockname()[1]
        sent = await guest(g, nic, f"head -c {UP_MB << 20} /dev/urandom > /tmp/up; sha256sum /tmp/up; "
                                   f"nc 10.0.2.2 {port} < /tmp/up")  # fmt: skip
        try:
            # The guest's nc has returned: the host sees EOF once the stack has passed on the
            # rest. 90 s, not 30: one run in ~30 took over 30 s here (cause not found); a stall
            # past this says what the daemon saw.
            await asyncio.wait_for(done.wait(), 90)
        except TimeoutError as err:
            raise AssertionError(f"the upload never reached EOF on the host{state(nic)}") from err
    finally:
        srv.close()
    assert sent.split()[0] == h.hexdigest(), "upload through the NAT"
    counters = nic.owner.counters()
    assert counters["bad_vnet_hdr"] == 0 and counters["errors"] == 0, counters


@pytest.mark.parametrize("name", list(CASES))
async def test_virtio_net_property(tmp_path: Path, web: tuple[int, str], name: str) -> None:
    case = CASES[name]
    fwd_port = free_port()
    async with daemon(tmp_path, fwd_port) as nic:
        async with TcgGuest(qemu_args(tmp_path, case), machine="q35", console_log=tmp_path / "console.log") as g:
            dev = nic.device
            for bit in case.off:
                assert not dev.has_feature(bit), f"{name}: feature {bit} still negotiated"
            if name == "queue_size=1024":
                assert [r.num for r in nic.server.backend.rings] == [1024, 1024]
            if name == "mq=on,queues=2":
                assert (await g.run("ls /sys/class/net/eth0/queues")).split() == ["rx-0", "tx-0"]
            await exercise(g, nic, web, fwd_port)
            if name == "guest_csum=off":
                # TCP over IPv6 (SLAAC in fec0::/64) to the host's ::1: full checksums there too.
                for _ in range(50):
                    addr = await g.run("ip -6 addr show dev eth0 scope site")
                    if "fec0::" in addr and "tentative" not in addr:
                        break
                    await asyncio.sleep(0.2)
                got = await guest(g, nic, f"wget -q -O - http://[fec0::2]:{web[0]}/blob | sha256sum")
                assert got.split()[0] == web[1], "HTTP download over IPv6"
            guest_csum = dev.has_feature(C.F_GUEST_CSUM)
            tso = guest_csum and (dev.has_feature(C.F_GUEST_TSO4) or dev.has_feature(C.F_GUEST_TSO6))
            await poweroff(g, nic)
    seen = check_frames(tmp_path / "dump.pcap", l4_checksums=not guest_csum, max_frame=None if tso else 1514)
    if not guest_csum:
        assert seen["tcp"] > 1000 and seen["udp"] and seen["icmp"], seen
    if name == "guest_csum=off":
        # After SLAAC: the router advertisement and the download's segments.
        assert seen["ipv6-58"] and seen["ipv6-6"] > 1000, seen


async def test_host_mtu_1400_reaches_the_user_stack(tmp_path: Path, web: tuple[int, str]) -> None:
    """``host_mtu=1400``: the guest's MTU follows, transfers work, and no frame to the guest is
    larger (QEMU tells the back end only through NET_SET_MTU; before we took it, a 1400-byte ping
    was answered with one 1442-byte frame). Guest TSO is off so that every frame is checked."""
    case = Case(f"host_mtu=1400,{TSO_OFF}")
    fwd_port = free_port()
    async with daemon(tmp_path, fwd_port) as nic:
        async with TcgGuest(qemu_args(tmp_path, case), machine="q35") as g:
            assert (await g.run("cat /sys/class/net/eth0/mtu")).strip() == "1400"
            assert nic.owner.mtu == 1400
            await exercise(g, nic, web, fwd_port)
            # Sent in two fragments, answered in two.
            assert " 0% packet loss" in await g.run("ping -c 1 -s 1400 -W 5 10.0.2.2", timeout=30)
            guest_csum = nic.device.has_feature(C.F_GUEST_CSUM)
            await g.poweroff()
    seen = check_frames(tmp_path / "dump.pcap", l4_checksums=not guest_csum, max_frame=14 + 1400)
    assert seen["ipv4"] > 1000, seen
