"""Our DHCP server side by side with QEMU 7.2's libslirp, fed the same crafted frames.

QEMU runs with no machine (``-M none``): its ``-netdev user`` is joined by a
hub to a ``-netdev socket`` on loopback UDP, so each datagram the test sends is
one Ethernet frame into libslirp and each one back is its reply. The same
frames go to a :class:`UserNetwork`. Both must make the same decision (reply
type and address) and send the same values in libslirp's options, in
libslirp's order when the client sends no parameter request list. Deliberate
differences, each checked on its own in ``test_dhcp_conformance``: libslirp
broadcasts every reply and zeroes flags/ciaddr/giaddr, puts 255.255.255.255 in
a NAK's yiaddr and leaves option 54 out of it, ignores option 54 naming another
server, DHCPINFORM and DECLINE, grants an INIT-REBOOT for any free pool address
(we NAK one never leased to the client), and sends no option 28. Only loopback is used;
no frame asks libslirp to reach anything beyond itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from appliance.nat import UserNetConfig, UserNetwork
from tests.conftest import needs_qemu

from .conftest import drain
from .test_dhcp_conformance import GW, IP15, IP20, MAC, MAC2, Reply, bootp, frame, opt

pytestmark = needs_qemu

NAK, ACK = 6, 5
MAC3 = bytes.fromhex("525400000003")
# A client of its own that takes the first address in both servers before the scenario starts.
PROBE_MAC = b"\x02" * 6
PROBE_XIDS = 0x0FEE0000


def probe(n: int) -> bytes:
    return frame(bootp(opt(53, b"\1"), mac=PROBE_MAC, xid=PROBE_XIDS + n), mac=PROBE_MAC)


def xid_of(f: bytes) -> int:
    return int.from_bytes(f[46:50], "big")


class Slirp:
    """QEMU's -netdev user behind a loopback UDP socket carrying Ethernet frames."""

    def __init__(self, options: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        ours = self.sock.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        user = "user,id=u" + ("," + options if options else "")
        self.probes = 0
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none", "-netdev", user,
             "-netdev", f"socket,id=s,udp=127.0.0.1:{ours},localaddr=127.0.0.1:{self.port}",
             "-netdev", "hubport,id=h1,hubid=0,netdev=u", "-netdev", "hubport,id=h2,hubid=0,netdev=s"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def exchange(self, f: bytes) -> list[bytes]:
        """Send one frame; the frames libslirp sends back for it.

        A DISCOVER from the throwaway client follows it: libslirp handles frames in
        order, so everything before that one's OFFER answers ``f``, however slow QEMU is.
        """
        out: list[bytes] = []
        self.probes += 1
        self.sock.sendto(f, ("127.0.0.1", self.port))
        self.sock.sendto(probe(self.probes), ("127.0.0.1", self.port))
        self.sock.settimeout(20)
        while (xid := xid_of(got := self.sock.recv(65535))) != PROBE_XIDS + self.probes:
            if xid & 0xFFFF0000 != PROBE_XIDS:  # not a late answer to an earlier probe
                out.append(got)
        return out

    def ready(self) -> None:
        """QEMU is up once the throwaway client's DISCOVER gets its OFFER (10.0.2.15)."""
        self.sock.settimeout(0.2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU exited with {self.proc.returncode}")
            self.sock.sendto(probe(0), ("127.0.0.1", self.port))
            with contextlib.suppress(TimeoutError):
                self.sock.recv(65535)
                return
        pytest.fail("QEMU's -netdev user never answered")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.sock.close()


@contextlib.contextmanager
def slirp(options: str) -> Iterator[Slirp]:
    s = Slirp(options)
    try:
        s.ready()
        yield s
    finally:
        s.close()


@contextlib.asynccontextmanager
async def ours(options: str) -> AsyncIterator[UserNetwork]:
    net = UserNetwork(UserNetConfig.from_string("user" + ("," + options if options else "")))
    await net.start()
    try:
        # The throwaway client takes 10.0.2.15 here as in libslirp, so both pools move alike.
        net.send([memoryview(probe(0))])
        drain(net)
        yield net
    finally:
        await net.stop()


def dhcp_only(frames: list[bytes]) -> list[Reply]:
    return [Reply(f) for f in frames if f[12:14] == b"\x08\x00" and f[23] == 17 and f[36:38] == b"\x00\x44"]


# (what it checks, the frame's payload, its keyword arguments for frame())
SCENARIO: list[tuple[str, bytes, dict[str, object]]] = [
    ("discover", bootp(opt(53, b"\1")), {}),
    ("discover, broadcast flag", bootp(opt(53, b"\1"), xid=2, flags=0x8000), {}),
    ("selecting", bootp(opt(53, b"\3") + opt(50, IP15) + opt(54, GW), xid=3), {}),
    ("renewing", bootp(opt(53, b"\3"), xid=4, ciaddr=IP15), {"src": IP15, "dst": GW}),
    ("rebinding", bootp(opt(53, b"\3"), xid=5, ciaddr=IP15), {"src": IP15}),
    ("init-reboot, own", bootp(opt(53, b"\3") + opt(50, IP15), xid=6), {}),
    ("init-reboot, outside the pool", bootp(opt(53, b"\3") + opt(50, bytes([10, 0, 2, 99])), xid=7), {}),
    ("init-reboot, another's", bootp(opt(53, b"\3") + opt(50, IP15), mac=MAC2, xid=8), {"mac": MAC2}),
    ("renewing a free pool address", bootp(opt(53, b"\3"), mac=MAC2, xid=9, ciaddr=IP20),
     {"mac": MAC2, "src": IP20, "dst": GW}),
    ("request naming nothing", bootp(opt(53, b"\3"), mac=MAC3, xid=10), {"mac": MAC3}),
    ("bootp", bootp(b"", mac=MAC3, xid=11, magic=False), {"mac": MAC3}),
    ("relayed", bootp(opt(53, b"\1"), xid=12, giaddr=bytes([10, 0, 2, 50])),
     {"src": bytes([10, 0, 2, 50]), "dst": GW, "sport": 67}),
    ("release", bootp(opt(53, b"\7") + opt(54, GW), xid=13, ciaddr=IP15), {"src": IP15, "dst": GW}),
    ("discover after release", bootp(opt(53, b"\1"), xid=14), {}),
    ("client identifier", bootp(opt(53, b"\1") + opt(61, b"\x01" + MAC), xid=15), {}),
]  # fmt: skip

OPTION_SETS = [
    "",
    "hostname=vm1,domainname=ex.test,tftp-server-name=tftp.ex,bootfile=pxe.0,"
    "dnssearch=a.example.test,dnssearch=b.example.test,dnssearch=example.test",
    "restrict=on,net=192.168.76.0/24,dhcpstart=192.168.76.100",
    "bootfile=http://10.0.2.2/boot.efi",
    "dnssearch=Ok.Test,dnssearch=ok.test,dnssearch=b.ok.test,dnssearch=x..y,dnssearch=a.b.,dnssearch=.",
    "dnssearch=x..y",
]


@pytest.mark.parametrize("options", OPTION_SETS)
async def test_same_decisions_addresses_and_options_as_libslirp(options: str) -> None:
    renumber = "net=192.168.76.0" in options
    with slirp(options) as qemu:
        async with ours(options) as net:
            for what, payload, kw in SCENARIO:
                if renumber:
                    payload = payload.replace(bytes([10, 0, 2]), bytes([192, 168, 76]))
                    payload = payload.replace(bytes([192, 168, 76, 15]), bytes([192, 168, 76, 100]))
                    kw = {k: (v.replace(bytes([10, 0, 2]), bytes([192, 168, 76])) if isinstance(v, bytes) else v)
                          for k, v in kw.items()}  # fmt: skip
                f = frame(payload, **kw)  # type: ignore[arg-type]
                theirs = dhcp_only(qemu.exchange(f))
                net.send([memoryview(f)])
                await asyncio.sleep(0)
                mine = dhcp_only(drain(net))
                assert len(mine) == len(theirs), what
                for t, m in zip(theirs, mine, strict=True):
                    assert m.type == t.type, what
                    assert m.xid == t.xid and m.siaddr == (t.siaddr if t.type != NAK else bytes(4)), what
                    if t.type != NAK:
                        assert m.yiaddr == t.yiaddr, what
                    assert m.file == t.file, what
                    for code, value in t.opts.items():
                        assert m.opts.get(code) == value, (what, code)
                    if t.type == NAK:
                        assert (m.order, t.order) == ([53, 54, 56], [53, 56]), what
                    else:
                        assert [c for c in m.order if c != 28] == t.order, what
