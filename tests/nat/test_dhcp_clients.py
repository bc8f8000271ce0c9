"""DHCP and DNS clients we did not write, against our stack: ISC dhclient, dhcpcd and busybox
udhcpc/nslookup run in a network namespace made by the test.

The client's end of a veth pair is in the namespace; the other end is read and
written with an AF_PACKET socket by a :class:`UserNetwork` in this process, so
the namespace's interface plays the guest's NIC. The clients' scripts only log
what they were given (nothing on the host is configured by them); traffic
stays on the veth pair, and DNS goes to a resolver this test runs on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.nat import UserNetConfig, UserNetwork
from tests.conftest import needs_root
from tests.net.netns import inside, namespace, sh

pytestmark = needs_root

MAC = "52:54:00:12:34:56"
MAC_BYTES = bytes.fromhex(MAC.replace(":", ""))
IP15 = bytes([10, 0, 2, 15])
OPTIONS = "hostname=vm1,domainname=lab.test,dnssearch=lab.test,dnssearch=example.test"


def needs(program: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(program) is None, reason=f"{program} is not installed")


@dataclasses.dataclass
class Wire:
    net: UserNetwork
    ns: str
    ifname: str
    tmp: Path

    def run(self, *args: str, timeout: float = 30.0) -> str:
        """A command in the namespace; its output (stdout and stderr)."""
        p = subprocess.run(["ip", "netns", "exec", self.ns, *args], capture_output=True, text=True,
                           timeout=timeout, check=False)  # fmt: skip
        return p.stdout + p.stderr

    async def arun(self, *args: str, timeout: float = 30.0) -> str:
        return await asyncio.to_thread(self.run, *args, timeout=timeout)


@contextlib.asynccontextmanager
async def wire(tmp: Path, options: str = OPTIONS, nameservers: tuple[tuple[str, int], ...] = ()) -> AsyncIterator[Wire]:
    """Our stack on one end of a veth pair whose other end (``ifname``, MAC 52:54:00:12:34:56)
    is in a new namespace."""
    cfg = dataclasses.replace(UserNetConfig.from_string("user," + options), nameservers=nameservers)
    with namespace() as ns:
        ifname = "c" + ns[-8:]
        sh("ip", "-n", ns, "link", "add", ifname, "type", "veth", "peer", "name", "stack0")
        sh("ip", "-n", ns, "link", "set", ifname, "address", MAC)
        for dev in ("lo", ifname, "stack0"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.stack0.disable_ipv6=1")
        # The stack checks UDP checksums: veth would leave them to an offload that never comes.
        sh("ip", "netns", "exec", ns, "ethtool", "-K", ifname, "tx", "off")
        with inside(ns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        sock.bind(("stack0", 0))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        buf = memoryview(bytearray(65536))
        w = Wire(UserNetwork(cfg), ns, ifname, tmp)

        def to_client() -> None:
            while (n := w.net.recv_into([buf])) >= 0:
                with contextlib.suppress(OSError):
                    sock.send(buf[:n])

        def from_client() -> None:
            for _ in range(64):
                try:
                    frame = sock.recv(65536)
                except BlockingIOError:
                    break
                w.net.send([memoryview(frame)])
            to_client()

        async def restart() -> None:
            """A new stack on the same wire, as when QEMU is started again."""
            await w.net.stop()
            w.net = UserNetwork(cfg)
            await w.net.start()
            w.net.set_ready_callback(to_client)

        await w.net.start()
        w.net.set_ready_callback(to_client)
        w.restart = restart  # type: ignore[attr-defined]
        loop.add_reader(sock.fileno(), from_client)
        try:
            yield w
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()
            await w.net.stop()


def log_script(path: Path, log: Path, variables: str, apply: str = "") -> Path:
    """A client hook script that appends ``variables`` to ``log``, then runs ``apply`` (in the
    namespace: it is the client's)."""
    path.write_text(f'#!/bin/sh\necho "{variables}" >> {log}\n{apply}\nexit 0\n')
    path.chmod(0o755)
    return path


# dhclient leaves addresses to its script; RELEASE and renewals go out from the leased address.
DHCLIENT_APPLY = """case "$reason" in
BOUND|RENEW|REBIND|REBOOT) ip -4 addr flush dev "$interface"; ip addr add "$new_ip_address/24" dev "$interface" ;;
RELEASE|EXPIRE|FAIL|STOP) ip -4 addr flush dev "$interface" ;;
esac"""


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@needs("dhclient")
async def test_isc_dhclient_lease_options_release_and_init_reboot(tmp_path: Path) -> None:
    log = tmp_path / "events"
    script = log_script(tmp_path / "hook", log, "$reason ip=$new_ip_address server=$new_dhcp_server_identifier "
                        "lease=$new_dhcp_lease_time router=$new_routers dns=$new_domain_name_servers "
                        "domain=$new_domain_name search=$new_domain_search host=$new_host_name "
                        "bcast=$new_broadcast_address mask=$new_subnet_mask", DHCLIENT_APPLY)  # fmt: skip
    common = ["-sf", str(script), "-lf", str(tmp_path / "leases"), "-pf", str(tmp_path / "pid")]
    async with wire(tmp_path) as w:
        # -1: one try; dhclient forks once bound, the pid file says where it went.
        out = await w.arun("dhclient", "-v", "-1", *common, w.ifname)
        assert "bound to 10.0.2.15" in out, out
        bound = next(ln for ln in lines(log) if ln.startswith("BOUND "))
        for want in ("ip=10.0.2.15", "server=10.0.2.2", "lease=86400", "router=10.0.2.2", "dns=10.0.2.3",
                     "domain=lab.test", "search=lab.test. example.test.", "host=vm1", "bcast=10.0.2.255",
                     "mask=255.255.255.0"):  # fmt: skip
            assert want in bound, (want, bound)
        # -r: RELEASE (and the running dhclient stops); the lease is gone from our table. As
        # dhcpcd below, the address goes right after the datagram: 10.0.2.2 is resolved first.
        await w.arun("ip", "neigh", "replace", "10.0.2.2", "lladdr", "52:55:0a:00:02:02", "dev", w.ifname)
        out = await w.arun("dhclient", "-v", "-r", *common, w.ifname)
        assert "DHCPRELEASE of 10.0.2.15" in out, out
        async with asyncio.timeout(5):
            while MAC_BYTES in w.net.dhcp.leases:
                await asyncio.sleep(0.05)
        out = await w.arun("dhclient", "-v", "-1", *common, w.ifname)
        assert "bound to 10.0.2.15" in out, out
        await w.arun("dhclient", "-x", *common, w.ifname)
        # A new stack (QEMU restarted): dhclient asks for its remembered address (INIT-REBOOT); this
        # server never leased it, so a NAK sends dhclient to DISCOVER, and it is given 10.0.2.15.
        await w.restart()  # type: ignore[attr-defined]
        out = await w.arun("dhclient", "-v", "-1", *common, w.ifname)
        assert "DHCPREQUEST for 10.0.2.15" in out and "DHCPNAK from 10.0.2.2" in out, out
        assert "DHCPDISCOVER" in out and "bound to 10.0.2.15" in out, out
        await w.arun("dhclient", "-x", *common, w.ifname)


@needs("dhcpcd")
async def test_dhcpcd_lease_options_rebind_and_release(tmp_path: Path) -> None:
    log = tmp_path / "events"
    script = log_script(tmp_path / "hook", log, "$reason ip=$new_ip_address router=$new_routers "
                        "dns=$new_domain_name_servers domain=$new_domain_name search=$new_domain_search "
                        "host=$new_host_name lease=$new_dhcp_lease_time bcast=$new_broadcast_address")  # fmt: skip
    opts = ["-4", "-f", "/dev/null", "-c", str(script), "--noarp"]
    for o in ("routers", "domain_name_servers", "domain_name", "domain_search", "host_name", "broadcast_address"):
        opts += ["-o", o]
    async with wire(tmp_path) as w:
        lease_file = Path(f"/var/lib/dhcpcd/{w.ifname}.lease")
        try:
            await w.arun("dhcpcd", *opts, w.ifname)  # goes to the background, bound or about to be
            async with asyncio.timeout(20):
                while not any(ln.startswith("BOUND ") for ln in lines(log)):
                    await asyncio.sleep(0.05)
            bound = next(ln for ln in lines(log) if ln.startswith("BOUND "))
            for want in ("ip=10.0.2.15", "router=10.0.2.2", "dns=10.0.2.3", "domain=lab.test",
                         "search=lab.test example.test", "host=vm1", "lease=86400", "bcast=10.0.2.255"):  # fmt: skip
                assert want in bound, (want, bound)
            first = w.net.dhcp.leases[MAC_BYTES].expires
            await w.arun("dhcpcd", "-4", "-n", w.ifname)  # rebind: REQUESTs for its address, ACKed
            async with asyncio.timeout(10):
                while w.net.dhcp.leases[MAC_BYTES].expires == first:
                    await asyncio.sleep(0.05)
            async with asyncio.timeout(10):  # the daemon is done with the rebind before it is told to release
                while not any(ln.startswith(("RENEW ", "REBIND ")) for ln in lines(log)):
                    await asyncio.sleep(0.05)
            # dhcpcd sends its RELEASE once and drops the address right after: with 10.0.2.2 not
            # yet in the neighbour table the datagram can be lost while ARP resolves it.
            await w.arun("ip", "neigh", "replace", "10.0.2.2", "lladdr", "52:55:0a:00:02:02", "dev", w.ifname)
            await w.arun("dhcpcd", "-4", "-k", w.ifname)  # release, and the daemon stops
            async with asyncio.timeout(10):
                while MAC_BYTES in w.net.dhcp.leases:
                    await asyncio.sleep(0.05)
            # `dhcpcd -k` returns once it has told the daemon; the daemon's last hook (STOPPED)
            # runs after the RELEASE we just saw, in its own time.
            deadline = asyncio.get_running_loop().time() + 10
            while not lines(log)[-1].startswith("STOPPED") and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            assert lines(log)[-1].startswith("STOPPED"), lines(log)
        finally:
            await w.arun("dhcpcd", "-4", "-x", w.ifname)
            lease_file.unlink(missing_ok=True)


async def test_busybox_udhcpc_with_broadcast_flag_and_nslookup(tmp_path: Path) -> None:
    """busybox udhcpc -B from the host's busybox, then nslookup of the gateway's names (A and
    AAAA, any case) and of a forwarded name answered by a resolver on loopback."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed")

    class Resolver(asyncio.DatagramProtocol):
        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            self.transport = transport

        def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
            # One A record (192.0.2.7) for an A question, NODATA otherwise.
            qend = data.index(b"\0", 12) + 5
            is_a = data[qend - 4 : qend - 2] == b"\0\1"
            rr = b"\xc0\x0c\0\1\0\1\0\0\0\x3c\0\4" + bytes([192, 0, 2, 7]) if is_a else b""
            head = data[:2] + b"\x81\x80" + b"\0\1" + (b"\0\1" if is_a else b"\0\0") + b"\0\0\0\0"
            self.transport.sendto(head + data[12:qend] + rr, addr)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Resolver, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    log = tmp_path / "events"
    script = log_script(tmp_path / "hook", log, "$1 ip=$ip router=$router dns=$dns domain=$domain search=$search")
    try:
        async with wire(tmp_path, nameservers=(("127.0.0.1", port),)) as w:
            out = await w.arun(busybox, "udhcpc", "-B", "-q", "-n", "-t", "3", "-O", "search", "-s", str(script),
                               "-i", w.ifname)  # fmt: skip
            assert "lease of 10.0.2.15 obtained" in out, out
            assert any(ln.startswith("bound ip=10.0.2.15 router=10.0.2.2 dns=10.0.2.3 domain=lab.test "
                                     "search=lab.test example.test") for ln in lines(log)), lines(log)  # fmt: skip
            await w.arun("ip", "addr", "add", "10.0.2.15/24", "dev", w.ifname)
            out = await w.arun(busybox, "nslookup", "GateWay", "10.0.2.3")
            assert "Address: 10.0.2.2" in out and "Address: fec0::2" in out, out
            out = await w.arun(busybox, "nslookup", "-type=AAAA", "dns.LAB.test", "10.0.2.3")
            assert "Address: fec0::3" in out, out
            out = await w.arun(busybox, "nslookup", "-type=A", "www.example.test", "10.0.2.3")
            assert "Address: 192.0.2.7" in out, out
    finally:
        transport.close()


NETWORKD = Path("/lib/systemd/systemd-networkd")
# systemd-networkd run by hand in the namespace with a mount namespace of its own: its config
# and state directories are private tmpfs, and a read-only /sys tells it (as in a container)
# that no udev will announce the link.
NETWORKD_RUN = """set -e
mount -o remount,bind,ro /sys
mount -t tmpfs tmpfs /etc/systemd/network
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/systemd/netif
chown systemd-network:systemd-network /run/systemd/netif
printf '[Match]\\nName=%s\\n[Network]\\nDHCP=ipv4\\nIPv6AcceptRA=no\\nLinkLocalAddressing=no\\n' "$1" \\
    > /etc/systemd/network/10-test.network
exec /lib/systemd/systemd-networkd
"""


@pytest.mark.skipif(not NETWORKD.exists() or shutil.which("unshare") is None, reason="no systemd-networkd")
async def test_systemd_networkd_lease_and_release_on_stop(tmp_path: Path) -> None:
    async with wire(tmp_path) as w:
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", w.ns, "unshare", "-m", "--propagation", "private",
            "sh", "-c", NETWORKD_RUN, "networkd", w.ifname,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        try:
            async with asyncio.timeout(20):
                while not (MAC_BYTES in w.net.dhcp.leases and "10.0.2.15/24" in await w.arun("ip", "-4", "addr")):
                    await asyncio.sleep(0.1)
            assert w.net.dhcp.leases[MAC_BYTES].state.value == "bound"
            async with asyncio.timeout(10):
                while "default via 10.0.2.2" not in await w.arun("ip", "-4", "route"):
                    await asyncio.sleep(0.1)
            # As for dhcpcd: the RELEASE goes out just before the address goes away.
            await w.arun("ip", "neigh", "replace", "10.0.2.2", "lladdr", "52:55:0a:00:02:02", "dev", w.ifname)
            proc.terminate()  # networkd sends a RELEASE as it stops (SendRelease= is on)
            async with asyncio.timeout(10):
                while MAC_BYTES in w.net.dhcp.leases:
                    await asyncio.sleep(0.05)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


def dns_answer(query: bytes, count: int) -> bytes:
    """``count`` A records (192.0.2.1…) for an A question, NODATA for any other."""
    qend = query.index(b"\0", 12) + 5
    is_a = query[qend - 4 : qend - 2] == b"\0\1"
    n = count if is_a else 0
    rrs = b"".join(b"\xc0\x0c\0\1\0\1\0\0\0\x3c\0\4" + bytes([192, 0, 2, i + 1]) for i in range(n))
    return query[:2] + b"\x81\x80\0\1" + n.to_bytes(2, "big") + b"\0\0\0\0" + query[12:qend] + rrs


async def test_glibc_resolver_gets_local_names_and_falls_back_to_tcp_on_tc(tmp_path: Path) -> None:
    """glibc's stub resolver (getent) in the namespace with 10.0.2.3 as its nameserver: the gateway's
    names in both families, and an answer too big for 512 bytes that reaches it truncated, so it
    asks again over TCP to 10.0.2.3:53 and gets all 60 addresses from the loopback resolver."""

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            self.transport = transport

        def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
            self.transport.sendto(dns_answer(data, 60), addr)

    async def tcp(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                n = int.from_bytes(await r.readexactly(2), "big")
                reply = dns_answer(await r.readexactly(n), 60)
                w.write(len(reply).to_bytes(2, "big") + reply)
                await w.drain()
        w.close()

    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(tcp, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", port))
    try:
        async with wire(tmp_path, nameservers=(("127.0.0.1", port),)) as w:
            # `ip netns exec` puts /etc/netns/NAME/resolv.conf over /etc/resolv.conf for what it runs.
            conf = Path("/etc/netns") / w.ns
            conf.mkdir(parents=True)
            try:
                (conf / "resolv.conf").write_text("nameserver 10.0.2.3\noptions timeout:2 attempts:2\n")
                await w.arun("ip", "addr", "add", "10.0.2.15/24", "dev", w.ifname)
                out = await w.arun("getent", "ahosts", "gateway")
                assert "10.0.2.2" in out and "fec0::2" in out, out
                out = await w.arun("getent", "ahostsv4", "big.example.test")
                assert len({ln.split()[0] for ln in out.splitlines()}) == 60, out
                assert w.net.counters()["tcp_conns"] >= 1  # the retry over TCP went through the stack
            finally:
                shutil.rmtree(conf)
                with contextlib.suppress(OSError):
                    conf.parent.rmdir()  # only if no one else keeps a namespace's files there
    finally:
        transport.close()
        server.close()
