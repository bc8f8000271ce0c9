"""Real Linux (QEMU TCG) on our user-mode network through `net-daemon --netdev user`.

Only loopback services the test starts are ever contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from appliance.kit.tcg import TcgGuest
from appliance.net.netdev import UserNetdev, open_netdev, parse_netdev
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.vhost_user.backend import VhostUserBackend
from appliance.virtio.vhost_user.server import VhostUserServer
from tests.conftest import needs_qemu
from tests.linux.test_vhost_user_net import nic_args
from tests.ports import free_port

pytestmark = needs_qemu


def wait_listening(proc: subprocess.Popen[bytes], host: str, port: int, timeout: float = 30) -> None:
    """Return once ``proc`` (a server the test started) accepts connections on ``host``:``port``.

    It binds a moment after it starts; a guest that reaches it sooner would be refused.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None, f"the server for {host}:{port} exited ({proc.returncode})"
            assert time.monotonic() < deadline, f"nothing listened on {host}:{port} in {timeout:g} s"
            time.sleep(0.05)


async def guest_listens(g: TcgGuest, port: int, timeout: float = 30) -> None:
    """Return once a TCP listener on ``port`` is up in the guest (busybox ``netstat -ltn``)."""
    deadline = time.monotonic() + timeout
    while f":{port} " not in await g.run("netstat -ltn"):
        assert time.monotonic() < deadline, f"nothing listened on guest port {port} in {timeout:g} s"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def user_daemon(sock: Path, options: str) -> AsyncIterator[object]:
    cfg = parse_netdev(f"user,id=u0,{options}" if options else "user,id=u0")
    assert isinstance(cfg, UserNetdev)
    backends, stack = await open_netdev(cfg)
    dev = VirtioNet(backends, bytes.fromhex("525400123456"), control_queue=False)
    server = VhostUserServer(sock, VhostUserBackend(dev))
    await server.start()
    try:
        yield stack
    finally:
        await server.close()
        await stack.stop()


async def test_lease_http_download_and_hostfwd(tmp_path: Path) -> None:
    blob = os.urandom(int(os.environ.get("APL_BLOB_MB", "20")) << 20)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "blob").write_bytes(blob)
    http_port, fwd_port = free_port(), free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
         "--directory", str(tmp_path / "www")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    boot = os.urandom(200_000)
    (tmp_path / "tftp").mkdir()
    (tmp_path / "tftp" / "boot.bin").write_bytes(boot)
    sock = tmp_path / "user.sock"
    try:
        wait_listening(web, "127.0.0.1", http_port)
        async with user_daemon(sock, f"hostfwd=tcp:127.0.0.1:{fwd_port}-:7000,"
                                     f"tftp={tmp_path / 'tftp'}") as stack:
            async with TcgGuest(nic_args(sock, "52:54:00:12:34:56"), machine="q35") as g:
                out = await g.run("udhcpc -i eth0 -n -q -t 5", timeout=60)
                assert "10.0.2.15" in out
                assert "default via 10.0.2.2" in await g.run("ip route")
                # busybox's TFTP client, with and without a block size option.
                for opt in ("", "-b 1400 "):
                    got = await g.run(f"tftp -g {opt}-r /boot.bin -l /tmp/b 10.0.2.2 && "
                                      "sha256sum /tmp/b; rm -f /tmp/b", timeout=60)
                    assert got.split()[0] == hashlib.sha256(boot).hexdigest(), got
                got = await g.run(f"wget -q -O - http://10.0.2.2:{http_port}/blob | sha256sum", timeout=180)
                assert got.split()[0] == hashlib.sha256(blob).hexdigest()
                # Upload: the guest's driver took our CSUM/HOST_TSO4 offer and sends 64 KiB segments.
                got_up = hashlib.sha256()
                up_done = asyncio.Event()

                async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                    while chunk := await r.read(1 << 20):
                        got_up.update(chunk)
                    w.close()
                    up_done.set()

                srv = await asyncio.start_server(sink, "127.0.0.1", 0)
                up_port = srv.sockets[0].getsockname()[1]
                sent = await g.run(f"head -c 8388608 /dev/urandom | tee /tmp/up | nc 10.0.2.2 {up_port}; "
                                   "sha256sum /tmp/up; rm /tmp/up", timeout=180)  # fmt: skip
                await asyncio.wait_for(up_done.wait(), 30)
                srv.close()
                assert sent.split()[0] == got_up.hexdigest()
                counters = stack.counters()  # type: ignore[attr-defined]
                assert counters["rx_gso_frames"] > 0, "the guest never sent a TSO segment"
                assert counters["tx_gso_frames"] > 0, "the guest never took a TSO segment"
                assert counters["bad_vnet_hdr"] == 0 and counters["errors"] == 0
                # Inbound: a host client reaches a guest listener through hostfwd, once it
                # listens (before, the forward's SYN would be refused and the host see EOF).
                # Started from a subshell, as no job of the console shell's own (see
                # test_user_net_dhcp), which stays free to ask netstat.
                await g.run("( (echo from-guest | nc -l -p 7000 > /tmp/in; echo NC-DONE) & )")
                await guest_listens(g, 7000)
                r, w = await asyncio.open_connection("127.0.0.1", fwd_port)
                w.write(b"from-host\n")
                await w.drain()
                assert (await asyncio.wait_for(r.readline(), 30)) == b"from-guest\n"
                flows = stack.flows()  # type: ignore[attr-defined]
                assert any(f.proto == "TCP[HOST_FORWARD]" for f in flows), "the flow table lists the forward"
                w.close()
                await g.expect("NC-DONE", 30)
                assert (await g.run("cat /tmp/in")).strip() == "from-host"
                await g.poweroff()
    finally:
        web.terminate()
        web.wait()


async def test_ipv6_slaac_echo_and_tcp_to_host_loopback(tmp_path: Path) -> None:
    # The guest's own kernel configures itself from our router advertisement (SLAAC in
    # QEMU's default fec0::/64), pings the router and fetches over TCP/IPv6 from a server
    # the test runs on the host's ::1, reached as fec0::2 (as 10.0.2.2 reaches 127.0.0.1).
    blob = os.urandom(300_000)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "blob").write_bytes(blob)
    port = free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "::1", "--directory", str(tmp_path / "www")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    sock = tmp_path / "user.sock"
    try:
        wait_listening(web, "::1", port)
        async with user_daemon(sock, "") as stack:
            async with TcgGuest(nic_args(sock, "52:54:00:12:34:56"), machine="q35") as g:
                await g.run("ip link set eth0 up")
                addr = ""
                for _ in range(50):  # router solicitation, advertisement, then duplicate address detection
                    addr = await g.run("ip -6 addr show dev eth0 scope site")
                    if "fec0::5054:ff:fe12:3456/64" in addr and "tentative" not in addr:
                        break
                    await asyncio.sleep(0.2)
                assert "fec0::5054:ff:fe12:3456/64" in addr and "tentative" not in addr, addr
                assert "default via fe80::2 dev eth0" in await g.run("ip -6 route")
                assert " 0% packet loss" in await g.run("ping -6 -c 2 fec0::2", timeout=30)
                got = await g.run(f"wget -q -O - http://[fec0::2]:{port}/blob | sha256sum", timeout=120)
                assert got.split()[0] == hashlib.sha256(blob).hexdigest()
                counters = stack.counters()  # type: ignore[attr-defined]
                assert counters["errors"] == 0
                await g.poweroff()
    finally:
        web.terminate()
        web.wait()
