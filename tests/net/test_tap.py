"""Tap queues move frames between our readv/writev and the kernel, inside a namespace."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

from appliance.net.tap import Tap, link_exists
from appliance.net.tun import VNET_HDR_LEN
from tests.conftest import needs_root
from tests.net.netns import inside, namespace, ns_exec

pytestmark = needs_root

GUEST_MAC = "52:54:00:12:34:56"


async def recv_frame(q, hdr: int, timeout: float = 3.0) -> bytes:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    buf = bytearray(65536 + hdr)
    while loop.time() < deadline:
        n = q.recv_into([memoryview(buf)])
        if n > 0:
            return bytes(buf[hdr:n])
        await asyncio.sleep(0.01)
    raise TimeoutError("no frame from the tap")


async def answer(q, hdr: int, want) -> Ether:
    """Read frames until one has layer ``want`` (the kernel also sends IPv6 noise)."""
    for _ in range(50):
        pkt = Ether(await recv_frame(q, hdr))
        if want in pkt:
            return pkt
    raise AssertionError("expected frame not seen")


@pytest.mark.parametrize("vnet_hdr", [True, False])
async def test_kernel_answers_arp_and_ping_through_the_tap(vnet_hdr: bool) -> None:
    with namespace() as ns:
        with inside(ns):
            tap = Tap("aptap0", vnet_hdr=vnet_hdr)
            (q,) = await tap.open()
        ns_exec(ns, "ip", "addr", "add", "10.77.0.1/24", "dev", "aptap0")
        hdr = VNET_HDR_LEN if vnet_hdr else 0
        pre = bytes(hdr)
        try:
            arp = Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
                op=1, hwsrc=GUEST_MAC, psrc="10.77.0.2", pdst="10.77.0.1"
            )
            assert q.send([memoryview(pre + bytes(arp))])
            reply = await answer(q, hdr, ARP)
            assert reply[ARP].op == 2 and reply[ARP].psrc == "10.77.0.1"
            host_mac = reply[ARP].hwsrc

            ip = IP(src="10.77.0.2", dst="10.77.0.1")
            ping = Ether(src=GUEST_MAC, dst=host_mac) / ip / ICMP(id=7, seq=1) / (b"x" * 100)
            assert q.send([memoryview(pre), memoryview(bytes(ping))])  # header and frame in two buffers
            echo = await answer(q, hdr, ICMP)
            assert echo[ICMP].type == 0 and echo[ICMP].id == 7 and bytes(echo[ICMP].payload) == b"x" * 100
            assert q.tx_frames == 2 and q.rx_frames >= 2
        finally:
            with inside(ns):
                await tap.close()
                assert not link_exists("aptap0")


async def test_multiqueue_tap_has_one_fd_per_queue_and_is_removed_on_close() -> None:
    with namespace() as ns:
        with inside(ns):
            tap = Tap(None, queues=4)
            qs = await tap.open()
            assert len({q.fd for q in qs}) == 4
            assert tap.owned and link_exists(tap.name)
            out = ns_exec(ns, "ip", "-d", "link", "show", tap.name)
            assert "multi_queue" in out
            await tap.close()
            assert not link_exists(tap.name)
            assert all(q.fd == -1 for q in qs)


async def test_adopted_tap_is_left_in_place() -> None:
    with namespace() as ns:
        ns_exec(ns, "ip", "tuntap", "add", "dev", "keepme", "mode", "tap")
        with inside(ns):
            tap = Tap("keepme", vnet_hdr=False)
            await tap.open()
            assert not tap.owned
            await tap.close()
            assert link_exists("keepme")


async def test_tap_enslaved_to_bridge() -> None:
    with namespace() as ns:
        ns_exec(ns, "ip", "link", "add", "br9", "type", "bridge")
        with inside(ns):
            tap = Tap("aptap1", bridge="br9")
            await tap.open()
            try:
                out = ns_exec(ns, "ip", "link", "show", "aptap1")
                assert "master br9" in out and "UP" in out
            finally:
                await tap.close()


async def test_tap_to_missing_bridge_is_a_clear_error() -> None:
    from appliance.net.errors import TapError

    with namespace() as ns:
        with inside(ns):
            tap = Tap("aptap2", bridge="nosuchbr")
            with pytest.raises(TapError, match="bridge 'nosuchbr' does not exist"):
                await tap.open()
            assert not link_exists("aptap2")


async def test_tap_queues_handed_over_by_fd_carry_frames_and_stay_with_their_owner() -> None:
    # -netdev tap,fd=N / fds=N:M: the caller (libvirt, a script) opened the
    # queues; we learn the tap and its header mode from them and leave the link.
    from appliance.errors import ConfigError
    from appliance.net import tun
    from appliance.net.netdev import TapNetdev, open_netdev, parse_netdev

    with namespace() as ns:
        with inside(ns):
            fds = [tun.open_tap("byfd0", vnet_hdr=True, multi_queue=True)[0] for _ in range(2)]
            plain, _ = tun.open_tap("plain0", vnet_hdr=False, multi_queue=False)
        ns_exec(ns, "ip", "link", "set", "byfd0", "up")
        ns_exec(ns, "ip", "addr", "add", "10.78.0.1/24", "dev", "byfd0")
        cfg = parse_netdev(f"tap,id=t0,fds={fds[0]}:{fds[1]}")
        assert isinstance(cfg, TapNetdev)
        assert (cfg.ifname, cfg.queues, cfg.vnet_hdr) == ("byfd0", 2, True)
        assert parse_netdev(f"tap,id=t1,fd={plain}").vnet_hdr is False  # type: ignore[union-attr]
        assert parse_netdev(f"tap,id=t6,fd={plain},sndbuf=1M,poll-us=50").sndbuf == 1 << 20  # type: ignore[union-attr]
        with pytest.raises(ConfigError, match="ifname= is invalid with fd="):
            parse_netdev(f"tap,id=t2,fd={plain},ifname=x")
        with pytest.raises(ConfigError, match="different taps"):
            parse_netdev(f"tap,id=t3,fds={fds[0]}:{plain}")
        with pytest.raises(ConfigError, match="not a tap device"):
            parse_netdev("tap,id=t4,fd=987")
        with pytest.raises(ConfigError, match="not a file descriptor"):
            parse_netdev("tap,id=t5,fd=abc")
        with inside(ns):
            backends, tap = await open_netdev(cfg, queues=2)
        try:
            assert not tap.owned and [q.fd for q in backends] == fds
            arp = Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
                op=1, hwsrc=GUEST_MAC, psrc="10.78.0.2", pdst="10.78.0.1")
            assert backends[0].send([memoryview(bytes(VNET_HDR_LEN) + bytes(arp))])
            got = []
            for q in backends:  # the kernel may steer the reply to either queue
                try:
                    got.append(await answer(q, VNET_HDR_LEN, ARP))
                except (TimeoutError, AssertionError):
                    pass
            assert any(r[ARP].op == 2 and r[ARP].psrc == "10.78.0.1" for r in got)
        finally:
            with inside(ns):
                await tap.close()
                assert link_exists("byfd0") is False  # its last fd closed: a non-persistent tap goes
            os.close(plain)


async def test_sndbuf_reaches_the_tap() -> None:
    import fcntl
    import struct

    with namespace() as ns:
        with inside(ns):
            tap = Tap("sb0", sndbuf=65536, queues=2)
            qs = await tap.open()
            try:
                tungetsndbuf = 0x800454D3
                for q in qs:
                    got = struct.unpack("i", fcntl.ioctl(q.fd, tungetsndbuf, bytes(4)))[0]
                    assert got == 65536
            finally:
                await tap.close()


def _scripts(tmp_path, up_exit: int = 0):
    """An up script and a down script that log their argument and whether the tap exists."""
    log = tmp_path / "scripts.log"
    up, down = tmp_path / "up.sh", tmp_path / "down.sh"
    for path, word, code in ((up, "up", up_exit), (down, "down", 0)):
        path.write_text(f'#!/bin/sh\necho "{word} $# $1 $(ip -o link show "$1" | grep -c UP)" >> {log}\nexit {code}\n')
        path.chmod(0o755)
    return up, down, log


async def test_the_up_and_down_scripts_run_with_the_taps_name_as_qemus_do(tmp_path) -> None:
    """QEMU's ``script=`` runs once the tap is made (once for all its queues), ``downscript=``
    as it goes, while the tap is still there; each gets the tap's name and nothing else."""
    up, down, log = _scripts(tmp_path)
    with namespace() as ns:
        with inside(ns):
            tap = Tap("sctap0", queues=2, script=str(up), downscript=str(down))
            await tap.open()
            assert log.read_text() == "up 1 sctap0 1\n"
            await tap.close()
        assert log.read_text() == "up 1 sctap0 1\ndown 1 sctap0 1\n"
        assert "sctap0" not in ns_exec(ns, "ip", "link")


@pytest.mark.parametrize(("exit_code", "status"), [(3, 768), (None, 256)])
async def test_a_failing_up_script_fails_the_tap_in_qemus_words(tmp_path, exit_code, status) -> None:
    """QEMU prints the wait status: an exit code times 256, and 256 for a script it cannot run.
    The tap is gone again and its down script does not run."""
    from appliance.net.errors import TapError

    up, down, log = _scripts(tmp_path, exit_code or 0)
    script = str(up) if exit_code is not None else str(tmp_path / "missing.sh")
    with namespace() as ns:
        with inside(ns):
            tap = Tap("sctap1", script=script, downscript=str(down))
            with pytest.raises(TapError, match=f"^network script {script} failed with status {status}$"):
                await tap.open()
        assert "sctap1" not in ns_exec(ns, "ip", "link")
    assert "down" not in (log.read_text() if log.exists() else "")


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("scripts", ["given", "default", "failing"])
async def test_tap_scripts_in_info_network_and_failures_are_qemus(tmp_path, scripts) -> None:
    """The same -netdev tap under QEMU 7.2 and here, in one namespace: ``info network`` names
    the scripts that ran (QEMU's defaults when none is given), and a failing script's
    complaint is QEMU's."""
    from appliance.errors import ConfigError
    from appliance.machine.devices import NicSpec
    from appliance.net.netdev import parse_netdev
    from appliance.qmp.hmp import _netdev_info

    up, down, _ = _scripts(tmp_path, 5 if scripts == "failing" else 0)
    text = "tap,id=n0,ifname=sctap2" + ("" if scripts == "default" else f",script={up},downscript={down}")
    quit_ = b"".join(json.dumps(c).encode() + b"\n" for c in (
        {"execute": "qmp_capabilities"},
        {"execute": "human-monitor-command", "arguments": {"command-line": "info network"}},
        {"execute": "quit"}))
    with namespace() as ns:
        qemu = subprocess.run(["ip", "netns", "exec", ns, "qemu-system-x86_64", "-M", "none", "-nodefaults",
                               "-display", "none", "-S", "-netdev", text, "-qmp", "stdio"],
                              input=quit_, capture_output=True, timeout=30)
        spec = NicSpec(parse_netdev(text), b"\x52\x54\x00\x12\x34\x56", origin=f"-netdev {text}")
        with inside(ns):
            if scripts == "failing":
                with pytest.raises(ConfigError) as err:
                    await spec.open()
                assert qemu.returncode == 1
                assert str(err.value) == qemu.stderr.decode().splitlines()[-1].split(": ", 1)[1]
                return
            await spec.open()
            try:
                ours = f"n0: index=0,type={_netdev_info(spec.netdev, spec.owner)}"
            finally:
                await spec.close()
    replies = [json.loads(line) for line in qemu.stdout.decode().splitlines()]
    [theirs] = [m["return"] for m in replies if m.get("return")]
    assert ours == theirs.rstrip("\r\n")
